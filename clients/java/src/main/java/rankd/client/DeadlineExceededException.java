package rankd.client;

/** No answer within the call's deadline (enforced here as well as sent to the server). */
public final class DeadlineExceededException extends RankdException {
  private static final long serialVersionUID = 1L;

  public DeadlineExceededException(String message) {
    super(message);
  }
}
