"""Aggregation: model spec and update check, FedAvg sums, partial-sum encoding, device, checkpoints, metrics.

FedAvg results are compared with an independent float64 numpy computation of the same rule
(spec/aggregation.md, "FedAvg"): per tensor, the sum of the pre-multiplied uploads of the devices that
sent it, divided by the sum of their data sizes; a tensor nobody sent keeps its previous value.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import math
import os
import pickle
import re
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from flcluster.aggregation import (
    AggregationError,
    CheckpointError,
    ClientVisitedInfo,
    FedAvgAccumulator,
    IterationMetrics,
    MetricsWriter,
    ModelSpec,
    ModelWeights,
    PartialSum,
    UpdateRejected,
    as_float32_tensor,
    checkpoint_name,
    combine,
    finalize,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    resolve_device,
    save_checkpoint,
)
from flcluster.aggregation.model import CheckedUpdate
from flcluster.errors import ConfigError, FrameError, ProtocolError

CPU = torch.device("cpu")

# LeNet5(62) as the original's simulator sends it (reference §2.6): 66 404 float32 values.
LENET_SPEC = ModelSpec(
    [
        ("conv1.weight", (6, 3, 5, 5)),
        ("conv2.weight", (16, 6, 5, 5)),
        ("fc1.weight", (120, 400)),
        ("fc2.weight", (84, 120)),
        ("fc3.weight", (62, 84)),
        ("fc1.bias", (120,)),
        ("fc2.bias", (84,)),
        ("fc3.bias", (62,)),
    ]
)

SMALL_SPEC = ModelSpec([("a.weight", (3, 4)), ("a.bias", (3,)), ("b.weight", (2, 3)), ("b.bias", (2,))])


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.norm = nn.BatchNorm2d(2)
        self.fc = nn.Linear(8, 3)


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(8, 3)


def read_only(array: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """A read-only view of the array's bytes, like a FlatBuffers vector decoded from a request body."""
    return np.frombuffer(array.astype(np.float32).tobytes(), dtype=np.float32)


def random_weights(spec: ModelSpec, rng: np.random.Generator) -> ModelWeights:
    return ModelWeights(
        (name, torch.from_numpy(rng.standard_normal(size).astype(np.float32)))
        for name, size in zip(spec.names, spec.sizes, strict=True)
    )


Update = tuple[list[tuple[str, npt.NDArray[np.float32]]], int]


def random_updates(spec: ModelSpec, rng: np.random.Generator, count: int, *, subsets: bool) -> list[Update]:
    """Updates as a device sends them: a (sub)set of tensors, already multiplied by the data size."""
    updates: list[Update] = []
    for _ in range(count):
        data_size = int(rng.integers(1, 1000))
        if subsets:
            mask = rng.random(len(spec)) < 0.6
            if not mask.any():
                mask[int(rng.integers(len(spec)))] = True
        else:
            mask = np.ones(len(spec), dtype=bool)
        order = rng.permutation(len(spec))
        maps = [
            (spec.names[i], read_only(rng.standard_normal(spec.sizes[i]).astype(np.float32) * data_size))
            for i in order
            if mask[i]
        ]
        updates.append((maps, data_size))
    return updates


def numpy_fedavg(
    spec: ModelSpec, updates: list[Update], previous: ModelWeights
) -> dict[str, npt.NDArray[np.float64]]:
    """FedAvg computed independently, in float64, straight from the rule."""
    expected: dict[str, npt.NDArray[np.float64]] = {}
    for name in spec.names:
        sent = [(dict(maps)[name], size) for maps, size in updates if name in dict(maps)]
        if not sent:
            expected[name] = previous[name].numpy().astype(np.float64)
        else:
            total = sum(size for _, size in sent)
            expected[name] = np.stack([array.astype(np.float64) for array, _ in sent]).sum(axis=0) / total
    return expected


def accumulate(spec: ModelSpec, updates: list[Update]) -> FedAvgAccumulator:
    accumulator = FedAvgAccumulator(spec, CPU)
    for maps, size in updates:
        accumulator.add(maps, size)
    return accumulator


# ---------------------------------------------------------------------------------------------- ModelSpec


def test_lenet_spec_matches_the_reference_sizes() -> None:
    assert LENET_SPEC.sizes == (450, 2400, 48000, 10080, 5208, 120, 84, 62)
    assert LENET_SPEC.total_elements == 66404
    assert LENET_SPEC.shape_of("fc1.weight") == (120, 400)
    assert LENET_SPEC.index("fc3.bias") == 7


