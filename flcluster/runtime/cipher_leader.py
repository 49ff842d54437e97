"""The leader's side of the secure-aggregation rounds: apply them, and unmask the total.

Theory of operation (spec/secure-aggregation.md §R5, §R6)
----------------------------------------------------------
A cipher request reaches the leader as the body the device sent (a direct call on rank 0, a ``cipher_call``
frame from a follower, which has already decoded it once so that a malformed body never leaves it). The
leader decodes it again (:func:`decode_request`: it trusts no follower with the rules); with the list
signatures of ``pki_verify`` the driver checks its signatures (spec §R8.3); :func:`cipher_event` checks what
only the field prime can tell (a reconstruction share's index and value, ``flcluster.secure``) and turns it
into the core's event; the driver feeds it to the iteration machine, waits until the machine with its effect
is committed, and :func:`encode_reply` turns the machine's :class:`~flcluster.core.cipher.CipherAnswer` (or
its plain text) into the response table. Anything refused here gets the round's ``RequestError`` and changes
nothing.

When R is complete the machine asks for the aggregation with the unmasking inputs
(:class:`~flcluster.core.cipher.UnmaskInputs`). The leader adds every Server's partial sums as without
encryption (the masks cancel only in the total) and :func:`unmasked_model` finishes it in a worker thread:
``w = fl32((fl64(Σ masked) + Z) / D)``, with ``Z`` from :func:`flcluster.secure.unmask_noise`. A failure
(too few or disagreeing shares, an upload without every tensor) is an
:class:`~flcluster.errors.AggregationError`: the iteration fails cleanly.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import numpy as np
import numpy.typing as npt
import torch

from flcluster.aggregation import ModelWeights, PartialSum
from flcluster.core.cipher import (
    CipherAnswer,
    CipherEvent,
    ExchangeKeysReceived,
    GetClientListReceived,
    GetKeysReceived,
    GetListSignReceived,
    GetSecretsReceived,
    PushListSignReceived,
    ReconstructSecretsReceived,
    ShareSecretsReceived,
    UnmaskInputs,
)
from flcluster.core.iteration import PlainText
from flcluster.errors import AggregationError, CipherInputError, SchemaError, UnmaskError
from flcluster.secure import ClientShare, PublicKeys, check_reconstruction_shares, shamir, unmask_noise
from flcluster.wire.cipher_records import ExchangeKeysRequest, FetchRequest, ListSignRequest, SharesRequest
from flcluster.wire.cipher_server_codec import (
    CipherRequest,
    decode_cipher_request,
    encode_cipher_answer,
    encode_cipher_error,
)
from flcluster.wire.codes import CipherRound, ResponseCode

__all__ = ["cipher_event", "decode_request", "encode_refusal", "encode_reply", "unmasked_model"]


def decode_request(round_: CipherRound, body: bytes) -> CipherRequest:
    """The leader's decoding of one cipher request body.

    Raises:
        CipherInputError: the body is not the round's table (spec §R7).
    """
    try:
        return decode_cipher_request(round_, body)
    except SchemaError as exc:
        raise CipherInputError(str(exc)) from None


def cipher_event(
    round_: CipherRound,
    request: CipherRequest,
    *,
    cause: str,
    now_ms: int,
    prime: int,
    signed_keys: bool = False,
    signs_u3: bool = False,
) -> CipherEvent:
    """The core's event for one decoded cipher request.

    Args:
        round_: The round.
        request: The decoded body (:func:`decode_request`).
        cause: The event's cause id.
        now_ms: The leader's now.
        prime: The job's field prime.
        signed_keys: exchangeKeys with the list signatures: the keys keep the request's timestamp, signature
            and certificates, which getKeys relays (spec §R8.1; the leader verified them).
        signs_u3: pushListSign: the list signature verifies over U3 (the leader checked, spec §R8.3).

    Raises:
        CipherInputError: a reconstructSecrets share has an index outside ``[1, 2**31)`` or a value not below
            the prime (spec §2.3).
    """
    match request:
        case ExchangeKeysRequest(keys=keys, iteration=iteration):
            if signed_keys:
                keys = attrs.evolve(
                    keys,
                    timestamp=request.timestamp,
                    signature=request.signature,
                    certificate_chain=request.certificate_chain,
                )
            return ExchangeKeysReceived(cause, keys, iteration, now_ms)
        case ListSignRequest(fl_id=fl_id, iteration=iteration, signature=signature):
            return PushListSignReceived(cause, fl_id, iteration, signature, signs_u3, now_ms)
        case FetchRequest(fl_id=fl_id, iteration=iteration):
            if round_ is CipherRound.GET_KEYS:
                return GetKeysReceived(cause, fl_id, iteration, now_ms)
            if round_ is CipherRound.GET_SECRETS:
                return GetSecretsReceived(cause, fl_id, iteration, now_ms)
            if round_ is CipherRound.GET_LIST_SIGN:
                return GetListSignReceived(cause, fl_id, iteration, now_ms)
            return GetClientListReceived(cause, fl_id, iteration, now_ms)
        case SharesRequest(fl_id=fl_id, iteration=iteration, shares=shares):
            if round_ is CipherRound.SHARE_SECRETS:
                return ShareSecretsReceived(cause, fl_id, iteration, shares, now_ms)
            try:
                # Membership is the machine's rule; the values only the prime can judge.
                owners = [s.fl_id for s in shares if s.fl_id != fl_id]
                check_reconstruction_shares(
                    fl_id, [ClientShare(s.fl_id, s.share, s.index) for s in shares], owners, prime
                )
            except CipherInputError as exc:
                raise CipherInputError(f"reconstructSecrets shares are malformed: {exc}") from None
            return ReconstructSecretsReceived(cause, fl_id, iteration, shares, now_ms)
    raise AssertionError(f"no event for {request!r}")  # pragma: no cover - the match is exhaustive


def encode_refusal(round_: CipherRound, reason: str, *, iteration: int, next_req_time_ms: int) -> bytes:
    """The RequestError answer of ``round_`` for a request refused before the machine saw it."""
    return encode_cipher_error(
        round_,
        retcode=int(ResponseCode.RequestError),
        reason=reason,
        iteration=iteration,
        next_req_time=str(next_req_time_ms),
    )


def encode_reply(reply: object) -> bytes | str:
    """The device answer for the machine's reply to a cipher event (a table, or a plain text)."""
    match reply:
        case CipherAnswer():
            return encode_cipher_answer(reply)
        case PlainText(text=text):
            return text
    raise AssertionError(f"a cipher request got {reply!r}; expected a CipherAnswer or a plain text")


