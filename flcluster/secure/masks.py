"""The individual and pairwise masks, as the original builds them (spec/secure-aggregation.md, "Masks").

Theory of operation
-------------------
For client ``u`` with peers ``v`` (the clients whose shares it got at getSecrets) and a vector of length
``L``::

    individual:  PRG(b_u, ind_iv_u, L)
    pairwise:    σ(u, v) · PRG(K_uv, pw_iv_w, L)        w = min(u, v), σ(u, v) = +1 if u > v else -1
                 K_uv = PBKDF2(X25519(s_sk_u, s_pk_v), pw_salt_w)        (flcluster.secure.keys.agree)

fl_ids are compared as Python strings (code points; the same as the C++ server's byte order on UTF-8,
and as Java's ``compareTo`` for every fl_id without characters beyond U+FFFF). ``K_uv = K_vu`` and
``σ(u, v) = -σ(v, u)``, so the pairwise masks of a pair cancel in a sum that has both.

:func:`total_mask` adds a client's masks in **float64**, in the given order, and is rounded to float32
only once, when the masked update is formed (the original's devices add them in float32; the bound in
"Error bound" covers both).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from flcluster.secure.keys import agree
from flcluster.secure.prg import prg
from flcluster.secure.records import PublicKeys

__all__ = ["individual_mask", "pair_iv_salt", "pairwise_mask", "pairwise_sign", "total_mask"]


def pairwise_sign(fl_id: str, peer_fl_id: str) -> int:
    """The sign of ``fl_id``'s mask with ``peer_fl_id``: +1 if ``fl_id > peer_fl_id``, else -1."""
    return 1 if fl_id > peer_fl_id else -1


def pair_iv_salt(mine: PublicKeys, peer: PublicKeys) -> tuple[bytes, bytes]:
    """The pair's PRG IV and PBKDF2 salt: those of the lexicographically smaller fl_id.

    Returns:
        ``(pw_iv, pw_salt)``.
    """
    smaller = peer if peer.fl_id < mine.fl_id else mine
    return smaller.pw_iv, smaller.pw_salt


def individual_mask(b_u: bytes, ind_iv: bytes, length: int) -> npt.NDArray[np.float32]:
    """``PRG(b_u, ind_iv, length)``: the individual mask (float32)."""
    return prg(b_u, ind_iv, length)


def pairwise_mask(s_sk: bytes, mine: PublicKeys, peer: PublicKeys, length: int) -> npt.NDArray[np.float32]:
    """``mine``'s signed pairwise mask with ``peer`` (float32, the sign applied).

    Args:
        s_sk: ``mine``'s ``s`` private key (its own, or rebuilt from shares by a server).
        mine: The published keys of the client whose mask this is.
        peer: The peer's published keys (``s_pk``, ``pw_iv``, ``pw_salt`` are used).
        length: The vector length.

    Returns:
        ``σ(mine, peer) · PRG(K, pw_iv, length)``.

    Raises:
        CipherInputError: ``peer.s_pk`` gives no shared secret.
        ValueError: ``mine`` and ``peer`` are the same fl_id (a caller's bug).
    """
    if mine.fl_id == peer.fl_id:
        raise ValueError(f"a client has no pairwise mask with itself ({mine.fl_id!r})")
    iv, salt = pair_iv_salt(mine, peer)
    noise = prg(agree(s_sk, peer.s_pk, salt), iv, length)
    if pairwise_sign(mine.fl_id, peer.fl_id) < 0:
        np.negative(noise, out=noise)
    return noise


def total_mask(
    s_sk: bytes,
    b_u: bytes | None,
    mine: PublicKeys,
    peers: Iterable[PublicKeys],
    length: int,
) -> npt.NDArray[np.float64]:
    """A client's whole mask: its pairwise masks with ``peers``, plus its individual mask if ``b_u`` is given.

    Args:
        s_sk: The client's ``s`` private key.
        b_u: Its individual-mask seed; None for STABLE_PW_ENCRYPT (pairwise masks only).
        mine: Its published keys (with ``ind_iv`` when ``b_u`` is given).
        peers: The peers' keys; an entry for ``mine.fl_id`` itself is skipped.
        length: The vector length.

    Returns:
        The sum, float64, accumulated in the order of ``peers`` and then the individual mask.
    """
    total = np.zeros(length, dtype=np.float64)
    for peer in peers:
        if peer.fl_id != mine.fl_id:
            total += pairwise_mask(s_sk, mine, peer, length)
    if b_u is not None:
        total += individual_mask(b_u, mine.ind_iv, length)
    return total
