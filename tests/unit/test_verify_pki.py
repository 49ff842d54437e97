"""Client verification's pure parts: timestamps, replays, certificate chains and signatures
(spec/device-protocol.md, "Client verification"; flcluster/verify/)."""

from __future__ import annotations

import base64
import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from flcluster.errors import ConfigError, VerificationFailed
from flcluster.verify import (
    DeviceIdentity,
    ReplayGuard,
    TrustAnchors,
    check_fresh,
    check_timestamp,
    fl_id_of,
    load_public_key,
    load_trust_anchors,
    parse_certificate,
    parse_timestamp,
    public_key_der,
    replay_key,
    sign_request,
    start_fl_job_signed_data,
    update_model_signed_data,
    verify_device_chain,
    verify_request_signature,
)
from flcluster.verify.issuing import DevicePKI
from tests.pki import DAY, shared, write_trust

WINDOW = 600_000


def now_ms() -> int:
    """The wall clock, as the test PKIs' certificates are valid around it."""
    return int(datetime.datetime.now(datetime.UTC).timestamp() * 1000)


def trust(*pkis: DevicePKI, crls: tuple[x509.CertificateRevocationList, ...] = ()) -> TrustAnchors:
    return TrustAnchors(tuple(p.root for p in pkis), crls)


def chain(identity: DeviceIdentity) -> tuple[str, str, str]:
    return identity.key_attestation, identity.equip_cert, identity.equip_ca_cert


# ------------------------------------------------------------------------------------------- timestamps


@pytest.mark.parametrize("text", ["1700000000000", "0", "123456789012345678"])
def test_an_epoch_ms_timestamp_parses(text: str) -> None:
    assert parse_timestamp(text) == int(text)


@pytest.mark.parametrize(
    "text", ["", "2020/11/16/19/18", "-5", "+5", " 5", "5 ", "1.5", "1234567890123456789"]
)
def test_anything_but_decimal_epoch_ms_is_refused(text: str) -> None:
    with pytest.raises(VerificationFailed, match="is not epoch milliseconds") as info:
        parse_timestamp(text)
    assert not info.value.retry_later


def test_the_window_is_inclusive_both_ways() -> None:
    now = 10_000_000
    check_fresh(now - WINDOW, now, WINDOW)
    check_fresh(now + WINDOW, now, WINDOW)
    assert check_timestamp(str(now), now, WINDOW) == now


@pytest.mark.parametrize(("offset", "word"), [(-WINDOW - 1, "old"), (WINDOW + 1, "in the future")])
def test_a_timestamp_past_the_window_is_refused_and_may_be_retried(offset: int, word: str) -> None:
    now = 10_000_000
    with pytest.raises(
        VerificationFailed, match=f"is {WINDOW + 1} ms {word}; replay_attack_time_diff"
    ) as info:
        check_timestamp(str(now + offset), now, WINDOW)
    assert info.value.retry_later


def test_the_replay_guard_refuses_the_same_request_within_the_window() -> None:
    guard = ReplayGuard(WINDOW)
    key = replay_key("startFLJob", "dev", b"dev 1000")
    guard.admit(key, 1000, 1000)
    guard.admit(replay_key("startFLJob", "dev", b"dev 1001"), 1001, 1001)
    guard.admit(replay_key("updateModel", "dev", b"dev 1000"), 1000, 1001)  # another round
    with pytest.raises(VerificationFailed, match="replayed request"):
        guard.admit(key, 1000, 1000 + WINDOW)
    assert len(guard) == 3


def test_the_replay_guard_forgets_a_request_once_its_window_closed() -> None:
    guard = ReplayGuard(WINDOW)
    key = replay_key("startFLJob", "dev", b"dev 1000")
    guard.admit(key, 1000, 1000)
    guard.admit(replay_key("startFLJob", "other", b"x"), 5000, 5000)
    guard.admit(key, 1000, 1000 + WINDOW + 1)  # expired: the timestamp check refuses it anyway
    assert len(guard) == 2


