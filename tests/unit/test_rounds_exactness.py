"""Exactness: a 4-Server cluster, 12 synthetic devices on random Servers, 3 iterations.

Every iteration's model must equal FedAvg computed here, independently, from exactly the updates the
cluster acknowledged (SUCCEED), to float32 rounding. The cluster runs in one trio process over real
loopback sockets (Scheduler, 4 Servers, device HTTP); the devices speak the FlatBuffers protocol.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
import trio

from flcluster.aggregation import ModelSpec, ModelWeights
from flcluster.client.lenet import make_lenet
from flcluster.core.iteration import IterationConfig
from flcluster.runtime.scheduler import SchedulerNode, SchedulerSettings
from flcluster.runtime.server import JobSettings, ServerNode, ServerSettings
from flcluster.wire.device import (
    FLPlanParams,
    ResponseCode,
    decode_get_model_response,
    decode_start_fl_job_response,
    decode_update_model_response,
    encode_get_model_request,
    encode_start_fl_job_request,
    encode_update_model_request,
)
from tests.helpers import free_ports

FL_NAME = "Lenet"


def lenet_job(threshold: int, iterations: int, **windows: int) -> JobSettings:
    module = make_lenet(seed=0)
    spec = ModelSpec.from_module(module)
    return JobSettings(
        spec=spec,
        initial=ModelWeights.from_state_dict(module.state_dict(), spec),
        iteration=IterationConfig(
            start_fl_job_threshold=threshold,
            update_model_ratio=1.0,
            start_fl_job_time_window=windows.get("start", 60_000),
            update_model_time_window=windows.get("update", 60_000),
            global_iteration_time_window=windows.get("global", 600_000),
            fl_iteration_num=iterations,
        ),
        plan=FLPlanParams(fl_name=FL_NAME, iterations=iterations),
    )


@asynccontextmanager
async def cluster(server_num: int, job: Callable[[], JobSettings]) -> AsyncIterator[list[str]]:
    """A Scheduler and ``server_num`` Servers in this process; yields the Servers' base URLs."""
    ports = free_ports(server_num)
    scheduler = SchedulerNode(SchedulerSettings(node_id="20", server_num=server_num, port=0, manage_port=0))
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(scheduler.serve)
        servers = [
            ServerNode(
                ServerSettings(
                    node_id=str(i),
                    server_num=server_num,
                    fl_iteration_num=job().iteration.fl_iteration_num,
                    scheduler_port=addrs.port,
                    device_port=ports[i],
                    device_host="127.0.0.1",
                    connect_interval=0.05,
                ),
                job(),
            )
            for i in range(server_num)
        ]
        for server in servers:
            nursery.start_soon(server.serve)
        for server in servers:
            await server.wait_started()
        yield [f"http://127.0.0.1:{p}" for p in ports]
        nursery.cancel_scope.cancel()


async def post(client: httpx.AsyncClient, url: str, body: bytes) -> bytes:
    response = await client.post(url, content=body)
    assert response.status_code == 200, response.text
    return response.content


async def test_every_iteration_is_fedavg_of_the_acknowledged_updates() -> None:
    rng = random.Random(7)
    np_rng = np.random.default_rng(7)
    devices = [f"device-{i}" for i in range(12)]
    spec = lenet_job(12, 3).spec
    model = {name: t.numpy().copy() for name, t in lenet_job(12, 3).initial.items()}
    async with cluster(4, lambda: lenet_job(12, 3)) as urls, httpx.AsyncClient(timeout=30) as client:
        for iteration in (1, 2, 3):
            sizes: dict[str, int] = {}
            for fl_id in devices:
                sizes[fl_id] = rng.randint(1, 100)
                body = encode_start_fl_job_request(
                    fl_name=FL_NAME, fl_id=fl_id, iteration=iteration, data_size=sizes[fl_id], timestamp="t"
                )
                answer = decode_start_fl_job_response(await post(client, f"{rng.choice(urls)}/startFLJob", body))
                assert answer.retcode == ResponseCode.SUCCEED, answer.reason
                assert answer.iteration == iteration
                got = {m.name: np.asarray(m.data) for m in answer.feature_maps}
                for name in spec.names:
                    np.testing.assert_array_equal(got[name], model[name].reshape(-1))
            acknowledged: dict[str, dict[str, np.ndarray[Any, Any]]] = {}
            async with trio.open_nursery() as nursery:

                async def upload(fl_id: str, maps: dict[str, np.ndarray[Any, Any]]) -> None:
                    body = encode_update_model_request(
                        fl_name=FL_NAME, fl_id=fl_id, iteration=iteration, feature_maps=list(maps.items()), timestamp="t"
                    )
                    answer = decode_update_model_response(await post(client, f"{rng.choice(urls)}/updateModel", body))
                    if answer.retcode == ResponseCode.SUCCEED:
                        acknowledged[fl_id] = maps

                for fl_id in devices:
                    maps = {
                        name: (np_rng.standard_normal(size).astype(np.float32) * sizes[fl_id])
                        for name, size in zip(spec.names, spec.sizes, strict=True)
                    }
                    nursery.start_soon(upload, fl_id, maps)
            assert set(acknowledged) == set(devices)
            total = sum(sizes[f] for f in acknowledged)
            expected = {
                name: (sum(acknowledged[f][name].astype(np.float64) for f in sorted(acknowledged)) / total)
                for name in spec.names
            }
            with trio.fail_after(10):
                while True:
                    body = encode_get_model_request(fl_name=FL_NAME, iteration=iteration, timestamp="t")
                    raw = await post(client, f"{rng.choice(urls)}/getModel", body)
                    if raw.startswith(b"The cluster is in safemode"):
                        await trio.sleep(0.02)
                        continue
                    answer = decode_get_model_response(raw)
                    if answer.retcode == ResponseCode.SUCCEED:
                        break
                    assert answer.retcode == ResponseCode.SucNotReady
                    await trio.sleep(0.02)
            assert answer.iteration == iteration + 1
            got = {m.name: np.asarray(m.data) for m in answer.feature_maps}
            for name in spec.names:
                np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5)
            model = {name: got[name].copy() for name in spec.names}
            # Every Server holds the same new model.
            for url in urls:
                body = encode_get_model_request(fl_name=FL_NAME, iteration=iteration, timestamp="t")
                other = decode_get_model_response(await post(client, f"{url}/getModel", body))
                for m in other.feature_maps:
                    np.testing.assert_array_equal(np.asarray(m.data), got[m.name])
