"""X25519 keys, the key derivation, the encryption of shares (spec/secure-aggregation.md, "Primitives").

Theory of operation
-------------------
Each client makes two X25519 key pairs per iteration: ``c`` to encrypt the shares it sends its peers and
``s`` to derive its pairwise masks. Keys travel as their 32 raw bytes, as in the original (Java
BouncyCastle ``X25519``, C++ OpenSSL ``EVP_PKEY_X25519`` raw keys).

**Key agreement.** Two clients ``u`` and ``v`` agree on a 32-byte key as the original does::

    K = PBKDF2-HMAC-SHA256(password = X25519(sk_u, pk_v), salt, iterations = 10 000, length = 32)

- for the **share key** (``c`` pair) the salt is **empty** (Java ``genEncryptExchangedKeys``);
- for the **pairwise mask key** (``s`` pair) the salt is the ``pw_salt`` of the lexicographically smaller
  of the two fl_ids (Java ``doubleMaskingWeight``, C++ ``GetSuvNoise``).

X25519 is symmetric (``X25519(sk_u, pk_v) = X25519(sk_v, pk_u)``), so both sides, and a server that has
rebuilt ``sk_u`` from shares, derive the same key. A public key whose shared secret is all zeros (a
small-order point) is refused.

**Share encryption.** ``u``'s two shares for ``v`` (of ``s_sk`` and of ``b_u``) are packed as the Java
client packs them::

    [len(s_share), len(b_share), len(s_index), len(b_index)]  4 bytes
    s_index ‖ b_index ‖ s_share ‖ b_share                      minimal big-endian each

and encrypted with **AES-256-CBC, PKCS#7 padding**, under the share key, with a **fresh random 16-byte IV
written in front of the ciphertext** (Java ``AESEncrypt.encrypt``). CBC has no integrity: the server
that relays the ciphertext could alter it undetected by the cipher; what decryption cannot catch, the
reconstruction does (a rebuilt ``s_sk`` must match its ``s_pk``; extra shares must agree). It is kept for
the original's devices.
"""

from __future__ import annotations

import secrets

from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from flcluster.errors import CipherInputError
from flcluster.secure.shamir import PRIME_SIZE, Share, from_share_bytes, to_share_bytes

__all__ = [
    "IV_SIZE",
    "KEY_SIZE",
    "PBKDF2_ITERATIONS",
    "SALT_SIZE",
    "SEED_SIZE",
    "agree",
    "check_size",
    "decrypt_shares",
    "encrypt_shares",
    "generate_private_key",
    "public_key",
]

KEY_SIZE = 32
"""Bytes of an X25519 key (private or public) and of a derived AES-256 key."""

IV_SIZE = 16
"""Bytes of an AES IV (``ind_iv``, ``pw_iv``, the CBC IV): the original's ``I_VEC_LEN``."""

SALT_SIZE = 32
"""Bytes of ``pw_salt``: the original's ``SALT_SIZE``."""

SEED_SIZE = 32
"""Bytes of the individual-mask seed ``b_u`` (an AES-256 key): the original's ``SEED_SIZE``."""

PBKDF2_ITERATIONS = 10_000
"""PBKDF2 iterations of the key agreement, as the original's ``PBKDF2_ITERATIONS`` / ``ITERATION``."""

_INDEX_MAX_BYTES = 4  # an index is a positive int32


def check_size(value: bytes, size: int, what: str) -> bytes:
    """Refuse a key, IV or salt of the wrong size.

    Args:
        value: The bytes.
        size: The size they must have.
        what: Their name, for the message.

    Returns:
        ``value``.

    Raises:
        CipherInputError: ``value`` is not ``size`` bytes.
    """
    if len(value) != size:
        raise CipherInputError(f"{what} must be {size} bytes, got {len(value)!r}")
    return value


def generate_private_key() -> bytes:
    """A new X25519 private key, as its 32 raw bytes."""
    return X25519PrivateKey.generate().private_bytes_raw()


def public_key(private_key: bytes) -> bytes:
    """The X25519 public key (32 raw bytes) of a private key (32 raw bytes).

    Raises:
        CipherInputError: ``private_key`` is not 32 bytes.
    """
    check_size(private_key, KEY_SIZE, "an X25519 private key")
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


def agree(private_key: bytes, peer_public_key: bytes, salt: bytes) -> bytes:
    """The 32-byte key two clients share: PBKDF2-HMAC-SHA256 (10 000 iterations) over X25519's secret.

    Args:
        private_key: This side's X25519 private key (32 bytes).
        peer_public_key: The peer's X25519 public key (32 bytes).
        salt: ``b""`` for the share key, the smaller fl_id's ``pw_salt`` for the pairwise mask key.

    Returns:
        The derived key (32 bytes), an AES-256 key.

    Raises:
        CipherInputError: A key of the wrong size, or a peer key X25519 refuses (a small-order point).
    """
    check_size(private_key, KEY_SIZE, "an X25519 private key")
    check_size(peer_public_key, KEY_SIZE, "an X25519 public key")
    try:
        shared = X25519PrivateKey.from_private_bytes(private_key).exchange(
            X25519PublicKey.from_public_bytes(peer_public_key)
        )
    except ValueError as error:
        raise CipherInputError(
            f"the X25519 public key {peer_public_key.hex()!r} gives no shared secret ({error})"
        ) from None
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, iterations=PBKDF2_ITERATIONS)
    return kdf.derive(shared)


