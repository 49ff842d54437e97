"""X25519, the PBKDF2 key derivation and the share encryption (spec/secure-aggregation.md §1.3, §1.5)."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from flcluster.errors import CipherInputError
from flcluster.secure import keys
from flcluster.secure.shamir import Share
from tests.unit.secure.values import PRIME

# RFC 7748 §6.1
ALICE_SK = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PK = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_SK = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PK = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_x25519_and_pbkdf2_against_independent_references() -> None:
    assert keys.public_key(ALICE_SK) == ALICE_PK and keys.public_key(BOB_SK) == BOB_PK
    salt = bytes(range(32))
    expected = hashlib.pbkdf2_hmac("sha256", SHARED, salt, 10_000, 32)
    assert keys.agree(ALICE_SK, BOB_PK, salt) == expected == keys.agree(BOB_SK, ALICE_PK, salt)
    # the share key: an empty salt, as the Java client
    assert keys.agree(ALICE_SK, BOB_PK, b"") == hashlib.pbkdf2_hmac("sha256", SHARED, b"", 10_000, 32)


def test_fresh_keys_agree_both_ways() -> None:
    a, b = keys.generate_private_key(), keys.generate_private_key()
    assert a != b
    assert keys.agree(a, keys.public_key(b), b"s" * 32) == keys.agree(b, keys.public_key(a), b"s" * 32)


@pytest.mark.parametrize(
    ("sk", "pk", "match"),
    [
        (ALICE_SK, bytes(32), "gives no shared secret"),  # the all-zero (small-order) point
        (ALICE_SK, (1).to_bytes(32, "little"), "gives no shared secret"),
        (ALICE_SK, BOB_PK[:31], "public key must be 32 bytes"),
        (ALICE_SK[:31], BOB_PK, "private key must be 32 bytes"),
    ],
)
def test_bad_keys_are_refused(sk: bytes, pk: bytes, match: str) -> None:
    with pytest.raises(CipherInputError, match=match):
        keys.agree(sk, pk, b"")


share_values = st.integers(0, PRIME - 1)
share_indices = st.integers(1, 2**31 - 1)


@given(share_indices, share_values, share_indices, share_values, st.binary(min_size=32, max_size=32))
def test_encrypted_shares_round_trip(si: int, sv: int, bi: int, bv: int, key: bytes) -> None:
    blob = keys.encrypt_shares(key, Share(si, sv), Share(bi, bv))
    assert len(blob) % 16 == 0 and len(blob) >= 32
    assert keys.decrypt_shares(key, blob) == (Share(si, sv), Share(bi, bv))


def test_the_plaintext_has_the_java_clients_layout() -> None:
    key, iv = bytes(range(32)), bytes(range(100, 116))
    blob = keys.encrypt_shares(key, Share(3, 0x0102), Share(3, 0), iv=iv)
    assert blob[:16] == iv  # the IV in front, as the Java AESEncrypt.encrypt
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    plain = unpadder.update(decryptor.update(blob[16:]) + decryptor.finalize()) + unpadder.finalize()
    # [len s, len b, len s_index, len b_index] s_index b_index s b
    assert plain == bytes([2, 0, 1, 1, 3, 3, 0x01, 0x02])


def test_two_encryptions_of_the_same_shares_differ() -> None:
    key, s, b = bytes(32), Share(1, 7), Share(1, 8)
    assert keys.encrypt_shares(key, s, b) != keys.encrypt_shares(key, s, b)


def _cbc(key: bytes, iv: bytes, plain: bytes) -> bytes:
    padder = padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return iv + encryptor.update(padder.update(plain) + padder.finalize()) + encryptor.finalize()


KEY, IV = bytes(range(32)), bytes(16)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"", "whole 16-byte blocks"),
        (bytes(16), "whole 16-byte blocks"),
        (bytes(40), "whole 16-byte blocks"),
        (_cbc(KEY, IV, b"\x01\x01"), "shorter than its 4-byte header"),
        (_cbc(KEY, IV, bytes([34, 1, 1, 1, 1, 1]) + bytes(35)), "at most 33 allowed"),
        (_cbc(KEY, IV, bytes([1, 1, 0, 1, 1, 7, 7])), r"1…4 allowed"),
        (_cbc(KEY, IV, bytes([1, 1, 5, 1]) + bytes(8)), r"1…4 allowed"),
        (_cbc(KEY, IV, bytes([1, 1, 1, 1, 1, 1, 7])), "its header declares 8"),
        (_cbc(KEY, IV, bytes([1, 1, 1, 1, 1, 1, 7, 7, 0])), "its header declares 8"),
        (_cbc(KEY, IV, bytes([1, 1, 1, 1, 0, 1, 7, 7])), r"indices must be in \[1, 2\*\*31\)"),
        (_cbc(KEY, IV, bytes([1, 1, 4, 1, 0x80, 0, 0, 0, 1, 7, 7])), r"indices must be in \[1, 2\*\*31\)"),
    ],
)
def test_malformed_blobs_are_refused(blob: bytes, match: str) -> None:
    with pytest.raises(CipherInputError, match=match):
        keys.decrypt_shares(KEY, blob)


def test_a_wrong_key_or_an_altered_blob_is_refused() -> None:
    blob = keys.encrypt_shares(KEY, Share(2, PRIME - 1), Share(2, 12345), iv=IV)
    with pytest.raises(CipherInputError, match="bad padding"):
        keys.decrypt_shares(bytes(32), blob)
    altered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(CipherInputError, match="bad padding"):
        keys.decrypt_shares(KEY, altered)
