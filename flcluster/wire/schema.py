"""What the verifier checks in each device-protocol table (spec/fl_job.fbs, spec/cipher.fbs).

Theory of operation
-------------------
One :class:`~flcluster.wire.verify.Table` per FlatBuffers table the codecs read, listing exactly the fields
they then read, in slot order (a FlatBuffers field is its position). :func:`~flcluster.wire.verify.verify`
walks a body against one of these before any accessor touches it, so the codecs only ever meet
bounds-checked, aligned, UTF-8-valid data. Fields the codecs never read are :meth:`Field.unread` and never
checked. The limits are those of :mod:`flcluster.wire.codes`; tests/unit/test_fbs_generated.py holds every
description against the .fbs files, slot for slot.
"""

from __future__ import annotations

from flcluster.wire.codes import (
    MAX_CERTIFICATE_BYTES,
    MAX_CERTIFICATES,
    MAX_CIPHER_CLIENTS,
    MAX_COMPRESS_TYPES,
    MAX_FEATURE_MAPS,
    MAX_FL_ID_BYTES,
    MAX_FL_NAME_BYTES,
    MAX_IV_BYTES,
    MAX_KEY_BYTES,
    MAX_SALT_BYTES,
    MAX_SHARE_BYTES,
    MAX_SHARES,
    MAX_SIGNATURE_BYTES,
    MAX_WEIGHT_NAME_BYTES,
)
from flcluster.wire.verify import Field, Table

__all__ = [
    "CIPHER_PUBLIC_PARAMS",
    "CIPHER_TABLES",
    "CLIENT_LIST_SIGN",
    "CLIENT_PUBLIC_KEYS",
    "CLIENT_SHARE",
    "COMPRESS_FEATURE_MAP",
    "DP_PARAMS",
    "DS_PARAMS",
    "FEATURE_MAP",
    "FL_PLAN",
    "GET_CLIENT_LIST",
    "GET_EXCHANGE_KEYS",
    "GET_SHARE_SECRETS",
    "PW_PARAMS",
    "RECONSTRUCT_SECRET",
    "REQUEST_ALL_CLIENT_LIST_SIGN",
    "REQUEST_EXCHANGE_KEYS",
    "REQUEST_FL_JOB",
    "REQUEST_GET_MODEL",
    "REQUEST_SHARE_SECRETS",
    "REQUEST_UPDATE_MODEL",
    "RESPONSE_CLIENT_LIST_SIGN",
    "RESPONSE_EXCHANGE_KEYS",
    "RESPONSE_FL_JOB",
    "RESPONSE_GET_MODEL",
    "RESPONSE_SHARE_SECRETS",
    "RESPONSE_UPDATE_MODEL",
    "RETURN_ALL_CLIENT_LIST_SIGN",
    "RETURN_CLIENT_LIST",
    "RETURN_EXCHANGE_KEYS",
    "RETURN_SHARE_SECRETS",
    "SEND_CLIENT_LIST_SIGN",
    "SEND_RECONSTRUCT_SECRET",
    "TABLES",
]


_S, _V, _T = Field.scalar, Field.vector, Field.tables

