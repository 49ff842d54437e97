"""Secure aggregation's cryptographic core: PW_ENCRYPT's pairwise masking (spec/secure-aggregation.md).

Theory of operation
-------------------
The construction of Bonawitz et al. (2017) as MindSpore Federated runs it, so that the original's
devices could take part: X25519 key pairs ``c`` and ``s`` per client and iteration, PBKDF2-HMAC-SHA256
pairwise keys, Shamir sharing of ``s_sk`` and of the individual seed ``b_u`` over a 264-bit prime,
AES-CBC-encrypted shares relayed by the server, and AES-CTR masks read as float32 in ``[-1, 1]``.

Pure Python over ``cryptography`` and numpy; no IO, no clock, no trio. The modules, bottom up:

- :mod:`~flcluster.secure.shamir`: the prime field, Shamir split and combine, the prime;
- :mod:`~flcluster.secure.keys`: X25519, the key derivation, the encryption of a peer's shares;
- :mod:`~flcluster.secure.prg`: the masks' PRG, bit-exact with the original;
- :mod:`~flcluster.secure.records`: the frozen records that travel and are kept;
- :mod:`~flcluster.secure.masks`: individual and pairwise masks with the original's sign and IV rule;
- :mod:`~flcluster.secure.protocol`: what a device and a Server call, round by round;
- :mod:`~flcluster.secure.bound`: how far the unmasked sum can be from the exact one.
"""

from flcluster.secure.protocol import (
    ClientSecrets,
    ClientShare,
    OpenedShare,
    PublicKeys,
    check_reconstruction_shares,
    encrypt_shares,
    mask_update,
    new_client_secrets,
    open_shares,
    public_keys,
    reconstruction_shares,
    unmask_noise,
)
from flcluster.secure.shamir import check_prime, generate_prime

__all__ = [
    "ClientSecrets",
    "ClientShare",
    "OpenedShare",
    "PublicKeys",
    "check_prime",
    "check_reconstruction_shares",
    "encrypt_shares",
    "generate_prime",
    "mask_update",
    "new_client_secrets",
    "open_shares",
    "public_keys",
    "reconstruction_shares",
    "unmask_noise",
]
