"""Round windows on trio's autojump_clock: the leader driver and a Server's rounds, no sockets.

A threshold not reached in time fails the iteration at exactly the window; the model carries over;
the next iteration works and aggregates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import trio
import trio.testing

from flcluster.config import ClusterConfig, FLContext, StorageConfig
from flcluster.core.iteration import IterationMachine, Phase
from flcluster.runtime.driver import EpochClock, Leader, LocalLeaderChannel
from flcluster.runtime.rounds import LeaderLine, RoundService
from flcluster.settings import job_settings, leader_options
from flcluster.wire.client_codec import (
    decode_get_model_response,
    decode_start_fl_job_response,
    decode_update_model_response,
    encode_get_model_request,
    encode_start_fl_job_request,
    encode_update_model_request,
)
from flcluster.wire.codes import ResponseCode
from tests.helpers import FL_NAME, lenet_context, lenet_job


async def attached(
    line: LeaderLine, leader: Leader, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Route the rounds' counting calls to ``leader`` until cancelled (as the Server's role scope does)."""
    with line.attach(LocalLeaderChannel(leader)):
        task_status.started()
        await trio.sleep_forever()


def start(fl_id: str, size: int) -> bytes:
    return encode_start_fl_job_request(
        fl_name=FL_NAME, fl_id=fl_id, iteration=0, data_size=size, timestamp="t"
    )


def update(fl_id: str, iteration: int, maps: list[tuple[str, np.ndarray]]) -> bytes:  # type: ignore[type-arg]
    return encode_update_model_request(
        fl_name=FL_NAME, fl_id=fl_id, iteration=iteration, feature_maps=maps, timestamp="t"
    )


