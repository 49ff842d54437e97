"""Exactness: a 4-Server cluster, 12 synthetic devices on random Servers, 3 iterations.

Every iteration's model must equal FedAvg computed here, independently, from exactly the updates the
cluster acknowledged (SUCCEED), to float32 rounding. The cluster runs in one trio process over real
loopback sockets (Scheduler, 4 Servers, device HTTP); the devices speak the FlatBuffers protocol.
"""

from __future__ import annotations

import random
from typing import Any

import httpx
import numpy as np
import trio

from flcluster.wire.client_codec import (
    decode_get_model_response,
    decode_start_fl_job_response,
    decode_update_model_response,
    encode_get_model_request,
    encode_start_fl_job_request,
    encode_update_model_request,
)
from flcluster.wire.codes import ResponseCode
from tests.helpers import FL_NAME, lenet_job, open_cluster


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
    async with open_cluster(4, lambda: lenet_job(12, 3)) as running, httpx.AsyncClient(timeout=30) as client:
        urls = running.urls
        for iteration in (1, 2, 3):
            sizes: dict[str, int] = {}
            for fl_id in devices:
                sizes[fl_id] = rng.randint(1, 100)
                body = encode_start_fl_job_request(
                    fl_name=FL_NAME, fl_id=fl_id, iteration=iteration, data_size=sizes[fl_id], timestamp="t"
                )
                answer = decode_start_fl_job_response(
                    await post(client, f"{rng.choice(urls)}/startFLJob", body)
                )
                assert answer.retcode == ResponseCode.SUCCEED, answer.reason
                assert answer.iteration == iteration
                got = {m.name: np.asarray(m.data) for m in answer.feature_maps}
                for name in spec.names:
                    np.testing.assert_array_equal(got[name], model[name].reshape(-1))
            acknowledged: dict[str, dict[str, np.ndarray[Any, Any]]] = {}
            async with trio.open_nursery() as nursery:

                async def upload(
                    fl_id: str,
                    maps: dict[str, np.ndarray[Any, Any]],
                    iteration: int = iteration,
                    acknowledged: dict[str, dict[str, np.ndarray[Any, Any]]] = acknowledged,
                ) -> None:
                    body = encode_update_model_request(
                        fl_name=FL_NAME,
                        fl_id=fl_id,
                        iteration=iteration,
                        feature_maps=list(maps.items()),
                        timestamp="t",
                    )
                    answer = decode_update_model_response(
                        await post(client, f"{rng.choice(urls)}/updateModel", body)
                    )
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
            leader = running.by_rank()[0].leader
            assert leader is not None
            with trio.fail_after(10):
                # The iteration ends only once every Server has installed its model (no polling).
                assert await leader.wait_ended(iteration), f"iteration {iteration} failed"
            body = encode_get_model_request(fl_name=FL_NAME, iteration=iteration, timestamp="t")
            answer = decode_get_model_response(await post(client, f"{rng.choice(urls)}/getModel", body))
            assert answer.retcode == ResponseCode.SUCCEED, answer.reason
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
