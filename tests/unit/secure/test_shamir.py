"""Shamir sharing over the 264-bit prime (spec/secure-aggregation.md §1.1, §1.4)."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flcluster.errors import CipherInputError, UnmaskError
from flcluster.secure import shamir
from flcluster.secure.shamir import Share, combine, split
from tests.unit.secure.values import PRIME

secrets_32 = st.binary(min_size=32, max_size=32)


@st.composite
def sharings(draw: st.DrawFn) -> tuple[bytes, int, int, list[Share], list[Share]]:
    """A secret, t, n, its n shares and a random subset of at least t of them in random order."""
    secret = draw(secrets_32 | st.just(bytes(32)) | st.just(b"\x00" * 5 + b"\x01" * 27))
    n = draw(st.integers(1, 25))
    t = draw(st.integers(1, n))
    rng = random.Random(draw(st.integers(0, 2**32)))
    shares = split(secret, t, n, PRIME, randbelow=rng.randrange)
    subset = draw(st.permutations(shares))[: draw(st.integers(t, n))]
    return secret, t, n, shares, subset


@given(sharings())
def test_any_t_of_n_shares_rebuild_the_secret(case: tuple[bytes, int, int, list[Share], list[Share]]) -> None:
    secret, t, n, shares, subset = case
    assert [s.index for s in shares] == list(range(1, n + 1))  # the original's numbering
    assert all(0 <= s.value < PRIME for s in shares)
    assert combine(subset, t, PRIME, 32) == secret  # leading zero bytes included


@given(sharings(), st.data())
def test_a_wrong_extra_share_is_refused(
    case: tuple[bytes, int, int, list[Share], list[Share]], data: st.DataObject
) -> None:
    _secret, t, _n, _shares, subset = case
    if len(subset) == t:
        return
    victim = data.draw(st.integers(0, len(subset) - 1))
    delta = data.draw(st.integers(1, PRIME - 1))
    bad = list(subset)
    bad[victim] = Share(bad[victim].index, (bad[victim].value + delta) % PRIME)
    with pytest.raises(UnmaskError, match="do not agree"):
        combine(bad, t, PRIME, 32)


def _feeder(values: tuple[int, ...]) -> Callable[[int], int]:
    feed = iter(values)
    return lambda _p: next(feed)


def test_t_minus_one_shares_are_uniform_whatever_the_secret() -> None:
    # Structural, exhaustive over a small field: for every secret, the map from the t - 1 random
    # coefficients to t - 1 shares is a bijection, so those shares are uniform and independent of the secret.
    p, t = 13, 3
    for indices in itertools.combinations(range(1, p), t - 1):
        for secret in range(p):
            seen: Counter[tuple[int, ...]] = Counter()
            for coefficients in itertools.product(range(p), repeat=t - 1):
                shares = split(bytes([secret]), t, p - 1, p, randbelow=_feeder(coefficients))
                seen[tuple(shares[i - 1].value for i in indices)] += 1
            assert len(seen) == p ** (t - 1) and set(seen.values()) == {1}


def test_t_minus_one_shares_are_statistically_uniform_over_the_real_prime() -> None:
    # With t = 2 one share is f(i) = s + c·i: its top byte is uniform whatever s is (chi-square, seeded).
    rng = random.Random(7)
    for secret in (bytes(32), b"\xff" * 32):
        tops = Counter(
            split(secret, 2, 3, PRIME, randbelow=rng.randrange)[1].value >> (PRIME.bit_length() - 4)
            for _ in range(4000)
        )
        assert sum(tops.values()) == 4000
        shift = PRIME.bit_length() - 4
        expected = 4000 * 2**shift / PRIME  # each full nibble bucket; the prime's own top nibble is partial
        chi2 = sum((tops[k] - expected) ** 2 / expected for k in range(PRIME >> shift))
        assert chi2 < 45, (secret[:1], chi2)  # 12 degrees of freedom: p < 1e-5


def test_shares_are_written_as_the_original_writes_them() -> None:
    assert shamir.to_share_bytes(0) == b""
    assert shamir.to_share_bytes(1) == b"\x01"
    assert shamir.to_share_bytes(256) == b"\x01\x00"
    assert shamir.to_share_bytes(PRIME - 1) == (PRIME - 1).to_bytes(33, "big")
    assert shamir.from_share_bytes(b"") == 0
    with pytest.raises(CipherInputError, match="at most 33 bytes"):
        shamir.from_share_bytes(bytes(34))


@pytest.mark.parametrize(
    ("shares", "error", "match"),
    [
        ([Share(1, 5)], UnmaskError, "needs 2 shares"),
        ([Share(1, 5), Share(1, 5)], CipherInputError, "given twice"),
        ([Share(0, 5), Share(1, 5)], CipherInputError, r"index must be in \[1, p\)"),
        ([Share(PRIME, 5), Share(1, 5)], CipherInputError, r"index must be in \[1, p\)"),
        ([Share(1, PRIME), Share(2, 5)], CipherInputError, "below the prime"),
        ([Share(1, -1), Share(2, 5)], CipherInputError, "below the prime"),
    ],
)
def test_malformed_shares_are_refused(shares: list[Share], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        combine(shares, 2, PRIME, 32)


def test_a_result_that_does_not_fit_the_secret_is_refused() -> None:
    # Two arbitrary points define some line; its constant term is almost surely not a 32-byte value.
    with pytest.raises(UnmaskError, match="does not fit 32 bytes"):
        combine([Share(1, PRIME - 1), Share(2, 3)], 2, PRIME, 32)


def test_split_refuses_impossible_parameters() -> None:
    with pytest.raises(ValueError, match="1 <= t <= n"):
        split(bytes(32), 4, 3, PRIME)
    with pytest.raises(ValueError, match="1 <= t <= n"):
        split(bytes(32), 0, 3, PRIME)
    with pytest.raises(ValueError, match="below the prime"):
        split(b"\xff" * 34, 1, 3, PRIME)


def test_miller_rabin_against_known_numbers() -> None:
    primes = [2, 3, 5, 1999, 2003, 2**61 - 1, 2**127 - 1, PRIME, (PRIME - 1) // 2]
    # Carmichael numbers and strong pseudoprimes to small bases, then products of two large primes.
    composites = [1, 0, 4, 561, 41041, 2047, 1373653, 25326001, 3215031751, 3825123056546413051]
    composites += [(2**61 - 1) * (2**127 - 1), PRIME * 3, 2003 * 2003]
    assert all(shamir.is_probable_prime(p) for p in primes)
    assert not any(shamir.is_probable_prime(c) for c in composites)


def test_generated_primes_are_distinct_264_bit_safe_primes() -> None:
    made = {shamir.generate_prime() for _ in range(3)}
    assert len(made) == 3
    for p in made:
        assert p.bit_length() == 264 and len(shamir.to_share_bytes(p)) == 33
        assert shamir.is_probable_prime(p) and shamir.is_probable_prime((p - 1) // 2)
        assert shamir.check_prime(p.to_bytes(33, "big")) == p


def test_check_prime_refuses_what_a_device_must_not_use() -> None:
    with pytest.raises(CipherInputError, match="33 bytes"):
        shamir.check_prime(PRIME.to_bytes(34, "big"))
    with pytest.raises(CipherInputError, match="bits"):
        shamir.check_prime((5).to_bytes(33, "big"))
    with pytest.raises(CipherInputError, match="not prime"):
        shamir.check_prime((PRIME + 2).to_bytes(33, "big"))
