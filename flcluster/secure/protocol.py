"""The functions the device SDK and the Servers call for PW_ENCRYPT (spec/secure-aggregation.md).

Theory of operation
-------------------
Pure functions over the records of :mod:`flcluster.secure.records`; no IO, no clock. The client side, in
the order of the device's rounds (ref §3.5):

1. :func:`new_client_secrets` at exchangeKeys, and :func:`public_keys` for the request;
2. :func:`encrypt_shares` at shareSecrets, over the getKeys list ``U1``: one encrypted
   ``ClientShare`` per peer, holding that peer's Shamir shares of ``s_sk`` and ``b_u``;
3. :func:`open_shares` on the getSecrets answer (the shares from ``U2``, the clients that shared);
4. :func:`mask_update` at updateModel, with the keys of ``U2``;
5. :func:`reconstruction_shares` at reconstructSecrets, given ``U3`` from getClientList.

The Server side:

- :func:`check_reconstruction_shares` when a reconstructSecrets request arrives (refuse bad input there,
  changing nothing);
- :func:`unmask_noise` once ``t + 1`` clients have sent theirs: the vector ``Z`` such that
  ``Σ_{u∈U3} masked_u + Z = Σ_{u∈U3} data_size_u · x_u`` up to the rounding bounded in "Error bound"
  (:mod:`flcluster.secure.bound`).

**What the rounds must guarantee** (spec/secure-aggregation.md, "Masks"): ``U1`` is fixed before any
getKeys answer, ``U2`` (the shareSecrets senders) before any getSecrets answer, every member of ``U2``
sent a share to every other member of ``U1``, ``U3 ⊆ U2`` are the clients whose masked update was
accepted. Then every ``u ∈ U3`` masked with exactly ``U2 \\ {u}`` and ``Z`` removes exactly those masks.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from flcluster.errors import CipherInputError, UnmaskError
from flcluster.secure import keys, masks, shamir
from flcluster.secure.records import ClientSecrets, ClientShare, OpenedShare, PublicKeys

__all__ = [
    "ClientSecrets",
    "ClientShare",
    "OpenedShare",
    "PublicKeys",
    "check_reconstruction_shares",
    "encrypt_shares",
    "mask_update",
    "new_client_secrets",
    "open_shares",
    "public_keys",
    "reconstruction_shares",
    "unmask_noise",
]


# ------------------------------------------------------------------------------------------ client


def new_client_secrets() -> ClientSecrets:
    """Fresh secrets for one iteration: two X25519 private keys, the seed ``b_u``, two IVs and a salt."""
    return ClientSecrets(
        c_sk=keys.generate_private_key(),
        s_sk=keys.generate_private_key(),
        b_u=secrets.token_bytes(keys.SEED_SIZE),
        ind_iv=secrets.token_bytes(keys.IV_SIZE),
        pw_iv=secrets.token_bytes(keys.IV_SIZE),
        pw_salt=secrets.token_bytes(keys.SALT_SIZE),
    )


def public_keys(me: ClientSecrets, my_fl_id: str) -> PublicKeys:
    """What the client publishes at exchangeKeys (``RequestExchangeKeys``'s key fields)."""
    return PublicKeys(
        fl_id=my_fl_id,
        c_pk=keys.public_key(me.c_sk),
        s_pk=keys.public_key(me.s_sk),
        ind_iv=me.ind_iv,
        pw_iv=me.pw_iv,
        pw_salt=me.pw_salt,
    )


def encrypt_shares(
    me: ClientSecrets, my_fl_id: str, peers: Mapping[str, PublicKeys], t: int, prime: int
) -> dict[str, ClientShare]:
    """Split ``s_sk`` and ``b_u`` and encrypt each peer's two shares for it (shareSecrets).

    Peers get Shamir indices ``1 … n`` in the order of ``peers`` (the getKeys list), skipping this
    client, as the original's ``genSecretShares``.

    Args:
        me: This client's secrets.
        my_fl_id: This client's fl_id (an entry for it in ``peers`` is skipped).
        peers: ``U1``'s public keys, by fl_id, in the order the server listed them.
        t: The threshold (``PWParams.t``): ``t`` shares rebuild a secret; ``1 ≤ t ≤ n``.
        prime: The field prime (``PWParams.prime``, checked with :func:`shamir.check_prime`).

    Returns:
        By peer fl_id, ``ClientShare(fl_id=peer, share=iv ‖ ciphertext, index=0)``.

    Raises:
        CipherInputError: Fewer than ``t`` peers, a key map entry under another fl_id, or a peer
            ``c_pk`` that gives no shared secret.
    """
    others = [(fl_id, pk) for fl_id, pk in peers.items() if fl_id != my_fl_id]
    for fl_id, pk in others:
        if pk.fl_id != fl_id:
            raise CipherInputError(f"the keys listed under fl_id {fl_id!r} are those of {pk.fl_id!r}")
    if not 1 <= t <= len(others):
        raise CipherInputError(
            f"threshold t={t!r} needs 1 <= t <= the number of peers, and there are {len(others)!r} peers"
        )
    s_shares = shamir.split(me.s_sk, t, len(others), prime)
    b_shares = shamir.split(me.b_u, t, len(others), prime)
    out: dict[str, ClientShare] = {}
    for (fl_id, pk), s_share, b_share in zip(others, s_shares, b_shares, strict=True):
        key = keys.agree(me.c_sk, pk.c_pk, b"")
        out[fl_id] = ClientShare(fl_id=fl_id, share=keys.encrypt_shares(key, s_share, b_share))
    return out


def open_shares(
    me: ClientSecrets,
    my_fl_id: str,
    received: Mapping[str, ClientShare],
    peers: Mapping[str, PublicKeys],
) -> dict[str, OpenedShare]:
    """Decrypt the shares the getSecrets answer relayed.

    Args:
        me: This client's secrets.
        my_fl_id: This client's fl_id.
        received: By sender fl_id, the relayed ``ClientShare`` (its ``fl_id`` is the sender).
        peers: ``U1``'s public keys (for each sender's ``c_pk``).

    Returns:
        By sender fl_id, its two shares for this client.

    Raises:
        CipherInputError: A sender not in ``peers``, this client itself, an entry whose ``fl_id`` is not
            its key, or a blob that does not decrypt and parse.
    """
    out: dict[str, OpenedShare] = {}
    for sender, share in received.items():
        if share.fl_id != sender:
            raise CipherInputError(f"the share listed under {sender!r} says it is from {share.fl_id!r}")
        if sender == my_fl_id:
            raise CipherInputError(f"a share from this client itself ({sender!r}) was relayed back")
        if sender not in peers:
            raise CipherInputError(f"a share from {sender!r}, which is not in the getKeys list")
        key = keys.agree(me.c_sk, peers[sender].c_pk, b"")
        s_share, b_share = keys.decrypt_shares(key, share.share)
        out[sender] = OpenedShare(fl_id=sender, s_share=s_share, b_share=b_share)
    return out


def mask_update(
    flat_update: npt.ArrayLike,
    me: ClientSecrets,
    my_fl_id: str,
    peers_u2: Mapping[str, PublicKeys],
    *,
    individual: bool = True,
) -> npt.NDArray[np.float32]:
    """Mask a flat update (already multiplied by the data size) for updateModel.

    Args:
        flat_update: The update ``data_size · x``, one flat float vector (all tensors, spec order).
        me: This client's secrets.
        my_fl_id: This client's fl_id.
        peers_u2: The public keys of the clients whose shares getSecrets returned (``U2``); for
            STABLE_PW_ENCRYPT, of every client from getKeys.
        individual: Add the individual mask ``PRG(b_u)`` (PW_ENCRYPT); False for STABLE_PW_ENCRYPT.

    Returns:
        ``fl32(update + Σ masks)``, float32, same length; the masks are summed in float64.
    """
    update = np.asarray(flat_update)
    if update.ndim != 1:
        raise ValueError(f"mask_update takes a flat vector, got shape {update.shape!r}")
    mine = public_keys(me, my_fl_id)
    mask = masks.total_mask(me.s_sk, me.b_u if individual else None, mine, peers_u2.values(), update.size)
    mask += update.astype(np.float64)
    return mask.astype(np.float32)


def reconstruction_shares(
    opened: Mapping[str, OpenedShare], u3: Collection[str], *, t: int
) -> list[ClientShare]:
    """The shares to reveal at reconstructSecrets: ``b``-shares of ``U3``, ``s``-shares of the dropped.

    Never both of one peer. A client refuses a client list shorter than ``t + 1``: an honest server never
    sends one (getClientList waits for ``max(⌈u·r⌉, t + 1)`` clients) and a short list would hand
    the ``s``-shares of clients that did upload to a lying server.

    Args:
        opened: The shares this client holds, by owner (from :func:`open_shares`).
        u3: The getClientList answer.
        t: The threshold.

    Returns:
        One ``ClientShare(fl_id=owner, share, index)`` per owner, in the order of ``opened``.

    Raises:
        CipherInputError: ``u3`` has fewer than ``t + 1`` clients.
    """
    members = set(u3)
    if len(members) < t + 1:
        raise CipherInputError(
            f"the client list has {len(members)!r} clients; with threshold t={t!r} "
            f"it must have at least {t + 1}"
        )
    out: list[ClientShare] = []
    for owner, held in opened.items():
        share = held.b_share if owner in members else held.s_share
        out.append(ClientShare(fl_id=owner, share=shamir.to_share_bytes(share.value), index=share.index))
    return out


# ------------------------------------------------------------------------------------------ server


def check_reconstruction_shares(
    sender: str, shares: Sequence[ClientShare], u2: Collection[str], prime: int
) -> None:
    """Refuse a malformed reconstructSecrets request before anything is stored.

    Args:
        sender: The requesting fl_id.
        shares: Its ``reconstruct_secret_shares``.
        u2: The clients that shared secrets.
        prime: The field prime.

    Raises:
        CipherInputError: A share of an fl_id outside ``U2`` or of the sender itself, two shares of one
            fl_id, an index outside ``[1, 2**31)``, or a value that is not below the prime.
    """
    members = set(u2)
    seen: set[str] = set()
    for share in shares:
        if share.fl_id == sender:
            raise CipherInputError(f"{sender!r} sent a share of its own secret")
        if share.fl_id not in members:
            raise CipherInputError(f"{sender!r} sent a share of {share.fl_id!r}, which did not share secrets")
        if share.fl_id in seen:
            raise CipherInputError(f"{sender!r} sent two shares of {share.fl_id!r}")
        seen.add(share.fl_id)
        if not 1 <= share.index < 2**31:
            raise CipherInputError(f"{sender!r} sent a share index {share.index!r}, outside [1, 2**31)")
        if shamir.from_share_bytes(share.share) >= prime:
            raise CipherInputError(f"{sender!r} sent a share of {share.fl_id!r} that is not below the prime")


def unmask_noise(
    submitted: Mapping[str, Sequence[ClientShare]],
    keys_u1: Mapping[str, PublicKeys],
    u2: Collection[str],
    u3: Collection[str],
    t: int,
    prime: int,
    length: int,
) -> npt.NDArray[np.float64]:
    """The noise ``Z`` to add to the sum of ``U3``'s masked updates: ``-PRG(b_u)`` and the dropped masks.

    ``Z = -Σ_{u∈U3} PRG(b_u, ind_iv_u) + Σ_{v∈U2\\U3} Σ_{w∈U3} σ(v, w) · PRG(K_vw, pw_iv)``, with
    ``b_u`` and ``s_sk_v`` rebuilt from the shares. Pairs of two dropped clients are left out: their
    masks are in no upload (the original adds both halves, which cancel). Summed in float64, owners
    and peers in sorted order, so every Server gets the same bits.

    Args:
        submitted: By sender (each in ``U3``), its reconstructSecrets shares.
        keys_u1: Every client's keys as it sent them at exchangeKeys (with ``ind_iv``).
        u2: The clients that shared secrets.
        u3: The clients whose masked update was accepted (``U3 ⊆ U2``).
        t: The threshold.
        prime: The field prime.
        length: The vector length.

    Returns:
        ``Z``, float64, ``length`` values.

    Raises:
        UnmaskError: The sets do not nest, a sender outside ``U3``, a malformed share, a client with
            fewer than ``t`` shares, shares that disagree, or a rebuilt ``s_sk`` that does not match the
            client's ``s_pk``.
    """
    members2, members3 = set(u2), set(u3)
    if not members3 <= members2 <= set(keys_u1):
        raise UnmaskError("unmasking needs U3 ⊆ U2 ⊆ the clients with keys; the sets given do not nest")
    points: dict[str, list[shamir.Share]] = {fl_id: [] for fl_id in members2}
    for sender, shares in submitted.items():
        if sender not in members3:
            raise UnmaskError(f"reconstruction shares from {sender!r}, which is not in U3")
        try:
            check_reconstruction_shares(sender, shares, members2, prime)
        except CipherInputError as error:
            raise UnmaskError(f"unmasking refused: {error}") from error
        for share in shares:
            points[share.fl_id].append(shamir.Share(share.index, shamir.from_share_bytes(share.share)))
    noise = np.zeros(length, dtype=np.float64)
    survivors = sorted(members3)
    for owner in sorted(members2):
        pk = keys_u1[owner]
        if owner in members3:
            b_u = _rebuild(points[owner], t, prime, keys.SEED_SIZE, f"b_u of {owner!r}")
            if not pk.ind_iv:
                raise UnmaskError(f"no ind_iv is known for {owner!r}")
            noise -= masks.individual_mask(b_u, pk.ind_iv, length)
        else:
            s_sk = _rebuild(points[owner], t, prime, keys.KEY_SIZE, f"s_sk of {owner!r}")
            if keys.public_key(s_sk) != pk.s_pk:
                raise UnmaskError(
                    f"the s_sk rebuilt for {owner!r} does not match its s_pk: the shares are wrong"
                )
            for peer in survivors:
                noise += masks.pairwise_mask(s_sk, pk, keys_u1[peer], length)
    return noise


def _rebuild(points: list[shamir.Share], t: int, prime: int, size: int, what: str) -> bytes:
    try:
        return shamir.combine(points, t, prime, size)
    except (CipherInputError, UnmaskError) as error:
        raise UnmaskError(f"cannot rebuild {what}: {error}") from error
