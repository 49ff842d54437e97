# mypy: disallow-untyped-calls=False
"""Device-protocol codecs and the FlatBuffers verifier (spec/device-protocol.md, "Wire schema").

Round trips of every request and response, zero-copy model views, bodies built directly with the
flatc-generated builders (as a device built against the original would build them), the limits, the
required-field rules, and a hypothesis fuzz: random bytes, truncations and mutations of valid bodies either
decode or raise SchemaError.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import Any, cast

import flatbuffers
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flcluster.errors import ProtocolError
from flcluster.wire import client_codec, codes, records, schema, server_codec
from flcluster.wire.fbs import FeatureMap as fb_feature_map
from flcluster.wire.fbs import RequestFLJob as fb_req_fl_job
from flcluster.wire.fbs import RequestUpdateModel as fb_req_update_model
from flcluster.wire.fbs import ResponseFLJob as fb_rsp_fl_job
from flcluster.wire.verify import Field, SchemaError, Table, verify

LENET = [
    ("conv1.weight", 450),
    ("conv2.weight", 2400),
    ("fc1.weight", 48000),
    ("fc2.weight", 10080),
    ("fc3.weight", 5208),
    ("fc1.bias", 120),
    ("fc2.bias", 84),
    ("fc3.bias", 62),
]


def lenet_maps(seed: int = 0) -> list[tuple[str, np.ndarray[Any, Any]]]:
    rng = np.random.default_rng(seed)
    return [(name, rng.standard_normal(n).astype(np.float32)) for name, n in LENET]


def assert_maps_equal(
    views: tuple[records.FeatureMapView, ...], maps: list[tuple[str, np.ndarray[Any, Any]]]
) -> None:
    assert [v.name for v in views] == [name for name, _ in maps]
    for view, (_, data) in zip(views, maps, strict=True):
        assert view.data.dtype == np.dtype("<f4")
        np.testing.assert_array_equal(view.data, data)


def assert_zero_copy(views: tuple[records.FeatureMapView, ...], body: bytes) -> None:
    whole = np.frombuffer(body, dtype=np.uint8)
    for view in views:
        base: object = view.data.base
        assert base is body
        assert np.shares_memory(view.data, whole)
        assert not view.data.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            view.data[0] = 1.0


# ----------------------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------------------


def test_start_fl_job_request_round_trip_with_every_field() -> None:
    body = client_codec.encode_start_fl_job_request(
        fl_name="lenet",
        fl_id="f" * codes.MAX_FL_ID_BYTES,
        iteration=7,
        data_size=32,
        timestamp="1668000000000",
        download_compress_types=[codes.CompressType.NO_COMPRESS, codes.CompressType.QUANT],
        eval_data_size=16,
        sign_data=b"\x00\x01\xfe\xff",
        key_attestation="ka",
        equip_cert="ec",
        equip_ca_cert="eca",
        root_cert="rc",
    )
    assert server_codec.decode_start_fl_job(body) == records.StartFLJobRequest(
        fl_name="lenet",
        fl_id="f" * 256,
        iteration=7,
        data_size=32,
        timestamp="1668000000000",
        download_compress_types=(0, 2),
        eval_data_size=16,
        sign_data=b"\x00\x01\xfe\xff",
        key_attestation="ka",
        equip_cert="ec",
        equip_ca_cert="eca",
        root_cert="rc",
    )


def test_start_fl_job_request_minimal_reads_defaults() -> None:
    body = client_codec.encode_start_fl_job_request(
        fl_name="j", fl_id="é-device", iteration=0, data_size=1, timestamp=""
    )
    assert server_codec.decode_start_fl_job(body) == records.StartFLJobRequest(
        fl_name="j", fl_id="é-device", iteration=0, data_size=1, timestamp=""
    )


def test_update_model_request_round_trip_lenet_zero_copy() -> None:
    maps = lenet_maps()
    body = client_codec.encode_update_model_request(
        fl_name="lenet",
        fl_id="device-1",
        iteration=3,
        feature_maps=maps,
        timestamp="2020/11/16/19/18",
        upload_loss=0.25,
        upload_accuracy=0.75,
        signature=b"sig",
    )
    assert 66404 * 4 < len(body) < 66404 * 4 + 2048
    req = server_codec.decode_update_model(body)
    assert (req.fl_name, req.fl_id, req.iteration, req.timestamp) == (
        "lenet",
        "device-1",
        3,
        "2020/11/16/19/18",
    )
    assert (req.upload_loss, req.upload_accuracy, req.signature) == (0.25, 0.75, b"sig")
    assert (req.sign, req.index_array.size, req.name_vec, req.compress_feature_maps) == (0, 0, (), ())
    assert req.upload_compress_type == codes.CompressType.NO_COMPRESS
    assert_maps_equal(req.feature_maps, maps)
    assert_zero_copy(req.feature_maps, body)
    assert sum(v.data.size for v in req.feature_maps) == 66404


def test_update_model_request_round_trip_signds_and_compression_fields() -> None:
    cmaps = (records.CompressFeatureMapView("fc1.weight", np.arange(-5, 5, dtype=np.int8), -1.5, 2.5),)
    body = client_codec.encode_update_model_request(
        fl_name="lenet",
        fl_id="d",
        iteration=1,
        feature_maps=[],
        timestamp="t",
        sign=-1,
        index_array=[3, 99, 65000],
        upload_compress_type=codes.CompressType.DIFF_SPARSE_QUANT,
        upload_sparse_rate=0.4,
        name_vec=["fc1.weight", "fc2.weight"],
        compress_feature_maps=cmaps,
    )
    req = server_codec.decode_update_model(body)
    assert req.sign == -1
    assert req.index_array.tolist() == [3, 99, 65000] and not req.index_array.flags.writeable
    assert req.upload_compress_type == codes.CompressType.DIFF_SPARSE_QUANT
    assert req.upload_sparse_rate == pytest.approx(0.4)
    assert req.name_vec == ("fc1.weight", "fc2.weight")
    assert req.compress_feature_maps == cmaps
    assert req.feature_maps == ()


def test_get_model_request_round_trip() -> None:
    body = client_codec.encode_get_model_request(
        fl_name="lenet", iteration=5, timestamp="ts", download_compress_types=[2]
    )
    assert server_codec.decode_get_model(body) == records.GetModelRequest(
        fl_name="lenet", iteration=5, timestamp="ts", download_compress_types=(2,)
    )
    bare = client_codec.encode_get_model_request(fl_name="", iteration=-1, timestamp="")
    assert server_codec.decode_get_model(bare) == records.GetModelRequest(
        fl_name="", iteration=-1, timestamp=""
    )


def test_start_fl_job_response_round_trip_with_plan_and_lenet() -> None:
    maps = lenet_maps(1)
    plan = records.FLPlanParams(
        fl_name="lenet",
        iterations=25,
        epochs=1,
        mini_batch=16,
        lr=0.01,
        encrypt_type="PW_ENCRYPT",
        pw_t=3,
        pw_prime=bytes(range(33)),
    )
    body = server_codec.encode_start_fl_job_response(
        retcode=codes.ResponseCode.SUCCEED,
        reason="success",
        iteration=4,
        is_selected=True,
        next_req_time="1668000060000",
        fl_plan=plan,
        feature_maps=maps,
        upload_compress_type=codes.CompressType.DIFF_SPARSE_QUANT,
        upload_sparse_rate=0.5,
    )
    rsp = client_codec.decode_start_fl_job_response(body)
    assert (rsp.retcode, rsp.reason, rsp.iteration, rsp.is_selected) == (200, "success", 4, True)
    assert (rsp.next_req_time, rsp.timestamp) == ("1668000060000", "")
    assert (rsp.upload_compress_type, rsp.upload_sparse_rate, rsp.download_compress_type) == (1, 0.5, 0)
    assert rsp.compress_feature_maps == ()
    assert_maps_equal(rsp.feature_maps, maps)
    assert_zero_copy(rsp.feature_maps, body)
    got = rsp.fl_plan
    assert got is not None
    floats = (
        "lr",
        "dp_eps",
        "dp_delta",
        "dp_norm_clip",
        "sign_k",
        "sign_eps",
        "sign_thr_ratio",
        "sign_global_lr",
    )
    for name in floats:  # float32 on the wire
        assert getattr(got, name) == pytest.approx(getattr(plan, name), rel=1e-6), name
    exact = {f for f in records.FLPlanParams.__attrs_attrs__.__dict__} - set(floats)
    for name in exact:
        assert getattr(got, name) == getattr(plan, name), name
    assert (len(got.pw_p), len(got.pw_prime), got.pw_g) == (32, 33, 1)


def test_start_fl_job_response_without_plan_and_with_quantised_maps() -> None:
    cmaps = [records.CompressFeatureMapView("conv1.weight", np.full(450, -128, dtype=np.int8), 0.0, 1.0)]
    body = server_codec.encode_start_fl_job_response(
        retcode=codes.ResponseCode.OutOfTime,
        reason="Current amount for startFLJob has reached the threshold. Please startFLJob later.",
        iteration=2,
        is_selected=False,
        next_req_time="123",
        fl_plan=None,
        feature_maps=[],
        timestamp="now",
        download_compress_type=codes.CompressType.QUANT,
        compress_feature_maps=cmaps,
    )
    rsp = client_codec.decode_start_fl_job_response(body)
    assert rsp == records.StartFLJobResponse(
        retcode=300,
        reason="Current amount for startFLJob has reached the threshold. Please startFLJob later.",
        iteration=2,
        is_selected=False,
        next_req_time="123",
        fl_plan=None,
        feature_maps=(),
        timestamp="now",
        download_compress_type=2,
        compress_feature_maps=tuple(cmaps),
    )
    base: object = rsp.compress_feature_maps[0].data.base
    assert base is body


def test_update_model_response_round_trip() -> None:
    body = server_codec.encode_update_model_response(
        retcode=200, reason="success not ready", next_req_time="99"
    )
    assert client_codec.decode_update_model_response(body) == records.UpdateModelResponse(
        200, "success not ready", "99", ""
    )
    body = server_codec.encode_update_model_response(
        retcode=400, reason="bad", next_req_time="", timestamp="ts"
    )
    assert client_codec.decode_update_model_response(body) == records.UpdateModelResponse(
        400, "bad", "", "ts"
    )


def test_get_model_response_round_trip_lenet() -> None:
    maps = lenet_maps(2)
    body = server_codec.encode_get_model_response(
        retcode=codes.ResponseCode.SUCCEED,
        reason="Get model for iteration 3",
        iteration=4,
        feature_maps=maps,
        timestamp="9",
    )
    rsp = client_codec.decode_get_model_response(body)
    assert (rsp.retcode, rsp.reason, rsp.iteration, rsp.timestamp) == (
        200,
        "Get model for iteration 3",
        4,
        "9",
    )
    assert (rsp.download_compress_type, rsp.compress_feature_maps) == (0, ())
    assert_maps_equal(rsp.feature_maps, maps)
    assert_zero_copy(rsp.feature_maps, body)


def test_encoders_flatten_and_convert_tensors() -> None:
    body = server_codec.encode_get_model_response(
        retcode=200,
        reason="",
        iteration=0,
        timestamp="",
        feature_maps=[
            ("w", np.arange(6, dtype=np.float64).reshape(2, 3)),
            ("b", [1.5, -2.0]),
            ("e", np.empty(0)),
        ],
    )
    rsp = client_codec.decode_get_model_response(body)
    assert [v.data.tolist() for v in rsp.feature_maps] == [[0, 1, 2, 3, 4, 5], [1.5, -2.0], []]
    assert not any(v.data.flags.writeable for v in rsp.feature_maps)


def test_decoders_accept_a_bytearray_and_keep_views_read_only() -> None:
    body = bytearray(
        server_codec.encode_get_model_response(
            retcode=200, reason="", iteration=0, timestamp="", feature_maps=[("w", [1.0])]
        )
    )
    view = (
        client_codec.decode_get_model_response(cast(bytes, body)).feature_maps[0].data
    )  # any bytes-like body works
    assert not view.flags.writeable
    assert np.shares_memory(view, np.frombuffer(body, dtype=np.uint8))


def test_encoders_write_each_tensor_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = flatbuffers.Builder.CreateNumpyVector

    def spy(self: Any, x: np.ndarray[Any, Any]) -> Any:
        calls.append(x.size)
        return original(self, x)

    def forbidden(*args: object) -> None:
        raise AssertionError("a float was written one element at a time")

    monkeypatch.setattr(flatbuffers.Builder, "CreateNumpyVector", spy)
    monkeypatch.setattr(flatbuffers.Builder, "PrependFloat32", forbidden)
    server_codec.encode_start_fl_job_response(
        retcode=200,
        reason="",
        iteration=0,
        is_selected=True,
        next_req_time="",
        fl_plan=None,
        feature_maps=lenet_maps(),
    )
    assert calls == [n for _, n in LENET]


def test_response_codes_and_compress_types_match_the_schema() -> None:
    assert {c.name: c.value for c in codes.ResponseCode} == {
        "SUCCEED": 200,
        "SucNotReady": 201,
        "RepeatRequest": 202,
        "SucNotMatch": 204,
        "OutOfTime": 300,
        "NotSelected": 301,
        "RequestError": 400,
        "SystemError": 500,
    }
    assert [(c.name, c.value) for c in codes.CompressType] == [
        ("NO_COMPRESS", 0),
        ("DIFF_SPARSE_QUANT", 1),
        ("QUANT", 2),
    ]


# ----------------------------------------------------------------------------------------------------------
# Bodies built with the generated builders, as a device built against the original builds them
# ----------------------------------------------------------------------------------------------------------


def raw_start_fl_job(
    *,
    fl_name: str | None = "j",
    fl_id: str | bytes | None = "d",
    timestamp: str | None = "t",
    identifier: bool = False,
) -> bytes:
    b = flatbuffers.Builder(256)
    offs = {
        k: b.CreateString(v) for k, v in (("n", fl_name), ("i", fl_id), ("t", timestamp)) if v is not None
    }
    m = fb_req_fl_job
    m.RequestFLJobStart(b)
    if "n" in offs:
        m.RequestFLJobAddFlName(b, offs["n"])
    if "i" in offs:
        m.RequestFLJobAddFlId(b, offs["i"])
    m.RequestFLJobAddDataSize(b, 10)
    if "t" in offs:
        m.RequestFLJobAddTimestamp(b, offs["t"])
    b.Finish(m.RequestFLJobEnd(b), file_identifier=b"FLJ0" if identifier else None)
    return bytes(b.Output())


def raw_update_model(
    maps: list[tuple[str | None, list[float] | None]] | None,
    *,
    upload_loss: float = 0.0,
    upload_accuracy: float = 0.0,
    upload_compress_type: int = 0,
) -> bytes:
    b = flatbuffers.Builder(1024)
    fl_id, timestamp = b.CreateString("d"), b.CreateString("t")
    vec = None
    if maps is not None:
        offsets = []
        for name, data in maps:
            name_off = b.CreateString(name) if name is not None else None
            data_off = b.CreateNumpyVector(np.asarray(data, np.float32)) if data is not None else None
            fb_feature_map.FeatureMapStart(b)
            if name_off is not None:
                fb_feature_map.FeatureMapAddWeightFullname(b, name_off)
            if data_off is not None:
                fb_feature_map.FeatureMapAddData(b, data_off)
            offsets.append(fb_feature_map.FeatureMapEnd(b))
        b.StartVector(4, len(offsets), 4)
        for off in reversed(offsets):
            b.PrependUOffsetTRelative(off)
        vec = b.EndVector()
    m = fb_req_update_model
    m.RequestUpdateModelStart(b)
    m.RequestUpdateModelAddFlId(b, fl_id)
    if vec is not None:
        m.RequestUpdateModelAddFeatureMap(b, vec)
    m.RequestUpdateModelAddTimestamp(b, timestamp)
    m.RequestUpdateModelAddUploadLoss(b, upload_loss)
    m.RequestUpdateModelAddUploadAccuracy(b, upload_accuracy)
    m.RequestUpdateModelAddUploadCompressType(b, upload_compress_type)
    b.Finish(m.RequestUpdateModelEnd(b))
    return bytes(b.Output())


def test_generated_readers_read_what_the_codecs_write() -> None:
    body = server_codec.encode_start_fl_job_response(
        retcode=200,
        reason="success",
        iteration=1,
        is_selected=True,
        next_req_time="5",
        fl_plan=records.FLPlanParams(fl_name="lenet", encrypt_type="DP_ENCRYPT"),
        feature_maps=[("w", [1.0, 2.0])],
    )
    rsp = fb_rsp_fl_job.ResponseFLJob.GetRootAs(body, 0)
    plan = rsp.FlPlanConfig()
    assert (rsp.Retcode(), rsp.IsSelected(), plan.FlName(), plan.Epochs()) == (200, True, b"lenet", 25)
    cipher = plan.Cipher()
    assert cipher.EncryptType() == b"DP_ENCRYPT"
    assert (cipher.PwParams().PrimeLength(), cipher.PwParams().PLength(), cipher.DpParams().DpEps()) == (
        33,
        32,
        50.0,
    )
    assert rsp.FeatureMap(0).DataAsNumpy().tolist() == [1.0, 2.0]
    assert not fb_rsp_fl_job.ResponseFLJob.ResponseFLJobBufferHasIdentifier(
        body, 0
    )  # like the original server


def test_decoders_accept_bodies_with_the_file_identifier() -> None:
    assert server_codec.decode_start_fl_job(raw_start_fl_job(identifier=True)).data_size == 10
    assert server_codec.decode_start_fl_job(raw_start_fl_job(identifier=False)).data_size == 10


# ----------------------------------------------------------------------------------------------------------
# Required fields (the original's second check)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["fl_name", "fl_id", "timestamp"])
def test_start_fl_job_without_a_required_field(missing: str) -> None:
    absent: dict[str, Any] = {missing: None}
    body = raw_start_fl_job(**absent)
    with pytest.raises(SchemaError) as info:
        server_codec.decode_start_fl_job(body)
    assert info.value.reason == "Verify flatbuffers schema failed for RequestFLJob."
    assert missing in info.value.detail


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (raw_update_model(None), "feature_map absent"),
        (raw_update_model([("w", None)]), "feature_map[0]"),
        (raw_update_model([(None, [1.0])]), "feature_map[0]"),
        (raw_update_model([("w", [1.0])], upload_loss=math.nan), "upload_loss"),
        (raw_update_model([("w", [1.0])], upload_accuracy=math.inf), "upload_accuracy"),
        (raw_update_model([("w", [1.0])], upload_compress_type=1), "compress_feature_map absent"),
    ],
)
def test_update_model_required_field_rules(body: bytes, why: str) -> None:
    with pytest.raises(SchemaError) as info:
        server_codec.decode_update_model(body)
    assert info.value.reason == "Verify flatbuffers schema failed for RequestUpdateModel."
    assert why in info.value.detail


def test_update_model_with_an_empty_feature_map_vector_is_accepted() -> None:
    assert server_codec.decode_update_model(raw_update_model([])).feature_maps == ()


# ----------------------------------------------------------------------------------------------------------
# Limits
# ----------------------------------------------------------------------------------------------------------


def test_limits_are_accepted_exactly_and_refused_one_past() -> None:
    ok = server_codec.decode_start_fl_job(raw_start_fl_job(fl_name="n" * 256, fl_id="i" * 256))
    assert (len(ok.fl_name), len(ok.fl_id)) == (256, 256)
    for kwargs in ({"fl_name": "n" * 257}, {"fl_id": "i" * 257}, {"fl_id": "é" * 129}):
        with pytest.raises(
            SchemaError, match=r"The schema of RequestFLJob is invalid\. .*at most 256 allowed"
        ):
            server_codec.decode_start_fl_job(raw_start_fl_job(**kwargs))  # type: ignore[arg-type]
    assert (
        len(server_codec.decode_update_model(raw_update_model([("x" * 1024, [0.0])])).feature_maps[0].name)
        == 1024
    )
    with pytest.raises(SchemaError, match="weight_fullname: 1025 bytes, at most 1024"):
        server_codec.decode_update_model(raw_update_model([("x" * 1025, [0.0])]))


def test_feature_map_count_limit() -> None:
    maps: list[tuple[str | None, list[float] | None]] = [(f"w{i}", [float(i)]) for i in range(4096)]
    assert len(server_codec.decode_update_model(raw_update_model(maps)).feature_maps) == 4096
    with pytest.raises(SchemaError, match="feature_map: 4097 elements, at most 4096"):
        server_codec.decode_update_model(raw_update_model([*maps, ("w", [0.0])]))


@pytest.mark.parametrize(
    ("encode", "match"),
    [
        (
            lambda: client_codec.encode_start_fl_job_request(
                fl_name="n", fl_id="i" * 257, iteration=0, data_size=1, timestamp=""
            ),
            "fl_id",
        ),
        (
            lambda: client_codec.encode_get_model_request(fl_name="n" * 257, iteration=0, timestamp=""),
            "fl_name",
        ),
        (
            lambda: server_codec.encode_get_model_response(
                retcode=200, reason="", iteration=0, timestamp="", feature_maps=[("w", [0.0])] * 4097
            ),
            "at most 4096",
        ),
        (
            lambda: client_codec.encode_update_model_request(
                fl_name="", fl_id="", iteration=0, timestamp="", feature_maps=[("x" * 1025, [0.0])]
            ),
            "at most 1024",
        ),
        (
            lambda: server_codec.encode_update_model_response(retcode=2**31, reason="", next_req_time=""),
            "retcode",
        ),
        (
            lambda: server_codec.encode_start_fl_job_response(
                retcode=200,
                reason="",
                iteration=0,
                is_selected=False,
                next_req_time="",
                fl_plan=records.FLPlanParams(fl_name="n" * 257),
                feature_maps=[],
            ),
            "fl_plan.fl_name",
        ),
    ],
)
def test_encoders_refuse_what_decoders_would_refuse(encode: Callable[[], bytes], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode()


# ----------------------------------------------------------------------------------------------------------
# Malformed bodies
# ----------------------------------------------------------------------------------------------------------

DECODERS: dict[str, Callable[[bytes], object]] = {
    "RequestFLJob": server_codec.decode_start_fl_job,
    "RequestUpdateModel": server_codec.decode_update_model,
    "RequestGetModel": server_codec.decode_get_model,
    "ResponseFLJob": client_codec.decode_start_fl_job_response,
    "ResponseUpdateModel": client_codec.decode_update_model_response,
    "ResponseGetModel": client_codec.decode_get_model_response,
}


def sample_bodies() -> dict[str, bytes]:
    small = [("conv1.weight", np.linspace(-1, 1, 6, dtype=np.float32)), ("fc3.bias", np.ones(3, np.float32))]
    return {
        "RequestFLJob": client_codec.encode_start_fl_job_request(
            fl_name="lenet",
            fl_id="dev",
            iteration=1,
            data_size=5,
            timestamp="ts",
            download_compress_types=[0, 2],
            sign_data=b"s",
            key_attestation="k",
        ),
        "RequestUpdateModel": client_codec.encode_update_model_request(
            fl_name="lenet",
            fl_id="dev",
            iteration=1,
            feature_maps=small,
            timestamp="ts",
            index_array=[1, 2],
            name_vec=["a"],
            signature=b"sig",
        ),
        "RequestGetModel": client_codec.encode_get_model_request(
            fl_name="lenet", iteration=1, timestamp="ts"
        ),
        "ResponseFLJob": server_codec.encode_start_fl_job_response(
            retcode=200,
            reason="success",
            iteration=1,
            is_selected=True,
            next_req_time="1",
            fl_plan=records.FLPlanParams(fl_name="lenet"),
            feature_maps=small,
            compress_feature_maps=[
                records.CompressFeatureMapView("q", np.arange(3, dtype=np.int8), 0.0, 1.0)
            ],
        ),
        "ResponseUpdateModel": server_codec.encode_update_model_response(
            retcode=200, reason="ok", next_req_time="1"
        ),
        "ResponseGetModel": server_codec.encode_get_model_response(
            retcode=200, reason="ok", iteration=1, feature_maps=small, timestamp="1"
        ),
    }


SAMPLES = sample_bodies()


def decode_or_schema_error(decoder: Callable[[bytes], object], body: bytes) -> object | None:
    """Decode; a SchemaError is fine, anything else fails the test. Touch every decoded view."""
    try:
        record = decoder(body)
    except SchemaError as exc:
        assert isinstance(exc, ProtocolError)
        assert exc.reason and str(exc).startswith(exc.reason)
        return None
    for name in ("feature_maps", "compress_feature_maps"):
        for view in getattr(record, name, ()):
            assert len(view.data.tobytes()) == view.data.nbytes  # every byte of the view is readable
    repr(record)
    return record


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize(
    "body", [b"", b"\x00", b"\x00\x00\x00", b"\x04\x00\x00\x00", b"\xff" * 64, b"The cluster is in safemode."]
)
def test_garbage_is_a_schema_error_with_the_original_reason(name: str, body: bytes) -> None:
    with pytest.raises(SchemaError) as info:
        DECODERS[name](body)
    assert info.value.reason == f"The schema of {name} is invalid."


@pytest.mark.parametrize("name", DECODERS)
def test_every_truncation_is_a_schema_error(name: str) -> None:
    body = SAMPLES[name]
    whole = decode_or_schema_error(DECODERS[name], body)
    assert whole is not None
    refused = 0
    for cut in range(len(body)):
        # Builders write back to front, so the last bytes may be alignment padding after the first object
        # written: cutting only padding leaves the same message; any other cut is refused.
        part = decode_or_schema_error(DECODERS[name], body[:cut])
        if part is None:
            refused += 1
        else:
            assert part == whole and cut >= len(body) - 7, cut
    assert refused >= len(body) - 7


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("body", SAMPLES)
def test_each_decoder_fed_every_other_table(decoder: str, body: str) -> None:
    decode_or_schema_error(DECODERS[decoder], SAMPLES[body])


def _vector_length_position(body: bytes, needle: np.ndarray[Any, Any]) -> int:
    """Where the length prefix of the vector holding exactly ``needle``'s bytes is."""
    data = needle.tobytes()
    at = body.index(data)
    assert struct.unpack_from("<I", body, at - 4)[0] == needle.size
    return at - 4


