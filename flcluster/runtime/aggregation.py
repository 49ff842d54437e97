"""The leader's aggregation of one iteration: collect, combine, publish, checkpoint.

Theory of operation
-------------------
When the iteration machine asks for it (:class:`~flcluster.core.iteration.AggregateIteration`), the
leader's driver runs one :meth:`Aggregator.aggregate` task, which:

1. collects every Server's partial sums, its own first and then each follower's in rank order
   (:meth:`~flcluster.runtime.peer_leader.PeerHub.collect`), with the getModel counts each Server
   saw;
2. checks that together they hold exactly the acknowledged updates (no more, no fewer);
3. finalises FedAvg with torch in a worker thread (off the event loop);
4. installs the model here and publishes it to every follower, waiting until each has installed it;
5. writes the checkpoint, when configured, in a worker thread.

It never feeds the machine itself: it returns an :class:`Aggregated` record, and the driver turns it
into ``AggregationDone`` or ``AggregationFailed`` (carrying the getModel counts collected, even from
an aggregation that failed half-way). Any fault fails the iteration and the old model carries over.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import trio

from flcluster.aggregation import AggregationError, ModelWeights, PartialSum, combine, finalize
from flcluster.aggregation.checkpoint import save_checkpoint
from flcluster.core.iteration import AggregateIteration
from flcluster.errors import FrameError
from flcluster.runtime.links import LinkClosed
from flcluster.runtime.options import LeaderOptions
from flcluster.runtime.peer_leader import PeerHub
from flcluster.runtime.rounds import RoundService
from flcluster.wire.model_bytes import weights_to_bytes

log = logging.getLogger("flcluster.leader")


@attrs.frozen
class Aggregated:
    """How one aggregation ended.

    Attributes:
        iteration: The iteration aggregated.
        error: None when the model is installed and published everywhere; else why it failed.
        get_model_total: getModel requests the collected partial sums reported.
        get_model_accept: Of those, the ones answered with a model.
    """

    iteration: int
    error: str | None
    get_model_total: int
    get_model_accept: int


@attrs.define
class _Tally:
    total: int = 0
    accept: int = 0


class Aggregator:
    """Runs aggregations for the leader (see the module docstring)."""

    def __init__(
        self,
        rounds: RoundService,
        peers: PeerHub,
        options: LeaderOptions,
        *,
        self_id: str,
        members: Callable[[], list[tuple[int, str]]],
    ) -> None:
        self._rounds = rounds
        self._peers = peers
        self._options = options
        self._self_id = self_id
        self._members = members

    async def aggregate(self, ins: AggregateIteration) -> Aggregated:
        """Aggregate ``ins.iteration`` over exactly ``ins.updates``; never raises for a fault."""
        iteration = ins.iteration
        tally = _Tally()
        try:
            weights = await self._combine(ins, tally)
            self._rounds.install_model(iteration, weights)
            payload = weights_to_bytes(weights, self._rounds.spec)
            await self._peers.publish(iteration, payload)
            if self._options.checkpoint_dir:
                await trio.to_thread.run_sync(self._save_checkpoint, iteration, weights)
        except (AggregationError, LinkClosed, FrameError, ValueError, OSError, trio.TooSlowError) as exc:
            log.warning("aggregation of iteration %d failed: %s", iteration, exc)
            return Aggregated(iteration, str(exc), tally.total, tally.accept)
        return Aggregated(iteration, None, tally.total, tally.accept)

    async def _combine(self, ins: AggregateIteration, tally: _Tally) -> ModelWeights:
        iteration = ins.iteration
        partials = [await self._rounds.collect_partial(iteration)]
        tally.total, tally.accept = self._rounds.take_get_model_counts()
        for _rank, node_id in sorted(self._members()):
            if node_id == self._self_id:
                continue
            msg, payload = await self._peers.collect(node_id, iteration)
            tally.total += msg.get_model_total
            tally.accept += msg.get_model_accept
            partials.append(PartialSum.from_bytes(payload, self._rounds.spec))
        total = combine(partials)
        if total.update_count != len(ins.updates):
            raise AggregationError(
                f"partial sums hold {total.update_count} updates, but {len(ins.updates)} were acknowledged"
            )
        _latest, previous = self._rounds.store.latest()
        return await trio.to_thread.run_sync(finalize, total, previous)

    def _save_checkpoint(self, iteration: int, weights: ModelWeights) -> None:
        save_checkpoint(
            self._options.checkpoint_dir,
            self._options.fl_name,
            iteration,
            weights,
            self._rounds.spec,
            keep=self._options.checkpoint_keep,
        )


__all__ = ["Aggregated", "Aggregator"]
