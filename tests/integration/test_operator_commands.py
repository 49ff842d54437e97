"""``flcluster scale`` and ``flcluster instance`` run as an operator runs them, against real processes.

A cluster without recovery (a new instance is refused with it, spec/management-api.md) is started with the
guide's scripts (:class:`recovery.cluster.DrillCluster`); drill devices (:class:`recovery.fleet.Fleet`,
every answer logged) train against it; each command is ``python -m flcluster ...`` with the management
port flags, its exit status, stdout and stderr checked.

- **scale**: ``scale --servers 3`` on 2 Servers posts ``/scaleout`` with the increment and tells the
  operator to start the new Server with ``--server_num=3``; started as the guide shows
  (``--node_id=scale_node``), it joins at rank 2 and the cluster is ``CLUSTER_READY``. ``scale --servers
  1`` posts ``/scalein`` with the node ids of ranks 1 and 2 from ``/nodes`` (never rank 0); the two
  leave, log that they were scaled in, and exit cleanly on SIGTERM. Every iteration completes and every
  model is FedAvg over exactly the acknowledged updates (:func:`tests.integration.cluster_tools.
  check_training`). Refused, with a clear message, a non-zero exit and nothing changed: ``--servers 0``
  and ``-1``, and a scaling while one runs.
- **instance**: ``query`` prints the values in force; ``disable`` while devices train tells them the job
  is disabled (they stop) and ``query`` shows it; ``enable`` resumes training at the iteration after the
  last one that ended; ``new`` with a new ``fl_iteration_num`` and ``start_fl_job_threshold`` starts again
  at iteration 1 from the latest model, ``query`` shows the new values, and the new instance runs to its
  end. The models of both instances are checked against FedAvg. Refused, nothing changed: ``new`` in
  iteration 1, with a value its rule refuses, an unknown key, a value that is not a number, a second
  ``disable``, an ``enable`` of a running instance, ``query`` with ``KEY=VALUE`` pairs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
import pytest
import trio

from flcluster.wire.client_codec import decode_get_model_response, encode_get_model_request
from flcluster.wire.codes import ServerText
from recovery.checks import acknowledged_updates, check_device_log, check_models, read_metrics
from recovery.cluster import FL_NAME, ClusterOptions, DrillCluster, Node
from recovery.devicelog import TEXT, DeviceLog, read_log
from recovery.harness import REPO
from tests.integration.cluster_tools import (
    SEED,
    assert_exited_on_sigterm,
    check_training,
    fleet_of,
    initial_model,
    release_scaled_in,
    run_fleet,
    served_models,
    start_cluster,
    start_scale_nodes,
    thread,
    wait_ready,
)

pytestmark = pytest.mark.integration


def flcluster(cluster: DrillCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m flcluster <args> --scheduler_manage_host 127.0.0.1 --scheduler_manage_port P``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FLCLUSTER_MANAGE_TOKEN", None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "flcluster",
            *args,
            "--scheduler_manage_host",
            "127.0.0.1",
            "--scheduler_manage_port",
            str(cluster.manage_port),
        ],
        cwd=cluster.workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


async def flcluster_in_thread(cluster: DrillCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """:func:`flcluster` from a trio scenario (in a worker thread)."""
    return await trio.to_thread.run_sync(lambda: flcluster(cluster, *args))


def answer_of(done: subprocess.CompletedProcess[str]) -> dict[str, object]:
    """The JSON answer an instance command printed (its whole stdout)."""
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


def scale_output(done: subprocess.CompletedProcess[str]) -> tuple[str, dict[str, object], str]:
    """What ``flcluster scale`` printed: its request line, the Scheduler's answer, the next step."""
    lines = done.stdout.splitlines()
    assert len(lines) >= 3 and lines[0].startswith("flcluster: POST "), done.stdout
    assert lines[-1].startswith("flcluster: "), done.stdout
    return lines[0], json.loads("\n".join(lines[1:-1])), lines[-1]