@pytest.mark.parametrize("declared", [0x7FFF_FFFF, 0x4000_0000, 0x3FFF_FFFF, 0xFFFF_FFFF, 1_000_000])
def test_huge_declared_vector_length(declared: int) -> None:
    maps = lenet_maps()
    body = bytearray(
        client_codec.encode_update_model_request(
            fl_name="l", fl_id="d", iteration=0, feature_maps=maps, timestamp="t"
        )
    )
    at = _vector_length_position(bytes(body), maps[2][1])  # fc1.weight
    struct.pack_into("<I", body, at, declared)
    with pytest.raises(SchemaError, match=r"feature_map\[2\]\.data"):
        server_codec.decode_update_model(bytes(body))


def test_huge_declared_table_vector_length() -> None:
    body = bytearray(raw_update_model([("w", [1.0])]))
    req = fb_req_update_model.RequestUpdateModel.GetRootAs(bytes(body), 0)
    at = req._tab.Vector(req._tab.Offset(10)) - 4  # the feature_map vector's length prefix
    assert struct.unpack_from("<I", body, at)[0] == 1
    struct.pack_into("<I", body, at, 0x7FFF_FFFF)
    with pytest.raises(SchemaError, match="feature_map"):
        server_codec.decode_update_model(bytes(body))


