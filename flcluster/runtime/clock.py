"""Epoch milliseconds read off trio's clock: the time a driver feeds its sans-IO machine.

Theory of operation
-------------------
The machines in :mod:`flcluster.core` never read a clock; every event that depends on time carries
``now_ms``, epoch milliseconds as an ``int`` (spec/state-machines.md). Epoch time, because a machine's
snapshot outlives its process: a deadline or a last heartbeat persisted before a crash still means
something after the restart. Trio's clock, because a driver sleeps on it (``trio.sleep_until``,
``trio.move_on_at``) and tests run it virtually (``autojump_clock``), so epoch milliseconds must move with
it.

An :class:`EpochClock` pins one epoch millisecond to one trio clock reading the first time it is read,
and counts whole milliseconds of trio time from there. Readings are rounded to the nearest millisecond,
so waking at :meth:`EpochClock.trio_time` of a deadline reads that very deadline back (floating point
never makes it read one millisecond short, which would make a driver wake again and again).
"""

from __future__ import annotations

import time

import trio

__all__ = ["EpochClock"]


class EpochClock:
    """Epoch milliseconds that advance with trio's clock (virtual time in tests moves them too).

    Read it only inside ``trio.run``. The first reading fixes the epoch origin.
    """

    def __init__(self) -> None:
        """Make a clock; it is pinned to the epoch at its first reading."""
        self._origin: tuple[int, float] | None = None

    def _pinned(self) -> tuple[int, float]:
        if self._origin is None:
            self._origin = (round(time.time() * 1000), trio.current_time())
        return self._origin

    def now_ms(self) -> int:
        """Now, in epoch milliseconds."""
        origin_ms, origin_trio = self._pinned()
        return origin_ms + round((trio.current_time() - origin_trio) * 1000)

    def trio_time(self, epoch_ms: int) -> float:
        """The trio clock reading at which :meth:`now_ms` reaches ``epoch_ms``."""
        origin_ms, origin_trio = self._pinned()
        return origin_trio + (epoch_ms - origin_ms) / 1000