def test_spec_from_module_keeps_state_dict_order_and_only_floating_tensors() -> None:
    module = Net()
    spec = ModelSpec.from_module(module)
    floating = [name for name, t in module.state_dict().items() if t.is_floating_point()]
    assert spec.names == tuple(floating)
    assert "norm.num_batches_tracked" not in spec.names
    assert "norm.running_mean" in spec.names
    assert spec.shape_of("conv.weight") == (2, 1, 3, 3)
    assert spec.total_elements == sum(
        t.numel() for t in module.state_dict().values() if t.is_floating_point()
    )


@pytest.mark.parametrize(
    "tensors",
    [
        [],
        [("a", (2,)), ("a", (3,))],
        [("", (2,))],
        [("a", (-1,))],
    ],
)
def test_spec_refuses_bad_layouts(tensors: list[tuple[str, tuple[int, ...]]]) -> None:
    with pytest.raises(ValueError):
        ModelSpec(tensors)


def good_update() -> list[tuple[str, npt.NDArray[Any]]]:
    return [
        (name, np.ones(size, dtype=np.float32))
        for name, size in zip(SMALL_SPEC.names, SMALL_SPEC.sizes, strict=True)
    ]


BAD_UPDATES: list[tuple[str, list[tuple[str, npt.NDArray[Any]]], str]] = [
    ("unknown name", [*good_update()[:2], ("c.weight", np.ones(3, dtype=np.float32))], "'c.weight'"),
    ("wrong size", [*good_update()[:3], ("b.bias", np.ones(3, dtype=np.float32))], "'b.bias'"),
    ("duplicate", [*good_update(), ("a.bias", np.ones(3, dtype=np.float32))], "'a.bias'"),
    ("float64", [*good_update()[:3], ("b.bias", np.ones(2, dtype=np.float64))], "'b.bias'"),
    ("big endian", [*good_update()[:3], ("b.bias", np.ones(2, dtype=">f4"))], "'b.bias'"),
    ("NaN", [*good_update()[:3], ("b.bias", np.array([1.0, np.nan], dtype=np.float32))], "'b.bias'"),
    ("Inf", [*good_update()[:3], ("b.bias", np.array([-np.inf, 1.0], dtype=np.float32))], "'b.bias'"),
    ("empty", [], "none"),
]


@pytest.mark.parametrize(("why", "update", "named"), BAD_UPDATES, ids=[case[0] for case in BAD_UPDATES])
def test_check_update_refuses_with_a_message_naming_the_tensor(
    why: str, update: list[tuple[str, npt.NDArray[Any]]], named: str
) -> None:
    with pytest.raises(UpdateRejected, match=re.escape(named)) as caught:
        SMALL_SPEC.check_update(update)
    assert isinstance(caught.value, ProtocolError)


def test_check_update_accepts_a_subset_in_any_order() -> None:
    update = good_update()[::-1][:2]
    assert SMALL_SPEC.check_update(update).indices == (3, 2)


# ------------------------------------------------------------------------------------------ ModelWeights


def test_weights_round_trip_through_a_state_dict() -> None:
    module = Net()
    spec = ModelSpec.from_module(module)
    weights = ModelWeights.from_state_dict(module.state_dict(), spec)
    assert list(weights) == list(spec.names)
    assert all(t.dim() == 1 and t.dtype == torch.float32 for t in weights.values())
    state = weights.to_state_dict(spec)
    for name, tensor in state.items():
        assert torch.equal(tensor, module.state_dict()[name])
    module.load_state_dict(state, strict=False)
    assert ModelWeights.from_state_dict(state, spec) == weights


def test_weights_copy_and_are_not_aliased() -> None:
    module = Plain()
    spec = ModelSpec.from_module(module)
    weights = ModelWeights.from_state_dict(module.state_dict(), spec)
    with torch.no_grad():
        module.fc.bias.add_(1.0)
    assert not torch.equal(weights["fc.bias"], module.fc.bias.detach())
    state = weights.to_state_dict(spec)
    state["fc.bias"].add_(1.0)
    assert not torch.equal(state["fc.bias"], weights["fc.bias"])


