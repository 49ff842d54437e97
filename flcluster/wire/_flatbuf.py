# mypy: disallow-untyped-calls=False
# (The flatbuffers runtime carries no annotations; every value read from it is made a typed one here.)
"""Helpers the two device codecs share: typed reads from verified bodies, checked writes into builders.

Theory of operation
-------------------
**Reading.** A body has always been through :func:`~flcluster.wire.verify.verify` before these run; they
only turn what the generated accessors (or the verifier's :class:`~flcluster.wire.verify.Verified` index)
return into typed values: text, read-only numpy views into the body (no copy), records of tensors.

**Writing.** Each float vector is written with one ``Builder.CreateNumpyVector`` call (bulk copies of the
array's bytes, no per-element work), into a builder sized for the whole body up front
(:func:`new_builder`), so a model is serialised at memory speed. Like the original server, bodies are
finished without the ``FLJ0`` file identifier (:func:`finish`); decoders accept bodies with or without it.
Values that do not fit their field, and strings or vectors over the limits of
:mod:`flcluster.wire.codes`, are refused with ``ValueError`` naming the field, the value and the limit.

Private to :mod:`flcluster.wire`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Any

import flatbuffers
import numpy as np
import numpy.typing as npt

from flcluster.wire.codes import MAX_FEATURE_MAPS, MAX_WEIGHT_NAME_BYTES
from flcluster.wire.fbs import CompressFeatureMap as fb_compress_map
from flcluster.wire.fbs import FeatureMap as fb_feature_map
from flcluster.wire.records import CompressFeatureMapView, FeatureMapView, FloatArray

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
F32 = np.dtype("<f4")
I32 = np.dtype("<i4")
I8 = np.dtype("i1")
U8 = np.dtype("u1")
I32_FMT, F32_FMT, I8_FMT = struct.Struct("<i"), struct.Struct("<f"), struct.Struct("<b")


def as_text(raw: bytes | None) -> str:
    """A generated string accessor's value as text (absent: empty)."""
    return "" if raw is None else raw.decode("utf-8")


