"""Named crash points: a node stops itself, with SIGKILL, the moment it reaches one (spec/recovery.md §5).

The kill-and-restart drills in ``recovery/`` must hit each crash point of ``spec/recovery.md``
deterministically, beside plain timed SIGKILLs under load. The code calls :func:`crash_point` with the
point's name at the place the spec names; it does nothing unless the environment variable
``FLCLUSTER_CRASH_AT`` names that point:

- ``FLCLUSTER_CRASH_AT=server.committed_not_acked`` kills the process the first time it gets there;
- ``FLCLUSTER_CRASH_AT=server.committed_not_acked:3`` the third time;
- several points, comma-separated, each count kept apart.

SIGKILL, not an exception or ``os._exit``: nothing of the process runs after it (no ``finally``, no
flush, no socket shutdown), exactly as when an operator or the kernel kills a node. Before dying the
process writes one line, ``crash point <name> reached (hit <n>), killing pid <pid>``, on stderr, so a
drill can tell a planned death from a crash.

A restarted node is usually started without the variable (the drill removes it), so it does not die
again at the same point.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "FLCLUSTER_CRASH_AT"


def _parse(text: str) -> dict[str, int]:
    """``name[:n],...`` → ``{name: n}`` (n ≥ 1; a bad count is refused, never read as 1)."""
    points: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, count = item.partition(":")
        if not count:
            points[name] = 1
            continue
        if not count.isdigit() or int(count) < 1:
            raise ValueError(
                f"{ENV}={text!r}: the hit count of {name!r} must be an integer >= 1, got {count!r}"
            )
        points[name] = int(count)
    return points


_armed: dict[str, int] = _parse(os.environ.get(ENV, ""))
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL if ``FLCLUSTER_CRASH_AT`` arms ``name`` and this is its hit."""
    if name not in _armed:
        return
    hit = _hits[name] = _hits.get(name, 0) + 1
    if hit == _armed[name]:
        sys.stderr.write(f"crash point {name} reached (hit {hit}), killing pid {os.getpid()}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def arm(spec: str) -> None:
    """Arm crash points in this process as ``FLCLUSTER_CRASH_AT`` would (for in-process tests)."""
    _armed.clear()
    _hits.clear()
    _armed.update(_parse(spec))


__all__ = ["ENV", "arm", "crash_point"]
