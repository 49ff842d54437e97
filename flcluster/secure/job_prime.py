"""The field prime of one job, the same on every Server (spec/secure-aggregation.md §1.1, §R6).

Theory of operation
-------------------
Every Server of a job must put the same 264-bit prime in the FLPlans it sends (the devices of one iteration
share their secrets over it, and the leader rebuilds them over it). The original draws a random prime per
Server, which only works with one Server. Here (**flcluster**) each Server derives the prime from the job's
``fl_name``: the candidates are the same as :func:`~flcluster.secure.shamir.generate_prime`'s (263-bit odd
``q`` with its top bit set, ``p = 2q + 1`` a safe prime), but drawn from SHA-256 in counter mode over the
name instead of from the operating system. So every Server, a restarted one included, computes the same
prime with no message to agree on it. Shamir sharing needs no secret prime: its secrecy comes from the
random coefficients, which stay random.
"""

from __future__ import annotations

import math

from cryptography.hazmat.primitives import hashes

from flcluster.secure import shamir

__all__ = ["job_prime", "job_prime_bytes"]

_DOMAIN = b"flcluster PW_ENCRYPT field prime\x00"


_CACHE: dict[str, int] = {}


def _sha256(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize()


def job_prime(fl_name: str) -> int:
    """The job's 264-bit safe prime, a pure function of ``fl_name`` (about 0.2 s, then cached)."""
    if fl_name not in _CACHE:
        _CACHE[fl_name] = _derive(fl_name)
    return _CACHE[fl_name]


def _derive(fl_name: str) -> int:
    seed = _DOMAIN + fl_name.encode("utf-8")
    bits = shamir.PRIME_BITS - 1
    counter = 0
    while True:
        block = b"".join(_sha256(seed + (counter * 2 + i).to_bytes(8, "big")) for i in range(2))
        counter += 1
        q = int.from_bytes(block, "big") >> (8 * len(block) - bits)
        q |= (1 << (bits - 1)) | 1
        p = 2 * q + 1
        if math.gcd(q * p, shamir._SMALL_PRODUCT) != 1:
            continue
        if pow(2, q - 1, q) != 1 or pow(2, p - 1, p) != 1:
            continue
        if shamir.is_probable_prime(q) and shamir.is_probable_prime(p):
            return p


def job_prime_bytes(fl_name: str) -> bytes:
    """:func:`job_prime` as it travels in ``PWParams.prime``: 33 big-endian bytes."""
    return job_prime(fl_name).to_bytes(shamir.PRIME_SIZE, "big")
