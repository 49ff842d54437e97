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
    MAX_COMPRESS_TYPES,
    MAX_FEATURE_MAPS,
    MAX_FL_ID_BYTES,
    MAX_FL_NAME_BYTES,
    MAX_WEIGHT_NAME_BYTES,
)
from flcluster.wire.verify import Field, Table

__all__ = [
    "CIPHER_PUBLIC_PARAMS",
    "COMPRESS_FEATURE_MAP",
    "DP_PARAMS",
    "DS_PARAMS",
    "FEATURE_MAP",
    "FL_PLAN",
    "PW_PARAMS",
    "REQUEST_FL_JOB",
    "REQUEST_GET_MODEL",
    "REQUEST_UPDATE_MODEL",
    "RESPONSE_FL_JOB",
    "RESPONSE_GET_MODEL",
    "RESPONSE_UPDATE_MODEL",
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

#: Every description above, for tests that hold them against the schema files.
TABLES: tuple[Table, ...] = (
    FEATURE_MAP, COMPRESS_FEATURE_MAP, PW_PARAMS, DP_PARAMS, DS_PARAMS, CIPHER_PUBLIC_PARAMS, FL_PLAN,
    REQUEST_FL_JOB, RESPONSE_FL_JOB, REQUEST_UPDATE_MODEL, RESPONSE_UPDATE_MODEL, REQUEST_GET_MODEL,
    RESPONSE_GET_MODEL,
)  # fmt: skip