FEATURE_MAP = Table("FeatureMap", (Field.string("weight_fullname", MAX_WEIGHT_NAME_BYTES), _V("data", 4)))
COMPRESS_FEATURE_MAP = Table(
    "CompressFeatureMap",
    (
        Field.string("weight_fullname", MAX_WEIGHT_NAME_BYTES),
        _V("compress_data", 1),
        _S("min_val", 4),
        _S("max_val", 4),
    ),
)
PW_PARAMS = Table("PWParams", (_S("t", 4), _V("p", 1), _S("g", 4), _V("prime", 1)))
DP_PARAMS = Table("DPParams", (_S("dp_eps", 4), _S("dp_delta", 4), _S("dp_norm_clip", 4)))
DS_PARAMS = Table(
    "DSParams",
    (
        _S("sign_k", 4),
        _S("sign_eps", 4),
        _S("sign_thr_ratio", 4),
        _S("sign_global_lr", 4),
        _S("sign_dim_out", 4),
    ),
)
CIPHER_PUBLIC_PARAMS = Table(
    "CipherPublicParams",
    (
        Field.string("encrypt_type"),
        Field.child("pw_params", PW_PARAMS),
        Field.child("dp_params", DP_PARAMS),
        Field.child("ds_params", DS_PARAMS),
    ),
)
FL_PLAN = Table(
    "FLPlan",
    (
        Field.string("server_mode"),
        Field.string("fl_name", MAX_FL_NAME_BYTES),
        _S("iterations", 4),
        _S("epochs", 4),
        Field.unread("early_stop"),
        _S("mini_batch", 4),
        _S("shuffle", 1),
        _S("lr", 4),
        Field.unread("aggregation"),
        Field.unread("metrics"),
        Field.child("cipher", CIPHER_PUBLIC_PARAMS),
    ),
)
REQUEST_FL_JOB = Table(
    "RequestFLJob",
    (
        Field.string("fl_name", MAX_FL_NAME_BYTES),
        Field.string("fl_id", MAX_FL_ID_BYTES),
        _S("iteration", 4),
        _S("data_size", 4),
        Field.string("timestamp"),
        _V("sign_data", 1),
        Field.string("key_attestation"),
        Field.string("equip_cert"),
        Field.string("equip_ca_cert"),
        Field.string("root_cert"),
        _V("download_compress_types", 1, MAX_COMPRESS_TYPES),
        _S("eval_data_size", 4),
    ),
)
RESPONSE_FL_JOB = Table(
    "ResponseFLJob",
    (
        _S("retcode", 4),
        Field.string("reason"),
        _S("iteration", 4),
        _S("is_selected", 1),
        Field.string("next_req_time"),
        Field.child("fl_plan_config", FL_PLAN),
        _T("feature_map", FEATURE_MAP, MAX_FEATURE_MAPS),
        Field.string("timestamp"),
        _S("upload_compress_type", 1),
        _S("upload_sparse_rate", 4),
        _S("download_compress_type", 1),
        _T("compress_feature_map", COMPRESS_FEATURE_MAP, MAX_FEATURE_MAPS),
    ),
)
REQUEST_UPDATE_MODEL = Table(
    "RequestUpdateModel",
    (
        Field.string("fl_name", MAX_FL_NAME_BYTES),
        Field.string("fl_id", MAX_FL_ID_BYTES),
        _S("iteration", 4),
        _T("feature_map", FEATURE_MAP, MAX_FEATURE_MAPS),
        Field.string("timestamp"),
        _V("signature", 1),
        _S("upload_loss", 4),
        _S("sign", 4),
        _V("index_array", 4),
        _T("compress_feature_map", COMPRESS_FEATURE_MAP, MAX_FEATURE_MAPS),
        _S("upload_compress_type", 1),
        _S("upload_sparse_rate", 4),
        Field.strings("name_vec", MAX_FEATURE_MAPS, MAX_WEIGHT_NAME_BYTES),
        _S("upload_accuracy", 4),
    ),
)
RESPONSE_UPDATE_MODEL = Table(
    "ResponseUpdateModel",
    (
        _S("retcode", 4),
        Field.string("reason"),
        Field.unread("feature_map"),
        Field.string("next_req_time"),
        Field.string("timestamp"),
    ),
)
REQUEST_GET_MODEL = Table(
    "RequestGetModel",
    (
        Field.string("fl_name", MAX_FL_NAME_BYTES),
        _S("iteration", 4),
        Field.string("timestamp"),
        _V("download_compress_types", 1, MAX_COMPRESS_TYPES),
    ),
)
RESPONSE_GET_MODEL = Table(
    "ResponseGetModel",
    (
        _S("retcode", 4),
        Field.string("reason"),
        _S("iteration", 4),
        _T("feature_map", FEATURE_MAP, MAX_FEATURE_MAPS),
        Field.string("timestamp"),
        _S("download_compress_type", 1),
        _T("compress_feature_map", COMPRESS_FEATURE_MAP, MAX_FEATURE_MAPS),
    ),
)

# ---- the secure-aggregation tables (spec/cipher.fbs; limits: spec/secure-aggregation.md §R7) ----

_FL_ID = Field.string("fl_id", MAX_FL_ID_BYTES)
_SIGNATURE = _V("signature", 1, MAX_SIGNATURE_BYTES)
_CERTIFICATES = Field.strings("certificate_chain", MAX_CERTIFICATES, MAX_CERTIFICATE_BYTES)