def test_weights_refuse_a_mismatched_state_dict() -> None:
    module = Plain()
    spec = ModelSpec.from_module(module)
    state = dict(module.state_dict())
    del state["fc.bias"]
    with pytest.raises(ValueError, match=r"fc\.bias"):
        ModelWeights.from_state_dict(state, spec)
    state = dict(module.state_dict())
    state["fc.bias"] = torch.zeros(4)
    with pytest.raises(ValueError, match="shape"):
        ModelWeights.from_state_dict(state, spec)
    state["fc.bias"] = torch.tensor([0.0, math.nan, 0.0])
    with pytest.raises(ValueError, match="NaN"):
        ModelWeights.from_state_dict(state, spec)
    with pytest.raises(ValueError, match="1-D float32"):
        ModelWeights({"x": torch.zeros(2, 2)})


# ------------------------------------------------------------------------------------------ zero copy


@pytest.fixture
def torch_warns_always() -> Iterator[None]:
    """Make torch's once-per-process warnings fire every time, so a test sees them whatever ran before."""
    torch.set_warn_always(True)
    try:
        yield
    finally:
        torch.set_warn_always(False)


@pytest.mark.usefixtures("torch_warns_always")
def test_read_only_view_becomes_a_tensor_without_copy_or_warning() -> None:
    array = read_only(np.arange(10, dtype=np.float32))
    assert not array.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = as_float32_tensor(array)
    assert tensor.data_ptr() == array.ctypes.data
    assert np.shares_memory(tensor.numpy(), array)
    assert torch.equal(tensor, torch.arange(10, dtype=torch.float32))
    # The control: the warning this helper silences is real.
    with pytest.warns(UserWarning, match="not writable"):
        torch.from_numpy(array)


def test_non_contiguous_array_is_copied_once() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    tensor = as_float32_tensor(array)
    assert torch.equal(tensor, torch.from_numpy(np.ascontiguousarray(array).reshape(-1)))


