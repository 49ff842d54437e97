"""The device rounds one Server serves: startFLJob, updateModel, getModel (spec/device-protocol.md).

Theory of operation
-------------------
Every Server runs one :class:`RoundService`. A device request is handled where it lands, in three
steps, so that the cluster-wide rules stay in one place (the leader's
:class:`~flcluster.core.iteration.IterationMachine`) while the heavy data stays local:

1. **Local checks.** The FlatBuffer is verified and decoded (a bad body gets ``RequestError``); for
   updateModel, every uploaded tensor is checked against the model (name, size, float32, finite) so a
   bad update never reaches the counters. With ``pki_verify`` (a
   :class:`~flcluster.verify.ClientVerification`) a startFLJob's certificate chain, signature and
   timestamp are verified here too, and an updateModel must carry a signature and an epoch-ms timestamp
   (spec/device-protocol.md, "Client verification"). A SignDS upload (sign and indices,
   spec/privacy.md §3) is judged against the previous iteration's model here too, and rebuilt into a
   dense update from it once the leader has said the device's data size.
2. **Counting at the leader.** The counting part (``fl_id``, ``data_size`` or ``iteration``; with
   ``pki_verify`` also the timestamp, the verified device key or the update's signature) goes to the
   leader through a :class:`LeaderChannel`: a direct call on rank 0, a pipelined call over the peer link
   on a follower. The leader answers accepted / rejected / plain text.
3. **Local effect.** An accepted startFLJob gets the current global model; an accepted update is folded
   into this Server's running FedAvg sum for its iteration (memory does not grow with the number of
   devices). The leader's acceptance is a *reservation* for this Server (spec/recovery.md §4): the
   Server folds the update, commits its running sum in a group with the other folds made meanwhile
   (:class:`~flcluster.runtime.fold_commits.FoldCommits`, when a recovery store is configured),
   answers the device ``SUCCEED`` only then, and sends the leader the confirmation (pipelined) that
   makes it count. The fold is recorded for its commit right after it is made, with no checkpoint
   between, so the store's commit order is the fold order (spec/store.md, rule 3).

A Server keeps the sum of iteration N (in memory and in its store) until it installs model N or is told
N failed, so a leader that restarts while collecting can collect again; :meth:`restore` puts a restarted
Server back where its store says it was.

The leader collects every Server's partial sums when the iteration reaches its threshold
(:meth:`collect_partial` waits for folds still in flight, so every acknowledged update is in the sum it
hands over), and publishes the new model to every Server (:meth:`install_model`). getModel is served
locally from the last models (:class:`~flcluster.aggregation.store.ModelStore`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import attrs
import numpy as np
import torch
import trio

from flcluster.aggregation import (
    CheckedUpdate,
    FedAvgAccumulator,
    ModelSpec,
    ModelStore,
    ModelWeights,
    PartialSum,
    UpdateRejected,
)
from flcluster.aggregation.signds import UploadKind, prepare_signds, upload_kind
from flcluster.core.iteration import (
    MAX_DATA_SIZE,
    Accepted,
    ClientParams,
    InstanceState,
    Phase,
    PlainText,
    Rejected,
    reason_wrong_iteration,
)
from flcluster.crashpoints import crash_point
from flcluster.errors import SchemaError
from flcluster.http.device import DeviceAnswer, DeviceHandler
from flcluster.runtime.cipher_rounds import cipher_routes, runs_cipher_rounds
from flcluster.runtime.clock import EpochClock
from flcluster.runtime.fold_commits import FoldCommits
from flcluster.store import RecoveryStore, ServerState, StoreContents, StoredModel, Transition
from flcluster.verify import ClientVerification, VerificationFailed, check_update_model, verify_start_fl_job
from flcluster.wire.codes import JOB_NOT_AVAILABLE_TEXT, SAFEMODE_TEXT, CipherRound, DeviceRound, ResponseCode
from flcluster.wire.messages import CountOp
from flcluster.wire.model_bytes import weights_from_bytes, weights_to_bytes
from flcluster.wire.records import FLPlanParams, UpdateModelRequest
from flcluster.wire.server_codec import (
    decode_get_model,
    decode_start_fl_job,
    decode_update_model,
    encode_get_model_response,
    encode_start_fl_job_response,
    encode_update_model_response,
)

log = logging.getLogger("flcluster.rounds")

LeaderReply = Accepted | Rejected | PlainText


@attrs.frozen
class CountRequest:
    """The counting part of one device request, as the leader sees it.

    Attributes:
        op: The round being counted (startFLJob or updateModel).
        fl_id: The device.
        data_size: Declared at startFLJob (0 for updateModel).
        iteration: The iteration an update is for (ignored for startFLJob, as the original).
        upload_loss: The device's training loss reported with its update (for metrics.json).
        upload_accuracy: The device's accuracy reported with its update (for metrics.json).
        timestamp: With pki_verify, the request's timestamp ("" without).
        signature: With pki_verify, an update's signature (b"" otherwise).
        device_key: With pki_verify, a startFLJob's verified device key, DER SubjectPublicKeyInfo.
    """

    op: CountOp
    fl_id: str
    data_size: int = 0
    iteration: int = 0
    upload_loss: float = 0.0
    upload_accuracy: float = 0.0
    timestamp: str = ""
    signature: bytes = b""
    device_key: bytes = b""


class LeaderChannel(Protocol):
    """How a Server reaches the leader's counters (spec/device-protocol.md, "Shared iteration")."""

    async def call(self, request: CountRequest) -> LeaderReply:
        """Run the counting part of one device request at the leader and return its answer."""
        ...

    async def confirm(self, iteration: int, fl_ids: tuple[str, ...]) -> None:
        """Tell the leader these folds are committed (never raises; a lost one is re-sent at re-sync)."""
        ...

    async def cipher(self, round_: CipherRound, body: bytes) -> DeviceAnswer:
        """Run one cipher-round request at the leader and return the device's answer
        (spec/secure-aggregation.md §R6)."""
        ...


