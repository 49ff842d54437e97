"""PW_ENCRYPT and STABLE_PW_ENCRYPT end to end in process (spec/secure-aggregation.md §R6, §3).

A Scheduler and two Servers run in this trio process over loopback; devices of the SDK go through every cipher
round, spread over both Servers (so followers forward to the leader). The test keeps each device's update in
the clear (its trainer's output), sees which uploads were acknowledged, and checks that the published model
equals plain FedAvg over exactly those devices within the stated bound (flcluster.secure.bound), on every
Server; and that what the Servers received is masked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import trio

from flcluster.client.device import Device, DevicePolicy, IterationOutcome, TrainingTask, TrainResult
from flcluster.secure.bound import model_error_bound
from flcluster.settings import job_settings
from flcluster.wire.client_codec import decode_update_model_response
from flcluster.wire.codes import ResponseCode, ServerText
from flcluster.wire.server_codec import decode_update_model
from tests.helpers import FL_NAME, lenet_context, open_cluster

Model = dict[str, np.ndarray[Any, Any]]
TEXTS = {t.value.encode() for t in ServerText}
POLICY = DevicePolicy(wait_interval=0.05, max_wait_tries=2000)
STEP_TIMEOUT = 180


class Uploads:
    """The acknowledged updateModel bodies, decoded (an httpx response hook)."""

    def __init__(self) -> None:
        self.seen: dict[str, Model] = {}

    async def hook(self, response: httpx.Response) -> None:
        if not response.request.url.path.endswith("/updateModel"):
            return
        await response.aread()
        if response.content in TEXTS:
            return  # a plain-text answer (safemode while the Servers re-link): not acknowledged
        if decode_update_model_response(response.content).retcode != ResponseCode.SUCCEED:
            return
        req = decode_update_model(response.request.content)
        self.seen[req.fl_id] = {fm.name: np.array(fm.data) for fm in req.feature_maps}


class Trainers:
    """Seeded 'training'; keeps every device's update in the clear (weights × data size)."""

    def __init__(self) -> None:
        self.clear: dict[str, Model] = {}

    def of(self, index: int, fl_id: str) -> Any:
        async def train(task: TrainingTask) -> TrainResult:
            rng = np.random.default_rng([index, task.iteration])
            weights = {
                n: np.asarray(v) + rng.standard_normal(v.size).astype(np.float32) * np.float32(0.01)
                for n, v in task.model.items()
            }
            upload = {n: w * np.float32(task.data_size) for n, w in weights.items()}
            self.clear[fl_id] = upload
            return TrainResult(feature_maps=upload, weights=weights, loss=0.5)

        return train


async def published(urls: list[str], client: httpx.AsyncClient, iteration: int) -> Model:
    models = []
    for url in urls:
        reader = Device("reader", [url], fl_name=FL_NAME, client=client, policy=POLICY)
        answer = await reader.fetch_model(iteration)
        assert answer.iteration == iteration + 1
        models.append({fm.name: np.array(fm.data) for fm in answer.feature_maps})
    for other in models[1:]:
        for name, value in models[0].items():
            np.testing.assert_array_equal(other[name], value)
    return models[0]


def assert_within_bound(model: Model, clear: list[Model], sizes: list[int], m: int) -> None:
    """``model`` is plain FedAvg of ``clear`` within secure.bound's model bound (spec §3)."""
    total = sum(sizes)
    for name in model:
        terms = [c[name].astype(np.float32) for c in clear]
        plain = (sum(t.astype(np.float64) for t in terms) / total).astype(np.float32)
        abs_sum = sum(np.abs(t.astype(np.float64)) for t in terms)
        bound = model_error_bound(abs_sum, np.abs(plain.astype(np.float64)), total, len(clear), m)
        error = np.abs(model[name].astype(np.float64) - plain.astype(np.float64))
        assert np.all(error <= bound), (name, float(np.max(error - bound)))


def pw_context(devices: int, **kw: Any) -> Any:
    return lenet_context(devices, 1, start=60_000, update=60_000).evolve(encrypt_type="PW_ENCRYPT", **kw)