def refused(done: subprocess.CompletedProcess[str], stderr: str, code: int = 1) -> None:
    """The command failed with exit status ``code`` and ``stderr`` as its last stderr line."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert done.stderr.splitlines()[-1] == stderr, done.stderr


def current_iteration(url: str) -> int:
    """The iteration a Server is in: getModel of an iteration far ahead answers with it (reads nothing)."""
    body = encode_get_model_request(fl_name=FL_NAME, iteration=1_000_000, timestamp="0")
    response = httpx.post(
        f"{url}/getModel", content=body, headers={"Content-Type": "application/octet-stream"}, timeout=10
    )
    return decode_get_model_response(response.content).iteration


def wait_iteration(cluster: DrillCluster, want: int, timeout: float = 10) -> None:
    """Wait until every Server says it is in iteration ``want``."""
    deadline = time.monotonic() + timeout
    while True:
        seen = {n.node_id: current_iteration(n.url) for n in cluster.servers.values()}
        if set(seen.values()) == {want}:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"the Servers are in iterations {seen}, want {want}")
        time.sleep(0.1)


def wait_metrics(
    cluster: DrillCluster, last: int, *, skip: int = 0, timeout: float = 10
) -> dict[int, list[bool]]:
    """The leader's metrics.json (after ``skip`` lines), once it has a line for iteration ``last``."""
    deadline = time.monotonic() + timeout
    while True:
        outcomes = read_metrics(cluster.metrics_path, skip=skip)
        if last in outcomes or time.monotonic() >= deadline:
            return outcomes
        time.sleep(0.1)


def test_flcluster_scale_out_and_in_while_devices_train(tmp_path: Path) -> None:
    iterations = 6
    options = ClusterOptions(
        server_num=2, devices=4, fl_iteration_num=iterations, recovery=False, launch="guide", window_ms=30_000
    )
    cluster = start_cluster(DrillCluster(tmp_path, options))
    try:
        initial = initial_model(cluster)
        before = cluster.ranks()
        leader = next(node_id for node_id, rank in before.items() if rank == "0")

        # Bad use: refused before the Scheduler is asked; nothing changes.
        for flag in (["--servers", "0"], ["--servers", "-1"], ["--servers=-3"]):
            done = flcluster(cluster, "scale", *flag)
            wanted = flag[-1].removeprefix("--servers=")
            refused(done, f"flcluster: --servers={wanted}: a cluster needs at least 1 Server")
            assert done.stdout == ""
        done = flcluster(cluster, "scale", "--servers", "2")
        assert done.returncode == 0, done.stderr
        assert done.stdout == "flcluster: the cluster already has 2 Servers; nothing to do\n"
        assert cluster.ranks() == before and cluster.state() == "CLUSTER_READY"

        log_path = tmp_path / "devices.jsonl"
        device_log = DeviceLog(log_path)
        fleet = fleet_of(cluster, options.devices, iterations, device_log)
        removed: list[Node] = []

        async def scenario() -> None:
            # Scale out to 3 in the middle of iteration 2.
            await fleet.wait_acked(2, 2)
            done = await flcluster_in_thread(cluster, "scale", "--servers", "3")
            assert done.returncode == 0, done
            request, answer, step = scale_output(done)
            assert request == 'flcluster: POST /scaleout {"worker_num": 0, "server_num": 1}'
            assert answer == {"code": "0", "message": "Cluster begin to scale out."}
            assert "waits for 1 new Server: start them with --server_num=3" in step, step
            assert "--node_id=scale_node --server_num=3 --local_server_num=1" in step, step
            assert cluster.state() == "CLUSTER_SCALE_OUT"  # waiting for the new Server
            # A second scaling while this one runs is refused, and changes nothing.
            done = await flcluster_in_thread(cluster, "scale", "--servers", "4")
            refused(done, "flcluster: /scaleout was refused (HTTP 400): The cluster is not ready.")
            assert cluster.state() == "CLUSTER_SCALE_OUT"
            # What the command said: the new Server with the new total, as the guide's scale_node.
            (new,) = await trio.to_thread.run_sync(start_scale_nodes, cluster, 3, 1)
            await thread(wait_ready, cluster)
            await thread(cluster.wait_started, new)
            fleet.urls.append(new.url)
            ranks = cluster.ranks()
            assert ranks == {**before, "scale_node": "2"}, ranks

            # Scale in to 1 in the middle of iteration 4: the node ids of ranks 1 and 2 from /nodes.
            await fleet.wait_acked(4, 2)
            chosen = [node_id for node_id, rank in sorted(ranks.items(), key=lambda kv: int(kv[1]))][1:]
            done = await flcluster_in_thread(cluster, "scale", "--servers", "1")
            assert done.returncode == 0, done
            request, answer, step = scale_output(done)
            assert request == f"flcluster: POST /scalein {json.dumps({'node_ids': chosen})}"
            assert answer == {"code": "0", "message": "Cluster begin to scale in."}
            assert f"Servers {', '.join(chosen)} leave the cluster" in step, step
            await thread(wait_ready, cluster)
            assert cluster.ranks() == {leader: "0"}
            removed.extend(await release_scaled_in(cluster, fleet, chosen))

        try:
            run_fleet(fleet, scenario)
        finally:
            device_log.close()
        assert_exited_on_sigterm(removed)
        assert set(fleet.done.values()) <= {"finished", f"ran to iteration {iterations}"}, fleet.done
        assert cluster.state() == "CLUSTER_READY"
        check_training(cluster, fleet, log_path, initial, iterations, set(), min_live=1)
    finally:
        cluster.cleanup()


