"""The list signatures' cryptography (flcluster/verify/lists.py; spec/secure-aggregation.md §R8): what is
signed (byte for byte), the key a certificate pair binds to an fl_id, the leader's checks of signed
exchangeKeys and of every other cipher round's request signature (the original's reasons, OutOfTime or
RequestError, replays), and the device's checks of getKeys and getListSign answers, with real certificates
of tests/pki.py."""

from __future__ import annotations

import datetime
import hashlib

import attrs
import pytest

from flcluster.core.cipher import DeviceKeys, ListSignature
from flcluster.errors import VerificationFailed
from flcluster.verify import (
    REASON_EXCHANGE_KEYS_TIMEOUT,
    REASON_SIGNATURE_FAILED,
    REASON_SIGNATURE_TIMEOUT,
    ClientVerifier,
    DeviceIdentity,
    check_list_signatures,
    check_peer_keys,
    client_list_digest,
    exchange_keys_signed_data,
    peer_key,
    public_key_der,
    signs_client_list,
    update_model_signed_data,
)
from flcluster.wire.codes import CipherRound
from tests.pki import shared

WINDOW = 600_000
NOW = int(datetime.datetime.now(datetime.UTC).timestamp() * 1000)
C_PK, S_PK = b"c" * 32, b"s" * 32


def chain(device: DeviceIdentity) -> tuple[str, str]:
    return (device.key_attestation, device.equip_cert)


def signed_keys(device: DeviceIdentity, iteration: int = 3, timestamp: str = "1700000000000") -> DeviceKeys:
    signature = device.sign(exchange_keys_signed_data(C_PK, S_PK, timestamp, iteration))
    return DeviceKeys(
        device.fl_id, C_PK, S_PK, b"", b"p" * 16, b"t" * 32, timestamp, signature, chain(device)
    )


def der(device: DeviceIdentity) -> bytes:
    return public_key_der(device.private_key.public_key())


# ------------------------------------------------------------------------------------------ what is signed


def test_what_is_signed_byte_for_byte() -> None:
    assert exchange_keys_signed_data(b"\x01\x02", b"\x03", "1700", 12) == b"\x01\x02\x03" + b"1700" + b"12"
    assert client_list_digest(["ab", "c"]) == hashlib.sha256(b"abc").digest()
    assert client_list_digest([]) == hashlib.sha256(b"").digest()
    assert client_list_digest(["é"]) == hashlib.sha256("é".encode()).digest()
    assert client_list_digest(["a", "b"]) != client_list_digest(["b", "a"])  # the answer's order counts


def test_a_list_signature_verifies_over_exactly_its_list() -> None:
    pki = shared()
    for device in (pki.devices[0], pki.ec_device):
        clients = sorted(d.fl_id for d in pki.devices[:3])
        signature = device.sign(client_list_digest(clients))
        key = device.private_key.public_key()
        assert signs_client_list(key, clients, signature)
        assert not signs_client_list(key, clients[:2], signature)  # a device left out
        assert not signs_client_list(key, list(reversed(clients)), signature)
        assert not signs_client_list(pki.devices[1].private_key.public_key(), clients, signature)
        assert not signs_client_list(key, clients, b"")
        assert not signs_client_list(key, clients, signature[:-1] + bytes([signature[-1] ^ 1]))


# ----------------------------------------------------------------------------------------------- peer keys


def test_peer_key_binds_the_attestation_key_to_the_fl_id() -> None:
    pki = shared()
    device, other = pki.devices[0], pki.devices[1]
    assert public_key_der(peer_key(device.fl_id, chain(device))) == der(device)
    assert public_key_der(peer_key(pki.ec_device.fl_id, chain(pki.ec_device))) == der(pki.ec_device)
    cases = [
        ((device.key_attestation,), "holds 1 certificates; 2 are expected"),
        ((*chain(device), device.equip_ca_cert), "holds 3 certificates"),
        ((device.key_attestation, other.equip_cert), "is not the SHA-256 of the equip certificate"),
        ((other.key_attestation, device.equip_cert), "is not issued by the equip certificate"),
        (("not a certificate", device.equip_cert), "is not an X.509 certificate"),
    ]
    for certificates, why in cases:
        with pytest.raises(VerificationFailed, match=why):
            peer_key(device.fl_id, certificates)


