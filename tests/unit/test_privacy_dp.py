"""DP_ENCRYPT on the device (spec/privacy.md §2): analytic Gaussian calibration, clipping, noise, clip bound.

The reference values of σ were computed independently, at 60 significant digits with mpmath, by bisecting
Theorem 8 of Balle & Wang (2018) in σ (``Φ(Δ/2σ − εσ/Δ) − e^ε Φ(−Δ/2σ − εσ/Δ) = δ``), a different equation
from the one the code solves (Algorithm 1's ``B⁺`` / ``B⁻`` in ``v`` or ``u``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flcluster.client.dp import (
    INITIAL_CLIP,
    analytic_gaussian_sigma,
    classical_gaussian_sigma,
    dp_upload,
    gaussian_delta,
    next_clip,
    update_norm,
)
from flcluster.client.privacy import DevicePrivacy
from flcluster.errors import ConfigError
from flcluster.wire.records import FLPlanParams

# (eps, delta, sigma for sensitivity 1): mpmath, 60 digits, Theorem 8 bisected in sigma.
REFERENCE = [
    (1.0, 1e-5, 3.7306316348159418),
    (0.5, 1e-5, 7.0318266755824914),
    (0.1, 1e-6, 36.304690426195783),
    (0.01, 1e-5, 243.78543767567802),
    (2.0, 1e-3, 1.4452391609297835),
    (10.0, 1e-5, 0.49988861970900851),
    (8.0, 1e-10, 0.83398922953798899),
    (50.0, 0.01, 0.12460112363122812),  # the original's defaults dp_eps=50, dp_delta=0.01
    (100.0, 0.01, 0.082854058758514711),
    (1.0, 0.3, 0.69023058001459925),  # delta above delta_0: the B+ branch
    (1.0, 0.5, 0.50706503147633136),
]


@pytest.mark.parametrize(("eps", "delta", "sigma"), REFERENCE)
def test_sigma_matches_independent_high_precision_values(eps: float, delta: float, sigma: float) -> None:
    assert analytic_gaussian_sigma(eps, delta) == pytest.approx(sigma, rel=1e-12)
    # sigma scales with the sensitivity
    assert analytic_gaussian_sigma(eps, delta, 0.05) == pytest.approx(0.05 * sigma, rel=1e-12)


def test_both_branches_are_exercised() -> None:
    delta_zero = gaussian_delta(1.0 / math.sqrt(2.0), 1.0)  # alpha = 1: sigma = 1/sqrt(2 eps)
    assert 0.3 > delta_zero > 1e-5
    assert analytic_gaussian_sigma(1.0, delta_zero) == pytest.approx(1.0 / math.sqrt(2.0), rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(
    eps=st.floats(min_value=1e-3, max_value=500.0),
    log_delta=st.floats(min_value=-15.0, max_value=math.log10(0.9)),
    sensitivity=st.floats(min_value=1e-3, max_value=1e3),
)
def test_sigma_meets_theorem_8_exactly(eps: float, log_delta: float, sensitivity: float) -> None:
    delta = 10.0**log_delta
    sigma = analytic_gaussian_sigma(eps, delta, sensitivity)
    assert sigma > 0
    assert gaussian_delta(sigma, eps, sensitivity) == pytest.approx(delta, rel=1e-6)
    # the smallest such sigma: 0.1 % less noise breaks (eps, delta)
    assert gaussian_delta(sigma * 0.999, eps, sensitivity) > delta


@settings(max_examples=100, deadline=None)
@given(
    eps=st.floats(min_value=1e-3, max_value=0.999),
    log_delta=st.floats(min_value=-15.0, max_value=-1.0),
)
def test_sigma_never_exceeds_the_classical_bound(eps: float, log_delta: float) -> None:
    delta = 10.0**log_delta
    assert analytic_gaussian_sigma(eps, delta) <= classical_gaussian_sigma(eps, delta)


def test_the_classical_bound_by_its_formula() -> None:
    assert classical_gaussian_sigma(0.5, 1e-5, 2.0) == pytest.approx(math.sqrt(2 * math.log(125_000)) * 4)


def test_more_budget_means_less_noise() -> None:
    sigmas = [analytic_gaussian_sigma(eps, 1e-5) for eps in (0.1, 0.5, 1, 5, 50, 500)]
    assert sigmas == sorted(sigmas, reverse=True)
    sigmas = [analytic_gaussian_sigma(1.0, delta) for delta in (1e-12, 1e-6, 1e-3, 0.1, 0.5)]
    assert sigmas == sorted(sigmas, reverse=True)


def test_large_eps_neither_overflows_nor_loses_the_tail() -> None:
    for eps in (710.0, 5000.0, 1e5):
        sigma = analytic_gaussian_sigma(eps, 1e-5)
        assert 0 < sigma < analytic_gaussian_sigma(eps / 2, 1e-5)
        assert gaussian_delta(sigma, eps) == pytest.approx(1e-5, rel=1e-6)


def test_zero_sensitivity_needs_no_noise() -> None:
    assert analytic_gaussian_sigma(1.0, 1e-5, 0.0) == 0.0


@pytest.mark.parametrize(
    ("eps", "delta", "sensitivity", "said"),
    [
        (0.0, 1e-5, 1.0, "dp_eps=0.0"),
        (-1.0, 1e-5, 1.0, "dp_eps=-1.0"),
        (math.inf, 1e-5, 1.0, "dp_eps=inf"),
        (math.nan, 1e-5, 1.0, "dp_eps=nan"),
        (1.0, 0.0, 1.0, "dp_delta=0.0"),
        (1.0, 1.0, 1.0, "dp_delta=1.0"),
        (1.0, math.nan, 1.0, "dp_delta=nan"),
        (1.0, 1e-5, -0.1, "sensitivity -0.1"),
        (1.0, 1e-5, math.inf, "sensitivity inf"),
    ],
)
def test_bad_parameters_are_refused(eps: float, delta: float, sensitivity: float, said: str) -> None:
    with pytest.raises(ConfigError, match=said.replace("(", r"\(")):
        analytic_gaussian_sigma(eps, delta, sensitivity)


# --------------------------------------------------------------------------- clipping and noise


def _model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "conv.weight": rng.standard_normal(60_000).astype(np.float32),
        "fc.bias": rng.standard_normal(6_404).astype(np.float32),
    }


def test_without_noise_the_update_is_clipped_to_the_bound() -> None:
    rng = np.random.default_rng(1)
    before = _model(rng)
    step = {name: rng.standard_normal(a.size).astype(np.float32) * 0.01 for name, a in before.items()}
    trained = {name: before[name] + step[name] for name in before}
    norm = update_norm(before, trained)
    assert norm > 1.0
    upload = dp_upload(before, trained, data_size=7, clip=0.5, sigma=0.0, rng=rng)
    assert list(upload) == list(trained)
    sent = {name: upload[name] / np.float32(7) for name in upload}
    assert update_norm(before, sent) == pytest.approx(0.5, rel=1e-4)
    # same direction as the update
    for name in before:
        np.testing.assert_allclose(sent[name] - before[name], step[name] * (0.5 / norm), atol=1e-6)
    # an update inside the ball is not scaled
    upload = dp_upload(before, trained, data_size=3, clip=2 * norm, sigma=0.0, rng=rng)
    for name in before:
        np.testing.assert_allclose(upload[name], trained[name] * np.float32(3), rtol=1e-6, atol=1e-6)


def test_a_zero_update_is_uploaded_with_noise() -> None:
    rng = np.random.default_rng(2)
    before = _model(rng)
    upload = dp_upload(before, before, data_size=1, clip=0.05, sigma=0.1, rng=rng)
    noise = np.concatenate([upload[name] - before[name] for name in before])
    assert np.std(noise) == pytest.approx(0.1, rel=0.02)


def test_the_noise_has_the_configured_scale_over_many_draws() -> None:
    """20 uploads of 66 404 values each (1.3 M draws), seeded: the residual after removing the clipped update
    is N(0, sigma^2) with sigma = analytic_gaussian_sigma(eps, delta, clip)."""
    eps, delta, clip, n = 1.0, 1e-5, 0.05, 13
    sigma = analytic_gaussian_sigma(eps, delta, clip)
    assert sigma == pytest.approx(3.7306316348159418 * clip)
    residuals = []
    for seed in range(20):
        rng = np.random.default_rng([99, seed])
        before = _model(rng)
        trained = {name: a + rng.standard_normal(a.size).astype(np.float32) for name, a in before.items()}
        factor = clip / update_norm(before, trained)
        upload = dp_upload(before, trained, data_size=n, clip=clip, sigma=sigma, rng=rng)
        for name in before:
            clipped = before[name].astype(np.float64) + (trained[name] - before[name]) * factor
            residuals.append(upload[name].astype(np.float64) / n - clipped)
    z = np.concatenate(residuals) / sigma
    assert z.size == 20 * 66_404
    se = 1 / math.sqrt(z.size)
    assert abs(z.mean()) < 5 * se
    assert z.std() == pytest.approx(1.0, abs=0.005)  # the std's standard error is 0.0006
    assert np.mean(np.abs(z) < 1) == pytest.approx(0.682689, abs=0.003)
    assert np.mean(np.abs(z) < 2) == pytest.approx(0.954500, abs=0.002)
    assert abs(np.mean(z**3)) < 0.01 and np.mean(z**4) == pytest.approx(3.0, abs=0.03)  # Gaussian shape


def test_the_same_seed_gives_the_same_noise() -> None:
    before = _model(np.random.default_rng(3))
    trained = {name: a + 1 for name, a in before.items()}

    def once(seed: int) -> dict[str, np.ndarray]:
        return dp_upload(before, trained, data_size=2, clip=0.1, sigma=0.3, rng=np.random.default_rng(seed))

    for name in before:
        np.testing.assert_array_equal(once(5)[name], once(5)[name])
        assert not np.array_equal(once(5)[name], once(6)[name])


def test_an_update_of_an_unknown_or_resized_tensor_is_refused() -> None:
    before = {"a": np.zeros(4, np.float32)}
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="'b' is not in the global model"):
        dp_upload(before, {"b": np.ones(4)}, data_size=1, clip=1.0, sigma=0.0, rng=rng)
    with pytest.raises(ConfigError, match="has 5 values, but the global model's has 4"):
        dp_upload(before, {"a": np.ones(5)}, data_size=1, clip=1.0, sigma=0.0, rng=rng)
    with pytest.raises(ConfigError, match="data_size"):
        dp_upload(before, {"a": np.ones(4)}, data_size=0, clip=1.0, sigma=0.0, rng=rng)


# ------------------------------------------------------------------------------ adaptive clip bound


def test_the_clip_bound_adapts_as_the_original() -> None:
    before = {"a": np.zeros(3, np.float32)}
    moved = {"a": np.array([3.0, 4.0, 0.0], np.float32)}  # moved by 5
    # iteration 1 takes the new bound, even when it is larger than the initial 0.05
    assert next_clip(INITIAL_CLIP, 2.0, before, moved, iteration=1) == pytest.approx(10.0)
    # later iterations only lower it
    assert next_clip(4.0, 2.0, before, moved, iteration=2) == 4.0
    assert next_clip(40.0, 2.0, before, moved, iteration=7) == pytest.approx(10.0)
    # a model that did not move (a failed iteration carried it over) leaves the bound alone
    assert next_clip(4.0, 2.0, before, before, iteration=3) == 4.0
    assert next_clip(4.0, 2.0, before, before, iteration=1) == 4.0
    assert next_clip(4.0, 2.0, before, {"a": np.array([np.inf, 0, 0], np.float32)}, iteration=2) == 4.0


def test_device_privacy_applies_the_plan() -> None:
    rng = np.random.default_rng(4)
    before = {"w": rng.standard_normal(20_000).astype(np.float32)}
    trained = {"w": before["w"] + 1.0}
    upload = {"w": trained["w"] * np.float32(5)}
    plain = DevicePrivacy(seed=1).protect(FLPlanParams(), before, upload, data_size=5)
    assert plain.sign == 0 and plain.index_array.size == 0 and plain.feature_maps is upload

    privacy = DevicePrivacy(seed=1)
    plan = FLPlanParams(encrypt_type="DP_ENCRYPT", dp_eps=1.0, dp_delta=1e-5, dp_norm_clip=0.5)
    assert privacy.clip == INITIAL_CLIP
    dp = privacy.protect(plan, before, upload, data_size=5, trained=trained)
    assert dp.sign == 0 and dp.index_array.size == 0
    noise = np.asarray(dp.feature_maps["w"]) / 5 - before["w"]
    assert np.std(noise) == pytest.approx(analytic_gaussian_sigma(1.0, 1e-5, INITIAL_CLIP), rel=0.02)
    # without TrainResult.weights the trained weights are the upload divided by the data size
    again = DevicePrivacy(seed=1).protect(plan, before, upload, data_size=5)
    np.testing.assert_allclose(
        np.asarray(again.feature_maps["w"]), np.asarray(dp.feature_maps["w"]), atol=1e-4
    )

    new_global = {"w": before["w"] + np.float32(0.01)}
    privacy.observe(plan, before, new_global, uploaded=("w",), iteration=1)
    assert privacy.clip == pytest.approx(0.5 * 0.01 * math.sqrt(20_000), rel=1e-4)
    privacy.observe(FLPlanParams(), before, before, uploaded=("w",), iteration=2)  # not DP: unchanged
    assert privacy.clip == pytest.approx(0.5 * 0.01 * math.sqrt(20_000), rel=1e-4)


def test_trained_weights_must_cover_the_upload() -> None:
    plan = FLPlanParams(encrypt_type="DP_ENCRYPT")
    before = {"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}
    upload = {"w": np.ones(2, np.float32), "b": np.ones(1, np.float32)}
    with pytest.raises(ConfigError, match=r"TrainResult\.weights lacks"):
        DevicePrivacy(seed=0).protect(plan, before, upload, data_size=1, trained={"w": np.ones(2)})
