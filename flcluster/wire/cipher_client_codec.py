# mypy: disallow-untyped-calls=False
# (The flatc-generated modules in flcluster.wire.fbs carry no annotations.)
"""The device's side of the secure-aggregation rounds: encode the requests, decode the answers.

Theory of operation
-------------------
The mirror of :mod:`flcluster.wire.cipher_server_codec`, for the device SDK (flcluster/client/cipher.py), the
simulator and tests. Encoders write the request tables as the original's Java client does (the pki fields,
signature and certificate chain, only when given). Decoders run :func:`flcluster.wire.verify.verify` first,
with a larger object budget than the Server's (an answer lists every device of the iteration), so a body that
is not the expected table raises :class:`~flcluster.errors.SchemaError`, never an ``IndexError``. Limits are
those of :mod:`flcluster.wire.codes` (spec/secure-aggregation.md §R7).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flcluster.core.cipher import DeviceKeys, ListSignature, Share
from flcluster.errors import SchemaError
from flcluster.wire import _flatbuf as fb
from flcluster.wire.cipher_records import (
    CipherAck,
    ClientListResponse,
    KeysResponse,
    ListSignsResponse,
    SecretsResponse,
)
from flcluster.wire.codes import (
    MAX_CERTIFICATE_BYTES,
    MAX_CERTIFICATES,
    MAX_FL_ID_BYTES,
    MAX_IV_BYTES,
    MAX_KEY_BYTES,
    MAX_SALT_BYTES,
    MAX_SHARE_BYTES,
    MAX_SHARES,
    MAX_SIGNATURE_BYTES,
    CipherRound,
)
from flcluster.wire.fbs import ClientShare as fb_share
from flcluster.wire.fbs import GetClientList as fb_get_clients
from flcluster.wire.fbs import GetExchangeKeys as fb_get_keys
from flcluster.wire.fbs import GetShareSecrets as fb_get_secrets
from flcluster.wire.fbs import RequestAllClientListSign as fb_get_list_signs
from flcluster.wire.fbs import RequestExchangeKeys as fb_req_exchange
from flcluster.wire.fbs import RequestShareSecrets as fb_req_share
from flcluster.wire.fbs import SendClientListSign as fb_push_list_sign
from flcluster.wire.fbs import SendReconstructSecret as fb_req_reconstruct
from flcluster.wire.schema import (
    RECONSTRUCT_SECRET,
    RESPONSE_CLIENT_LIST_SIGN,
    RESPONSE_EXCHANGE_KEYS,
    RESPONSE_SHARE_SECRETS,
    RETURN_ALL_CLIENT_LIST_SIGN,
    RETURN_CLIENT_LIST,
    RETURN_EXCHANGE_KEYS,
    RETURN_SHARE_SECRETS,
)
from flcluster.wire.verify import Verified, verify

__all__ = [
    "ANSWER_MAX_OBJECTS",
    "decode_ack",
    "decode_client_list_response",
    "decode_get_keys_response",
    "decode_get_secrets_response",
    "decode_list_signs_response",
    "encode_exchange_keys_request",
    "encode_fetch_request",
    "encode_push_list_sign_request",
    "encode_shares_request",
]

#: Objects a device's decoder visits at most in one answer (every device of U1 costs 6 in getKeys).
ANSWER_MAX_OBJECTS = 200_000


def _vector(builder: Any, name: str, data: bytes, limit: int) -> int:
    if len(data) > limit:
        raise ValueError(f"{name} may hold at most {limit} bytes, got {len(data)}")
    return fb.bytes_vector(builder, data)


def _signature(builder: Any, signature: bytes) -> int | None:
    return _vector(builder, "signature", signature, MAX_SIGNATURE_BYTES) if signature else None


def encode_exchange_keys_request(
    *,
    keys: DeviceKeys,
    iteration: int,
    timestamp: str,
    signature: bytes = b"",
    certificate_chain: Sequence[str] = (),
) -> bytes:
    """Encode a ``RequestExchangeKeys`` (an empty ``c_pk`` is left out: STABLE_PW_ENCRYPT).

    Raises:
        ValueError: a limit or a field width is exceeded.
    """
    if len(certificate_chain) > MAX_CERTIFICATES:
        raise ValueError(f"certificate_chain may hold at most {MAX_CERTIFICATES} entries")
    builder = fb.new_builder(512 + len(signature) + sum(len(c) for c in certificate_chain))
    fl_id = builder.CreateString(fb.limited("fl_id", keys.fl_id, MAX_FL_ID_BYTES))
    c_pk = _vector(builder, "c_pk", keys.c_pk, MAX_KEY_BYTES) if keys.c_pk else None
    s_pk = _vector(builder, "s_pk", keys.s_pk, MAX_KEY_BYTES)
    timestamp_off = builder.CreateString(timestamp)
    ind_iv = _vector(builder, "ind_iv", keys.ind_iv, MAX_IV_BYTES)
    pw_iv = _vector(builder, "pw_iv", keys.pw_iv, MAX_IV_BYTES)
    pw_salt = _vector(builder, "pw_salt", keys.pw_salt, MAX_SALT_BYTES)
    signature_off = _signature(builder, signature)
    chain_off = None
    if certificate_chain:
        chain = [
            builder.CreateString(fb.limited("certificate", c, MAX_CERTIFICATE_BYTES))
            for c in certificate_chain
        ]
        chain_off = fb.offsets_vector(builder, chain)
    m = fb_req_exchange
    m.RequestExchangeKeysStart(builder)
    m.RequestExchangeKeysAddFlId(builder, fl_id)
    if c_pk is not None:
        m.RequestExchangeKeysAddCPk(builder, c_pk)
    m.RequestExchangeKeysAddSPk(builder, s_pk)
    m.RequestExchangeKeysAddIteration(builder, fb.int32("iteration", iteration))
    m.RequestExchangeKeysAddTimestamp(builder, timestamp_off)
    m.RequestExchangeKeysAddIndIv(builder, ind_iv)
    m.RequestExchangeKeysAddPwIv(builder, pw_iv)
    m.RequestExchangeKeysAddPwSalt(builder, pw_salt)
    if signature_off is not None:
        m.RequestExchangeKeysAddSignature(builder, signature_off)
    if chain_off is not None:
        m.RequestExchangeKeysAddCertificateChain(builder, chain_off)
    return fb.finish(builder, m.RequestExchangeKeysEnd(builder))


def encode_fetch_request(
    round_: CipherRound, *, fl_id: str, iteration: int, timestamp: str, signature: bytes = b""
) -> bytes:
    """Encode a ``GetExchangeKeys`` / ``GetShareSecrets`` / ``GetClientList`` / ``RequestAllClientListSign``
    (round getKeys / getSecrets / getClientList / getListSign).

    Raises:
        ValueError: a limit or a field width is exceeded, or ``round_`` is not a fetch round.
    """
    tables = {
        CipherRound.GET_KEYS: (fb_get_keys, "GetExchangeKeys"),
        CipherRound.GET_SECRETS: (fb_get_secrets, "GetShareSecrets"),
        CipherRound.GET_CLIENT_LIST: (fb_get_clients, "GetClientList"),
        CipherRound.GET_LIST_SIGN: (fb_get_list_signs, "RequestAllClientListSign"),
    }
    if round_ not in tables:
        raise ValueError(f"{round_!r} is not a fetch round (getKeys, getSecrets, getClientList, getListSign)")
    module, name = tables[round_]
    builder = fb.new_builder(len(signature))
    id_off = builder.CreateString(fb.limited("fl_id", fl_id, MAX_FL_ID_BYTES))
    timestamp_off = builder.CreateString(timestamp)
    signature_off = _signature(builder, signature)
    getattr(module, f"{name}Start")(builder)
    getattr(module, f"{name}AddFlId")(builder, id_off)
    getattr(module, f"{name}AddIteration")(builder, fb.int32("iteration", iteration))
    getattr(module, f"{name}AddTimestamp")(builder, timestamp_off)
    if signature_off is not None:
        getattr(module, f"{name}AddSignature")(builder, signature_off)
    return fb.finish(builder, getattr(module, f"{name}End")(builder))


def encode_push_list_sign_request(
    *, fl_id: str, iteration: int, timestamp: str, signature: bytes, req_signature: bytes = b""
) -> bytes:
    """Encode a ``SendClientListSign`` (pushListSign, spec/secure-aggregation.md §R8.2): the list signature
    and the request signature (each left out when empty).

    Raises:
        ValueError: a limit or a field width is exceeded.
    """
    builder = fb.new_builder(128 + len(signature) + len(req_signature))
    id_off = builder.CreateString(fb.limited("fl_id", fl_id, MAX_FL_ID_BYTES))
    timestamp_off = builder.CreateString(timestamp)
    signature_off = _signature(builder, signature)
    req_off = _vector(builder, "req_signature", req_signature, MAX_SIGNATURE_BYTES) if req_signature else None
    m = fb_push_list_sign
    m.SendClientListSignStart(builder)
    m.SendClientListSignAddFlId(builder, id_off)
    m.SendClientListSignAddIteration(builder, fb.int32("iteration", iteration))
    m.SendClientListSignAddTimestamp(builder, timestamp_off)
    if signature_off is not None:
        m.SendClientListSignAddSignature(builder, signature_off)
    if req_off is not None:
        m.SendClientListSignAddReqSignature(builder, req_off)
    return fb.finish(builder, m.SendClientListSignEnd(builder))


def encode_shares_request(
    round_: CipherRound,
    *,
    fl_id: str,
    iteration: int,
    timestamp: str,
    shares: Sequence[Share],
    signature: bytes = b"",
) -> bytes:
    """Encode a ``RequestShareSecrets`` (shareSecrets) or ``SendReconstructSecret`` (reconstructSecrets).

    Raises:
        ValueError: a limit or a field width is exceeded, or ``round_`` is neither round.
    """
    if round_ is CipherRound.SHARE_SECRETS:
        module: Any = fb_req_share
        name, add_shares = "RequestShareSecrets", "AddEncryptedShares"
    elif round_ is CipherRound.RECONSTRUCT_SECRETS:
        module, name, add_shares = fb_req_reconstruct, "SendReconstructSecret", "AddReconstructSecretShares"
    else:
        raise ValueError(f"{round_!r} sends no shares (shareSecrets, reconstructSecrets)")
    if len(shares) > MAX_SHARES:
        raise ValueError(f"a request may hold at most {MAX_SHARES} shares, got {len(shares)}")
    builder = fb.new_builder(sum(64 + len(s.share) + len(s.fl_id) for s in shares) + len(signature))
    id_off = builder.CreateString(fb.limited("fl_id", fl_id, MAX_FL_ID_BYTES))
    offsets = []
    for share in shares:
        owner = builder.CreateString(fb.limited("share fl_id", share.fl_id, MAX_FL_ID_BYTES))
        data = _vector(builder, "share", share.share, MAX_SHARE_BYTES)
        fb_share.ClientShareStart(builder)
        fb_share.ClientShareAddFlId(builder, owner)
        fb_share.ClientShareAddShare(builder, data)
        fb_share.ClientShareAddIndex(builder, fb.int32("share index", share.index))
        offsets.append(fb_share.ClientShareEnd(builder))
    shares_off = fb.offsets_vector(builder, offsets)
    timestamp_off = builder.CreateString(timestamp)
    signature_off = _signature(builder, signature)
    getattr(module, f"{name}Start")(builder)
    getattr(module, f"{name}AddFlId")(builder, id_off)
    getattr(module, f"{name}{add_shares}")(builder, shares_off)
    getattr(module, f"{name}AddIteration")(builder, fb.int32("iteration", iteration))
    getattr(module, f"{name}AddTimestamp")(builder, timestamp_off)
    if signature_off is not None:
        getattr(module, f"{name}AddSignature")(builder, signature_off)
    return fb.finish(builder, getattr(module, f"{name}End")(builder))


# ----------------------------------------------------------------------------------------------------------
# Decoding the answers
# ----------------------------------------------------------------------------------------------------------


def _bytes(body: bytes, found: tuple[int, int] | None) -> bytes:
    return b"" if found is None else bytes(body[found[0] : found[0] + found[1]])


def _share(body: bytes, entry: Verified) -> Share:
    return Share(entry.string(0) or "", _bytes(body, entry.vector(1)), int(entry.scalar(2, fb.I32_FMT, 0)))


def decode_ack(round_: CipherRound, body: bytes) -> CipherAck:
    """Decode a ``ResponseExchangeKeys`` / ``ResponseShareSecrets`` / ``ReconstructSecret`` /
    ``ResponseClientListSign``.

    Raises:
        SchemaError: the body is not that table; ValueError: ``round_`` has no such table.
    """
    if round_ is CipherRound.EXCHANGE_KEYS:
        root = verify(body, RESPONSE_EXCHANGE_KEYS)
        slots = (0, 1, 3, 2)
    elif round_ is CipherRound.SHARE_SECRETS:
        root = verify(body, RESPONSE_SHARE_SECRETS)
        slots = (0, 1, 3, 2)
    elif round_ is CipherRound.RECONSTRUCT_SECRETS:
        root = verify(body, RECONSTRUCT_SECRET)
        slots = (0, 1, 2, 3)
    elif round_ is CipherRound.PUSH_LIST_SIGN:
        root = verify(body, RESPONSE_CLIENT_LIST_SIGN)
        slots = (0, 1, 2, 3)
    else:
        raise ValueError(f"{round_!r} answers with no acknowledgement table")
    retcode, reason, iteration, next_req_time = slots
    return CipherAck(
        retcode=int(root.scalar(retcode, fb.I32_FMT, 0)),
        reason=root.string(reason) or "",
        iteration=int(root.scalar(iteration, fb.I32_FMT, 0)),
        next_req_time=root.string(next_req_time) or "",
    )


def decode_get_keys_response(body: bytes) -> KeysResponse:
    """Decode a ``ReturnExchangeKeys`` (getKeys).

    Raises:
        SchemaError: the body is not that table, breaks a limit, or lists a key without fl_id.
    """
    root = verify(body, RETURN_EXCHANGE_KEYS, max_objects=ANSWER_MAX_OBJECTS)
    keys = []
    for i, entry in enumerate(root.tables(2) or ()):
        fl_id = entry.string(0)
        if fl_id is None:
            raise SchemaError("The schema of ReturnExchangeKeys is invalid.", f"key {i} has no fl_id")
        keys.append(
            DeviceKeys(
                fl_id=fl_id,
                c_pk=_bytes(body, entry.vector(1)),
                s_pk=_bytes(body, entry.vector(2)),
                ind_iv=b"",
                pw_iv=_bytes(body, entry.vector(3)),
                pw_salt=_bytes(body, entry.vector(4)),
                timestamp=entry.string(5) or "",
                signature=_bytes(body, entry.vector(7)),
                certificate_chain=entry.strings(8) or (),
            )
        )
    return KeysResponse(
        retcode=int(root.scalar(0, fb.I32_FMT, 0)),
        iteration=int(root.scalar(1, fb.I32_FMT, 0)),
        keys=tuple(keys),
        next_req_time=root.string(3) or "",
    )


def decode_get_secrets_response(body: bytes) -> SecretsResponse:
    """Decode a ``ReturnShareSecrets`` (getSecrets).

    Raises:
        SchemaError: the body is not that table or breaks a limit.
    """
    root = verify(body, RETURN_SHARE_SECRETS, max_objects=ANSWER_MAX_OBJECTS)
    return SecretsResponse(
        retcode=int(root.scalar(0, fb.I32_FMT, 0)),
        iteration=int(root.scalar(1, fb.I32_FMT, 0)),
        shares=tuple(_share(body, entry) for entry in root.tables(2) or ()),
        next_req_time=root.string(3) or "",
    )


def decode_client_list_response(body: bytes) -> ClientListResponse:
    """Decode a ``ReturnClientList`` (getClientList).

    Raises:
        SchemaError: the body is not that table or breaks a limit.
    """
    root = verify(body, RETURN_CLIENT_LIST, max_objects=ANSWER_MAX_OBJECTS)
    return ClientListResponse(
        retcode=int(root.scalar(0, fb.I32_FMT, 0)),
        reason=root.string(1) or "",
        clients=root.strings(2) or (),
        iteration=int(root.scalar(3, fb.I32_FMT, 0)),
        next_req_time=root.string(4) or "",
    )


def decode_list_signs_response(body: bytes) -> ListSignsResponse:
    """Decode a ``ReturnAllClientListSign`` (getListSign).

    Raises:
        SchemaError: the body is not that table, breaks a limit, or lists a signature without fl_id.
    """
    root = verify(body, RETURN_ALL_CLIENT_LIST_SIGN, max_objects=ANSWER_MAX_OBJECTS)
    signatures = []
    for i, entry in enumerate(root.tables(2) or ()):
        fl_id = entry.string(0)
        if fl_id is None:
            raise SchemaError(
                "The schema of ReturnAllClientListSign is invalid.", f"signature {i} has no fl_id"
            )
        signatures.append(ListSignature(fl_id, _bytes(body, entry.vector(1))))
    return ListSignsResponse(
        retcode=int(root.scalar(0, fb.I32_FMT, 0)),
        reason=root.string(1) or "",
        signatures=tuple(signatures),
        iteration=int(root.scalar(3, fb.I32_FMT, 0)),
        next_req_time=root.string(4) or "",
    )
