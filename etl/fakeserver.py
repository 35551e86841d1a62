"""The HTTP/1.1 server under the bundled fake trakt API (`etl.fakeapi`): asyncio, one thread.

It owns sockets and framing only; what to answer is the fake's business (`Responder`). One event
loop in a daemon thread serves every connection (keep-alive, Content-Length request bodies), so
the fake costs little CPU per request and can outrun the client it measures: a thread per
connection spent most of its time switching threads. The loop is uvloop's when uvloop is
installed (the `bench` extra), else asyncio's own.

Answers that must wait (latency, delay faults) are timers, not threads; a huge streamed body is
written piece by piece as the socket drains, never built whole, and a dripped one a piece per
interval. `stop()` returns promptly: every connection is dropped, sleeping requests included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol, cast

MAX_REQUEST_BODY = 1 << 20
"""Request bodies larger than this are refused with 413 (the real bodies are ~80 bytes)."""
MAX_HEAD = 64 * 1024
"""A request line plus headers longer than this is refused with 431."""
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, not FIN
SERVER_NAME = "FakeTrakt/1.0"


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    # The whole keep-alive answer, head and body, when the responder has it ready (a cache).
    raw: bytes | None = field(default=None, compare=False)


@dataclass
class Reset:
    """Drop the connection with a TCP reset instead of answering."""


@dataclass
class Stream:
    """A body of `size` bytes written piece by piece from `pieces`, `interval_s` apart (a slow
    drip when positive; as fast as the socket drains when 0)."""

    status: int
    size: int
    chunked: bool
    content_type: str
    headers: dict[str, str]
    pieces: Iterable[bytes]
    interval_s: float = 0.0


Answer = Response | Stream | Reset


class Pending(Protocol):
    """A request counted on arrival whose answer comes `delay_s` later (`answer()`)."""

    delay_s: float

    def answer(self) -> Answer: ...


class Responder(Protocol):
    def arrive(self, method: str, target: str, body: bytes) -> Pending: ...


def status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")


def head_bytes(
    status: int,
    content_type: str,
    headers: dict[str, str],
    *,
    length: int | None,
    close: bool,
) -> bytes:
    """Status line and headers; `length=None` means a chunked body."""
    lines = [status_line(status), f"Server: {SERVER_NAME}\r\n".encode()]
    if content_type:
        lines.append(f"Content-Type: {content_type}\r\n".encode("latin-1"))
    if length is None:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    else:
        lines.append(f"Content-Length: {length}\r\n".encode())
    lines.extend(f"{name}: {value}\r\n".encode("latin-1") for name, value in headers.items())
    if close:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def response_bytes(response: Response, *, close: bool, head_only: bool = False) -> bytes:
    if response.raw is not None and not close and not head_only:
        return response.raw
    head = head_bytes(
        response.status,
        response.content_type,
        response.headers,
        length=len(response.body),
        close=close,
    )
    return head if head_only else head + response.body


def _failure(status: int, error: str) -> Response:
    return Response(status, json.dumps({"status": "failure", "error": error}).encode())


def _header(lowered_head: bytes, marker: bytes) -> bytes | None:
    """The value of the header `marker` names (``b"\\r\\nname:"``) in a lowered head."""
    at = lowered_head.find(marker)
    if at < 0:
        return None
    start = at + len(marker)
    end = lowered_head.find(b"\r\n", start)
    return (lowered_head[start:] if end < 0 else lowered_head[start:end]).strip()


@dataclass
class _Request:
    method: str
    target: str
    body: bytes
    close: bool


class _Connection(asyncio.Protocol):
    """One client connection: parses requests in order, answers each, keeps the line alive."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._busy = False  # an answer is pending (a timer) or streaming
        self._closed = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._busy:
            self._serve_buffered()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._writable.set()
        self._server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # --- requests ------------------------------------------------------------------------------

    def _serve_buffered(self) -> None:
        """Answer the complete requests in the buffer, one at a time, until one must wait."""
        while not self._busy and not self._closed:
            request = self._parse_one()
            if request is None:
                return
            pending = self._server.responder.arrive(request.method, request.target, request.body)
            if pending.delay_s > 0:
                self._busy = True
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(pending.delay_s, self._answer_later, request, pending)
                return
            self._send(request, pending.answer())

    def _answer_later(self, request: _Request, pending: Pending) -> None:
        self._timer = None
        self._busy = False
        if self._closed or self._server.stopping:
            return
        self._send(request, pending.answer())
        if not self._busy:
            self._serve_buffered()

    def _parse_one(self) -> _Request | None:
        """The next complete request, removed from the buffer; None if it is not all here yet.

        An unacceptable request is answered (and the connection closed) here, returning None.
        Headers are searched in the lowered head rather than parsed into a dict: this runs for
        every request, and the fake must stay far cheaper than the client it serves.
        """
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD:
                self._refuse(431, "request header fields too large")
            return None
        head = bytes(buffer[:end])
        first = head.find(b"\r\n")
        parts = (head if first < 0 else head[:first]).split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self._refuse(400, "malformed request line")
            return None
        lowered = head.lower()
        encoding = _header(lowered, b"\r\ntransfer-encoding:")
        if encoding is not None and encoding != b"identity":
            self._refuse(411, "send the body with a Content-Length")
            return None
        declared = _header(lowered, b"\r\ncontent-length:")
        if declared is not None and not declared.isdigit():
            self._refuse(400, "invalid Content-Length")
            return None
        length = int(declared) if declared else 0
        if length > MAX_REQUEST_BODY:
            self._refuse(413, "request body too large")
            return None
        start = end + 4
        if len(buffer) < start + length:
            return None
        body = bytes(buffer[start : start + length])
        del buffer[: start + length]
        connection = _header(lowered, b"\r\nconnection:") or b""
        close = connection == b"close" or (parts[2] == b"HTTP/1.0" and connection != b"keep-alive")
        return _Request(parts[0].decode("latin-1"), parts[1].decode("latin-1"), body, close)

    def _refuse(self, status: int, error: str) -> None:
        self._buffer.clear()
        self._write(response_bytes(_failure(status, error), close=True))
        self._close()

    # --- answers -------------------------------------------------------------------------------

    def _send(self, request: _Request, answer: Answer) -> None:
        head_only = request.method == "HEAD"
        if isinstance(answer, Reset):
            self._reset()
        elif isinstance(answer, Stream):
            self._busy = True
            self._task = asyncio.get_running_loop().create_task(
                self._stream(answer, head_only, request.close)
            )
        else:
            self._write(response_bytes(answer, close=request.close, head_only=head_only))
            if request.close:
                self._close()

    async def _stream(self, stream: Stream, head_only: bool, close: bool) -> None:
        """Write a body piece by piece as the socket drains (and, for a drip, as the interval
        passes); a client that goes away just ends it."""
        length = None if stream.chunked else stream.size
        head = head_bytes(
            stream.status, stream.content_type, stream.headers, length=length, close=close
        )
        self._write(head)
        if not head_only:
            for number, piece in enumerate(stream.pieces):
                if number and stream.interval_s > 0:
                    # A timer on the loop, not a thread: stop() and a client that hangs up
                    # cancel it with the task (connection_lost).
                    await asyncio.sleep(stream.interval_s)
                await self._writable.wait()
                if self._closed or self._server.stopping:
                    return
                self._write(b"%x\r\n%b\r\n" % (len(piece), piece) if stream.chunked else piece)
            await self._writable.wait()
            if stream.chunked and not self._closed:
                self._write(b"0\r\n\r\n")
        self._task = None
        self._busy = False
        if close:
            self._close()
        elif not self._closed:
            self._serve_buffered()

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._closed:
            self._transport.write(data)

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _reset(self) -> None:
        """Close at once with a TCP reset (SO_LINGER 0), answering nothing."""
        transport = self._transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()

    def drop(self) -> None:
        """Stop: abandon whatever is pending and drop the connection."""
        if self._transport is not None:
            self._transport.abort()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class HttpServer:
    """Serves `responder` on 127.0.0.1:`port` from an event loop in a daemon thread.

    `reuse_port` lets several processes listen on one port (SO_REUSEPORT), the kernel sharing
    the connections between them: the benchmarks run the fake that way on every core.
    """

    def __init__(self, responder: Responder, port: int = 0, *, reuse_port: bool = False) -> None:
        self.responder = responder
        self.connections: set[_Connection] = set()
        self.stopping = False
        self._loop = _new_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._server: asyncio.base_events.Server | None = None
        self.port = 0
        self._thread = threading.Thread(
            target=self._run, args=(port, reuse_port), name="fake-trakt", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        self._thread.name = f"fake-trakt-{self.port}"

    def _run(self, port: int, reuse_port: bool) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                self._loop.create_server(
                    lambda: _Connection(self),
                    "127.0.0.1",
                    port,
                    reuse_address=True,
                    reuse_port=reuse_port or None,
                    backlog=1024,
                )
            )
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:  # reported to the thread that called start
            self._error = exc
            self._ready.set()
            self._loop.close()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            # Streams cancelled by stop() finish their cancellation before the loop closes.
            pending = asyncio.all_tasks(self._loop)
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def call(self, function: Callable[[], Any]) -> None:
        """Run `function` on the loop's thread (everything touching connections must)."""
        self._loop.call_soon_threadsafe(function)

    def stop(self) -> None:
        """Stop listening and drop every connection; returns once the loop has ended."""
        if not self._thread.is_alive():
            return

        def shut() -> None:
            self.stopping = True
            if self._server is not None:
                self._server.close()
            for connection in list(self.connections):
                connection.drop()
            self._loop.call_soon(self._loop.stop)

        self._loop.call_soon_threadsafe(shut)
        self._thread.join(timeout=5)

    def active_streams(self) -> int:
        """Connections busy streaming or waiting to answer (for tests)."""
        return sum(1 for c in list(self.connections) if c._busy)
