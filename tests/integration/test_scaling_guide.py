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
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import trio

from recovery.checks import (
    Finding,
    acknowledged_updates,
    check_device_log,
    check_models,
    compare_model,
    read_metrics,
)
from recovery.cluster import FL_NAME, ClusterOptions, DrillCluster, Node
from recovery.devicelog import DeviceLog, read_log
from recovery.fleet import Fleet, fetch_model
from recovery.harness import free_port_block, wait_for_log_line, wait_gone

pytestmark = pytest.mark.integration

SEED = 5


def curl(*args: str) -> dict[str, object]:
    """Run ``curl`` as the guide does; the JSON body of its answer."""
    done = subprocess.run(["curl", "-s", *args], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


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


def start_scale_nodes(
    cluster: DrillCluster, total: int, count: int, node_id: str = "scale_node"
) -> list[Node]:
    """The guide's scale-out start: ``--node_id=scale_node --server_num=N --local_server_num=K``."""
    port = free_port_block(count, host="127.0.0.1", low=44000, high=48000)
    args = [
        *cluster.server_flags(),
        f"--node_id={node_id}",
        f"--fl_server_port={port}",
        f"--server_num={total}",
        f"--local_server_num={count}",
    ]
    started = cluster._launch("run_mobile_server.py", args, {})
    nodes = []
    for i, (pid, log) in enumerate(started):
        ident = node_id if count == 1 else f"{node_id}{i}"
        nodes.append(Node(f"server {ident}", ident, pid, log, port + i))
        cluster.servers[ident] = nodes[-1]
    return nodes


def wait_ready(cluster: DrillCluster, timeout: float = 180) -> None:
    waited = cluster.wait_state("CLUSTER_READY", timeout)
    assert waited is not None, f"/state is {cluster.state()!r}, /nodes {cluster.ranks()}"


async def thread(fn: object, *args: object) -> object:
    return await trio.to_thread.run_sync(fn, *args)  # type: ignore[arg-type]


def barrier_iteration(cluster: DrillCluster) -> int:
    """The iteration the leader first held at (its log line ``at the scaling barrier: ...``)."""
    found = []
    for node in cluster.servers.values():
        for line in node.log.read_text().splitlines():
            if "at the scaling barrier: holding at iteration" in line:
                found.append(int(line.rsplit(" ", 1)[1]))
                break
    assert found, "no Server logged the scaling barrier"
    return min(found)


def check_training(
    cluster: DrillCluster, fleet: Fleet, log_path: Path, initial: object, iterations: int, joined: set[str]
) -> None:
    """Every iteration completed; the live Servers' models are FedAvg of the acknowledged updates.

    A Server that joined in a scale-out holds the models from the one before the barrier on (for an older
    iteration it serves its latest, as any Server without that model): its models from then on must equal
    the others'. The others are checked against FedAvg from iteration 0.
    """
    entries = read_log(log_path)
    acks = acknowledged_updates(entries)
    outcomes = read_metrics(cluster.metrics_path)
    assert {k: v for k, v in outcomes.items()} == {k: [True] for k in range(1, iterations + 1)}, outcomes
    live = {n.node_id: n.url for n in cluster.servers.values() if wait_gone([n.pid], timeout=0)}  # still up
    assert len(live) >= 3, live

    async def served() -> dict[str, dict[int, object]]:
        out: dict[str, dict[int, object]] = {}
        async with httpx.AsyncClient(timeout=10) as client:
            for node_id, url in live.items():
                out[node_id] = {
                    k: await fetch_model(client, url, FL_NAME, k, tries=5) for k in range(iterations + 1)
                }
        return out

    models = trio.run(served)
    first = barrier_iteration(cluster) - 1 if joined else 0
    old = {n: m for n, m in models.items() if n not in joined}
    findings = check_device_log(entries, iterations)
    findings += check_models(
        fl_iteration_num=iterations,
        initial=initial,  # type: ignore[arg-type]
        served=old,  # type: ignore[arg-type]
        acks=acks,
        outcomes=outcomes,
        seed=SEED,
    )
    reference = next(iter(old.values()))
    for node_id in joined & set(models):
        for k in range(first, iterations + 1):
            got, want = models[node_id][k], reference[k]
            assert got is not None and want is not None, (node_id, k)
            wrong = compare_model(got, want)  # type: ignore[arg-type]
            findings.append(Finding(f"model {k} on joiner {node_id}", wrong is None, wrong or "same"))
    bad = [f for f in findings if not f.ok]
    assert not bad, bad
    # No device gave up: each took part in every iteration (the threshold is every device).
    assert all(len(acks.get(k, ())) == fleet.devices for k in range(1, iterations + 1)), {
        k: len(v) for k, v in acks.items()
    }


def initial_model(cluster: DrillCluster) -> object:
    async def get() -> object:
        async with httpx.AsyncClient(timeout=10) as client:
            return await fetch_model(client, next(iter(cluster.servers.values())).url, FL_NAME, 0)

    model = trio.run(get)
    assert model is not None
    return model


def test_the_guides_scaling_commands_while_30_devices_train(tmp_path: Path) -> None:
    iterations = 6
    options = ClusterOptions(
        server_num=4, devices=30, fl_iteration_num=iterations, launch="guide", window_ms=60_000
    )
    cluster = DrillCluster(tmp_path, options)
    figures: dict[str, float] = {}
    try:
        cluster.start()
        wait_ready(cluster)
        for node in cluster.servers.values():
            cluster.wait_started(node)
        initial = initial_model(cluster)
        log_path = tmp_path / "devices.jsonl"
        device_log = DeviceLog(log_path)
        fleet = Fleet(
            [n.url for n in cluster.servers.values()],
            devices=options.devices,
            seed=SEED,
            fl_name=FL_NAME,
            fl_iteration_num=iterations,
            log=device_log,
        )
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
            for node_id in chosen:
                node = cluster.servers.pop(node_id)
                removed.append(node)
                # still up, serving nothing
                await thread(
                    lambda n=node: wait_for_log_line(n.log, "it stays up until it gets SIGTERM", timeout=30)
                )
                fleet.drop_server(node.url)
            await trio.sleep(2)  # devices that held a removed Server's URL move on (safemode)
            for node in removed:
                os.kill(node.pid, signal.SIGTERM)  # kill -15 $PID, as the guide says

        async def main() -> None:
            with trio.fail_after(900):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(scenario)
                    await fleet.run()

        try:
            trio.run(main)
        finally:
            device_log.close()
        assert wait_gone([n.pid for n in removed], timeout=30) == []
        for node in removed:
            text = node.log.read_text()
            assert "got SIGTERM (scaled in); exiting" in text
            assert "Traceback" not in text
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
        cluster.start()
        wait_ready(cluster)
        for node in cluster.servers.values():
            cluster.wait_started(node)
        initial = initial_model(cluster)
        log_path = tmp_path / "devices.jsonl"
        device_log = DeviceLog(log_path)
        fleet = Fleet(
            [n.url for n in cluster.servers.values()],
            devices=options.devices,
            seed=SEED,
            fl_name=FL_NAME,
            fl_iteration_num=iterations,
            log=device_log,
        )

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

        async def main() -> None:
            with trio.fail_after(600):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(scenario)
                    await fleet.run()

        try:
            trio.run(main)
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
        cluster.start()
        wait_ready(cluster)
        for node in cluster.servers.values():
            cluster.wait_started(node)
        before = cluster.ranks()
        initial = initial_model(cluster)
        log_path = tmp_path / "devices.jsonl"
        device_log = DeviceLog(log_path)
        fleet = Fleet(
            [n.url for n in cluster.servers.values()],
            devices=options.devices,
            seed=SEED,
            fl_name=FL_NAME,
            fl_iteration_num=iterations,
            log=device_log,
        )
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

        async def main() -> None:
            with trio.fail_after(600):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(scenario)
                    await fleet.run()

        try:
            trio.run(main)
        finally:
            device_log.close()
        wait_ready(cluster, 10)
        assert cluster.ranks() == before  # the old Servers kept their ranks; nobody joined
        assert set(fleet.done.values()) <= {"finished", f"ran to iteration {iterations}"}, fleet.done
        check_training(cluster, fleet, log_path, initial, iterations, set())
    finally:
        cluster.cleanup()