class LeaderLine:
    """This Server's way to the leader's counters, provided by whichever role is running now.

    The Server's role scope (spec/cluster-protocol.md, "Role scope") attaches its channel for as long
    as it runs: the leader's own driver on rank 0, the follower's session over its peer link
    otherwise. While none is attached (before the first role is up, between a role's end and its
    restart, while a follower's link is down) every counting call answers the safemode text, so
    devices retry later and nothing is counted.
    """

    def __init__(self) -> None:
        self._channel: LeaderChannel | None = None

    @property
    def attached(self) -> bool:
        """True while a role's channel is attached."""
        return self._channel is not None

    @contextmanager
    def attach(self, channel: LeaderChannel) -> Iterator[None]:
        """Route counting calls to ``channel`` for the duration of the ``with`` block."""
        self._channel = channel
        try:
            yield
        finally:
            if self._channel is channel:
                self._channel = None

    async def call(self, request: CountRequest) -> LeaderReply:
        """Count at the leader through the attached channel; the safemode text when none is."""
        channel = self._channel
        if channel is None:
            return PlainText(SAFEMODE_TEXT)
        return await channel.call(request)

    async def confirm(self, iteration: int, fl_ids: tuple[str, ...]) -> None:
        """Confirm committed folds through the attached channel (dropped while none is: the re-sync
        of the next channel carries them, spec/recovery.md §5.1)."""
        channel = self._channel
        if channel is not None:
            await channel.confirm(iteration, fl_ids)

    async def cipher(self, round_: CipherRound, body: bytes) -> DeviceAnswer:
        """A cipher-round request at the leader through the attached channel; safemode when none is."""
        channel = self._channel
        if channel is None:
            return SAFEMODE_TEXT
        return await channel.cipher(round_, body)


