"""What the Server a request lands on and the leader check with pki_verify (flcluster/verify/admission.py;
spec/device-protocol.md, "Client verification"), with the exact reasons and answers."""

from __future__ import annotations

import datetime

import attrs
import pytest

from flcluster.errors import VerificationFailed
from flcluster.verify import (
    REASON_START_FL_JOB_VERIFY,
    ClientVerification,
    ClientVerifier,
    DeviceIdentity,
    TrustAnchors,
    check_update_model,
    public_key_der,
    reason_signature_failed,
    reason_signature_timeout,
    start_fl_job_signed_data,
    update_model_signed_data,
    verify_start_fl_job,
)
from flcluster.wire.records import StartFLJobRequest, UpdateModelRequest
from tests.pki import shared

WINDOW = 600_000
NOW = int(datetime.datetime.now(datetime.UTC).timestamp() * 1000)


def verification() -> ClientVerification:
    pki = shared()
    return ClientVerification(TrustAnchors((pki.first.root, pki.second.root)), WINDOW)


def start_request(
    device: DeviceIdentity, *, timestamp: int = NOW, signer: DeviceIdentity | None = None
) -> StartFLJobRequest:
    ts = str(timestamp)
    return StartFLJobRequest(
        fl_name="Lenet",
        fl_id=device.fl_id,
        iteration=1,
        data_size=32,
        timestamp=ts,
        sign_data=(signer or device).sign(start_fl_job_signed_data(device.fl_id, ts)),
        key_attestation=device.key_attestation,
        equip_cert=device.equip_cert,
        equip_ca_cert=device.equip_ca_cert,
        root_cert=device.root_cert,
    )


def refused_start(req: StartFLJobRequest) -> VerificationFailed:
    with pytest.raises(VerificationFailed) as info:
        verify_start_fl_job(req, verification(), now_ms=NOW)
    assert info.value.reason.startswith(f"{REASON_START_FL_JOB_VERIFY}: ")
    assert not info.value.retry_later  # startFLJob: always RequestError, as the original
    return info.value


# --------------------------------------------------------------------------------- the receiving Server


@pytest.mark.parametrize("which", ["rsa", "ec"])
def test_a_good_start_fl_job_yields_the_device_key(which: str) -> None:
    device = shared().devices[0] if which == "rsa" else shared().ec_device
    verified = verify_start_fl_job(start_request(device), verification(), now_ms=NOW)
    assert verified.timestamp == str(NOW)
    assert verified.device_key == public_key_der(device.private_key.public_key())


def test_an_unsigned_start_fl_job_is_refused_naming_what_is_missing() -> None:
    device = shared().devices[0]
    bare = StartFLJobRequest("Lenet", device.fl_id, 1, 32, str(NOW))
    assert "sign_data, key_attestation, equip_cert, equip_ca_cert absent" in refused_start(bare).reason
    no_ca = attrs.evolve(start_request(device), equip_ca_cert="")
    assert "equip_ca_cert absent" in refused_start(no_ca).reason


@pytest.mark.parametrize(("offset", "word"), [(-WINDOW - 1, "old"), (WINDOW + 1, "in the future")])
def test_a_stale_or_future_start_fl_job_is_refused(offset: int, word: str) -> None:
    req = start_request(shared().devices[0], timestamp=NOW + offset)
    assert f"ms {word}" in refused_start(req).reason


def test_a_free_form_timestamp_is_refused_with_pki_verify() -> None:
    device = shared().devices[0]
    req = attrs.evolve(start_request(device), timestamp="2020/11/16/19/18")
    assert "is not epoch milliseconds" in refused_start(req).reason


def test_an_fl_id_that_is_not_the_equip_certificates_is_refused() -> None:
    device = shared().devices[0]
    req = attrs.evolve(start_request(device), fl_id=shared().devices[1].fl_id)
    assert "is not the SHA-256 of equip_cert" in refused_start(req).reason


def test_a_start_fl_job_signed_by_another_key_is_refused() -> None:
    pki = shared()
    req = start_request(pki.devices[0], signer=pki.devices[1])
    assert "signature does not verify" in refused_start(req).reason


def test_a_tampered_signature_is_refused() -> None:
    req = start_request(shared().devices[0])
    broken = bytes([req.sign_data[0] ^ 1]) + req.sign_data[1:]
    assert "signature does not verify" in refused_start(attrs.evolve(req, sign_data=broken)).reason


def test_a_chain_of_an_untrusted_pki_is_refused() -> None:
    req = start_request(shared().stranger.issue_device("stranger", key="ec"))
    assert (
        "is not issued by the root of root_first_ca_path or root_second_ca_path" in refused_start(req).reason
    )


