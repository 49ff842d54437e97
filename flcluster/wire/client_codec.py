# mypy: disallow-untyped-calls=False
# (The flatc-generated modules in flcluster.wire.fbs carry no annotations; every value read from them is
# turned into a typed one at the line that reads it.)
"""The device's side of the device protocol: encode the requests, decode the responses.

Theory of operation
-------------------
The mirror of :mod:`flcluster.wire.server_codec`, for the device SDK (flcluster/client/device.py), the
simulator and tests. Encoders write the original's request tables field for field (spec/fl_job.fbs), the
optional vectors only when not empty, as the original's clients do. Decoders run
:func:`flcluster.wire.verify.verify` with the :mod:`flcluster.wire.schema` description first, so a body
that is not the expected table (a plain-text answer, a truncated body, a hostile one) raises
:class:`~flcluster.errors.SchemaError`, never an ``IndexError``; model tensors come back as read-only views
into the body (no copy). Limits are those of :mod:`flcluster.wire.codes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from flcluster.wire import _flatbuf as fb
from flcluster.wire.codes import MAX_FL_ID_BYTES, MAX_FL_NAME_BYTES, MAX_WEIGHT_NAME_BYTES, CompressType
from flcluster.wire.fbs import RequestFLJob as fb_req_fl_job
from flcluster.wire.fbs import RequestGetModel as fb_req_get_model
from flcluster.wire.fbs import RequestUpdateModel as fb_req_update_model
from flcluster.wire.fbs import ResponseFLJob as fb_rsp_fl_job
from flcluster.wire.fbs import ResponseGetModel as fb_rsp_get_model
from flcluster.wire.fbs import ResponseUpdateModel as fb_rsp_update_model
from flcluster.wire.records import (
    CompressFeatureMapView,
    FLPlanParams,
    GetModelResponse,
    StartFLJobResponse,
    UpdateModelResponse,
)
from flcluster.wire.schema import RESPONSE_FL_JOB, RESPONSE_GET_MODEL, RESPONSE_UPDATE_MODEL
from flcluster.wire.verify import verify

__all__ = [
    "decode_get_model_response",
    "decode_start_fl_job_response",
    "decode_update_model_response",
    "encode_get_model_request",
    "encode_start_fl_job_request",
    "encode_update_model_request",
]


def _compress_types_vector(builder: Any, types: Sequence[int]) -> int:
    checked = [fb.byte("download_compress_types entry", t) for t in types]
    return int(builder.CreateNumpyVector(np.asarray(checked, dtype=fb.I8)))


def encode_start_fl_job_request(
    *,
    fl_name: str,
    fl_id: str,
    iteration: int,
    data_size: int,
    timestamp: str,
    download_compress_types: Sequence[int] = (),
    eval_data_size: int = 0,
    sign_data: bytes = b"",
    key_attestation: str = "",
    equip_cert: str = "",
    equip_ca_cert: str = "",
    root_cert: str = "",
) -> bytes:
    """Encode a ``RequestFLJob``, as a device does (the pki fields only when not empty).

    Args:
        fl_name: The job's name.
        fl_id: The device's id.
        iteration: The iteration the device believes is current (not checked by the server).
        data_size: Number of training samples; the FedAvg weight.
        timestamp: Free-form, or epoch milliseconds with pki_verify.
        download_compress_types: The compressions the device can decode.
        eval_data_size: Number of evaluation samples.
        sign_data: pki_verify: signature over (fl_id, timestamp).
        key_attestation: pki_verify.
        equip_cert: pki_verify.
        equip_ca_cert: pki_verify.
        root_cert: pki_verify.

    Returns:
        The body.

    Raises:
        ValueError: A limit or a field width is exceeded.
    """
    fb.limited("fl_name", fl_name, MAX_FL_NAME_BYTES)
    fb.limited("fl_id", fl_id, MAX_FL_ID_BYTES)
    builder = fb.new_builder(
        len(sign_data) + 4 * (len(key_attestation) + len(equip_cert) + len(equip_ca_cert))
    )
    name_off = builder.CreateString(fl_name)
    id_off = builder.CreateString(fl_id)
    timestamp_off = builder.CreateString(timestamp)
    sign_off = fb.bytes_vector(builder, sign_data) if sign_data else None
    pki = [(key_attestation, fb_req_fl_job.RequestFLJobAddKeyAttestation),
           (equip_cert, fb_req_fl_job.RequestFLJobAddEquipCert),
           (equip_ca_cert, fb_req_fl_job.RequestFLJobAddEquipCaCert),
           (root_cert, fb_req_fl_job.RequestFLJobAddRootCert)]  # fmt: skip
    pki_offs = [(builder.CreateString(text), add) for text, add in pki if text]
    types_off = _compress_types_vector(builder, download_compress_types) if download_compress_types else None
    m = fb_req_fl_job
    m.RequestFLJobStart(builder)
    m.RequestFLJobAddFlName(builder, name_off)
    m.RequestFLJobAddFlId(builder, id_off)
    m.RequestFLJobAddIteration(builder, fb.int32("iteration", iteration))
    m.RequestFLJobAddDataSize(builder, fb.int32("data_size", data_size))
    m.RequestFLJobAddTimestamp(builder, timestamp_off)
    if sign_off is not None:
        m.RequestFLJobAddSignData(builder, sign_off)
    for off, add in pki_offs:
        add(builder, off)
    if types_off is not None:
        m.RequestFLJobAddDownloadCompressTypes(builder, types_off)
    m.RequestFLJobAddEvalDataSize(builder, fb.int32("eval_data_size", eval_data_size))
    return fb.finish(builder, m.RequestFLJobEnd(builder))


def encode_update_model_request(
    *,
    fl_name: str,
    fl_id: str,
    iteration: int,
    feature_maps: Sequence[tuple[str, npt.ArrayLike]],
    timestamp: str,
    upload_loss: float = 0.0,
    upload_accuracy: float = 0.0,
    sign: int = 0,
    index_array: Sequence[int] | npt.NDArray[np.int32] = (),
    upload_compress_type: int = CompressType.NO_COMPRESS,
    upload_sparse_rate: float = 0.0,
    name_vec: Sequence[str] = (),
    signature: bytes = b"",
    compress_feature_maps: Sequence[CompressFeatureMapView] = (),
) -> bytes:
    """Encode a ``RequestUpdateModel``, as a device does.

    The feature_map vector is always written (the server requires it with NO_COMPRESS, even empty for SignDS);
    the other vectors only when not empty.

    Args:
        fl_name: The job's name.
        fl_id: The device's id.
        iteration: The iteration this update belongs to.
        feature_maps: (weight name, tensor) pairs, already multiplied by the device's data_size.
        timestamp: Free-form, or epoch milliseconds with pki_verify.
        upload_loss: Training loss, reported in the server's metrics.
        upload_accuracy: Training accuracy.
        sign: SignDS: -1, 0 (dense upload) or +1.
        index_array: SignDS: the selected global indices.
        upload_compress_type: NO_COMPRESS or DIFF_SPARSE_QUANT.
        upload_sparse_rate: DIFF_SPARSE_QUANT: must equal the server's.
        name_vec: DIFF_SPARSE_QUANT: the names of the compressed weights.
        signature: pki_verify: signature over (timestamp, iteration).
        compress_feature_maps: DIFF_SPARSE_QUANT tensors.

    Returns:
        The body.

    Raises:
        ValueError: A limit or a field width is exceeded.
    """
    fb.limited("fl_name", fl_name, MAX_FL_NAME_BYTES)
    fb.limited("fl_id", fl_id, MAX_FL_ID_BYTES)
    maps = fb.prepare_maps("feature_maps", feature_maps)
    cmaps = fb.prepare_compress_maps(compress_feature_maps)
    names = [fb.limited("name_vec entry", n, MAX_WEIGHT_NAME_BYTES) for n in name_vec]
    fb.check_count("name_vec", names)
    indices = np.ascontiguousarray(np.asarray(index_array, dtype=fb.I32).reshape(-1))
    builder = fb.new_builder(fb.payload(maps, cmaps) + indices.nbytes + len(signature) + 1100 * len(names))
    name_off = builder.CreateString(fl_name)
    id_off = builder.CreateString(fl_id)
    timestamp_off = builder.CreateString(timestamp)
    maps_off = fb.build_feature_maps(builder, maps)
    signature_off = fb.bytes_vector(builder, signature) if signature else None
    index_off = builder.CreateNumpyVector(indices) if indices.size else None
    cmaps_off = fb.build_compress_maps(builder, cmaps) if cmaps else None
    names_off = fb.offsets_vector(builder, [builder.CreateString(n) for n in names]) if names else None
    m = fb_req_update_model
    m.RequestUpdateModelStart(builder)
    m.RequestUpdateModelAddFlName(builder, name_off)
    m.RequestUpdateModelAddFlId(builder, id_off)
    m.RequestUpdateModelAddIteration(builder, fb.int32("iteration", iteration))
    m.RequestUpdateModelAddFeatureMap(builder, maps_off)
    m.RequestUpdateModelAddTimestamp(builder, timestamp_off)
    if signature_off is not None:
        m.RequestUpdateModelAddSignature(builder, signature_off)
    m.RequestUpdateModelAddUploadLoss(builder, float(upload_loss))
    m.RequestUpdateModelAddSign(builder, fb.int32("sign", sign))
    if index_off is not None:
        m.RequestUpdateModelAddIndexArray(builder, index_off)
    if cmaps_off is not None:
        m.RequestUpdateModelAddCompressFeatureMap(builder, cmaps_off)
    m.RequestUpdateModelAddUploadCompressType(builder, fb.byte("upload_compress_type", upload_compress_type))
    m.RequestUpdateModelAddUploadSparseRate(builder, float(upload_sparse_rate))
    if names_off is not None:
        m.RequestUpdateModelAddNameVec(builder, names_off)
    m.RequestUpdateModelAddUploadAccuracy(builder, float(upload_accuracy))
    return fb.finish(builder, m.RequestUpdateModelEnd(builder))


def encode_get_model_request(
    *, fl_name: str, iteration: int, timestamp: str, download_compress_types: Sequence[int] = ()
) -> bytes:
    """Encode a ``RequestGetModel``, as a device does.

    Args:
        fl_name: The job's name.
        iteration: The iteration whose aggregated model the device wants.
        timestamp: Free-form.
        download_compress_types: The compressions the device can decode.

    Returns:
        The body.

    Raises:
        ValueError: A limit or a field width is exceeded.
    """
    fb.limited("fl_name", fl_name, MAX_FL_NAME_BYTES)
    builder = fb.new_builder(0)
    name_off = builder.CreateString(fl_name)
    timestamp_off = builder.CreateString(timestamp)
    types_off = _compress_types_vector(builder, download_compress_types) if download_compress_types else None
    m = fb_req_get_model
    m.RequestGetModelStart(builder)
    m.RequestGetModelAddFlName(builder, name_off)
    m.RequestGetModelAddIteration(builder, fb.int32("iteration", iteration))
    m.RequestGetModelAddTimestamp(builder, timestamp_off)
    if types_off is not None:
        m.RequestGetModelAddDownloadCompressTypes(builder, types_off)
    return fb.finish(builder, m.RequestGetModelEnd(builder))


# ----------------------------------------------------------------------------------------------------------
# Device side: decode responses
# ----------------------------------------------------------------------------------------------------------


def _decode_plan(plan: Any) -> FLPlanParams:
    cipher = plan.Cipher()
    pw = dp = ds = None
    if cipher is not None:
        pw, dp, ds = cipher.PwParams(), cipher.DpParams(), cipher.DsParams()
    u8 = np.dtype("u1")
    return FLPlanParams(
        server_mode=fb.as_text(plan.ServerMode()),
        fl_name=fb.as_text(plan.FlName()),
        iterations=int(plan.Iterations()),
        epochs=int(plan.Epochs()),
        mini_batch=int(plan.MiniBatch()),
        lr=float(plan.Lr()),
        encrypt_type=fb.as_text(cipher.EncryptType()) if cipher is not None else "",
        pw_t=int(pw.T()) if pw is not None else 0,
        pw_p=fb.as_view(pw.PAsNumpy(), u8).tobytes() if pw is not None else b"",
        pw_g=int(pw.G()) if pw is not None else 0,
        pw_prime=fb.as_view(pw.PrimeAsNumpy(), u8).tobytes() if pw is not None else b"",
        dp_eps=float(dp.DpEps()) if dp is not None else 0.0,
        dp_delta=float(dp.DpDelta()) if dp is not None else 0.0,
        dp_norm_clip=float(dp.DpNormClip()) if dp is not None else 0.0,
        sign_k=float(ds.SignK()) if ds is not None else 0.0,
        sign_eps=float(ds.SignEps()) if ds is not None else 0.0,
        sign_thr_ratio=float(ds.SignThrRatio()) if ds is not None else 0.0,
        sign_global_lr=float(ds.SignGlobalLr()) if ds is not None else 0.0,
        sign_dim_out=int(ds.SignDimOut()) if ds is not None else 0,
    )


def decode_start_fl_job_response(body: bytes) -> StartFLJobResponse:
    """Decode a ``ResponseFLJob`` (device side); tensors are read-only views into ``body``.

    Args:
        body: The raw response body (a plain-text safemode answer is not a FlatBuffer and raises).

    Returns:
        The response; absent fields read as empty, 0 or ``None`` (fl_plan).

    Raises:
        SchemaError: The body is not a well-formed ResponseFLJob or breaks a limit.
    """
    verify(body, RESPONSE_FL_JOB)
    rsp = fb_rsp_fl_job.ResponseFLJob.GetRootAs(body, 0)
    plan = rsp.FlPlanConfig()
    return StartFLJobResponse(
        retcode=int(rsp.Retcode()),
        reason=fb.as_text(rsp.Reason()),
        iteration=int(rsp.Iteration()),
        is_selected=bool(rsp.IsSelected()),
        next_req_time=fb.as_text(rsp.NextReqTime()),
        fl_plan=None if plan is None else _decode_plan(plan),
        feature_maps=fb.read_feature_maps(rsp.FeatureMapLength(), rsp.FeatureMap),
        timestamp=fb.as_text(rsp.Timestamp()),
        upload_compress_type=int(rsp.UploadCompressType()),
        upload_sparse_rate=float(rsp.UploadSparseRate()),
        download_compress_type=int(rsp.DownloadCompressType()),
        compress_feature_maps=fb.read_compress_feature_maps(
            rsp.CompressFeatureMapLength(), rsp.CompressFeatureMap
        ),
    )


def decode_update_model_response(body: bytes) -> UpdateModelResponse:
    """Decode a ``ResponseUpdateModel`` (device side).

    Args:
        body: The raw response body.

    Returns:
        The response.

    Raises:
        SchemaError: The body is not a well-formed ResponseUpdateModel.
    """
    verify(body, RESPONSE_UPDATE_MODEL)
    rsp = fb_rsp_update_model.ResponseUpdateModel.GetRootAs(body, 0)
    return UpdateModelResponse(
        retcode=int(rsp.Retcode()),
        reason=fb.as_text(rsp.Reason()),
        next_req_time=fb.as_text(rsp.NextReqTime()),
        timestamp=fb.as_text(rsp.Timestamp()),
    )


def decode_get_model_response(body: bytes) -> GetModelResponse:
    """Decode a ``ResponseGetModel`` (device side); tensors are read-only views into ``body``.

    Args:
        body: The raw response body.

    Returns:
        The response.

    Raises:
        SchemaError: The body is not a well-formed ResponseGetModel or breaks a limit.
    """
    verify(body, RESPONSE_GET_MODEL)
    rsp = fb_rsp_get_model.ResponseGetModel.GetRootAs(body, 0)
    return GetModelResponse(
        retcode=int(rsp.Retcode()),
        reason=fb.as_text(rsp.Reason()),
        iteration=int(rsp.Iteration()),
        feature_maps=fb.read_feature_maps(rsp.FeatureMapLength(), rsp.FeatureMap),
        timestamp=fb.as_text(rsp.Timestamp()),
        download_compress_type=int(rsp.DownloadCompressType()),
        compress_feature_maps=fb.read_compress_feature_maps(
            rsp.CompressFeatureMapLength(), rsp.CompressFeatureMap
        ),
    )