# ------------------------------------------------------------------------------------ share encryption


def encrypt_shares(key: bytes, s_share: Share, b_share: Share, *, iv: bytes | None = None) -> bytes:
    """Pack one peer's two shares as the original does and encrypt them (AES-256-CBC, random IV in front).

    Args:
        key: The share key agreed with the peer (32 bytes).
        s_share: The peer's share of this client's ``s`` private key.
        b_share: The peer's share of this client's seed ``b_u``.
        iv: The CBC IV; None (always, outside tests) for a fresh random one.

    Returns:
        ``iv ‖ ciphertext``.
    """
    s_value, b_value = to_share_bytes(s_share.value), to_share_bytes(b_share.value)
    s_index, b_index = to_share_bytes(s_share.index), to_share_bytes(b_share.index)
    header = bytes((len(s_value), len(b_value), len(s_index), len(b_index)))
    plain = header + s_index + b_index + s_value + b_value
    padder = padding.PKCS7(algorithms.AES.block_size).padder()
    padded = padder.update(plain) + padder.finalize()
    iv = secrets.token_bytes(IV_SIZE) if iv is None else check_size(iv, IV_SIZE, "a CBC IV")
    encryptor = Cipher(algorithms.AES(check_size(key, KEY_SIZE, "a share key")), modes.CBC(iv)).encryptor()
    return iv + encryptor.update(padded) + encryptor.finalize()


def decrypt_shares(key: bytes, blob: bytes) -> tuple[Share, Share]:
    """Decrypt and unpack the two shares a peer sent (the inverse of :func:`encrypt_shares`).

    Args:
        key: The share key agreed with the sender (32 bytes).
        blob: ``iv ‖ ciphertext`` as relayed by the server.

    Returns:
        ``(s_share, b_share)``.

    Raises:
        CipherInputError: The blob is not a whole number of AES blocks after the IV, the padding is
            wrong (a wrong key or an altered ciphertext), or the plaintext does not have the layout.
    """
    block = algorithms.AES.block_size // 8
    if len(blob) < IV_SIZE + block or (len(blob) - IV_SIZE) % block:
        raise CipherInputError(
            f"an encrypted share must be a {IV_SIZE}-byte IV and whole {block}-byte blocks, "
            f"got {len(blob)!r} bytes"
        )
    decryptor = Cipher(
        algorithms.AES(check_size(key, KEY_SIZE, "a share key")), modes.CBC(blob[:IV_SIZE])
    ).decryptor()
    padded = decryptor.update(blob[IV_SIZE:]) + decryptor.finalize()
    unpadder = padding.PKCS7(algorithms.AES.block_size).unpadder()
    try:
        plain = unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise CipherInputError(
            "an encrypted share does not decrypt: bad padding (wrong key or altered)"
        ) from None
    return _unpack(plain)


def _unpack(plain: bytes) -> tuple[Share, Share]:
    if len(plain) < 4:
        raise CipherInputError(f"a decrypted share is {len(plain)!r} bytes, shorter than its 4-byte header")
    s_len, b_len, si_len, bi_len = plain[:4]
    if s_len > PRIME_SIZE or b_len > PRIME_SIZE:
        raise CipherInputError(
            f"a decrypted share declares values of {s_len!r} and {b_len!r} bytes, "
            f"at most {PRIME_SIZE} allowed"
        )
    if not (1 <= si_len <= _INDEX_MAX_BYTES and 1 <= bi_len <= _INDEX_MAX_BYTES):
        raise CipherInputError(
            f"a decrypted share declares indices of {si_len!r} and {bi_len!r} bytes, "
            f"1…{_INDEX_MAX_BYTES} allowed"
        )
    if len(plain) != 4 + si_len + bi_len + s_len + b_len:
        raise CipherInputError(
            f"a decrypted share is {len(plain)!r} bytes, "
            f"its header declares {4 + si_len + bi_len + s_len + b_len}"
        )
    at = 4
    s_index = int.from_bytes(plain[at : at + si_len], "big")
    at += si_len
    b_index = int.from_bytes(plain[at : at + bi_len], "big")
    at += bi_len
    s_value = from_share_bytes(plain[at : at + s_len])
    at += s_len
    b_value = from_share_bytes(plain[at : at + b_len])
    if s_index < 1 or b_index < 1 or s_index >= 2**31 or b_index >= 2**31:
        raise CipherInputError(
            f"decrypted share indices must be in [1, 2**31), got {s_index!r} and {b_index!r}"
        )
    return Share(s_index, s_value), Share(b_index, b_value)
