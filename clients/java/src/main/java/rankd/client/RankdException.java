package rankd.client;

/** Base class of every exception the rankd client throws (unchecked). */
public class RankdException extends RuntimeException {
  private static final long serialVersionUID = 1L;

  public RankdException(String message) {
    super(message);
  }

  public RankdException(String message, Throwable cause) {
    super(message, cause);
  }
}
