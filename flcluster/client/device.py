"""The device SDK: one device speaking MindSpore Federated's device protocol to a flcluster (or the original).

Theory of operation
-------------------
A :class:`Device` POSTs the original's FlatBuffers request bodies to ``<server><url_prefix>/<round>``
(spec/device-protocol.md; ``reference/mindspore-fl-behaviour.md`` §2.1–§2.2) through a caller-owned
:class:`httpx.AsyncClient`. With ``use_elb`` it picks a server at random for **every** request, as the
original client's ``useElb`` does, so one iteration may touch several Servers; otherwise it always uses
``servers[0]``.

Every protocol answer is HTTP 200. Its body is either one of the server's plain texts
(:class:`~flcluster.wire.codes.ServerText`, the one home of those strings, which the Server's side sends
too; told apart from a FlatBuffer by comparing the whole body with the exact strings, as the original's
clients do) or a FlatBuffer response table. The low-level calls :meth:`Device.start_fl_job`,
:meth:`Device.update_model` and :meth:`Device.get_model` return that answer as it is. Anything else is an
error: a transport failure raises :class:`DeviceTransportError`, a non-200 status :class:`DeviceHTTPError`,
a body that is neither a known text nor a well-formed table :class:`MalformedAnswer` (all three live in
:mod:`flcluster.errors` and are re-exported here).

:meth:`Device.run_iteration` runs one iteration (startFLJob → local training → updateModel → getModel) and
reacts to every answer as the original's client does (§2.4, "Retcode → device action"):

============================  ==========================================================================
answer                        reaction
============================  ==========================================================================
SUCCEED                       go on to the next step
SucNotReady                   wait ``wait_interval`` and send the same request again (getModel polls)
"safemode" / "not ready"      wait ``wait_interval`` and send the same request again
OutOfTime                     sleep until ``next_req_time`` (capped at ``max_sleep_ms``), restart at
                              startFLJob; at most ``max_restarts`` restarts per iteration
                              (``RESTART_TIME_PER_ITER`` = 1), then the iteration fails
RequestError / SystemError    the device's job stops
"disabled or finished"        the device's job stops
HTTP status other than 200    the device's job stops
malformed body, unknown code  the device's job stops
transport error               the iteration fails (the device may try again later)
============================  ==========================================================================

Waits for one request are bounded by ``max_wait_tries``; past it the iteration fails. A restart that would
exceed the limit fails the iteration at once, without first sleeping (the Java client sleeps, then gives
up). An OutOfTime whose ``next_req_time`` is missing, malformed or not in the future is a protocol
violation; the Java client throws and aborts there, this device logs it and backs off
``bad_next_req_time_backoff`` seconds instead. Once the job has stopped, :attr:`Device.stopped` holds the
reason and later iterations return at once.

Time: the device sleeps with :func:`trio.sleep` (so tests run on trio's ``autojump_clock``) and reads
"now" for ``next_req_time`` from the injectable ``now_ms`` callable (epoch milliseconds; by default the wall
clock). Request ``timestamp`` fields carry ``now_ms()`` as a decimal string, which also suits servers with
``pki_verify``.

Client verification (``pki_verify``, spec/device-protocol.md "Client verification"): a device given a
:class:`~flcluster.verify.DeviceIdentity` sends its certificate chain and ``sign_data`` (over
``fl_id + " " + timestamp``) with every startFLJob and a ``signature`` (over ``timestamp + iteration``) with
every updateModel, each request signed anew; its timestamps then strictly increase, so no two of its
requests carry the same signed data. Its ``fl_id`` must be the identity's (the SHA-256 of its equip
certificate).

Under the FLPlan's ``PW_ENCRYPT`` or ``STABLE_PW_ENCRYPT`` the iteration runs the secure-aggregation rounds
too (spec/secure-aggregation.md §R1; :mod:`flcluster.client.cipher`): exchangeKeys and getKeys (and, PW,
shareSecrets and getSecrets) after startFLJob, a masked updateModel, then (PW) getClientList and
reconstructSecrets before getModel, each with the reactions above; a late device whose reconstruction is no
longer needed (OutOfTime, or "finished" after the last iteration) goes on to getModel. ``drop_after`` (tests,
the simulator) makes a device leave after shareSecrets, updateModel or getClientList.

A device with an identity under PW_ENCRYPT or STABLE_PW_ENCRYPT signs its keys (spec/secure-aggregation.md
§R8.1, §R8.7): its exchangeKeys carries its ``[key_attestation, equip_cert]`` and a signature of its keys,
and it checks its peers' at getKeys; its other cipher requests are signed over ``timestamp + iteration``.
Under PW_ENCRYPT it also runs the list signatures (§R8): after getClientList it signs U3 (pushListSign),
fetches the others' signatures (getListSign) and checks them before reconstructSecrets; a failed check fails
the iteration for it (it reveals nothing).

Training is the caller's: a :data:`Trainer` receives a :class:`TrainingTask` (the global model from
startFLJob, the FLPlan, the declared data size) and returns a :class:`TrainResult` whose feature maps are
already multiplied by that data size, the original's upload convention (§2.6). Under the FLPlan's
``DP_ENCRYPT`` or ``SIGNDS`` the device's :class:`~flcluster.client.privacy.DevicePrivacy` then turns that
into the clipped, noised upload or into a sign and an index array (spec/privacy.md), and adapts its DP clip
bound once getModel has answered the new model.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeAlias, TypeVar, assert_never

import attrs
import httpx
import numpy as np
import numpy.typing as npt
import trio

from flcluster.client.cipher import CIPHER_TYPES, CipherSession
from flcluster.client.privacy import DevicePrivacy
from flcluster.core.cipher import DeviceKeys, Share
from flcluster.errors import (
    CipherInputError,
    ConfigError,
    DeviceHTTPError,
    DeviceTransportError,
    MalformedAnswer,
    ModelUnavailable,
    SchemaError,
)
from flcluster.verify.identity import DeviceIdentity
from flcluster.verify.pki import start_fl_job_signed_data, update_model_signed_data
from flcluster.wire.cipher_client_codec import (
    decode_ack,
    decode_client_list_response,
    decode_get_keys_response,
    decode_get_secrets_response,
    decode_list_signs_response,
    encode_exchange_keys_request,
    encode_fetch_request,
    encode_push_list_sign_request,
    encode_shares_request,
)
from flcluster.wire.cipher_records import (
    CipherAck,
    ClientListResponse,
    KeysResponse,
    ListSignsResponse,
    SecretsResponse,
)
from flcluster.wire.client_codec import (
    decode_get_model_response,
    decode_start_fl_job_response,
    decode_update_model_response,
    encode_get_model_request,
    encode_start_fl_job_request,
    encode_update_model_request,
)
from flcluster.wire.codes import CipherRound, DeviceRound, ResponseCode, ServerText
from flcluster.wire.records import FLPlanParams, GetModelResponse, StartFLJobResponse, UpdateModelResponse

__all__ = [
    "MAX_SLEEP_TIME_MS",
    "RESTART_TIME_PER_ITER",
    "Device",
    "DeviceHTTPError",
    "DevicePolicy",
    "DeviceTransportError",
    "GetModelResult",
    "IterationOutcome",
    "IterationReport",
    "MalformedAnswer",
    "ModelUnavailable",
    "ServerText",
    "StartFLJobResult",
    "TrainResult",
    "Trainer",
    "TrainingTask",
    "UpdateModelResult",
    "wall_clock_ms",
]

log = logging.getLogger("flcluster.client")

#: The original client's limit on restarts (OutOfTime → back to startFLJob) within one iteration.
RESTART_TIME_PER_ITER = 1
#: The original client's cap on one sleep until ``next_req_time``, in milliseconds (30 minutes).
MAX_SLEEP_TIME_MS = 1_800_000

FloatArray: TypeAlias = npt.NDArray[np.float32]

_HEADERS = {"Content-Type": "application/octet-stream"}
_FETCH_DECODERS: dict[CipherRound, tuple[Callable[[bytes], Any], str]] = {
    CipherRound.GET_KEYS: (decode_get_keys_response, "ReturnExchangeKeys"),
    CipherRound.GET_SECRETS: (decode_get_secrets_response, "ReturnShareSecrets"),
    CipherRound.GET_CLIENT_LIST: (decode_client_list_response, "ReturnClientList"),
    CipherRound.GET_LIST_SIGN: (decode_list_signs_response, "ReturnAllClientListSign"),
}
_EPOCH_MS = re.compile(r"[0-9]{1,18}")


def wall_clock_ms() -> int:
    """The wall clock in epoch milliseconds, the unit of ``next_req_time``."""
    return time.time_ns() // 1_000_000


_TEXTS: dict[bytes, ServerText] = {member.value.encode(): member for member in ServerText}

StartFLJobResult: TypeAlias = StartFLJobResponse | ServerText
"""What ``/startFLJob`` answered: a decoded ``ResponseFLJob`` or one of the plain texts."""
UpdateModelResult: TypeAlias = UpdateModelResponse | ServerText
"""What ``/updateModel`` answered: a decoded ``ResponseUpdateModel`` or one of the plain texts."""
GetModelResult: TypeAlias = GetModelResponse | ServerText
"""What ``/getModel`` answered: a decoded ``ResponseGetModel`` or one of the plain texts."""


# ----------------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------------


def _int_at_least(low: int) -> Callable[[Any, attrs.Attribute[int], int], None]:
    def check(instance: Any, attribute: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"DevicePolicy.{attribute.name} must be an int >= {low}, got {value!r}")

    return check


def _seconds(instance: Any, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"DevicePolicy.{attribute.name} must be a finite number of seconds >= 0, got {value!r}"
        )


@attrs.frozen
class DevicePolicy:
    """How patient a device is; the defaults follow the original's clients.

    Attributes:
        wait_interval: Seconds between tries while the server answers safemode, "not ready" or SucNotReady
            (the original's Python simulator polls every 0.5 s).
        max_wait_tries: Most waits for one request before the iteration fails (7 200 × 0.5 s covers the
            default one-hour ``global_iteration_time_window``).
        max_restarts: Most restarts (OutOfTime → startFLJob again) in one iteration
            (:data:`RESTART_TIME_PER_ITER`).
        max_sleep_ms: Cap on one sleep until ``next_req_time`` (:data:`MAX_SLEEP_TIME_MS`).
        bad_next_req_time_backoff: Seconds to back off when an OutOfTime carries a ``next_req_time`` that is
            missing, malformed or not in the future.
    """

    wait_interval: float = attrs.field(default=0.5, validator=_seconds)
    max_wait_tries: int = attrs.field(default=7200, validator=_int_at_least(0))
    max_restarts: int = attrs.field(default=RESTART_TIME_PER_ITER, validator=_int_at_least(0))
    max_sleep_ms: int = attrs.field(default=MAX_SLEEP_TIME_MS, validator=_int_at_least(0))
    bad_next_req_time_backoff: float = attrs.field(default=1.0, validator=_seconds)


@attrs.frozen(eq=False)
class TrainingTask:
    """What a :data:`Trainer` gets: the global model and the plan of the iteration the device was accepted in.

    Attributes:
        fl_id: The device's id.
        iteration: The server's iteration (``ResponseFLJob.iteration``).
        data_size: The data size the device declared at startFLJob; multiply the upload by it.
        plan: The FLPlan (epochs, mini_batch, lr, …).
        model: The global model from startFLJob, name → flat float32 array, in the server's order. The
            arrays are read-only views into the answer; copy before writing (and before ``torch.as_tensor``,
            which warns on read-only arrays).
    """

    fl_id: str
    iteration: int
    data_size: int
    plan: FLPlanParams
    model: Mapping[str, FloatArray]


@attrs.frozen(eq=False)
class TrainResult:
    """What a :data:`Trainer` returns.

    Attributes:
        feature_maps: The trained weights, name → array, already multiplied by ``TrainingTask.data_size``.
        loss: Training loss, sent as ``upload_loss``.
        accuracy: Training accuracy, sent as ``upload_accuracy``.
        weights: The same trained weights *before* the multiplication, used under ``DP_ENCRYPT`` and
            ``SIGNDS`` (spec/privacy.md); ``None``: ``feature_maps`` divided by the data size.
    """

    feature_maps: Mapping[str, npt.ArrayLike]
    loss: float = 0.0
    accuracy: float = 0.0
    weights: Mapping[str, npt.ArrayLike] | None = None


Trainer: TypeAlias = Callable[[TrainingTask], Awaitable[TrainResult]]
"""Local training: an async callable from a :class:`TrainingTask` to a :class:`TrainResult`."""


class IterationOutcome(enum.Enum):
    """How one :meth:`Device.run_iteration` ended."""

    #: The update was accepted and the aggregated model fetched.
    COMPLETED = "completed"
    #: This iteration failed on this device (restart or wait limit, transport error); it may try again.
    FAILED = "failed"
    #: The device's job is over (finished or disabled, RequestError/SystemError, an HTTP error status).
    STOPPED = "stopped"


@attrs.frozen
class IterationReport:
    """What happened in one :meth:`Device.run_iteration`.

    Attributes:
        fl_id: The device's id.
        outcome: Completed, failed or stopped.
        reason: ``"success"`` or why it failed or stopped.
        iteration: The server iteration of the device's last accepted startFLJob (``None`` if none was).
        model_iteration: ``ResponseGetModel.iteration`` of the model fetched (``None`` unless completed).
        data_size: The data size declared.
        loss: The training loss reported (``None`` if the device did not train).
        restarts: Restarts after OutOfTime.
        waits: Waits after safemode, "not ready" or SucNotReady, over all requests.
        started: ``trio.current_time()`` at the start.
        finished: ``trio.current_time()`` at the end.
        plan: The FLPlan of the last accepted startFLJob.
    """

    fl_id: str
    outcome: IterationOutcome
    reason: str
    iteration: int | None
    model_iteration: int | None
    data_size: int
    loss: float | None
    restarts: int
    waits: int
    started: float
    finished: float
    plan: FLPlanParams | None = None

    @property
    def elapsed(self) -> float:
        """Seconds the iteration took on this device."""
        return self.finished - self.started


# ----------------------------------------------------------------------------------------------------------
# Control flow inside run_iteration
# ----------------------------------------------------------------------------------------------------------


class _Restart(Exception):
    def __init__(self, round_name: str, next_req_time: str, reason: str) -> None:
        super().__init__(f"{round_name} answered OutOfTime: {reason!r}")
        self.round_name = round_name
        self.next_req_time = next_req_time


class _End(Exception):
    def __init__(self, outcome: IterationOutcome, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


@attrs.define
class _Progress:
    started: float
    iteration: int | None = None
    model_iteration: int | None = None
    loss: float | None = None
    restarts: int = 0
    waits: int = 0
    plan: FLPlanParams | None = None


_R = TypeVar(
    "_R",
    StartFLJobResponse,
    UpdateModelResponse,
    GetModelResponse,
    CipherAck,
    KeysResponse,
    SecretsResponse,
    ClientListResponse,
)

#: Where a simulated device drops out of a PW_ENCRYPT iteration (``run_iteration(drop_after=...)``).
DROP_POINTS = ("shareSecrets", "updateModel", "getClientList")


def _decode(url: str, body: bytes, table: str, decode: Callable[[bytes], _R]) -> _R | ServerText:
    text = _TEXTS.get(body)
    if text is not None:
        return text
    try:
        return decode(body)
    except SchemaError as exc:
        raise MalformedAnswer(url, table, exc, body) from exc


def _check_servers(servers: Sequence[str]) -> tuple[str, ...]:
    if isinstance(servers, str):
        raise ConfigError(f"servers must be a sequence of base URLs, not one string: {servers!r}")
    result = tuple(servers)
    if not result:
        raise ConfigError("servers must name at least one base URL such as 'http://127.0.0.1:6668', got none")
    for url in result:
        if not isinstance(url, str) or not re.fullmatch(r"https?://[^/\s]+", url.rstrip("/")):
            raise ConfigError(
                f"each server must be a base URL 'http[s]://host:port' without a path, got {url!r}"
            )
    return tuple(url.rstrip("/") for url in result)


# ----------------------------------------------------------------------------------------------------------
# The device
# ----------------------------------------------------------------------------------------------------------


class Device:
    """One device of a federated-learning job.

    Args:
        fl_id: The device's id (``RequestFLJob.fl_id``); unique among the job's devices.
        servers: Base URLs of the Servers' device ports, such as ``"http://127.0.0.1:6668"``.
        fl_name: The job's name (``fl_name`` of every request).
        client: The HTTP client to send through (the caller owns and closes it).
        url_prefix: The cluster's ``http_url_prefix`` ("" or a path starting with "/").
        use_elb: Pick a random server for every request (the original's ``useElb``); otherwise ``servers[0]``.
        seed: Seed of the server choice (``None``: unseeded).
        policy: Waits, restarts and sleeps; :class:`DevicePolicy` defaults when ``None``.
        now_ms: Epoch milliseconds "now", compared with ``next_req_time`` and sent as request timestamps.
        identity: With ``pki_verify``: the key and certificates to sign requests with; ``fl_id`` must be
            its :attr:`~flcluster.verify.DeviceIdentity.fl_id`.
        noise_seed: Seed of the DP noise and the SignDS draws
            (:class:`~flcluster.client.privacy.DevicePrivacy`); ``None`` seeds from the operating system. A
            known seed makes the noise known: tests only.

    Raises:
        ConfigError: A bad fl_id, fl_name, server URL or prefix, or an fl_id that is not the identity's.
    """

    def __init__(
        self,
        fl_id: str,
        servers: Sequence[str],
        *,
        fl_name: str,
        client: httpx.AsyncClient,
        url_prefix: str = "",
        use_elb: bool = False,
        seed: int | None = None,
        policy: DevicePolicy | None = None,
        now_ms: Callable[[], int] = wall_clock_ms,
        identity: DeviceIdentity | None = None,
        noise_seed: int | None = None,
    ) -> None:
        if not isinstance(fl_id, str) or not fl_id:
            raise ConfigError(f"fl_id must be a non-empty string, got {fl_id!r}")
        if identity is not None and fl_id != identity.fl_id:
            raise ConfigError(
                f"fl_id {fl_id!r} is not the identity's {identity.fl_id!r} (the SHA-256 of its equip "
                "certificate, which pki_verify checks)"
            )
        self._identity = identity
        self._last_timestamp = 0
        if not isinstance(fl_name, str):
            raise ConfigError(f"fl_name must be a string, got {fl_name!r}")
        if not isinstance(url_prefix, str) or (url_prefix and not url_prefix.startswith("/")):
            raise ConfigError(f"url_prefix must be '' or a path starting with '/', got {url_prefix!r}")
        self._fl_id = fl_id
        self._servers = _check_servers(servers)
        self._fl_name = fl_name
        self._client = client
        self._url_prefix = url_prefix.rstrip("/")
        self._use_elb = use_elb
        self._rng = random.Random(seed)
        self._policy = DevicePolicy() if policy is None else policy
        self._now_ms = now_ms
        self._iteration = 0
        self._stopped: str | None = None
        self._privacy = DevicePrivacy(noise_seed)

    @property
    def fl_id(self) -> str:
        """The device's id."""
        return self._fl_id

    @property
    def servers(self) -> tuple[str, ...]:
        """The servers' base URLs."""
        return self._servers

    @property
    def policy(self) -> DevicePolicy:
        """The device's waiting and restart policy."""
        return self._policy

    @property
    def iteration(self) -> int:
        """The server iteration of the last accepted startFLJob (0 before any)."""
        return self._iteration

    @property
    def privacy(self) -> DevicePrivacy:
        """The device's privacy step (DP clip bound, noise) under the FLPlan's ``encrypt_type``."""
        return self._privacy

    @property
    def stopped(self) -> str | None:
        """Why the device's job stopped, or ``None`` while it goes on."""
        return self._stopped

    # --- one request each ---------------------------------------------------------------------------

    def _url(self, round_name: str) -> str:
        server = self._rng.choice(self._servers) if self._use_elb else self._servers[0]
        return f"{server}{self._url_prefix}/{round_name}"

    async def _post(self, round_name: str, body: bytes) -> tuple[str, bytes]:
        url = self._url(round_name)
        try:
            response = await self._client.post(url, content=body, headers=_HEADERS)
        except httpx.RequestError as exc:
            raise DeviceTransportError(url, exc) from exc
        if response.status_code != 200:
            raise DeviceHTTPError(url, response.status_code, response.content)
        return url, response.content

    def _timestamp(self) -> str:
        now = self._now_ms()
        if self._identity is not None:
            # Signed requests never repeat a timestamp (the leader refuses a replay).
            now = max(now, self._last_timestamp + 1)
            self._last_timestamp = now
        return str(now)

    async def start_fl_job(self, data_size: int, *, iteration: int | None = None) -> StartFLJobResult:
        """Send one ``RequestFLJob`` to ``/startFLJob``.

        Args:
            data_size: Number of training samples (the FedAvg weight), at least 1 for the server to accept.
            iteration: The ``iteration`` field (not checked by servers); the last known one by default.

        Returns:
            The decoded ``ResponseFLJob``, or the plain text the server sent.

        Raises:
            DeviceTransportError: No HTTP answer.
            DeviceHTTPError: An HTTP status other than 200.
            MalformedAnswer: A body that is neither a known text nor a ``ResponseFLJob``.
        """
        timestamp = self._timestamp()
        identity = self._identity
        pki: dict[str, Any] = {}
        if identity is not None:
            pki = {
                "sign_data": identity.sign(start_fl_job_signed_data(self._fl_id, timestamp)),
                "key_attestation": identity.key_attestation,
                "equip_cert": identity.equip_cert,
                "equip_ca_cert": identity.equip_ca_cert,
                "root_cert": identity.root_cert,
            }
        body = encode_start_fl_job_request(
            fl_name=self._fl_name,
            fl_id=self._fl_id,
            iteration=self._iteration if iteration is None else iteration,
            data_size=data_size,
            timestamp=timestamp,
            **pki,
        )
        url, answer = await self._post(DeviceRound.START_FL_JOB, body)
        return _decode(url, answer, "ResponseFLJob", decode_start_fl_job_response)

    async def update_model(
        self,
        iteration: int,
        feature_maps: Mapping[str, npt.ArrayLike],
        *,
        upload_loss: float = 0.0,
        upload_accuracy: float = 0.0,
        sign: int = 0,
        index_array: npt.ArrayLike = (),
    ) -> UpdateModelResult:
        """Send one ``RequestUpdateModel`` to ``/updateModel``.

        Args:
            iteration: The iteration of the update (the server's, from startFLJob).
            feature_maps: Weight name → tensor, already multiplied by the declared data size.
            upload_loss: Training loss.
            upload_accuracy: Training accuracy.
            sign: SignDS: −1 or +1 (0: a dense upload).
            index_array: SignDS: the selected global indices, ascending.

        Returns:
            The decoded ``ResponseUpdateModel``, or the plain text the server sent.

        Raises:
            DeviceTransportError: No HTTP answer.
            DeviceHTTPError: An HTTP status other than 200.
            MalformedAnswer: A body that is neither a known text nor a ``ResponseUpdateModel``.
        """
        timestamp = self._timestamp()
        identity = self._identity
        signed = update_model_signed_data(timestamp, iteration)
        body = encode_update_model_request(
            fl_name=self._fl_name,
            fl_id=self._fl_id,
            iteration=iteration,
            feature_maps=list(feature_maps.items()),
            timestamp=timestamp,
            upload_loss=upload_loss,
            upload_accuracy=upload_accuracy,
            signature=b"" if identity is None else identity.sign(signed),
            sign=sign,
            index_array=np.asarray(index_array, dtype=np.int32),
        )
        url, answer = await self._post(DeviceRound.UPDATE_MODEL, body)
        return _decode(url, answer, "ResponseUpdateModel", decode_update_model_response)

    async def get_model(self, iteration: int) -> GetModelResult:
        """Send one ``RequestGetModel`` to ``/getModel``.

        Args:
            iteration: The iteration whose aggregated model is wanted.

        Returns:
            The decoded ``ResponseGetModel``, or the plain text the server sent.

        Raises:
            DeviceTransportError: No HTTP answer.
            DeviceHTTPError: An HTTP status other than 200.
            MalformedAnswer: A body that is neither a known text nor a ``ResponseGetModel``.
        """
        body = encode_get_model_request(
            fl_name=self._fl_name, iteration=iteration, timestamp=self._timestamp()
        )
        url, answer = await self._post(DeviceRound.GET_MODEL, body)
        return _decode(url, answer, "ResponseGetModel", decode_get_model_response)

    async def cipher_request(
        self,
        round_: CipherRound,
        iteration: int,
        *,
        keys: DeviceKeys | None = None,
        shares: Sequence[Share] = (),
        signature: bytes = b"",
        certificate_chain: Sequence[str] = (),
        key_signer: Callable[[str], tuple[bytes, tuple[str, ...]]] | None = None,
    ) -> CipherAck | KeysResponse | SecretsResponse | ClientListResponse | ListSignsResponse | ServerText:
        """Send one secure-aggregation request to ``/<round_>`` (spec/secure-aggregation.md §R1, §R8).

        Args:
            round_: The cipher round.
            iteration: The iteration (the server's, from startFLJob).
            keys: exchangeKeys: this device's public keys.
            shares: shareSecrets / reconstructSecrets: the shares to send.
            signature: exchangeKeys: the keys' signature; pushListSign: the list signature.
            certificate_chain: exchangeKeys: ``[key_attestation, equip_cert]`` (spec §R8.1).
            key_signer: exchangeKeys: signs the keys with the request's timestamp (the signature and the
                chain; :meth:`~flcluster.client.cipher.CipherSession.key_signature`), instead of
                ``signature`` and ``certificate_chain``.

        With an identity, the request signature of every round but exchangeKeys (pushListSign's
        ``req_signature``, the others' ``signature``) is signed here, over ``timestamp + str(iteration)``
        (spec/secure-aggregation.md §R8.3, §R8.6); without one none is sent.

        Returns:
            The decoded answer table, or the plain text the server sent.

        Raises:
            DeviceTransportError: No HTTP answer.
            DeviceHTTPError: An HTTP status other than 200.
            MalformedAnswer: A body that is neither a known text nor the round's table.
        """
        timestamp = self._timestamp()
        identity = self._identity
        request_signature = (
            b"" if identity is None else identity.sign(update_model_signed_data(timestamp, iteration))
        )
        answer: Callable[
            [bytes], CipherAck | KeysResponse | SecretsResponse | ClientListResponse | ListSignsResponse
        ]
        match round_:
            case CipherRound.EXCHANGE_KEYS:
                assert keys is not None, "exchangeKeys sends the device's keys"
                if key_signer is not None:
                    signature, certificate_chain = key_signer(timestamp)
                body = encode_exchange_keys_request(
                    keys=keys,
                    iteration=iteration,
                    timestamp=timestamp,
                    signature=signature,
                    certificate_chain=certificate_chain,
                )
                answer, table = functools.partial(decode_ack, round_), "ResponseExchangeKeys"
            case CipherRound.PUSH_LIST_SIGN:
                body = encode_push_list_sign_request(
                    fl_id=self._fl_id,
                    iteration=iteration,
                    timestamp=timestamp,
                    signature=signature,
                    req_signature=request_signature,
                )
                answer, table = functools.partial(decode_ack, round_), "ResponseClientListSign"
            case CipherRound.SHARE_SECRETS | CipherRound.RECONSTRUCT_SECRETS:
                body = encode_shares_request(
                    round_,
                    fl_id=self._fl_id,
                    iteration=iteration,
                    timestamp=timestamp,
                    shares=shares,
                    signature=request_signature,
                )
                answer = functools.partial(decode_ack, round_)
                table = "ResponseShareSecrets" if round_ is CipherRound.SHARE_SECRETS else "ReconstructSecret"
            case (
                CipherRound.GET_KEYS
                | CipherRound.GET_SECRETS
                | CipherRound.GET_CLIENT_LIST
                | CipherRound.GET_LIST_SIGN
            ):
                body = encode_fetch_request(
                    round_,
                    fl_id=self._fl_id,
                    iteration=iteration,
                    timestamp=timestamp,
                    signature=request_signature,
                )
                answer, table = _FETCH_DECODERS[round_]
            case _:
                assert_never(round_)
        url, content = await self._post(round_.value, body)
        text = _TEXTS.get(content)
        if text is not None:
            return text
        try:
            return answer(content)
        except SchemaError as exc:
            raise MalformedAnswer(url, table, exc, content) from exc

    async def _cipher_before_upload(
        self, plan: FLPlanParams, iteration: int, progress: _Progress, drop_after: str | None
    ) -> CipherSession:
        """exchangeKeys, getKeys and (PW) shareSecrets, getSecrets; the session that masks the upload."""
        session = CipherSession(
            self._fl_id,
            plan.encrypt_type,
            t=plan.pw_t,
            prime=plan.pw_prime,
            identity=self._identity,
            iteration=iteration,
        )

        async def ask(round_: CipherRound, **kw: Any) -> Any:
            return await self._cipher_ask(round_, iteration, progress, **kw)

        try:
            keys = session.keys()
            # spec §R8.1: each attempt signs the keys with its own timestamp.
            signer = (lambda ts: session.key_signature(keys, ts)) if session.signs else None
            await ask(CipherRound.EXCHANGE_KEYS, keys=keys, key_signer=signer)
            got = await ask(CipherRound.GET_KEYS)
            session.take_keys(got.keys)
            if session.pw:
                shares = await trio.to_thread.run_sync(session.shares)
                await ask(CipherRound.SHARE_SECRETS, shares=shares)
                if drop_after == "shareSecrets":
                    raise _End(IterationOutcome.FAILED, "dropped out after shareSecrets (simulated)")
                secrets = await ask(CipherRound.GET_SECRETS)
                await trio.to_thread.run_sync(session.take_secrets, secrets.shares)
        except CipherInputError as exc:
            raise _End(IterationOutcome.FAILED, f"secure aggregation: {exc}") from None
        return session

    async def _cipher_after_upload(
        self, session: CipherSession, iteration: int, progress: _Progress, drop_after: str | None = None
    ) -> None:
        """PW: getClientList, (identity) pushListSign and getListSign with the check of the others' list
        signatures (spec §R8.4), then reconstructSecrets with the shares U3 calls for.

        The update is in already: once ``t + 1`` others have sent their shares the iteration moves on
        without this device, and a late one is told OutOfTime, or "finished" after the last iteration.
        Then it goes on to getModel (still served) instead of restarting.
        """
        try:
            listed = await self._cipher_ask(CipherRound.GET_CLIENT_LIST, iteration, progress)
            assert isinstance(listed, ClientListResponse)
            if drop_after == "getClientList":
                raise _End(IterationOutcome.FAILED, "dropped out after getClientList (simulated)")
            try:
                shares = session.reconstruction(listed.clients)
                if session.signs:
                    signature = session.sign_client_list(listed.clients)
                    await self._cipher_ask(
                        CipherRound.PUSH_LIST_SIGN, iteration, progress, signature=signature
                    )
                    signs = await self._cipher_ask(CipherRound.GET_LIST_SIGN, iteration, progress)
                    assert isinstance(signs, ListSignsResponse)
                    session.check_list_signatures(signs.signatures)
            except CipherInputError as exc:
                raise _End(IterationOutcome.FAILED, f"secure aggregation: {exc}") from None
            await self._cipher_ask(CipherRound.RECONSTRUCT_SECRETS, iteration, progress, shares=shares)
        except _Restart as late:
            log.info("device %s: %s; on to getModel", self._fl_id, late)
        except _End as end:
            if not end.reason.endswith(ServerText.DISABLED_OR_FINISHED.value):
                raise
            log.info("device %s: %s; on to getModel", self._fl_id, end.reason)

    async def _cipher_ask(self, round_: CipherRound, iteration: int, progress: _Progress, **kw: Any) -> Any:
        """One cipher round until SUCCEED (the reactions of :meth:`_ask`)."""
        send: Callable[[], Awaitable[Any]] = lambda: self.cipher_request(round_, iteration, **kw)  # noqa: E731
        return await self._ask(round_.value, send, progress)

    # --- reactions ----------------------------------------------------------------------------------

    async def _ask(
        self, round_name: str, send: Callable[[], Awaitable[_R | ServerText]], progress: _Progress
    ) -> _R:
        """Send until SUCCEED, waiting on safemode/not ready/SucNotReady; raise _Restart or _End otherwise."""
        waits = 0
        while True:
            answer = await send()
            if answer is ServerText.DISABLED_OR_FINISHED:
                raise _End(IterationOutcome.STOPPED, f"{round_name}: {answer.value}")
            if isinstance(answer, ServerText):
                why = repr(answer.value)
            elif answer.retcode == ResponseCode.SUCCEED:
                return answer
            elif answer.retcode == ResponseCode.SucNotReady:
                why = f"SucNotReady ({answer.reason!r})"
            elif answer.retcode == ResponseCode.OutOfTime:
                next_req_time = (
                    answer.timestamp if isinstance(answer, GetModelResponse) else answer.next_req_time
                )
                raise _Restart(round_name, next_req_time, answer.reason)
            elif answer.retcode in (ResponseCode.RequestError, ResponseCode.SystemError):
                code = ResponseCode(answer.retcode).name
                raise _End(IterationOutcome.STOPPED, f"{round_name} answered {code}: {answer.reason!r}")
            else:
                raise _End(
                    IterationOutcome.STOPPED,
                    f"{round_name} answered retcode {answer.retcode!r} ({answer.reason!r}), which a device "
                    "cannot act on (expected 200, 201, 300, 400 or 500)",
                )
            if waits >= self._policy.max_wait_tries:
                raise _End(
                    IterationOutcome.FAILED,
                    f"{round_name} still answered {why} after {waits!r} waits of "
                    f"{self._policy.wait_interval!r} s (max_wait_tries={self._policy.max_wait_tries!r})",
                )
            waits += 1
            progress.waits += 1
            await trio.sleep(self._policy.wait_interval)

    async def _sleep_until(self, restart: _Restart) -> None:
        now = self._now_ms()
        text = restart.next_req_time
        target = int(text) if _EPOCH_MS.fullmatch(text) else None
        if target is None or target <= now:
            what = "not a decimal epoch-ms time" if target is None else f"not in the future (now is {now})"
            log.warning(
                "device %s: %s answered OutOfTime with next_req_time %r, %s; the original's client aborts "
                "here, this device backs off %.3g s and restarts",
                self._fl_id,
                restart.round_name,
                text,
                what,
                self._policy.bad_next_req_time_backoff,
            )
            await trio.sleep(self._policy.bad_next_req_time_backoff)
            return
        await trio.sleep(min(target - now, self._policy.max_sleep_ms) / 1000)

    async def _attempt(
        self, trainer: Trainer, data_size: int, progress: _Progress, drop_after: str | None = None
    ) -> None:
        start = await self._ask("startFLJob", lambda: self.start_fl_job(data_size), progress)
        self._iteration = start.iteration
        progress.iteration = start.iteration
        if start.fl_plan is None:
            raise _End(IterationOutcome.STOPPED, "startFLJob answered SUCCEED without an FLPlan")
        progress.plan = start.fl_plan
        # spec/secure-aggregation.md §R1: the cipher rounds come before the (masked) upload.
        cipher = (
            await self._cipher_before_upload(start.fl_plan, start.iteration, progress, drop_after)
            if start.fl_plan.encrypt_type in CIPHER_TYPES
            else None
        )
        task = TrainingTask(
            fl_id=self._fl_id,
            iteration=start.iteration,
            data_size=data_size,
            plan=start.fl_plan,
            model={fm.name: fm.data for fm in start.feature_maps},
        )
        result = await trainer(task)
        progress.loss = result.loss
        # spec/privacy.md: DP noise or a SignDS selection, as the plan's encrypt_type says.
        upload = self._privacy.protect(
            start.fl_plan, task.model, result.feature_maps, data_size=data_size, trained=result.weights
        )
        maps: Mapping[str, npt.ArrayLike] = upload.feature_maps
        if cipher is not None:
            try:
                maps = await trio.to_thread.run_sync(cipher.mask, list(task.model), maps)
            except CipherInputError as exc:
                raise _End(IterationOutcome.FAILED, f"secure aggregation: {exc}") from None
        await self._ask(
            "updateModel",
            lambda: self.update_model(
                start.iteration,
                maps,
                upload_loss=result.loss,
                upload_accuracy=result.accuracy,
                sign=upload.sign,
                index_array=upload.index_array,
            ),
            progress,
        )
        if drop_after == "updateModel":
            raise _End(IterationOutcome.FAILED, "dropped out after updateModel (simulated)")
        if cipher is not None and cipher.pw:
            await self._cipher_after_upload(cipher, start.iteration, progress, drop_after)
        model = await self._ask("getModel", lambda: self.get_model(start.iteration), progress)
        progress.model_iteration = model.iteration
        self._privacy.observe(
            start.fl_plan,
            task.model,
            {fm.name: fm.data for fm in model.feature_maps},
            uploaded=tuple(upload.feature_maps),
            iteration=start.iteration,
        )

    async def run_iteration(
        self, trainer: Trainer, *, data_size: int, drop_after: str | None = None
    ) -> IterationReport:
        """Take part in one iteration: startFLJob, train, updateModel, then poll getModel for the new model.

        Reacts to every answer as the module docstring's table says. Errors of the trainer propagate.

        Args:
            trainer: Local training (see :data:`Trainer`).
            data_size: The data size to declare at startFLJob (the trainer multiplies its upload by it).

            drop_after: Tests and the simulator: under PW_ENCRYPT, leave the iteration (FAILED) right after
                the ``"shareSecrets"``, ``"updateModel"`` or ``"getClientList"`` round succeeded, as a device
                that drops out.

        Returns:
            The report; :attr:`IterationReport.outcome` says whether it completed, failed or stopped.

        Raises:
            ConfigError: ``data_size`` is not an int >= 1, or ``drop_after`` not one of :data:`DROP_POINTS`.
        """
        if isinstance(data_size, bool) or not isinstance(data_size, int) or data_size < 1:
            raise ConfigError(f"data_size must be an int >= 1, got {data_size!r}")
        if drop_after is not None and drop_after not in DROP_POINTS:
            raise ConfigError(f"drop_after must be None or one of {DROP_POINTS!r}, got {drop_after!r}")
        progress = _Progress(started=trio.current_time())

        def report(outcome: IterationOutcome, reason: str) -> IterationReport:
            return IterationReport(
                fl_id=self._fl_id,
                outcome=outcome,
                reason=reason,
                iteration=progress.iteration,
                model_iteration=progress.model_iteration,
                data_size=data_size,
                loss=progress.loss,
                restarts=progress.restarts,
                waits=progress.waits,
                started=progress.started,
                finished=trio.current_time(),
                plan=progress.plan,
            )

        if self._stopped is not None:
            return report(IterationOutcome.STOPPED, self._stopped)
        while True:
            try:
                await self._attempt(trainer, data_size, progress, drop_after)
            except _Restart as restart:
                if progress.restarts >= self._policy.max_restarts:
                    return report(
                        IterationOutcome.FAILED,
                        f"{restart}; no restart left "
                        f"(max_restarts={self._policy.max_restarts!r} per iteration)",
                    )
                progress.restarts += 1
                await self._sleep_until(restart)
                continue
            except _End as end:
                if end.outcome is IterationOutcome.STOPPED:
                    self._stopped = end.reason
                log.info("device %s: iteration %s: %s", self._fl_id, end.outcome.value, end.reason)
                return report(end.outcome, end.reason)
            except DeviceTransportError as exc:
                log.info("device %s: iteration failed: %s", self._fl_id, exc)
                return report(IterationOutcome.FAILED, str(exc))
            except (DeviceHTTPError, MalformedAnswer) as exc:
                self._stopped = str(exc)
                log.warning("device %s: job stopped: %s", self._fl_id, exc)
                return report(IterationOutcome.STOPPED, str(exc))
            return report(IterationOutcome.COMPLETED, "success")

    async def fetch_model(self, iteration: int) -> GetModelResponse:
        """Get the aggregated model of ``iteration``, waiting through safemode, "not ready" and SucNotReady.

        Used to evaluate the global model; it does not take part in an iteration. Waits are bounded by the
        policy's ``max_wait_tries``.

        Args:
            iteration: The iteration whose model is wanted (a server without it answers its latest).

        Returns:
            The SUCCEED answer.

        Raises:
            ModelUnavailable: The server answered anything but SUCCEED after the allowed waits.
            DeviceTransportError: No HTTP answer.
            DeviceHTTPError: An HTTP status other than 200.
            MalformedAnswer: A body that is neither a known text nor a ``ResponseGetModel``.
        """
        try:
            return await self._ask("getModel", lambda: self.get_model(iteration), _Progress(started=0.0))
        except (_Restart, _End) as exc:
            raise ModelUnavailable(f"no model for iteration {iteration!r}: {exc}") from None
