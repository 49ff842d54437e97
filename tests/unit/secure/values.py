"""Shared values of the secure-aggregation tests."""

from __future__ import annotations

#: A 264-bit safe prime made once with ``shamir.generate_prime()`` (test_shamir checks that it is one).
PRIME = 0xC81BA5D98C846659167EBB29C8DC67C43AF86CFF8EC9BB4089866EAFB4F3F06723
