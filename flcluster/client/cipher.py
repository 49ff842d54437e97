"""The device's side of the secure-aggregation rounds (spec/secure-aggregation.md §R1, §2).

Theory of operation
-------------------
With the FLPlan's ``encrypt_type`` PW_ENCRYPT or STABLE_PW_ENCRYPT, a :class:`~flcluster.client.device.Device`
keeps one :class:`CipherSession` per iteration attempt and goes through the rounds in the original's order
(reference §3.5): startFLJob, **exchangeKeys** (its fresh public keys and IVs), **getKeys** (polled until
U1 is frozen), **shareSecrets** (PW: a share of its ``s`` key and its seed for every other device of U1,
each encrypted for that device), **getSecrets** (PW: the shares the others sent it), local training, the
**masked updateModel**, then **getClientList** (PW: U3) and **reconstructSecrets** (PW: for each device it
holds shares of, the seed share if that device uploaded, else the key share), then getModel.

With an identity (``pki_verify``; spec/secure-aggregation.md §R8) the session also checks its peers: at
getKeys every other device's certificates and key signature (:func:`~flcluster.verify.lists.check_peer_keys`,
which gives their keys), and after getClientList it signs U3 (:meth:`CipherSession.sign_client_list`) and
checks the others' list signatures (:meth:`CipherSession.check_list_signatures`) before it reveals any
share. A failed check is a :class:`~flcluster.errors.CipherInputError`: the device stops the iteration.

The session is the bookkeeping between rounds; the cryptography is :mod:`flcluster.secure`'s
(:func:`~flcluster.secure.encrypt_shares`, :func:`~flcluster.secure.open_shares`,
:func:`~flcluster.secure.mask_update`, :func:`~flcluster.secure.reconstruction_shares`). The costly parts
(key agreements with PBKDF2 for every peer, the masks' PRG over the whole model) are blocking: the device
runs them in worker threads. The secrets never leave the session (``repr`` hides them).

The update is masked as one flat vector, every tensor in the order of the model startFLJob sent (the
Server's spec order), already multiplied by the data size; the masked vector is cut back into the same
tensors. An upload without every tensor cannot be masked (the Servers refuse it too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from flcluster.core.cipher import DeviceKeys, ListSignature, Share
from flcluster.errors import CipherInputError, VerificationFailed
from flcluster.secure import (
    ClientSecrets,
    ClientShare,
    OpenedShare,
    PublicKeys,
    check_prime,
    encrypt_shares,
    mask_update,
    new_client_secrets,
    open_shares,
    public_keys,
    reconstruction_shares,
)
from flcluster.verify.identity import DeviceIdentity
from flcluster.verify.lists import (
    check_list_signatures,
    check_peer_keys,
    client_list_digest,
    exchange_keys_signed_data,
)
from flcluster.verify.pki import PublicKey

__all__ = ["CIPHER_TYPES", "CipherSession"]

#: The encrypt types that run the cipher rounds.
CIPHER_TYPES = ("PW_ENCRYPT", "STABLE_PW_ENCRYPT")

FloatArray = npt.NDArray[np.float32]


class CipherSession:
    """One device's secrets and the lists it learnt, for one iteration attempt.

    Args:
        fl_id: The device.
        encrypt_type: PW_ENCRYPT or STABLE_PW_ENCRYPT (from the FLPlan).
        t: The Shamir threshold (``PWParams.t``).
        prime: The field prime (``PWParams.prime``, 33 bytes).
        identity: ``pki_verify``: the device's key and certificates; the keys are signed, the peers checked
            and the client list signed (spec/secure-aggregation.md §R8).
        iteration: The iteration (what the key signatures sign).

    Raises:
        CipherInputError: the prime is not a 264-bit prime (PW_ENCRYPT), or ``encrypt_type`` runs no
            cipher rounds.
    """

    def __init__(
        self,
        fl_id: str,
        encrypt_type: str,
        *,
        t: int,
        prime: bytes,
        identity: DeviceIdentity | None = None,
        iteration: int = 0,
    ) -> None:
        if encrypt_type not in CIPHER_TYPES:
            raise CipherInputError(f"encrypt_type {encrypt_type!r} runs no cipher rounds")
        self.fl_id = fl_id
        self.pw = encrypt_type == "PW_ENCRYPT"
        self.t = t
        self._prime = check_prime(prime) if self.pw else 0
        self._secrets: ClientSecrets = new_client_secrets()
        self._u1: dict[str, PublicKeys] = {}
        self._opened: dict[str, OpenedShare] = {}
        self._identity = identity
        self.iteration = iteration
        self._peer_keys: dict[str, PublicKey] = {}
        self._clients: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"CipherSession(fl_id={self.fl_id!r}, pw={self.pw!r}, peers={len(self._u1)})"

    # ------------------------------------------------------------------------------------ rounds

    def keys(self) -> DeviceKeys:
        """What exchangeKeys sends: the public keys, IVs and salt of this attempt."""
        k = public_keys(self._secrets, self.fl_id)
        return DeviceKeys(k.fl_id, k.c_pk, k.s_pk, k.ind_iv, k.pw_iv, k.pw_salt)

    @property
    def signs(self) -> bool:
        """The session has an identity: it signs its keys and client list and checks its peers' (§R8)."""
        return self._identity is not None

    def key_signature(self, keys: DeviceKeys, timestamp: str) -> tuple[bytes, tuple[str, ...]]:
        """With an identity: exchangeKeys' signature over ``c_pk ‖ s_pk ‖ timestamp ‖ iteration`` and its
        ``[key_attestation, equip_cert]`` (spec §R8.1); without, nothing."""
        if self._identity is None:
            return b"", ()
        signed = exchange_keys_signed_data(keys.c_pk, keys.s_pk, timestamp, self.iteration)
        identity = self._identity
        return identity.sign(signed), (identity.key_attestation, identity.equip_cert)

    def take_keys(self, keys: Sequence[DeviceKeys]) -> None:
        """Keep U1 from the getKeys answer (in the order the Server listed it: the Shamir indices follow it).

        With an identity, every other device's certificates and key signature are checked first (§R8.1).

        Raises:
            CipherInputError: this device is not in the list, a key has the wrong size, or (identity) a
                peer's keys do not check.
        """
        if self.fl_id not in {k.fl_id for k in keys}:
            raise CipherInputError(f"the getKeys list does not hold this device ({self.fl_id!r})")
        if self._identity is not None:
            try:
                self._peer_keys = check_peer_keys(keys, self.fl_id, self.iteration)
            except VerificationFailed as exc:
                raise CipherInputError(f"getKeys: {exc.reason}") from None
        # STABLE_PW devices may send no c_pk (it encrypts no shares); it is never used then.
        self._u1 = {
            k.fl_id: PublicKeys(k.fl_id, k.c_pk or bytes(32), k.s_pk, b"", k.pw_iv, k.pw_salt) for k in keys
        }

    def shares(self) -> list[Share]:
        """PW: the shareSecrets shares, one encrypted share for every other device of U1 (blocking).

        Raises:
            CipherInputError: fewer peers than ``t``, or a peer's key gives no shared secret.
        """
        out = encrypt_shares(self._secrets, self.fl_id, self._u1, self.t, self._prime)
        return [Share(peer, s.share, s.index) for peer, s in out.items()]

    def take_secrets(self, shares: Sequence[Share]) -> None:
        """PW: open the shares the getSecrets answer relayed (``Share.fl_id``: the sender; blocking).

        Raises:
            CipherInputError: a share from a device outside U1, from this device, or one that does not
                decrypt.
        """
        received = {s.fl_id: ClientShare(s.fl_id, s.share, s.index) for s in shares}
        if len(received) != len(shares):
            raise CipherInputError("the getSecrets answer holds two shares from one device")
        self._opened = open_shares(self._secrets, self.fl_id, received, self._u1)

    def mask(self, order: Sequence[str], upload: Mapping[str, npt.ArrayLike]) -> dict[str, FloatArray]:
        """The masked upload: every tensor of ``order``, masked as one vector (blocking).

        PW masks with the devices that shared secrets with this one (the senders of its getSecrets
        answer) and adds its individual mask; STABLE_PW masks with every other device of U1 and adds none.

        Raises:
            CipherInputError: ``upload`` lacks a tensor of ``order`` or holds one that is not in it.
        """
        missing = [n for n in order if n not in upload]
        if missing or len(upload) != len(order):
            raise CipherInputError(
                f"a masked upload must carry every tensor of the model; missing {missing[:3]!r}, "
                f"{len(upload)} given for {len(order)}"
            )
        arrays = [np.asarray(upload[n], dtype=np.float32) for n in order]
        flat = np.concatenate([a.reshape(-1) for a in arrays])
        peers = (
            {f: self._u1[f] for f in self._opened}
            if self.pw
            else {f: k for f, k in self._u1.items() if f != self.fl_id}
        )
        masked = mask_update(flat, self._secrets, self.fl_id, peers, individual=self.pw)
        out: dict[str, FloatArray] = {}
        at = 0
        for name, a in zip(order, arrays, strict=True):
            out[name] = masked[at : at + a.size].reshape(a.shape)
            at += a.size
        return out

    def sign_client_list(self, clients: Sequence[str]) -> bytes:
        """PW with an identity: the list signature of U3 as getClientList answered it (spec §R8.2); kept for
        :meth:`check_list_signatures`.

        Raises:
            CipherInputError: the session has no identity.
        """
        if self._identity is None:
            raise CipherInputError("only a device with an identity (pki_verify) signs its client list")
        self._clients = tuple(clients)
        return self._identity.sign(client_list_digest(self._clients))

    def check_list_signatures(self, signatures: Sequence[ListSignature]) -> None:
        """PW with an identity: the getListSign answer's signatures, before reconstructSecrets (spec §R8.4).

        Raises:
            CipherInputError: a signer outside U3 or twice, a signature that does not verify over this
                device's U3, or fewer than ``t + 1`` signers.
        """
        try:
            check_list_signatures(signatures, self._clients, self._peer_keys, own_fl_id=self.fl_id, t=self.t)
        except VerificationFailed as exc:
            raise CipherInputError(f"getListSign: {exc.reason}") from None

    def reconstruction(self, clients: Sequence[str]) -> list[Share]:
        """PW: the reconstructSecrets shares for U3 (getClientList's answer).

        Raises:
            CipherInputError: U3 has fewer than ``t + 1`` devices (an honest Server never sends that).
        """
        out = reconstruction_shares(self._opened, clients, t=self.t)
        return [Share(s.fl_id, s.share, s.index) for s in out]
