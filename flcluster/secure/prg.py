"""The masks' pseudo-random generator, bit-exact with the original (spec/secure-aggregation.md, "Masks").

Theory of operation
-------------------
``PRG(key, iv, L)`` is the AES-CTR keystream under ``key`` (32 bytes: AES-256; 16 bytes: AES-128) from the
initial counter block ``iv`` (16 bytes, the whole block counting up as one 128-bit big-endian integer, as
OpenSSL and Java's ``AES/CTR/NoPadding`` do), cut into ``L`` **little-endian int32** values ``k_i``, each
mapped to a float32 as the original's C++ ``static_cast<float>(k) / INT32_MAX`` and Java
``Float.valueOf(k) / Integer.MAX_VALUE``: the int is rounded to float32, and ``INT32_MAX`` becomes the
float32 ``2^31``, so::

    PRG_i = fl32(k_i) / 2^31        exactly; a float32 in [-1, 1]

Division by a power of two is exact, so the value is the same bits on every side that rounds ``k_i`` to
nearest (all of them). Masking is therefore in floating point, not in a finite ring (ref §8.12): the
masks cancel up to rounding, which spec/secure-aggregation.md, "Error bound", bounds.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from flcluster.errors import CipherInputError

__all__ = ["keystream_to_floats", "prg"]

_SCALE = np.float32(2.0**31)


def prg(key: bytes, iv: bytes, length: int) -> npt.NDArray[np.float32]:
    """``length`` float32 values in ``[-1, 1]`` from the AES-CTR keystream of ``key`` and ``iv``.

    Args:
        key: The AES key: 32 bytes (a seed ``b_u`` or a pairwise key) or 16 bytes.
        iv: The initial counter block, 16 bytes (``ind_iv`` or a ``pw_iv``).
        length: How many values.

    Returns:
        A new float32 array of ``length`` values.

    Raises:
        CipherInputError: A key or IV of the wrong size.
        ValueError: ``length`` is negative (a caller's bug).
    """
    if len(key) not in (16, 32):
        raise CipherInputError(f"a PRG key must be 16 or 32 bytes, got {len(key)!r}")
    if len(iv) != 16:
        raise CipherInputError(f"a PRG IV must be 16 bytes, got {len(iv)!r}")
    if length < 0:
        raise ValueError(f"a PRG length must be >= 0, got {length!r}")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return keystream_to_floats(encryptor.update(bytes(4 * length)) + encryptor.finalize())


def keystream_to_floats(stream: bytes) -> npt.NDArray[np.float32]:
    """Read keystream bytes as little-endian int32 ``k`` and map each to ``fl32(k) / 2^31``.

    Args:
        stream: A multiple of 4 bytes.

    Returns:
        A new float32 array, ``len(stream) // 4`` values in ``[-1, 1]``.
    """
    ints = np.frombuffer(stream, dtype="<i4")
    return ints.astype(np.float32) / _SCALE
