"""The leader's aggregation of one iteration: collect, check, combine.

Theory of operation
-------------------
When the iteration machine asks for it (:class:`~flcluster.core.iteration.AggregateIteration`), the
leader's driver runs one :meth:`Aggregator.aggregate` task, which:

1. collects the partial sums of every Server that holds a counted or reserved update of the iteration
   (its own first, then followers in rank order), *waiting* for a follower that is down to come back
   (the driver bounds the wait by the iteration's windows, ``AggregateIteration.deadline_ms``), and,
   best effort, of every other linked follower (for their getModel counts);
2. checks each sum against the machine (spec/recovery.md §4): the fl_ids it holds must include every
   update counted for that Server and may add only that Server's reservations (acknowledged updates
   whose confirmation was still on its way; they are confirmed now), so the aggregate is FedAvg over
   exactly the acknowledged updates;
3. finalises FedAvg with torch in a worker thread (off the event loop); in a PW_ENCRYPT iteration it
   unmasks the total there first (flcluster/runtime/cipher_leader.py ``unmasked_model``).

It never feeds the machine itself: it returns an :class:`Aggregated` record with the new weights, and
the driver commits, publishes and feeds ``AggregationDone`` (or ``AggregationFailed``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import trio

from flcluster.aggregation import AggregationError, ModelWeights, PartialSum, combine, finalize
from flcluster.aggregation.checkpoint import save_checkpoint
from flcluster.core.iteration import AggregateIteration
from flcluster.crashpoints import crash_point
from flcluster.errors import FrameError
from flcluster.runtime.cipher_leader import field_prime, unmasked_model
from flcluster.runtime.links import LinkClosed
from flcluster.runtime.options import LeaderOptions
from flcluster.runtime.peer_leader import FollowerLeft, PeerHub
from flcluster.runtime.rounds import RoundService

log = logging.getLogger("flcluster.leader")


@attrs.frozen
class Aggregated:
    """How one aggregation ended.

    Attributes:
        iteration: The iteration aggregated.
        error: None when the sums were combined; else why the aggregation failed.
        get_model_total: getModel requests the collected partial sums reported.
        get_model_accept: Of those, the ones answered with a model.
        weights: The new model (None when it failed).
    """

    iteration: int
    error: str | None
    get_model_total: int
    get_model_accept: int
    weights: ModelWeights | None = None


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
        holdings: Callable[[str], tuple[frozenset[str], frozenset[str]]],
        holders: Callable[[], frozenset[str]],
        confirm: Callable[[str, int, tuple[str, ...]], None],
    ) -> None:
        self._rounds = rounds
        self._peers = peers
        self._options = options
        self._self_id = self_id
        self._members = members
        self._holdings = holdings
        self._holders = holders
        self._confirm = confirm

    async def aggregate(self, ins: AggregateIteration) -> Aggregated:
        """Aggregate ``ins.iteration``; never raises for a fault (waits, unbounded, for Servers down)."""
        iteration = ins.iteration
        tally = _Tally()
        try:
            weights = await self._combine(ins, tally)
        except (AggregationError, LinkClosed, FrameError, ValueError, OSError, trio.TooSlowError) as exc:
            log.warning("aggregation of iteration %d failed: %s", iteration, exc)
            return Aggregated(iteration, str(exc), tally.total, tally.accept)
        return Aggregated(iteration, None, tally.total, tally.accept, weights)

    def _check(self, server: str, iteration: int, fl_ids: tuple[str, ...]) -> None:
        counted, reserved = self._holdings(server)
        held = set(fl_ids)
        if len(held) != len(fl_ids) or not counted <= held <= counted | reserved:
            raise AggregationError(
                f"the partial sum of Server {server!r} holds {sorted(held)!r:.300}, but the leader counted "
                f"{sorted(counted)!r:.300} for it (and reserved {sorted(reserved)!r:.300}); a sum must hold "
                "every update counted for its Server and nothing but its reservations besides"
            )
        extra = tuple(sorted(held - counted))
        if extra:
            self._confirm(server, iteration, extra)

    async def _collect(
        self, node_id: str, iteration: int, *, wait: bool
    ) -> tuple[PartialSum, tuple[str, ...]] | None:
        while True:
            if wait:
                await self._peers.wait_linked(node_id)
            try:
                msg, payload = await self._peers.collect(node_id, iteration)
            except FollowerLeft:
                if not wait:
                    return None
                log.info("aggregation of iteration %d waits for Server %r", iteration, node_id)
                continue
            return PartialSum.from_bytes(payload, self._rounds.spec), tuple(msg.fl_ids)

    async def _combine(self, ins: AggregateIteration, tally: _Tally) -> ModelWeights:
        iteration = ins.iteration
        own, own_ids = await self._rounds.collect_partial(iteration)
        self._check(self._self_id, iteration, own_ids)
        tally.total, tally.accept = self._rounds.take_get_model_counts()
        partials, ids = [own], list(own_ids)
        ranked = [node_id for _rank, node_id in sorted(self._members()) if node_id != self._self_id]
        needed = self._holders() - {self._self_id}
        for node_id in [*ranked, *sorted(needed - set(ranked))]:
            got = await self._collect(node_id, iteration, wait=node_id in needed)
            if got is None:
                continue
            partial, fl_ids = got
            self._check(node_id, iteration, fl_ids)
            partials.append(partial)
            ids.extend(fl_ids)
        crash_point("leader.collecting")
        total = combine(partials)
        if total.update_count != len(ids) or len(set(ids)) != len(ids):
            raise AggregationError(
                f"partial sums hold {total.update_count} updates, but name {len(ids)} fl_ids "
                f"({len(set(ids))} distinct); each acknowledged update is in exactly one sum"
            )
        _latest, previous = self._rounds.store.latest()
        if ins.unmask is not None:
            # PW_ENCRYPT: the masks cancel only in the total; the noise removes the rest (§R6).
            prime = field_prime(self._rounds.plan.pw_prime)
            return await trio.to_thread.run_sync(unmasked_model, total, ins.unmask, prime)
        return await trio.to_thread.run_sync(finalize, total, previous)

    def save_checkpoint(self, iteration: int, weights: ModelWeights) -> None:
        """Write the checkpoint of ``iteration`` (blocking: run it in a worker thread)."""
        save_checkpoint(
            self._options.checkpoint_dir,
            self._options.fl_name,
            iteration,
            weights,
            self._rounds.spec,
            keep=self._options.checkpoint_keep,
        )


__all__ = ["Aggregated", "Aggregator"]
