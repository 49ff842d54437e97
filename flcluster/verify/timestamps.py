"""Device timestamps and replays: the pure rules (spec/device-protocol.md, "Client verification").

Theory of operation
-------------------
With ``pki_verify`` a device's ``timestamp`` is a decimal string of epoch milliseconds, and a request is
admitted only while ``|now − timestamp| ≤ replay_attack_time_diff`` (the original's
``CertVerify::verifyTimeStamp``). The functions here never read a clock: the caller passes ``now_ms``
(STYLE rule 2), so they are exact under test and the same on every Server.

A signed request is still good for the whole window, so a captured one could be sent again. The
:class:`ReplayGuard` remembers what it admitted, by a digest of (round, fl_id, the signed data), until the
request's timestamp has left the window; the same request again inside the window is a replay. After that
the timestamp check refuses it anyway, so nothing older needs remembering. The memory is bounded: past
``capacity`` entries the ones whose window closes first are forgotten first (a heap ordered by expiry).

Standard library only (like :mod:`flcluster.core`), so the leader could fold these rules into a sans-IO
machine later.
"""

from __future__ import annotations

import hashlib
import heapq
import re
from typing import Final

from flcluster.errors import VerificationFailed

__all__ = [
    "MAX_REPLAY_ENTRIES",
    "ReplayGuard",
    "check_fresh",
    "check_timestamp",
    "parse_timestamp",
    "replay_key",
]

#: Most requests a :class:`ReplayGuard` remembers by default (about 100 MiB at most).
MAX_REPLAY_ENTRIES: Final = 1 << 20

_EPOCH_MS = re.compile(r"[0-9]{1,18}")


def parse_timestamp(text: str) -> int:
    """A device timestamp as epoch milliseconds.

    Args:
        text: The request's ``timestamp`` field.

    Returns:
        The milliseconds.

    Raises:
        VerificationFailed: ``text`` is not 1–18 decimal digits (no sign, no spaces).
    """
    if not isinstance(text, str) or not _EPOCH_MS.fullmatch(text):
        raise VerificationFailed(
            f"timestamp {text!r:.40} is not epoch milliseconds (1 to 18 decimal digits), as pki_verify needs"
        )
    return int(text)


def check_fresh(timestamp_ms: int, now_ms: int, window_ms: int) -> None:
    """Refuse a timestamp further than ``window_ms`` from ``now_ms``, either way (the bound is allowed).

    Raises:
        VerificationFailed: ``|now_ms − timestamp_ms| > window_ms``, with ``retry_later`` set.
    """
    diff = now_ms - timestamp_ms
    if abs(diff) > window_ms:
        when = "old" if diff > 0 else "in the future"
        raise VerificationFailed(
            f"timestamp {timestamp_ms!r} is {abs(diff)!r} ms {when}; replay_attack_time_diff allows "
            f"{window_ms!r} ms (is the device's clock set?)",
            retry_later=True,
        )


def check_timestamp(text: str, now_ms: int, window_ms: int) -> int:
    """:func:`parse_timestamp`, then :func:`check_fresh`; return the milliseconds.

    Raises:
        VerificationFailed: Not epoch milliseconds (``retry_later`` unset), or outside the window
            (``retry_later`` set).
    """
    timestamp_ms = parse_timestamp(text)
    check_fresh(timestamp_ms, now_ms, window_ms)
    return timestamp_ms


def replay_key(round_name: str, fl_id: str, signed: bytes) -> bytes:
    """What identifies one signed request: a 16-byte digest of its round, fl_id and signed data.

    The signed data, not the signature: an ECDSA signature can be altered into another valid one
    for the same data, so only the data names the request.
    """
    h = hashlib.blake2b(digest_size=16)
    for part in (round_name.encode(), fl_id.encode(), signed):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


class ReplayGuard:
    """The requests admitted within the replay window, to refuse the same one twice.

    Args:
        window_ms: ``replay_attack_time_diff``: a request is remembered until ``timestamp + window_ms``.
        capacity: Most requests remembered; past it the earliest to expire is forgotten first.
    """

    def __init__(self, window_ms: int, *, capacity: int = MAX_REPLAY_ENTRIES) -> None:
        if window_ms < 0 or capacity < 1:
            raise ValueError(f"window_ms must be >= 0 and capacity >= 1, got {window_ms!r}, {capacity!r}")
        self._window = window_ms
        self._capacity = capacity
        self._expiry: dict[bytes, int] = {}
        self._heap: list[tuple[int, bytes]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def admit(self, key: bytes, timestamp_ms: int, now_ms: int) -> None:
        """Remember the request ``key`` (timestamped ``timestamp_ms``), or refuse it if already seen.

        Call it only for a request whose signature and timestamp passed; it changes nothing when it
        refuses.

        Raises:
            VerificationFailed: ``key`` was admitted before and its window is still open.
        """
        self._forget_expired(now_ms)
        if key in self._expiry:
            raise VerificationFailed(
                "replayed request: the same signed request was admitted before within "
                f"replay_attack_time_diff ({self._window!r} ms)"
            )
        expiry = timestamp_ms + self._window
        while len(self._expiry) >= self._capacity:
            _, oldest = heapq.heappop(self._heap)
            del self._expiry[oldest]
        self._expiry[key] = expiry
        heapq.heappush(self._heap, (expiry, key))

    def _forget_expired(self, now_ms: int) -> None:
        heap = self._heap
        while heap and heap[0][0] < now_ms:
            _, key = heapq.heappop(heap)
            del self._expiry[key]
