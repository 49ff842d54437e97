"""SIGNDS (spec/privacy.md §3): the device's selection, the Server's admission rules and its rebuild.

The selection's distributions are checked against a straight port of the original's arithmetic in doubles
(written here, independently of the log-space code), where that arithmetic does not overflow.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import trio

from flcluster.aggregation import ModelSpec, ModelWeights, UpdateRejected
from flcluster.aggregation.signds import UploadKind, prepare_signds, upload_kind
from flcluster.client.privacy import DevicePrivacy
from flcluster.client.signds import (
    expected_top_share,
    optimal_output_dim,
    optimal_threshold,
    select,
)
from flcluster.core.iteration import Accepted
from flcluster.errors import ConfigError
from flcluster.runtime.rounds import CountRequest, LeaderLine, RoundService
from flcluster.wire.client_codec import decode_update_model_response, encode_update_model_request
from flcluster.wire.codes import MAX_SIGNDS_INDICES, ResponseCode
from flcluster.wire.records import FLPlanParams

# ------------------------------------------------------------------ the original's arithmetic, in doubles


def _comb(n: float, k: float) -> float:
    if not (k <= n and n >= 0 and k >= 0):
        return 0.0
    result, m = 1.0, n + 1
    for i in range(1, int(min(k, n - k)) + 1):
        result *= m - i
        result /= i
    return result


def _pmf(thr: int, top: int, dim: int, out: int, eps: float) -> list[float]:
    raw = [
        _comb(top, v) * _comb(dim - top, out - v) * (math.exp(eps) if v >= thr else 1.0)
        for v in range(out + 1)
    ]
    total = sum(raw)
    return [x / total for x in raw]


def _expect(pmf: list[float]) -> float:
    return sum(i * p for i, p in enumerate(pmf))


def _opt_thr(top: int, dim: int, out: int, eps: float) -> int:
    best, best_t = 0.0, 0
    for t in range(1, out + 1):
        e = _expect(_pmf(t, top, dim, out, eps))
        if e > best:
            best, best_t = e, t
        else:
            break
    return max(best_t, 1)


def _opt_dim(ratio: float, top: int, dim: int, eps: float) -> int:
    out = 1
    while True:
        e = _expect(_pmf(_opt_thr(top, dim, out, eps), top, dim, out, eps)) / out
        if e < ratio or math.isnan(e):
            break
        out += 1
    return max(1, out - 1)


@pytest.mark.parametrize(
    ("dim", "k", "eps", "ratio"),
    [(66_404, 0.01, 100.0, 0.6), (1000, 0.01, 100.0, 0.6), (5000, 0.05, 20.0, 0.5), (20_000, 0.25, 3.0, 0.9)],
)
def test_output_dim_and_threshold_match_the_original(dim: int, k: float, eps: float, ratio: float) -> None:
    top = int(k * dim)
    out = optimal_output_dim(ratio, top, dim, eps)
    assert out == _opt_dim(ratio, top, dim, eps)
    for h in range(1, out + 2):
        assert optimal_threshold(top, dim, h, eps) == _opt_thr(top, dim, h, eps)
        assert expected_top_share(top, dim, h, eps) == pytest.approx(
            _expect(_pmf(_opt_thr(top, dim, h, eps), top, dim, h, eps)) / h, rel=1e-9
        )


def test_lenet_defaults_select_43_coordinates() -> None:
    # sign_k=0.01, sign_eps=100, sign_thr_ratio=0.6, sign_dim_out=0 on LeNet5(62)'s 66 404 values
    assert optimal_output_dim(0.6, 664, 66_404, 100.0) == 43


def test_a_huge_model_does_not_overflow() -> None:
    # the original's doubles overflow to NaN here; log space goes on
    out = optimal_output_dim(0.6, 100_000, 10_000_000, 200.0)
    assert 1 <= out <= MAX_SIGNDS_INDICES


def _pair(seed: int, dim: int = 5000) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    before = {
        "a": rng.standard_normal(dim - 1000).astype(np.float32),
        "b": rng.standard_normal(1000).astype(np.float32),
    }
    trained = {name: v + rng.standard_normal(v.size).astype(np.float32) for name, v in before.items()}
    return before, trained


def test_the_selection_is_sorted_unique_in_range_and_signed() -> None:
    before, trained = _pair(0)
    signs = set()
    for seed in range(40):
        choice = select(
            before,
            trained,
            sign_k=0.01,
            sign_eps=100.0,
            sign_thr_ratio=0.6,
            sign_dim_out=0,
            rng=np.random.default_rng(seed),
        )
        idx = choice.index_array
        assert idx.dtype == np.int32
        assert idx.size == optimal_output_dim(0.6, 50, 5000, 100.0)
        assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < 5000
        signs.add(choice.sign)
    assert signs == {-1, 1}


def test_the_number_of_top_coordinates_follows_the_mechanism() -> None:
    """Over 3000 seeded draws, how many chosen indices fall in the top set has the distribution p_tau."""
    before, trained = _pair(1, dim=2000)
    update = np.concatenate([trained[n] - before[n] for n in ("a", "b")])
    top, dim, out, eps = 20, 2000, 6, 2.0
    pmf = _pmf(_opt_thr(top, dim, out, eps), top, dim, out, eps)
    counts = np.zeros(out + 1)
    rng = np.random.default_rng(11)
    for _ in range(3000):
        choice = select(
            before, trained, sign_k=0.01, sign_eps=eps, sign_thr_ratio=0.6, sign_dim_out=out, rng=rng
        )
        order = np.argsort(-update if choice.sign > 0 else update, kind="stable")
        in_top = np.isin(choice.index_array, order[:top]).sum()
        counts[in_top] += 1
    expected = np.array(pmf) * 3000
    chi2 = float(sum((counts[v] - expected[v]) ** 2 / expected[v] for v in range(out + 1) if expected[v] > 5))
    assert chi2 < 30, (counts, expected)  # 6 degrees of freedom: p < 1e-4
    # the top coordinates of the sign: the largest updates for +1, the smallest for -1
    choice = select(before, trained, sign_k=0.01, sign_eps=500.0, sign_thr_ratio=0.6, sign_dim_out=5, rng=rng)
    chosen = update[choice.index_array]
    bound = np.sort(update)[-top] if choice.sign > 0 else np.sort(update)[top - 1]
    assert np.all(chosen >= bound) if choice.sign > 0 else np.all(chosen <= bound)


def test_a_model_too_small_is_refused_on_the_device() -> None:
    before = {"a": np.zeros(3, np.float32)}
    with pytest.raises(ConfigError, match="cannot draw 5 coordinates from an update of 3 values"):
        select(
            before,
            {"a": np.ones(3)},
            sign_k=0.01,
            sign_eps=1.0,
            sign_thr_ratio=0.6,
            sign_dim_out=5,
            rng=np.random.default_rng(0),
        )
    with pytest.raises(ConfigError, match="not in the global model"):
        select(
            before,
            {"x": np.ones(3)},
            sign_k=0.01,
            sign_eps=1.0,
            sign_thr_ratio=0.6,
            sign_dim_out=1,
            rng=np.random.default_rng(0),
        )


def test_device_privacy_sends_names_without_data() -> None:
    before, trained = _pair(2)
    plan = FLPlanParams(encrypt_type="SIGNDS", sign_dim_out=7)
    upload = {name: v * np.float32(3) for name, v in trained.items()}
    result = DevicePrivacy(seed=3).protect(plan, before, upload, data_size=3, trained=trained)
    assert list(result.feature_maps) == ["a", "b"]
    assert all(np.asarray(v).size == 0 for v in result.feature_maps.values())
    assert result.sign in (-1, 1) and result.index_array.size == 7


# --------------------------------------------------------------------------------- the Server's side


SPEC = ModelSpec((("conv.weight", (4, 5)), ("conv.bias", (4,)), ("fc.bias", (6,))))


def _base() -> ModelWeights:
    g = torch.Generator().manual_seed(0)
    return ModelWeights(
        {name: torch.randn(size, generator=g) for name, size in zip(SPEC.names, SPEC.sizes, strict=True)}
    )


EMPTY = np.empty(0, np.float32)


def _prepare(names: list[str], indices: list[int], sign: int = 1, **kw: Any) -> Any:
    return prepare_signds(
        SPEC,
        [(n, kw.pop("data", EMPTY)) for n in names],
        sign=sign,
        index_array=np.array(indices, np.int32),
        base=kw.pop("base", _base()),
        global_lr=kw.pop("global_lr", 0.25),
        max_data_size=65535,
    )


def test_the_rebuild_is_the_original_formula_over_the_named_tensors_in_request_order() -> None:
    base = _base()
    # request order fc.bias (6 values: 0..5) then conv.weight (20 values: 6..25); conv.bias not named
    update = _prepare(["fc.bias", "conv.weight"], [0, 5, 6, 25], sign=-1, base=base)
    checked = update.checked(37)
    got = dict(checked.feature_maps)
    assert list(got) == ["fc.bias", "conv.weight"]
    g, n = np.float32(-1) * np.float32(0.25), np.float32(37)
    fc = base["fc.bias"].numpy().copy()
    fc[[0, 5]] += g
    conv = base["conv.weight"].numpy().copy()
    conv[[0, 19]] += g
    np.testing.assert_array_equal(got["fc.bias"], fc * n)
    np.testing.assert_array_equal(got["conv.weight"], conv * n)
    assert got["fc.bias"].dtype == np.float32
    # the stored model is not touched
    assert torch.equal(base["fc.bias"], _base()["fc.bias"])


@pytest.mark.parametrize(
    ("encrypt_type", "sign", "count", "kind"),
    [
        ("SIGNDS", 1, 3, UploadKind.SIGNDS),
        ("SIGNDS", -1, 0, UploadKind.SIGNDS),  # the index count is judged by prepare_signds
        ("SIGNDS", 0, 0, UploadKind.DENSE),
        ("NOT_ENCRYPT", 0, 0, UploadKind.DENSE),
        ("DP_ENCRYPT", 0, 0, UploadKind.DENSE),
    ],
)
def test_upload_kind(encrypt_type: str, sign: int, count: int, kind: UploadKind) -> None:
    assert upload_kind(encrypt_type, sign, count) is kind


@pytest.mark.parametrize(
    ("encrypt_type", "sign", "count", "said"),
    [
        ("NOT_ENCRYPT", 1, 3, "is a SignDS upload, but this cluster runs encrypt_type='NOT_ENCRYPT'"),
        ("DP_ENCRYPT", 0, 2, "is a SignDS upload, but this cluster runs encrypt_type='DP_ENCRYPT'"),
        ("SIGNDS", 2, 3, "sign=2 is refused"),
        ("SIGNDS", -7, 3, "sign=-7 is refused"),
        ("SIGNDS", 0, 1, "a dense upload carries no index_array"),
    ],
)
def test_upload_kind_refusals(encrypt_type: str, sign: int, count: int, said: str) -> None:
    with pytest.raises(UpdateRejected, match=said.replace("(", r"\(")):
        upload_kind(encrypt_type, sign, count)


@pytest.mark.parametrize(
    ("names", "indices", "extra", "said"),
    [
        ([], [1], {}, "name at least one weight"),
        (["nope"], [1], {}, "'nope' is not in the server model"),
        (["fc.bias", "fc.bias"], [1], {}, "'fc.bias' appears twice"),
        (["fc.bias"], [1], {"data": np.ones(6, np.float32)}, "carries 6 values in a SignDS upload"),
        (["fc.bias"], [], {}, "index_array has 0 entries"),
        (["conv.weight"], list(range(MAX_SIGNDS_INDICES + 1)), {}, "index_array has 101 entries"),
        (["fc.bias"], [2, 2], {}, "strictly ascending .* entry 1 is 2 after 2"),
        (["fc.bias"], [1, 4, 3], {}, "entry 2 is 3 after 4"),
        (
            ["fc.bias"],
            [6],
            {},
            r"index 6 of index_array is out of range: the 1 named weight\(s\) have 6 values",
        ),
        (["fc.bias", "conv.bias"], [-1, 3], {}, "index -1 of index_array is out of range"),
        (["fc.bias"], [1], {"global_lr": 3e38}, "overflows float32"),
    ],
)
def test_bad_signds_uploads_are_refused(
    names: list[str], indices: list[int], extra: dict[str, Any], said: str
) -> None:
    if len(indices) > MAX_SIGNDS_INDICES:
        names = ["conv.weight", "conv.bias", "fc.bias"]
    with pytest.raises(UpdateRejected, match=said):
        _prepare(names, indices, **extra)


# ------------------------------------------------------------ the round: refused before it is counted


class CountingLeader:
    """A leader that accepts every updateModel for iteration 1 with data size 9, and records the calls."""

    def __init__(self) -> None:
        self.calls: list[CountRequest] = []

    async def call(self, request: CountRequest) -> Accepted:
        self.calls.append(request)
        return Accepted(iteration=1, data_size=9, next_req_time_ms=123, reason="success")

    async def confirm(self, iteration: int, fl_ids: tuple[str, ...]) -> None:
        pass


def _service(encrypt_type: str) -> tuple[RoundService, CountingLeader]:
    line = LeaderLine()
    leader = CountingLeader()
    service = RoundService(
        spec=SPEC,
        initial=_base(),
        plan=FLPlanParams(encrypt_type=encrypt_type, sign_global_lr=0.5),
        device=torch.device("cpu"),
        line=line,
    )
    return service, leader


def _body(names: list[str], sign: int, indices: list[int], iteration: int = 1, data: Any = EMPTY) -> bytes:
    return encode_update_model_request(
        fl_name="job",
        fl_id="dev",
        iteration=iteration,
        feature_maps=[(n, data) for n in names],
        timestamp="1",
        sign=sign,
        index_array=indices,
    )


async def _send(service: RoundService, leader: CountingLeader, body: bytes) -> Any:
    with service.line.attach(leader):
        return decode_update_model_response(await service.update_model(body))


@pytest.mark.parametrize(
    ("encrypt_type", "names", "sign", "indices", "said"),
    [
        ("NOT_ENCRYPT", ["fc.bias"], 1, [0], "this cluster runs encrypt_type='NOT_ENCRYPT'"),
        ("DP_ENCRYPT", ["fc.bias"], -1, [0, 1], "this cluster runs encrypt_type='DP_ENCRYPT'"),
        ("SIGNDS", ["fc.bias"], 3, [0], "sign=3 is refused"),
        ("SIGNDS", ["fc.bias"], 1, [0, 0], "strictly ascending"),
        ("SIGNDS", ["fc.bias"], 1, [6], "out of range"),
        ("SIGNDS", ["fc.bias"], 1, list(range(101)), "101 entries"),
        ("SIGNDS", ["fc.bias", "fc.bias"], 1, [0], "appears twice"),
        ("SIGNDS", ["fc.bias"], 0, [0], "a dense upload carries no index_array"),
    ],
)
async def test_a_refused_signds_upload_is_never_counted(
    encrypt_type: str, names: list[str], sign: int, indices: list[int], said: str
) -> None:
    service, leader = _service(encrypt_type)
    answer = await _send(service, leader, _body(names, sign, indices))
    assert answer.retcode == ResponseCode.RequestError
    assert answer.reason.startswith("Verify model feature map failed: ") and said in answer.reason
    assert leader.calls == []  # refused before the leader counted anything
    partial, ids = await service.collect_partial(1)
    assert ids == () and partial.update_count == 0


async def test_a_signds_upload_for_an_iteration_without_its_base_model_is_out_of_time() -> None:
    service, leader = _service("SIGNDS")
    answer = await _send(service, leader, _body(["fc.bias"], 1, [0], iteration=5))
    assert answer.retcode == ResponseCode.OutOfTime
    assert "UpdateModel iteration number is invalid:5, current iteration:1" in answer.reason
    assert leader.calls == []


async def test_an_accepted_signds_upload_is_folded_as_its_rebuilt_update() -> None:
    service, leader = _service("SIGNDS")
    answer = await _send(service, leader, _body(["fc.bias", "conv.bias"], -1, [1, 7]))
    assert answer.retcode == ResponseCode.SUCCEED, answer.reason
    assert [c.fl_id for c in leader.calls] == ["dev"]
    partial, ids = await service.collect_partial(1)
    assert ids == ("dev",) and partial.update_count == 1
    base = _base()
    fc, bias = base["fc.bias"].numpy().copy(), base["conv.bias"].numpy().copy()
    fc[1] -= np.float32(0.5)
    bias[1] -= np.float32(0.5)  # global index 7 = 6 values of fc.bias + 1
    sums = dict(zip(SPEC.names, partial.sums, strict=True))
    np.testing.assert_array_equal(sums["fc.bias"].numpy(), fc * np.float32(9))
    np.testing.assert_array_equal(sums["conv.bias"].numpy(), bias * np.float32(9))
    assert not sums["conv.weight"].any()
    assert partial.data_sizes == (0, 9, 9)  # conv.weight was not named: its average is the others'
    # a dense upload (sign 0) under SIGNDS is checked and folded as usual
    dense = [(n, np.ones(s, np.float32)) for n, s in zip(SPEC.names, SPEC.sizes, strict=True)]
    body = encode_update_model_request(
        fl_name="job", fl_id="dense", iteration=1, feature_maps=dense, timestamp="1"
    )
    assert (await _send(service, leader, body)).retcode == ResponseCode.SUCCEED
    partial, ids = await service.collect_partial(1)
    assert ids == ("dev", "dense") and partial.data_sizes == (9, 18, 18)
    await trio.lowlevel.checkpoint()
