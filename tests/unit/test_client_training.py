"""LeNet-5, the data sets and local training of the device simulator (flcluster.client)."""

from __future__ import annotations

import gzip
import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flcluster.client.datasets import (
    FEMNIST_NUM_CLASSES,
    Dataset,
    dirichlet_partition,
    load_digits_dataset,
    load_leaf_femnist,
    load_mnist_idx,
    train_test_split,
)
from flcluster.client.lenet import LENET_TENSOR_ORDER, LeNet5, lenet_shapes, make_lenet, ordered_weights
from flcluster.client.training import LocalResult, evaluate, lenet_from_weights, premultiply, train_local
from flcluster.errors import ConfigError

EXPECTED_SIZES = {
    "conv1.weight": 450,
    "conv2.weight": 2400,
    "fc1.weight": 48000,
    "fc2.weight": 10080,
    "fc3.weight": 5208,
    "fc1.bias": 120,
    "fc2.bias": 84,
    "fc3.bias": 62,
}


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits_dataset()


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # On a small shared machine two OpenMP threads that lose their core to another process spin at every
    # barrier and make LeNet steps 10-20× slower; the library leaves the thread count alone, the test picks 1.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _random_dataset(n: int, num_classes: int = 10, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g)
    return Dataset(x=x, y=torch.randint(0, num_classes, (n,), generator=g))


# ---------------------------------------------------------------------------------------------------------
# LeNet-5


def test_lenet_has_the_originals_tensors() -> None:
    state = LeNet5().state_dict()
    assert {name: t.numel() for name, t in state.items()} == EXPECTED_SIZES
    assert sum(t.numel() for t in state.values()) == 66_404
    assert tuple(EXPECTED_SIZES) == LENET_TENSOR_ORDER
    assert {name: tuple(t.shape) for name, t in state.items()} == lenet_shapes()
    assert tuple(state["conv1.weight"].shape) == (6, 3, 5, 5)
    assert all(t.dtype == torch.float32 for t in state.values())
    assert LeNet5()(torch.zeros(4, 3, 32, 32)).shape == (4, 62)


def test_lenet_other_sizes() -> None:
    model = LeNet5(num_classes=10, num_channels=1)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    assert {n: tuple(t.shape) for n, t in model.state_dict().items()} == lenet_shapes(10, 1)
    with pytest.raises(ValueError, match="num_classes"):
        LeNet5(num_classes=0)
    with pytest.raises(ValueError, match="num_channels"):
        LeNet5(num_channels=True)


def test_make_lenet_is_seeded_and_leaves_global_rng_alone() -> None:
    before = torch.get_rng_state()
    a, b, c = make_lenet(7).state_dict(), make_lenet(7).state_dict(), make_lenet(8).state_dict()
    LeNet5()
    assert torch.equal(before, torch.get_rng_state())
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert all(not torch.equal(a[name], c[name]) for name in a)
    default, seed0 = LeNet5().state_dict(), make_lenet(0).state_dict()
    assert all(torch.equal(default[name], seed0[name]) for name in default)
    # He-scaled uniform: the bound for conv1 (fan-in 75) is sqrt(6/75).
    assert float(a["conv1.weight"].abs().max()) <= math.sqrt(6 / 75)
    assert float(a["conv1.weight"].abs().max()) > 0.8 * math.sqrt(6 / 75)


def test_ordered_weights() -> None:
    state = LeNet5().state_dict()
    shuffled = {name: state[name] for name in reversed(list(state))} | {"extra": torch.zeros(1)}
    assert list(ordered_weights(shuffled)) == [*LENET_TENSOR_ORDER, "extra"]


# ---------------------------------------------------------------------------------------------------------
# Dataset, digits, splits


def test_dataset_validation() -> None:
    x, y = torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.int64)
    assert len(Dataset(x=x, y=y)) == 2
    with pytest.raises(ValueError, match="float32"):
        Dataset(x=x.double(), y=y)
    with pytest.raises(ValueError, match=r"N×3×32×32"):
        Dataset(x=torch.zeros(2, 1, 32, 32), y=y)
    with pytest.raises(ValueError, match="int64"):
        Dataset(x=x, y=y.int())
    with pytest.raises(ValueError, match="as many rows"):
        Dataset(x=x, y=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=">= 0"):
        Dataset(x=x, y=torch.tensor([0, -1]))