def _public_keys(inputs: UnmaskInputs) -> dict[str, PublicKeys]:
    try:
        return {
            k.fl_id: PublicKeys(k.fl_id, k.c_pk, k.s_pk, k.ind_iv, k.pw_iv, k.pw_salt) for k in inputs.keys
        }
    except CipherInputError as exc:
        raise UnmaskError(f"unmasking refused: a device's keys are unusable: {exc}") from None


def unmasked_model(
    total: PartialSum,
    inputs: UnmaskInputs,
    prime: int,
    *,
    noise: Callable[..., npt.NDArray[np.float64]] = unmask_noise,
) -> ModelWeights:
    """The model of a PW iteration: ``fl32((fl64(Σ masked) + Z) / D)`` (spec/secure-aggregation.md §2.3).

    Blocking (key agreement and PRG over the model's length for every dropped device): run it in a worker
    thread.

    Args:
        total: Every Server's partial sums, combined.
        inputs: U2, U3, the keys and the reconstruction shares (from ``AggregateIteration.unmask``).
        prime: The job's field prime.
        noise: The noise function (tests only).

    Raises:
        AggregationError: an upload lacked a tensor (each tensor's data-size total must be the same),
            the shares cannot rebuild the secrets (:class:`~flcluster.errors.UnmaskError`), or the result
            is not finite.
    """
    spec = total.spec
    sizes = set(total.data_sizes)
    if len(sizes) != 1 or 0 in sizes:
        raise AggregationError(
            f"PW_ENCRYPT needs every tensor in every update (the masks cover them all); the data-size totals "
            f"per tensor are {sorted(sizes)!r:.200}"
        )
    (d,) = sizes
    flat = torch.cat([s.reshape(-1) for s in total.sums]).to(torch.float64).numpy()
    z = noise(
        {s.fl_id: [ClientShare(x.fl_id, x.share, x.index) for x in s.shares] for s in inputs.shares},
        _public_keys(inputs),
        inputs.u2,
        inputs.u3,
        inputs.t,
        prime,
        flat.size,
    )
    model = ((flat + z) / d).astype(np.float32)
    if not np.isfinite(model).all():
        raise AggregationError("the unmasked model is not finite (the float32 sums overflowed)")
    result: dict[str, torch.Tensor] = {}
    at = 0
    for name, s in zip(spec.names, total.sums, strict=True):
        n = s.numel()
        result[name] = torch.from_numpy(model[at : at + n].copy()).reshape(s.shape)
        at += n
    return ModelWeights(result)


def field_prime(pw_prime: bytes) -> int:
    """The FLPlan's ``pw_prime`` as an integer (checked)."""
    return shamir.check_prime(pw_prime)
