"""pki_verify's wiring: settings, the peer wire, the device SDK's signing (spec/device-protocol.md, "Client
verification"; spec/configuration.md §2, §2.4)."""

from __future__ import annotations

from pathlib import Path

import attrs
import httpx
import pytest

from flcluster.client.device import Device
from flcluster.config import FLContext, refuse_unimplemented
from flcluster.errors import ConfigError, MessageError
from flcluster.runtime.peer_wire import call_of, request_of
from flcluster.runtime.rounds import CountRequest
from flcluster.settings import client_verification, job_settings
from flcluster.verify import public_key_der, start_fl_job_signed_data, update_model_signed_data
from flcluster.verify import verify_request_signature as verify
from flcluster.wire.frames import Frame
from flcluster.wire.messages import CountOp, from_frame, to_header
from flcluster.wire.server_codec import decode_start_fl_job, decode_update_model
from tests.helpers import lenet_context
from tests.pki import shared, write_trust


def test_pki_verify_is_no_longer_refused_at_start_up_and_loads_the_trust_files(tmp_path: Path) -> None:
    ctx = lenet_context(2, 2).evolve(**write_trust(tmp_path), replay_attack_time_diff=1234)
    refuse_unimplemented(ctx)
    verification = job_settings(ctx).client_verification
    assert verification is not None
    assert verification.replay_attack_time_diff == 1234
    assert verification.trust.roots == (shared().first.root, shared().second.root)
    assert len(verification.trust.crls) == 1
    assert job_settings(lenet_context(2, 2)).client_verification is None


def test_a_server_with_a_missing_root_file_refuses_to_start(tmp_path: Path) -> None:
    ctx = FLContext.from_kwargs(
        pki_verify=True, root_first_ca_path=str(tmp_path / "nope.pem"), root_second_ca_path="b.pem"
    )
    with pytest.raises(
        ConfigError, match=r"root_first_ca_path='.*nope.pem' is refused: the file cannot be read"
    ):
        client_verification(ctx)


def test_the_counting_part_carries_timestamp_signature_and_key_over_the_peer_link() -> None:
    request = CountRequest(
        CountOp.UPDATE_MODEL, "dev", 0, 3, 0.5, 0.25, "1700000000000", b"\x00sig", b"\x30key"
    )
    call = call_of(9, request)
    decoded = from_frame(Frame(to_header(call)))
    assert decoded == call
    assert request_of(call) == request
    assert request_of(call_of(1, CountRequest(CountOp.START_FL_JOB, "dev"))) == CountRequest(
        CountOp.START_FL_JOB, "dev"
    )


def test_a_call_with_bytes_that_are_not_base64_is_refused() -> None:
    call = call_of(9, CountRequest(CountOp.UPDATE_MODEL, "dev", signature=b"s"))
    with pytest.raises(MessageError, match=r"leader_call.signature: .* is not base64"):
        request_of(attrs.evolve(call, signature="not base64!"))


async def test_a_device_must_use_its_identitys_fl_id() -> None:
    device = shared().devices[0]
    async with httpx.AsyncClient() as client:
        with pytest.raises(ConfigError, match="is not the identity's"):
            Device("fl_lenet_0", ["http://127.0.0.1:1"], fl_name="Lenet", client=client, identity=device)


async def test_a_signed_device_signs_every_request_anew_with_increasing_timestamps() -> None:
    identity = shared().ec_device
    key = identity.private_key.public_key()
    sent: list[tuple[str, bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append((request.url.path, request.content))
        return httpx.Response(200, content=b"The cluster is in safemode.")

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        device = Device(
            identity.fl_id,
            ["http://server:1"],
            fl_name="Lenet",
            client=client,
            identity=identity,
            now_ms=lambda: 5000,
        )
        await device.start_fl_job(16)
        await device.start_fl_job(16)
        await device.update_model(1, {"w": [1.0, 2.0]})
    starts = [decode_start_fl_job(body) for path, body in sent if path == "/startFLJob"]
    [update] = [decode_update_model(body) for path, body in sent if path == "/updateModel"]
    assert [s.timestamp for s in starts] == [
        "5000",
        "5001",
    ]  # the same clock reading, never the same timestamp
    assert update.timestamp == "5002"
    for s in starts:
        assert (s.fl_id, s.equip_cert, s.key_attestation) == (
            identity.fl_id,
            identity.equip_cert,
            identity.key_attestation,
        )
        assert (s.equip_ca_cert, s.root_cert) == (identity.equip_ca_cert, identity.root_cert)
        verify(key, start_fl_job_signed_data(s.fl_id, s.timestamp), s.sign_data)
    verify(public_key_der(key), update_model_signed_data(update.timestamp, 1), update.signature)


async def test_an_unsigned_device_sends_no_pki_fields() -> None:
    sent: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.content)
        return httpx.Response(200, content=b"The cluster is in safemode.")

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        device = Device("plain", ["http://server:1"], fl_name="Lenet", client=client, now_ms=lambda: 7)
        await device.start_fl_job(16)
        await device.update_model(1, {"w": [1.0]})
    start, update = decode_start_fl_job(sent[0]), decode_update_model(sent[1])
    assert (start.sign_data, start.key_attestation, start.equip_cert, update.signature) == (b"", "", "", b"")
    assert (start.timestamp, update.timestamp) == ("7", "7")  # without an identity: the clock as it is