def test_digits(digits: Dataset) -> None:
    assert digits.x.shape == (1797, 3, 32, 32)
    assert digits.x.dtype == torch.float32 and digits.y.dtype == torch.int64
    assert float(digits.x.min()) >= 0.0 and float(digits.x.max()) <= 1.0
    assert float(digits.x.max()) > 0.9
    assert sorted(set(digits.y.tolist())) == list(range(10))
    assert torch.equal(digits.x[:, 0], digits.x[:, 1]) and torch.equal(digits.x[:, 0], digits.x[:, 2])


def test_train_test_split() -> None:
    n = 50
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 3, 32, 32)
    ds = Dataset(x=x, y=torch.arange(n))
    train, test = train_test_split(ds, 0.2, seed=3)
    assert (len(train), len(test)) == (40, 10)
    assert sorted(train.y.tolist() + test.y.tolist()) == list(range(n))
    assert torch.equal(train.x[:, 0, 0, 0].long(), train.y)  # rows stay with their labels
    again, _ = train_test_split(ds, 0.2, seed=3)
    other, _ = train_test_split(ds, 0.2, seed=4)
    assert torch.equal(again.y, train.y) and not torch.equal(other.y, train.y)
    for bad in (0.0, 1.0, -0.5, 0.001):
        with pytest.raises(ConfigError, match="test_fraction"):
            train_test_split(ds, bad, seed=0)


# ---------------------------------------------------------------------------------------------------------
# Dirichlet partition


def _check_partition(parts: list[np.ndarray[Any, Any]], n: int, num_devices: int, min_size: int) -> None:
    assert len(parts) == num_devices
    assert all(p.dtype == np.int64 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))  # every sample exactly once
    assert min(len(p) for p in parts) >= min_size


def test_dirichlet_partition_is_seeded_and_complete(digits: Dataset) -> None:
    parts = dirichlet_partition(digits.y, 20, 0.5, seed=1, min_size=10)
    _check_partition(parts, len(digits), 20, 10)
    same = dirichlet_partition(digits.y.numpy(), 20, 0.5, seed=1, min_size=10)
    assert all(np.array_equal(a, b) for a, b in zip(parts, same, strict=True))
    other = dirichlet_partition(digits.y, 20, 0.5, seed=2, min_size=10)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_partition_skew_follows_alpha(digits: Dataset) -> None:
    labels = digits.y.numpy()

    def mean_top_share(alpha: float) -> float:
        parts = dirichlet_partition(labels, 10, alpha, seed=0, min_size=10)
        return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))

    assert mean_top_share(0.05) > 0.6  # mostly one class per device
    assert mean_top_share(1000.0) < 0.2  # close to IID (10 classes, ~0.1 each)


def test_dirichlet_partition_min_size_with_extreme_skew() -> None:
    labels = np.repeat(np.arange(3), 100)
    parts = dirichlet_partition(labels, 12, 0.01, seed=5, min_size=25)
    _check_partition(parts, 300, 12, 25)  # exactly 300 = 12 * 25 samples: every device gets 25


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=1, max_size=200),
    num_devices=st.integers(1, 12),
    alpha=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**32 - 1),
    min_size=st.integers(1, 10),
)
def test_dirichlet_partition_invariants(
    labels: list[int], num_devices: int, alpha: float, seed: int, min_size: int
) -> None:
    if num_devices * min_size > len(labels):
        with pytest.raises(ConfigError, match="num_devices \\* min_size"):
            dirichlet_partition(labels, num_devices, alpha, seed, min_size=min_size)
        return
    parts = dirichlet_partition(labels, num_devices, alpha, seed, min_size=min_size)
    _check_partition(parts, len(labels), num_devices, min_size)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_devices": 0}, "num_devices"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"min_size": 0}, "min_size"),
        ({"num_devices": 11, "min_size": 10}, "num_devices \\* min_size"),
    ],
)
def test_dirichlet_partition_refuses_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"num_devices": 2, "alpha": 1.0, "min_size": 1} | kwargs
    with pytest.raises(ConfigError, match=match):
        dirichlet_partition(np.zeros(100, dtype=np.int64), seed=0, **args)


# ---------------------------------------------------------------------------------------------------------
# MNIST IDX


