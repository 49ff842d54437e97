"""DP_ENCRYPT and SIGNDS end to end (spec/privacy.md): in-process clusters, devices of the SDK, the simulator.

Each cluster runs in this trio process over real loopback sockets. The test sees every upload the devices
send (an httpx response hook decodes the acknowledged ``/updateModel`` bodies) and computes, independently of
the cluster, FedAvg over them: for DP over the noised uploads as sent, for SignDS over the dense updates it
rebuilds itself from each upload's sign and indices and the previous model. The published model must equal it
on every Server.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import numpy as np
import pytest
import trio

from flcluster.client.device import Device, DevicePolicy, IterationOutcome, TrainingTask, TrainResult
from flcluster.client.dp import INITIAL_CLIP, analytic_gaussian_sigma, update_norm
from flcluster.client.simulator import SimulatorConfig, simulate
from flcluster.settings import job_settings
from flcluster.wire.client_codec import (
    decode_start_fl_job_response,
    decode_update_model_response,
    encode_start_fl_job_request,
    encode_update_model_request,
)
from flcluster.wire.codes import ResponseCode
from flcluster.wire.server_codec import decode_update_model
from tests.helpers import FL_NAME, lenet_context, open_cluster

Model = dict[str, np.ndarray[Any, Any]]
POLICY = DevicePolicy(wait_interval=0.05)
#: Bound on one iteration of devices (a loaded 2-core machine included); a hang fails the test.
STEP_TIMEOUT = 120


class Uploads:
    """The acknowledged updateModel bodies, decoded (an httpx response hook)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def hook(self, response: httpx.Response) -> None:
        if not response.request.url.path.endswith("/updateModel"):
            return
        await response.aread()
        answer = decode_update_model_response(response.content)
        if answer.retcode != ResponseCode.SUCCEED:
            return
        req = decode_update_model(response.request.content)
        self.seen.append(
            {
                "iteration": req.iteration,
                "fl_id": req.fl_id,
                "maps": {fm.name: np.array(fm.data) for fm in req.feature_maps},
                "sign": req.sign,
                "index_array": np.array(req.index_array),
            }
        )

    def of(self, iteration: int) -> list[dict[str, Any]]:
        return sorted((u for u in self.seen if u["iteration"] == iteration), key=lambda u: u["fl_id"])


def stepping_trainer(index: int, scale: float) -> Callable[[TrainingTask], Awaitable[TrainResult]]:
    """A trainer whose 'training' moves every weight by a seeded Gaussian step of the given scale."""

    async def train(task: TrainingTask) -> TrainResult:
        rng = np.random.default_rng([index, task.iteration])
        weights = {
            name: (np.asarray(value) + rng.standard_normal(value.size).astype(np.float32) * np.float32(scale))
            for name, value in task.model.items()
        }
        upload = {name: w * np.float32(task.data_size) for name, w in weights.items()}
        return TrainResult(feature_maps=upload, weights=weights, loss=0.5)

    return train


async def published(urls: list[str], client: httpx.AsyncClient, iteration: int) -> Model:
    """The model of ``iteration`` as every Server serves it (all must hold the same bits)."""
    models = []
    for url in urls:
        answer = await Device("reader", [url], fl_name=FL_NAME, client=client, policy=POLICY).fetch_model(
            iteration
        )
        models.append({fm.name: np.array(fm.data) for fm in answer.feature_maps})
    for other in models[1:]:
        for name, value in models[0].items():
            np.testing.assert_array_equal(other[name], value)
    return models[0]


