"""Data sets for the device simulator: images shaped for LeNet-5 (N×3×32×32 float32, labels int64).

Three sources, none of which touches the network:

- :func:`load_digits_dataset`: scikit-learn's shipped 8×8 hand-written digits (1 797 images, 10 classes),
  scaled to [0, 1], resized bilinearly to 32×32 and repeated to 3 channels. Always available (scikit-learn is
  an extra of flcluster).
- :func:`load_mnist_idx`: the four standard MNIST IDX files from a local folder, plain or gzipped; 28×28
  images are centred in 32×32 with a zero border (the classic LeNet-5 input).
- :func:`load_leaf_femnist`: LEAF's FEMNIST JSON (``train/`` and ``test/`` folders), one data set per writer,
  62 classes: a natural non-IID partition.

For synthetic partitions, :func:`dirichlet_partition` splits sample indices across devices with a seeded
per-class Dirichlet draw (small ``alpha`` = more skewed), then moves single samples from the largest devices
to any device below ``min_size``, so every device ends up with at least ``min_size`` samples and every sample
lands on exactly one device.

A bad path or a corrupt file raises :class:`~flcluster.errors.ConfigError` naming the file and what was wrong.
The 3-channel tensors of the file loaders are expanded views of one grey channel (no copy), so the full MNIST
training set takes about 250 MB rather than 740 MB; treat ``Dataset.x`` as read-only.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt
import torch
from torch.nn import functional as F

from flcluster.client.lenet import LENET_INPUT_SIDE
from flcluster.errors import ConfigError

__all__ = [
    "FEMNIST_NUM_CLASSES",
    "Dataset",
    "dirichlet_partition",
    "load_digits_dataset",
    "load_leaf_femnist",
    "load_mnist_idx",
    "train_test_split",
]

FEMNIST_NUM_CLASSES = 62
"""FEMNIST's classes: 10 digits, 26 upper-case and 26 lower-case letters."""

_CHANNELS = 3
_FEMNIST_SIDE = 28


def _check_x(instance: Dataset, attribute: attrs.Attribute[torch.Tensor], value: torch.Tensor) -> None:
    side = LENET_INPUT_SIDE
    if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
        raise ValueError(f"Dataset.x must be a float32 torch.Tensor, got {value!r:.80}")
    if value.ndim != 4 or tuple(value.shape[1:]) != (_CHANNELS, side, side):
        raise ValueError(f"Dataset.x must be N×{_CHANNELS}×{side}×{side}, got shape {tuple(value.shape)!r}")


def _check_y(instance: Dataset, attribute: attrs.Attribute[torch.Tensor], value: torch.Tensor) -> None:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.int64 or value.ndim != 1:
        raise ValueError(f"Dataset.y must be a 1-D int64 torch.Tensor, got {value!r:.80}")
    if value.numel() and int(value.min()) < 0:
        raise ValueError(f"Dataset.y must hold class indices >= 0, got minimum {int(value.min())!r}")
    if value.shape[0] != instance.x.shape[0]:
        raise ValueError(
            f"Dataset.x and Dataset.y must have as many rows: x has {instance.x.shape[0]!r}, "
            f"y has {value.shape[0]!r}"
        )


@attrs.frozen(eq=False)
class Dataset:
    """Images and labels, ready for :class:`~flcluster.client.lenet.LeNet5`.

    Attributes:
        x: ``N×3×32×32`` float32 images (may be an expanded, read-only view).
        y: ``N`` int64 class indices.
    """

    x: torch.Tensor = attrs.field(validator=_check_x)
    y: torch.Tensor = attrs.field(validator=_check_y)

    def __len__(self) -> int:
        """Number of samples."""
        return int(self.y.shape[0])

    def subset(self, indices: npt.ArrayLike | torch.Tensor) -> Dataset:
        """The samples at ``indices``, copied, in that order.

        Args:
            indices: Integer sample indices (numpy array, sequence or tensor).

        Returns:
            A new data set.
        """
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return Dataset(x=self.x[index].contiguous(), y=self.y[index].clone())


