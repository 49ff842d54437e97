# mypy: disallow-untyped-calls=False
# (The flatc-generated modules in flcluster.wire.fbs carry no annotations.)
"""The Server's side of the secure-aggregation rounds: decode the requests, encode the answers.

Theory of operation
-------------------
The bodies are the original's cipher tables, field for field (spec/cipher.fbs). **Decoding**
(:func:`decode_cipher_request`, or one ``decode_*`` per table) runs :func:`flcluster.wire.verify.verify` with
the description of exactly the fields it then reads (:mod:`flcluster.wire.schema`), and reads the body through
what the verifier found, never through a generated accessor; anything malformed or over a limit
(spec/secure-aggregation.md §R7) raises :class:`~flcluster.errors.SchemaError` with the original's reason
("The schema of RequestExchangeKeys is invalid."), and a body without ``fl_id`` or ``timestamp`` raises it
with "Verify flatbuffers schema failed for <Table>.". Keys and shares come out as the core's records, copied
out of the body (they are small).

**Encoding** (:func:`encode_cipher_answer` for what the leader's machine answered, :func:`encode_cipher_error`
for what a Server refuses before that) writes the response table of the round, without a file identifier, as
the original server. Values over a field's width raise ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, assert_never

from flcluster.core.cipher import CipherAnswer, DeviceKeys, ListSignature, Share
from flcluster.errors import SchemaError
from flcluster.wire import _flatbuf as fb
from flcluster.wire.cipher_records import ExchangeKeysRequest, FetchRequest, ListSignRequest, SharesRequest
from flcluster.wire.codes import MAX_CERTIFICATE_BYTES, MAX_FL_ID_BYTES, CipherRound
from flcluster.wire.fbs import ClientListSign as fb_list_sign
from flcluster.wire.fbs import ClientPublicKeys as fb_keys
from flcluster.wire.fbs import ClientShare as fb_share
from flcluster.wire.fbs import ReconstructSecret as fb_rsp_reconstruct
from flcluster.wire.fbs import ResponseClientListSign as fb_rsp_push_list_sign
from flcluster.wire.fbs import ResponseExchangeKeys as fb_rsp_exchange
from flcluster.wire.fbs import ResponseShareSecrets as fb_rsp_share
from flcluster.wire.fbs import ReturnAllClientListSign as fb_rsp_list_signs
from flcluster.wire.fbs import ReturnClientList as fb_rsp_clients
from flcluster.wire.fbs import ReturnExchangeKeys as fb_rsp_keys
from flcluster.wire.fbs import ReturnShareSecrets as fb_rsp_secrets
from flcluster.wire.schema import (
    GET_CLIENT_LIST,
    GET_EXCHANGE_KEYS,
    GET_SHARE_SECRETS,
    REQUEST_ALL_CLIENT_LIST_SIGN,
    REQUEST_EXCHANGE_KEYS,
    REQUEST_SHARE_SECRETS,
    SEND_CLIENT_LIST_SIGN,
    SEND_RECONSTRUCT_SECRET,
)
from flcluster.wire.verify import Table, Verified, verify

__all__ = [
    "CipherRequest",
    "decode_cipher_request",
    "decode_exchange_keys",
    "decode_fetch",
    "decode_push_list_sign",
    "decode_shares",
    "encode_cipher_answer",
    "encode_cipher_error",
]

CipherRequest = ExchangeKeysRequest | FetchRequest | SharesRequest | ListSignRequest
"""What :func:`decode_cipher_request` returns."""

_FETCH_TABLES = {
    CipherRound.GET_KEYS: GET_EXCHANGE_KEYS,
    CipherRound.GET_SECRETS: GET_SHARE_SECRETS,
    CipherRound.GET_CLIENT_LIST: GET_CLIENT_LIST,
    CipherRound.GET_LIST_SIGN: REQUEST_ALL_CLIENT_LIST_SIGN,
}
#: The original's reason for a pushListSign body that is not a ``SendClientListSign`` (its words).
REASON_PUSH_LIST_SIGN_SCHEMA = "The schema of PushClientListSign is invalid."
_SHARES_TABLES = {
    CipherRound.SHARE_SECRETS: (REQUEST_SHARE_SECRETS, 1),
    CipherRound.RECONSTRUCT_SECRETS: (SEND_RECONSTRUCT_SECRET, 1),
}


def _bytes(body: bytes, found: tuple[int, int] | None) -> bytes:
    return b"" if found is None else bytes(body[found[0] : found[0] + found[1]])


def _required(root: Verified, table: Table, fl_id_slot: int, timestamp_slot: int) -> tuple[str, str]:
    fl_id, timestamp = root.string(fl_id_slot), root.string(timestamp_slot)
    if fl_id is None or timestamp is None:
        missing = "fl_id" if fl_id is None else "timestamp"
        raise SchemaError(
            f"Verify flatbuffers schema failed for {table.name}.", f"required field {missing} absent"
        )
    return fl_id, timestamp


def decode_exchange_keys(body: bytes) -> ExchangeKeysRequest:
    """Decode an ``/exchangeKeys`` body (``RequestExchangeKeys``).

    Raises:
        SchemaError: malformed, over a limit, or without fl_id or timestamp.
    """
    root = verify(body, REQUEST_EXCHANGE_KEYS)
    fl_id, timestamp = _required(root, REQUEST_EXCHANGE_KEYS, 0, 4)
    keys = DeviceKeys(
        fl_id=fl_id,
        c_pk=_bytes(body, root.vector(1)),
        s_pk=_bytes(body, root.vector(2)),
        ind_iv=_bytes(body, root.vector(5)),
        pw_iv=_bytes(body, root.vector(6)),
        pw_salt=_bytes(body, root.vector(7)),
    )
    return ExchangeKeysRequest(
        keys=keys,
        iteration=int(root.scalar(3, fb.I32_FMT, 0)),
        timestamp=timestamp,
        signature=_bytes(body, root.vector(8)),
        certificate_chain=root.strings(9) or (),
    )


def decode_fetch(body: bytes, round_: CipherRound) -> FetchRequest:
    """Decode a ``/getKeys``, ``/getSecrets``, ``/getClientList`` or ``/getListSign`` body.

    Raises:
        SchemaError: malformed, over a limit, or without fl_id or timestamp.
    """
    table = _FETCH_TABLES[round_]
    root = verify(body, table)
    fl_id, timestamp = _required(root, table, 0, 2)
    return FetchRequest(
        fl_id=fl_id,
        iteration=int(root.scalar(1, fb.I32_FMT, 0)),
        timestamp=timestamp,
        signature=_bytes(body, root.vector(3)),
    )


def decode_push_list_sign(body: bytes) -> ListSignRequest:
    """Decode a ``/pushListSign`` body (``SendClientListSign``, spec/secure-aggregation.md §R8.2).

    Raises:
        SchemaError: malformed or over a limit ("The schema of PushClientListSign is invalid.", the original's
            words), or without fl_id or timestamp.
    """
    root = verify(body, SEND_CLIENT_LIST_SIGN, reason=REASON_PUSH_LIST_SIGN_SCHEMA)
    fl_id, timestamp = _required(root, SEND_CLIENT_LIST_SIGN, 0, 2)
    return ListSignRequest(
        fl_id=fl_id,
        iteration=int(root.scalar(1, fb.I32_FMT, 0)),
        timestamp=timestamp,
        signature=_bytes(body, root.vector(3)),
        req_signature=_bytes(body, root.vector(4)),
    )


def decode_shares(body: bytes, round_: CipherRound) -> SharesRequest:
    """Decode a ``/shareSecrets`` or ``/reconstructSecrets`` body.

    Raises:
        SchemaError: malformed, over a limit, without fl_id or timestamp, or a share without fl_id.
    """
    table, slot = _SHARES_TABLES[round_]
    root = verify(body, table)
    fl_id, timestamp = _required(root, table, 0, 3)
    shares = []
    for i, entry in enumerate(root.tables(slot) or ()):
        owner = entry.string(0)
        if owner is None:
            raise SchemaError(
                f"Verify flatbuffers schema failed for {table.name}.", f"share {i} has no fl_id"
            )
        shares.append(Share(owner, _bytes(body, entry.vector(1)), int(entry.scalar(2, fb.I32_FMT, 0))))
    return SharesRequest(
        fl_id=fl_id,
        iteration=int(root.scalar(2, fb.I32_FMT, 0)),
        timestamp=timestamp,
        shares=tuple(shares),
        signature=_bytes(body, root.vector(4)),
    )


def decode_cipher_request(round_: CipherRound, body: bytes) -> CipherRequest:
    """Decode the request body of cipher round ``round_``.

    Raises:
        SchemaError: see the per-table decoders.
    """
    match round_:
        case CipherRound.EXCHANGE_KEYS:
            return decode_exchange_keys(body)
        case (
            CipherRound.GET_KEYS
            | CipherRound.GET_SECRETS
            | CipherRound.GET_CLIENT_LIST
            | CipherRound.GET_LIST_SIGN
        ):
            return decode_fetch(body, round_)
        case CipherRound.SHARE_SECRETS | CipherRound.RECONSTRUCT_SECRETS:
            return decode_shares(body, round_)
        case CipherRound.PUSH_LIST_SIGN:
            return decode_push_list_sign(body)
        case _:
            assert_never(round_)


# ----------------------------------------------------------------------------------------------------------
# Encoding the answers
# ----------------------------------------------------------------------------------------------------------


def _shares_vector(builder: Any, shares: Sequence[Share]) -> int:
    offsets = []
    for share in shares:
        fl_id = builder.CreateString(fb.limited("share fl_id", share.fl_id, MAX_FL_ID_BYTES))
        data = fb.bytes_vector(builder, share.share)
        fb_share.ClientShareStart(builder)
        fb_share.ClientShareAddFlId(builder, fl_id)
        fb_share.ClientShareAddShare(builder, data)
        fb_share.ClientShareAddIndex(builder, fb.int32("share index", share.index))
        offsets.append(fb_share.ClientShareEnd(builder))
    return fb.offsets_vector(builder, offsets)


def _keys_vector(builder: Any, keys: Sequence[DeviceKeys], iteration: int) -> int:
    offsets = []
    for k in keys:
        fl_id = builder.CreateString(fb.limited("keys fl_id", k.fl_id, MAX_FL_ID_BYTES))
        c_pk = fb.bytes_vector(builder, k.c_pk) if k.c_pk else None
        s_pk = fb.bytes_vector(builder, k.s_pk)
        pw_iv = fb.bytes_vector(builder, k.pw_iv)
        pw_salt = fb.bytes_vector(builder, k.pw_salt)
        signed = None
        if k.signed:  # the list signatures' relay (spec/secure-aggregation.md §R8.1)
            chain = [
                builder.CreateString(fb.limited("certificate", c, MAX_CERTIFICATE_BYTES))
                for c in k.certificate_chain
            ]
            signed = (
                builder.CreateString(k.timestamp),
                fb.bytes_vector(builder, k.signature),
                fb.offsets_vector(builder, chain),
            )
        m = fb_keys
        m.ClientPublicKeysStart(builder)
        m.ClientPublicKeysAddFlId(builder, fl_id)
        if c_pk is not None:  # STABLE_PW_ENCRYPT sends s_pk only, as the original
            m.ClientPublicKeysAddCPk(builder, c_pk)
        m.ClientPublicKeysAddSPk(builder, s_pk)
        m.ClientPublicKeysAddPwIv(builder, pw_iv)
        m.ClientPublicKeysAddPwSalt(builder, pw_salt)
        if signed is not None:
            timestamp_off, signature_off, chain_off = signed
            m.ClientPublicKeysAddTimestamp(builder, timestamp_off)
            m.ClientPublicKeysAddIteration(builder, fb.int32("iteration", iteration))
            m.ClientPublicKeysAddSignature(builder, signature_off)
            m.ClientPublicKeysAddCertificateChain(builder, chain_off)
        offsets.append(m.ClientPublicKeysEnd(builder))
    return fb.offsets_vector(builder, offsets)


def _ack(round_: CipherRound, retcode: int, reason: str, iteration: int, next_req_time: str) -> bytes:
    builder = fb.new_builder(len(reason) * 4)
    reason_off = builder.CreateString(reason)
    next_off = builder.CreateString(next_req_time)
    code, it = fb.int32("retcode", retcode), fb.int32("iteration", iteration)
    match round_:
        case CipherRound.EXCHANGE_KEYS:
            m = fb_rsp_exchange
            m.ResponseExchangeKeysStart(builder)
            m.ResponseExchangeKeysAddRetcode(builder, code)
            m.ResponseExchangeKeysAddReason(builder, reason_off)
            m.ResponseExchangeKeysAddNextReqTime(builder, next_off)
            m.ResponseExchangeKeysAddIteration(builder, it)
            return fb.finish(builder, m.ResponseExchangeKeysEnd(builder))
        case CipherRound.SHARE_SECRETS:
            s = fb_rsp_share
            s.ResponseShareSecretsStart(builder)
            s.ResponseShareSecretsAddRetcode(builder, code)
            s.ResponseShareSecretsAddReason(builder, reason_off)
            s.ResponseShareSecretsAddNextReqTime(builder, next_off)
            s.ResponseShareSecretsAddIteration(builder, it)
            return fb.finish(builder, s.ResponseShareSecretsEnd(builder))
        case CipherRound.PUSH_LIST_SIGN:
            c = fb_rsp_push_list_sign
            c.ResponseClientListSignStart(builder)
            c.ResponseClientListSignAddRetcode(builder, code)
            c.ResponseClientListSignAddReason(builder, reason_off)
            c.ResponseClientListSignAddIteration(builder, it)
            c.ResponseClientListSignAddNextReqTime(builder, next_off)
            return fb.finish(builder, c.ResponseClientListSignEnd(builder))
        case CipherRound.RECONSTRUCT_SECRETS:
            r = fb_rsp_reconstruct
            r.ReconstructSecretStart(builder)
            r.ReconstructSecretAddRetcode(builder, code)
            r.ReconstructSecretAddReason(builder, reason_off)
            r.ReconstructSecretAddIteration(builder, it)
            r.ReconstructSecretAddNextReqTime(builder, next_off)
            return fb.finish(builder, r.ReconstructSecretEnd(builder))
        case _:
            raise AssertionError(f"{round_} has no acknowledgement table")


def encode_get_keys_response(
    *, retcode: int, iteration: int, keys: Sequence[DeviceKeys], next_req_time: str
) -> bytes:
    """Encode a ``ReturnExchangeKeys`` (getKeys); ``remote_publickeys`` only when there are keys."""
    size = sum(160 + len(k.fl_id) + len(k.signature) + sum(len(c) for c in k.certificate_chain) for k in keys)
    builder = fb.new_builder(size)
    keys_off = _keys_vector(builder, keys, iteration) if keys else None
    next_off = builder.CreateString(next_req_time)
    m = fb_rsp_keys
    m.ReturnExchangeKeysStart(builder)
    m.ReturnExchangeKeysAddRetcode(builder, fb.int32("retcode", retcode))
    m.ReturnExchangeKeysAddIteration(builder, fb.int32("iteration", iteration))
    if keys_off is not None:
        m.ReturnExchangeKeysAddRemotePublickeys(builder, keys_off)
    m.ReturnExchangeKeysAddNextReqTime(builder, next_off)
    return fb.finish(builder, m.ReturnExchangeKeysEnd(builder))


def encode_get_secrets_response(
    *, retcode: int, iteration: int, shares: Sequence[Share], next_req_time: str
) -> bytes:
    """Encode a ``ReturnShareSecrets`` (getSecrets); ``encrypted_shares`` only when there are shares."""
    builder = fb.new_builder(sum(64 + len(s.share) + len(s.fl_id) for s in shares))
    shares_off = _shares_vector(builder, shares) if shares else None
    next_off = builder.CreateString(next_req_time)
    m = fb_rsp_secrets
    m.ReturnShareSecretsStart(builder)
    m.ReturnShareSecretsAddRetcode(builder, fb.int32("retcode", retcode))
    m.ReturnShareSecretsAddIteration(builder, fb.int32("iteration", iteration))
    if shares_off is not None:
        m.ReturnShareSecretsAddEncryptedShares(builder, shares_off)
    m.ReturnShareSecretsAddNextReqTime(builder, next_off)
    return fb.finish(builder, m.ReturnShareSecretsEnd(builder))


def encode_client_list_response(
    *, retcode: int, reason: str, clients: Sequence[str], iteration: int, next_req_time: str
) -> bytes:
    """Encode a ``ReturnClientList`` (getClientList); ``clients`` always written, as the original."""
    builder = fb.new_builder(sum(8 + len(c) for c in clients) + len(reason) * 4)
    reason_off = builder.CreateString(reason)
    client_offs = [builder.CreateString(fb.limited("client fl_id", c, MAX_FL_ID_BYTES)) for c in clients]
    clients_off = fb.offsets_vector(builder, client_offs)
    next_off = builder.CreateString(next_req_time)
    m = fb_rsp_clients
    m.ReturnClientListStart(builder)
    m.ReturnClientListAddRetcode(builder, fb.int32("retcode", retcode))
    m.ReturnClientListAddReason(builder, reason_off)
    m.ReturnClientListAddClients(builder, clients_off)
    m.ReturnClientListAddIteration(builder, fb.int32("iteration", iteration))
    m.ReturnClientListAddNextReqTime(builder, next_off)
    return fb.finish(builder, m.ReturnClientListEnd(builder))


def encode_list_signs_response(
    *, retcode: int, reason: str, signatures: Sequence[ListSignature], iteration: int, next_req_time: str
) -> bytes:
    """Encode a ``ReturnAllClientListSign`` (getListSign); ``client_list_sign`` only when there are
    signatures, as the original."""
    builder = fb.new_builder(sum(32 + len(x.fl_id) + len(x.signature) for x in signatures) + len(reason) * 4)
    reason_off = builder.CreateString(reason)
    offsets = []
    for x in signatures:
        fl_id = builder.CreateString(fb.limited("list signature fl_id", x.fl_id, MAX_FL_ID_BYTES))
        signature = fb.bytes_vector(builder, x.signature)
        fb_list_sign.ClientListSignStart(builder)
        fb_list_sign.ClientListSignAddFlId(builder, fl_id)
        fb_list_sign.ClientListSignAddSignature(builder, signature)
        offsets.append(fb_list_sign.ClientListSignEnd(builder))
    signs_off = fb.offsets_vector(builder, offsets) if offsets else None
    next_off = builder.CreateString(next_req_time)
    m = fb_rsp_list_signs
    m.ReturnAllClientListSignStart(builder)
    m.ReturnAllClientListSignAddRetcode(builder, fb.int32("retcode", retcode))
    m.ReturnAllClientListSignAddReason(builder, reason_off)
    if signs_off is not None:
        m.ReturnAllClientListSignAddClientListSign(builder, signs_off)
    m.ReturnAllClientListSignAddIteration(builder, fb.int32("iteration", iteration))
    m.ReturnAllClientListSignAddNextReqTime(builder, next_off)
    return fb.finish(builder, m.ReturnAllClientListSignEnd(builder))


def encode_cipher_error(
    round_: CipherRound, *, retcode: int, reason: str, iteration: int, next_req_time: str
) -> bytes:
    """The response table of ``round_`` with ``retcode`` and ``reason`` and nothing else (a refusal).

    The getKeys and getSecrets tables have no reason field: there the retcode alone travels (as the original).
    """
    match round_:
        case (
            CipherRound.EXCHANGE_KEYS
            | CipherRound.SHARE_SECRETS
            | CipherRound.RECONSTRUCT_SECRETS
            | CipherRound.PUSH_LIST_SIGN
        ):
            return _ack(round_, retcode, reason, iteration, next_req_time)
        case CipherRound.GET_LIST_SIGN:
            return encode_list_signs_response(
                retcode=retcode,
                reason=reason,
                signatures=(),
                iteration=iteration,
                next_req_time=next_req_time,
            )
        case CipherRound.GET_KEYS:
            return encode_get_keys_response(
                retcode=retcode, iteration=iteration, keys=(), next_req_time=next_req_time
            )
        case CipherRound.GET_SECRETS:
            return encode_get_secrets_response(
                retcode=retcode, iteration=iteration, shares=(), next_req_time=next_req_time
            )
        case CipherRound.GET_CLIENT_LIST:
            return encode_client_list_response(
                retcode=retcode, reason=reason, clients=(), iteration=iteration, next_req_time=next_req_time
            )
        case _:
            assert_never(round_)


def encode_cipher_answer(answer: CipherAnswer) -> bytes:
    """The response body of what the leader's machine answered (spec/secure-aggregation.md §R5)."""
    a = answer
    next_req_time = str(a.next_req_time_ms)
    match a.round:
        case CipherRound.GET_KEYS:
            return encode_get_keys_response(
                retcode=int(a.retcode), iteration=a.iteration, keys=a.keys, next_req_time=next_req_time
            )
        case CipherRound.GET_SECRETS:
            return encode_get_secrets_response(
                retcode=int(a.retcode), iteration=a.iteration, shares=a.shares, next_req_time=next_req_time
            )
        case CipherRound.GET_CLIENT_LIST:
            return encode_client_list_response(
                retcode=int(a.retcode),
                reason=a.reason,
                clients=a.clients,
                iteration=a.iteration,
                next_req_time=next_req_time,
            )
        case CipherRound.GET_LIST_SIGN:
            return encode_list_signs_response(
                retcode=int(a.retcode),
                reason=a.reason,
                signatures=a.signatures,
                iteration=a.iteration,
                next_req_time=next_req_time,
            )
        case (
            CipherRound.EXCHANGE_KEYS
            | CipherRound.SHARE_SECRETS
            | CipherRound.RECONSTRUCT_SECRETS
            | CipherRound.PUSH_LIST_SIGN
        ):
            return _ack(a.round, int(a.retcode), a.reason, a.iteration, next_req_time)
        case _:
            assert_never(a.round)
