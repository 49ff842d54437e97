"""A new instance with recovery configured, with a real SIGKILL at each of its crash points (spec/recovery.md
§5 ``leader.new_instance``, ``follower.new_instance``; spec/cluster-protocol.md §9 "With recovery
configured").

Two Servers with recovery, started with the guide's scripts (:class:`recovery.cluster.DrillCluster`), the
target started with ``FLCLUSTER_CRASH_AT`` at the point. Drill devices (:class:`recovery.fleet.Fleet`,
every answer logged) run the first instance to its end; ``curl /newInstance`` as the original's restful
tool sends it; the target kills itself at the point and is started again with its node id (the guide's
recovery). Then a second fleet (another seed, its own log) runs the new instance: both Servers must serve
the old instance's last model as model 0 and, for every iteration of the new instance, FedAvg over exactly
the updates acknowledged in it (:func:`recovery.checks.check_models`).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from flcluster.crashpoints import ENV as CRASH_ENV
from recovery.checks import acknowledged_updates, check_device_log, check_models, read_metrics
from recovery.cluster import ClusterOptions, DrillCluster
from recovery.devicelog import DeviceLog, read_log
from recovery.fleet import Fleet
from recovery.harness import wait_gone
from tests.integration.cluster_tools import fleet_of, run_fleet, served_models, wait_ready

pytestmark = pytest.mark.integration

ITERATIONS = 2
SEED = 11


def curl_json(manage_port: int, path: str, body: str | None = None) -> dict[str, object]:
    args = [
        "curl",
        "-s",
        "-X",
        "POST" if body is not None else "GET",
        f"http://127.0.0.1:{manage_port}{path}",
    ]
    if body is not None:
        args += ["-d", body]
    done = subprocess.run(args, capture_output=True, text=True, timeout=90, check=True)
    return json.loads(done.stdout)


def run_instance(cluster: DrillCluster, log_path: Path, seed: int) -> Fleet:
    """The cluster's devices (seeded ``seed``) run one instance to its end; their log at ``log_path``."""
    with DeviceLog(log_path) as log:
        fleet = fleet_of(cluster, cluster.options.devices, ITERATIONS, log, seed=seed)
        run_fleet(fleet)
    return fleet


@pytest.mark.parametrize(("point", "target"), [("leader.new_instance", "0"), ("follower.new_instance", "1")])
def test_a_node_killed_while_a_new_instance_applies_comes_back_in_the_new_instance(
    tmp_path: Path, point: str, target: str
) -> None:
    options = ClusterOptions(server_num=2, devices=6, fl_iteration_num=ITERATIONS)
    cluster = DrillCluster(tmp_path, options)
    try:
        cluster.start({target: {CRASH_ENV: point}})
        wait_ready(cluster, 120)
        for node in cluster.servers.values():
            cluster.wait_started(node)
        first = run_instance(cluster, tmp_path / "devices-1.jsonl", SEED)
        assert set(first.done.values()) <= {"finished", f"ran to iteration {ITERATIONS}"}, first.done
        old_outcomes = read_metrics(cluster.metrics_path)
        assert old_outcomes == {k: [True] for k in range(1, ITERATIONS + 1)}, old_outcomes
        last = served_models({n.label: n.url for n in cluster.servers.values()}, ITERATIONS)
        model_0 = last[cluster.servers["0"].label][ITERATIONS]
        assert model_0 is not None

        # The job has finished: the new instance applies at once, and the target dies at its point.
        victim = cluster.servers[target]
        answer = curl_json(cluster.manage_port, "/newInstance", '{"fl_iteration_num": 2}')
        assert wait_gone([victim.pid], timeout=60) == [], f"{victim.label} did not reach {point}"
        assert f"crash point {point} reached" in victim.log.read_text()
        if target == "0":  # killed after its commit, before its answer: applied, but not answered
            assert answer == {"error_message": "The new instance is timeout.", "code": "1"}, answer
        else:  # the leader answered before it told the follower (rule 1)
            ok = {"code": "0", "message": "Start new instance successful.", "result": True}
            assert answer == ok, answer
        cluster.restart_server(target)
        assert cluster.wait_state("CLUSTER_READY", 120) is not None, cluster.state()
        query = curl_json(cluster.manage_port, "/queryInstance")
        assert query["result"]["fl_iteration_num"] == 2, query  # type: ignore[index]

        second_log = tmp_path / "devices-2.jsonl"
        second = run_instance(cluster, second_log, SEED + 1)
        assert set(second.done.values()) <= {"finished", f"ran to iteration {ITERATIONS}"}, second.done
        entries = read_log(second_log)
        outcomes = read_metrics(cluster.metrics_path, skip=ITERATIONS)  # the first instance's lines
        findings = check_device_log(entries, ITERATIONS)
        findings += check_models(
            fl_iteration_num=ITERATIONS,
            initial=model_0,
            served=served_models({n.label: n.url for n in cluster.servers.values()}, ITERATIONS),
            acks=acknowledged_updates(entries),
            outcomes=outcomes,
            seed=SEED + 1,
        )
        bad = [f for f in findings if not f.ok]
        assert not bad, bad
        assert outcomes == {k: [True] for k in range(1, ITERATIONS + 1)}, outcomes
    finally:
        cluster.cleanup()