def test_the_device_checks_every_peer_of_a_get_keys_answer() -> None:
    pki = shared()
    me, a, b = pki.devices[0], pki.devices[1], pki.ec_device
    keys = [signed_keys(me), signed_keys(a), signed_keys(b)]
    got = check_peer_keys(keys, me.fl_id, 3)
    assert set(got) == {a.fl_id, b.fl_id} and public_key_der(got[b.fl_id]) == der(b)
    # Its own entry is not checked (a Server may relay it as it likes).
    assert set(check_peer_keys([attrs.evolve(keys[0], signature=b""), *keys[1:]], me.fl_id, 3)) == set(got)
    bad = [
        (attrs.evolve(keys[1], c_pk=b"x" * 32), "does not verify"),  # keys swapped by the Server
        (attrs.evolve(keys[1], timestamp="1700000000001"), "does not verify"),
        (attrs.evolve(keys[1], signature=b""), "signature is empty"),
        (attrs.evolve(keys[1], certificate_chain=()), "holds 0 certificates"),
        (attrs.evolve(keys[1], certificate_chain=chain(b)), "is not the SHA-256"),
        (signed_keys(a, iteration=2), "does not verify"),  # keys of another iteration
    ]
    for peer, why in bad:
        with pytest.raises(VerificationFailed, match=f"the keys of '{a.fl_id}' do not check: .*{why}"):
            check_peer_keys([keys[0], peer, keys[2]], me.fl_id, 3)


def test_the_device_checks_the_list_signatures_before_it_reveals_shares() -> None:
    pki = shared()
    me, a, b = pki.devices[0], pki.devices[1], pki.devices[2]
    u3 = sorted([me.fl_id, a.fl_id, b.fl_id])
    peers = {d.fl_id: d.private_key.public_key() for d in (a, b)}

    def sig(device: DeviceIdentity, clients: list[str] = u3) -> ListSignature:
        return ListSignature(device.fl_id, device.sign(client_list_digest(clients)))

    good = [sig(me), sig(a), sig(b)]
    check_list_signatures(good, u3, peers, own_fl_id=me.fl_id, t=2)
    check_list_signatures(good[1:], u3, peers, own_fl_id=me.fl_id, t=1)  # own entry absent: t + 1 = 2 signers
    stranger = pki.devices[3]
    cases = [
        ([*good[:2], sig(b, u3[:2])], f"the list signature of '{b.fl_id}' does not verify"),  # another U3
        ([*good, sig(stranger)], "signed the client list but is not in it"),
        ([*good, good[1]], "signed the client list twice"),
        (good[1:], "only 2 device\\(s\\) signed the client list; the reconstruction needs 3"),
        ([], "only 0 device"),
    ]
    for signatures, why in cases:
        with pytest.raises(VerificationFailed, match=why):
            check_list_signatures(signatures, u3, peers, own_fl_id=me.fl_id, t=2)
    with pytest.raises(VerificationFailed, match="sent no keys at getKeys"):
        check_list_signatures(good, u3, {a.fl_id: peers[a.fl_id]}, own_fl_id=me.fl_id, t=2)


# ------------------------------------------------------------------------------------------ the leader


def leader_with(device: DeviceIdentity) -> ClientVerifier:
    verifier = ClientVerifier(WINDOW)
    verifier.keep_key(device.fl_id, device.private_key.public_key(), iteration=1)
    return verifier


def refused(call: object) -> VerificationFailed:
    assert callable(call)
    with pytest.raises(VerificationFailed) as info:
        call()
    return info.value


def test_the_leader_checks_a_signed_exchange_keys() -> None:
    pki = shared()
    device, other = pki.devices[0], pki.devices[1]
    verifier = leader_with(device)
    ts = str(NOW)

    def admit(
        *,
        fl_id: str = device.fl_id,
        timestamp: str = ts,
        signer: DeviceIdentity = device,
        certificates: tuple[str, ...] = chain(device),
        c_pk: bytes = C_PK,
    ) -> None:
        signature = signer.sign(exchange_keys_signed_data(c_pk, S_PK, timestamp, 1))
        verifier.admit_exchange_keys(fl_id, 1, timestamp, C_PK, S_PK, signature, certificates, now_ms=NOW)

    no_key = refused(lambda: admit(fl_id=other.fl_id, signer=other, certificates=chain(other)))
    assert (no_key.reason, no_key.retry_later) == (REASON_EXCHANGE_KEYS_TIMEOUT, True)
    bad = refused(lambda: admit(signer=other))
    assert (bad.reason, bad.retry_later) == (REASON_SIGNATURE_FAILED, False)
    tampered = refused(lambda: admit(c_pk=b"x" * 32))  # signed other keys than the ones sent
    assert tampered.reason == REASON_SIGNATURE_FAILED
    stale = refused(lambda: admit(timestamp=str(NOW - WINDOW - 1)))
    assert stale.retry_later and stale.reason.startswith(f"{REASON_EXCHANGE_KEYS_TIMEOUT}: ")
    wrong_chain = refused(lambda: admit(certificates=(device.key_attestation,)))
    assert wrong_chain.reason.startswith(f"{REASON_SIGNATURE_FAILED}: certificate_chain holds 1")
    admit()
    replay = refused(lambda: admit())
    assert replay.reason.startswith(f"{REASON_SIGNATURE_FAILED}: replayed request")
    admit(timestamp=str(NOW + 1))  # signed anew: admitted
    # A chain of the right device whose attestation certifies another key than the startFLJob's.
    rekeyed = pki.first.issue_device("device 0 rekeyed")
    mixed = leader_with(rekeyed)
    signature = rekeyed.sign(exchange_keys_signed_data(C_PK, S_PK, ts, 1))
    other_chain = refused(
        lambda: mixed.admit_exchange_keys(
            rekeyed.fl_id,
            1,
            ts,
            C_PK,
            S_PK,
            signature,
            (device.key_attestation, rekeyed.equip_cert),
            now_ms=NOW,
        )
    )
    assert other_chain.reason.startswith(f"{REASON_SIGNATURE_FAILED}: ")