def test_the_replay_guard_is_bounded_and_forgets_the_earliest_to_expire_first() -> None:
    guard = ReplayGuard(WINDOW, capacity=2)
    keys = [replay_key("r", "d", bytes([i])) for i in range(3)]
    guard.admit(keys[0], 2000, 2000)
    guard.admit(keys[1], 1000, 2000)  # expires first
    guard.admit(keys[2], 3000, 3000)
    assert len(guard) == 2
    guard.admit(keys[1], 1000, 3000)  # forgotten, so admitted again (and keys[0] forgotten)
    with pytest.raises(VerificationFailed):
        guard.admit(keys[2], 3000, 3000)


def test_replay_keys_tell_round_fl_id_and_data_apart() -> None:
    keys = {
        replay_key("a", "b", b"c"),
        replay_key("ab", "", b"c"),
        replay_key("a", "bc", b""),
        replay_key("a", "b", b"d"),
    }
    assert len(keys) == 4


# ---------------------------------------------------------------------------------------- signed data


def test_the_signed_data_is_the_originals() -> None:
    assert start_fl_job_signed_data("abc", "1700000000000") == b"abc 1700000000000"
    assert update_model_signed_data("1700000000000", 12) == b"170000000000012"
    assert fl_id_of("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_the_fl_id_is_the_sha256_of_the_equip_certificate_text() -> None:
    import hashlib

    device = shared().devices[0]
    assert device.fl_id == hashlib.sha256(device.equip_cert.encode()).hexdigest()
    assert device.fl_id == fl_id_of(device.equip_cert)


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_a_request_signature_verifies_with_the_devices_key_only(kind: str) -> None:
    pki = shared()
    device = pki.devices[0] if kind == "rsa" else pki.ec_device
    key = device.private_key.public_key()
    data = b"1700000000000" + b"3"
    signature = device.sign(data)
    verify_request_signature(key, data, signature)
    verify_request_signature(public_key_der(key), data, signature)  # the form the leader is sent
    with pytest.raises(VerificationFailed, match="does not verify"):
        verify_request_signature(key, data + b"4", signature)
    with pytest.raises(VerificationFailed, match="does not verify"):
        verify_request_signature(pki.devices[1].private_key.public_key(), data, signature)
    with pytest.raises(VerificationFailed, match="empty"):
        verify_request_signature(key, data, b"")
    with pytest.raises(VerificationFailed, match="at most 1024"):
        verify_request_signature(key, data, bytes(1025))


def test_rsa_signatures_are_pss_with_any_salt_length() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    device = shared().devices[0]
    assert isinstance(device.private_key, rsa.RSAPrivateKey)
    data = b"fl 1"
    for salt in (0, 20, 32, padding.PSS.MAX_LENGTH):
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt)
        verify_request_signature(
            device.private_key.public_key(), data, device.private_key.sign(data, pss, hashes.SHA256())
        )
    pkcs1 = device.private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    with pytest.raises(VerificationFailed):
        verify_request_signature(device.private_key.public_key(), data, pkcs1)


def test_device_keys_of_other_kinds_or_sizes_are_refused() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    with pytest.raises(VerificationFailed, match="RSA of 1024 bits; 2048 to 8192"):
        load_public_key(public_key_der(small))
    koblitz = ec.generate_private_key(ec.SECP256K1()).public_key()
    with pytest.raises(VerificationFailed, match="EC on secp256k1"):
        load_public_key(public_key_der(koblitz))
    with pytest.raises(VerificationFailed, match="not a DER SubjectPublicKeyInfo"):
        load_public_key(b"\x30\x03junk")


# ------------------------------------------------------------------------------------------------ chains


@pytest.mark.parametrize("which", ["rsa on the first root", "ec on the second root"])
def test_a_good_chain_is_accepted_and_yields_the_leaf_key(which: str) -> None:
    pki = shared()
    device = pki.devices[0] if which.startswith("rsa") else pki.ec_device
    key = verify_device_chain(*chain(device), trust(pki.first, pki.second), now_ms=now_ms())
    assert public_key_der(key) == public_key_der(device.private_key.public_key())


def test_base64_der_without_the_pem_armour_is_accepted() -> None:
    device = shared().devices[0]

    def der64(pem: str) -> str:
        return base64.b64encode(
            x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
        ).decode()

    verify_device_chain(*(der64(p) for p in chain(device)), trust(shared().first), now_ms=now_ms())