def _to_lenet_images(grey: torch.Tensor) -> torch.Tensor:
    """N×H×W grey images in [0, 1] → N×3×32×32 (centred with a zero border, or resized if larger)."""
    side = LENET_INPUT_SIDE
    n, height, width = grey.shape
    if height <= side and width <= side:
        top, left = (side - height) // 2, (side - width) // 2
        grey = F.pad(grey, (left, side - width - left, top, side - height - top))
    else:
        grey = F.interpolate(grey.unsqueeze(1), size=(side, side), mode="bilinear", align_corners=False)[:, 0]
    return grey.unsqueeze(1).expand(n, _CHANNELS, side, side)


def load_digits_dataset() -> Dataset:
    """scikit-learn's shipped 8×8 digits as a LeNet-5 data set (no network access).

    Pixels (0–16) are scaled to [0, 1], resized to 32×32 with bilinear interpolation and repeated to 3
    channels.

    Returns:
        1 797 samples, labels 0–9.

    Raises:
        ConfigError: If scikit-learn (flcluster's ``examples`` extra) is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "the digits data set needs scikit-learn; install flcluster[examples] (scikit-learn>=1.4)"
        ) from exc
    bunch = load_digits()
    images = torch.as_tensor(np.asarray(bunch.images, dtype=np.float32) / 16.0)
    side = LENET_INPUT_SIDE
    resized = F.interpolate(images.unsqueeze(1), size=(side, side), mode="bilinear", align_corners=False)
    x = resized.repeat(1, _CHANNELS, 1, 1).contiguous()
    y = torch.as_tensor(np.asarray(bunch.target, dtype=np.int64))
    return Dataset(x=x, y=y)


def train_test_split(ds: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split a data set at random into a training and a test part.

    Args:
        ds: The data set.
        test_fraction: Share of samples that go to the test part, strictly between 0 and 1.
        seed: Seed of the shuffle.

    Returns:
        ``(train, test)``; the test part has ``round(len(ds) * test_fraction)`` samples.

    Raises:
        ConfigError: If ``test_fraction`` is out of range or either part would be empty.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}")
    n_test = round(len(ds) * test_fraction)
    if n_test == 0 or n_test == len(ds):
        raise ConfigError(
            f"test_fraction={test_fraction!r} of {len(ds)!r} samples leaves an empty train or test part"
        )
    order = np.random.default_rng(seed).permutation(len(ds))
    return ds.subset(order[n_test:]), ds.subset(order[:n_test])


def dirichlet_partition(
    labels: npt.ArrayLike | torch.Tensor,
    num_devices: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
) -> list[npt.NDArray[np.int64]]:
    """Split sample indices across devices, non-IID, with a seeded per-class Dirichlet draw.

    For every class the share of each device is drawn from ``Dirichlet(alpha, …, alpha)``; a small ``alpha``
    (0.1) gives each device few classes, a large one (100) is close to IID. Devices left below ``min_size``
    then receive single samples taken at random from the currently largest device until none is short.

    Args:
        labels: One class label per sample (1-D).
        num_devices: Number of devices, at least 1.
        alpha: Dirichlet concentration, > 0.
        seed: Seed of every random choice (same inputs and seed, same partition).
        min_size: Least number of samples per device, at least 1.

    Returns:
        ``num_devices`` sorted int64 index arrays that together cover every sample exactly once.

    Raises:
        ConfigError: If an argument is out of range, or ``num_devices * min_size`` exceeds the sample count.
    """
    label_array = np.asarray(labels.cpu().numpy() if isinstance(labels, torch.Tensor) else labels)
    if label_array.ndim != 1:
        raise ConfigError(f"labels must be 1-D, got shape {label_array.shape!r}")
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise ConfigError(f"num_devices must be an int >= 1, got {num_devices!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise ConfigError(f"min_size must be an int >= 1, got {min_size!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"alpha must be a finite number > 0, got {alpha!r}")
    n = label_array.shape[0]
    if num_devices * min_size > n:
        raise ConfigError(
            f"num_devices * min_size must not exceed the sample count: num_devices={num_devices!r} * "
            f"min_size={min_size!r} > {n!r} samples"
        )
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_devices)]
    for cls in np.unique(label_array):
        members = rng.permutation(np.flatnonzero(label_array == cls))
        shares = rng.dirichlet(np.full(num_devices, alpha))
        cuts = np.floor(np.cumsum(shares)[:-1] * members.shape[0]).astype(np.int64)
        for device, chunk in enumerate(np.split(members, cuts)):
            parts[device].extend(chunk.tolist())
    sizes = np.array([len(p) for p in parts])
    for device in range(num_devices):
        while sizes[device] < min_size:
            donor = int(np.argmax(sizes))
            taken = parts[donor].pop(int(rng.integers(sizes[donor])))
            parts[device].append(taken)
            sizes[donor] -= 1
            sizes[device] += 1
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


# ---------------------------------------------------------------------------------------------------------
# MNIST IDX

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx_file(directory: Path, stem: str) -> Path:
    dotted = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
    candidates = [directory / f"{name}{ext}" for name in (stem, dotted) for ext in ("", ".gz")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"MNIST file {stem!r} not found in {str(directory)!r}: expected one of "
        f"{[c.name for c in candidates]!r}"
    )


def _read_idx(path: Path, magic: int, ndim: int) -> npt.NDArray[np.uint8]:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise ConfigError(f"cannot read IDX file {str(path)!r}: {exc}") from exc
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"IDX file {str(path)!r} is truncated: {len(raw)!r} bytes, header needs {header!r}")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ConfigError(f"IDX file {str(path)!r} has magic number {found:#010x}, expected {magic:#010x}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise ConfigError(
            f"IDX file {str(path)!r} has {len(raw)!r} bytes, expected {expected!r} for dimensions {dims!r}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_mnist_split(directory: Path, split: str) -> Dataset:
    images_stem, labels_stem = _MNIST_FILES[split]
    images = _read_idx(_find_idx_file(directory, images_stem), _IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(_find_idx_file(directory, labels_stem), _IDX_LABELS_MAGIC, 1)
    if images.shape[0] != labels.shape[0]:
        raise ConfigError(
            f"MNIST {split} files disagree in {str(directory)!r}: {images.shape[0]!r} images but "
            f"{labels.shape[0]!r} labels"
        )
    grey = torch.from_numpy(images.astype(np.float32) / 255.0)
    return Dataset(x=_to_lenet_images(grey), y=torch.from_numpy(labels.astype(np.int64)))


def load_mnist_idx(directory: str | Path) -> tuple[Dataset, Dataset]:
    """Load MNIST from the four standard IDX files in ``directory`` (each plain or ``.gz``).

    The files are ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte`` (``.idx`` spelled with a dot is accepted too). Magic numbers, sizes and the
    image/label counts are checked; 28×28 images are centred in 32×32 with a zero border and shown on 3
    channels; pixels are scaled to [0, 1].

    Args:
        directory: Folder holding the files.

    Returns:
        ``(train, test)``.

    Raises:
        ConfigError: If the folder or a file is missing, unreadable or malformed.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise ConfigError(f"MNIST directory {str(folder)!r} does not exist or is not a directory")
    return _load_mnist_split(folder, "train"), _load_mnist_split(folder, "test")


