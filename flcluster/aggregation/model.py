"""The server model's layout (:class:`ModelSpec`) and one version of its weights (:class:`ModelWeights`).

Theory of operation (spec/aggregation.md, "Model"): the server model is an ordered list of named float32
tensors, exactly as the original keeps it (a flat list of ``{name, flattened data, shape}``). Devices send
and receive every tensor *flattened*; only checkpoints and ``nn.Module`` state dicts carry the shapes. So
:class:`ModelSpec` records the names, shapes and order once, and everything else (updates, partial sums,
stored models) is a flat 1-D float32 tensor per name, checked against the spec.

:meth:`ModelSpec.check_update` is the one place a device's uploaded feature map is judged. It runs before
anything is changed, so a refused update leaves every sum as it was (spec/aggregation.md, "Update check").
What it accepted comes back as a :class:`CheckedUpdate`, which
:meth:`~flcluster.aggregation.fedavg.FedAvgAccumulator.add` takes without judging it a second time; any other
sequence of feature maps given to ``add`` is checked there.

:func:`as_float32_tensor` and :func:`as_float32_tensors` turn (possibly read-only) numpy views of a request
body into torch tensors without copying them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import attrs
import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from flcluster.errors import UpdateRejected

FeatureMaps: TypeAlias = Sequence[tuple[str, npt.NDArray[Any]]]
"""A device's uploaded weights: ``(name, flat array)`` pairs in the order the device sent them."""

MAX_NAME_BYTES = 0xFFFF
"""Longest tensor name, in UTF-8 bytes (the partial-sum encoding stores the length as a u16)."""

# torch warns once per process when it wraps a read-only numpy array; see as_float32_tensor.
_READ_ONLY_WARNING = r"The given NumPy array is not writable"
_FLOAT32 = np.dtype(np.float32)


@attrs.frozen(eq=False)
class CheckedUpdate:
    """A device's update that :meth:`ModelSpec.check_update` accepted; only that method makes one.

    It keeps its own tuple of the pairs it judged, so what is added later is exactly what was checked. The
    arrays are shared, not copied: they must not be written to afterwards (decoded request bodies are
    read-only views, so they cannot be).

    Attributes:
        spec: The model the update was checked against.
        feature_maps: The ``(name, array)`` pairs that were checked, in the order given.
        indices: The model position of each pair, in the same order.
    """

    spec: ModelSpec
    feature_maps: tuple[tuple[str, npt.NDArray[np.float32]], ...]
    indices: tuple[int, ...]
    _issuer: object = attrs.field(repr=False)

    @_issuer.validator
    def _made_by_check_update(self, attribute: attrs.Attribute[object], value: object) -> None:
        if value is not _CHECK_UPDATE:
            raise TypeError("a CheckedUpdate is made only by ModelSpec.check_update")


_CHECK_UPDATE = object()  # the issuer token only ModelSpec.check_update passes


