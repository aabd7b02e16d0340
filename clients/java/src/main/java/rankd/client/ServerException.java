package rankd.client;

/**
 * The server answered the request with an error (docs/protocol.md, "Errors"): the code, its name
 * ("code N" for a code this client does not know) and the server's message.
 */
public final class ServerException extends RankdException {
  private static final long serialVersionUID = 1L;
  private static final String[] NAMES = {
    null, "MalformedRequest", "UnknownModel", "UnknownVersion", "BadFeature", "LimitExceeded",
    "DeadlineExceeded", "UnsupportedMessage", "ShuttingDown", "Internal"
  };

  private final int code;
  private final String serverMessage;

  public ServerException(int code, String serverMessage) {
    super(nameOf(code) + ": " + serverMessage);
    this.code = code;
    this.serverMessage = serverMessage;
  }

  /** The name of an error code, or "code N" for one this client does not know. */
  public static String nameOf(int code) {
    return code > 0 && code < NAMES.length ? NAMES[code] : "code " + code;
  }

  /** The protocol's error code (1 MalformedRequest ... 9 Internal). */
  public int code() {
    return code;
  }

  /** The code's name. */
  public String codeName() {
    return nameOf(code);
  }

  /** The server's message. */
  public String serverMessage() {
    return serverMessage;
  }
}
