"""What the scaling and operator integration tests share: the guide's scale-out start, waits, the checks.

The cluster itself is :class:`recovery.cluster.DrillCluster` (the guide's scripts as real processes) and
the devices are :class:`recovery.fleet.Fleet`; this module adds what a test does around them:

- :func:`start_scale_nodes`: the guide's scale-out start (``--node_id=scale_node --server_num=N
  --local_server_num=K``) through ``run_mobile_server.py``;
- :func:`release_scaled_in`: the scaled-in Servers' end as the guide has it (they say they stay up until
  SIGTERM; the devices move on; ``kill -15``);
- :func:`start_cluster`, :func:`fleet_of`, :func:`run_fleet`: a cluster up and serving, its devices, and
  their run beside a test's scenario;
- :func:`wait_ready`, :func:`initial_model`, :func:`thread` (a blocking call from a trio scenario);
- :func:`check_training`: every iteration completed and every live Server's model of every iteration is
  FedAvg over exactly the acknowledged updates (:func:`recovery.checks.check_models`), a Server that
  joined in a scale-out agreeing with the others from the scaling barrier on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
import trio

from recovery.checks import (
    Finding,
    acknowledged_updates,
    check_device_log,
    check_models,
    compare_model,
    read_metrics,
)
from recovery.cluster import FL_NAME, DrillCluster, Node
from recovery.devicelog import DeviceLog, read_log
from recovery.fleet import Fleet, fetch_model
from recovery.harness import free_port_block, wait_for_log_line, wait_gone

__all__ = [
    "SEED",
    "assert_exited_on_sigterm",
    "barrier_iteration",
    "check_training",
    "curl",
    "fleet_of",
    "initial_model",
    "release_scaled_in",
    "run_fleet",
    "start_cluster",
    "start_scale_nodes",
    "thread",
    "wait_ready",
]

#: The seed of the tests' drill devices (their uploads are recomputed from it by the checks).
SEED = 5


def curl(*args: str) -> dict[str, object]:
    """Run ``curl`` as the guide does; the JSON body of its answer."""
    done = subprocess.run(["curl", "-s", *args], capture_output=True, text=True, timeout=60, check=True)
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


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
    """Wait until ``/state`` is ``CLUSTER_READY`` (fails with ``/state`` and ``/nodes`` if not)."""
    waited = cluster.wait_state("CLUSTER_READY", timeout)
    assert waited is not None, f"/state is {cluster.state()!r}, /nodes {cluster.ranks()}"


async def thread(fn: object, *args: object) -> object:
    """Run the blocking ``fn(*args)`` in a worker thread (from a trio scenario)."""
    return await trio.to_thread.run_sync(fn, *args)  # type: ignore[arg-type]


async def release_scaled_in(
    cluster: DrillCluster, fleet: Fleet, chosen: list[str], *, settle: float = 1.0
) -> list[Node]:
    """End the scaled-in Servers ``chosen`` as the guide does; the processes, SIGTERMed.

    Each must log that it stays up until SIGTERM (serving nothing); the fleet stops choosing it; after
    ``settle`` seconds (devices that held its URL move on, told the safemode text) each gets
    ``kill -15 $PID``. The nodes leave ``cluster.servers``.
    """
    removed = [cluster.servers.pop(node_id) for node_id in chosen]
    for node in removed:
        await thread(lambda n=node: wait_for_log_line(n.log, "it stays up until it gets SIGTERM", timeout=30))
        fleet.drop_server(node.url)
    await trio.sleep(settle)
    for node in removed:
        os.kill(node.pid, signal.SIGTERM)
    return removed


def assert_exited_on_sigterm(removed: list[Node]) -> None:
    """The scaled-in Servers ended on their SIGTERM, saying so, with no traceback."""
    assert wait_gone([n.pid for n in removed], timeout=30) == []
    for node in removed:
        text = node.log.read_text()
        assert "got SIGTERM (scaled in); exiting" in text
        assert "Traceback" not in text


def start_cluster(cluster: DrillCluster) -> DrillCluster:
    """Start ``cluster`` (the guide's scripts) and wait until it is ready and every Server serves."""
    cluster.start()
    wait_ready(cluster)
    for node in cluster.servers.values():
        cluster.wait_started(node)
    return cluster


def fleet_of(
    cluster: DrillCluster, devices: int, iterations: int, log: DeviceLog, *, seed: int = SEED
) -> Fleet:
    """``devices`` drill devices on every Server of ``cluster``, for ``iterations``, logging to ``log``."""
    return Fleet(
        [n.url for n in cluster.servers.values()],
        devices=devices,
        seed=seed,
        fl_name=FL_NAME,
        fl_iteration_num=iterations,
        log=log,
    )


def run_fleet(fleet: Fleet, scenario: object = None, limit: float = 300) -> None:
    """Run ``fleet`` to its end beside ``scenario`` (an async function, optional), at most ``limit`` s."""

    async def main() -> None:
        with trio.fail_after(limit):
            async with trio.open_nursery() as nursery:
                if scenario is not None:
                    nursery.start_soon(scenario)  # type: ignore[arg-type]
                await fleet.run()

    trio.run(main)


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


def served_models(urls: dict[str, str], iterations: int) -> dict[str, dict[int, object]]:
    """Label → iteration ``0 .. iterations`` → the model that Server serves (getModel; ``None``: none)."""

    async def served() -> dict[str, dict[int, object]]:
        out: dict[str, dict[int, object]] = {}
        async with httpx.AsyncClient(timeout=10) as client:
            for label, url in urls.items():
                out[label] = {
                    k: await fetch_model(client, url, FL_NAME, k, tries=5) for k in range(iterations + 1)
                }
        return out

    return trio.run(served)


def check_training(
    cluster: DrillCluster,
    fleet: Fleet,
    log_path: Path,
    initial: object,
    iterations: int,
    joined: set[str],
    *,
    min_live: int = 3,
) -> None:
    """Every iteration completed; the live Servers' models are FedAvg of the acknowledged updates.

    A Server that joined in a scale-out holds the models from the one before the barrier on (for an older
    iteration it serves its latest, as any Server without that model): its models from then on must equal
    the others'. The others are checked against FedAvg from iteration 0. At least ``min_live`` of the
    Servers in ``cluster.servers`` must still be up.
    """
    entries = read_log(log_path)
    acks = acknowledged_updates(entries)
    outcomes = read_metrics(cluster.metrics_path)
    assert {k: v for k, v in outcomes.items()} == {k: [True] for k in range(1, iterations + 1)}, outcomes
    live = {n.node_id: n.url for n in cluster.servers.values() if wait_gone([n.pid], timeout=0)}  # still up
    assert len(live) >= min_live, live
    models = served_models(live, iterations)
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
    """The model of iteration 0, from the first Server."""

    async def get() -> object:
        async with httpx.AsyncClient(timeout=10) as client:
            return await fetch_model(client, next(iter(cluster.servers.values())).url, FL_NAME, 0)

    model = trio.run(get)
    assert model is not None
    return model
