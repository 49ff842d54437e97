"""Re-exports of the names :mod:`flcluster.runtime.leader` used to hold (kept for imports elsewhere).

The leader is split by job: :mod:`~flcluster.runtime.driver` (the iteration driver and its windows),
:mod:`~flcluster.runtime.aggregation` (collect, combine, publish, checkpoint),
:mod:`~flcluster.runtime.peer_leader` and :mod:`~flcluster.runtime.peer_follower` (the two ends of a
follower's peer link), :mod:`~flcluster.runtime.peer_wire` (wire conversions) and
:mod:`~flcluster.runtime.options` (:class:`LeaderOptions`).
"""

from __future__ import annotations

from flcluster.runtime.driver import EpochClock, Leader, LocalLeaderChannel
from flcluster.runtime.options import LeaderOptions
from flcluster.runtime.peer_follower import FollowerSession
from flcluster.runtime.peer_wire import answer_of, reply_of, view_of

__all__ = [
    "EpochClock",
    "FollowerSession",
    "Leader",
    "LeaderOptions",
    "LocalLeaderChannel",
    "answer_of",
    "reply_of",
    "view_of",
]