async def test_missed_threshold_fails_at_exactly_the_window_and_the_next_iteration_works(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    job = lenet_job(2, 5, start=10_000, update=20_000)
    line = LeaderLine()
    rounds = RoundService(spec=job.spec, initial=job.initial, plan=job.plan, device=job.device, line=line)
    clock = EpochClock()
    metrics = tmp_path / "metrics.json"
    ctx = lenet_context(2, 5, start=10_000, update=20_000).evolve(
        instance_name="test", checkpoint_dir=str(tmp_path / "ckpt")
    )
    options = leader_options(
        ctx, ClusterConfig(metrics=StorageConfig(storage_type=1, storage_file_path=str(metrics)))
    )
    leader = Leader(
        IterationMachine(job.iteration),
        rounds,
        clock,
        self_id="0",
        members=lambda: [(0, "0")],
        options=options,
    )
    initial = {name: t.numpy().copy() for name, t in job.initial.items()}
    async with trio.open_nursery() as nursery:
        await nursery.start(leader.run)
        await nursery.start(attached, line, leader)

        # Iteration 1: one device of the two needed joins; the startFLJob window (10 s) runs out.
        t0 = trio.current_time()
        answer = decode_start_fl_job_response(await rounds.start_fl_job(start("a", 10)))
        assert answer.retcode == ResponseCode.SUCCEED and answer.iteration == 1
        assert int(answer.next_req_time) > clock.now_ms()
        await trio.sleep_until(t0 + 10.0 - 0.001)
        assert leader.machine.current_iteration == 1 and leader.failed == ()
        await trio.sleep_until(t0 + 10.0)
        await trio.testing.wait_all_tasks_blocked()
        assert leader.failed == (1,)
        assert leader.machine.current_iteration == 2 and leader.machine.phase is Phase.WAITING
        # The model carries over: the failed iteration's model is the initial one.
        got = decode_get_model_response(
            await rounds.get_model(encode_get_model_request(fl_name=FL_NAME, iteration=1, timestamp="t"))
        )
        assert got.retcode == ResponseCode.SUCCEED and got.iteration == 2
        for m in got.feature_maps:
            np.testing.assert_array_equal(np.asarray(m.data), initial[m.name].reshape(-1))
        # An update for the failed iteration is refused and changes nothing.
        maps = [(n, np.full(s, 1.0, np.float32)) for n, s in zip(job.spec.names, job.spec.sizes, strict=True)]
        late = decode_update_model_response(await rounds.update_model(update("a", 1, maps)))
        assert late.retcode == ResponseCode.OutOfTime

        # Iteration 2: both devices join and upload; the model is their FedAvg.
        for fl_id, size in (("a", 10), ("b", 30)):
            ok = decode_start_fl_job_response(await rounds.start_fl_job(start(fl_id, size)))
            assert ok.retcode == ResponseCode.SUCCEED and ok.iteration == 2
        value = {"a": 1.0, "b": 3.0}
        for fl_id, size in (("a", 10), ("b", 30)):
            maps = [
                (n, np.full(s, value[fl_id] * size, np.float32))
                for n, s in zip(job.spec.names, job.spec.sizes, strict=True)
            ]
            done = decode_update_model_response(await rounds.update_model(update(fl_id, 2, maps)))
            assert done.retcode == ResponseCode.SUCCEED, done.reason
        # FedAvg is finalised in a worker thread; let real time pass before virtual time jumps.
        autojump_clock.autojump_threshold = 0.2
        with trio.fail_after(60):
            assert await leader.wait_ended(2)
        got = decode_get_model_response(
            await rounds.get_model(encode_get_model_request(fl_name=FL_NAME, iteration=2, timestamp="t"))
        )
        assert got.retcode == ResponseCode.SUCCEED and got.iteration == 3
        for m in got.feature_maps:
            np.testing.assert_allclose(np.asarray(m.data), (1.0 * 10 + 3.0 * 30) / 40, rtol=1e-6)
        nursery.cancel_scope.cancel()
    # One checkpoint for the completed iteration (none for the failed one), a plain state dict.
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [f"{FL_NAME}_iteration_2.ckpt"]
    saved = torch.load(tmp_path / "ckpt" / f"{FL_NAME}_iteration_2.ckpt", weights_only=True)
    np.testing.assert_allclose(saved["fc3.bias"].numpy(), (1.0 * 10 + 3.0 * 30) / 40, rtol=1e-6)
    # A Server started on that directory takes the checkpoint as its initial model.
    ctx = FLContext(fl_name=FL_NAME, checkpoint_dir=str(tmp_path / "ckpt"))
    restarted = job_settings(ctx)
    np.testing.assert_array_equal(
        restarted.initial["fc3.bias"].numpy(), saved["fc3.bias"].numpy().reshape(-1)
    )
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(m["currentIteration"], m["iterationResult"]) for m in lines] == [(1, "fail"), (2, "success")]
    assert lines[0]["clientVisitedInfo"]["startFLJobAcceptClientNum"] == 1
    assert lines[0]["iterationExecutionTime"] == 10_000
    visits = lines[1]["clientVisitedInfo"]
    assert (visits["startFLJobAcceptClientNum"], visits["updateModelAcceptClientNum"]) == (2, 2)
    # Both uploads came within a minute of their startFLJob: the first participation level.
    assert (visits["participationTimeLevel1"], visits["participationTimeLevel2"]) == (2, 0)
    assert visits["getModelTotalClientNum"] == 1  # the getModel of the failed iteration's model
    assert lines[1]["instanceName"] == "test" and lines[1]["flName"] == FL_NAME


async def test_update_window_expiring_fails_the_iteration(autojump_clock: trio.testing.MockClock) -> None:
    job = lenet_job(2, 5, start=10_000, update=20_000)
    line = LeaderLine()
    rounds = RoundService(spec=job.spec, initial=job.initial, plan=job.plan, device=job.device, line=line)
    leader = Leader(
        IterationMachine(job.iteration),
        rounds,
        EpochClock(),
        self_id="0",
        members=lambda: [(0, "0")],
        options=job.leader,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(leader.run)
        await nursery.start(attached, line, leader)
        for fl_id in ("a", "b"):
            await rounds.start_fl_job(start(fl_id, 5))
        t_closed = trio.current_time()  # the startFLJob round closed: the updateModel window is armed now
        maps = [(n, np.full(s, 5.0, np.float32)) for n, s in zip(job.spec.names, job.spec.sizes, strict=True)]
        await rounds.update_model(update("a", 1, maps))
        await trio.sleep_until(t_closed + 20.0 - 0.001)
        assert leader.failed == ()
        await trio.sleep_until(t_closed + 20.0)
        await trio.testing.wait_all_tasks_blocked()
        assert leader.failed == (1,) and leader.machine.current_iteration == 2
        nursery.cancel_scope.cancel()