def test_non_utf8_and_unterminated_strings() -> None:
    body = bytearray(raw_start_fl_job(fl_id="abcd"))
    at = bytes(body).index(b"abcd")
    body[at + 1] = 0xFF
    with pytest.raises(SchemaError, match=r"fl_id: string is not valid UTF-8"):
        server_codec.decode_start_fl_job(bytes(body))
    body[at + 1] = ord("b")
    body[at + 4] = ord("!")  # the NUL terminator
    with pytest.raises(SchemaError, match="not NUL-terminated"):
        server_codec.decode_start_fl_job(bytes(body))


def test_verify_reports_what_it_found_and_refuses_reads_it_did_not_check() -> None:
    found = verify(SAMPLES["RequestUpdateModel"], schema.REQUEST_UPDATE_MODEL)
    assert (found.string(0), found.string(1), found.string(4)) == ("lenet", "dev", "ts")
    assert found.scalar(2, struct.Struct("<i"), 0) == 1
    maps = found.tables(3)
    assert maps is not None and [m.string(0) for m in maps] == ["conv1.weight", "fc3.bias"]
    assert [(m.vector(1) or (0, -1))[1] for m in maps] == [6, 3]  # (first element's position, count)
    assert found.strings(12) == ("a",) and found.tables(9) is None
    with pytest.raises(TypeError, match="verified as"):
        found.string(2)  # a scalar slot read as a string
    with pytest.raises(TypeError, match="4 bytes wide"):
        found.scalar(2, struct.Struct("<q"), 0)


