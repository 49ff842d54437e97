"""What each Server and the leader check before a device request counts (spec/device-protocol.md, "Client
verification").

Theory of operation
-------------------
Client verification is split where the work and the state are:

- **The Server a request lands on** does what needs no cluster-wide state and costs the most: for
  startFLJob, :func:`verify_start_fl_job` checks the required fields, the timestamp, the fl_id's binding to
  the equip certificate, the certificate chain against the configured anchors and the signature
  ``sign_data``, and returns the verified device key (:class:`VerifiedStart`); for updateModel,
  :func:`check_update_model` checks that a signature and an epoch-ms timestamp are there. A failure is
  answered there and then; the leader never hears of it.
- **The leader** holds what is cluster-wide, in a :class:`ClientVerifier`: the key of every device it
  accepted at startFLJob (a device may send its update to another Server) and the requests it admitted
  within the replay window. :meth:`ClientVerifier.admit_start_fl_job`,
  :meth:`ClientVerifier.admit_update_model` and, for the list signatures of PW_ENCRYPT
  (spec/secure-aggregation.md §R8), :meth:`ClientVerifier.admit_exchange_keys` and, for the request
  signature of every other cipher round, :meth:`ClientVerifier.admit_cipher_request` run before the
  iteration machine sees a request;
  :meth:`ClientVerifier.keep_key` records the key once the machine accepted the startFLJob.

Every check takes ``now_ms`` from its caller (the driver's clock) and raises
:class:`~flcluster.errors.VerificationFailed` with the reason the device is told and ``retry_later`` set
where the original answers ``OutOfTime`` (updateModel: no key kept, timestamp out of the window); the
caller turns it into the answer and changes nothing else.
"""

from __future__ import annotations

from typing import Final

import attrs

from flcluster.errors import VerificationFailed
from flcluster.verify.lists import exchange_keys_signed_data, peer_key, same_key
from flcluster.verify.pki import (
    PublicKey,
    TrustAnchors,
    fl_id_of,
    load_public_key,
    public_key_der,
    start_fl_job_signed_data,
    update_model_signed_data,
    verify_device_chain,
    verify_request_signature,
)
from flcluster.verify.timestamps import (
    MAX_REPLAY_ENTRIES,
    ReplayGuard,
    check_fresh,
    parse_timestamp,
    replay_key,
)
from flcluster.wire.codes import CipherRound, DeviceRound
from flcluster.wire.records import StartFLJobRequest, UpdateModelRequest

__all__ = [
    "REASON_EXCHANGE_KEYS_TIMEOUT",
    "REASON_SIGNATURE_FAILED",
    "REASON_SIGNATURE_TIMEOUT",
    "REASON_START_FL_JOB_VERIFY",
    "ClientVerification",
    "ClientVerifier",
    "VerifiedStart",
    "check_update_model",
    "reason_signature_failed",
    "reason_signature_timeout",
    "verify_start_fl_job",
]

#: The original's reason for a startFLJob that fails pki_verify (``JudgeFLJobCert``); flcluster adds why.
REASON_START_FL_JOB_VERIFY: Final = "startFLJob sign and certificate verify failed"


#: The original's reasons of the cipher rounds' signature checks (``VerifySignatureBase``; spec
#: secure-aggregation §R8.3): a signature that fails (``RequestError``), no key kept or a stale timestamp
#: (``OutOfTime``; exchangeKeys says more).
REASON_SIGNATURE_FAILED: Final = "verify signature failed."
REASON_SIGNATURE_TIMEOUT: Final = "verify signature timestamp failed."
REASON_EXCHANGE_KEYS_TIMEOUT: Final = "verify signature timestamp failed or cannot find its key attestation."

#: The rounds whose stale-or-keyless answer is not :data:`REASON_SIGNATURE_TIMEOUT` (the original's
#: ``ShareSecretsKernel`` says what exchangeKeys says).
_REQUEST_TIMEOUT_REASONS: Final[dict[str, str]] = {CipherRound.SHARE_SECRETS: REASON_EXCHANGE_KEYS_TIMEOUT}