@pytest.mark.usefixtures("torch_warns_always")
def test_accumulator_reads_read_only_updates_without_warning() -> None:
    rng = np.random.default_rng(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accumulator = accumulate(SMALL_SPEC, random_updates(SMALL_SPEC, rng, 3, subsets=False))
    assert accumulator.update_count == 3


# ------------------------------------------------------------------------------------------ FedAvg


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("subsets", [False, True])
def test_fedavg_equals_independent_numpy(seed: int, subsets: bool) -> None:
    rng = np.random.default_rng(seed)
    previous = random_weights(SMALL_SPEC, rng)
    updates = random_updates(SMALL_SPEC, rng, int(rng.integers(1, 12)), subsets=subsets)
    result = finalize(accumulate(SMALL_SPEC, updates).partial(), previous)
    expected = numpy_fedavg(SMALL_SPEC, updates, previous)
    for name in SMALL_SPEC.names:
        assert result[name].dtype == torch.float32
        np.testing.assert_allclose(result[name].numpy(), expected[name], rtol=2e-5, atol=1e-6)


def test_fedavg_on_lenet_sized_model() -> None:
    rng = np.random.default_rng(11)
    previous = random_weights(LENET_SPEC, rng)
    updates = random_updates(LENET_SPEC, rng, 8, subsets=True)
    result = finalize(accumulate(LENET_SPEC, updates).partial(), previous)
    expected = numpy_fedavg(LENET_SPEC, updates, previous)
    for name in LENET_SPEC.names:
        np.testing.assert_allclose(result[name].numpy(), expected[name], rtol=2e-5, atol=1e-6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(1, 10))
def test_fedavg_property(seed: int, count: int) -> None:
    rng = np.random.default_rng(seed)
    previous = random_weights(SMALL_SPEC, rng)
    updates = random_updates(SMALL_SPEC, rng, count, subsets=True)
    accumulator = accumulate(SMALL_SPEC, updates)
    partial = accumulator.partial()
    assert partial.update_count == count
    for i, name in enumerate(SMALL_SPEC.names):
        assert partial.data_sizes[i] == sum(size for maps, size in updates if name in dict(maps))
    result = finalize(partial, previous)
    expected = numpy_fedavg(SMALL_SPEC, updates, previous)
    for name in SMALL_SPEC.names:
        np.testing.assert_allclose(result[name].numpy(), expected[name], rtol=2e-5, atol=1e-6)


def test_a_tensor_nobody_sent_keeps_the_previous_value_exactly() -> None:
    rng = np.random.default_rng(3)
    previous = random_weights(SMALL_SPEC, rng)
    accumulator = FedAvgAccumulator(SMALL_SPEC, CPU)
    accumulator.add([("a.bias", read_only(np.full(3, 30.0, dtype=np.float32)))], 10)
    accumulator.add([("a.bias", read_only(np.full(3, 10.0, dtype=np.float32)))], 10)
    result = finalize(accumulator.partial(), previous)
    assert torch.equal(result["a.bias"], torch.full((3,), 2.0))
    for name in ("a.weight", "b.weight", "b.bias"):
        assert torch.equal(result[name], previous[name])
    assert accumulator.data_sizes == (0, 20, 0, 0)


def test_same_updates_in_same_order_are_bit_identical() -> None:
    rng = np.random.default_rng(21)
    updates = random_updates(LENET_SPEC, rng, 6, subsets=True)
    first = accumulate(LENET_SPEC, updates).partial().to_bytes()
    second = accumulate(LENET_SPEC, updates).partial().to_bytes()
    assert first == second


def test_combine_across_four_servers_equals_one_accumulator() -> None:
    rng = np.random.default_rng(42)
    previous = random_weights(LENET_SPEC, rng)
    updates = random_updates(LENET_SPEC, rng, 17, subsets=True)
    servers = [FedAvgAccumulator(LENET_SPEC, CPU) for _ in range(4)]
    for i, (maps, size) in enumerate(updates):
        servers[int(rng.integers(4)) if i > 3 else i].add(maps, size)
    partials = [server.partial() for server in servers]
    combined = combine(partials)
    single = accumulate(LENET_SPEC, updates).partial()
    assert combined.update_count == single.update_count == 17
    assert combined.data_sizes == single.data_sizes
    for a, b in zip(combined.sums, single.sums, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-3)
    got, want = finalize(combined, previous), finalize(single, previous)
    for name in LENET_SPEC.names:
        np.testing.assert_allclose(got[name].numpy(), want[name].numpy(), rtol=1e-5, atol=1e-6)
    # Over the wire and in rank order, every Server gets the same bits.
    decoded = [PartialSum.from_bytes(p.to_bytes(), LENET_SPEC) for p in partials]
    assert combine(decoded) == combined
    assert combine(decoded).to_bytes() == combined.to_bytes()


def test_combine_refuses_nothing_and_mixed_specs() -> None:
    with pytest.raises(ValueError, match="at least one"):
        combine([])
    with pytest.raises(ValueError, match="different"):
        combine([PartialSum.empty(SMALL_SPEC), PartialSum.empty(LENET_SPEC)])


@pytest.mark.parametrize(("why", "update", "named"), BAD_UPDATES, ids=[case[0] for case in BAD_UPDATES])
def test_rejected_update_changes_nothing(
    why: str, update: list[tuple[str, npt.NDArray[Any]]], named: str
) -> None:
    rng = np.random.default_rng(8)
    accumulator = accumulate(SMALL_SPEC, random_updates(SMALL_SPEC, rng, 3, subsets=True))
    before = accumulator.partial()
    with pytest.raises(UpdateRejected):
        accumulator.add(update, 5)
    after = accumulator.partial()
    assert after == before
    assert after.to_bytes() == before.to_bytes()


def test_a_checked_update_is_added_without_a_second_check_and_equals_a_plain_add() -> None:
    update = [(name, read_only(array)) for name, array in good_update()]
    plain, checked = FedAvgAccumulator(SMALL_SPEC, CPU), FedAvgAccumulator(SMALL_SPEC, CPU)
    plain.add(update, 4)
    record = SMALL_SPEC.check_update(update)
    assert record.indices == tuple(SMALL_SPEC.index(name) for name, _ in update)
    checked.add(record, 4)
    assert checked.partial() == plain.partial()
    assert checked.partial().to_bytes() == plain.partial().to_bytes()


def test_a_checked_update_is_made_only_by_check_update_and_only_skips_for_its_spec() -> None:
    record = SMALL_SPEC.check_update(good_update())
    with pytest.raises(TypeError, match=r"only by ModelSpec\.check_update"):
        CheckedUpdate(SMALL_SPEC, record.feature_maps, record.indices, object())
    other = FedAvgAccumulator(LENET_SPEC, CPU)
    with pytest.raises(UpdateRejected):  # checked against SMALL_SPEC, so judged again for LeNet
        other.add(record, 1)
    assert other.partial() == PartialSum.empty(LENET_SPEC)


@pytest.mark.parametrize("data_size", [0, -3, True, 2.5])
def test_bad_data_size_is_refused_and_changes_nothing(data_size: Any) -> None:
    accumulator = FedAvgAccumulator(SMALL_SPEC, CPU)
    with pytest.raises(UpdateRejected, match="data size"):
        accumulator.add(good_update(), data_size)
    assert accumulator.partial() == PartialSum.empty(SMALL_SPEC)


def count_tensors() -> int:
    # type() rather than isinstance(): isinstance on every gc object trips deprecated torch attributes.
    return sum(1 for obj in gc.get_objects() if type(obj) in (torch.Tensor, nn.Parameter))


def test_memory_does_not_grow_with_the_number_of_updates() -> None:
    rng = np.random.default_rng(1)
    accumulator = FedAvgAccumulator(SMALL_SPEC, CPU)
    nbytes = accumulator.nbytes
    assert nbytes == 4 * SMALL_SPEC.total_elements
    updates = random_updates(SMALL_SPEC, rng, 4, subsets=True)
    accumulator.add(*updates[0])
    gc.collect()
    tensors_before = count_tensors()
    for i in range(400):
        accumulator.add(*updates[i % len(updates)])
    gc.collect()
    assert count_tensors() == tensors_before
    assert accumulator.nbytes == nbytes
    assert accumulator.update_count == 401


def test_reset_and_restore() -> None:
    rng = np.random.default_rng(2)
    updates = random_updates(SMALL_SPEC, rng, 5, subsets=True)
    accumulator = accumulate(SMALL_SPEC, updates)
    snapshot = accumulator.partial()
    accumulator.reset()
    assert accumulator.partial() == PartialSum.empty(SMALL_SPEC)
    accumulator.restore(PartialSum.from_bytes(snapshot.to_bytes(), SMALL_SPEC))
    assert accumulator.partial() == snapshot
    accumulator.add(*updates[0])
    assert accumulator.partial() != snapshot
    with pytest.raises(ValueError, match="another model"):
        accumulator.restore(PartialSum.empty(LENET_SPEC))


def test_partial_is_a_snapshot() -> None:
    accumulator = FedAvgAccumulator(SMALL_SPEC, CPU)
    accumulator.add(good_update(), 1)
    snapshot = accumulator.partial()
    accumulator.add(good_update(), 1)
    assert snapshot.update_count == 1
    assert torch.equal(snapshot.sums[0], torch.ones(12))


def test_finalize_refuses_overflow_and_a_mismatched_previous_model() -> None:
    huge = np.full(3, 3e38, dtype=np.float32)
    accumulator = FedAvgAccumulator(SMALL_SPEC, CPU)
    accumulator.add([("a.bias", huge)], 1)
    accumulator.add([("a.bias", huge)], 1)
    with pytest.raises(AggregationError, match=r"'a\.bias'"):
        finalize(accumulator.partial(), ModelWeights.zeros(SMALL_SPEC))
    with pytest.raises(ValueError, match="expects"):
        finalize(PartialSum.empty(SMALL_SPEC), ModelWeights.zeros(LENET_SPEC))


def test_partial_sum_validates_its_fields() -> None:
    empty = PartialSum.empty(SMALL_SPEC)
    with pytest.raises(ValueError, match="data sizes exactly when"):
        PartialSum(spec=SMALL_SPEC, sums=empty.sums, data_sizes=(1, 0, 0, 0), update_count=0)
    with pytest.raises(ValueError, match="shape"):
        PartialSum(
            spec=SMALL_SPEC, sums=(torch.zeros(3), *empty.sums[1:]), data_sizes=(0,) * 4, update_count=0
        )
    with pytest.raises(ValueError, match="one sum"):
        PartialSum(spec=SMALL_SPEC, sums=empty.sums[:2], data_sizes=(0,) * 4, update_count=0)


# ------------------------------------------------------------------------------------------ encoding


def some_partial(seed: int, spec: ModelSpec = SMALL_SPEC, count: int = 3) -> PartialSum:
    rng = np.random.default_rng(seed)
    return accumulate(spec, random_updates(spec, rng, count, subsets=True)).partial()


def test_encoding_layout() -> None:
    partial = some_partial(0)
    data = partial.to_bytes()
    header = 4 + 2 + 2 + 4 + 8 + sum(2 + len(name.encode()) + 16 for name in SMALL_SPEC.names)
    assert len(data) == header + 4 * SMALL_SPEC.total_elements + 4
    assert data[:4] == b"FLPS"
    assert int.from_bytes(data[4:6], "little") == 1
    assert int.from_bytes(data[8:12], "little") == len(SMALL_SPEC)
    assert int.from_bytes(data[12:20], "little") == partial.update_count
    assert int.from_bytes(data[-4:], "little") == zlib.crc32(data[:-4])
    payload = np.frombuffer(data[header:-4], dtype="<f4")
    assert np.array_equal(payload, torch.cat(partial.sums).numpy())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(0, 5))
