"""The decoded device-protocol bodies as frozen records (spec/device-protocol.md, "Wire schema").

Theory of operation
-------------------
One record per FlatBuffers table a device or a Server reads: the requests of /startFLJob, /updateModel and
/getModel (:class:`StartFLJobRequest`, :class:`UpdateModelRequest`, :class:`GetModelRequest`), their
responses, the named tensors they carry (:class:`FeatureMapView`, :class:`CompressFeatureMapView`) and the
training plan a Server sends (:class:`FLPlanParams`). The codecs (:mod:`flcluster.wire.server_codec`,
:mod:`flcluster.wire.client_codec`) make them; nothing here reads or writes bytes.

Model tensors are not copied: when decoded, :attr:`FeatureMapView.data` is a read-only little-endian
float32 numpy view into the body, which it keeps alive. ``torch.from_numpy`` / ``torch.as_tensor`` wrap it
without a copy but emit a UserWarning that the array is read-only (an error under pytest's
``filterwarnings = error``): wrap it inside ``warnings.catch_warnings()`` and never write through the
tensor, or copy it. Arrays compare by dtype and values, and print as ``<float32[n]>``.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from flcluster.wire.codes import CompressType

__all__ = [
    "CompressFeatureMapView",
    "FLPlanParams",
    "FeatureMapView",
    "FloatArray",
    "GetModelRequest",
    "GetModelResponse",
    "StartFLJobRequest",
    "StartFLJobResponse",
    "UpdateModelRequest",
    "UpdateModelResponse",
]

FloatArray = npt.NDArray[np.float32]
_I32 = np.dtype("<i4")


def _array_eq(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> bool:
    return bool(a.dtype == b.dtype and np.array_equal(a, b))


def _array_repr(a: npt.NDArray[Any]) -> str:
    return f"<{a.dtype.name}[{a.size}]>"


@attrs.frozen
class FeatureMapView:
    """One named model tensor, flattened.

    Attributes:
        name: The weight's full name (``FeatureMap.weight_fullname``).
        data: Little-endian float32 values; when decoded, a read-only view into the body (no copy).
    """

    name: str
    data: FloatArray = attrs.field(eq=attrs.cmp_using(eq=_array_eq), hash=False, repr=_array_repr)


@attrs.frozen
class CompressFeatureMapView:
    """One tensor quantised to int8, with the range it was quantised from (QUANT / DIFF_SPARSE_QUANT).

    Attributes:
        name: The weight's full name.
        data: int8 values; when decoded, a read-only view into the body.
        min_val: Smallest value of the original tensor.
        max_val: Largest value of the original tensor.
    """

    name: str
    data: npt.NDArray[np.int8] = attrs.field(eq=attrs.cmp_using(eq=_array_eq), hash=False, repr=_array_repr)
    min_val: float = 0.0
    max_val: float = 0.0


@attrs.frozen
class FLPlanParams:
    """The training plan sent in ``ResponseFLJob.fl_plan_config``: the fields the original server fills.

    Defaults are the original's FLContext defaults. ``pw_p`` (32 bytes, unused) and ``pw_prime`` (33 bytes)
    are always sent, as the original sends them, even when no pairwise masking is configured.
    """

    server_mode: str = "FEDERATED_LEARNING"
    fl_name: str = ""
    iterations: int = 20
    epochs: int = 25
    mini_batch: int = 32
    lr: float = 0.001
    encrypt_type: str = "NOT_ENCRYPT"
    pw_t: int = 2000
    pw_p: bytes = bytes(32)
    pw_g: int = 1
    pw_prime: bytes = bytes(33)
    dp_eps: float = 50.0
    dp_delta: float = 0.01
    dp_norm_clip: float = 1.0
    sign_k: float = 0.01
    sign_eps: float = 100.0
    sign_thr_ratio: float = 0.6
    sign_global_lr: float = 1.0
    sign_dim_out: int = 0


@attrs.frozen
class StartFLJobRequest:
    """A decoded ``RequestFLJob`` (``/startFLJob``). Absent optional fields read as empty or 0."""

    fl_name: str
    fl_id: str
    iteration: int
    data_size: int
    timestamp: str
    download_compress_types: tuple[int, ...] = ()
    eval_data_size: int = 0
    sign_data: bytes = b""
    key_attestation: str = ""
    equip_cert: str = ""
    equip_ca_cert: str = ""
    root_cert: str = ""


@attrs.frozen
class UpdateModelRequest:
    """A decoded ``RequestUpdateModel`` (``/updateModel``); tensors are views into the body."""

    fl_name: str
    fl_id: str
    iteration: int
    feature_maps: tuple[FeatureMapView, ...]
    timestamp: str
    upload_loss: float = 0.0
    upload_accuracy: float = 0.0
    sign: int = 0
    index_array: npt.NDArray[np.int32] = attrs.field(
        factory=lambda: np.empty(0, _I32), eq=attrs.cmp_using(eq=_array_eq), hash=False, repr=_array_repr
    )
    upload_compress_type: int = CompressType.NO_COMPRESS
    upload_sparse_rate: float = 0.0
    name_vec: tuple[str, ...] = ()
    signature: bytes = b""
    compress_feature_maps: tuple[CompressFeatureMapView, ...] = ()


@attrs.frozen
class GetModelRequest:
    """A decoded ``RequestGetModel`` (``/getModel``)."""

    fl_name: str
    iteration: int
    timestamp: str
    download_compress_types: tuple[int, ...] = ()


@attrs.frozen
class StartFLJobResponse:
    """A decoded ``ResponseFLJob``; ``fl_plan`` is ``None`` when the server sent none."""

    retcode: int
    reason: str
    iteration: int
    is_selected: bool
    next_req_time: str
    fl_plan: FLPlanParams | None
    feature_maps: tuple[FeatureMapView, ...]
    timestamp: str = ""
    upload_compress_type: int = CompressType.NO_COMPRESS
    upload_sparse_rate: float = 0.0
    download_compress_type: int = CompressType.NO_COMPRESS
    compress_feature_maps: tuple[CompressFeatureMapView, ...] = ()


@attrs.frozen
class UpdateModelResponse:
    """A decoded ``ResponseUpdateModel``."""

    retcode: int
    reason: str
    next_req_time: str
    timestamp: str = ""


@attrs.frozen
class GetModelResponse:
    """A decoded ``ResponseGetModel``; ``timestamp`` carries the next_req_time, as the original sends it."""

    retcode: int
    reason: str
    iteration: int
    feature_maps: tuple[FeatureMapView, ...]
    timestamp: str
    download_compress_type: int = CompressType.NO_COMPRESS
    compress_feature_maps: tuple[CompressFeatureMapView, ...] = ()