CLIENT_SHARE = Table("ClientShare", (_FL_ID, _V("share", 1, MAX_SHARE_BYTES), _S("index", 4)))
CLIENT_PUBLIC_KEYS = Table(
    "ClientPublicKeys",
    (
        _FL_ID,
        _V("c_pk", 1, MAX_KEY_BYTES),
        _V("s_pk", 1, MAX_KEY_BYTES),
        _V("pw_iv", 1, MAX_IV_BYTES),
        _V("pw_salt", 1, MAX_SALT_BYTES),
        # Relayed with the list signatures (spec/secure-aggregation.md §R8.1).
        Field.string("timestamp"),
        _S("iteration", 4),
        _SIGNATURE,
        _CERTIFICATES,
    ),
)
REQUEST_EXCHANGE_KEYS = Table(
    "RequestExchangeKeys",
    (
        _FL_ID,
        _V("c_pk", 1, MAX_KEY_BYTES),
        _V("s_pk", 1, MAX_KEY_BYTES),
        _S("iteration", 4),
        Field.string("timestamp"),
        _V("ind_iv", 1, MAX_IV_BYTES),
        _V("pw_iv", 1, MAX_IV_BYTES),
        _V("pw_salt", 1, MAX_SALT_BYTES),
        _SIGNATURE,
        _CERTIFICATES,
    ),
)
RESPONSE_EXCHANGE_KEYS = Table(
    "ResponseExchangeKeys",
    (_S("retcode", 4), Field.string("reason"), Field.string("next_req_time"), _S("iteration", 4)),
)
_FETCH_FIELDS = (_FL_ID, _S("iteration", 4), Field.string("timestamp"), _SIGNATURE)
GET_EXCHANGE_KEYS = Table("GetExchangeKeys", _FETCH_FIELDS)
RETURN_EXCHANGE_KEYS = Table(
    "ReturnExchangeKeys",
    (
        _S("retcode", 4),
        _S("iteration", 4),
        _T("remote_publickeys", CLIENT_PUBLIC_KEYS, MAX_CIPHER_CLIENTS),
        Field.string("next_req_time"),
    ),
)
REQUEST_SHARE_SECRETS = Table(
    "RequestShareSecrets",
    (
        _FL_ID,
        _T("encrypted_shares", CLIENT_SHARE, MAX_SHARES),
        _S("iteration", 4),
        Field.string("timestamp"),
        _SIGNATURE,
    ),
)
RESPONSE_SHARE_SECRETS = Table(
    "ResponseShareSecrets",
    (_S("retcode", 4), Field.string("reason"), Field.string("next_req_time"), _S("iteration", 4)),
)
GET_SHARE_SECRETS = Table("GetShareSecrets", _FETCH_FIELDS)
RETURN_SHARE_SECRETS = Table(
    "ReturnShareSecrets",
    (
        _S("retcode", 4),
        _S("iteration", 4),
        _T("encrypted_shares", CLIENT_SHARE, MAX_SHARES),
        Field.string("next_req_time"),
    ),
)
GET_CLIENT_LIST = Table("GetClientList", _FETCH_FIELDS)
RETURN_CLIENT_LIST = Table(
    "ReturnClientList",
    (
        _S("retcode", 4),
        Field.string("reason"),
        Field.strings("clients", MAX_CIPHER_CLIENTS, MAX_FL_ID_BYTES),
        _S("iteration", 4),
        Field.string("next_req_time"),
    ),
)
CLIENT_LIST_SIGN = Table("ClientListSign", (_FL_ID, _SIGNATURE))
SEND_CLIENT_LIST_SIGN = Table(
    "SendClientListSign",
    (
        _FL_ID,
        _S("iteration", 4),
        Field.string("timestamp"),
        _SIGNATURE,
        _V("req_signature", 1, MAX_SIGNATURE_BYTES),
    ),
)
RESPONSE_CLIENT_LIST_SIGN = Table(
    "ResponseClientListSign",
    (_S("retcode", 4), Field.string("reason"), _S("iteration", 4), Field.string("next_req_time")),
)
REQUEST_ALL_CLIENT_LIST_SIGN = Table("RequestAllClientListSign", _FETCH_FIELDS)
RETURN_ALL_CLIENT_LIST_SIGN = Table(
    "ReturnAllClientListSign",
    (
        _S("retcode", 4),
        Field.string("reason"),
        _T("client_list_sign", CLIENT_LIST_SIGN, MAX_CIPHER_CLIENTS),
        _S("iteration", 4),
        Field.string("next_req_time"),
    ),
)
SEND_RECONSTRUCT_SECRET = Table(
    "SendReconstructSecret",
    (
        _FL_ID,
        _T("reconstruct_secret_shares", CLIENT_SHARE, MAX_SHARES),
        _S("iteration", 4),
        Field.string("timestamp"),
        _SIGNATURE,
    ),
)
RECONSTRUCT_SECRET = Table(
    "ReconstructSecret",
    (_S("retcode", 4), Field.string("reason"), _S("iteration", 4), Field.string("next_req_time")),
)

#: The secure-aggregation descriptions (also in :data:`TABLES`).
CIPHER_TABLES: tuple[Table, ...] = (
    CLIENT_SHARE, CLIENT_PUBLIC_KEYS, REQUEST_EXCHANGE_KEYS, RESPONSE_EXCHANGE_KEYS, GET_EXCHANGE_KEYS,
    RETURN_EXCHANGE_KEYS, REQUEST_SHARE_SECRETS, RESPONSE_SHARE_SECRETS, GET_SHARE_SECRETS,
    RETURN_SHARE_SECRETS, GET_CLIENT_LIST, RETURN_CLIENT_LIST, SEND_RECONSTRUCT_SECRET, RECONSTRUCT_SECRET,
    CLIENT_LIST_SIGN, SEND_CLIENT_LIST_SIGN, RESPONSE_CLIENT_LIST_SIGN, REQUEST_ALL_CLIENT_LIST_SIGN,
    RETURN_ALL_CLIENT_LIST_SIGN,
)  # fmt: skip

#: Every description above, for tests that hold them against the schema files.
TABLES: tuple[Table, ...] = (
    FEATURE_MAP, COMPRESS_FEATURE_MAP, PW_PARAMS, DP_PARAMS, DS_PARAMS, CIPHER_PUBLIC_PARAMS, FL_PLAN,
    REQUEST_FL_JOB, RESPONSE_FL_JOB, REQUEST_UPDATE_MODEL, RESPONSE_UPDATE_MODEL, REQUEST_GET_MODEL,
    RESPONSE_GET_MODEL, *CIPHER_TABLES,
)  # fmt: skip
