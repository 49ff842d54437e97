"""The masks' PRG, bit-exact with the original (spec/secure-aggregation.md §1.6)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from flcluster.errors import CipherInputError
from flcluster.secure.prg import keystream_to_floats, prg

# NIST SP 800-38A F.5.5, CTR-AES256.Encrypt, block #1
NIST_KEY = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
NIST_IV = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
NIST_PLAIN = bytes.fromhex("6bc1bee22e409f96e93d7e117393172a")
NIST_CIPHER = bytes.fromhex("601ec313775789a5b7a7f504bbf3d228")


def _reference(key: bytes, iv: bytes, length: int) -> list[float]:
    """The PRG written out independently: AES-ECB of the counter blocks, int32 LE, rounded to float32."""
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    counter = int.from_bytes(iv, "big")
    stream = b""
    while len(stream) < 4 * length:
        stream += ecb.update(counter.to_bytes(16, "big"))
        counter = (counter + 1) % 2**128
    ints = struct.unpack(f"<{length}i", stream[: 4 * length])
    as_f32 = [struct.unpack("<f", struct.pack("<f", float(k)))[0] for k in ints]  # fl32(k)
    return [f / 2.0**31 for f in as_f32]


def test_keystream_matches_the_nist_vector() -> None:
    keystream = bytes(c ^ p for c, p in zip(NIST_CIPHER, NIST_PLAIN, strict=True))
    assert np.array_equal(prg(NIST_KEY, NIST_IV, 4), keystream_to_floats(keystream))


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=16, max_size=16), st.integers(0, 70))
def test_prg_equals_the_reference(key: bytes, iv: bytes, length: int) -> None:
    got = prg(key, iv, length)
    assert got.dtype == np.float32 and got.shape == (length,)
    assert got.tolist() == _reference(key, iv, length)
    assert np.all(np.abs(got) <= 1)


def test_the_counter_is_one_128_bit_integer() -> None:
    # From ff…ff the next block is 00…00 (OpenSSL's and Java's CTR), not a 64-bit wrap.
    key = bytes(32)
    assert prg(key, b"\xff" * 16, 12).tolist() == _reference(key, b"\xff" * 16, 12)
    assert prg(key, b"\x00" * 8 + b"\xff" * 8, 12).tolist() == _reference(key, b"\x00" * 8 + b"\xff" * 8, 12)


def test_int_to_float_as_the_c_and_java_casts() -> None:
    ints = [2**31 - 1, -(2**31), 0, 1, -1, 2**24 + 1, 2**24 + 3, 2**30 + 64]
    got = keystream_to_floats(struct.pack(f"<{len(ints)}i", *ints))
    assert got[0] == 1.0 and got[1] == -1.0 and got[2] == 0.0  # fl32(INT32_MAX) = 2**31
    assert got[3] == 2.0**-31 and got[4] == -(2.0**-31)
    assert got[5] == 2.0**24 / 2**31 and got[6] == (2.0**24 + 4) / 2**31  # ties to even
    assert got[7] == 2.0**30 / 2**31


def test_a_16_byte_key_is_aes_128() -> None:
    key, iv = bytes(range(16)), bytes(16)
    assert prg(key, iv, 9).tolist() == _reference(key, iv, 9)


@pytest.mark.parametrize(
    ("key", "iv"), [(bytes(31), bytes(16)), (bytes(32), bytes(15)), (bytes(24), bytes(16))]
)
def test_bad_sizes_are_refused(key: bytes, iv: bytes) -> None:
    with pytest.raises(CipherInputError):
        prg(key, iv, 4)
