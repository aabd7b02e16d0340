"""Blocking and asyncio clients of rankd's binary RPC."""
import asyncio
import itertools
import socket
import time
from dataclasses import dataclass, field

from . import _wire as w
from .errors import ConnectionLost, DeadlineExceeded, ProtocolError, ServerError


@dataclass
class Scores:
    """A scored request: the model, the version that served it, one score per item (a
    multi-task model: its default head's), and a multi-task model's heads by name (the default
    head first; empty for a single-task model)."""
    model: str
    version: int
    scores: object  # list of float, or numpy.ndarray with numpy=True
    heads: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.scores)


def _addr(addr):
    if isinstance(addr, tuple):
        return addr
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def _answer(msg_type, body, numpy):
    if msg_type == w.SCORE_RESPONSE:
        return Scores(*w.decode_score_response(body, numpy))
    if msg_type == w.ERROR:
        raise ServerError(*w.decode_error(body))
    raise ProtocolError(f"unexpected message type {msg_type}")


def _deadline_us(deadline):
    return 0 if deadline is None else max(1, int(deadline * 1e6))


class Client:
    """A blocking client on one connection (reconnected on the next call after a failure).
    Not thread-safe: use one per thread, or AsyncClient for concurrency.

    `timeout`: seconds for connecting and for each call unless the call gives its own deadline.
    """

    def __init__(self, addr, timeout=10.0, numpy=False):
        self.addr = _addr(addr)
        self.timeout = timeout
        self.numpy = numpy
        self._sock = None
        self._ids = itertools.count(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _conn(self):
        if self._sock is None:
            s = socket.create_connection(self.addr, timeout=self.timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = s
        return self._sock

    def _recv_exact(self, n, until):
        buf = bytearray()
        while len(buf) < n:
            left = until - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded("no answer within the deadline")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(n - len(buf))
            except socket.timeout:
                raise DeadlineExceeded("no answer within the deadline") from None
            if not chunk:
                raise ConnectionLost("the server closed the connection")
            buf += chunk
        return bytes(buf)

    def call(self, msg_type, body=b"", deadline=None):
        """Sends one request frame and returns (message type, body) of its answer."""
        until = time.monotonic() + (self.timeout if deadline is None else deadline)
        rid = next(self._ids)
        try:
            s = self._conn()
            s.settimeout(max(0.001, until - time.monotonic()))
            s.sendall(w.frame(msg_type, rid, body))
            while True:
                t, got, n = w.parse_header(self._recv_exact(w.HEADER_LEN, until))
                data = self._recv_exact(n, until)
                if got == rid:
                    return t, data
        except (DeadlineExceeded, ConnectionLost, ProtocolError, OSError) as e:
            # The connection may hold a half-read answer: start afresh next time.
            self.close()
            if isinstance(e, (DeadlineExceeded, ConnectionLost, ProtocolError)):
                raise
            raise ConnectionLost(str(e)) from e

    def score(self, model, items=None, user=None, *, columns=None, num_items=None, version=0,
              label="", routing_key="", deadline=None, numpy=None):
        """Scores items (a list of dicts, or `columns` with `num_items`) with optional
        request-level `user` features. `deadline` in seconds is sent to the server and enforced
        here. Returns Scores; raises ServerError with the server's code on a failed request."""
        body = w.encode_score_request(model, items, user, columns, num_items, version, label,
                                      routing_key, _deadline_us(deadline))
        t, data = self.call(w.SCORE_REQUEST, body, deadline)
        return _answer(t, data, self.numpy if numpy is None else numpy)

    def ping(self):
        t, _ = self.call(w.PING)
        if t != w.PONG:
            raise ProtocolError(f"ping answered with type {t}")

    def status(self, model=""):
        t, data = self.call(w.STATUS_REQUEST, w.encode_status_request(model))
        if t == w.ERROR:
            raise ServerError(*w.decode_error(data))
        return w.decode_status(data)


class AsyncClient:
    """An asyncio client: any number of concurrent calls pipelined on one connection, answers
    matched by request id. Reconnects on the next call after the connection failed."""

    def __init__(self, addr, timeout=10.0, numpy=False):
        self.addr = _addr(addr)
        self.timeout = timeout
        self.numpy = numpy
        self._ids = itertools.count(1)
        self._writer = None
        self._reader_task = None
        self._pending = {}
        self._lock = asyncio.Lock()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self):
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        if self._reader_task is not None:
            self._reader_task.cancel()
        self._fail_all(ConnectionLost("the client was closed"))
        self._writer = self._reader_task = None

    def _fail_all(self, exc):
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    async def _connect(self):
        async with self._lock:
            if self._writer is None or self._writer.is_closing():
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.addr), self.timeout)
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._writer = writer
                self._reader_task = asyncio.ensure_future(self._read(reader))
            return self._writer

    async def _read(self, reader):
        try:
            while True:
                t, rid, n = w.parse_header(await reader.readexactly(w.HEADER_LEN))
                body = await reader.readexactly(n)
                fut = self._pending.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result((t, body))
        except (asyncio.IncompleteReadError, OSError, ProtocolError) as e:
            self._fail_all(ConnectionLost(f"connection lost: {e}"))
            if self._writer is not None:
                self._writer.close()

    async def call(self, msg_type, body=b"", deadline=None):
        writer = await self._connect()
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        writer.write(w.frame(msg_type, rid, body))
        try:
            await writer.drain()
            return await asyncio.wait_for(fut, self.timeout if deadline is None else deadline)
        except asyncio.TimeoutError:
            raise DeadlineExceeded("no answer within the deadline") from None
        except OSError as e:
            raise ConnectionLost(str(e)) from e
        finally:
            self._pending.pop(rid, None)

    async def score(self, model, items=None, user=None, *, columns=None, num_items=None,
                    version=0, label="", routing_key="", deadline=None, numpy=None):
        """As Client.score."""
        body = w.encode_score_request(model, items, user, columns, num_items, version, label,
                                      routing_key, _deadline_us(deadline))
        t, data = await self.call(w.SCORE_REQUEST, body, deadline)
        return _answer(t, data, self.numpy if numpy is None else numpy)

    async def ping(self):
        t, _ = await self.call(w.PING)
        if t != w.PONG:
            raise ProtocolError(f"ping answered with type {t}")
