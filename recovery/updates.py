"""Drill devices: ids, data sizes and updates, each a pure function of (seed, device, iteration).

Theory of operation
-------------------
A drill must be able to recompute, after the fact and without asking the cluster, every update a device
sent. So nothing a device uploads is random at run time: device ``d`` (id :func:`device_id`) declares
:func:`data_size` ``(seed, d, k)`` at startFLJob when it aims at iteration ``k``, and for the iteration
``k`` the Server accepted it in it uploads :func:`update` ``(sizes, seed, d, k, data_size)``: per tensor,
uniform [0, 1) float32 values drawn from ``numpy.random.default_rng((seed, d, k))``, multiplied (in
float32, as a device does) by the data size it declared (the original's premultiplied upload).

The device log (``recovery/devicelog.py``) records the data size actually declared, so the checker uses
that, not a recomputation, for the FedAvg weight; the values themselves are recomputed from here and
cross-checked with the digest the device logged (:func:`digest`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

__all__ = ["MAX_DATA_SIZE", "data_size", "device_id", "device_index", "digest", "update"]

FloatArray = npt.NDArray[np.float32]

#: Data sizes are drawn from ``1 .. MAX_DATA_SIZE``.
MAX_DATA_SIZE = 64
_ID = re.compile(r"drill-([0-9]{4})")


def device_id(index: int) -> str:
    """The ``fl_id`` of drill device ``index`` (``drill-0007``)."""
    if not 0 <= index <= 9999:
        raise ValueError(f"a drill device index must be in 0..9999, got {index!r}")
    return f"drill-{index:04d}"


def device_index(fl_id: str) -> int:
    """The index of a drill device from its ``fl_id`` (the inverse of :func:`device_id`)."""
    match = _ID.fullmatch(fl_id)
    if match is None:
        raise ValueError(f"{fl_id!r} is not a drill device id; expected 'drill-' and four digits")
    return int(match.group(1))


def data_size(seed: int, device: int, iteration: int) -> int:
    """The data size device ``device`` declares when it aims at ``iteration``: 1 .. :data:`MAX_DATA_SIZE`."""
    rng = np.random.default_rng((seed, device, iteration, 1))
    return 1 + int(rng.integers(0, MAX_DATA_SIZE))


def update(
    sizes: Mapping[str, int], seed: int, device: int, iteration: int, declared: int
) -> dict[str, FloatArray]:
    """What device ``device`` uploads for ``iteration``: uniform [0, 1) float32 × ``declared``, per tensor.

    Args:
        sizes: tensor name → element count, in the model's order (the order of the upload).
        seed: the drill's seed.
        device: the device index.
        iteration: the Server's iteration the device was accepted in.
        declared: the data size the device declared at that startFLJob (>= 1).
    """
    if declared < 1:
        raise ValueError(f"a declared data size must be >= 1, got {declared!r}")
    rng = np.random.default_rng((seed, device, iteration))
    return {name: rng.random(size, dtype=np.float32) * np.float32(declared) for name, size in sizes.items()}


def digest(feature_maps: Mapping[str, FloatArray]) -> str:
    """A short hash of an upload (names and little-endian float32 bytes, in order), logged by the device."""
    h = hashlib.sha256()
    for name, values in feature_maps.items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(values, dtype="<f4").tobytes())
    return h.hexdigest()[:16]