def test_a_chain_to_an_untrusted_root_is_refused() -> None:
    pki = shared()
    with pytest.raises(
        VerificationFailed, match="equip_ca_cert is not issued by the root of root_first_ca_path"
    ):
        verify_device_chain(
            *chain(pki.stranger.issue_device("x", key="ec")), trust(pki.first, pki.second), now_ms=now_ms()
        )


def test_a_chain_under_the_same_names_but_other_keys_is_refused() -> None:
    pki = shared()
    with pytest.raises(VerificationFailed, match="signature does not verify with the key of"):
        verify_device_chain(*chain(pki.twin.issue_device("x", key="ec")), trust(pki.first), now_ms=now_ms())


def test_links_out_of_order_are_refused() -> None:
    a, b = shared().devices[:2]
    with pytest.raises(VerificationFailed, match="key_attestation is not issued by equip_cert"):
        verify_device_chain(
            a.key_attestation, b.equip_cert, a.equip_ca_cert, trust(shared().first), now_ms=now_ms()
        )
    with pytest.raises(VerificationFailed, match="equip_cert is not issued by equip_ca_cert"):
        verify_device_chain(
            a.key_attestation,
            a.equip_cert,
            shared().second.issue_device("y", key="ec").equip_ca_cert,
            trust(shared().first),
            now_ms=now_ms(),
        )


def test_an_expired_device_certificate_is_refused() -> None:
    pki = shared().first
    now = datetime.datetime.now(datetime.UTC)
    old = pki.issue_device("old", key="ec", not_before=now - 30 * DAY, not_after=now - DAY)
    with pytest.raises(VerificationFailed, match="key_attestation expired at"):
        verify_device_chain(*chain(old), trust(pki), now_ms=now_ms())


def test_a_certificate_valid_only_later_is_refused_beyond_the_originals_600_s() -> None:
    pki = shared().first
    now = datetime.datetime.now(datetime.UTC)
    soon = pki.issue_device("soon", key="ec", not_before=now + datetime.timedelta(seconds=300))
    verify_device_chain(*chain(soon), trust(pki), now_ms=now_ms())  # within the tolerance
    later = pki.issue_device("later", key="ec", not_before=now + datetime.timedelta(seconds=900))
    with pytest.raises(VerificationFailed, match="key_attestation is not valid before"):
        verify_device_chain(*chain(later), trust(pki), now_ms=now_ms())


def test_the_clock_the_caller_passes_is_the_one_used() -> None:
    device = shared().devices[0]
    in_20_years = now_ms() + 20 * 365 * 86_400_000
    with pytest.raises(VerificationFailed, match="expired at"):
        verify_device_chain(*chain(device), trust(shared().first), now_ms=in_20_years)


def test_a_revoked_device_is_refused_and_only_it() -> None:
    pki = shared()
    crl = x509.load_pem_x509_crl(pki.first.revocation_list([pki.revoked]))
    anchors = trust(pki.first, pki.second, crls=(crl,))
    with pytest.raises(
        VerificationFailed, match=r"equip_cert \(serial 0x[0-9a-f]+\) is revoked by the CRL of"
    ):
        verify_device_chain(*chain(pki.revoked), anchors, now_ms=now_ms())
    verify_device_chain(*chain(pki.devices[0]), anchors, now_ms=now_ms())
    verify_device_chain(*chain(pki.ec_device), anchors, now_ms=now_ms())


def test_a_crl_its_issuer_did_not_sign_revokes_nothing() -> None:
    pki = shared()
    # The twin's CRL carries the first PKI's names (and the serial) but the twin's signature.
    forged = x509.load_pem_x509_crl(pki.twin.revocation_list([pki.revoked]))
    assert forged.issuer == x509.load_pem_x509_certificate(pki.revoked.equip_ca_cert.encode()).subject
    verify_device_chain(*chain(pki.revoked), trust(pki.first, crls=(forged,)), now_ms=now_ms())