def as_view(raw: Any, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """A read-only view from a generated ``*AsNumpy()`` accessor (which returns 0 for an absent field)."""
    if not isinstance(raw, np.ndarray):
        raw = np.empty(0, dtype)
    view: npt.NDArray[Any] = raw if raw.dtype == dtype else raw.view(dtype)  # keep .base == the body
    view.flags.writeable = False
    return view


def found_view(body: bytes, found: tuple[int, int] | None, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """A read-only view of a vector the verifier found at ``(start, count)`` (empty when absent)."""
    if found is None:
        view: npt.NDArray[Any] = np.empty(0, dtype)
    else:
        view = np.frombuffer(body, dtype=dtype, count=found[1], offset=found[0])  # .base is the body
    if view.flags.writeable:  # a bytearray body; a bytes body gives read-only views already
        view.flags.writeable = False
    return view


def small_ints(raw: Any) -> tuple[int, ...]:
    """A small vector of bytes (``download_compress_types``) as ints (absent: empty)."""
    return tuple(int(x) for x in raw.tolist()) if isinstance(raw, np.ndarray) else ()


def read_feature_maps(count: int, get: Any) -> tuple[FeatureMapView, ...]:
    """The ``FeatureMap`` entries of a verified vector, tensors as read-only views into the body."""
    maps = []
    for i in range(count):
        fm = get(i)
        maps.append(FeatureMapView(as_text(fm.WeightFullname()), as_view(fm.DataAsNumpy(), F32)))
    return tuple(maps)


def read_compress_feature_maps(count: int, get: Any) -> tuple[CompressFeatureMapView, ...]:
    """The ``CompressFeatureMap`` entries of a verified vector, data as read-only views."""
    maps = []
    for i in range(count):
        cm = get(i)
        data = as_view(cm.CompressDataAsNumpy(), I8)
        maps.append(
            CompressFeatureMapView(as_text(cm.WeightFullname()), data, float(cm.MinVal()), float(cm.MaxVal()))
        )
    return tuple(maps)


# ----------------------------------------------------------------------------------------------------------
# Writing helpers
# ----------------------------------------------------------------------------------------------------------


def int32(name: str, value: int) -> int:
    """``value``, refused with ValueError unless it fits in a signed 32-bit field ``name``."""
    if not INT32_MIN <= value <= INT32_MAX:
        raise ValueError(f"{name} must fit in a signed 32-bit int, got {value!r}")
    return int(value)


def byte(name: str, value: int) -> int:
    """``value``, refused with ValueError unless it fits in a signed byte field ``name``."""
    if not -128 <= value <= 127:
        raise ValueError(f"{name} must fit in a signed byte, got {value!r}")
    return int(value)


def limited(name: str, value: str, limit: int) -> str:
    """``value``, refused with ValueError if it is over ``limit`` UTF-8 bytes."""
    size = len(value.encode("utf-8"))
    if size > limit:
        raise ValueError(f"{name} must be at most {limit} UTF-8 bytes, got {size} bytes: {value[:64]!r}...")
    return value


def check_count(name: str, items: Sequence[object]) -> None:
    """Refuse (ValueError) a vector ``name`` of more than MAX_FEATURE_MAPS entries."""
    if len(items) > MAX_FEATURE_MAPS:
        raise ValueError(f"{name} may hold at most {MAX_FEATURE_MAPS} entries, got {len(items)}")


def prepare_maps(name: str, maps: Iterable[tuple[str, npt.ArrayLike]]) -> list[tuple[str, FloatArray]]:
    """Check the names; make every tensor a flat contiguous little-endian float32 array (no copy if it is)."""
    out = [
        (limited(f"{name} weight name", weight, MAX_WEIGHT_NAME_BYTES),
         np.ascontiguousarray(np.asarray(data, dtype=F32).reshape(-1)))
        for weight, data in maps
    ]  # fmt: skip
    check_count(name, out)
    return out


def prepare_compress_maps(
    maps: Iterable[CompressFeatureMapView],
) -> list[tuple[str, npt.NDArray[np.int8], float, float]]:
    """Check the names; make every int8 tensor a flat contiguous array."""
    out = [
        (limited("compress_feature_maps weight name", m.name, MAX_WEIGHT_NAME_BYTES),
         np.ascontiguousarray(np.asarray(m.data, dtype=I8).reshape(-1)), float(m.min_val), float(m.max_val))
        for m in maps
    ]  # fmt: skip
    check_count("compress_feature_maps", out)
    return out


def new_builder(payload: int) -> Any:
    """A builder sized for ``payload`` bytes and the tables around them.

    Sized for the whole body so the builder never regrows (each regrowth copies everything written so far).
    """
    return flatbuffers.Builder(payload + 4096)


def finish(builder: Any, root: int) -> bytes:
    """Finish the body at ``root`` and return its bytes."""
    builder.Finish(root)  # no file identifier, as the original
    return bytes(memoryview(builder.Bytes)[builder.Head() :])


def offsets_vector(builder: Any, offsets: Sequence[int]) -> int:
    """A vector of offsets (tables or strings), in the given order."""
    builder.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        builder.PrependUOffsetTRelative(offset)
    return int(builder.EndVector())


def build_feature_maps(builder: Any, maps: Sequence[tuple[str, FloatArray]]) -> int:
    """A vector of ``FeatureMap`` tables."""
    offsets = []
    for weight, data in maps:
        name_off = builder.CreateString(weight)
        data_off = builder.CreateNumpyVector(data)
        fb_feature_map.FeatureMapStart(builder)
        fb_feature_map.FeatureMapAddWeightFullname(builder, name_off)
        fb_feature_map.FeatureMapAddData(builder, data_off)
        offsets.append(fb_feature_map.FeatureMapEnd(builder))
    return offsets_vector(builder, offsets)


def build_compress_maps(builder: Any, maps: Sequence[tuple[str, npt.NDArray[np.int8], float, float]]) -> int:
    """A vector of ``CompressFeatureMap`` tables."""
    offsets = []
    for weight, data, min_val, max_val in maps:
        name_off = builder.CreateString(weight)
        data_off = builder.CreateNumpyVector(data)
        fb_compress_map.CompressFeatureMapStart(builder)
        fb_compress_map.CompressFeatureMapAddWeightFullname(builder, name_off)
        fb_compress_map.CompressFeatureMapAddCompressData(builder, data_off)
        fb_compress_map.CompressFeatureMapAddMinVal(builder, min_val)
        fb_compress_map.CompressFeatureMapAddMaxVal(builder, max_val)
        offsets.append(fb_compress_map.CompressFeatureMapEnd(builder))
    return offsets_vector(builder, offsets)


def payload(*maps: Sequence[tuple[Any, ...]]) -> int:
    """The bytes the tensors and their names take in a body, for :func:`new_builder`."""
    return sum(len(m[0]) * 4 + m[1].nbytes + 64 for group in maps for m in group)


def bytes_vector(builder: Any, data: bytes) -> int:
    """A ``[ubyte]`` vector."""
    return int(builder.CreateByteVector(bytes(data)))