def test_an_update_must_carry_a_signature_and_an_epoch_ms_timestamp() -> None:
    good = UpdateModelRequest("Lenet", "dev", 1, (), str(NOW), signature=b"s")
    check_update_model(good)
    for bad, why in (
        (attrs.evolve(good, signature=b""), "signature absent"),
        (attrs.evolve(good, timestamp="t"), "epoch"),
    ):
        with pytest.raises(VerificationFailed, match=why) as info:
            check_update_model(bad)
        assert info.value.reason.startswith(reason_signature_failed("dev") + ": ")
        assert not info.value.retry_later


# ------------------------------------------------------------------------------------------- the leader


def admitted(verifier: ClientVerifier, device: DeviceIdentity, *, iteration: int = 1, at: int = NOW) -> None:
    key = verifier.admit_start_fl_job(
        device.fl_id, str(at), public_key_der(device.private_key.public_key()), now_ms=at
    )
    verifier.keep_key(device.fl_id, key, iteration=iteration)


def update(
    verifier: ClientVerifier,
    device: DeviceIdentity,
    *,
    ts: int = NOW,
    iteration: int = 1,
    now: int = NOW,
    signer: DeviceIdentity | None = None,
) -> None:
    signature = (signer or device).sign(update_model_signed_data(str(ts), iteration))
    verifier.admit_update_model(device.fl_id, iteration, str(ts), signature, now_ms=now)


def test_the_leader_refuses_a_replayed_start_fl_job() -> None:
    device = shared().devices[0]
    verifier = ClientVerifier(WINDOW)
    der = public_key_der(device.private_key.public_key())
    verifier.admit_start_fl_job(device.fl_id, str(NOW), der, now_ms=NOW)
    verifier.admit_start_fl_job(device.fl_id, str(NOW + 1), der, now_ms=NOW + 1)  # signed anew: fine
    with pytest.raises(VerificationFailed, match="replayed request") as info:
        verifier.admit_start_fl_job(device.fl_id, str(NOW), der, now_ms=NOW + 5)
    assert info.value.reason.startswith(REASON_START_FL_JOB_VERIFY) and not info.value.retry_later
    with pytest.raises(VerificationFailed, match="ms old"):
        verifier.admit_start_fl_job(device.fl_id, str(NOW), der, now_ms=NOW + WINDOW + 1)
    assert verifier.statistics() == (0, 2)  # nothing kept until the machine accepts


def test_an_update_of_a_device_without_a_key_is_told_to_retry_later() -> None:
    device = shared().devices[0]
    with pytest.raises(VerificationFailed) as info:
        update(ClientVerifier(WINDOW), device)
    assert info.value.reason == reason_signature_timeout(device.fl_id)
    assert info.value.retry_later  # OutOfTime, as the original


def test_the_leader_verifies_an_update_with_the_key_kept_at_start_fl_job() -> None:
    pki = shared()
    device = pki.devices[0]
    verifier = ClientVerifier(WINDOW)
    admitted(verifier, device)
    update(verifier, device)
    with pytest.raises(VerificationFailed) as info:
        update(verifier, device, ts=NOW + 1, signer=pki.devices[1])
    assert info.value.reason == reason_signature_failed(device.fl_id) and not info.value.retry_later
    with pytest.raises(VerificationFailed) as info:
        update(verifier, device, ts=NOW + 2, iteration=1, signer=None, now=NOW + WINDOW + 3)
    assert (
        info.value.reason.startswith(reason_signature_timeout(device.fl_id) + ": ") and info.value.retry_later
    )
    with pytest.raises(VerificationFailed, match="replayed request") as info:
        update(verifier, device)
    assert info.value.reason.startswith(reason_signature_failed(device.fl_id)) and not info.value.retry_later


def test_an_update_signed_for_another_iteration_does_not_verify() -> None:
    device = shared().devices[0]
    verifier = ClientVerifier(WINDOW)
    admitted(verifier, device)
    signature = device.sign(update_model_signed_data(str(NOW), 1))
    with pytest.raises(VerificationFailed) as info:
        verifier.admit_update_model(device.fl_id, 2, str(NOW), signature, now_ms=NOW)
    assert info.value.reason == reason_signature_failed(device.fl_id)


def test_keys_are_kept_for_the_iteration_and_the_next_then_forgotten() -> None:
    a, b, c = shared().devices[:3]
    verifier = ClientVerifier(WINDOW)
    admitted(verifier, a, iteration=1, at=NOW)
    admitted(verifier, b, iteration=2, at=NOW + 1)
    assert verifier.device_key(a.fl_id) is not None  # a late retry of iteration 1 is still verified
    admitted(verifier, c, iteration=3, at=NOW + 2)
    assert verifier.device_key(a.fl_id) is None
    assert verifier.device_key(b.fl_id) is not None and verifier.device_key(c.fl_id) is not None
    assert verifier.statistics()[0] == 2
