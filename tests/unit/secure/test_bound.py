"""The error bound of unmasking at the sizes the cluster allows (spec/secure-aggregation.md §3).

Real keys cost a PBKDF2 per pair, so these tests replay the arithmetic of masking and unmasking with
PRG-like values (float32 in [-1, 1], random or all at ±1) on large K and M, for flcluster's SDK (float64
mask sum, one rounding) and for the original's Java device (float32 mask sum). test_protocol checks the
same bound with real keys on N ≤ 20.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flcluster.core.iteration import MAX_DATA_SIZE
from flcluster.secure.bound import U32, gamma, model_error_bound, sum_error_bound

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


def prg_like(gen: np.random.Generator, shape: tuple[int, ...], extreme: bool) -> F32:
    if extreme:
        return np.ones(shape, dtype=np.float32)
    ints = gen.integers(-(2**31), 2**31, size=shape, dtype=np.int64).astype(np.int32)
    return ints.astype(np.float32) / np.float32(2**31)


def replay(
    a: F32, m: int, gen: np.random.Generator, *, extreme: bool, float32_devices: bool
) -> tuple[F64, F64]:
    """Mask, fold and unmask ``a`` (K×L float32) with M - K dropped clients; returns (result, exact)."""
    k, length = a.shape
    pair = prg_like(gen, (m, m, length), extreme)
    pair = np.triu(pair.transpose(2, 0, 1), 1).transpose(1, 2, 0)
    pair = pair + pair.transpose(1, 0, 2)  # P[u, v] = P[v, u]
    ind = prg_like(gen, (k, length), extreme)
    sign = np.where(np.arange(m)[:, None] > np.arange(m)[None, :], 1.0, -1.0).astype(np.float32)
    signed = pair * sign[:, :, None]  # σ(u, v)·P_uv; the diagonal is 0 and adds nothing
    uploads = []
    for u in range(k):
        if float32_devices:  # Java: mask += σ·P one by one in float32, then a + mask in float32
            mask32 = np.cumsum(np.concatenate([signed[u], ind[u][None]]), axis=0, dtype=np.float32)[-1]
            uploads.append((a[u] + mask32).astype(np.float32))
        else:  # flcluster: float64 sum in order, one rounding of a + mask
            mask64 = np.cumsum(np.concatenate([signed[u], ind[u][None]]).astype(np.float64), axis=0)[-1]
            uploads.append((a[u].astype(np.float64) + mask64).astype(np.float32))
    order = gen.permutation(k)
    servers = [np.zeros(length, dtype=np.float32) for _ in range(1 + int(gen.integers(0, 4)))]
    for u in order:
        servers[int(gen.integers(0, len(servers)))] += uploads[u]
    total = np.zeros(length, dtype=np.float32)
    for partial in servers:
        total += partial
    noise = np.zeros(length, dtype=np.float64)
    for u in range(k):
        noise -= ind[u]
    for v in range(k, m):  # the dropped, with every survivor
        for w in range(k):
            noise += signed[v, w]
    exact = np.sum(a.astype(np.float64), axis=0)
    return total.astype(np.float64) + noise, exact


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 120),
    extra=st.integers(0, 30),
    length=st.integers(1, 6),
    size=st.sampled_from([1, 7, MAX_DATA_SIZE]),
    scale=st.sampled_from([0.0, 1e-6, 1.0, 1e3]),
    extreme=st.booleans(),
    float32_devices=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_the_error_stays_within_the_bound(
    k: int, extra: int, length: int, size: int, scale: float, extreme: bool, float32_devices: bool, seed: int
) -> None:
    gen = np.random.default_rng(seed)
    x = (gen.standard_normal((k, length)) * scale).astype(np.float32)
    a = x * np.float32(size)
    result, exact = replay(a, k + extra, gen, extreme=extreme, float32_devices=float32_devices)
    abs_sum = np.sum(np.abs(a).astype(np.float64), axis=0)
    bound = sum_error_bound(abs_sum, k, k + extra, float32_devices=float32_devices)
    assert np.all(np.abs(result - exact) <= bound)


@pytest.mark.parametrize("float32_devices", [False, True])
@pytest.mark.parametrize("size", [1, MAX_DATA_SIZE])
def test_worst_case_sizes(size: int, float32_devices: bool) -> None:
    # 400 uploads, 500 shared, every PRG value at 1 (the largest masks), values where rounding bites.
    k, m = 400, 500
    gen = np.random.default_rng(size)
    signs = gen.choice([-1, 1], (k, 1)).astype(np.float32)
    x = np.array([[1.0 + 2**-23, 3.0, 1e-7]] * k, dtype=np.float32) * signs
    a = x * np.float32(size)
    result, exact = replay(a, m, gen, extreme=True, float32_devices=float32_devices)
    abs_sum = np.sum(np.abs(a).astype(np.float64), axis=0)
    error = np.abs(result - exact)
    assert np.all(error <= sum_error_bound(abs_sum, k, m, float32_devices=float32_devices))
    assert error.max() > 0  # the masks really are lossy at this size


def test_the_bound_grows_with_every_size_and_has_the_stated_leading_term() -> None:
    base = sum_error_bound(100.0, 20, 20)
    assert sum_error_bound(200.0, 20, 20) > base
    assert sum_error_bound(100.0, 21, 21) > base and sum_error_bound(100.0, 20, 25) > base
    assert sum_error_bound(100.0, 20, 20, float32_devices=True) > base
    for a, k, m in ((20.0, 20, 20), (1e6, 1000, 1000), (0.0, 5000, 6000)):
        leading = k * U32 * (a + k * m)
        assert leading <= sum_error_bound(a, k, m) <= 1.01 * leading


def test_the_published_model_bound() -> None:
    # One upload of exactly representable values and no masks' rounding: only the two float32 roundings.
    assert model_error_bound(1.0, 1.0, 1, 1, 1) >= 2 * U32
    assert model_error_bound(10.0, 0.5, 20, 20, 20) < model_error_bound(10.0, 0.5, 10, 20, 20)
    per_coordinate = model_error_bound(np.array([1.0, 2.0]), np.array([0.1, 0.2]), 4, 2, 3)
    assert isinstance(per_coordinate, np.ndarray) and per_coordinate.shape == (2,)


def test_gamma_refuses_where_the_bound_says_nothing() -> None:
    assert gamma(1) == pytest.approx(U32)
    with pytest.raises(ValueError, match="n·u < 1"):
        gamma(2**24)


def test_the_spec_table_matches_the_bound() -> None:
    spec = (Path(__file__).parents[3] / "spec" / "secure-aggregation.md").read_text()
    rows = re.findall(r"^\| (\d+) \| (\d+) \| ([\d.e+-]+) \| ([\d.e+-]+) \| ([\d.e+-]+) \|$", spec, re.M)
    assert len(rows) >= 5
    for n_text, size_text, b_text, model_text, part_text in rows:
        n, size = int(n_text), int(size_text)
        b = sum_error_bound(float(n * size), n, n)
        model = model_error_bound(float(n * size), 1.0, n * size, n, n)
        part = n * U32 * n * n / (n * size)
        for stated, value in ((b_text, b), (model_text, model), (part_text, part)):
            assert math.isclose(float(stated), float(value), rel_tol=0.05), (n, size, stated, value)
