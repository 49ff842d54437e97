"""The list signatures of PW_ENCRYPT under ``pki_verify``: what is signed, and the checks on both sides
(spec/secure-aggregation.md §R8).

Theory of operation
-------------------
Without them a lying Server could tell devices different client lists (U3) and so learn both secrets of a
device. With ``pki_verify`` every device signs the U3 it received and checks that the others signed the
same list before it reveals any share. To check a peer it needs the peer's key: the device sends its
``[key_attestation, equip_cert]`` and a signature of its keys at exchangeKeys, the leader checks them
against the key it kept from the device's startFLJob, and getKeys relays them (§R8.1).

This module holds the pure parts, with ``cryptography`` through :mod:`flcluster.verify.pki`:

- what is signed: :func:`exchange_keys_signed_data` (``c_pk ‖ s_pk ‖ timestamp ‖ iteration``),
  :func:`client_list_digest` (SHA-256 of the fl_ids, the Java client's ``transStringListToByte`` and
  ``getSHA256``), and the request signatures of pushListSign and getListSign, which are updateModel's
  (:func:`~flcluster.verify.pki.update_model_signed_data`);
- :func:`peer_key`: the key a ``[key_attestation, equip_cert]`` pair binds to an fl_id (the fl_id is the
  SHA-256 of the equip certificate, and only the equip key issues the attestation certificate);
- :func:`signs_client_list`: whether a list signature verifies over a U3 (the leader, §R8.3);
- the device's side: :func:`check_peer_keys` at getKeys and :func:`check_list_signatures` before
  reconstructSecrets (§R8.4).

Every failure raises :class:`~flcluster.errors.VerificationFailed` with what failed; nothing here reads a
clock or keeps state (the leader's :class:`~flcluster.verify.admission.ClientVerifier` does that).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from flcluster.core.cipher import DeviceKeys, ListSignature
from flcluster.errors import VerificationFailed
from flcluster.verify.pki import (
    PublicKey,
    accepted_key,
    check_issued_by,
    fl_id_of,
    parse_certificate,
    public_key_der,
    verify_request_signature,
)

__all__ = [
    "CHAIN_LENGTH",
    "check_list_signatures",
    "check_peer_keys",
    "client_list_digest",
    "exchange_keys_signed_data",
    "peer_key",
    "same_key",
    "signs_client_list",
]

#: Certificates a signed exchangeKeys carries: key attestation, equip certificate (the Java client's two).
CHAIN_LENGTH: Final = 2


def exchange_keys_signed_data(c_pk: bytes, s_pk: bytes, timestamp: str, iteration: int) -> bytes:
    """What ``RequestExchangeKeys.signature`` signs (the Java ``signPkAndTime``; spec §R8.1):
    ``c_pk ‖ s_pk ‖ UTF-8(timestamp) ‖ UTF-8(str(iteration))``."""
    return c_pk + s_pk + timestamp.encode() + str(iteration).encode()


def client_list_digest(clients: Iterable[str]) -> bytes:
    """``D``, what a list signature signs (spec §R8.2): SHA-256 of the UTF-8 fl_ids, in order, no
    separators."""
    h = hashlib.sha256()
    for fl_id in clients:
        h.update(fl_id.encode())
    return h.digest()


def peer_key(fl_id: str, certificate_chain: Sequence[str]) -> PublicKey:
    """The key ``[key_attestation, equip_cert]`` binds to ``fl_id`` (spec §R8.1).

    Checks: two certificates; ``fl_id`` is the SHA-256 of the second's text; the first is issued by the second
    (its signature verifies with the second's key); the first certifies an accepted key.

    Raises:
        VerificationFailed: A check fails; the reason says which.
    """
    if len(certificate_chain) != CHAIN_LENGTH:
        raise VerificationFailed(
            f"certificate_chain holds {len(certificate_chain)} certificates; {CHAIN_LENGTH} are expected "
            "(key attestation, equip certificate)"
        )
    attestation_text, equip_text = certificate_chain
    if fl_id_of(equip_text) != fl_id:
        raise VerificationFailed(
            f"fl_id {fl_id!r:.80} is not the SHA-256 of the equip certificate ({fl_id_of(equip_text)!r})"
        )
    attestation = parse_certificate(attestation_text, "the key attestation certificate")
    equip = parse_certificate(equip_text, "the equip certificate")
    check_issued_by(
        attestation, equip, "the key attestation certificate is not issued by the equip certificate"
    )
    return accepted_key(attestation.public_key(), "the key of the key attestation certificate")


def signs_client_list(key: PublicKey, clients: Sequence[str], signature: bytes) -> bool:
    """Whether ``signature`` is ``key``'s signature of :func:`client_list_digest` of ``clients``."""
    try:
        verify_request_signature(key, client_list_digest(clients), signature)
    except VerificationFailed:
        return False
    return True


def same_key(a: PublicKey, b: PublicKey) -> bool:
    """Whether two device keys are the same key."""
    return public_key_der(a) == public_key_der(b)


def check_peer_keys(keys: Sequence[DeviceKeys], own_fl_id: str, iteration: int) -> dict[str, PublicKey]:
    """The device's check of a getKeys answer with the list signatures (spec §R8.1).

    For every key but the device's own: :func:`peer_key` of its chain, and its signature over
    :func:`exchange_keys_signed_data` with the device's own ``iteration``.

    Returns:
        Every peer's key, by fl_id.

    Raises:
        VerificationFailed: A peer's chain or signature fails; the reason names the peer.
    """
    out: dict[str, PublicKey] = {}
    for k in keys:
        if k.fl_id == own_fl_id:
            continue
        try:
            key = peer_key(k.fl_id, k.certificate_chain)
            signed = exchange_keys_signed_data(k.c_pk, k.s_pk, k.timestamp, iteration)
            verify_request_signature(key, signed, k.signature)
        except VerificationFailed as exc:
            raise VerificationFailed(f"the keys of {k.fl_id!r:.80} do not check: {exc.reason}") from None
        out[k.fl_id] = key
    return out


def check_list_signatures(
    signatures: Sequence[ListSignature],
    clients: Sequence[str],
    peers: Mapping[str, PublicKey],
    *,
    own_fl_id: str,
    t: int,
) -> None:
    """The device's check of a getListSign answer, before reconstructSecrets (spec §R8.4).

    Args:
        signatures: The answer's list signatures.
        clients: The device's U3, as getClientList answered it.
        peers: The keys :func:`check_peer_keys` returned.
        own_fl_id: The device (its own entry is not checked).
        t: The Shamir threshold: at least ``t + 1`` devices must have signed.

    Raises:
        VerificationFailed: A signer outside U3 or without a key, a signer twice, a signature that does not
            verify over ``D`` of ``clients``, or fewer than ``t + 1`` signers.
    """
    listed = set(clients)
    seen: set[str] = set()
    for entry in signatures:
        who = entry.fl_id
        if who in seen:
            raise VerificationFailed(f"{who!r:.80} signed the client list twice")
        seen.add(who)
        if who not in listed:
            raise VerificationFailed(f"{who!r:.80} signed the client list but is not in it")
        if who == own_fl_id:
            continue
        key = peers.get(who)
        if key is None:
            raise VerificationFailed(f"{who!r:.80} signed the client list but sent no keys at getKeys")
        if not signs_client_list(key, clients, entry.signature):
            raise VerificationFailed(
                f"the list signature of {who!r:.80} does not verify over this device's client list"
            )
    if len(seen) < t + 1:
        raise VerificationFailed(
            f"only {len(seen)} device(s) signed the client list; the reconstruction needs {t + 1}"
        )