def reason_signature_failed(fl_id: str) -> str:
    """The original's reason for an updateModel whose signature fails (``RequestError``)."""
    return f"verify signature failed for fl id {fl_id}"


def reason_signature_timeout(fl_id: str) -> str:
    """The original's reason for an updateModel with no key kept or a stale timestamp (``OutOfTime``)."""
    return f"verify signature timestamp failed or cannot find its key attestation for fl id {fl_id}"


def _refused(prefix: str, exc: VerificationFailed, *, retry_later: bool = False) -> VerificationFailed:
    return VerificationFailed(f"{prefix}: {exc.reason}", retry_later=retry_later)


@attrs.frozen
class ClientVerification:
    """A Server's client-verification settings (``pki_verify=True``), from its FL context.

    Attributes:
        trust: The roots of ``root_first_ca_path`` and ``root_second_ca_path`` and the CRLs of
            ``equip_crl_path``.
        replay_attack_time_diff: Milliseconds a timestamp may be from now, either way.
    """

    trust: TrustAnchors
    replay_attack_time_diff: int


@attrs.frozen
class VerifiedStart:
    """What a verified startFLJob tells the leader.

    Attributes:
        timestamp: The request's timestamp (epoch milliseconds, as sent).
        device_key: The key of its key attestation certificate, as DER SubjectPublicKeyInfo.
    """

    timestamp: str
    device_key: bytes


def verify_start_fl_job(
    req: StartFLJobRequest, verification: ClientVerification, *, now_ms: int
) -> VerifiedStart:
    """The startFLJob checks of the Server the request lands on (spec "Client verification", steps 1–6).

    Raises:
        VerificationFailed: A check failed; the reason starts with :data:`REASON_START_FL_JOB_VERIFY`.
    """
    try:
        missing = [
            name
            for name, value in (
                ("sign_data", req.sign_data),
                ("key_attestation", req.key_attestation),
                ("equip_cert", req.equip_cert),
                ("equip_ca_cert", req.equip_ca_cert),
            )
            if not value
        ]
        if missing:
            raise VerificationFailed(f"{', '.join(missing)} absent; pki_verify needs them")
        check_fresh(parse_timestamp(req.timestamp), now_ms, verification.replay_attack_time_diff)
        if req.fl_id != fl_id_of(req.equip_cert):
            raise VerificationFailed(
                f"fl_id {req.fl_id!r:.80} is not the SHA-256 of equip_cert ({fl_id_of(req.equip_cert)!r})"
            )
        key = verify_device_chain(
            req.key_attestation, req.equip_cert, req.equip_ca_cert, verification.trust, now_ms=now_ms
        )
        verify_request_signature(key, start_fl_job_signed_data(req.fl_id, req.timestamp), req.sign_data)
    except VerificationFailed as exc:
        raise _refused(REASON_START_FL_JOB_VERIFY, exc) from None
    return VerifiedStart(req.timestamp, public_key_der(key))


def check_update_model(req: UpdateModelRequest) -> None:
    """The updateModel checks of the Server the request lands on: a signature and an epoch-ms timestamp.

    Raises:
        VerificationFailed: One is missing or malformed (``RequestError``).
    """
    try:
        if not req.signature:
            raise VerificationFailed("signature absent; pki_verify needs it")
        parse_timestamp(req.timestamp)
    except VerificationFailed as exc:
        raise _refused(reason_signature_failed(req.fl_id), exc) from None


