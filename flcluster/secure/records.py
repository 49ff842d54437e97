"""The records of secure aggregation: keys, secrets and shares (spec/secure-aggregation.md, "Primitives").

Theory of operation
-------------------
Small frozen attrs records, one per thing that travels or is kept:

- :class:`ClientSecrets`, what a client keeps to itself for one iteration;
- :class:`PublicKeys`, what it publishes at exchangeKeys (``RequestExchangeKeys``) and what peers get
  back at getKeys (``ClientPublicKeys``, which carries no ``ind_iv``: peers see ``b""`` there);
- :class:`ClientShare`, the wire's ``ClientShare{fl_id, share, index}``, used both for the encrypted
  shares (shareSecrets, getSecrets) and for the opened ones a client reveals (reconstructSecrets);
- :class:`OpenedShare`, a peer's two shares after decryption.

Sizes are checked when a record is built, so a malformed key from a device is refused with
:class:`~flcluster.errors.CipherInputError` where it enters.
"""

from __future__ import annotations

from typing import Any

import attrs

from flcluster.errors import CipherInputError
from flcluster.secure.keys import IV_SIZE, KEY_SIZE, SALT_SIZE, SEED_SIZE
from flcluster.secure.shamir import Share

__all__ = ["ClientSecrets", "ClientShare", "OpenedShare", "PublicKeys"]


def _sized(size: int, *, empty_ok: bool = False) -> Any:
    def check(instance: object, attribute: attrs.Attribute[bytes], value: bytes) -> None:
        if not isinstance(value, bytes):
            raise CipherInputError(f"{attribute.name} must be bytes, got {type(value).__name__}")
        if len(value) != size and not (empty_ok and not value):
            allowed = f"{size} (or 0)" if empty_ok else f"{size}"
            raise CipherInputError(f"{attribute.name} must be {allowed} bytes, got {len(value)!r}")

    return check


def _fl_id(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise CipherInputError(f"{attribute.name} must be a non-empty string, got {value!r}")


@attrs.frozen
class PublicKeys:
    """One client's published keys and IVs for one iteration.

    Attributes:
        fl_id: The client.
        c_pk: X25519 public key for share encryption (32 bytes).
        s_pk: X25519 public key for the pairwise masks (32 bytes).
        ind_iv: IV of the individual mask (16 bytes); ``b""`` where it is not known (the peers' view).
        pw_iv: IV of the pairwise masks this client is the smaller fl_id of (16 bytes).
        pw_salt: PBKDF2 salt of those pairwise keys (32 bytes).
    """

    fl_id: str = attrs.field(validator=_fl_id)
    c_pk: bytes = attrs.field(validator=_sized(KEY_SIZE))
    s_pk: bytes = attrs.field(validator=_sized(KEY_SIZE))
    ind_iv: bytes = attrs.field(validator=_sized(IV_SIZE, empty_ok=True))
    pw_iv: bytes = attrs.field(validator=_sized(IV_SIZE))
    pw_salt: bytes = attrs.field(validator=_sized(SALT_SIZE))


@attrs.frozen
class ClientSecrets:
    """What one client keeps to itself for one iteration (never sent; ``repr`` hides the secrets).

    Attributes:
        c_sk: X25519 private key for share encryption.
        s_sk: X25519 private key for the pairwise masks (shared with Shamir).
        b_u: Seed of the individual mask (shared with Shamir).
        ind_iv: IV of the individual mask (published at exchangeKeys, kept by the server).
        pw_iv: IV of the pairwise masks (published).
        pw_salt: Salt of the pairwise keys (published).
    """

    c_sk: bytes = attrs.field(repr=False, validator=_sized(KEY_SIZE))
    s_sk: bytes = attrs.field(repr=False, validator=_sized(KEY_SIZE))
    b_u: bytes = attrs.field(repr=False, validator=_sized(SEED_SIZE))
    ind_iv: bytes = attrs.field(validator=_sized(IV_SIZE))
    pw_iv: bytes = attrs.field(validator=_sized(IV_SIZE))
    pw_salt: bytes = attrs.field(validator=_sized(SALT_SIZE))


@attrs.frozen
class ClientShare:
    """The wire's ``ClientShare{fl_id, share, index}``.

    Attributes:
        fl_id: In shareSecrets the peer it is for; in getSecrets the peer it is from; in
            reconstructSecrets the peer whose secret it is a share of.
        share: The encrypted blob (``index`` 0), or an opened share's minimal big-endian value.
        index: 0 for an encrypted blob (the index travels inside it); the Shamir index otherwise.
    """

    fl_id: str
    share: bytes
    index: int = 0


@attrs.frozen
class OpenedShare:
    """One peer's two shares, decrypted: what a client holds of that peer's secrets.

    Attributes:
        fl_id: The peer whose secrets these are shares of.
        s_share: The share of the peer's ``s`` private key.
        b_share: The share of the peer's seed ``b_u``.
    """

    fl_id: str
    s_share: Share = attrs.field(repr=False)
    b_share: Share = attrs.field(repr=False)
