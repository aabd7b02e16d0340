"""A client for rankd's binary RPC (docs/protocol.md): `Client` (blocking) and `AsyncClient`
(asyncio, pipelined). Scores come back as a list, or a numpy array with `numpy=True`.

    import rankd
    with rankd.Client("127.0.0.1:7470") as c:
        scores = c.score("adult", items=[{"age": 39, "workclass": "State-gov"}],
                         user={"native-country": "United-States"})
"""
from .client import AsyncClient, Client, Scores
from .errors import (CODES, ConnectionLost, DeadlineExceeded, ProtocolError, RankdError,
                     ServerError)

__all__ = ["AsyncClient", "Client", "Scores", "CODES", "ConnectionLost", "DeadlineExceeded",
           "ProtocolError", "RankdError", "ServerError"]
__version__ = "0.1.0"
