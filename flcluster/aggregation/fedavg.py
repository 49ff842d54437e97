"""FedAvg as running sums: fold each update in as it arrives, combine across Servers, divide once.

Theory of operation (spec/aggregation.md, "FedAvg"). Devices upload weights *already multiplied by their
data size* (the original's rule); the data size ``n_k`` is the one the device declared at startFLJob, which
the caller looks up and passes in. For every tensor ``t`` a Server keeps::

    S_t = sum of uploaded w_k,t      over the updates k that carried t      (float32, on the device)
    N_t = sum of n_k                 over the same updates                  (exact integer)

so memory is one model's worth of float32 plus one integer per tensor, whatever the number of updates.
Keeping ``N_t`` per tensor (not one ``N``) is the subset rule: a device may upload some of the tensors
only, and then it counts towards the average of exactly those tensors.

At the end of an iteration every Server hands over its :class:`PartialSum` (``to_bytes`` for the cluster
TCP link), they are added up in rank order with :func:`combine`, and :func:`finalize` divides:
``w_t = S_t / N_t``, or the previous value where ``N_t == 0`` (nobody sent ``t``).

Determinism: every step is an element-wise float32 ``add_`` in a fixed order, so the same updates in the
same order (and partials combined in the same order) give bit-identical results on a given device.

:meth:`FedAvgAccumulator.add` is all or nothing: the whole update is checked first
(:meth:`ModelSpec.check_update`), and on a GPU it is copied to the device before any sum is touched, so a
refused or failed update leaves the sums unchanged.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import attrs
import numpy as np
import torch

from flcluster.aggregation.model import (
    CheckedUpdate,
    FeatureMaps,
    ModelSpec,
    ModelWeights,
    as_float32_tensors,
)
from flcluster.errors import AggregationError, FrameError, UpdateRejected

MAGIC = b"FLPS"
"""First four bytes of an encoded :class:`PartialSum`."""
VERSION = 1
"""Encoding version written by :meth:`PartialSum.to_bytes`, the only one it reads back."""

_PREFIX = struct.Struct("<4sHHIQ")  # magic, version, flags, tensor count, update count
_NAME_LENGTH = struct.Struct("<H")
_ENTRY = struct.Struct("<QQ")  # element count, data-size total
_CRC = struct.Struct("<I")
_FLOAT = np.dtype("<f4")


def _check_partial(partial: PartialSum) -> None:
    spec = partial.spec
    if len(partial.sums) != len(spec) or len(partial.data_sizes) != len(spec):
        raise ValueError(
            f"a partial sum needs one sum and one data size per tensor ({len(spec)}), got "
            f"{len(partial.sums)} sums and {len(partial.data_sizes)} data sizes"
        )
    for (name, _), size, tensor, total in zip(
        spec.tensors, spec.sizes, partial.sums, partial.data_sizes, strict=True
    ):
        if (
            not isinstance(tensor, torch.Tensor)
            or tensor.dtype != torch.float32
            or tensor.device.type != "cpu"
        ):
            raise ValueError(f"the sum of {name!r} must be a float32 CPU tensor")
        if tensor.dim() != 1 or tensor.numel() != size or not tensor.is_contiguous():
            raise ValueError(f"the sum of {name!r} has shape {tuple(tensor.shape)!r}, expected ({size},)")
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise ValueError(f"the data-size total of {name!r} is {total!r}, expected an integer >= 0")
    count = partial.update_count
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"update count is {count!r}, expected an integer >= 0")
    if (count == 0) != all(total == 0 for total in partial.data_sizes):
        raise ValueError(
            f"update count {count} does not fit data-size totals {partial.data_sizes!r}: "
            "there are data sizes exactly when there are updates"
        )


@attrs.frozen(eq=False)
class PartialSum:
    """One Server's (or several Servers' combined) running sums for one iteration.

    Attributes:
        spec: the model the sums belong to.
        sums: per tensor, in spec order, the sum of the uploaded (pre-multiplied) weights: a flat float32
            CPU tensor that nobody writes into.
        data_sizes: per tensor, the sum of the data sizes of the updates that carried it.
        update_count: how many updates were folded in.
    """

    spec: ModelSpec
    sums: tuple[torch.Tensor, ...]
    data_sizes: tuple[int, ...]
    update_count: int

    def __attrs_post_init__(self) -> None:
        _check_partial(self)

    @classmethod
    def empty(cls, spec: ModelSpec) -> PartialSum:
        """The partial sum of no updates."""
        return cls(
            spec=spec,
            sums=tuple(torch.zeros(size, dtype=torch.float32) for size in spec.sizes),
            data_sizes=(0,) * len(spec),
            update_count=0,
        )

    def __eq__(self, other: object) -> bool:
        """Same spec, counts and bit-identical sums."""
        if not isinstance(other, PartialSum):
            return NotImplemented
        return (
            self.spec == other.spec
            and self.data_sizes == other.data_sizes
            and self.update_count == other.update_count
            and all(torch.equal(a, b) for a, b in zip(self.sums, other.sums, strict=True))
        )

    __hash__ = None  # type: ignore[assignment]

    def to_bytes(self) -> bytes:
        """Encode for the cluster TCP link (layout: spec/aggregation.md, "Partial-sum encoding").

        Little-endian header (magic ``FLPS``, version, flags, tensor count, update count, then per tensor
        its name, element count and data-size total), the raw float32 sums in spec order, and a CRC-32
        of everything before it. No pickle anywhere.
        """
        out = bytearray(_PREFIX.pack(MAGIC, VERSION, 0, len(self.spec), self.update_count))
        for (name, _), size, total in zip(self.spec.tensors, self.spec.sizes, self.data_sizes, strict=True):
            raw = name.encode()
            out += _NAME_LENGTH.pack(len(raw))
            out += raw
            out += _ENTRY.pack(size, total)
        for tensor in self.sums:
            out += tensor.numpy().astype(_FLOAT, copy=False).tobytes()
        out += _CRC.pack(zlib.crc32(out))
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, spec: ModelSpec) -> PartialSum:
        """Decode what :meth:`to_bytes` wrote, refusing anything that is not exactly that for ``spec``.

        The structure and total length are checked first, then the CRC-32, then the names, element counts
        and counts against ``spec``; only then is the payload copied into fresh tensors.

        Raises:
            FrameError: truncated, extended, corrupted, another version, or for another model.
        """
        view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
        length = len(view)
        if length < _PREFIX.size + _CRC.size:
            raise FrameError(
                f"partial sum is {length} bytes, shorter than the {_PREFIX.size + _CRC.size}-byte minimum"
            )
        magic, version, flags, tensor_count, update_count = _PREFIX.unpack_from(view, 0)
        if magic != MAGIC:
            raise FrameError(f"partial sum starts with {bytes(magic)!r}, expected {MAGIC!r}")
        if version != VERSION or flags != 0:
            raise FrameError(
                f"partial sum has version {version} flags {flags}, expected version {VERSION} flags 0"
            )
        if tensor_count != len(spec):
            raise FrameError(f"partial sum carries {tensor_count} tensors, the model has {len(spec)}")
        offset = _PREFIX.size
        entries: list[tuple[bytes, int, int]] = []
        for _ in range(tensor_count):
            if offset + _NAME_LENGTH.size > length:
                raise FrameError(f"partial sum is truncated in its header at byte {offset}")
            (name_length,) = _NAME_LENGTH.unpack_from(view, offset)
            offset += _NAME_LENGTH.size
            if offset + name_length + _ENTRY.size > length:
                raise FrameError(f"partial sum is truncated in its header at byte {offset}")
            raw_name = bytes(view[offset : offset + name_length])
            offset += name_length
            element_count, data_size = _ENTRY.unpack_from(view, offset)
            offset += _ENTRY.size
            entries.append((raw_name, element_count, data_size))
        expected = offset + 4 * sum(count for _, count, _ in entries) + _CRC.size
        if length != expected:
            raise FrameError(f"partial sum is {length} bytes, its header says {expected}")
        (crc,) = _CRC.unpack_from(view, length - _CRC.size)
        if zlib.crc32(view[: length - _CRC.size]) != crc:
            raise FrameError("partial sum fails its CRC-32 check: the bytes were corrupted")
        sums: list[torch.Tensor] = []
        totals: list[int] = []
        for (raw_name, element_count, data_size), (name, _), size in zip(
            entries, spec.tensors, spec.sizes, strict=True
        ):
            if raw_name != name.encode():
                raise FrameError(
                    f"partial sum tensor {len(sums)} is {raw_name.decode(errors='replace')!r}, "
                    f"expected {name!r}"
                )
            if element_count != size:
                raise FrameError(f"partial sum tensor {name!r} has {element_count} elements, expected {size}")
            values = np.frombuffer(view, dtype=_FLOAT, count=element_count, offset=offset)
            sums.append(torch.from_numpy(values.astype(np.float32)))  # one copy into fresh, owned memory
            offset += 4 * element_count
            totals.append(data_size)
        try:
            return cls(spec=spec, sums=tuple(sums), data_sizes=tuple(totals), update_count=update_count)
        except ValueError as exc:
            raise FrameError(f"partial sum is inconsistent: {exc}") from exc


class FedAvgAccumulator:
    """One Server's running FedAvg sums for the current iteration (spec/aggregation.md, "FedAvg").

    Memory is one model's worth of float32 on ``device`` plus one integer per tensor, however many updates
    are added. Not thread-safe: the caller runs it on one thread at a time (behind its limiter).
    """

    def __init__(self, spec: ModelSpec, device: torch.device) -> None:
        """Allocate zeroed sums for ``spec`` on ``device`` (see :func:`resolve_device`)."""
        self._spec = spec
        self._device = device
        self._buffer = torch.zeros(spec.total_elements, dtype=torch.float32, device=device)
        self._sums: tuple[torch.Tensor, ...] = tuple(torch.split(self._buffer, list(spec.sizes)))
        self._data_sizes = [0] * len(spec)
        self._update_count = 0

    @property
    def spec(self) -> ModelSpec:
        """The model the sums belong to."""
        return self._spec

    @property
    def device(self) -> torch.device:
        """Where the sums live."""
        return self._device

    @property
    def update_count(self) -> int:
        """Updates folded in since the last reset."""
        return self._update_count

    @property
    def data_sizes(self) -> tuple[int, ...]:
        """Per tensor, the sum of the data sizes of the updates that carried it."""
        return tuple(self._data_sizes)

    @property
    def nbytes(self) -> int:
        """Bytes held by the sums (constant: it does not grow with the number of updates)."""
        return self._buffer.numel() * self._buffer.element_size()

    def add(self, update: FeatureMaps | CheckedUpdate, data_size: int) -> None:
        """Fold one device's update into the sums, or change nothing.

        The update is judged by :meth:`ModelSpec.check_update` here, unless it *is* what that method
        returned for this accumulator's spec (a :class:`CheckedUpdate`): a caller that has already checked
        passes the result instead of the feature maps, and only then is the check not repeated. A plain
        sequence is always checked.

        Args:
            update: ``(name, flat float32 array)`` pairs, already multiplied by the device's data size (a
                subset of the model's tensors is allowed; read-only arrays are read in place), or the
                :class:`CheckedUpdate` that ``spec.check_update`` made of them.
            data_size: the data size the device declared at startFLJob (not the one in updateModel).

        Raises:
            UpdateRejected: the data size is not an integer >= 1, or the update breaks a rule of
                :meth:`ModelSpec.check_update`; the sums are unchanged.
        """
        if isinstance(data_size, bool) or not isinstance(data_size, int) or data_size < 1:
            raise UpdateRejected(f"data size {data_size!r} is refused; expected an integer >= 1")
        if isinstance(update, CheckedUpdate) and (update.spec is self._spec or update.spec == self._spec):
            checked = update
        else:  # plain pairs, or checked against another spec: judge them here
            pairs = update.feature_maps if isinstance(update, CheckedUpdate) else update
            checked = self._spec.check_update(pairs)
        sources = as_float32_tensors([array for _, array in checked.feature_maps])
        if self._device.type != "cpu":
            # Copy the whole update to the device before touching any sum, so a failed copy changes nothing.
            sources = [source.to(self._device) for source in sources]
        # One call for all tensors: the same element-wise float adds as one add_ per tensor.
        torch._foreach_add_([self._sums[index] for index in checked.indices], sources)
        for index in checked.indices:
            self._data_sizes[index] += data_size
        self._update_count += 1

    def partial(self) -> PartialSum:
        """A snapshot of the sums, copied to the CPU, for exchange between Servers or for persisting."""
        return PartialSum(
            spec=self._spec,
            sums=tuple(s.detach().to(device="cpu", copy=True) for s in self._sums),
            data_sizes=tuple(self._data_sizes),
            update_count=self._update_count,
        )

    def restore(self, partial: PartialSum) -> None:
        """Replace the sums by a snapshot taken earlier (recovery after a restart).

        Raises:
            ValueError: the snapshot belongs to another model.
        """
        if partial.spec != self._spec:
            raise ValueError("the partial sum belongs to another model spec")
        for target, source in zip(self._sums, partial.sums, strict=True):
            target.copy_(source)
        self._data_sizes = list(partial.data_sizes)
        self._update_count = partial.update_count

    def reset(self) -> None:
        """Zero the sums for the next iteration (the memory is reused, not reallocated)."""
        self._buffer.zero_()
        self._data_sizes = [0] * len(self._spec)
        self._update_count = 0


def combine(partials: Sequence[PartialSum]) -> PartialSum:
    """Add up the partial sums of several Servers, in the order given (pass them in rank order).

    Float addition is not associative, so the order is part of the result; combining in rank order on
    every Server gives every Server the same bits.

    Raises:
        ValueError: no partial sums, or they belong to different model specs.
    """
    if not partials:
        raise ValueError("combine needs at least one partial sum")
    first = partials[0]
    for other in partials[1:]:
        if other.spec != first.spec:
            raise ValueError("cannot combine partial sums of different model specs")
    sums = [tensor.clone() for tensor in first.sums]
    totals = list(first.data_sizes)
    count = first.update_count
    for other in partials[1:]:
        for i, tensor in enumerate(other.sums):
            sums[i].add_(tensor)
            totals[i] += other.data_sizes[i]
        count += other.update_count
    return PartialSum(spec=first.spec, sums=tuple(sums), data_sizes=tuple(totals), update_count=count)


def finalize(partial: PartialSum, previous: ModelWeights) -> ModelWeights:
    """The FedAvg model: ``sum / data-size total`` per tensor; a tensor nobody sent keeps ``previous``.

    The division is done in float64 and rounded once to float32.

    Raises:
        ValueError: ``previous`` does not match the partial sum's spec.
        AggregationError: a result is NaN or Inf (the float32 sums overflowed); the iteration must fail.
    """
    previous.check_spec(partial.spec)
    result: dict[str, torch.Tensor] = {}
    for name, tensor, total in zip(partial.spec.names, partial.sums, partial.data_sizes, strict=True):
        if total == 0:
            result[name] = previous[name]
            continue
        average = (tensor.to(torch.float64) / total).to(torch.float32)
        if not bool(torch.isfinite(average).all()):
            raise AggregationError(
                f"the average of {name!r} is not finite (data-size total {total}); "
                "the float32 sums overflowed"
            )
        result[name] = average
    return ModelWeights(result)