def test_encoding_round_trip(seed: int, count: int) -> None:
    partial = some_partial(seed, count=count)
    for form in (bytes, bytearray, memoryview):
        assert PartialSum.from_bytes(form(partial.to_bytes()), SMALL_SPEC) == partial


ENCODED = some_partial(7).to_bytes()


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, len(ENCODED) - 1))
def test_truncated_bytes_are_refused(cut: int) -> None:
    with pytest.raises(FrameError):
        PartialSum.from_bytes(ENCODED[:cut], SMALL_SPEC)


@settings(max_examples=300, deadline=None)
@given(position=st.integers(0, len(ENCODED) - 1), flip=st.integers(1, 255))
def test_any_garbled_byte_is_refused(position: int, flip: int) -> None:
    garbled = bytearray(ENCODED)
    garbled[position] ^= flip
    with pytest.raises(FrameError):
        PartialSum.from_bytes(bytes(garbled), SMALL_SPEC)


@settings(max_examples=100, deadline=None)
@given(junk=st.binary(max_size=400), extra=st.binary(min_size=1, max_size=8))
def test_junk_and_extended_bytes_are_refused(junk: bytes, extra: bytes) -> None:
    with pytest.raises(FrameError):
        PartialSum.from_bytes(junk, SMALL_SPEC)
    with pytest.raises(FrameError):
        PartialSum.from_bytes(ENCODED + extra, SMALL_SPEC)


