"""Errors of the rankd client. A failed request raises ServerError with the server's code and
message (docs/protocol.md, "Errors"); transport problems raise ConnectionError subclasses."""

CODES = {
    1: "MalformedRequest",
    2: "UnknownModel",
    3: "UnknownVersion",
    4: "BadFeature",
    5: "LimitExceeded",
    6: "DeadlineExceeded",
    7: "UnsupportedMessage",
    8: "ShuttingDown",
    9: "Internal",
}


class RankdError(Exception):
    """Base class of every error this client raises."""


class ServerError(RankdError):
    """The server answered the request with an error: `code` (int), `name`, `message`."""

    def __init__(self, code, message):
        self.code = code
        self.name = CODES.get(code, f"code {code}")
        self.message = message
        super().__init__(f"{self.name}: {message}")


class ProtocolError(RankdError):
    """The bytes on the connection are not the rankd protocol."""


class ConnectionLost(RankdError, ConnectionError):
    """The connection closed or failed before the answer came."""


class DeadlineExceeded(RankdError, TimeoutError):
    """No answer within the call's deadline (enforced locally as well as by the server)."""