def _normalise_tensors(value: Iterable[tuple[str, Iterable[int]]]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((name, tuple(shape)) for name, shape in value)


def _check_tensors(
    instance: ModelSpec, attribute: attrs.Attribute[Any], value: tuple[tuple[str, tuple[int, ...]], ...]
) -> None:
    if not value:
        raise ValueError("a model needs at least one float tensor; got none")
    seen: set[str] = set()
    for name, shape in value:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a tensor name must be a non-empty string, got {name!r}")
        if len(name.encode()) > MAX_NAME_BYTES:
            raise ValueError(f"tensor name {name[:40]!r}… is longer than {MAX_NAME_BYTES} UTF-8 bytes")
        if name in seen:
            raise ValueError(f"tensor name {name!r} appears twice; names must be unique")
        seen.add(name)
        for dim in shape:
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
                raise ValueError(f"tensor {name!r} has shape {shape!r}; dimensions must be integers >= 0")


def _element_count(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


@attrs.frozen
class ModelSpec:
    """The ordered names and shapes of the model's float32 tensors.

    Attributes:
        tensors: ``(name, shape)`` pairs in model order (the order of the module's ``state_dict``).
    """

    tensors: tuple[tuple[str, tuple[int, ...]], ...] = attrs.field(
        converter=_normalise_tensors, validator=_check_tensors
    )
    _index: dict[str, int] = attrs.field(init=False, repr=False, eq=False, hash=False)
    _sizes: tuple[int, ...] = attrs.field(init=False, repr=False, eq=False, hash=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_index", {name: i for i, (name, _) in enumerate(self.tensors)})
        object.__setattr__(self, "_sizes", tuple(_element_count(shape) for _, shape in self.tensors))

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> ModelSpec:
        """The spec of a state dict: its floating-point tensors, in its order.

        Integer and boolean entries (``num_batches_tracked`` and the like) are not part of the federated
        model and are left out.

        Raises:
            ValueError: the state dict has no floating-point tensor.
        """
        return cls(
            (name, tuple(tensor.shape)) for name, tensor in state_dict.items() if tensor.is_floating_point()
        )

    @classmethod
    def from_module(cls, module: nn.Module) -> ModelSpec:
        """The spec of a torch module: the floating tensors of ``module.state_dict()``, in that order."""
        return cls.from_state_dict(module.state_dict())

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def names(self) -> tuple[str, ...]:
        """Tensor names in model order."""
        return tuple(name for name, _ in self.tensors)

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """Tensor shapes in model order."""
        return tuple(shape for _, shape in self.tensors)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Element count of each tensor, in model order."""
        return self._sizes

    @property
    def total_elements(self) -> int:
        """Element count of the whole model (66 404 for the LeNet5(62) example)."""
        return sum(self._sizes)

    def index(self, name: str) -> int:
        """Position of tensor ``name`` in model order.

        Raises:
            KeyError: no tensor has that name.
        """
        return self._index[name]

    def shape_of(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name``.

        Raises:
            KeyError: no tensor has that name.
        """
        return self.tensors[self._index[name]][1]

    def check_update(self, feature_maps: FeatureMaps) -> CheckedUpdate:
        """Judge a device's uploaded weights before anything is added (spec/aggregation.md, "Update check").

        A device may send any non-empty subset of the model's tensors, in any order (the original rule),
        but each must be a known name, sent once, float32, with exactly the tensor's element count, and
        hold only finite values.

        Args:
            feature_maps: ``(name, array)`` pairs as decoded from the request; arrays may be read-only.

        Returns:
            The accepted update: the pairs and the model position of each, in the order given, to pass
            to :meth:`~flcluster.aggregation.fedavg.FedAvgAccumulator.add` (which then does not check them
            again).

        Raises:
            UpdateRejected: the first broken rule, naming the tensor, the bad value and what was expected.
        """
        if len(feature_maps) == 0:
            raise UpdateRejected("an update must carry at least one weight; it carried none")
        seen: set[str] = set()
        indices: list[int] = []
        pairs = tuple(feature_maps)
        for name, array in pairs:
            index = self._index.get(name)
            if index is None:
                raise UpdateRejected(
                    f"weight {name!r} is not in the server model; expected one of {len(self)} names "
                    f"such as {self.tensors[0][0]!r}"
                )
            if name in seen:
                raise UpdateRejected(
                    f"weight {name!r} appears twice in one update; each weight may be sent once"
                )
            seen.add(name)
            if not isinstance(array, np.ndarray):
                raise UpdateRejected(f"weight {name!r} is a {type(array).__name__}, expected a numpy array")
            if array.dtype is not _FLOAT32 and array.dtype != np.float32:
                raise UpdateRejected(f"weight {name!r} has dtype {array.dtype.str!r}, expected float32")
            expected = self._sizes[index]
            if array.size != expected:
                raise UpdateRejected(
                    f"weight {name!r} has {array.size} elements, expected exactly {expected} "
                    f"(shape {self.tensors[index][1]!r})"
                )
            if not np.isfinite(array).all():
                finite = np.isfinite(array)
                bad = int(finite.size - np.count_nonzero(finite))
                first = int(np.argmin(finite.reshape(-1)))
                raise UpdateRejected(
                    f"weight {name!r} holds {bad} NaN or Inf value(s) (first at flat index {first}, "
                    f"{array.reshape(-1)[first]!r}); every value must be finite"
                )
            indices.append(index)
        return CheckedUpdate(self, pairs, tuple(indices), _CHECK_UPDATE)


def as_float32_tensor(array: npt.NDArray[Any]) -> torch.Tensor:
    """A flat torch view of a float32 numpy array, sharing its memory (no copy when it is contiguous).

    Request bodies are decoded as read-only numpy views of the received bytes. ``torch.from_numpy`` wraps
    them without copying but warns (once per process) that torch has no read-only tensors, so a write
    through the tensor would change the buffer. Every caller in this package only *reads* the tensor
    (it is the right-hand side of an ``add_`` or the source of a device copy), so that specific warning is
    silenced here, deliberately, rather than paying for a defensive copy. Only that message is filtered,
    and only around the ``from_numpy`` calls (once for a whole update in :func:`as_float32_tensors`).
    (``warnings.catch_warnings`` swaps the process-wide filter list; it is entered only when an array is
    read-only, on the thread that runs aggregation.) A non-contiguous array is flattened into a fresh,
    writable copy (one copy, no warning).

    Raises:
        TypeError: the array is not float32 (callers check with :meth:`ModelSpec.check_update` first).
    """
    return as_float32_tensors((array,))[0]


def as_float32_tensors(arrays: Iterable[npt.NDArray[Any]]) -> list[torch.Tensor]:
    """:func:`as_float32_tensor` of each array, with the warning filter entered once for all of them.

    Raises:
        TypeError: an array is not float32; no tensor is made.
    """
    flats = []
    for array in arrays:
        if array.dtype is not _FLOAT32 and array.dtype != np.float32:
            raise TypeError(f"expected a float32 array, got dtype {array.dtype.str!r}")
        flats.append(array.reshape(-1))
    if all(flat.flags.writeable for flat in flats):
        return [torch.from_numpy(flat) for flat in flats]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_READ_ONLY_WARNING, category=UserWarning)
        return [torch.from_numpy(flat) for flat in flats]


def _check_flat_tensor(name: str, tensor: object) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"weight {name!r} is a {type(tensor).__name__}, expected a torch tensor")
    if tensor.dtype != torch.float32 or tensor.dim() != 1 or tensor.device.type != "cpu":
        raise ValueError(
            f"weight {name!r} is {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}; "
            "expected a 1-D float32 tensor on the CPU"
        )
    if tensor.requires_grad or not tensor.is_contiguous():
        raise ValueError(f"weight {name!r} must be contiguous and must not require grad")
    return tensor


class ModelWeights(Mapping[str, torch.Tensor]):
    """One version of the model: an immutable ordered mapping name → flat (1-D) float32 CPU tensor.

    The mapping itself cannot change. The tensors are shared, not copied, between the holders of a
    version (the model store, the response cache, a checkpoint writer), so nobody may write into them:
    every function here that produces a new version allocates new tensors.
    """

    __slots__ = ("_tensors",)

    def __init__(self, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take ownership of flat tensors (no copy).

        Raises:
            ValueError: a name repeats, or a tensor is not a contiguous 1-D float32 CPU tensor.
        """
        items = tensors.items() if isinstance(tensors, Mapping) else tensors
        checked: dict[str, torch.Tensor] = {}
        for name, tensor in items:
            if name in checked:
                raise ValueError(f"weight {name!r} appears twice")
            checked[name] = _check_flat_tensor(name, tensor)
        self._tensors = checked

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], spec: ModelSpec) -> ModelWeights:
        """Copy the floating tensors of a state dict, flattened, as float32, in spec order.

        Non-floating entries are ignored (as in :meth:`ModelSpec.from_state_dict`).

        Raises:
            ValueError: the floating names differ from the spec's, a shape differs, or a value is not
                finite.
        """
        floating = {name: t for name, t in state_dict.items() if t.is_floating_point()}
        missing = [name for name in spec.names if name not in floating]
        known = set(spec.names)
        extra = [name for name in floating if name not in known]
        if missing or extra:
            raise ValueError(
                f"state dict does not match the model: missing {missing!r}, unexpected {extra!r}"
            )
        flat: dict[str, torch.Tensor] = {}
        for name, shape in spec.tensors:
            tensor = floating[name]
            if tuple(tensor.shape) != shape:
                raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)!r}, expected {shape!r}")
            copied = tensor.detach().to(device="cpu", dtype=torch.float32, copy=True).reshape(-1)
            if not bool(torch.isfinite(copied).all()):
                raise ValueError(f"tensor {name!r} holds NaN or Inf values; a model must be finite")
            flat[name] = copied.contiguous()
        return cls(flat)

    @classmethod
    def zeros(cls, spec: ModelSpec) -> ModelWeights:
        """An all-zero model of the given spec."""
        return cls(
            (name, torch.zeros(size, dtype=torch.float32))
            for name, size in zip(spec.names, spec.sizes, strict=True)
        )

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __eq__(self, other: object) -> bool:
        """Same names in the same order and bit-identical values."""
        if not isinstance(other, ModelWeights):
            return NotImplemented
        return list(self._tensors) == list(other._tensors) and all(
            torch.equal(a, b) for a, b in zip(self._tensors.values(), other._tensors.values(), strict=True)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ModelWeights({len(self)} tensors, {self.total_elements} elements)"

    @property
    def total_elements(self) -> int:
        """Element count over all tensors."""
        return sum(t.numel() for t in self._tensors.values())

    def check_spec(self, spec: ModelSpec) -> None:
        """Check that these weights are exactly the spec's tensors, in its order, with its sizes.

        Raises:
            ValueError: naming the first difference.
        """
        if tuple(self._tensors) != spec.names:
            raise ValueError(
                f"weights hold tensors {list(self._tensors)!r}, the model expects {list(spec.names)!r}"
            )
        for (name, tensor), size in zip(self._tensors.items(), spec.sizes, strict=True):
            if tensor.numel() != size:
                raise ValueError(f"weight {name!r} has {tensor.numel()} elements, the model expects {size}")

    def to_state_dict(self, spec: ModelSpec) -> dict[str, torch.Tensor]:
        """A state dict of fresh tensors in the spec's shapes, loadable into the module.

        Raises:
            ValueError: the weights do not match the spec (see :meth:`check_spec`).
        """
        self.check_spec(spec)
        return {name: self._tensors[name].reshape(shape).clone() for name, shape in spec.tensors}