def test_flcluster_instance_query_disable_enable_new(tmp_path: Path) -> None:
    job = 20
    options = ClusterOptions(
        server_num=2, devices=4, fl_iteration_num=job, recovery=False, launch="guide", window_ms=30_000
    )
    cluster = start_cluster(DrillCluster(tmp_path, options))
    try:
        initial = initial_model(cluster)
        values = {
            "client_batch_size": 32,
            "client_epoch_num": 25,
            "client_learning_rate": 0.001,
            "fl_iteration_num": job,
            "global_iteration_time_window": 3 * options.window_ms,
            "start_fl_job_threshold": options.devices,
            "start_fl_job_time_window": options.window_ms,
            "update_model_ratio": 1.0,
            "update_model_time_window": options.window_ms,
        }

        def query(state: str, shown: Mapping[str, object]) -> None:
            done = flcluster(cluster, "instance", "query")
            assert done.returncode == 0, done.stderr
            assert answer_of(done) == {
                "code": "0",
                "message": "Query Instance successful.",
                "result": {**shown, "instance_state": state},
            }

        query("running", values)
        refused(
            flcluster(cluster, "instance", "query", "fl_iteration_num=3"),
            "flcluster: instance query takes no KEY=VALUE pairs",
            code=2,
        )
        done = flcluster(cluster, "instance", "new", "fl_iteration_num=3")
        refused(
            done,
            "flcluster: /newInstance was refused (HTTP 200): Start new instance failed. This is just the "
            "first iteration, do not need to new instance.",
        )
        assert answer_of(done)["result"] is False

        # Disable while 4 devices train: they are told, and stop.
        log_path = tmp_path / "devices.jsonl"
        device_log = DeviceLog(log_path)
        fleet = fleet_of(cluster, options.devices, job, device_log)

        async def disable() -> None:
            await fleet.wait_acked(3, 2)
            done = await flcluster_in_thread(cluster, "instance", "disable")
            assert done.returncode == 0, done
            assert answer_of(done) == {
                "code": "0",
                "message": "start disabling FL-Server successful.",
                "result": True,
            }

        run_fleet(fleet, disable)
        assert set(fleet.done.values()) == {"finished"}, fleet.done
        told = [e for e in read_log(log_path) if e.retcode == TEXT]
        assert {e.reason for e in told} == {ServerText.DISABLED_OR_FINISHED.value}, told
        assert {e.fl_id for e in told} == set(fleet.done)
        assert cluster.state() == "CLUSTER_DISABLE_FLS"
        query("disable", values)
        refused(
            flcluster(cluster, "instance", "disable"),
            "flcluster: /disableFLS was refused (HTTP 400): The cluster state is already in "
            "CLUSTER_DISABLE_FLS.",
        )

        # Enable: training resumes where it stopped.
        done = flcluster(cluster, "instance", "enable")
        assert done.returncode == 0, done.stderr
        assert answer_of(done) == {
            "code": "0",
            "message": "start enabling FL-Server successful.",
            "result": True,
        }
        assert cluster.state() == "CLUSTER_READY"
        refused(
            flcluster(cluster, "instance", "enable"),
            "flcluster: /enableFLS was refused (HTTP 400): The cluster state is not CLUSTER_DISABLE_FLS, "
            "does not need to enable fls.",
        )
        query("running", values)
        ended = read_metrics(cluster.metrics_path)
        resume = max(ended) + 1
        assert resume >= 3, ended
        wait_iteration(cluster, resume)
        fleet = fleet_of(cluster, options.devices, resume + 1, device_log)
        try:
            run_fleet(fleet)
        finally:
            device_log.close()
        assert set(fleet.done.values()) == {f"ran to iteration {resume + 1}"}, fleet.done
        last = resume + 1
        entries = read_log(log_path)
        acks = acknowledged_updates(entries)
        assert {k: len(acks[k]) for k in (resume, last)} == {resume: 4, last: 4}, acks.keys()
        outcomes = wait_metrics(cluster, last)
        assert sorted(outcomes) == list(range(1, last + 1)), outcomes
        # Disabling fails the iteration it lands in, if one was running (the previous model carries over).
        failed = [k for k, v in outcomes.items() if v != [True]]
        assert len(failed) <= 1 and resume not in failed and last not in failed, outcomes
        urls = {n.node_id: n.url for n in cluster.servers.values()}
        models = served_models(urls, last)
        findings = check_device_log(entries, last)
        findings += check_models(
            fl_iteration_num=last,
            initial=initial,  # type: ignore[arg-type]
            served=models,  # type: ignore[arg-type]
            acks=acks,
            outcomes=outcomes,
            seed=SEED,
        )
        assert not [f for f in findings if not f.ok], [f for f in findings if not f.ok]

        # A new instance with a bad value, an unknown key or no number: refused, nothing changes.
        for pair, reason in (
            ("start_fl_job_threshold=0", "start_fl_job_threshold=0 is refused"),
            ("no_such_key=1", "unknown keys ['no_such_key']"),
        ):
            done = flcluster(cluster, "instance", "new", pair)
            assert done.returncode == 1, done
            assert done.stderr.startswith(
                "flcluster: /newInstance was refused (HTTP 200): Start new instance failed. "
            ), done.stderr
            assert reason in done.stderr, done.stderr
            assert answer_of(done)["result"] is False
        refused(
            flcluster(cluster, "instance", "new", "fl_iteration_num=ten"),
            "flcluster: 'fl_iteration_num=ten': a new instance takes key=number pairs (finite numbers), "
            "e.g. fl_iteration_num=20",
        )
        query("running", values)
        wait_iteration(cluster, last + 1, timeout=0)

        # A new instance: iteration 1 again, from the latest model, with the new values.
        lines_before = len(cluster.metrics_path.read_text().splitlines())
        done = flcluster(cluster, "instance", "new", "fl_iteration_num=2", "start_fl_job_threshold=3")
        assert done.returncode == 0, done.stderr
        assert answer_of(done) == {"code": "0", "message": "Start new instance successful.", "result": True}
        assert cluster.state() == "CLUSTER_READY"
        renewed = {**values, "fl_iteration_num": 2, "start_fl_job_threshold": 3}
        query("running", renewed)
        wait_iteration(cluster, 1)
        new_log = tmp_path / "devices-new.jsonl"
        device_log = DeviceLog(new_log)
        fleet = fleet_of(cluster, 3, 2, device_log)
        try:
            run_fleet(fleet)
        finally:
            device_log.close()
        assert set(fleet.done.values()) == {"ran to iteration 2"}, fleet.done
        entries = read_log(new_log)
        acks = acknowledged_updates(entries)
        assert {k: len(v) for k, v in acks.items()} == {1: 3, 2: 3}
        outcomes = wait_metrics(cluster, 2, skip=lines_before)
        assert outcomes == {1: [True], 2: [True]}, outcomes
        new_models = served_models(urls, 2)
        findings = check_device_log(entries, 2)
        findings += check_models(
            fl_iteration_num=2,
            initial=models[next(iter(models))][last],  # type: ignore[arg-type]
            served=new_models,  # type: ignore[arg-type]
            acks=acks,
            outcomes=outcomes,
            seed=SEED,
        )
        assert not [f for f in findings if not f.ok], [f for f in findings if not f.ok]
        query("finish", renewed)
    finally:
        cluster.cleanup()