def test_bytes_for_another_model_are_refused() -> None:
    renamed = ModelSpec([("a.weight", (3, 4)), ("a.bias", (3,)), ("b.weight", (2, 3)), ("b.beta", (2,))])
    with pytest.raises(FrameError, match=r"'b\.beta'"):
        PartialSum.from_bytes(ENCODED, renamed)
    resized = ModelSpec([("a.weight", (3, 4)), ("a.bias", (3,)), ("b.weight", (2, 3)), ("b.bias", (3,))])
    with pytest.raises(FrameError, match="elements"):
        PartialSum.from_bytes(ENCODED, resized)
    with pytest.raises(FrameError, match="tensors"):
        PartialSum.from_bytes(ENCODED, LENET_SPEC)


def test_encoding_never_unpickles() -> None:
    with pytest.raises(FrameError):
        PartialSum.from_bytes(pickle.dumps({"sums": [1.0]}), SMALL_SPEC)


# ------------------------------------------------------------------------------------------ device


def test_resolve_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")


@pytest.mark.parametrize("name", ["", "tpu", "cuda:x", "cuda:-1", "cpu:1", "gpu"])
def test_resolve_refuses_unknown_names(name: str) -> None:
    with pytest.raises(ConfigError, match="aggregation device"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_resolve_refuses_cuda_without_cuda(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"torch\.cuda\.is_available\(\) is false"):
        resolve_device(name)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device; torch.cuda.is_available() is false"
)
def test_cuda_accumulator_matches_cpu_bit_for_bit() -> None:
    device = resolve_device("cuda")
    assert device.type == "cuda"
    with pytest.raises(ConfigError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    rng = np.random.default_rng(9)
    updates = random_updates(LENET_SPEC, rng, 9, subsets=True)
    on_gpu = FedAvgAccumulator(LENET_SPEC, device)
    for maps, size in updates:
        on_gpu.add(maps, size)
    with pytest.raises(UpdateRejected):
        on_gpu.add(BAD_UPDATES[5][1], 3)
    gpu_partial = on_gpu.partial()
    assert all(s.device.type == "cpu" for s in gpu_partial.sums)
    assert gpu_partial == accumulate(LENET_SPEC, updates).partial()


# ------------------------------------------------------------------------------------------ checkpoints


def plain_weights(seed: int) -> tuple[ModelSpec, ModelWeights, Plain]:
    torch.manual_seed(seed)
    module = Plain()
    spec = ModelSpec.from_module(module)
    return spec, ModelWeights.from_state_dict(module.state_dict(), spec), module


def test_checkpoint_name_is_the_originals() -> None:
    assert checkpoint_name("lenet", 5) == "lenet_iteration_5.ckpt"
    with pytest.raises(ConfigError):
        checkpoint_name("../evil", 1)
    with pytest.raises(ValueError):
        checkpoint_name("lenet", -1)


def test_checkpoint_is_a_plain_state_dict_loadable_with_weights_only(tmp_path: Path) -> None:
    spec, weights, module = plain_weights(0)
    path = save_checkpoint(tmp_path / "ckpt", "lenet", 4, weights, spec)
    assert path == tmp_path / "ckpt" / "lenet_iteration_4.ckpt"
    state = torch.load(path, weights_only=True)
    assert list(state) == list(spec.names)
    fresh = Plain()
    fresh.load_state_dict(state)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, module.state_dict()[name])
    loaded = load_latest_checkpoint(tmp_path / "ckpt", "lenet", spec)
    assert loaded is not None
    assert loaded[0] == 4
    assert loaded[1] == weights
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["lenet_iteration_4.ckpt"]


