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
    "EMPTY_BODY_MESSAGE",
    "JOB_NOT_AVAILABLE_TEXT",
    "MAX_COMPRESS_TYPES",
    "MAX_FEATURE_MAPS",
    "MAX_FL_ID_BYTES",
    "MAX_FL_NAME_BYTES",
    "MAX_SIGNDS_INDICES",
    "MAX_WEIGHT_NAME_BYTES",
    "NOT_READY_TEXT",
    "SAFEMODE_TEXT",
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
