"""The guide's "Auto Scaling" commands on real processes while devices train (spec/cluster-protocol.md §8).

4 Servers started with the guide's ``run_mobile_server.py`` command; 30 drill devices
(:class:`recovery.fleet.Fleet`, every answer logged) train; ``curl /scaleout`` as the guide writes it, then
the guide's ``--node_id=scale_node ... --server_num=6 --local_server_num=2`` start; ``curl /nodes``, ``curl
/scalein`` with the node ids of ranks 2 and 3 (the guide's choice), ``kill -15`` of the two. Checked: the
cluster is ``CLUSTER_READY`` after each scaling, every iteration completes, every Server's model of every
iteration is FedAvg over exactly the acknowledged updates (:func:`recovery.checks.check_models`), no device
stopped before ``fl_iteration_num``, the scaled-in Servers exit on SIGTERM with no traceback.

The times from ``/scaleout`` and ``/scalein`` to ``CLUSTER_READY`` are printed (``pytest -s``); the scale-out
figure includes starting the two new processes (Python and torch imports), as an operator would see it.

A second test SIGKILLs an old Server (a follower; the leader) between ``/scaleout`` and ``CLUSTER_READY`` and
restarts it with its node id (the guide's recovery): the scale-out still completes and training goes on.
A third SIGKILLs the Scheduler in ``CLUSTER_SCALE_OUT``: restarted, it has rolled the scaling back (nothing
of a scaling is committed), the old Servers keep their ranks, the joiner is refused and exits, and training
goes on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from recovery.cluster import ClusterOptions, DrillCluster, Node
from recovery.devicelog import DeviceLog
from recovery.harness import wait_gone
from tests.integration.cluster_tools import (
    assert_exited_on_sigterm,
    check_training,
    curl,
    fleet_of,
    initial_model,
    release_scaled_in,
    run_fleet,
    start_cluster,
    start_scale_nodes,
    thread,
    wait_ready,
)

pytestmark = pytest.mark.integration


def curl_scaleout(manage_port: int, k: int) -> dict[str, object]:
    body = f'{{\n"worker_num":0,\n"server_num":{k}\n}}'
    return curl(
        "-X",
        "POST",
        "-H",
        "Content-Type:application/json",
        "-d",
        body,
        f"http://127.0.0.1:{manage_port}/scaleout",
    )


def test_the_guides_scaling_commands_while_30_devices_train(tmp_path: Path) -> None:
    iterations = 6
    options = ClusterOptions(
        server_num=4, devices=30, fl_iteration_num=iterations, launch="guide", window_ms=60_000
    )
    cluster = DrillCluster(tmp_path, options)
    figures: dict[str, float] = {}
    try:
        start_cluster(cluster)
        initial = initial_model(cluster)
        log_path = tmp_path / "devices.jsonl"
        device_log = DeviceLog(log_path)
        fleet = fleet_of(cluster, options.devices, iterations, device_log)
        removed: list[Node] = []

        async def scenario() -> None:
            # Scale out in the middle of iteration 2.
            await fleet.wait_acked(2, 10)
            began = time.monotonic()
            answer = await thread(curl_scaleout, cluster.manage_port, 2)
            assert answer == {"code": "0", "message": "Cluster begin to scale out."}, answer
            new = await thread(start_scale_nodes, cluster, 6, 2)
            await thread(wait_ready, cluster)
            figures["scaleout"] = time.monotonic() - began
            for node in new:  # type: ignore[attr-defined]
                await thread(cluster.wait_started, node)
                fleet.urls.append(node.url)
            ranks = cluster.ranks()
            assert sorted(ranks.values(), key=int) == [str(r) for r in range(6)], ranks
            assert {"scale_node0", "scale_node1"} <= set(ranks)

            # Scale in ranks 2 and 3 in the middle of iteration 4, as the guide: /nodes, then /scalein.
            await fleet.wait_acked(4, 10)
            nodes = await thread(curl, "-X", "GET", f"http://127.0.0.1:{cluster.manage_port}/nodes")
            rows = nodes["nodeIds"]  # type: ignore[index]
            chosen = sorted(r["nodeId"] for r in rows if r["role"] == "SERVER" and r["rankId"] in ("2", "3"))
            began = time.monotonic()
            answer = await thread(
                curl,
                "-X",
                "POST",
                "-H",
                "Content-Type:application/json",
                "-d",
                json.dumps({"node_ids": chosen}),
                f"http://127.0.0.1:{cluster.manage_port}/scalein",
            )
            assert answer == {"code": "0", "message": "Cluster begin to scale in."}, answer
            await thread(wait_ready, cluster)
            figures["scalein"] = time.monotonic() - began
            ranks = cluster.ranks()
            assert sorted(ranks.values(), key=int) == [str(r) for r in range(4)], ranks
            assert not set(chosen) & set(ranks)
            removed.extend(await release_scaled_in(cluster, fleet, chosen, settle=2.0))  # kill -15 $PID

        try:
            run_fleet(fleet, scenario, limit=900)
        finally:
            device_log.close()
        assert_exited_on_sigterm(removed)
        assert set(fleet.done.values()) <= {"finished", f"ran to iteration {iterations}"}, fleet.done
        wait_ready(cluster, 10)
        check_training(cluster, fleet, log_path, initial, iterations, {"scale_node0", "scale_node1"})
        print(
            f"\nscaling figures: /scaleout (+2 Servers, their processes started by the guide's command) to "
            f"CLUSTER_READY {figures['scaleout']:.2f} s; /scalein (-2 Servers) to CLUSTER_READY "
            f"{figures['scalein']:.2f} s; 30 devices, LeNet, 2-core host"
        )
    finally:
        cluster.cleanup()


@pytest.mark.parametrize("rank", [2, 0], ids=["a follower", "the leader"])
def test_a_server_killed_during_scale_out_and_restarted_does_not_wedge_the_cluster(
    tmp_path: Path, rank: int
) -> None:
    iterations = 4
    options = ClusterOptions(server_num=3, devices=8, fl_iteration_num=iterations, window_ms=60_000)
    cluster = DrillCluster(tmp_path, options)
    try:
        start_cluster(cluster)
        initial = initial_model(cluster)
        log_path = tmp_path / "devices.jsonl"
        device_log = DeviceLog(log_path)
        fleet = fleet_of(cluster, options.devices, iterations, device_log)

        async def scenario() -> None:
            await fleet.wait_acked(2, 3)
            answer = await thread(curl_scaleout, cluster.manage_port, 1)
            assert answer == {"code": "0", "message": "Cluster begin to scale out."}, answer
            victim = cluster.node_of_rank(rank)
            await thread(cluster.kill, victim)  # SIGKILL between /scaleout and CLUSTER_READY
            fleet.drop_server(victim.url)
            assert cluster.state() == "CLUSTER_SCALE_OUT"
            back, _took = await thread(lambda: cluster.restart_server(victim.node_id))
            fleet.urls.append(back.url)  # type: ignore[attr-defined]
            (new,) = await thread(start_scale_nodes, cluster, 4, 1)  # type: ignore[misc]
            await thread(wait_ready, cluster)
            await thread(cluster.wait_started, new)
            fleet.urls.append(new.url)
            assert sorted(cluster.ranks().values(), key=int) == ["0", "1", "2", "3"]

        try:
            run_fleet(fleet, scenario, limit=600)
        finally:
            device_log.close()
        wait_ready(cluster, 10)
        check_training(cluster, fleet, log_path, initial, iterations, {"scale_node"})
    finally:
        cluster.cleanup()


def test_the_scheduler_killed_during_scale_out_rolls_the_scaling_back(tmp_path: Path) -> None:
    """spec/cluster-protocol.md §8: restarted, the Scheduler has rolled back; the joiner is refused."""
    iterations = 4
    options = ClusterOptions(server_num=3, devices=8, fl_iteration_num=iterations, window_ms=60_000)
    cluster = DrillCluster(tmp_path, options)
    try:
        start_cluster(cluster)
        before = cluster.ranks()
        initial = initial_model(cluster)
        log_path = tmp_path / "devices.jsonl"
        device_log = DeviceLog(log_path)
        fleet = fleet_of(cluster, options.devices, iterations, device_log)
        joiners: list[Node] = []

        async def scenario() -> None:
            await fleet.wait_acked(2, 3)
            answer = await thread(curl_scaleout, cluster.manage_port, 1)
            assert answer == {"code": "0", "message": "Cluster begin to scale out."}, answer
            assert cluster.scheduler is not None
            await thread(cluster.kill, cluster.scheduler)  # SIGKILL in CLUSTER_SCALE_OUT
            # The guide's scale-out start, while the Scheduler is down: it registers once it is back.
            joiners.extend(await thread(start_scale_nodes, cluster, 4, 1))  # type: ignore[arg-type]
            took = await thread(cluster.restart_scheduler)
            assert took is not None, f"/state is {cluster.state()!r}"
            (joiner,) = joiners
            # Started for the rolled-back total, it is refused and exits with the reason.
            assert await thread(lambda: wait_gone([joiner.pid], timeout=120)) == []
            del cluster.servers[joiner.node_id]
            assert "but the Scheduler expects server_num=3" in joiner.log.read_text()

        try:
            run_fleet(fleet, scenario, limit=600)
        finally:
            device_log.close()
        wait_ready(cluster, 10)
        assert cluster.ranks() == before  # the old Servers kept their ranks; nobody joined
        assert set(fleet.done.values()) <= {"finished", f"ran to iteration {iterations}"}, fleet.done
        check_training(cluster, fleet, log_path, initial, iterations, set())
    finally:
        cluster.cleanup()
