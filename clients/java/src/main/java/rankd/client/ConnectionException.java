package rankd.client;

/** The connection failed or closed before the answer came, or no server is reachable. */
public final class ConnectionException extends RankdException {
  private static final long serialVersionUID = 1L;

  public ConnectionException(String message, Throwable cause) {
    super(message, cause);
  }
}