def test_an_equip_ca_that_is_not_a_ca_is_refused() -> None:
    from cryptography.hazmat.primitives import hashes

    pki = shared().first
    device = shared().devices[0]
    equip_ca = x509.load_pem_x509_certificate(device.equip_ca_cert.encode())
    # The same equip CA, re-issued by the root without CA:TRUE.
    builder = x509.CertificateBuilder(
        issuer_name=equip_ca.issuer,
        subject_name=equip_ca.subject,
        public_key=equip_ca.public_key(),
        serial_number=equip_ca.serial_number,
        not_valid_before=equip_ca.not_valid_before_utc,
        not_valid_after=equip_ca.not_valid_after_utc,
        extensions=[e for e in equip_ca.extensions if not isinstance(e.value, x509.BasicConstraints)],
    ).add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    not_ca = builder.sign(pki.root_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(VerificationFailed, match="equip_ca_cert is not a CA certificate"):
        verify_device_chain(device.key_attestation, device.equip_cert, not_ca, trust(pki), now_ms=now_ms())


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "key_attestation is empty"),
        ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "is not an X.509 certificate"),
        ("not base64!", "is not an X.509 certificate"),
        ("A" * 20_000, "at most 16384"),
    ],
)
def test_a_field_that_is_not_a_certificate_is_refused(text: str, match: str) -> None:
    with pytest.raises(VerificationFailed, match=match):
        parse_certificate(text, "key_attestation")


# ---------------------------------------------------------------------------------------- trust anchors


def test_trust_anchors_are_read_from_the_configured_files(tmp_path: Path) -> None:
    context = write_trust(tmp_path)
    anchors = load_trust_anchors(
        str(context["root_first_ca_path"]),
        str(context["root_second_ca_path"]),
        str(context["equip_crl_path"]),
    )
    assert anchors.roots == (shared().first.root, shared().second.root)
    assert len(anchors.crls) == 1
    # DER files too, and no CRL at all.
    der = tmp_path / "root.der"
    der.write_bytes(shared().first.root.public_bytes(serialization.Encoding.DER))
    assert load_trust_anchors(str(der), str(der)).crls == ()


@pytest.mark.parametrize(
    ("which", "content", "match"),
    [
        ("root_first_ca_path", None, r"root_first_ca_path='.*missing' is refused: the file cannot be read"),
        (
            "root_second_ca_path",
            b"hello",
            r"root_second_ca_path='.*' is refused: it holds no X.509 certificate",
        ),
        ("equip_crl_path", b"hello", r"equip_crl_path='.*' is refused: it holds no X.509 CRL"),
        ("equip_crl_path", None, r"equip_crl_path='.*missing' is refused: the file cannot be read"),
    ],
)
def test_unusable_trust_files_are_refused_naming_the_parameter(
    tmp_path: Path, which: str, content: bytes | None, match: str
) -> None:
    paths = {k: str(v) for k, v in write_trust(tmp_path).items() if k != "pki_verify"}
    bad = tmp_path / ("missing" if content is None else "bad")
    if content is not None:
        bad.write_bytes(content)
    paths[which] = str(bad)
    with pytest.raises(ConfigError, match=match):
        load_trust_anchors(paths["root_first_ca_path"], paths["root_second_ca_path"], paths["equip_crl_path"])


def test_an_identity_reads_back_from_pem_files(tmp_path: Path) -> None:
    device = shared().ec_device
    key = tmp_path / "key.pem"
    key.write_bytes(
        device.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    chain_file = tmp_path / "chain.pem"
    chain_file.write_text(
        device.key_attestation + device.equip_cert + device.equip_ca_cert + device.root_cert
    )
    loaded = DeviceIdentity.from_files(str(key), str(chain_file))
    assert loaded.fl_id == device.fl_id
    assert (loaded.key_attestation, loaded.equip_cert) == (device.key_attestation, device.equip_cert)
    verify_request_signature(device.private_key.public_key(), b"x", sign_request(loaded.private_key, b"x"))
    chain_file.write_text(device.key_attestation)
    with pytest.raises(ConfigError, match="holds 1 certificates; four are expected"):
        DeviceIdentity.from_files(str(key), str(chain_file))
