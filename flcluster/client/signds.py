"""SIGNDS on the device: a sign and a few coordinates instead of the weights (spec/privacy.md §3.1).

Theory of operation
-------------------
SignDS (the original's ``SecureProtocol.signDSModel``) sends one random sign ``s ∈ {−1, +1}`` and ``h`` global
indices of the update ``u = w − b`` (all uploaded tensors as one vector, in upload order). The Server moves
each selected coordinate of the global model by ``s · sign_global_lr``. Which coordinates are sent is an
exponential-mechanism choice over *how many* of them come from the "top" set (the ``K = ⌊sign_k · d⌋``
coordinates with the largest ``s``-signed update): with ``c(v) = C(K, v)·C(d−K, h−v)`` output sets holding
``v`` top coordinates, ``v`` is drawn with weight ``c(v)·e^ε`` when ``v`` reaches a threshold ``τ`` and
``c(v)`` below it, and the ``v`` top and ``h − v`` other coordinates are then drawn uniformly. ``τ`` maximises
the expected number of top coordinates, and when ``sign_dim_out`` is 0 the output size ``h`` is the largest
one whose expected top share stays at least ``sign_thr_ratio``.

Everything is computed in log space (``math.lgamma``, log-sum-exp), so a large model or a large ε does not
overflow where the original's doubles turn to NaN; where they do not, the distributions are the same.
The only randomness is the ``numpy.random.Generator`` the caller passes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import attrs
import numpy as np
import numpy.typing as npt

from flcluster.errors import ConfigError
from flcluster.wire.codes import MAX_SIGNDS_INDICES

__all__ = [
    "SignDSChoice",
    "expected_top_share",
    "optimal_output_dim",
    "optimal_threshold",
    "select",
]


@attrs.frozen(eq=False)
class SignDSChoice:
    """What a SignDS device uploads.

    Attributes:
        sign: −1 or +1.
        index_array: The selected global indices, strictly ascending (int32).
    """

    sign: int
    index_array: npt.NDArray[np.int32]


def _log_comb(n: int, k: int) -> float:
    if k < 0 or k > n or n < 0:
        return -math.inf
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _log_counts(top: int, dim: int, out: int) -> npt.NDArray[np.float64]:
    """``log c(v)``, ``v = 0 … out``: output sets of size ``out`` holding ``v`` of the ``top`` coordinates."""
    return np.array([_log_comb(top, v) + _log_comb(dim - top, out - v) for v in range(out + 1)])


def _pmf(log_counts: npt.NDArray[np.float64], threshold: int, eps: float) -> npt.NDArray[np.float64] | None:
    """``p_τ(v) ∝ c(v) · (e^ε if v ≥ τ else 1)``; ``None`` when every ``c(v)`` is 0."""
    weights = log_counts + np.where(np.arange(log_counts.size) >= threshold, eps, 0.0)
    top = float(np.max(weights))
    if not math.isfinite(top):
        return None
    p = np.exp(weights - top)
    result: npt.NDArray[np.float64] = p / p.sum()
    return result


def _expectation(pmf: npt.NDArray[np.float64]) -> float:
    return float(np.dot(np.arange(pmf.size), pmf))


def optimal_threshold(top: int, dim: int, out: int, eps: float) -> int:
    """The threshold ``τ`` in ``1 … out``: the first after which the expected top count stops growing.

    The original's ``calcOptThr``: try ``t = 1, 2, …`` while ``E_{p_t}[v]`` grows strictly; at least 1.
    """
    counts = _log_counts(top, dim, out)
    best, best_t = 0.0, 0
    for t in range(1, out + 1):
        pmf = _pmf(counts, t, eps)
        expect = 0.0 if pmf is None else _expectation(pmf)
        if expect > best:
            best, best_t = expect, t
        else:
            break
    return max(best_t, 1)


def expected_top_share(top: int, dim: int, out: int, eps: float) -> float:
    """``E_{p_τ}[v] / out``: the expected share of top coordinates in an output of size ``out``."""
    pmf = _pmf(_log_counts(top, dim, out), optimal_threshold(top, dim, out, eps), eps)
    return 0.0 if pmf is None else _expectation(pmf) / out


def optimal_output_dim(thr_ratio: float, top: int, dim: int, eps: float) -> int:
    """The largest output size whose expected top share is at least ``thr_ratio`` (``findOptOutputDim``).

    Tries ``h = 1, 2, …`` and stops at the first that falls short; at least 1, at most
    :data:`MAX_SIGNDS_INDICES` (a Server refuses more).
    """
    out = 1
    while out <= MAX_SIGNDS_INDICES and expected_top_share(top, dim, out, eps) >= thr_ratio:
        out += 1
    return max(1, out - 1)


def _draw(rng: np.random.Generator, pmf: npt.NDArray[np.float64]) -> int:
    """Inverse sampling: the smallest ``v`` whose CDF reaches one uniform draw."""
    cdf = np.cumsum(pmf)
    # A draw in (0, 1], so a value of zero probability (a flat step of the CDF) is never the answer.
    v = int(np.searchsorted(cdf, 1.0 - rng.random(), side="left"))
    return min(v, int(np.flatnonzero(pmf > 0)[-1]))


def select(
    before: Mapping[str, npt.ArrayLike],
    trained: Mapping[str, npt.ArrayLike],
    *,
    sign_k: float,
    sign_eps: float,
    sign_thr_ratio: float,
    sign_dim_out: int,
    rng: np.random.Generator,
) -> SignDSChoice:
    """The SignDS upload of one device (spec/privacy.md §3.1, steps 1–7).

    Args:
        before: The global model the device trained from (name → flat array).
        trained: The trained weights, in upload order; global indices number their values in this order.
        sign_k: Share of the coordinates in the top set, in (0, 0.25].
        sign_eps: ε of the selection, > 0.
        sign_thr_ratio: Target top share when ``sign_dim_out`` is 0.
        sign_dim_out: Indices to send, or 0 to choose the number (at most :data:`MAX_SIGNDS_INDICES`).
        rng: Where the randomness comes from.

    Returns:
        The sign and the ascending indices.

    Raises:
        ConfigError: A tensor of ``trained`` that ``before`` lacks or sizes otherwise, a bad parameter, or a
            model too small to draw ``sign_dim_out`` coordinates from.
    """
    if not (math.isfinite(sign_eps) and sign_eps > 0) or not (math.isfinite(sign_k) and sign_k > 0):
        raise ConfigError(f"sign_eps={sign_eps!r} and sign_k={sign_k!r} must be finite numbers > 0")
    if isinstance(sign_dim_out, bool) or not isinstance(sign_dim_out, int) or sign_dim_out < 0:
        raise ConfigError(f"sign_dim_out={sign_dim_out!r} is refused: expected an int >= 0")
    parts = []
    for name, value in trained.items():
        if name not in before:
            raise ConfigError(f"tensor {name!r} is not in the global model the device trained from")
        after = np.asarray(value, dtype=np.float32).reshape(-1)
        base = np.asarray(before[name], dtype=np.float32).reshape(-1)
        if base.size != after.size:
            raise ConfigError(
                f"tensor {name!r} has {after.size} values, but the global model's has {base.size}"
            )
        parts.append(after - base)
    update = np.concatenate(parts) if parts else np.empty(0, np.float32)
    dim = int(update.size)
    top = int(sign_k * dim)
    out = sign_dim_out or optimal_output_dim(sign_thr_ratio, top, dim, sign_eps)
    if out > MAX_SIGNDS_INDICES:
        raise ConfigError(
            f"sign_dim_out={out!r} is refused: a Server takes at most {MAX_SIGNDS_INDICES} indices"
        )
    pmf = _pmf(_log_counts(top, dim, out), optimal_threshold(top, dim, out, sign_eps), sign_eps)
    if dim == 0 or pmf is None:
        raise ConfigError(
            f"SignDS cannot draw {out!r} coordinates from an update of {dim!r} values; send more weights or "
            "lower sign_dim_out"
        )
    inter = _draw(rng, pmf)
    sign = 1 if rng.integers(2) else -1
    # Rank by the signed update, largest first; a stable sort keeps index order among ties.
    order = np.argsort(-update if sign > 0 else update, kind="stable")
    top_set, rest = order[:top], order[top:]
    chosen = np.concatenate(
        [
            rng.choice(top_set, size=inter, replace=False),
            rng.choice(rest, size=out - inter, replace=False),
        ]
    )
    return SignDSChoice(sign=sign, index_array=np.sort(chosen).astype(np.int32))