def _idx_bytes(magic: int, array: np.ndarray[Any, Any]) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_mnist(folder: Path, *, gz: bool, n_train: int = 5, n_test: int = 3) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(exist_ok=True)
    for name, array in arrays.items():
        raw = _idx_bytes(0x803 if array.ndim == 3 else 0x801, array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_idx(tmp_path: Path, gz: bool) -> None:
    arrays = _write_mnist(tmp_path, gz=gz)
    train, test = load_mnist_idx(tmp_path)
    assert train.x.shape == (5, 3, 32, 32) and test.x.shape == (3, 3, 32, 32)
    assert train.y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert test.y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"].astype(np.float32) / 255.0)
    for channel in range(3):
        assert torch.equal(test.x[:, channel, 2:30, 2:30], expected)  # centred, 2-pixel zero border
    assert float(test.x[:, :, :2].abs().sum()) == 0.0 and float(test.x[:, :, :, 30:].abs().sum()) == 0.0
    evaluate(make_lenet(0, num_classes=10).state_dict(), test)  # the model takes what the loader makes


IMAGES = "train-images-idx3-ubyte"


def _rewrite(path: Path, raw: bytes) -> None:
    path.write_bytes(raw)


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda d: (d / "t10k-labels-idx1-ubyte").unlink(), "'t10k-labels-idx1-ubyte' not found"),
        (
            lambda d: _rewrite(d / IMAGES, b"\x00\x00\x08\x01" + (d / IMAGES).read_bytes()[4:]),
            "magic number 0x00000801, expected 0x00000803",
        ),
        (lambda d: _rewrite(d / IMAGES, (d / IMAGES).read_bytes()[:-1]), "expected 3936"),
        (lambda d: _rewrite(d / "train-labels-idx1-ubyte", b"\x00\x00"), "truncated"),
        (
            lambda d: _rewrite(d / "train-labels-idx1-ubyte", _idx_bytes(0x801, np.zeros(4, dtype=np.uint8))),
            "5 images but 4 labels",
        ),
    ],
)
def test_load_mnist_idx_refuses_corrupt_files(tmp_path: Path, corrupt: Any, match: str) -> None:
    _write_mnist(tmp_path, gz=False)
    corrupt(tmp_path)
    with pytest.raises(ConfigError, match=match):
        load_mnist_idx(tmp_path)


