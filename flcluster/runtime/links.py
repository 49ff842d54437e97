"""Framed message links over any trio stream (spec/cluster-protocol.md, "Frames").

:class:`FramedLink` wraps a :class:`trio.abc.Stream` (a TCP connection in production, an in-memory
stream pair in tests) with the sans-IO :class:`~flcluster.wire.frames.FrameDecoder`. Sends are
serialised by a lock so two tasks can share a link; receives are done by one task per link.

Two kinds of bad input are told apart, because they call for different answers:

- a *stream* error (bad length, oversized frame, header that is not JSON) leaves the byte stream
  unusable: :meth:`FramedLink.receive` raises :class:`~flcluster.errors.FrameError` and the owner
  closes the link;
- a *message* error (unknown type, missing field, wrong type) leaves the stream in sync: the owner
  answers :class:`~flcluster.wire.messages.ErrorReply` and keeps reading.

**TLS** (spec/cluster-protocol.md §7). :func:`open_stream` and :func:`accept_stream` are the one way a
cluster connection is made or taken: without an SSL context they hand back the plain TCP stream; with one
they wrap it in a :class:`trio.SSLStream` and complete the handshake before any frame is sent or read, so a
peer that is refused (its certificate, or plain bytes on a TLS port) never reaches the frame decoder. A
failed handshake raises :class:`~flcluster.errors.HandshakeFailed` with OpenSSL's reason. The caller owns
the deadline (``with trio.fail_after(...)`` around either call).
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from flcluster.errors import FrameError, HandshakeFailed
from flcluster.errors import LinkClosed as LinkClosed  # its home is flcluster.errors
from flcluster.wire.frames import DEFAULT_MAX_FRAME, Frame, FrameDecoder, encode_frame
from flcluster.wire.messages import Message, from_frame, to_header

RECEIVE_CHUNK = 256 * 1024


def peer_name(stream: trio.abc.Stream) -> str:
    """``host:port`` of the other end of a TCP (or TLS over TCP) stream, for logs; ``"?"`` if unknown."""
    inner: object = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if not isinstance(inner, trio.SocketStream):
        return "?"
    try:
        host, port = inner.socket.getpeername()[:2]
    except (OSError, ValueError):
        return "?"
    return f"{host}:{port}"


async def _handshake(stream: trio.SSLStream[Any], where: str) -> None:
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        reason = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError | OSError) else exc
        raise HandshakeFailed(f"the TLS handshake with {where} failed: {reason}") from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def open_stream(host: str, port: int, tls: ssl.SSLContext | None) -> trio.abc.Stream:
    """Connect to a cluster listener; with ``tls``, complete the TLS handshake first.

    Raises:
        OSError: the connection could not be made.
        HandshakeFailed: the TLS handshake failed (the stream is closed).
    """
    stream = await trio.open_tcp_stream(host, port)
    if tls is None:
        return stream
    # Host names are not checked on cluster links (spec/cluster-protocol.md §7.1): no server_hostname.
    secure = trio.SSLStream(stream, tls, server_hostname=None)
    await _handshake(secure, f"{host}:{port}")
    return secure


async def accept_stream(stream: trio.abc.Stream, tls: ssl.SSLContext | None) -> trio.abc.Stream:
    """Take an accepted connection; with ``tls``, complete the TLS handshake (the peer's certificate checked).

    Raises:
        HandshakeFailed: the TLS handshake failed (the stream is closed).
    """
    if tls is None:
        return stream
    where = peer_name(stream)
    secure = trio.SSLStream(stream, tls, server_side=True)
    await _handshake(secure, where)
    return secure


class FramedLink:
    """A bidirectional link carrying cluster frames."""

    def __init__(self, stream: trio.abc.Stream, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._stream = stream
        self._decoder = FrameDecoder(max_frame=max_frame)
        self._max_frame = max_frame
        self._send_lock = trio.Lock()

    @property
    def stream(self) -> trio.abc.Stream:
        """The underlying stream."""
        return self._stream

    async def send(self, msg: Message, payload: bytes = b"") -> None:
        """Send one message record (and an optional raw payload).

        Raises:
            LinkClosed: the link broke.
        """
        data = encode_frame(to_header(msg), payload, max_frame=self._max_frame)
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise LinkClosed(str(exc)) from None

    async def receive_frame(self) -> Frame:
        """Receive the next whole frame.

        Raises:
            LinkClosed: the other side closed the link (or it broke).
            FrameError: the byte stream is malformed; close the link.
        """
        while True:
            frame = self._decoder.next_frame()
            if frame is not None:
                return frame
            try:
                data = await self._stream.receive_some(RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise LinkClosed(str(exc)) from None
            if not data:
                if self._decoder.buffered:
                    raise FrameError(f"link closed in the middle of a frame ({self._decoder.buffered} bytes)")
                raise LinkClosed("end of stream")
            self._decoder.feed(data)

    async def receive(self) -> tuple[Message, bytes]:
        """Receive the next message and its payload.

        Raises:
            LinkClosed: the link closed.
            FrameError: a stream error or a malformed message (see the module docstring).
        """
        frame = await self.receive_frame()
        return from_frame(frame), frame.payload

    async def aclose(self) -> None:
        """Close the link (idempotent)."""
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await self._stream.aclose()


async def run_session(*workers: Callable[[], Awaitable[object]]) -> Exception | None:
    """Run the workers of one link session concurrently until the first ends or the link breaks.

    Each worker is a coroutine function (reader, writer, heartbeat sender, …) over the same link. The
    session ends as soon as any worker returns or raises :class:`LinkClosed` / :class:`FrameError`; the
    others are cancelled. Link errors are returned rather than raised, so callers handle a broken link
    with a plain ``if`` instead of unwrapping trio's exception groups; any other error propagates.

    Returns:
        The first link error, or None when a worker simply returned.
    """
    error: Exception | None = None

    async with trio.open_nursery() as nursery:

        async def guard(worker: Callable[[], Awaitable[object]]) -> None:
            nonlocal error
            try:
                await worker()
            except (LinkClosed, FrameError) as exc:
                if error is None:
                    error = exc
            nursery.cancel_scope.cancel()

        for worker in workers:
            nursery.start_soon(guard, worker)
    return error
