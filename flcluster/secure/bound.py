"""How far the unmasked sum can be from the exact one (spec/secure-aggregation.md, "Error bound").

Theory of operation
-------------------
Masking is in floating point (ref §8.12), so the masks cancel only up to rounding. Per coordinate, with
``K = |U3|`` uploads, ``M = |U2|`` (each client's mask is at most ``M`` PRG values, each in ``[-1, 1]``),
``a_u = data_size_u · x_u`` as float32 and ``A = Σ_{u∈U3} |a_u|``, the spec derives::

    |fl64(Ŝ) + Ẑ - Σ a_u| ≤ B(A, K, M)

where ``Ŝ`` is the float32 sum of the masked uploads (in any order or tree: arrival order on each
Server, then partial sums across Servers) and ``Ẑ`` is :func:`~flcluster.secure.protocol.unmask_noise`.
:func:`sum_error_bound` computes ``B``; :func:`model_error_bound` turns it into the bound between the
published model and plain FedAvg over the same updates.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["U32", "U64", "gamma", "model_error_bound", "sum_error_bound"]

U32 = 2.0**-24
"""Unit roundoff of float32 (round to nearest)."""

U64 = 2.0**-53
"""Unit roundoff of float64."""

FloatLike = float | npt.NDArray[np.float64]


def gamma(n: int, u: float = U32) -> float:
    """``γ_n = n·u / (1 - n·u)``: the relative error bound of a sum of ``n + 1`` terms (Higham, §4.2).

    Raises:
        ValueError: ``n·u ≥ 1``, where the bound says nothing.
    """
    if n * u >= 1:
        raise ValueError(f"γ_n needs n·u < 1, got n={n!r}")
    return n * u / (1 - n * u)


def sum_error_bound(abs_sum: FloatLike, k: int, m: int, *, float32_devices: bool = False) -> FloatLike:
    """``B(A, K, M)``: the bound on ``|fl64(Ŝ) + Ẑ - Σ a_u|``, per coordinate.

    Args:
        abs_sum: ``A = Σ_{u∈U3} |a_u|`` (a float or one value per coordinate).
        k: ``K = |U3|``, the uploads summed.
        m: ``M = |U2|``, at least the number of PRG values in one client's mask.
        float32_devices: The devices sum their masks in float32, as the original's Java client does
            (flcluster's SDK sums them in float64 and rounds once).

    Returns:
        ``B``, same shape as ``abs_sum``.
    """
    if k < 1 or m < 1:
        raise ValueError(f"the bound needs K >= 1 and M >= 1, got K={k!r}, M={m!r}")
    a = np.asarray(abs_sum, dtype=np.float64)
    if float32_devices:
        delta = gamma(m - 1) * m  # the mask's own float32 sum
        unit = U32  # one rounding of a_u + mask
    else:
        delta = gamma(m - 1, U64) * m
        unit = U64 + U32 * (1 + U64)  # float64 add, then the float32 rounding
    # each upload: |y_u - (a_u + m_u)| ≤ e_u = δ + unit·(|a_u| + M + δ)
    uploads = k * delta + unit * (a + k * (m + delta))
    abs_y = a + k * m + uploads  # Σ|y_u|
    server_sum = gamma(k - 1) * abs_y if k > 1 else 0.0 * a
    n_z = k + (m - k) * k  # PRG vectors summed into Z
    noise = gamma(max(n_z - 1, 0), U64) * n_z
    final_add = U64 * ((1 + gamma(k - 1) if k > 1 else 1.0) * abs_y + (1 + U64) * n_z)
    result = uploads + server_sum + noise + final_add
    return float(result) if np.ndim(result) == 0 else np.asarray(result, dtype=np.float64)


def model_error_bound(
    abs_sum: FloatLike,
    model_abs: FloatLike,
    total_data_size: int,
    k: int,
    m: int,
    *,
    float32_devices: bool = False,
) -> FloatLike:
    """The bound on ``|published - plain|``: the unmasked model against plain FedAvg of the same updates.

    Both are divided by ``D`` in float64 and rounded once to float32 (spec/aggregation.md §3); the plain
    sum is the float32 sum of the ``a_u``, within ``γ_{K-1}·A`` of ``Σ a_u``. So the two quotients differ
    by at most ``Δ = (B + γ_{K-1}·A) / D · (1 + u64) + 2·u64·|q|``, and the results by ``Δ + u32·(2|q| + Δ)``.

    Args:
        abs_sum: ``A = Σ |a_u|`` per coordinate.
        model_abs: ``|plain|`` per coordinate (the plain FedAvg result, or a bound on it).
        total_data_size: ``D = Σ_{u∈U3} data_size_u``.
        k: ``|U3|``.
        m: ``|U2|``.
        float32_devices: As in :func:`sum_error_bound`.

    Returns:
        The bound, same shape as ``abs_sum``.
    """
    a = np.asarray(abs_sum, dtype=np.float64)
    plain_sum = gamma(k - 1) * a if k > 1 else 0.0 * a
    sums = np.asarray(sum_error_bound(a, k, m, float32_devices=float32_devices)) + plain_sum
    q_plain = np.asarray(model_abs, dtype=np.float64) * (1 + 2 * U32)  # |fl64(Ŝ_plain / D)|
    # the two float64 quotients differ by at most delta; each is then rounded once to float32
    delta = sums / total_data_size * (1 + U64) + 2 * U64 * q_plain * (1 + U64)
    result = delta + U32 * (2 * q_plain + delta)
    return float(result) if np.ndim(result) == 0 else np.asarray(result, dtype=np.float64)