def test_load_mnist_idx_refuses_bad_gzip_and_missing_folder(tmp_path: Path) -> None:
    _write_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(ConfigError, match="cannot read IDX file"):
        load_mnist_idx(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_mnist_idx(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------------
# LEAF FEMNIST


def _leaf_user(n: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {"x": rng.random((n, 784)).round(3).tolist(), "y": rng.integers(0, 62, n).tolist()}


def _write_leaf(folder: Path) -> dict[str, dict[str, Any]]:
    users = {"f0000_14": _leaf_user(4, 1), "f0001_41": _leaf_user(2, 2), "f0002_07": _leaf_user(3, 3)}
    users["f0000_14"]["y"][0] = 61
    for split in ("train", "test"):
        (folder / split).mkdir(parents=True)
        names = list(users)
        (folder / split / "all_data_0.json").write_text(
            json.dumps(
                {"users": names[:2], "num_samples": [4, 2], "user_data": {u: users[u] for u in names[:2]}}
            )
        )
        (folder / split / "all_data_1.json").write_text(
            json.dumps({"users": names[2:], "num_samples": [3], "user_data": {names[2]: users[names[2]]}})
        )
    return users


def test_load_leaf_femnist(tmp_path: Path) -> None:
    users = _write_leaf(tmp_path)
    train, test = load_leaf_femnist(tmp_path)
    assert list(train) == list(users) and list(test) == list(users)
    for name, record in users.items():
        ds = train[name]
        assert ds.x.shape == (len(record["y"]), 3, 32, 32)
        assert ds.y.tolist() == record["y"]
        expected = torch.tensor(record["x"], dtype=torch.float32).reshape(-1, 28, 28)
        assert torch.equal(ds.x[:, 1, 2:30, 2:30], expected)
    assert int(train["f0000_14"].y.max()) == FEMNIST_NUM_CLASSES - 1
    evaluate(make_lenet(0).state_dict(), train["f0000_14"])


def _copy(source: Path, target: Path) -> None:
    target.write_text(source.read_text())


def _edit_leaf(folder: Path, change: Any) -> None:
    path = folder / "train" / "all_data_0.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda d: _edit_leaf(d, lambda doc: doc["num_samples"].__setitem__(0, 5)), "declares 5 samples"),
        (lambda d: _edit_leaf(d, lambda doc: doc["user_data"]["f0001_41"]["x"][0].pop()), "ragged|784"),
        (
            lambda d: _edit_leaf(d, lambda doc: doc["user_data"]["f0001_41"].update(x=[[0.0] * 783] * 2)),
            "784-pixel rows",
        ),
        (lambda d: _edit_leaf(d, lambda doc: doc["user_data"]["f0001_41"]["y"].__setitem__(0, 62)), "0..61"),
        (lambda d: _edit_leaf(d, lambda doc: doc["user_data"].pop("f0001_41")), "no entry in 'user_data'"),
        (lambda d: _edit_leaf(d, lambda doc: doc.pop("num_samples")), "'users', 'num_samples'"),
        (lambda d: (d / "train" / "all_data_1.json").write_text("{not json"), "not readable JSON"),
        (lambda d: _copy(d / "train" / "all_data_1.json", d / "train" / "all_data_2.json"), "appears twice"),
        (lambda d: [p.unlink() for p in (d / "test").iterdir()], "holds no"),
        (lambda d: [p.unlink() for p in (d / "test").iterdir()] and (d / "test").rmdir(), "does not exist"),
    ],
)
def test_load_leaf_femnist_refuses_bad_files(tmp_path: Path, corrupt: Any, match: str) -> None:
    _write_leaf(tmp_path)
    corrupt(tmp_path)
    with pytest.raises(ConfigError, match=match):
        load_leaf_femnist(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Local training, evaluation, premultiplied uploads


def test_train_local_is_deterministic_and_pure() -> None:
    data = _random_dataset(40)
    weights = make_lenet(1, num_classes=10).state_dict()
    original = {name: t.clone() for name, t in weights.items()}
    rng_before, threads_before = torch.get_rng_state(), torch.get_num_threads()

    a = train_local(weights, data, epochs=2, batch_size=8, lr=0.05, seed=11)
    b = train_local(weights, data, epochs=2, batch_size=8, lr=0.05, seed=11)
    c = train_local(weights, data, epochs=2, batch_size=8, lr=0.05, seed=12)

    assert torch.equal(rng_before, torch.get_rng_state()) and torch.get_num_threads() == threads_before
    assert all(torch.equal(weights[n], original[n]) for n in weights)  # input untouched
    assert isinstance(a, LocalResult) and a.num_samples == 40 and math.isfinite(a.loss) and a.loss > 0
    assert list(a.weights) == list(LENET_TENSOR_ORDER)
    assert all(a.weights[n].shape == weights[n].shape for n in weights)
    assert a.loss == b.loss and all(torch.equal(a.weights[n], b.weights[n]) for n in a.weights)
    assert not torch.equal(a.weights["fc1.weight"], c.weights["fc1.weight"])  # the seed orders the batches
    assert not torch.equal(a.weights["fc1.weight"], weights["fc1.weight"])  # it trained


def test_train_local_takes_flat_wire_tensors() -> None:
    data = _random_dataset(10)
    weights = make_lenet(2, num_classes=10).state_dict()
    flat = {name: t.reshape(-1).clone() for name, t in weights.items()}
    a = train_local(weights, data, epochs=1, batch_size=4, lr=0.1, seed=0)
    b = train_local(flat, data, epochs=1, batch_size=4, lr=0.1, seed=0)
    assert all(torch.equal(a.weights[n], b.weights[n]) for n in a.weights)


@pytest.mark.parametrize(
    ("change", "kwargs", "match"),
    [
        (lambda w: w.pop("fc3.bias"), {}, "missing \\['fc3.bias'\\]"),
        (lambda w: w.__setitem__("fc9.bias", torch.zeros(1)), {}, "unexpected \\['fc9.bias'\\]"),
        (lambda w: w.__setitem__("fc2.bias", torch.zeros(85)), {}, "'fc2.bias' must have 84 elements"),
        (lambda w: None, {"epochs": 0}, "epochs"),
        (lambda w: None, {"batch_size": 0}, "batch_size"),
        (lambda w: None, {"lr": -0.1}, "lr"),
        (lambda w: None, {"lr": math.inf}, "lr"),
    ],
)
def test_train_local_refuses_bad_input(change: Any, kwargs: dict[str, Any], match: str) -> None:
    weights = dict(make_lenet(0, num_classes=10).state_dict())
    change(weights)
    args: dict[str, Any] = {"epochs": 1, "batch_size": 4, "lr": 0.1, "seed": 0} | kwargs
    with pytest.raises(ConfigError, match=match):
        train_local(weights, _random_dataset(8), **args)


def test_labels_beyond_the_model_and_empty_data_are_refused() -> None:
    weights = make_lenet(0, num_classes=10).state_dict()
    too_high = Dataset(x=torch.zeros(3, 3, 32, 32), y=torch.tensor([0, 11, 9]))
    with pytest.raises(ConfigError, match="label 11 is out of range for a model with 10 classes"):
        evaluate(weights, too_high)
    empty = Dataset(x=torch.zeros(0, 3, 32, 32), y=torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ConfigError, match="empty"):
        train_local(weights, empty, epochs=1, batch_size=4, lr=0.1, seed=0)


def test_evaluate_exact_on_a_constant_model() -> None:
    # Every weight zero and fc3.bias favouring class 3: the model always answers 3 with known logits.
    weights = {name: torch.zeros(shape) for name, shape in lenet_shapes(10).items()}
    weights["fc3.bias"][3] = 2.0
    data = Dataset(x=torch.rand(8, 3, 32, 32), y=torch.tensor([3, 3, 1, 0, 3, 9, 3, 5]))
    accuracy, loss = evaluate(weights, data, batch_size=3)
    log_z = math.log(math.exp(2.0) + 9)
    expected_loss = (4 * (log_z - 2.0) + 4 * log_z) / 8
    assert accuracy == 0.5
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    model = lenet_from_weights(weights)
    assert model.num_classes == 10 and model.num_channels == 3


def test_evaluate_does_not_depend_on_batch_size() -> None:
    data = _random_dataset(30)
    weights = make_lenet(4, num_classes=10).state_dict()
    a, b = evaluate(weights, data, batch_size=7), evaluate(weights, data)
    assert a[0] == b[0] and a[1] == pytest.approx(b[1], rel=1e-5)


def test_premultiply_is_weights_times_data_size() -> None:
    weights = make_lenet(3).state_dict()
    upload = premultiply(weights, 32)
    assert list(upload) == list(LENET_TENSOR_ORDER)
    for name, array in upload.items():
        assert array.dtype == np.float32 and array.ndim == 1 and array.size == EXPECTED_SIZES[name]
        np.testing.assert_array_equal(array, weights[name].numpy().reshape(-1) * np.float32(32))
    from_numpy = premultiply({name: t.numpy() for name, t in weights.items()}, 32)
    assert all(np.array_equal(from_numpy[n], upload[n]) for n in upload)
    for bad in (0, -3, True):
        with pytest.raises(ConfigError, match="data_size"):
            premultiply(weights, bad)


def _fedavg(uploads: list[dict[str, np.ndarray[Any, Any]]], sizes: list[int]) -> dict[str, torch.Tensor]:
    total = np.float32(sum(sizes))
    return {name: torch.from_numpy(sum(u[name] for u in uploads) / total) for name in uploads[0]}


def test_fedavg_of_premultiplied_uploads_is_the_weighted_mean() -> None:
    a, b = make_lenet(1).state_dict(), make_lenet(2).state_dict()
    averaged = _fedavg([premultiply(a, 30), premultiply(b, 10)], [30, 10])
    for name in a:
        expected = (0.75 * a[name] + 0.25 * b[name]).reshape(-1)
        torch.testing.assert_close(averaged[name], expected, rtol=1e-5, atol=1e-6)


def test_fedavg_over_five_devices_learns_digits(digits: Dataset) -> None:
    train, test = train_test_split(digits, 0.2, seed=0)
    train = train.subset(np.arange(600))
    devices = [train.subset(part) for part in dirichlet_partition(train.y, 5, 1.0, seed=0, min_size=20)]
    weights: dict[str, torch.Tensor] = dict(make_lenet(0, num_classes=10).state_dict())
    initial_accuracy, _ = evaluate(weights, test)
    accuracies = []
    for round_ in range(3):
        results = [
            train_local(weights, data, epochs=2, batch_size=8, lr=0.05, seed=100 * round_ + i)
            for i, data in enumerate(devices)
        ]
        uploads = [premultiply(r.weights, r.num_samples) for r in results]
        weights = _fedavg(uploads, [r.num_samples for r in results])
        accuracies.append(evaluate(weights, test)[0])
    assert initial_accuracy < 0.25  # chance is 0.1
    assert accuracies[-1] > 0.5, accuracies
