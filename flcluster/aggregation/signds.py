"""SIGNDS on the Server: judge a sign-and-indices upload, rebuild its dense update (spec/privacy.md §3.2-3).

Theory of operation
-------------------
A SignDS device sends ``sign ∈ {−1, +1}``, an ascending ``index_array`` and, in its ``feature_map``, only the
names of the tensors it updates (empty data). The Server turns that into the dense, premultiplied update the
rest of the aggregation expects, from the model of the previous iteration ``w_prev`` (the model the device
trained from):

    new_w[j] = (w_prev[j] + sign · sign_global_lr · [j ∈ index_array]) · data_size        (float32)

with ``j`` numbering the values of the named tensors, in the request's order, as one vector (the original's
``ParseSignDSFeatureMap``). The work is split in two so that a refused upload changes nothing:

1. :func:`prepare_signds`, before the upload is counted at the leader: every admission rule of §3.3, and
   ``w_prev + sign · lr`` at the selected positions (:class:`SignDSUpdate`). It refuses with
   :class:`~flcluster.errors.UpdateRejected`.
2. :meth:`SignDSUpdate.checked`, once the leader has accepted it and said the device's data size: the
   multiplication and the ordinary update check (which cannot fail then: rule 9 bounds the values).

:func:`upload_kind` applies the rules that say which kind of upload a request is (dense or SignDS) under the
configured ``encrypt_type``. Pure numpy; the arrays it makes are its own.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from flcluster.aggregation.model import CheckedUpdate, ModelSpec, ModelWeights
from flcluster.errors import UpdateRejected
from flcluster.wire.codes import MAX_SIGNDS_INDICES

__all__ = ["SignDSUpdate", "UploadKind", "prepare_signds", "upload_kind"]

_FLOAT32_MAX = float(np.finfo(np.float32).max)


class UploadKind(enum.Enum):
    """What an updateModel request carries."""

    DENSE = "dense"
    SIGNDS = "signds"


def upload_kind(encrypt_type: str, sign: int, index_count: int) -> UploadKind:
    """Which kind of upload a request is, under ``encrypt_type`` (spec/privacy.md §3.3, rules 1–3).

    Args:
        encrypt_type: The cluster's ``encrypt_type``.
        sign: ``RequestUpdateModel.sign``.
        index_count: Entries of ``RequestUpdateModel.index_array``.

    Returns:
        ``SIGNDS`` for ``sign = ±1`` under SIGNDS; ``DENSE`` otherwise.

    Raises:
        UpdateRejected: SignDS fields under another ``encrypt_type``; a sign outside {−1, 0, +1}; an
            ``index_array`` with ``sign = 0``.
    """
    if encrypt_type != "SIGNDS":
        if sign != 0 or index_count:
            raise UpdateRejected(
                f"sign={sign!r} with {index_count!r} index_array entries is a SignDS upload, but this "
                f"cluster runs encrypt_type={encrypt_type!r}; upload the weights with sign 0 and no "
                "index_array"
            )
        return UploadKind.DENSE
    if sign not in (-1, 0, 1):
        raise UpdateRejected(f"sign={sign!r} is refused: expected -1 or +1 (SignDS), or 0 (dense weights)")
    if sign == 0:
        if index_count:
            raise UpdateRejected(
                f"sign=0 (dense weights) comes with {index_count!r} index_array entries; a dense upload "
                "carries no index_array"
            )
        return UploadKind.DENSE
    return UploadKind.SIGNDS


@attrs.frozen(eq=False)
class SignDSUpdate:
    """A SignDS upload that passed every admission rule, waiting for the device's data size.

    Attributes:
        spec: The model.
        names: The tensors the request named, in its order.
        shifted: Per name, ``w_prev + sign · lr`` at the selected positions (float32, owned).
    """

    spec: ModelSpec
    names: tuple[str, ...]
    shifted: tuple[npt.NDArray[np.float32], ...]

    def checked(self, data_size: int) -> CheckedUpdate:
        """The rebuilt dense update ``shifted · data_size``, through the ordinary update check.

        Args:
            data_size: The device's data size (1 … 65535, as the leader accepts it).

        Returns:
            What :meth:`~flcluster.aggregation.fedavg.FedAvgAccumulator.add` takes.

        Raises:
            UpdateRejected: Only if ``data_size`` is beyond what :func:`prepare_signds` was told.
        """
        n = np.float32(data_size)
        return self.spec.check_update(
            [(name, s * n) for name, s in zip(self.names, self.shifted, strict=True)]
        )


def prepare_signds(
    spec: ModelSpec,
    feature_maps: Sequence[tuple[str, npt.NDArray[Any]]],
    *,
    sign: int,
    index_array: npt.NDArray[np.int32],
    base: ModelWeights,
    global_lr: float,
    max_data_size: int,
) -> SignDSUpdate:
    """Judge a SignDS upload and move the selected coordinates of ``base`` (spec/privacy.md §3.3, rules 4–9).

    Args:
        spec: The model.
        feature_maps: The request's ``(name, data)`` pairs; names only, empty data.
        sign: −1 or +1.
        index_array: The selected global indices.
        base: ``w_prev``, the model of the previous iteration.
        global_lr: ``sign_global_lr``.
        max_data_size: The largest data size a device may declare (bounds the rebuilt values).

    Returns:
        The upload, ready for :meth:`SignDSUpdate.checked`.

    Raises:
        UpdateRejected: The first broken rule, naming the value and what was expected.
    """
    if not feature_maps:
        raise UpdateRejected("a SignDS upload must name at least one weight in feature_map; it named none")
    names: list[str] = []
    sizes: list[int] = []
    known, seen = set(spec.names), set()
    for name, data in feature_maps:
        if name not in known:
            raise UpdateRejected(
                f"weight {name!r} is not in the server model; expected one of {len(spec)} names "
                f"such as {spec.tensors[0][0]!r}"
            )
        if name in seen:
            raise UpdateRejected(
                f"weight {name!r} appears twice in one update; each weight may be named once"
            )
        if np.asarray(data).size:
            raise UpdateRejected(
                f"weight {name!r} carries {np.asarray(data).size} values in a SignDS upload (sign ±1); "
                "a SignDS upload names its weights with empty data"
            )
        seen.add(name)
        names.append(name)
        sizes.append(spec.sizes[spec.index(name)])
    total = sum(sizes)
    count = int(index_array.size)
    if not 1 <= count <= MAX_SIGNDS_INDICES:
        raise UpdateRejected(
            f"index_array has {count} entries; a SignDS upload carries 1 to {MAX_SIGNDS_INDICES}"
        )
    indices = np.asarray(index_array, dtype=np.int64)
    if count > 1 and not bool(np.all(np.diff(indices) > 0)):
        at = int(np.argmax(np.diff(indices) <= 0))
        raise UpdateRejected(
            f"index_array must be strictly ascending (no index twice); entry {at + 1} is "
            f"{int(indices[at + 1])!r} after {int(indices[at])!r}"
        )
    if indices[0] < 0 or indices[-1] >= total:
        bad = int(indices[0]) if indices[0] < 0 else int(indices[-1])
        raise UpdateRejected(
            f"index {bad!r} of index_array is out of range: the {len(names)} named weight(s) have {total} "
            f"values, so an index must be in [0, {total})"
        )
    step = np.float32(sign) * np.float32(global_lr)
    limit = _FLOAT32_MAX / max_data_size
    shifted: list[npt.NDArray[np.float32]] = []
    start = 0
    for name, size in zip(names, sizes, strict=True):
        values = base[name].detach().cpu().numpy().astype(np.float32, copy=True)
        local = indices[(indices >= start) & (indices < start + size)] - start
        values[local] += step
        peak = float(np.max(np.abs(values))) if size else 0.0
        if not math.isfinite(peak) or peak > limit:
            raise UpdateRejected(
                f"weight {name!r} rebuilt from the model and the SignDS step reaches {peak!r}, which times a "
                f"data size up to {max_data_size} overflows float32"
            )
        shifted.append(values)
        start += size
    return SignDSUpdate(spec, tuple(names), tuple(shifted))