async def run_devices(devices: list[Device], trainers: list[Any], sizes: list[int]) -> None:
    reports = []

    async def one(i: int) -> None:
        reports.append(await devices[i].run_iteration(trainers[i], data_size=sizes[i]))

    with trio.fail_after(STEP_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for i in range(len(devices)):
                nursery.start_soon(one, i)
    assert all(r.outcome is IterationOutcome.COMPLETED for r in reports), [r.reason for r in reports]


def assert_fedavg(model: np.ndarray[Any, Any], terms: list[np.ndarray[Any, Any]], total: int) -> None:
    """``model`` is ``sum(terms) / total`` up to the float32 rounding of summing the terms (in any order)."""
    expected = sum(t.astype(np.float64) for t in terms) / total
    scale = sum(np.abs(t.astype(np.float64)) for t in terms) / total
    error = np.abs(model.astype(np.float64) - expected)
    bound = 4 * len(terms) * 2.0**-24 * scale + 2.0**-24 * np.abs(expected)
    assert np.all(error <= bound), float(np.max(error - bound))
    assert model.dtype == np.float32


def rotated(urls: list[str], i: int) -> list[str]:
    return urls[i % len(urls) :] + urls[: i % len(urls)]


# ------------------------------------------------------------------------------------------------ DP


async def test_dp_cluster_publishes_fedavg_of_the_noised_uploads() -> None:
    eps, delta, factor = 1.0, 1e-5, 0.5
    ctx = lenet_context(4, 2).evolve(
        encrypt_type="DP_ENCRYPT", dp_eps=eps, dp_delta=delta, dp_norm_clip=factor
    )
    uploads = Uploads()
    sizes = [5, 11, 17, 23]
    async with (
        open_cluster(2, lambda: job_settings(ctx)) as cluster,
        httpx.AsyncClient(timeout=30, event_hooks={"response": [uploads.hook]}) as client,
    ):
        devices = [
            Device(
                f"dp-{i}",
                rotated(cluster.urls, i),
                fl_name=FL_NAME,
                client=client,
                policy=POLICY,
                noise_seed=i,
            )
            for i in range(4)
        ]
        trainers = [stepping_trainer(i, 0.01) for i in range(4)]
        plan = job_settings(ctx).plan
        previous = {name: t.numpy().copy() for name, t in job_settings(ctx).initial.items()}
        for iteration in (1, 2):
            clips = [d.privacy.clip for d in devices]
            if iteration == 1:
                assert clips == [INITIAL_CLIP] * 4
            await run_devices(devices, trainers, sizes)
            got = uploads.of(iteration)
            assert [u["fl_id"] for u in got] == [f"dp-{i}" for i in range(4)]
            assert all(u["sign"] == 0 and u["index_array"].size == 0 for u in got)
            model = await published(cluster.urls, client, iteration)
            for name in previous:
                assert_fedavg(model[name], [u["maps"][name] for u in got], sum(sizes))
            # Each upload is (before + clipped step + N(0, sigma^2)) * n with sigma for that device's clip.
            for i, u in enumerate(got):
                step = await trainers[i](TrainingTask(u["fl_id"], iteration, 1, plan, previous))
                trained = dict(step.weights or {})
                scale = min(1.0, clips[i] / update_norm(previous, trained))
                # iteration 1: the step is larger than the bound 0.05, so it was clipped; iteration 2: the
                # bound grew with the noisy global step (the original's rule), and the step fits inside it
                assert (scale < 1) == (iteration == 1)
                residual = np.concatenate(
                    [
                        u["maps"][name].astype(np.float64) / sizes[i]
                        - (previous[name] + (trained[name] - previous[name]) * scale)
                        for name in previous
                    ]
                )
                sigma = analytic_gaussian_sigma(eps, delta, clips[i])
                assert residual.std() == pytest.approx(sigma, rel=0.02)
                assert abs(residual.mean()) < 5 * sigma / math.sqrt(residual.size)
            # The clip bound adapts to how far the global model moved (spec/privacy.md §2.3).
            moved = factor * update_norm(previous, model)
            for d, before in zip(devices, clips, strict=True):
                want = moved if iteration == 1 else min(before, moved)
                assert d.privacy.clip == pytest.approx(want, rel=1e-5)
            previous = model


# -------------------------------------------------------------------------------------------- SIGNDS


def rebuilt(previous: Model, upload: dict[str, Any], data_size: int, lr: float) -> Model:
    """The dense update the original's Server rebuilds from a SignDS upload (spec/privacy.md §3.2)."""
    out: Model = {}
    start = 0
    g = np.float32(upload["sign"]) * np.float32(lr)
    for name in upload["maps"]:  # the request's order
        values = previous[name].copy()
        local = upload["index_array"][
            (upload["index_array"] >= start) & (upload["index_array"] < start + values.size)
        ]
        values[local - start] += g
        out[name] = values * np.float32(data_size)
        start += values.size
    return out


async def post(client: httpx.AsyncClient, url: str, body: bytes) -> bytes:
    response = await client.post(url, content=body)
    assert response.status_code == 200
    return response.content


async def test_signds_cluster_publishes_fedavg_of_the_rebuilt_updates() -> None:
    lr = 0.5
    ctx = lenet_context(6, 2).evolve(encrypt_type="SIGNDS", sign_global_lr=lr)
    uploads = Uploads()
    sizes = [3, 7, 12, 20, 31]
    raw_size = 8
    async with (
        open_cluster(3, lambda: job_settings(ctx)) as cluster,
        httpx.AsyncClient(timeout=30, event_hooks={"response": [uploads.hook]}) as client,
    ):
        urls = cluster.urls
        devices = [
            Device(
                f"ds-{i}",
                urls,
                fl_name=FL_NAME,
                client=client,
                policy=POLICY,
                use_elb=True,
                seed=i,
                noise_seed=100 + i,
            )
            for i in range(5)
        ]
        trainers = [stepping_trainer(i, 0.01) for i in range(5)]
        previous = {name: t.numpy().copy() for name, t in job_settings(ctx).initial.items()}
        sizes_by_id = {f"ds-{i}": n for i, n in enumerate(sizes)} | {"raw": raw_size}

        async def raw_device(iteration: int) -> None:
            """A device speaking the wire directly: bad SignDS uploads first (each refused, nothing counted),
            then, in iteration 1, a SignDS upload naming two tensors in an unusual order, in iteration 2 a
            dense one (sign 0)."""
            start = encode_start_fl_job_request(
                fl_name=FL_NAME, fl_id="raw", iteration=iteration, data_size=raw_size, timestamp="1"
            )
            while True:
                body = await post(client, f"{urls[iteration % 3]}/startFLJob", start)
                if body.startswith(b"The cluster is in safemode"):
                    await trio.sleep(0.05)
                    continue
                assert decode_start_fl_job_response(body).retcode == ResponseCode.SUCCEED
                break
            empty = np.empty(0, np.float32)

            def signds(
                names: list[str], sign: int, indices: list[int], it: int = iteration, data: Any = empty
            ) -> bytes:
                return encode_update_model_request(
                    fl_name=FL_NAME,
                    fl_id="raw",
                    iteration=it,
                    feature_maps=[(n, data) for n in names],
                    timestamp="1",
                    sign=sign,
                    index_array=indices,
                )

            bad = [
                signds(["fc3.bias"], 2, [1]),
                signds(["fc3.bias"], 1, []),
                signds(["fc3.bias"], 1, [4, 4]),
                signds(["fc3.bias"], 1, [9, 2]),
                signds(["fc3.bias"], 1, [62]),
                signds(["fc3.bias"], -1, [-3]),
                signds(["conv1.weight"], 1, list(range(101))),
                signds(["fc3.bias"], 1, [1], data=np.ones(62, np.float32)),
                signds(["no.such"], 1, [1]),
                signds(["fc3.bias", "fc3.bias"], 1, [1]),
                signds(["fc3.bias"], 0, [1]),
            ]
            for i, body in enumerate(bad):
                answer = decode_update_model_response(await post(client, f"{urls[i % 3]}/updateModel", body))
                assert answer.retcode == ResponseCode.RequestError, answer.reason
                assert answer.reason.startswith("Verify model feature map failed: ")
            stale = decode_update_model_response(
                await post(client, f"{urls[0]}/updateModel", signds(["fc3.bias"], 1, [1], it=iteration + 5))
            )
            assert stale.retcode == ResponseCode.OutOfTime
            if iteration == 1:
                # fc3.bias (62 values: 0..61) then conv1.weight (62..): index 62 is conv1.weight[0]
                good = signds(["fc3.bias", "conv1.weight"], 1, [3, 61, 62, 500])
            else:
                maps = [(n, (v + np.float32(0.125)) * np.float32(raw_size)) for n, v in previous.items()]
                good = encode_update_model_request(
                    fl_name=FL_NAME, fl_id="raw", iteration=iteration, feature_maps=maps, timestamp="1"
                )
            answer = decode_update_model_response(await post(client, f"{urls[1]}/updateModel", good))
            assert answer.retcode == ResponseCode.SUCCEED, answer.reason

        for iteration in (1, 2):
            with trio.fail_after(STEP_TIMEOUT):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(run_devices, devices, trainers, sizes)
                    nursery.start_soon(raw_device, iteration)
            got = uploads.of(iteration)
            assert [u["fl_id"] for u in got] == ["ds-0", "ds-1", "ds-2", "ds-3", "ds-4", "raw"]
            for u in got[:5]:
                assert u["sign"] in (-1, 1)
                assert list(u["maps"]) == list(previous) and all(v.size == 0 for v in u["maps"].values())
                assert u["index_array"].size == 43 and np.all(np.diff(u["index_array"]) > 0)
            updates = []
            for u in got:
                n = sizes_by_id[u["fl_id"]]
                updates.append((rebuilt(previous, u, n, lr) if u["sign"] else u["maps"], n))
            model = await published(urls, client, iteration)
            for name in previous:
                carriers = [(maps[name], n) for maps, n in updates if name in maps]
                assert_fedavg(model[name], [m for m, _ in carriers], sum(n for _, n in carriers))
            # SignDS moves only the selected coordinates (iteration 1: every upload is SignDS).
            if iteration == 1:
                moved = np.abs(model["fc3.bias"] - previous["fc3.bias"]) > 1e-4
                selected = set()
                for u in got:
                    selected |= {int(j) for j in u["index_array"] if j < 62}
                assert set(np.flatnonzero(moved).tolist()) <= selected and moved.any()
            previous = model


# -------------------------------------------------------------------------------------------- simulator


@pytest.mark.parametrize("encrypt_type", ["DP_ENCRYPT", "SIGNDS"])
async def test_the_simulator_runs_dp_and_signds(encrypt_type: str) -> None:
    ctx = lenet_context(3, 2).evolve(encrypt_type=encrypt_type)
    initial = {name: t.numpy().copy() for name, t in job_settings(ctx).initial.items()}
    async with open_cluster(2, lambda: job_settings(ctx)) as cluster:
        config = SimulatorConfig(
            servers=tuple(cluster.urls),
            num_devices=3,
            mode="synthetic",
            iterations=2,
            seed=4,
            progress=False,
            policy=POLICY,
        )
        with trio.fail_after(STEP_TIMEOUT):
            report = await simulate(config)
        assert [s.completed for s in report.iterations] == [3, 3]
        async with httpx.AsyncClient(timeout=30) as client:
            model = await published(cluster.urls, client, 2)
    assert all(np.isfinite(v).all() for v in model.values())
    # (a coordinate nobody selected may still differ in its last bit: float32 sums of w * n, divided by sum n)
    changed = sum(int(np.count_nonzero(np.abs(model[n] - initial[n]) > 1e-5)) for n in initial)
    if encrypt_type == "SIGNDS":
        # only coordinates some device selected move: at most 3 devices x 2 iterations x 43 of 66 404
        assert 0 < changed <= 3 * 2 * 43
    else:
        assert changed > 60_000  # DP noise moves every coordinate