REQUEST_SIGNED_ROUNDS = [r for r in CipherRound if r is not CipherRound.EXCHANGE_KEYS]


@pytest.mark.parametrize("round_", REQUEST_SIGNED_ROUNDS)
def test_the_leader_checks_the_request_signature_of_every_other_cipher_round(round_: CipherRound) -> None:
    """getKeys, shareSecrets, getSecrets, getClientList, pushListSign, getListSign, reconstructSecrets
    (spec/secure-aggregation.md §R8.3, §R8.6): the original's reasons, shareSecrets' OutOfTime its own."""
    pki = shared()
    device, other = pki.devices[0], pki.devices[1]
    verifier = leader_with(device)
    timeout = (
        REASON_EXCHANGE_KEYS_TIMEOUT if round_ is CipherRound.SHARE_SECRETS else REASON_SIGNATURE_TIMEOUT
    )

    def admit(
        *,
        timestamp: int = NOW,
        signer: DeviceIdentity = device,
        fl_id: str = device.fl_id,
        iteration: int = 2,
    ) -> object:
        ts = str(timestamp)
        signature = signer.sign(update_model_signed_data(ts, iteration))
        return verifier.admit_cipher_request(round_, fl_id, 2, ts, signature, now_ms=NOW)

    no_key = refused(lambda: admit(fl_id=other.fl_id, signer=other))
    assert (no_key.reason, no_key.retry_later) == (timeout, True)
    assert refused(lambda: admit(signer=other)).reason == REASON_SIGNATURE_FAILED
    # Signed over another iteration than the request's field: the signed data is the request's own.
    assert refused(lambda: admit(iteration=3)).reason == REASON_SIGNATURE_FAILED
    stale = refused(lambda: admit(timestamp=NOW + WINDOW + 1))
    assert stale.retry_later and stale.reason.startswith(f"{timeout}: ")
    assert verifier.statistics() == (1, 0)  # nothing refused is remembered
    key = admit()
    assert public_key_der(key) == der(device)  # type: ignore[arg-type]
    assert verifier.statistics() == (1, 1)
    replay = refused(lambda: admit())
    assert replay.reason.startswith(f"{REASON_SIGNATURE_FAILED}: replayed") and not replay.retry_later
    assert verifier.statistics() == (1, 1)
    malformed = refused(
        lambda: verifier.admit_cipher_request(round_, device.fl_id, 2, "soon", b"x", now_ms=NOW)
    )
    assert malformed.reason.startswith(f"{REASON_SIGNATURE_FAILED}: timestamp 'soon'")
    empty = refused(
        lambda: verifier.admit_cipher_request(round_, device.fl_id, 2, str(NOW + 5), b"", now_ms=NOW)
    )
    assert (empty.reason, empty.retry_later) == (REASON_SIGNATURE_FAILED, False)
    # No signature fails before the key is looked up (the original's VerifySignatureBase).
    unsigned = refused(
        lambda: verifier.admit_cipher_request(round_, other.fl_id, 2, str(NOW + 5), b"", now_ms=NOW)
    )
    assert (unsigned.reason, unsigned.retry_later) == (REASON_SIGNATURE_FAILED, False)


def test_a_request_admitted_in_one_round_is_not_a_replay_in_another() -> None:
    """The replay check names the round: getKeys and getSecrets polled with the same timestamp both pass."""
    device = shared().devices[0]
    verifier = leader_with(device)
    ts = str(NOW)
    signature = device.sign(update_model_signed_data(ts, 2))
    for round_ in REQUEST_SIGNED_ROUNDS:
        verifier.admit_cipher_request(round_, device.fl_id, 2, ts, signature, now_ms=NOW)
    assert verifier.statistics() == (1, len(REQUEST_SIGNED_ROUNDS))