def test_depth_limit_and_object_budget() -> None:
    depth = 20
    spec = Table("Leaf", ())
    for level in range(depth - 1):
        spec = Table(f"Node{level}", (Field.child("next", spec),))
    b = flatbuffers.Builder(256)
    b.StartObject(0)
    child = b.EndObject()
    for _ in range(depth - 1):
        b.StartObject(1)
        b.PrependUOffsetTRelativeSlot(0, child, 0)
        child = b.EndObject()
    b.Finish(child)
    chain = bytes(b.Output())
    verify(chain, spec, max_depth=depth)
    with pytest.raises(SchemaError, match="deeper than 16"):
        verify(chain, spec)
    with pytest.raises(SchemaError, match="budget"):
        verify(chain, spec, max_depth=depth, max_objects=depth - 1)
    lenet = server_codec.encode_get_model_response(
        retcode=200, reason="", iteration=0, timestamp="", feature_maps=lenet_maps()
    )
    with pytest.raises(SchemaError, match="budget"):
        verify(lenet, schema.RESPONSE_GET_MODEL, max_objects=10)


def test_misaligned_and_out_of_bounds_offsets() -> None:
    body = bytearray(SAMPLES["RequestGetModel"])
    struct.pack_into("<I", body, 0, struct.unpack_from("<I", body, 0)[0] + 1)  # root table off by one
    with pytest.raises(SchemaError, match="not aligned"):
        server_codec.decode_get_model(bytes(body))
    struct.pack_into("<I", body, 0, len(body) + 4)
    with pytest.raises(SchemaError, match="past the end"):
        server_codec.decode_get_model(bytes(body))