async def run(
    devices: list[Device], trainers: Trainers, sizes: list[int], drops: dict[str, str]
) -> list[Any]:
    reports: list[Any] = []

    async def one(i: int) -> None:
        d = devices[i]
        reports.append(
            await d.run_iteration(trainers.of(i, d.fl_id), data_size=sizes[i], drop_after=drops.get(d.fl_id))
        )

    with trio.fail_after(STEP_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for i in range(len(devices)):
                nursery.start_soon(one, i)
    return reports


async def test_pw_encrypt_with_drop_outs_publishes_fedavg_of_the_uploads_within_the_bound() -> None:
    # 6 devices; u = ceil(6 × 0.8) = 5; r = 0.8: exchangeKeys 5, getKeys 5, shareSecrets 5, getSecrets 5,
    # getClientList max(4, t + 1) = 4, reconstructSecrets t + 1 = 3 (spec §R2).
    ctx = pw_context(
        6, update_model_ratio=0.8, share_secrets_ratio=0.8, reconstruct_secrets_threshold=2,
        cipher_time_window=60_000,
    )  # fmt: skip
    uploads, trainers = Uploads(), Trainers()
    sizes = [3, 5, 8, 13, 21, 34]
    drops = {"pw-0": "shareSecrets", "pw-1": "updateModel"}
    async with (
        open_cluster(2, lambda: job_settings(ctx)) as cluster,
        httpx.AsyncClient(timeout=60, event_hooks={"response": [uploads.hook]}) as client,
    ):
        urls = cluster.urls
        devices = [
            Device(f"pw-{i}", urls, fl_name=FL_NAME, client=client, policy=POLICY, use_elb=True, seed=i)
            for i in range(6)
        ]
        reports = await run(devices, trainers, sizes, drops)
        by_id = {r.fl_id: r for r in reports}
        assert all(by_id[f].outcome is IterationOutcome.FAILED for f in drops)
        assert all(r.outcome is IterationOutcome.COMPLETED for r in reports if r.fl_id not in drops), [
            r.reason for r in reports
        ]
        uploaded = sorted(uploads.seen)
        assert uploaded == [f"pw-{i}" for i in range(1, 6)]
        model = await published(urls, client, 1)
        # Masked: no upload the Servers received is the device's update.
        for fl_id in uploaded:
            for name, value in uploads.seen[fl_id].items():
                assert np.mean(np.abs(value - trainers.clear[fl_id][name])) > 0.05, (fl_id, name)
        index = {f"pw-{i}": i for i in range(6)}
        assert_within_bound(
            model, [trainers.clear[f] for f in uploaded], [sizes[index[f]] for f in uploaded], m=6
        )


async def test_stable_pw_encrypt_publishes_fedavg_within_the_bound() -> None:
    ctx = lenet_context(4, 1).evolve(
        encrypt_type="STABLE_PW_ENCRYPT", share_secrets_ratio=1.0, cipher_time_window=60_000
    )
    uploads, trainers = Uploads(), Trainers()
    sizes = [2, 7, 11, 19]
    async with (
        open_cluster(2, lambda: job_settings(ctx)) as cluster,
        httpx.AsyncClient(timeout=60, event_hooks={"response": [uploads.hook]}) as client,
    ):
        devices = [
            Device(
                f"st-{i}",
                cluster.urls[i % 2 :] + cluster.urls[: i % 2],
                fl_name=FL_NAME,
                client=client,
                policy=POLICY,
            )
            for i in range(4)
        ]
        reports = await run(devices, trainers, sizes, {})
        assert all(r.outcome is IterationOutcome.COMPLETED for r in reports), [r.reason for r in reports]
        model = await published(cluster.urls, client, 1)
        for i in range(4):
            for name, value in uploads.seen[f"st-{i}"].items():
                assert np.mean(np.abs(value - trainers.clear[f"st-{i}"][name])) > 0.05
        assert_within_bound(model, [trainers.clear[f"st-{i}"] for i in range(4)], sizes, m=4)


async def _simulated(ctx: Any, devices: int, **options: Any) -> tuple[Any, Model, list[str]]:
    from flcluster.client.simulator import SimulatorConfig, simulate

    async with open_cluster(2, lambda: job_settings(ctx)) as cluster, httpx.AsyncClient(timeout=60) as client:
        config = SimulatorConfig(
            servers=tuple(cluster.urls), num_devices=devices, mode="synthetic", iterations=1, seed=7,
            progress=False, policy=POLICY, fl_name=FL_NAME, **options,
        )  # fmt: skip
        with trio.fail_after(STEP_TIMEOUT):
            report = await simulate(config)
        return report, await published(cluster.urls, client, 1), list(cluster.urls)


def _synthetic(model: Model, indices: list[int]) -> list[Model]:
    from flcluster.client.simulator import synthetic_update

    sizes = {name: int(value.size) for name, value in model.items()}
    return [synthetic_update(sizes, data_size=32, seed=(7, i, 1)) for i in indices]


async def test_the_simulator_runs_stable_pw_encrypt() -> None:
    ctx = lenet_context(4, 1).evolve(encrypt_type="STABLE_PW_ENCRYPT", cipher_time_window=60_000)
    report, model, _ = await _simulated(ctx, 4)
    assert report.iterations[0].completed == 4
    assert_within_bound(model, _synthetic(model, [0, 1, 2, 3]), [32] * 4, m=4)


async def test_the_simulator_runs_pw_encrypt_with_drop_outs() -> None:
    ctx = pw_context(
        6, update_model_ratio=0.8, share_secrets_ratio=0.8, reconstruct_secrets_threshold=2,
        cipher_time_window=60_000,
    )  # fmt: skip
    report, model, _ = await _simulated(ctx, 6, drop_after_share_secrets=1, drop_after_update_model=1)
    summary = report.iterations[0]
    assert (summary.completed, summary.failed) == (4, 2)
    assert_within_bound(model, _synthetic(model, [1, 2, 3, 4, 5]), [32] * 5, m=6)


async def test_the_leader_restarted_from_its_store_in_the_cipher_rounds_finishes_the_iteration(
    tmp_path: Path,
) -> None:
    # The devices are held before their upload (U1 and U2 frozen, the shares fetched) while the leader is
    # killed and started again on its store: it resumes the cipher rounds (spec §R6, "Recovery").
    from flcluster.runtime.scheduler import SchedulerNode
    from tests.helpers import loopback_scheduler
    from tests.unit.test_server_recovery import Cluster

    ctx = lenet_context(3, 5, update=30_000).evolve(
        encrypt_type="PW_ENCRYPT", reconstruct_secrets_threshold=1, cipher_time_window=60_000
    )
    held, restarted = trio.Event(), trio.Event()
    trainers, uploads = Trainers(), Uploads()

    waiting: set[str] = set()

    async def hold(request: httpx.Request) -> None:
        if request.url.path.endswith("/updateModel") and not restarted.is_set():
            waiting.add(decode_update_model(request.content).fl_id)
            if len(waiting) == 3:
                held.set()  # every device is past getSecrets: no request is in flight
            await restarted.wait()

    hooks = {"request": [hold], "response": [uploads.hook]}
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=60, event_hooks=hooks) as client:
        addrs = await nursery.start(SchedulerNode(loopback_scheduler(2)).serve)
        c = Cluster(nursery, tmp_path, addrs.port)
        for node_id in ("0", "1"):
            await c.start(node_id, job_settings(ctx))
        for node in list(c.nodes.values()):
            with trio.fail_after(20):
                await node.wait_started()
        leader_id = next(i for i, n in c.nodes.items() if n.rank == 0)
        urls = [c.url("0"), c.url("1")]
        devices = [
            Device(f"r-{i}", urls[i % 2 :] + urls[: i % 2], fl_name=FL_NAME, client=client, policy=POLICY)
            for i in range(3)
        ]
        reports: list[Any] = []

        async def one(i: int) -> None:
            d = devices[i]
            reports.append(await d.run_iteration(trainers.of(i, d.fl_id), data_size=4 + i))

        with trio.fail_after(STEP_TIMEOUT):
            async with trio.open_nursery() as run:
                for i in range(3):
                    run.start_soon(one, i)
                await held.wait()
                before = c.nodes[leader_id].leader
                assert before is not None
                lists = before.machine.cipher_state()
                assert lists is not None and lists.u2_closed and len(lists.u2) == 3
                c.scopes[leader_id].cancel()
                await trio.sleep(0.2)
                back = await c.start(leader_id, job_settings(ctx))
                await back.wait_started()
                assert back.leader is not None
                assert back.leader.machine.cipher_state() == lists
                restarted.set()
        assert all(r.outcome is IterationOutcome.COMPLETED for r in reports), [r.reason for r in reports]
        leader = c.nodes[leader_id].leader
        assert leader is not None and leader.machine.completed == (1,)
        model = c.nodes[leader_id].rounds.store.get(1)
        assert model is not None
        published_model = {n: model[n].numpy() for n in c.nodes[leader_id].rounds.spec.names}
        assert sorted(uploads.seen) == ["r-0", "r-1", "r-2"]
        assert_within_bound(published_model, [trainers.clear[f"r-{i}"] for i in range(3)], [4, 5, 6], m=3)
        nursery.cancel_scope.cancel()