def test_rotation_really_deletes_all_but_the_newest(tmp_path: Path) -> None:
    spec, weights, _ = plain_weights(1)
    bystanders = [
        "lenet2_iteration_1.ckpt",
        "other_iteration_1.ckpt",
        "lenet_iteration_07.ckpt",
        "lenet_iteration_1.ckpt.bak",
        "notes.txt",
    ]
    for name in bystanders:
        (tmp_path / name).write_bytes(b"not mine")
    (tmp_path / "lenet_iteration_0.ckpt").mkdir()  # a directory is not a checkpoint
    for iteration in range(1, 8):
        save_checkpoint(tmp_path, "lenet", iteration, weights, spec, keep=3)
    assert [n for n, _ in list_checkpoints(tmp_path, "lenet")] == [5, 6, 7]
    for name in bystanders:
        assert (tmp_path / name).read_bytes() == b"not mine"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert (tmp_path / "lenet_iteration_0.ckpt").is_dir()


def test_rotation_keeps_the_checkpoint_just_written(tmp_path: Path) -> None:
    spec, weights, _ = plain_weights(1)
    for iteration in (50, 51, 52):
        save_checkpoint(tmp_path, "lenet", iteration, weights, spec, keep=2)
    save_checkpoint(tmp_path, "lenet", 1, weights, spec, keep=2)
    assert [n for n, _ in list_checkpoints(tmp_path, "lenet")] == [1, 52]


def test_failed_save_leaves_the_old_checkpoint_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, weights, _ = plain_weights(2)
    save_checkpoint(tmp_path, "lenet", 3, weights, spec)
    before = (tmp_path / "lenet_iteration_3.ckpt").read_bytes()

    def broken_save(obj: object, handle: Any) -> None:
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    _, other, _ = plain_weights(3)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, "lenet", 3, other, spec)
    assert (tmp_path / "lenet_iteration_3.ckpt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet_iteration_3.ckpt"]


def test_load_latest_ignores_other_files_and_handles_missing(tmp_path: Path) -> None:
    spec, weights, _ = plain_weights(4)
    assert load_latest_checkpoint(tmp_path / "missing", "lenet", spec) is None
    assert load_latest_checkpoint(tmp_path, "lenet", spec) is None
    (tmp_path / "lenet_iteration_99.ckpt.tmp").write_bytes(b"junk")
    (tmp_path / "lenetX_iteration_99.ckpt").write_bytes(b"junk")
    save_checkpoint(tmp_path, "lenet", 2, weights, spec)
    _, newer, _ = plain_weights(5)
    save_checkpoint(tmp_path, "lenet", 10, newer, spec)
    loaded = load_latest_checkpoint(tmp_path, "lenet", spec)
    assert loaded is not None
    assert loaded[0] == 10
    assert loaded[1] == newer


