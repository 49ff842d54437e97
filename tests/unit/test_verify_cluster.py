"""Client verification in a whole cluster (Scheduler + Servers in this process, real loopback sockets):
signed devices train; unsigned, wrongly signed, revoked, stale, future and replayed requests get the
protocol's answer and change nothing (spec/device-protocol.md, "Client verification")."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import attrs
import httpx
import numpy as np
import trio

from flcluster.client.device import Device, IterationOutcome, IterationReport, TrainingTask, TrainResult
from flcluster.client.simulator import SimulatorConfig, simulate
from flcluster.core.iteration import RoundCounts, Visits
from flcluster.runtime.server import ServerNode
from flcluster.verify import (
    REASON_START_FL_JOB_VERIFY,
    DeviceIdentity,
    reason_signature_failed,
    reason_signature_timeout,
    start_fl_job_signed_data,
    update_model_signed_data,
)
from flcluster.wire.client_codec import (
    decode_start_fl_job_response,
    decode_update_model_response,
    encode_start_fl_job_request,
    encode_update_model_request,
)
from flcluster.wire.codes import ResponseCode
from tests.helpers import FL_NAME, InProcessCluster, open_cluster
from tests.pki import pki_job, shared

WINDOW = 600_000


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


async def trainer(task: TrainingTask) -> TrainResult:
    """A stand-in for training: the global model plus one, multiplied by the data size."""
    return TrainResult({name: (w + 1.0) * task.data_size for name, w in task.model.items()}, loss=0.5)


def leader_of(cluster: InProcessCluster) -> ServerNode:
    leader = cluster.by_rank()[0]
    assert leader.machine is not None
    return leader


def state(cluster: InProcessCluster) -> tuple[RoundCounts, Visits]:
    machine = leader_of(cluster).machine
    assert machine is not None
    return machine.counts(), machine.visits


def start_body(device: DeviceIdentity, ts: int, *, signer: DeviceIdentity | None = None) -> bytes:
    return encode_start_fl_job_request(
        fl_name=FL_NAME,
        fl_id=device.fl_id,
        iteration=1,
        data_size=16,
        timestamp=str(ts),
        sign_data=(signer or device).sign(start_fl_job_signed_data(device.fl_id, str(ts))),
        key_attestation=device.key_attestation,
        equip_cert=device.equip_cert,
        equip_ca_cert=device.equip_ca_cert,
        root_cert=device.root_cert,
    )


async def test_signed_devices_train_and_unsigned_or_wrongly_signed_devices_are_refused(
    tmp_path: Path,
) -> None:
    pki = shared()
    job = partial(pki_job, tmp_path / "trust", 3, 2)
    async with open_cluster(2, job) as cluster, httpx.AsyncClient(timeout=30) as client:

        def device(fl_id: str, identity: DeviceIdentity | None = None, seed: int = 0) -> Device:
            return Device(
                fl_id,
                cluster.urls,
                fl_name=FL_NAME,
                client=client,
                use_elb=True,
                seed=seed,
                identity=identity,
            )

        # A device of another PKI, one without any identity, one whose chain is revoked, one whose key is
        # not the one its chain certifies: each is refused at startFLJob (RequestError: its job stops).
        other_key = attrs.evolve(pki.devices[5], private_key=pki.devices[4].private_key)
        cases = [
            (
                "no identity",
                device("unsigned"),
                "sign_data, key_attestation, equip_cert, equip_ca_cert absent",
            ),
            ("untrusted", _stranger(device), "is not issued by the root of root_first_ca_path"),
            ("revoked", device(pki.revoked.fl_id, pki.revoked), "is revoked by the CRL"),
            ("other key", device(other_key.fl_id, other_key), "signature does not verify"),
        ]
        for name, bad, why in cases:
            report = await bad.run_iteration(trainer, data_size=16)
            assert report.outcome is IterationOutcome.STOPPED, name
            assert report.reason.startswith("startFLJob answered RequestError: "), name
            assert f"{REASON_START_FL_JOB_VERIFY}: " in report.reason, name
            assert why in report.reason, name
        counts, visits = state(cluster)
        assert counts.start_fl_job == 0 and visits.start_fl_job_total == 0  # nothing counted, no visit

        # Signed devices (RSA of the first root, EC of the second) train two iterations, each request on a
        # random Server: a startFLJob verified on one Server, its update on another (the key is the leader's).
        signed = [pki.devices[0], pki.devices[1], pki.ec_device]
        devices = [device(d.fl_id, d, seed=i) for i, d in enumerate(signed)]
        for iteration in (1, 2):
            reports: list[IterationReport] = []

            async def run(d: Device, reports: list[IterationReport] = reports) -> None:
                reports.append(await d.run_iteration(trainer, data_size=16))

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for d in devices:
                        nursery.start_soon(run, d)
            assert [r.outcome for r in reports] == [IterationOutcome.COMPLETED] * 3, reports
            assert {r.iteration for r in reports} == {iteration}
        leader = leader_of(cluster)
        assert leader.machine is not None and leader.machine.completed == (1, 2)
        assert leader.client_verifier is not None
        assert all(leader.client_verifier.device_key(d.fl_id) is not None for d in signed)


def _stranger(make: Callable[[str, DeviceIdentity], Device]) -> Device:
    identity = shared().stranger.issue_device("stranger", key="ec")
    return make(identity.fl_id, identity)


async def test_stale_future_replayed_and_wrongly_signed_requests_change_nothing(tmp_path: Path) -> None:
    pki = shared()
    a, b, c = pki.devices[:3]
    job = partial(pki_job, tmp_path / "trust", 2, 3)
    async with open_cluster(2, job) as cluster, httpx.AsyncClient(timeout=30) as client:
        leader = leader_of(cluster)
        follower = cluster.by_rank()[1]
        spec = leader.job.spec
        maps = [(n, np.full(s, 16.0, np.float32)) for n, s in zip(spec.names, spec.sizes, strict=True)]

        async def post_start(body: bytes, server: ServerNode = follower) -> tuple[int, str, str]:
            raw = (await client.post(f"{cluster.url_of(server)}/startFLJob", content=body)).content
            answer = decode_start_fl_job_response(raw)
            return answer.retcode, answer.reason, answer.next_req_time

        def update_body(
            device: DeviceIdentity,
            ts: int,
            *,
            iteration: int = 1,
            signer: DeviceIdentity | None = None,
            signature: bytes | None = None,
        ) -> bytes:
            signed = update_model_signed_data(str(ts), iteration)
            return encode_update_model_request(
                fl_name=FL_NAME,
                fl_id=device.fl_id,
                iteration=iteration,
                feature_maps=maps,
                timestamp=str(ts),
                signature=(signer or device).sign(signed) if signature is None else signature,
            )

        async def post_update(body: bytes, server: ServerNode = follower) -> tuple[int, str, str]:
            raw = (await client.post(f"{cluster.url_of(server)}/updateModel", content=body)).content
            answer = decode_update_model_response(raw)
            return answer.retcode, answer.reason, answer.next_req_time

        async def refused(
            post: Callable[..., object], body: bytes, retcode: int, why: str, server: ServerNode = follower
        ) -> None:
            before = state(cluster)
            code, reason, next_req_time = await post(body, server)  # type: ignore[misc]
            assert (code, why in reason) == (retcode, True), (code, reason)
            if code == ResponseCode.OutOfTime:
                assert int(next_req_time) > wall_ms()  # a future time: the device restarts later
            assert state(cluster) == before  # nothing counted, no visit

        now = wall_ms()
        start = f"{REASON_START_FL_JOB_VERIFY}: "
        # startFLJob: stale, future (on either Server), signed by another key.
        await refused(post_start, start_body(a, now - WINDOW - 5_000), ResponseCode.RequestError, "ms old")
        await refused(
            post_start,
            start_body(a, now + WINDOW + 5_000),
            ResponseCode.RequestError,
            "ms in the future",
            leader,
        )
        await refused(
            post_start,
            start_body(a, now, signer=b),
            ResponseCode.RequestError,
            start + "the signature does not verify",
        )

        # A good startFLJob, then the same body again: a replay, refused at the leader.
        body = start_body(a, wall_ms())
        assert (await post_start(body))[0] == ResponseCode.SUCCEED
        await refused(post_start, body, ResponseCode.RequestError, start + "replayed request")
        await refused(post_start, body, ResponseCode.RequestError, start + "replayed request", leader)

        # updateModel: no startFLJob (no key kept), unsigned, signed by another key, stale, future.
        ts = wall_ms()
        await refused(
            post_update, update_body(c, ts), ResponseCode.OutOfTime, reason_signature_timeout(c.fl_id)
        )
        await refused(
            post_update, update_body(a, ts, signature=b""), ResponseCode.RequestError, "signature absent"
        )
        await refused(
            post_update,
            update_body(a, ts, signer=b),
            ResponseCode.RequestError,
            reason_signature_failed(a.fl_id),
        )
        await refused(
            post_update, update_body(a, ts - WINDOW - 5_000), ResponseCode.OutOfTime, "ms old", leader
        )
        await refused(
            post_update, update_body(a, ts + WINDOW + 5_000), ResponseCode.OutOfTime, "ms in the future"
        )

        # A good update, counted; the same body again is a replay (on either Server).
        body = update_body(a, wall_ms())
        assert (await post_update(body))[0] == ResponseCode.SUCCEED
        await refused(post_update, body, ResponseCode.RequestError, "replayed request")
        await refused(post_update, body, ResponseCode.RequestError, "replayed request", leader)
        counts, _ = state(cluster)
        assert (counts.start_fl_job, counts.update_model) == (1, 1)


async def test_the_simulator_runs_with_pki_verify(tmp_path: Path) -> None:
    pki = shared()
    job = partial(pki_job, tmp_path / "trust", 3, 2)
    async with open_cluster(2, job) as cluster:
        config = SimulatorConfig(
            servers=tuple(cluster.urls),
            num_devices=3,
            mode="synthetic",
            iterations=2,
            use_elb=True,
            progress=False,
            identities=(pki.devices[2], pki.devices[3], pki.ec_device),
        )
        with trio.fail_after(120):
            report = await simulate(config)
    assert [s.completed for s in report.iterations] == [3, 3]
    assert {r.fl_id for r in report.device_reports[0]} == {
        pki.devices[2].fl_id,
        pki.devices[3].fl_id,
        pki.ec_device.fl_id,
    }
