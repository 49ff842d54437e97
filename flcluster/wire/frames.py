"""Cluster TCP framing (spec/cluster-protocol.md, "Frames"), sans-IO.

Every message between nodes is one frame::

    +----------------+----------------+--------------------------+------------------------+
    | u32 LE length  | u16 LE hlen    | header: hlen bytes UTF-8 | payload: raw bytes     |
    | (of all after) |                | JSON object with "type"  | (little-endian tensors)|
    +----------------+----------------+--------------------------+------------------------+

The length prefix is read first and checked against the limit *before* any of the body is buffered,
so an oversized frame costs the receiver four bytes, not a hundred megabytes. :class:`FrameDecoder`
is fed whatever bytes arrive and hands back whole frames; it never blocks and never reads a socket.
Anything malformed raises :class:`~flcluster.errors.FrameError`, after which the connection is dropped
(there is no way to resynchronise a byte stream after a bad length).
"""

from __future__ import annotations

import json
import struct
from typing import Any

import attrs

from flcluster.errors import FrameError

LENGTH = struct.Struct("<I")
HEADER_LENGTH = struct.Struct("<H")
MAX_HEADER = 64 * 1024 - 1
DEFAULT_MAX_FRAME = 100 * 1024 * 1024


@attrs.frozen
class Frame:
    """One decoded frame: the JSON header (a dict with a ``type`` string) and the raw payload."""

    header: dict[str, Any]
    payload: bytes = b""

    @property
    def type(self) -> str:
        """The message type named in the header."""
        value = self.header["type"]
        assert isinstance(value, str)
        return value


def encode_frame(
    header: dict[str, Any], payload: bytes = b"", *, max_frame: int = DEFAULT_MAX_FRAME
) -> bytes:
    """Serialise one frame.

    Raises:
        FrameError: the header has no string ``type`` or the frame exceeds the limits.
    """
    if not isinstance(header.get("type"), str):
        raise FrameError(f"frame header needs a string 'type', got {header.get('type')!r}")
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    if len(raw) > MAX_HEADER:
        raise FrameError(f"frame header is {len(raw)} bytes; the limit is {MAX_HEADER}")
    body_len = HEADER_LENGTH.size + len(raw) + len(payload)
    if body_len > max_frame:
        raise FrameError(f"frame of {body_len} bytes exceeds the limit of {max_frame} bytes")
    return b"".join((LENGTH.pack(body_len), HEADER_LENGTH.pack(len(raw)), raw, payload))


class FrameDecoder:
    """Incremental frame decoder: :meth:`feed` bytes, then take frames with :meth:`next_frame`."""

    def __init__(self, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._max_frame = max_frame
        self._buffer = bytearray()
        self._need: int | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray) -> None:
        """Add received bytes."""
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """Return the next whole frame, or None if more bytes are needed.

        Raises:
            FrameError: the stream is malformed; the connection must be closed.
        """
        if self._need is None:
            if len(self._buffer) < LENGTH.size:
                return None
            (need,) = LENGTH.unpack_from(self._buffer)
            if need > self._max_frame:
                raise FrameError(f"frame of {need} bytes exceeds the limit of {self._max_frame} bytes")
            if need < HEADER_LENGTH.size:
                raise FrameError(f"frame of {need} bytes is too short to hold a header length")
            self._need = need
        total = LENGTH.size + self._need
        if len(self._buffer) < total:
            return None
        body = bytes(self._buffer[LENGTH.size : total])
        del self._buffer[:total]
        self._need = None
        return _parse_body(body)


def _parse_body(body: bytes) -> Frame:
    (hlen,) = HEADER_LENGTH.unpack_from(body)
    if HEADER_LENGTH.size + hlen > len(body):
        raise FrameError(f"frame header length {hlen} runs past the end of a {len(body)}-byte frame")
    raw = body[HEADER_LENGTH.size : HEADER_LENGTH.size + hlen]
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: a header of deeply nested brackets; refused like any other bad header.
        raise FrameError(f"frame header is not valid UTF-8 JSON: {type(exc).__name__}: {exc}"[:300]) from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise FrameError(f"frame header must be a JSON object with a string 'type', got {header!r:.200}")
    return Frame(header=header, payload=body[HEADER_LENGTH.size + hlen :])


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a frame header")