def test_corrupt_latest_checkpoint_is_refused_clearly(tmp_path: Path) -> None:
    spec, weights, _ = plain_weights(6)
    save_checkpoint(tmp_path, "lenet", 1, weights, spec)
    (tmp_path / "lenet_iteration_2.ckpt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"lenet_iteration_2\.ckpt"):
        load_latest_checkpoint(tmp_path, "lenet", spec)


class Payload:
    """An arbitrary object: weights_only loading must refuse to build it."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.getenv, ("HOME",))


def test_checkpoint_with_code_is_refused_not_run(tmp_path: Path) -> None:
    spec, _, _ = plain_weights(7)
    path = tmp_path / "lenet_iteration_1.ckpt"
    torch.save({"conv.weight": Payload()}, path)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path, spec)


def test_checkpoint_for_another_model_is_refused(tmp_path: Path) -> None:
    spec, _, _ = plain_weights(8)
    torch.save({"conv.weight": torch.zeros(2, 1, 3, 3)}, tmp_path / "lenet_iteration_1.ckpt")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_latest_checkpoint(tmp_path, "lenet", spec)
    torch.save([torch.zeros(1)], tmp_path / "lenet_iteration_2.ckpt")
    with pytest.raises(CheckpointError, match="state dict of tensors"):
        load_latest_checkpoint(tmp_path, "lenet", spec)


def test_checkpoint_of_a_module_with_integer_buffers_loads(tmp_path: Path) -> None:
    module = Net()
    spec = ModelSpec.from_module(module)
    torch.save(module.state_dict(), tmp_path / "net_iteration_0.ckpt")
    loaded = load_latest_checkpoint(tmp_path, "net", spec)
    assert loaded is not None
    assert loaded[1] == ModelWeights.from_state_dict(module.state_dict(), spec)


# ------------------------------------------------------------------------------------------ metrics

METRIC_KEYS = {
    "instanceName",
    "startTime",
    "endTime",
    "flName",
    "instanceStatus",
    "flIterationNum",
    "currentIteration",
    "metricsAuc",
    "metricsLoss",
    "iterationExecutionTime",
    "clientVisitedInfo",
    "iterationResult",
}

VISITED_KEYS = {
    f"{round_name}{kind}ClientNum"
    for round_name in ("startFLJob", "updateModel", "getModel")
    for kind in ("Total", "Accept", "Reject")
} | {f"participationTimeLevel{level}" for level in (1, 2, 3)}


def iteration_metrics(iteration: int, *, result: bool = True, loss: float = 0.25) -> IterationMetrics:
    return IterationMetrics(
        instance_name="instance_1",
        start_time_ms=1_700_000_000_123,
        end_time_ms=1_700_000_012_345,
        fl_name="lenet",
        instance_status="running",
        fl_iteration_num=25,
        current_iteration=iteration,
        metrics_auc=0.5,
        metrics_loss=loss,
        iteration_execution_time_ms=12_222,
        client_visited_info=ClientVisitedInfo(
            start_fl_job_total=10, start_fl_job_accept=8, start_fl_job_reject=2
        ),
        iteration_result=result,
    )


def test_metrics_writer_appends_one_line_per_iteration(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path / "metrics" / "metrics.json", tz=dt.UTC)
    writer.write(iteration_metrics(1))
    writer.write(iteration_metrics(2, result=False, loss=math.nan))
    lines = writer.path.read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert set(first) == METRIC_KEYS
    assert set(first["clientVisitedInfo"]) == VISITED_KEYS
    assert first["startTime"] == "2023-11-14 22:13:20.123"
    assert first["endTime"] == "2023-11-14 22:13:32.345"
    assert first["currentIteration"] == 1
    assert first["iterationResult"] == "success"
    assert first["iterationExecutionTime"] == 12_222
    assert first["clientVisitedInfo"]["startFLJobAcceptClientNum"] == 8
    assert first["clientVisitedInfo"]["getModelTotalClientNum"] == 0
    assert second["iterationResult"] == "fail"
    assert second["metricsLoss"] is None
    # Written like the original's nlohmann::json: sorted keys, compact.
    assert lines[0] == json.dumps(first, sort_keys=True, separators=(",", ":"))


def test_metrics_default_to_local_time() -> None:
    line = iteration_metrics(1).to_json_dict()
    local = dt.datetime.fromtimestamp(1_700_000_000).strftime("%Y-%m-%d %H:%M:%S")
    assert line["startTime"] == f"{local}.123"


def test_metrics_refuse_bad_values() -> None:
    with pytest.raises(ValueError):
        IterationMetrics(
            instance_name="i",
            start_time_ms=0,
            end_time_ms=0,
            fl_name="f",
            instance_status="stopped",  # type: ignore[arg-type]
            fl_iteration_num=1,
            current_iteration=1,
            metrics_auc=0.0,
            metrics_loss=0.0,
            iteration_execution_time_ms=0,
        )
    with pytest.raises(ValueError):
        ClientVisitedInfo(update_model_total=-1)
