"""The device protocol's constants in one place: return codes, compressions, plain texts, rounds, limits.

Theory of operation
-------------------
Everything a device and a Server must agree on that is not a FlatBuffers table lives here, once
(spec/device-protocol.md, "Endpoints and answers" and "Wire schema"): the ``retcode`` values
(:class:`ResponseCode`, spelled as spec/fl_job.fbs spells them), the ``CompressType`` bytes, the exact
plain-text bodies a Server sends instead of a FlatBuffer (:class:`ServerText`; devices tell them apart by
comparing the whole body, so a changed character breaks every client), the names of the device rounds
(:class:`DeviceRound`, the last part of each URL) and the size limits the codecs enforce.

This module imports only the standard library, so the sans-IO core (``flcluster/core/``), the codecs
(``flcluster/wire/``), the HTTP layer and the device SDK all take their constants from here without
pulling FlatBuffers, numpy or torch in.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "CIPHER_ROUNDS_PW",
    "CIPHER_ROUNDS_PW_LIST_SIGN",
    "CIPHER_ROUNDS_STABLE_PW",
    "EMPTY_BODY_MESSAGE",
    "IV_BYTES",
    "JOB_NOT_AVAILABLE_TEXT",
    "KEY_BYTES",
    "MAX_CERTIFICATES",
    "MAX_CERTIFICATE_BYTES",
    "MAX_CIPHER_CLIENTS",
    "MAX_COMPRESS_TYPES",
    "MAX_FEATURE_MAPS",
    "MAX_FL_ID_BYTES",
    "MAX_FL_NAME_BYTES",
    "MAX_IV_BYTES",
    "MAX_KEY_BYTES",
    "MAX_SALT_BYTES",
    "MAX_SHARES",
    "MAX_SHARE_BYTES",
    "MAX_SIGNATURE_BYTES",
    "MAX_SIGNDS_INDICES",
    "MAX_WEIGHT_NAME_BYTES",
    "NOT_READY_TEXT",
    "SAFEMODE_TEXT",
    "SALT_BYTES",
    "CipherRound",
    "CompressType",
    "DeviceRound",
    "ResponseCode",
    "ServerText",
]


class ResponseCode(enum.IntEnum):
    """Values of the ``retcode`` fields (spec/fl_job.fbs ``ResponseCode``; reference §2.3).

    The spelling is the schema's. A Server sends SUCCEED, SucNotReady, OutOfTime, RequestError and
    SystemError; the others are in the schema and a device must know them.
    """

    SUCCEED = 200
    SucNotReady = 201
    RepeatRequest = 202
    SucNotMatch = 204
    OutOfTime = 300
    NotSelected = 301
    RequestError = 400
    SystemError = 500


class CompressType(enum.IntEnum):
    """Values of the ``CompressType`` byte fields (spec/fl_job.fbs ``CompressType``)."""

    NO_COMPRESS = 0
    DIFF_SPARSE_QUANT = 1
    QUANT = 2


#: Plain-text body while the cluster is between iterations (reference §2.1, §3.1). Clients match it.
SAFEMODE_TEXT: Final = "The cluster is in safemode."
#: Plain-text body while the instance is disabled or finished (reference §2.1). Clients match it.
JOB_NOT_AVAILABLE_TEXT: Final = "The server's training job is disabled or finished."
#: Plain-text body of a Server with no job to serve yet (reference §2.1). Clients match it.
NOT_READY_TEXT: Final = "The server's training job is not ready."
#: ``error_message`` of the original's HTTP 500 JSON answer to an empty device request body.
EMPTY_BODY_MESSAGE: Final = "Get post message failed"


class ServerText(enum.StrEnum):
    """The plain-text answers a Server sends instead of a FlatBuffer, always with HTTP 200.

    The values are the exact bodies (UTF-8); a body is one of these only if it equals the value byte for byte.
    """

    NOT_READY = NOT_READY_TEXT
    SAFEMODE = SAFEMODE_TEXT
    DISABLED_OR_FINISHED = JOB_NOT_AVAILABLE_TEXT


class DeviceRound(enum.StrEnum):
    """The device rounds every Server serves, by the last part of their URL (``<http_url_prefix>/<round>``).

    The secure-aggregation rounds (``exchangeKeys``, ``getKeys``, ...) join the device app's route table
    beside these when they are configured (flcluster/http/device.py).
    """

    START_FL_JOB = "startFLJob"
    UPDATE_MODEL = "updateModel"
    GET_MODEL = "getModel"


#: Longest fl_id accepted, in UTF-8 bytes.
MAX_FL_ID_BYTES: Final = 256
#: Longest fl_name accepted, in UTF-8 bytes.
MAX_FL_NAME_BYTES: Final = 256
#: Most feature maps (and compressed feature maps, and name_vec entries) in one body.
MAX_FEATURE_MAPS: Final = 4096
#: Longest weight name (FeatureMap / CompressFeatureMap weight_fullname, name_vec entries), in UTF-8 bytes.
MAX_WEIGHT_NAME_BYTES: Final = 1024
#: A device lists the compressions it can decode; there are three, so a long list is an attack.
MAX_COMPRESS_TYPES: Final = 16
#: Most entries of a SignDS ``index_array`` (the original Server's limit; spec/privacy.md §3.3).
MAX_SIGNDS_INDICES: Final = 100


class CipherRound(enum.StrEnum):
    """The secure-aggregation rounds (spec/secure-aggregation.md §R1), by the last part of their URL.

    They join the device app's route table only when ``encrypt_type`` runs them
    (:data:`CIPHER_ROUNDS_PW`, :data:`CIPHER_ROUNDS_PW_LIST_SIGN`, :data:`CIPHER_ROUNDS_STABLE_PW`).
    """

    EXCHANGE_KEYS = "exchangeKeys"
    GET_KEYS = "getKeys"
    SHARE_SECRETS = "shareSecrets"
    GET_SECRETS = "getSecrets"
    GET_CLIENT_LIST = "getClientList"
    RECONSTRUCT_SECRETS = "reconstructSecrets"
    #: The list signatures of PW_ENCRYPT under ``pki_verify`` (spec/secure-aggregation.md §R8).
    PUSH_LIST_SIGN = "pushListSign"
    GET_LIST_SIGN = "getListSign"


#: The cipher rounds of PW_ENCRYPT, in the device's order.
CIPHER_ROUNDS_PW: Final = (
    CipherRound.EXCHANGE_KEYS,
    CipherRound.GET_KEYS,
    CipherRound.SHARE_SECRETS,
    CipherRound.GET_SECRETS,
    CipherRound.GET_CLIENT_LIST,
    CipherRound.RECONSTRUCT_SECRETS,
)
#: The cipher rounds of PW_ENCRYPT with ``pki_verify``: the list signatures before reconstructSecrets.
CIPHER_ROUNDS_PW_LIST_SIGN: Final = (
    *CIPHER_ROUNDS_PW[:5],
    CipherRound.PUSH_LIST_SIGN,
    CipherRound.GET_LIST_SIGN,
    CipherRound.RECONSTRUCT_SECRETS,
)
#: The cipher rounds of STABLE_PW_ENCRYPT (keys only).
CIPHER_ROUNDS_STABLE_PW: Final = (CipherRound.EXCHANGE_KEYS, CipherRound.GET_KEYS)

# Limits of the cipher bodies (spec/secure-aggregation.md §R7): the decoders' bounds, then the leader's rules.
#: Longest ``c_pk`` / ``s_pk`` a decoder accepts, in bytes.
MAX_KEY_BYTES: Final = 256
#: Longest ``ind_iv`` / ``pw_iv`` / ``pw_salt`` a decoder accepts, in bytes.
MAX_IV_BYTES: Final = 64
MAX_SALT_BYTES: Final = 64
#: Longest ``signature`` / ``req_signature`` a decoder accepts, in bytes (pki_verify, §R8).
MAX_SIGNATURE_BYTES: Final = 1024
#: Most ``certificate_chain`` entries, and the longest one, in UTF-8 bytes (pki_verify, §R8.1).
MAX_CERTIFICATES: Final = 8
MAX_CERTIFICATE_BYTES: Final = 16 * 1024
#: Most shares in one request or answer.
MAX_SHARES: Final = 16_384
#: Longest ``ClientShare.share``, in bytes.
MAX_SHARE_BYTES: Final = 1024
#: Most keys, client ids or list signatures in one answer.
MAX_CIPHER_CLIENTS: Final = 16_384
#: The exact length of an X25519 public key (raw), the only one the leader takes.
KEY_BYTES: Final = 32
#: The exact length of ``ind_iv`` and ``pw_iv`` (one AES block), the only one the leader takes.
IV_BYTES: Final = 16
#: The exact length of ``pw_salt`` the leader takes (the original's devices send 32; unmasking needs it).
SALT_BYTES: Final = 32
