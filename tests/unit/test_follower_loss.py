"""A follower lost before aggregation: its acknowledged update is unreachable, so the aggregation waits
for it while the iteration's windows are open and then fails the iteration cleanly (the model carries
over) instead of publishing FedAvg over fewer updates than were acknowledged (spec/recovery.md §5.2, §8).
"""

from __future__ import annotations

from functools import partial

import httpx
import numpy as np
import trio

from flcluster.runtime.server import ServerNode
from flcluster.wire.client_codec import (
    decode_start_fl_job_response,
    decode_update_model_response,
    encode_start_fl_job_request,
    encode_update_model_request,
)
from flcluster.wire.codes import ResponseCode
from tests.helpers import FL_NAME, lenet_job, open_cluster


async def test_an_update_held_by_a_lost_follower_fails_the_iteration(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The 3 s window runs on the virtual clock, which jumps once loopback traffic has settled.
    autojump_clock.autojump_threshold = 0.05
    job = lenet_job(2, 5, update=3000)
    cluster_job = partial(lenet_job, 2, 5, update=3000)
    async with open_cluster(2, cluster_job) as cluster, httpx.AsyncClient(timeout=30) as client:
        servers = cluster.servers
        leader, follower = sorted(servers, key=lambda s: s.rank or 0)
        url = {id(s): cluster.url_of(s) for s in servers}
        for fl_id in ("a", "b"):
            body = encode_start_fl_job_request(
                fl_name=FL_NAME, fl_id=fl_id, iteration=1, data_size=4, timestamp="t"
            )
            answer = decode_start_fl_job_response(
                (await client.post(f"{url[id(leader)]}/startFLJob", content=body)).content
            )
            assert answer.retcode == ResponseCode.SUCCEED
        maps = [(n, np.full(s, 8.0, np.float32)) for n, s in zip(job.spec.names, job.spec.sizes, strict=True)]

        async def upload(server: ServerNode, fl_id: str) -> int:
            body = encode_update_model_request(
                fl_name=FL_NAME, fl_id=fl_id, iteration=1, feature_maps=maps, timestamp="t"
            )
            raw = (await client.post(f"{url[id(server)]}/updateModel", content=body)).content
            return decode_update_model_response(raw).retcode

        assert await upload(follower, "a") == ResponseCode.SUCCEED  # folded on the follower only
        cluster.stop(servers.index(follower))  # the follower is gone with its partial sums
        assert leader.leader is not None
        with trio.fail_after(20):
            # Whether or not the leader has noticed the lost link yet, the aggregation must fail once
            # the updateModel window (3 s) closes.
            assert await upload(leader, "b") == ResponseCode.SUCCEED  # reaches the threshold
            assert not await leader.leader.wait_ended(1)  # failed, not published over one update
        assert leader.leader.machine.current_iteration == 2
        held = leader.rounds.store.get(1)
        assert held is not None
        for name in job.spec.names:
            np.testing.assert_array_equal(held[name].numpy(), job.initial[name].numpy())  # carried over
