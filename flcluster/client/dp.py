"""DP_ENCRYPT on the device: the analytic Gaussian mechanism, clipping and noise (spec/privacy.md §2).

Theory of operation
-------------------
A device under ``DP_ENCRYPT`` uploads ``(b + clip(w − b) + N(0, σ²)) · n`` instead of ``w · n``: its update
``w − b`` (trained minus global weights) is scaled into the L2 ball of radius ``C`` and Gaussian noise is
added to every coordinate. ``σ`` is calibrated so that one upload is (ε, δ)-differentially private for L2
sensitivity ``C`` with the *analytic* Gaussian mechanism of Balle & Wang (ICML 2018, Algorithm 1), which is
exact where the classical ``√(2 ln(1.25/δ))·C/ε`` is only a sufficient bound (and valid only for ε < 1).

Algorithm 1 reduces the calibration to one root of a monotone function of one variable (``B⁺`` or ``B⁻``,
spec/privacy.md §2.4), bracketed by doubling and found by bisection down to double precision. Every term is
a Gaussian tail probability times ``e^ε``; both are computed in log space (``erfc`` for the tail, its
asymptotic series once ``erfc`` underflows), so neither a large ε nor a tiny δ overflows or cancels.
:func:`gaussian_delta` is Theorem 8's exact δ for a given σ, an independent formula the tests check the
calibration against.

The clip bound ``C`` is the original's adaptive ``dpNormClipAdapt`` (:func:`next_clip`): it starts at
:data:`INITIAL_CLIP` and after every iteration becomes ``dp_norm_clip × ‖new global − old global‖``, never
growing after server iteration 1.

Pure functions over numpy arrays; the only randomness is the ``numpy.random.Generator`` the caller passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt

from flcluster.errors import ConfigError

__all__ = [
    "INITIAL_CLIP",
    "analytic_gaussian_sigma",
    "classical_gaussian_sigma",
    "dp_upload",
    "gaussian_delta",
    "next_clip",
    "update_norm",
]

FloatArray = npt.NDArray[np.float32]

#: The clip bound a device starts with, before any global model has moved (the original's 0.05).
INITIAL_CLIP = 0.05

_SQRT2 = math.sqrt(2.0)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _log_phi_neg(z: float) -> float:
    """``log Φ(−z)`` for ``z ≥ 0``, accurate far into the tail."""
    tail = 0.5 * math.erfc(z / _SQRT2)
    if tail > 1e-300:
        return math.log(tail)
    # Mills ratio: Φ(−z) = φ(z)/z · (1 − 1/z² + 3/z⁴ − 15/z⁶ …); z > 37 here, so four terms are exact to
    # double precision.
    inv = 1.0 / (z * z)
    series = 1.0 - inv + 3.0 * inv * inv - 15.0 * inv * inv * inv
    return -0.5 * z * z - math.log(z) - _LOG_SQRT_2PI + math.log(series)


def _phi(x: float) -> float:
    """The standard normal CDF ``Φ(x)``, through ``erfc`` so that the lower tail keeps its digits."""
    return 0.5 * math.erfc(-x / _SQRT2)


def _exp_eps_phi_neg(eps: float, z: float) -> float:
    """``e^ε · Φ(−z)`` for ``z ≥ 0`` without overflowing ``e^ε``."""
    exponent = eps + _log_phi_neg(z)
    return math.exp(exponent) if exponent < 709.0 else math.inf


def _b_plus(eps: float, v: float) -> float:
    return _phi(math.sqrt(eps * v)) - _exp_eps_phi_neg(eps, math.sqrt(eps * (v + 2.0)))


def _b_minus(eps: float, u: float) -> float:
    return _phi(-math.sqrt(eps * u)) - _exp_eps_phi_neg(eps, math.sqrt(eps * (u + 2.0)))


def _boundary(inside: Callable[[float], bool]) -> float:
    """The point where ``inside`` turns from true to false on ``[0, ∞)`` (``inside(0)`` is true).

    Doubling from ``[0, 1]`` brackets it, bisection then halves the bracket until it stops shrinking.
    """
    low, high = 0.0, 1.0
    while inside(high):
        low, high = high, 2.0 * high
        if high > 1e300:
            raise ConfigError("the analytic Gaussian calibration did not converge (the bracket diverged)")
    while True:
        mid = low + (high - low) / 2.0
        if mid <= low or mid >= high:
            return mid
        if inside(mid):
            low = mid
        else:
            high = mid


def _check_privacy(eps: float, delta: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not (math.isfinite(eps) and eps > 0):
        raise ConfigError(f"dp_eps={eps!r} is refused: expected a finite number > 0")
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not (0.0 < delta < 1.0):
        raise ConfigError(f"dp_delta={delta!r} is refused: expected a number in (0, 1)")


def _check_sensitivity(sensitivity: float) -> None:
    if (
        isinstance(sensitivity, bool)
        or not isinstance(sensitivity, int | float)
        or not (math.isfinite(sensitivity) and sensitivity >= 0)
    ):
        raise ConfigError(f"the L2 sensitivity {sensitivity!r} is refused: expected a finite number >= 0")


def analytic_gaussian_sigma(eps: float, delta: float, sensitivity: float = 1.0) -> float:
    """The smallest σ for which ``N(0, σ²)`` noise makes an L2-sensitivity-Δ query (ε, δ)-DP.

    Balle & Wang 2018, Algorithm 1 (spec/privacy.md §2.4).

    Args:
        eps: ε > 0 (``dp_eps``).
        delta: δ in (0, 1) (``dp_delta``).
        sensitivity: Δ ≥ 0, the L2 sensitivity (the device's clip bound).

    Returns:
        σ (0 when Δ is 0).

    Raises:
        ConfigError: A parameter out of its range, or not finite.
    """
    _check_privacy(eps, delta)
    _check_sensitivity(sensitivity)
    eps, delta = float(eps), float(delta)
    delta_zero = _b_plus(eps, 0.0)
    if delta >= delta_zero:
        v = _boundary(lambda v: _b_plus(eps, v) <= delta)
        alpha = math.sqrt(1.0 + v / 2.0) - math.sqrt(v / 2.0)
    else:
        u = _boundary(lambda u: _b_minus(eps, u) > delta)
        alpha = math.sqrt(1.0 + u / 2.0) + math.sqrt(u / 2.0)
    return alpha * float(sensitivity) / math.sqrt(2.0 * eps)


def gaussian_delta(sigma: float, eps: float, sensitivity: float = 1.0) -> float:
    """The exact δ(ε) of the Gaussian mechanism with noise σ and L2 sensitivity Δ (Theorem 8).

    ``Φ(Δ/(2σ) − εσ/Δ) − e^ε Φ(−Δ/(2σ) − εσ/Δ)``.

    Args:
        sigma: σ > 0.
        eps: ε > 0.
        sensitivity: Δ > 0.

    Returns:
        The δ for which the mechanism is (ε, δ)-DP, and for no smaller δ.

    Raises:
        ConfigError: A parameter out of its range.
    """
    if not (math.isfinite(sigma) and sigma > 0 and math.isfinite(eps) and eps > 0):
        raise ConfigError(f"sigma={sigma!r} and eps={eps!r} must be finite numbers > 0")
    if not (math.isfinite(sensitivity) and sensitivity > 0):
        raise ConfigError(f"the L2 sensitivity {sensitivity!r} is refused: expected a finite number > 0")
    a = sensitivity / (2.0 * sigma)
    b = eps * sigma / sensitivity
    return _phi(a - b) - _exp_eps_phi_neg(eps, a + b)


def classical_gaussian_sigma(eps: float, delta: float, sensitivity: float = 1.0) -> float:
    """The classical calibration ``√(2 ln(1.25/δ)) · Δ/ε`` (Dwork & Roth, Theorem A.1; valid for ε < 1)."""
    _check_privacy(eps, delta)
    _check_sensitivity(sensitivity)
    return math.sqrt(2.0 * math.log(1.25 / delta)) * sensitivity / eps


def update_norm(before: Mapping[str, npt.ArrayLike], after: Mapping[str, npt.ArrayLike]) -> float:
    """``‖after − before‖₂`` over the tensors of ``after``, all of them as one vector (float64 sum).

    Raises:
        ConfigError: A tensor of ``after`` is missing from ``before`` or has another size.
    """
    total = 0.0
    for name, value in after.items():
        diff = _flat(value).astype(np.float64) - _base(before, name, value)
        total += float(np.dot(diff, diff))
    return math.sqrt(total)


def _flat(value: npt.ArrayLike) -> FloatArray:
    return np.asarray(value, dtype=np.float32).reshape(-1)


def _base(before: Mapping[str, npt.ArrayLike], name: str, value: npt.ArrayLike) -> FloatArray:
    if name not in before:
        raise ConfigError(
            f"tensor {name!r} is not in the global model the device trained from; the update of a tensor "
            "needs the tensor it started from"
        )
    base = np.asarray(before[name], dtype=np.float32).reshape(-1)
    size = np.asarray(value).size
    if base.size != size:
        raise ConfigError(f"tensor {name!r} has {size} values, but the global model's has {base.size}")
    return base


def dp_upload(
    before: Mapping[str, npt.ArrayLike],
    trained: Mapping[str, npt.ArrayLike],
    *,
    data_size: int,
    clip: float,
    sigma: float,
    rng: np.random.Generator,
) -> dict[str, FloatArray]:
    """The DP_ENCRYPT upload: ``(b + u·min(1, C/‖u‖) + N(0, σ²)) · n`` per tensor, ``u = w − b`` (§2.2).

    Args:
        before: The global model the device trained from (name → flat array).
        trained: The trained weights (not multiplied by the data size), in upload order.
        data_size: The data size the device declared, ≥ 1.
        clip: The clip bound ``C`` ≥ 0.
        sigma: The noise scale σ ≥ 0 (``analytic_gaussian_sigma(ε, δ, C)``).
        rng: Where the noise comes from.

    Returns:
        Name → flat float32 upload, in the order of ``trained``.

    Raises:
        ConfigError: A bad parameter, or a tensor of ``trained`` that ``before`` lacks or sizes otherwise.
    """
    if isinstance(data_size, bool) or not isinstance(data_size, int) or data_size < 1:
        raise ConfigError(f"data_size must be an int >= 1, got {data_size!r}")
    for what, bound in (("clip", clip), ("sigma", sigma)):
        if not (math.isfinite(bound) and bound >= 0):
            raise ConfigError(f"{what}={bound!r} is refused: expected a finite number >= 0")
    norm = update_norm(before, trained)
    factor = 1.0 if norm == 0.0 or norm <= clip else clip / norm
    upload: dict[str, FloatArray] = {}
    for name, value in trained.items():
        base = _base(before, name, value)
        update = _flat(value) - base
        noisy = update.astype(np.float64) * factor + rng.normal(0.0, sigma, size=update.size)
        upload[name] = (base + noisy.astype(np.float32)) * np.float32(data_size)
    return upload


def next_clip(
    clip: float,
    factor: float,
    before: Mapping[str, npt.ArrayLike],
    new_global: Mapping[str, npt.ArrayLike],
    *,
    iteration: int,
) -> float:
    """The device's clip bound after an iteration (the original's ``updateDpNormClip``, §2.3).

    Args:
        clip: The current bound.
        factor: ``dp_norm_clip`` from the FLPlan.
        before: The global model the device trained from in ``iteration``.
        new_global: The model getModel returned after it (the tensors the device uploaded).
        iteration: The server iteration the device took part in.

    Returns:
        ``factor · ‖new_global − before‖`` in iteration 1, the smaller of that and ``clip`` later; ``clip``
        unchanged when that value is 0 or not finite.
    """
    candidate = float(factor) * update_norm(before, new_global)
    if not (math.isfinite(candidate) and candidate > 0.0):
        return clip
    if iteration == 1:
        return candidate
    return min(clip, candidate)