class _Unfolded:
    """One update on its way to a fold, counted in :attr:`RoundService._unfolded` until it settles
    (folded, refused or failed; settling twice counts once)."""

    def __init__(self, service: RoundService) -> None:
        self._service: RoundService | None = service
        service._unfolded += 1

    def settle(self) -> None:
        service, self._service = self._service, None
        if service is not None:
            service._unfolded -= 1
            if service._fold_commits is not None:
                service._fold_commits.sibling_moved()


@attrs.frozen
class IterationView:
    """What this Server knows of the cluster's iteration (pushed by the leader).

    Attributes:
        iteration: The iteration devices are asked to join.
        phase: ``waiting`` / ``running`` / ``aggregating`` (safemode).
        instance_state: ``running`` / ``disable`` / ``finish``.
        next_req_time_ms: The leader's latest ``next_req_time`` estimate (epoch ms).
    """

    iteration: int = 1
    phase: Phase = Phase.WAITING
    instance_state: InstanceState = InstanceState.RUNNING
    next_req_time_ms: int = 0


class RoundService:
    """The device rounds of one Server, and the model and partial sums it holds."""

    def __init__(
        self,
        *,
        spec: ModelSpec,
        initial: ModelWeights,
        plan: FLPlanParams,
        device: torch.device,
        line: LeaderLine,
        keep: int = 3,
        store: RecoveryStore | None = None,
        rank: int = 0,
        verification: ClientVerification | None = None,
        now_ms: Callable[[], int] | None = None,
    ) -> None:
        """Hold ``initial`` as the model of iteration 0; count through ``line`` (see :class:`LeaderLine`).

        With ``store``, every fold and every installed model is committed there before it is
        acknowledged (spec/recovery.md §3.2). With ``verification`` (``pki_verify``), requests are
        verified as spec/device-protocol.md "Client verification" says, at ``now_ms()`` (epoch
        milliseconds; an :class:`EpochClock` by default).
        """
        self.verification = verification
        self._now_ms = EpochClock().now_ms if now_ms is None else now_ms
        self.spec = spec
        self._recovery: RecoveryStore | None = None
        self._unfolded = 0
        self._fold_commits: FoldCommits | None = None
        self.recovery = store
        self.rank = rank
        self._held: dict[int, list[str]] = {}
        self.plan = plan
        self._job_plan = plan
        #: True once this Server left the membership (scaled in): every device request gets the safemode
        #: text, so devices move on to another Server (spec/cluster-protocol.md §8).
        self.retired = False
        self.store = ModelStore(keep)
        self.store.reset(initial)
        # True while the models held are this Server's own (its initial model), not the cluster's.
        self._own_history = True
        # True from a start-over of the models held (a new instance, or the leader's older model) until
        # it is committed with new_history (spec/cluster-protocol.md §9, "With recovery configured").
        self._new_history = False
        self.view = IterationView()
        self.line = line
        self._device = device
        self._accumulators: dict[int, FedAvgAccumulator] = {}
        self._dropped_below = 0
        self._pending: dict[int, int] = {}
        self._settled = trio.Event()
        self._start_fl_job_cache: tuple[tuple[int, int, str, int], bytes] | None = None
        self._get_model_total = 0
        self._get_model_accept = 0

    # -------------------------------------------------------------------------- device requests

    def routes(self) -> dict[str, DeviceHandler]:
        """The device route table (flcluster/http/device.py ``DeviceRounds``): round name → handler; with
        PW_ENCRYPT or STABLE_PW_ENCRYPT the cipher rounds too (flcluster/runtime/cipher_rounds.py)."""
        return {
            DeviceRound.START_FL_JOB: self.start_fl_job,
            DeviceRound.UPDATE_MODEL: self.update_model,
            DeviceRound.GET_MODEL: self.get_model,
            **cipher_routes(
                self.plan.encrypt_type,
                self.line.cipher,
                lambda: (self.view.iteration, self.view.next_req_time_ms),
                list_sign=self.verification is not None,
            ),
        }

    async def start_fl_job(self, body: bytes) -> DeviceAnswer:
        """Answer one startFLJob body (reference §2.4, order of checks kept)."""
        if self.retired:
            return SAFEMODE_TEXT
        try:
            req = decode_start_fl_job(body)
        except SchemaError as exc:
            return self._start_fl_job_error(ResponseCode.RequestError, str(exc))
        request = CountRequest(CountOp.START_FL_JOB, req.fl_id, req.data_size, req.iteration)
        if self.verification is not None:
            # spec/device-protocol.md "Client verification": chain, signature, timestamp, here and now.
            try:
                verified = verify_start_fl_job(req, self.verification, now_ms=self._now_ms())
            except VerificationFailed as exc:
                return self._start_fl_job_error(ResponseCode.RequestError, exc.reason)
            request = attrs.evolve(request, timestamp=verified.timestamp, device_key=verified.device_key)
        reply = await self.line.call(request)
        match reply:
            case PlainText(text=text):
                return text
            case Rejected(retcode=retcode, reason=reason, next_req_time_ms=next_ms):
                return encode_start_fl_job_response(
                    retcode=int(retcode),
                    reason=reason,
                    iteration=self.view.iteration,
                    is_selected=False,
                    next_req_time=str(next_ms),
                    fl_plan=None,
                    feature_maps=(),
                )
            case Accepted(iteration=iteration, reason=reason, next_req_time_ms=next_ms):
                return self._accepted_start_fl_job(iteration, reason, next_ms)

    async def update_model(self, body: bytes) -> DeviceAnswer:
        """Answer one updateModel body: check, count at the leader, fold, then acknowledge."""
        if self.retired:
            return SAFEMODE_TEXT
        try:
            req = decode_update_model(body)
        except SchemaError as exc:
            return encode_update_model_response(
                retcode=int(ResponseCode.RequestError), reason=str(exc), next_req_time=self._next_req_time()
            )
        if req.upload_compress_type != 0 or req.compress_feature_maps:
            # Compressed uploads (DIFF_SPARSE_QUANT, SignDS) are not configured: refuse rather than
            # sum whatever plain weights came along with them.
            return encode_update_model_response(
                retcode=int(ResponseCode.RequestError),
                reason=f"upload_compress_type {req.upload_compress_type} is not enabled on this cluster; "
                "upload plain weights (NO_COMPRESS)",
                next_req_time=self._next_req_time(),
            )
        try:
            prepared = self._prepare_update(req)
        except UpdateRejected as exc:
            return encode_update_model_response(
                retcode=int(ResponseCode.RequestError),
                reason=f"Verify model feature map failed: {exc}",
                next_req_time=self._next_req_time(),
            )
        if isinstance(prepared, Rejected):
            return encode_update_model_response(
                retcode=int(prepared.retcode),
                reason=prepared.reason,
                next_req_time=str(prepared.next_req_time_ms),
            )
        request = CountRequest(
            CountOp.UPDATE_MODEL, req.fl_id, 0, req.iteration, req.upload_loss, req.upload_accuracy
        )
        if self.verification is not None:
            # spec/device-protocol.md "Client verification": the leader, which keeps the keys, verifies.
            try:
                check_update_model(req)
            except VerificationFailed as exc:
                return encode_update_model_response(
                    retcode=int(ResponseCode.RequestError),
                    reason=exc.reason,
                    next_req_time=self._next_req_time(),
                )
            request = attrs.evolve(request, timestamp=req.timestamp, signature=req.signature)
        iteration = req.iteration
        self._pending[iteration] = self._pending.get(iteration, 0) + 1
        token = _Unfolded(self)  # on its way to a fold: a group commit waits for it (FoldCommits)
        try:
            reply = await self.line.call(request)
            if isinstance(reply, Accepted):
                # Reserved at the leader for this Server. Fold and commit before acknowledging: a
                # SUCCEED means "this update is in the committed sum" (spec/recovery.md §4).
                crash_point("server.counted_not_folded")
                checked = prepared(reply.data_size)
                await self._fold(reply.iteration, req.fl_id, checked, reply.data_size, token)
                crash_point("server.committed_not_acked")
                await self.line.confirm(reply.iteration, (req.fl_id,))
        finally:
            token.settle()
            self._pending[iteration] -= 1
            if not self._pending[iteration]:
                del self._pending[iteration]
            self._settled.set()
            self._settled = trio.Event()
        match reply:
            case PlainText(text=text):
                return text
            case Rejected(retcode=retcode, reason=reason, next_req_time_ms=next_ms):
                return encode_update_model_response(
                    retcode=int(retcode), reason=reason, next_req_time=str(next_ms)
                )
            case Accepted(reason=reason, next_req_time_ms=next_ms):
                return encode_update_model_response(
                    retcode=int(ResponseCode.SUCCEED), reason=reason, next_req_time=str(next_ms)
                )

    @property
    def recovery(self) -> RecoveryStore | None:
        """The recovery store this Server commits its folds and models to (``None``: no recovery)."""
        return self._recovery

    @recovery.setter
    def recovery(self, store: RecoveryStore | None) -> None:
        self._recovery = store
        self._fold_commits = (
            None if store is None else FoldCommits(store, self._encoded_sum, lambda: self._unfolded)
        )

    async def get_model(self, body: bytes) -> DeviceAnswer:
        """Answer one getModel body from the models held here (reference §2.4 getModel)."""
        if self.retired:
            return SAFEMODE_TEXT
        self._get_model_total += 1
        try:
            req = decode_get_model(body)
        except SchemaError as exc:
            return encode_get_model_response(
                retcode=int(ResponseCode.RequestError),
                reason=str(exc),
                iteration=self.view.iteration,
                feature_maps=(),
                timestamp=self._next_req_time(),
            )
        if self.view.instance_state is InstanceState.DISABLED:
            return JOB_NOT_AVAILABLE_TEXT
        # A stored model for iteration k means k is over, even if the leader's status push that says
        # so is still on its way here (it follows the model publication).
        latest, _ = self.store.latest()
        current = max(self.view.iteration, latest + 1)
        weights = self.store.lookup(req.iteration, current)
        if weights is None:
            return encode_get_model_response(
                retcode=int(ResponseCode.SucNotReady),
                reason=f"The model of iteration {req.iteration} is not ready yet; the iteration is running.",
                iteration=current,
                feature_maps=(),
                timestamp=self._next_req_time(),
            )
        self._get_model_accept += 1
        return encode_get_model_response(
            retcode=int(ResponseCode.SUCCEED),
            reason="success",
            iteration=current,
            feature_maps=self._arrays(weights),
            timestamp=self._next_req_time(),
        )

    # ---------------------------------------------------------------------- leader-driven changes

    def apply_view(self, view: IterationView) -> None:
        """Take the iteration status the leader pushed."""
        self.view = view

    async def collect_partial(self, iteration: int) -> tuple[PartialSum, tuple[str, ...]]:
        """This Server's partial sums of ``iteration`` and the fl_ids they hold, once every fold in
        flight has settled. The sum is kept until model ``iteration`` is installed or dropped, so it
        can be collected again (a leader that restarted while collecting)."""
        await self.settle(iteration)
        acc = self._accumulators.get(iteration)
        ids = tuple(self._held.get(iteration, ()))
        return (PartialSum.empty(self.spec) if acc is None else acc.partial()), ids

    async def settle(self, iteration: int | None = None) -> None:
        """Wait until no fold (of ``iteration``, or of any iteration) is in flight."""
        while self._pending.get(iteration, 0) if iteration is not None else self._pending:
            await self._settled.wait()

    def held_updates(self) -> tuple[int, tuple[str, ...]]:
        """The newest iteration with a running sum here and the fl_ids it holds ((0, ()) when none)."""
        if not self._held:
            return 0, ()
        newest = max(self._held)
        return newest, tuple(self._held[newest])

    def restore(self, contents: StoreContents) -> None:
        """Take back what this Server's store holds (its models and its running sum) after a restart."""
        if contents.models:
            self._own_history = False
            models = list(contents.models)
            first = models[0]
            self.store.restart_at(first.iteration, weights_from_bytes(first.weights, self.spec))
            for m in models[1:]:
                self.store.put(m.iteration, weights_from_bytes(m.weights, self.spec))
        latest, _ = self.store.latest()
        partial = contents.partial
        if partial is not None and partial.iteration > latest and partial.fl_ids:
            acc = FedAvgAccumulator(self.spec, self._device)
            acc.restore(PartialSum.from_bytes(partial.data, self.spec))
            self._accumulators[partial.iteration] = acc
            self._held[partial.iteration] = list(partial.fl_ids)
            self._dropped_below = partial.iteration
        if contents.server is not None:
            self.view = attrs.evolve(self.view, iteration=max(self.view.iteration, latest + 1))

    def set_client(self, client: ClientParams | None) -> None:
        """Send devices ``client``'s FLPlan values from now on (None: the job's own)."""
        plan = self._job_plan
        if client is not None:
            plan = attrs.evolve(plan, epochs=client.epochs, mini_batch=client.mini_batch, lr=client.lr)
        self.plan = plan
        self._start_fl_job_cache = None

    def client(self) -> ClientParams:
        """The FLPlan values devices get now."""
        return ClientParams(self.plan.epochs, self.plan.mini_batch, self.plan.lr)

    def renew(self) -> None:
        """A new instance applies (spec/state-machines.md, "New instance"): the latest model becomes model 0
        and every sum is dropped (the new instance's iteration numbers start again at 1).

        The next model commit (:meth:`persist_model` on a follower, the leader's machine commit) starts
        the stored history over (:attr:`new_history`)."""
        _iteration, weights = self.store.latest()
        self.store.restart_at(0, weights)
        self._start_over(0)
        self._new_history = True

    @property
    def new_history(self) -> bool:
        """Whether the models held started over since the last model commit (a new instance, or the
        leader's older model): that commit must delete the stored ones (``Transition.new_history``)."""
        return self._new_history

    def history_committed(self) -> None:
        """The models held are committed as a new history (the leader's driver committed them itself)."""
        self._new_history = False

    def take_get_model_counts(self) -> tuple[int, int]:
        """getModel requests (total, answered with a model) since the last call, for metrics.json."""
        counts = (self._get_model_total, self._get_model_accept)
        self._get_model_total = self._get_model_accept = 0
        return counts

    def drop_partials(self, iteration: int) -> None:
        """``iteration`` failed: forget its sums; its model is the previous one (carried over).

        The carried-over model reaches the store with the next :meth:`persist_model` (nothing
        acknowledged depends on it: a stale sum of a failed iteration is dropped at re-sync).
        """
        self._forget_sums(iteration)
        latest_iteration, latest = self.store.latest()
        if iteration > latest_iteration:
            self.store.put(iteration, latest)

    def install_model(self, iteration: int, weights: ModelWeights, *, from_leader: bool = False) -> None:
        """Store the model of ``iteration`` (it becomes the model devices get next).

        The models a Server holds are the cluster's history, served to getModel for older iterations.
        A model ``from_leader`` over the peer link is the cluster's: on a Server whose models are still
        its own (a fresh follower: only its initial model) it replaces them all. Otherwise a newer model
        is added; a model for the latest iteration held (a re-sync after a reconnect or a restart from
        the store) replaces that one and keeps the history; an older one means this Server was ahead of
        the leader (it missed a new instance's ``reset``, spec/cluster-protocol.md §9 rule 3), and it
        starts over from the leader's, every sum dropped. Otherwise the sums of ``iteration`` and older
        are dropped: they are in this model, or their iteration failed.
        """
        latest, _ = self.store.latest()
        if from_leader and self._own_history:
            self.store.restart_at(iteration, weights)
            self._new_history = True
        elif iteration > latest:
            self.store.put(iteration, weights)
        elif iteration == latest:
            self.store.replace_latest(weights)
        else:
            self.store.restart_at(iteration, weights)
            self._start_over(iteration)
            self._new_history = True
        self._own_history = False
        self._forget_sums(iteration)

    def drop_sums_before(self, iteration: int) -> None:
        """The cluster is at ``iteration``: sums of older iterations are of ended iterations."""
        if any(i < iteration for i in self._held) or any(i < iteration for i in self._accumulators):
            self._forget_sums(iteration - 1)

    async def adopt_history(self) -> None:
        """This Server leads: the models it holds are the cluster's history from now on.

        The latest model (the initial model of iteration 0, on a fresh start) is committed to the store
        if there is one, so that a leader restarted from its store still serves getModel for it.
        """
        self._own_history = False
        if self.recovery is None:
            return
        iteration, weights = self.store.latest()
        await self.recovery.commit(self._model_transition(iteration, weights))
        self._new_history = False

    async def persist_model(self, iteration: int) -> None:
        """Commit the model of ``iteration`` (and this Server's state) to the store, if there is one.

        After a start-over of the models held (:attr:`new_history`) the commit starts the stored history
        over too, so that a restart cannot take the old models back (spec/cluster-protocol.md §9).
        """
        if self.recovery is None:
            return
        weights = self.store.get(iteration)
        if weights is None:
            return
        state = ServerState(self.rank, iteration + 1, self.view.instance_state.value, None)
        await self.recovery.commit(self._model_transition(iteration, weights, server=state))
        self._new_history = False

    def _model_transition(
        self, iteration: int, weights: ModelWeights, *, server: ServerState | None = None
    ) -> Transition:
        """The store transition that keeps ``weights`` as the model of ``iteration`` (the newest ``keep``),
        starting the stored history over when the models held did (:attr:`new_history`)."""
        model = StoredModel(iteration, weights_to_bytes(weights, self.spec))
        return Transition(
            server=server, model=model, keep_models=self.store.keep, new_history=self._new_history
        )

    # ----------------------------------------------------------------------------------- helpers

    def _start_over(self, iteration: int) -> None:
        """Drop every sum; folds from ``iteration + 1`` on are taken again."""
        self._accumulators.clear()
        self._held.clear()
        self._dropped_below = iteration + 1
        self._start_fl_job_cache = None

    def _prepare_update(self, req: UpdateModelRequest) -> Callable[[int], CheckedUpdate] | Rejected:
        """Judge an upload before it is counted; what turns it into the update to fold, given the data size.

        A dense upload is checked against the model (spec/aggregation.md §2). A SignDS upload (spec/privacy.md
        §3.3) is judged against the model of the iteration before its own, held on every Server, from which
        it is rebuilt once the leader has accepted it and said the device's data size; a Server that does not
        hold that model answers OutOfTime (the iteration is not the current one).

        Raises:
            UpdateRejected: A rule of spec/aggregation.md §2 or spec/privacy.md §3.3 is broken.
        """
        kind = upload_kind(self.plan.encrypt_type, req.sign, int(req.index_array.size))
        maps = [(m.name, m.data) for m in req.feature_maps]
        if kind is UploadKind.DENSE:
            checked = self.spec.check_update(maps)
            if runs_cipher_rounds(self.plan.encrypt_type) and len({n for n, _ in maps}) != len(
                self.spec.names
            ):
                # The masks cover the whole model (spec/secure-aggregation.md §2.1): no part can be unmasked.
                raise UpdateRejected(
                    f"{self.plan.encrypt_type} needs every tensor of the model in an update (the masks cover "
                    f"them all); got {len(maps)} of {len(self.spec.names)}"
                )
            return lambda _data_size: checked
        base = self.store.get(req.iteration - 1)
        if base is None:
            latest, _ = self.store.latest()
            next_ms = self.view.next_req_time_ms
            reason = reason_wrong_iteration(req.iteration, latest + 1, next_ms, req.fl_id)
            return Rejected(ResponseCode.OutOfTime, reason, next_ms)
        update = prepare_signds(
            self.spec,
            maps,
            sign=req.sign,
            index_array=req.index_array,
            base=base,
            global_lr=self.plan.sign_global_lr,
            max_data_size=MAX_DATA_SIZE,
        )
        return update.checked

    def _forget_sums(self, iteration: int) -> None:
        for i in [i for i in self._accumulators if i <= iteration]:
            del self._accumulators[i]
        for i in [i for i in self._held if i <= iteration]:
            del self._held[i]
        self._dropped_below = max(self._dropped_below, iteration + 1)

    async def _fold(
        self, iteration: int, fl_id: str, checked: CheckedUpdate, data_size: int, token: _Unfolded
    ) -> None:
        if iteration < self._dropped_below:
            # Cannot happen while the leader counts and collects in order; refuse loudly if it does.
            raise RuntimeError(f"update for iteration {iteration} arrived after its sums were collected")
        acc = self._accumulators.get(iteration)
        if acc is None:
            acc = self._accumulators[iteration] = FedAvgAccumulator(self.spec, self._device)
        acc.add(checked, data_size)
        held = self._held.setdefault(iteration, [])
        held.append(fl_id)
        token.settle()
        if self._fold_commits is not None:
            # Right after the fold, no checkpoint between: commit order is fold order (spec/store.md).
            await self._fold_commits.commit(iteration, fl_id)

    def _encoded_sum(self, iteration: int) -> tuple[bytes, int] | None:
        acc = self._accumulators.get(iteration)
        if acc is None:
            return None
        return acc.partial().to_bytes(), len(self._held[iteration])

    def _accepted_start_fl_job(self, iteration: int, reason: str, next_ms: int) -> bytes:
        """The SUCCEED answer to startFLJob, with the current model.

        Every device accepted into one iteration gets the same answer (same iteration, model, reason
        and, but for the retry floor, ``next_req_time``), so the encoded answer is kept and reused
        while those stay the same, as the original caches it (reference §2.4): encoding the model is
        the costliest part of startFLJob.
        """
        model_iteration, weights = self.store.latest()
        key = (iteration, model_iteration, reason, next_ms)
        if self._start_fl_job_cache is None or self._start_fl_job_cache[0] != key:
            body = encode_start_fl_job_response(
                retcode=int(ResponseCode.SUCCEED),
                reason=reason,
                iteration=iteration,
                is_selected=True,
                next_req_time=str(next_ms),
                fl_plan=self.plan,
                feature_maps=self._arrays(weights),
            )
            self._start_fl_job_cache = (key, body)
        return self._start_fl_job_cache[1]

    def _arrays(self, weights: ModelWeights) -> list[tuple[str, np.ndarray[Any, Any]]]:
        return [(name, weights[name].detach().cpu().numpy()) for name in self.spec.names]

    def _next_req_time(self) -> str:
        return str(self.view.next_req_time_ms)

    def _start_fl_job_error(self, retcode: ResponseCode, reason: str) -> bytes:
        return encode_start_fl_job_response(
            retcode=int(retcode),
            reason=reason,
            iteration=self.view.iteration,
            is_selected=False,
            next_req_time=self._next_req_time(),
            fl_plan=None,
            feature_maps=(),
        )


__all__ = [
    "CountRequest",
    "DeviceAnswer",
    "IterationView",
    "LeaderChannel",
    "LeaderLine",
    "LeaderReply",
    "RoundService",
]
