"""Shamir secret sharing over a prime field, and the field's prime (spec/secure-aggregation.md, "Primitives").

Theory of operation
-------------------
A secret ``s`` (a byte string read as an unsigned big-endian integer, ``s < p``) is hidden as the constant
term of a random polynomial of degree ``t - 1`` over GF(p)::

    f(x) = s + c_1 x + … + c_{t-1} x^{t-1}      c_i uniform in [0, p)

(the Java client draws the ``c_i`` from ``[1, p)``; excluding 0 makes a share slightly less likely to be
``s`` itself, a leak of order ``1/p``, so they are drawn from the whole field here).

Share ``i`` (``i = 1 … n``) is the pair ``(i, f(i))``. Any ``t`` shares determine ``f`` and so ``s``
(Lagrange interpolation at 0); ``t - 1`` shares are consistent with every possible secret, each with the
same probability, so they say nothing about it.

**The threshold, exactly as the original.** ``t`` is ``reconstruct_secrets_threshold``: **``t`` shares
suffice** (the Java client splits with ``minNum = t``, the C++ server combines ``secrets_minnums_ = t``
shares). The reconstructSecrets round waits for ``t + 1`` *clients* because a client never holds a
share of its own secret: ``t + 1`` senders give every peer at least ``t`` shares.

**Layout, as the original.** An index travels as an int; a share value as its minimal big-endian bytes
(no leading zero bytes, the value 0 as the empty string), the way the Java client's
``BaseUtil.bigInteger2byteArray`` writes it. The original server writes the combined secret with
``BN_bn2bin`` into a fixed 32-byte buffer *left-aligned*, so a secret whose first byte is zero comes
back shifted and wrong (one secret in 256; one X25519 key in 32). :func:`combine` takes the secret's
size and pads on the left, which is what the client meant.

**Beyond the original.** :func:`combine` checks every share it is given, not only the first ``t``: with
more than ``t`` shares, each extra one must lie on the polynomial the first ``t`` define, otherwise the
shares disagree and it refuses (the original silently interpolates the first ``t``). Indices must be
distinct and in ``[1, p)``, values in ``[0, p)``, and the result must fit the secret's size.

**The prime.** :func:`generate_prime` makes a random 264-bit (33-byte) *safe* prime ``p = 2q + 1``, as the
original's ``BN_generate_prime_ex(p, 264, safe=1)``; safety is not needed by Shamir sharing, it is kept so
that the parameter is the same kind of number. Primality is a Miller-Rabin test written here
(:func:`is_probable_prime`), after trial division by the small primes.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterable, Sequence

import attrs

from flcluster.errors import CipherInputError, UnmaskError

__all__ = [
    "PRIME_BITS",
    "PRIME_SIZE",
    "Share",
    "check_prime",
    "combine",
    "from_share_bytes",
    "generate_prime",
    "is_probable_prime",
    "split",
    "to_share_bytes",
]

PRIME_SIZE = 33
"""Bytes of the field prime (the original's ``PRIME_MAX_LEN``, ``SECRET_MAX_LEN + 1``)."""

PRIME_BITS = 8 * PRIME_SIZE
"""Bits of the field prime: the top bit is set, so it takes exactly :data:`PRIME_SIZE` bytes."""

_MR_ROUNDS = 40  # error ≤ 4**-40 for any odd composite
_SMALL_PRIMES: tuple[int, ...] = tuple(
    n for n in range(3, 2000, 2) if all(n % d for d in range(3, int(n**0.5) + 1, 2))
)
_SMALL_PRODUCT = 1
for _p in _SMALL_PRIMES:
    _SMALL_PRODUCT *= _p


@attrs.frozen
class Share:
    """One Shamir share: the point ``(index, value)`` of the sharing polynomial.

    Attributes:
        index: The x coordinate, ``1 … n`` as the original numbers them.
        value: ``f(index)``, an integer in ``[0, p)``.
    """

    index: int
    value: int


def to_share_bytes(value: int) -> bytes:
    """Write a share value (or an index) as the original does: minimal unsigned big-endian bytes.

    Args:
        value: A non-negative integer.

    Returns:
        Its big-endian bytes without leading zero bytes; ``b""`` for 0.
    """
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def from_share_bytes(data: bytes, what: str = "share") -> int:
    """Read an unsigned big-endian share value of at most :data:`PRIME_SIZE` bytes.

    Args:
        data: The bytes as they travel.
        what: What the bytes are, for the error message.

    Returns:
        The integer.

    Raises:
        CipherInputError: ``data`` is longer than a value below the prime can be.
    """
    if len(data) > PRIME_SIZE:
        raise CipherInputError(
            f"a Shamir {what} takes at most {PRIME_SIZE} bytes (values below the 33-byte prime), "
            f"got {len(data)!r} bytes"
        )
    return int.from_bytes(data, "big")


# ------------------------------------------------------------------------------------------ primes


def is_probable_prime(n: int, rounds: int = _MR_ROUNDS) -> bool:
    """Miller-Rabin: whether ``n`` is prime, wrong for a composite with probability at most ``4**-rounds``.

    Args:
        n: The number to test.
        rounds: Random bases to try.

    Returns:
        False if ``n`` is certainly composite (or below 2), True if it passed every round.
    """
    if n < 2:
        return False
    for p in (2, *_SMALL_PRIMES):
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for _ in range(rounds):
        a = 2 + secrets.randbelow(n - 3)
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def generate_prime() -> int:
    """A random 264-bit safe prime ``p = 2q + 1`` (``q`` prime), as the original's field prime.

    Returns:
        The prime; its top bit is set, so it is exactly :data:`PRIME_SIZE` bytes long.
    """
    while True:
        # q: 263 bits with the top bit set, and odd; then p = 2q + 1 has exactly 264 bits.
        q = secrets.randbits(PRIME_BITS - 1) | (1 << (PRIME_BITS - 2)) | 1
        p = 2 * q + 1
        # One gcd each rules out the small factors of q and of p at once.
        if math.gcd(q, _SMALL_PRODUCT) != 1 or math.gcd(p, _SMALL_PRODUCT) != 1:
            continue
        if pow(2, q - 1, q) != 1 or pow(2, p - 1, p) != 1:  # cheap Fermat filter first
            continue
        if is_probable_prime(q) and is_probable_prime(p):
            return p


def check_prime(prime: bytes | int) -> int:
    """Check a field prime received from elsewhere (a server's PWParams): 33 bytes and prime.

    Args:
        prime: The prime as it travels (33 big-endian bytes) or as an integer.

    Returns:
        The prime as an integer.

    Raises:
        CipherInputError: It is not 33 bytes with a non-zero first byte, or not prime.
    """
    if isinstance(prime, bytes):
        if len(prime) != PRIME_SIZE:
            raise CipherInputError(f"the field prime must be {PRIME_SIZE} bytes, got {len(prime)!r}")
        value = int.from_bytes(prime, "big")
    else:
        value = prime
    if value.bit_length() <= 8 * (PRIME_SIZE - 1) or value.bit_length() > PRIME_BITS:
        raise CipherInputError(
            f"the field prime must have {8 * (PRIME_SIZE - 1) + 1}…{PRIME_BITS} bits, "
            f"got {value.bit_length()!r}"
        )
    if not is_probable_prime(value):
        raise CipherInputError(f"the field prime {value:#x} is not prime")
    return value


# -------------------------------------------------------------------------------------- split, combine


def split(
    secret: bytes, t: int, n: int, prime: int, *, randbelow: Callable[[int], int] = secrets.randbelow
) -> list[Share]:
    """Split ``secret`` into ``n`` shares, any ``t`` of which rebuild it.

    Args:
        secret: The secret bytes, read as an unsigned big-endian integer (must be below ``prime``).
        t: Shares that suffice (``1 ≤ t ≤ n``): the polynomial has degree ``t - 1``.
        n: Shares to make; they get indices ``1 … n``.
        prime: The field prime.
        randbelow: The source of the coefficients, uniform in ``[0, p)`` (tests pass a seeded one).

    Returns:
        ``n`` shares, in index order.

    Raises:
        ValueError: ``t`` or ``n`` out of range, or the secret not below the prime (a caller's bug).
    """
    if not 1 <= t <= n:
        raise ValueError(f"Shamir sharing needs 1 <= t <= n, got t={t!r}, n={n!r}")
    s = int.from_bytes(secret, "big")
    if s >= prime:
        raise ValueError(
            f"the secret ({len(secret)} bytes) must be below the prime ({prime.bit_length()} bits)"
        )
    coefficients = [s] + [randbelow(prime) for _ in range(t - 1)]
    return [Share(i, _evaluate(coefficients, i, prime)) for i in range(1, n + 1)]


def _evaluate(coefficients: Sequence[int], x: int, prime: int) -> int:
    acc = 0
    for c in reversed(coefficients):  # Horner
        acc = (acc * x + c) % prime
    return acc


def combine(shares: Iterable[Share], t: int, prime: int, size: int) -> bytes:
    """Rebuild a secret from at least ``t`` shares, checking that all of them agree.

    Args:
        shares: The shares; any order, at least ``t``.
        t: The threshold the secret was split with.
        prime: The field prime.
        size: The secret's size in bytes; the result is left-padded to it.

    Returns:
        The secret, ``size`` bytes.

    Raises:
        CipherInputError: A share is malformed: an index outside ``[1, p)``, a value outside ``[0, p)``,
            or an index given twice.
        UnmaskError: Fewer than ``t`` shares, shares that do not lie on one polynomial of degree
            ``t - 1``, or a result that does not fit ``size`` bytes.
    """
    given = list(shares)
    seen: set[int] = set()
    for share in given:
        if not 1 <= share.index < prime:
            raise CipherInputError(f"a Shamir share index must be in [1, p), got {share.index!r}")
        if not 0 <= share.value < prime:
            raise CipherInputError(f"a Shamir share value must be below the prime, got {share.value:#x}")
        if share.index in seen:
            raise CipherInputError(f"Shamir share index {share.index!r} is given twice")
        seen.add(share.index)
    if len(given) < t:
        raise UnmaskError(f"a secret split with threshold t={t!r} needs {t} shares, got {len(given)!r}")
    base, extra = given[:t], given[t:]
    for share in extra:
        if _interpolate(base, share.index, prime) != share.value:
            raise UnmaskError(
                f"the {len(given)} shares do not agree: share {share.index!r} is not on the polynomial "
                f"of the first {t}"
            )
    secret = _interpolate(base, 0, prime)
    if secret.bit_length() > 8 * size:
        raise UnmaskError(f"the rebuilt secret does not fit {size!r} bytes: the shares are wrong")
    return secret.to_bytes(size, "big")


def _interpolate(points: Sequence[Share], x: int, prime: int) -> int:
    """The value at ``x`` of the polynomial of degree ``len(points) - 1`` through ``points`` (Lagrange)."""
    total = 0
    for j, pj in enumerate(points):
        num, den = 1, 1
        for m, pm in enumerate(points):
            if m != j:
                num = num * (x - pm.index) % prime
                den = den * (pj.index - pm.index) % prime
        total = (total + pj.value * num * pow(den, -1, prime)) % prime
    return total