# ---------------------------------------------------------------------------------------------------------
# LEAF FEMNIST


def _leaf_user_dataset(path: Path, user: str, record: Any, declared: int) -> Dataset:
    if not isinstance(record, dict) or "x" not in record or "y" not in record:
        raise ConfigError(f"LEAF file {str(path)!r}: user_data[{user!r}] must be an object with 'x' and 'y'")
    try:
        pixels = np.asarray(record["x"], dtype=np.float32)
        labels = np.asarray(record["y"], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"LEAF file {str(path)!r}: user {user!r} has non-numeric or ragged data: {exc}"
        ) from exc
    side = _FEMNIST_SIDE
    if pixels.ndim != 2 or pixels.shape[1] != side * side:
        raise ConfigError(
            f"LEAF file {str(path)!r}: user {user!r} x must be a list of {side * side!r}-pixel rows, got "
            f"shape {pixels.shape!r}"
        )
    if labels.ndim != 1 or labels.shape[0] != pixels.shape[0] or labels.shape[0] != declared:
        raise ConfigError(
            f"LEAF file {str(path)!r}: user {user!r} declares {declared!r} samples but has "
            f"{pixels.shape[0]!r} x rows and {labels.shape!r} labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= FEMNIST_NUM_CLASSES):
        raise ConfigError(
            f"LEAF file {str(path)!r}: user {user!r} labels must be in 0..{FEMNIST_NUM_CLASSES - 1}, got "
            f"{int(labels.min())!r}..{int(labels.max())!r}"
        )
    if not np.isfinite(pixels).all():
        raise ConfigError(f"LEAF file {str(path)!r}: user {user!r} has non-finite pixels")
    grey = torch.from_numpy(pixels.reshape(-1, side, side))
    return Dataset(x=_to_lenet_images(grey), y=torch.from_numpy(labels))


def _load_leaf_split(folder: Path) -> dict[str, Dataset]:
    if not folder.is_dir():
        raise ConfigError(f"LEAF folder {str(folder)!r} does not exist (expected train/ and test/ folders)")
    files = sorted(folder.glob("*.json"))
    if not files:
        raise ConfigError(f"LEAF folder {str(folder)!r} holds no *.json files")
    result: dict[str, Dataset] = {}
    for path in files:
        try:
            with path.open("rb") as fh:
                doc = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"LEAF file {str(path)!r} is not readable JSON: {exc}") from exc
        if not isinstance(doc, dict) or not {"users", "num_samples", "user_data"} <= doc.keys():
            raise ConfigError(
                f"LEAF file {str(path)!r} must be an object with 'users', 'num_samples' and 'user_data'"
            )
        users, counts, data = doc["users"], doc["num_samples"], doc["user_data"]
        if not isinstance(users, list) or not isinstance(counts, list) or len(users) != len(counts):
            raise ConfigError(
                f"LEAF file {str(path)!r}: 'users' and 'num_samples' must be lists of equal length"
            )
        if not isinstance(data, dict):
            raise ConfigError(f"LEAF file {str(path)!r}: 'user_data' must be an object")
        for user, declared in zip(users, counts, strict=True):
            if not isinstance(user, str) or user not in data:
                raise ConfigError(f"LEAF file {str(path)!r}: user {user!r} has no entry in 'user_data'")
            if user in result:
                raise ConfigError(f"LEAF file {str(path)!r}: user {user!r} appears twice in {str(folder)!r}")
            if isinstance(declared, bool) or not isinstance(declared, int):
                raise ConfigError(f"LEAF file {str(path)!r}: num_samples for {user!r} is {declared!r}")
            result[user] = _leaf_user_dataset(path, user, data[user], declared)
    return result


def load_leaf_femnist(directory: str | Path) -> tuple[dict[str, Dataset], dict[str, Dataset]]:
    """Load LEAF's FEMNIST (JSON) from ``directory/train`` and ``directory/test``, one data set per writer.

    Every ``*.json`` file in each folder is read (sorted by name), in LEAF's layout
    ``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [[784 floats]], "y": [...]}}}``.
    Pixels are kept as LEAF stores them (in [0, 1]); 28×28 images are centred in 32×32 on 3 channels.

    Args:
        directory: LEAF's ``data/femnist/data`` folder (or any folder with ``train/`` and ``test/``).

    Returns:
        ``(train, test)``, each ``{user: Dataset}`` in file order; labels in 0..61.

    Raises:
        ConfigError: If a folder is missing or a file is unreadable or inconsistent.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise ConfigError(f"LEAF directory {str(folder)!r} does not exist or is not a directory")
    return _load_leaf_split(folder / "train"), _load_leaf_split(folder / "test")