# ----------------------------------------------------------------------------------------------------------
# Fuzz: never anything but a record or SchemaError
# ----------------------------------------------------------------------------------------------------------

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(name=st.sampled_from(sorted(DECODERS)), body=st.binary(max_size=600))
def test_fuzz_random_bytes(name: str, body: bytes) -> None:
    decode_or_schema_error(DECODERS[name], body)


@FUZZ
@given(decoder=st.sampled_from(sorted(DECODERS)), source=st.sampled_from(sorted(SAMPLES)), data=st.data())
def test_fuzz_truncations(decoder: str, source: str, data: st.DataObject) -> None:
    body = SAMPLES[source]
    cut = data.draw(st.integers(0, len(body)))
    decode_or_schema_error(DECODERS[decoder], body[:cut])


@FUZZ
@given(decoder=st.sampled_from(sorted(DECODERS)), source=st.sampled_from(sorted(SAMPLES)), data=st.data())
def test_fuzz_single_byte_mutations(decoder: str, source: str, data: st.DataObject) -> None:
    body = bytearray(SAMPLES[source])
    at = data.draw(st.integers(0, len(body) - 1))
    body[at] = data.draw(st.integers(0, 255))
    decode_or_schema_error(DECODERS[decoder], bytes(body))


@FUZZ
@given(
    source=st.sampled_from(sorted(SAMPLES)),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_fuzz_several_mutations_of_a_body_decoded_as_itself(
    source: str, edits: list[tuple[int, int]]
) -> None:
    body = bytearray(SAMPLES[source])
    for at, value in edits:
        body[at % len(body)] = value
    decode_or_schema_error(DECODERS[source], bytes(body))