class ClientVerifier:
    """The leader's client-verification state: device keys and admitted requests (see the module docstring).

    Args:
        replay_attack_time_diff: Milliseconds a timestamp may be from now, either way.
        capacity: Most requests remembered for the replay check.
    """

    def __init__(self, replay_attack_time_diff: int, *, capacity: int = MAX_REPLAY_ENTRIES) -> None:
        self._window = replay_attack_time_diff
        self._replays = ReplayGuard(replay_attack_time_diff, capacity=capacity)
        self._keys: dict[str, tuple[int, PublicKey]] = {}
        self._swept_for = 0

    def device_key(self, fl_id: str) -> PublicKey | None:
        """The key kept for ``fl_id`` (from its last accepted startFLJob), or ``None``."""
        kept = self._keys.get(fl_id)
        return None if kept is None else kept[1]

    def statistics(self) -> tuple[int, int]:
        """(device keys kept, requests remembered for the replay check)."""
        return len(self._keys), len(self._replays)

    def admit_start_fl_job(self, fl_id: str, timestamp: str, device_key: bytes, *, now_ms: int) -> PublicKey:
        """The leader's startFLJob checks: the key, the timestamp (the leader's clock), no replay.

        Returns:
            The device key, to :meth:`keep_key` if the iteration machine accepts the request.

        Raises:
            VerificationFailed: ``RequestError``; the reason starts with :data:`REASON_START_FL_JOB_VERIFY`.
        """
        try:
            key = load_public_key(device_key)
            timestamp_ms = parse_timestamp(timestamp)
            check_fresh(timestamp_ms, now_ms, self._window)
            signed = start_fl_job_signed_data(fl_id, timestamp)
            self._replays.admit(replay_key(DeviceRound.START_FL_JOB, fl_id, signed), timestamp_ms, now_ms)
        except VerificationFailed as exc:
            raise _refused(REASON_START_FL_JOB_VERIFY, exc) from None
        return key

    def admit_update_model(
        self, fl_id: str, iteration: int, timestamp: str, signature: bytes, *, now_ms: int
    ) -> None:
        """The leader's updateModel checks, in the original's order (key, signature, timestamp), then replay.

        Args:
            fl_id: The device.
            iteration: The request's ``iteration`` field (part of the signed data).
            timestamp: The request's timestamp.
            signature: The request's signature.
            now_ms: The leader's now.

        Raises:
            VerificationFailed: ``retry_later`` (``OutOfTime``) when no key is kept or the timestamp is
                out of the window; otherwise ``RequestError``.
        """
        signed = update_model_signed_data(timestamp, iteration)
        failed = reason_signature_failed(fl_id)
        _key, timestamp_ms = self._check_signed(
            fl_id,
            timestamp,
            signed,
            signature,
            now_ms,
            reason_signature_timeout(fl_id),
            failed=failed,
            signature_first=False,
        )
        self._remember(DeviceRound.UPDATE_MODEL, fl_id, signed, timestamp_ms, now_ms, failed=failed)

    def _check_signed(
        self,
        fl_id: str,
        timestamp: str,
        signed: bytes,
        signature: bytes,
        now_ms: int,
        timeout: str,
        *,
        failed: str = REASON_SIGNATURE_FAILED,
        signature_first: bool = True,
    ) -> tuple[PublicKey, int]:
        """Key kept, signature, timestamp (spec secure-aggregation §R8.3, updateModel's order too); the key
        and the timestamp's ms. ``failed`` and ``timeout`` are the round's reasons; with ``signature_first``
        an absent signature fails before the key is looked up (the cipher rounds)."""
        if signature_first and not signature:  # the original's VerifySignatureBase
            raise VerificationFailed(failed)
        key = self.device_key(fl_id)
        if key is None:
            raise VerificationFailed(timeout, retry_later=True)
        try:
            timestamp_ms = parse_timestamp(timestamp)
        except VerificationFailed as exc:
            raise _refused(failed, exc) from None
        try:
            verify_request_signature(key, signed, signature)
        except VerificationFailed:
            raise VerificationFailed(failed) from None
        try:
            check_fresh(timestamp_ms, now_ms, self._window)
        except VerificationFailed as exc:
            raise _refused(timeout, exc, retry_later=True) from None
        return key, timestamp_ms

    def _remember(
        self,
        round_name: str,
        fl_id: str,
        signed: bytes,
        timestamp_ms: int,
        now_ms: int,
        *,
        failed: str = REASON_SIGNATURE_FAILED,
    ) -> None:
        try:
            self._replays.admit(replay_key(round_name, fl_id, signed), timestamp_ms, now_ms)
        except VerificationFailed as exc:
            raise _refused(failed, exc) from None

    def admit_cipher_request(
        self,
        round_: CipherRound,
        fl_id: str,
        iteration: int,
        timestamp: str,
        signature: bytes,
        *,
        now_ms: int,
    ) -> PublicKey:
        """The request signature of a cipher round other than exchangeKeys, over
        ``timestamp + str(iteration)`` (spec/secure-aggregation.md §R8.3 step 1, §R8.6): getKeys,
        shareSecrets, getSecrets, getClientList, reconstructSecrets and getListSign (their ``signature``),
        pushListSign (its ``req_signature``).

        Returns:
            The device's key (the leader checks pushListSign's list signature with it).

        Raises:
            VerificationFailed: ``retry_later`` (``OutOfTime``, :data:`REASON_SIGNATURE_TIMEOUT`;
                shareSecrets: :data:`REASON_EXCHANGE_KEYS_TIMEOUT`, the original's words) when no key is
                kept or the timestamp is out of the window; otherwise ``RequestError``
                (``verify signature failed.``), an absent signature first of all.
        """
        signed = update_model_signed_data(timestamp, iteration)
        timeout = _REQUEST_TIMEOUT_REASONS.get(round_, REASON_SIGNATURE_TIMEOUT)
        key, timestamp_ms = self._check_signed(fl_id, timestamp, signed, signature, now_ms, timeout)
        self._remember(round_.value, fl_id, signed, timestamp_ms, now_ms)
        return key

    def admit_exchange_keys(
        self,
        fl_id: str,
        iteration: int,
        timestamp: str,
        c_pk: bytes,
        s_pk: bytes,
        signature: bytes,
        certificate_chain: tuple[str, ...],
        *,
        now_ms: int,
    ) -> None:
        """A signed exchangeKeys (spec/secure-aggregation.md §R8.1): the key kept, the signature over
        ``c_pk ‖ s_pk ‖ timestamp ‖ iteration``, the timestamp, the chain (it binds the kept key to
        ``fl_id``), then the replay check.

        Raises:
            VerificationFailed: ``retry_later`` (``OutOfTime``) when no key is kept or the timestamp is out of
                the window; otherwise ``RequestError``.
        """
        signed = exchange_keys_signed_data(c_pk, s_pk, timestamp, iteration)
        key, timestamp_ms = self._check_signed(
            fl_id, timestamp, signed, signature, now_ms, REASON_EXCHANGE_KEYS_TIMEOUT
        )
        try:
            certified = peer_key(fl_id, certificate_chain)
        except VerificationFailed as exc:
            raise _refused(REASON_SIGNATURE_FAILED, exc) from None
        if not same_key(certified, key):
            raise VerificationFailed(
                f"{REASON_SIGNATURE_FAILED}: the certificate_chain certifies another key than the one of the "
                "device's startFLJob"
            )
        self._remember("exchangeKeys", fl_id, signed, timestamp_ms, now_ms)

    def keep_key(self, fl_id: str, key: PublicKey, *, iteration: int) -> None:
        """Keep ``key`` for ``fl_id``: the machine accepted its startFLJob into ``iteration``.

        Keys of iterations two or more behind ``iteration`` are forgotten (once per new iteration).
        """
        if iteration > self._swept_for:
            self._swept_for = iteration
            for stale in [f for f, (it, _) in self._keys.items() if it < iteration - 1]:
                del self._keys[stale]
        self._keys[fl_id] = (iteration, key)
