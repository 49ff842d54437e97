"""The kill-and-restart drills of spec/recovery.md §5–§8, and the runner that plays one.

Theory of operation
-------------------
A :class:`Drill` names what it kills and how (:data:`DRILLS` is the catalogue, README.md the prose).
:func:`run_drill` plays one in a fresh work directory:

1. start a real cluster with the guide's scripts (:class:`~recovery.cluster.DrillCluster`), with the
   drill's ``FLCLUSTER_CRASH_AT`` in the environment of the one node it targets;
2. wait for ``CLUSTER_READY`` and every Server's ``Server started successfully.``; fetch model 0;
3. run the seeded device fleet (:class:`~recovery.fleet.Fleet`, every answer logged on the device side)
   and, beside it, the drill's scenario: a timed SIGKILL once half of iteration 2's updates are
   acknowledged, or waiting for the node to kill itself at its crash point; then the guide's restart
   (same node id, ``--local_server_num=1``, another port) and the time until the node serves again;
4. when the devices are done: the cluster state (``/state``), every iteration's model fetched with
   getModel from every Server against FedAvg computed from the device log
   (:func:`recovery.checks.check_models`), the device log's own rules, the devices' end;
5. ``finish_mobile.py``, then no process may be left (every pid the drill started, and anything naming
   its Scheduler port); the rest is SIGKILLed.

Every outcome is a :class:`~recovery.checks.Finding`. Anything that goes wrong on the way (a cluster that
never forms, a node that never comes back, even a fault of the drill itself) becomes a failing finding
with what was seen, never an exception out of :func:`run_drill`, so that one drill's failure does not
hide the others'.
"""

from __future__ import annotations

import hashlib
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import attrs
import httpx
import trio

from flcluster.crashpoints import ENV as CRASH_ENV
from flcluster.runtime.finish import pid_running
from flcluster.store import node_store_path
from recovery.checks import Finding, acknowledged_updates, check_device_log, check_models, read_metrics
from recovery.cluster import FL_NAME, ClusterOptions, DrillCluster, Node
from recovery.devicelog import DeviceLog, read_log
from recovery.fleet import Fleet, fetch_model
from recovery.updates import FloatArray

__all__ = ["DRILLS", "Drill", "DrillResult", "run_drill"]


@attrs.frozen
class Drill:
    """One drill.

    Attributes:
        name: the name (spec/recovery.md §5's crash point where there is one).
        kills: what it kills, in words.
        kind: ``timed``, ``crash``, ``guide``, ``no_recovery``, ``live_id`` or ``bad_store``.
        targets: node ids (``"0"`` is started first and leads; ``"1"`` follows), ``scheduler``, or
            ``rank0`` / ``rank1`` (whoever holds that rank; the ``guide`` drills).
        crash: the ``FLCLUSTER_CRASH_AT`` value set for the target's start (``crash`` drills).
        short: in the short set (``--short``, CI).
    """

    name: str
    kills: str
    kind: str
    targets: tuple[str, ...] = ()
    crash: str = ""
    short: bool = False


DRILLS: tuple[Drill, ...] = (
    Drill("follower_timed", "follower node 1, SIGKILL under load (iteration 2)", "timed", ("1",), short=True),
    Drill(
        "server.counted_not_folded",
        "follower node 1 at its 2nd update reserved at the leader, before its sum is committed",
        "crash",
        ("1",),
        "server.counted_not_folded:2",
    ),
    Drill(
        "server.committed_not_acked",
        "follower node 1 at its 2nd update committed, before SUCCEED reaches the device",
        "crash",
        ("1",),
        "server.committed_not_acked:2",
        short=True,
    ),
    Drill(
        "leader.collecting",
        "the leader (node 0) after asking for partial sums of iteration 2",
        "crash",
        ("0",),
        "leader.collecting:2",
        short=True,
    ),
    Drill(
        "leader.publishing",
        "the leader (node 0) while publishing model 2",
        "crash",
        ("0",),
        "leader.publishing:2",
    ),
    Drill(
        "leader.counting",
        "the leader (node 0) with count commits in flight (5th count)",
        "crash",
        ("0",),
        "leader.counting:5",
    ),
    Drill(
        "scheduler.forming",
        "the Scheduler during formation (2nd registration)",
        "crash",
        ("scheduler",),
        "scheduler.forming:2",
    ),
    Drill(
        "scheduler.iterating",
        "the Scheduler during an iteration (4th heartbeat while ready: about 1 s into training)",
        "crash",
        ("scheduler",),
        "scheduler.iterating:4",
    ),
    Drill("two_nodes", "the leader (node 0) and follower node 1 together, under load", "timed", ("0", "1")),
    Drill("guide_rank1", "rank 1, the guide's procedure (one launch for all Servers)", "guide", ("rank1",)),
    Drill(
        "guide_rank0",
        "rank 0, the guide's procedure (one launch for all Servers)",
        "guide",
        ("rank0",),
        short=True,
    ),
    Drill(
        "no_recovery",
        "follower node 1 without a recovery section, never restarted",
        "no_recovery",
        ("1",),
        short=True,
    ),
    Drill(
        "live_id_refused", "nothing: a second process for live node id 1 must be refused", "live_id", ("1",)
    ),
    Drill(
        "bad_store",
        "nothing: node 1 started on a corrupt, a truncated and a foreign store must refuse to start",
        "bad_store",
        ("1",),
        short=True,
    ),
)


@attrs.frozen
class DrillResult:
    """What one drill found."""

    name: str
    seed: int
    findings: tuple[Finding, ...]
    duration: float
    timings: tuple[tuple[str, float | None], ...]
    workdir: Path

    @property
    def ok(self) -> bool:
        """Whether every finding passed."""
        return all(f.ok for f in self.findings)


@attrs.define
class _Run:
    drill: Drill
    seed: int
    cluster: DrillCluster
    findings: list[Finding] = attrs.Factory(list)
    timings: list[tuple[str, float | None]] = attrs.Factory(list)
    finished: bool = False
    kill_iteration: int = 0

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.findings.append(Finding(name, ok, detail))
        return ok


def run_drill(drill: Drill, *, seed: int, short: bool, workdir: Path) -> DrillResult:
    """Play ``drill`` in ``workdir`` (module docstring); never raises for a failing cluster."""
    options = ClusterOptions(
        devices=8 if short else 12,
        fl_iteration_num=3 if short else 4,
        recovery=drill.kind != "no_recovery",
        launch="guide" if drill.kind == "guide" else "per_node",
    )
    began = time.monotonic()
    run = _Run(drill, seed, DrillCluster(workdir, options))
    try:
        trio.run(_drive, run)
    except Exception as exc:
        run.check(
            "drill ran to its end", False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
        )
    finally:
        _end(run)
    return DrillResult(
        drill.name, seed, tuple(run.findings), time.monotonic() - began, tuple(run.timings), workdir
    )


def _end(run: _Run) -> None:
    cluster = run.cluster
    try:
        if not run.finished:
            cluster.finish()
            run.finished = True
        left = cluster.leftovers()
        run.check(
            "no process left behind",
            not left,
            "every process the drill started ended after finish_mobile.py"
            if not left
            else f"still running after finish_mobile.py: pids {left}",
        )
    finally:
        cluster.cleanup()


async def _thread(fn: Callable[..., object], *args: object) -> object:
    return await trio.to_thread.run_sync(fn, *args)


async def _drive(run: _Run) -> None:
    drill, cluster = run.drill, run.cluster
    o = cluster.options
    env_for: dict[str, dict[str, str]] = {}
    if drill.kind == "crash":
        env_for[drill.targets[0]] = {CRASH_ENV: drill.crash}
    await _thread(cluster.start, env_for)
    if drill.name == "scheduler.forming":
        await _scheduler_crash(run, during_formation=True)
    ready = await _thread(cluster.wait_state, "CLUSTER_READY", 120.0)
    if not run.check(
        "cluster formed", ready is not None, f"CLUSTER_READY after {ready}s; /state {cluster.state()!r}"
    ):
        return
    for node in list(cluster.servers.values()):
        await _thread(cluster.wait_started, node)
    run.check("ranks", True, f"/nodes: {cluster.ranks()}")
    async with httpx.AsyncClient(timeout=10) as client:
        initial = await fetch_model(client, cluster.servers["0"].url, FL_NAME, 0)
    if not run.check("model 0 served", initial is not None, "getModel(0) from node 0"):
        return
    assert initial is not None
    log_path = cluster.workdir / "devices.jsonl"
    with DeviceLog(log_path) as log:
        fleet = Fleet(
            [n.url for n in cluster.servers.values()],
            devices=o.devices,
            seed=run.seed,
            fl_name=FL_NAME,
            fl_iteration_num=o.fl_iteration_num,
            log=log,
        )
        limit = 60.0 + 30.0 * o.fl_iteration_num
        done = trio.Event()

        async def devices() -> None:
            with trio.move_on_after(limit) as scope:
                await fleet.run()
            done.set()
            ended = len(fleet.done)
            run.check(
                "devices ran to the end",
                not scope.cancelled_caught and ended == o.devices,
                f"{ended}/{o.devices} devices ended ({sorted(set(fleet.done.values()))}); acknowledged per "
                f"iteration: {dict(sorted(fleet.acked.items()))}"
                + (f"; stopped after {limit:.0f} s" if scope.cancelled_caught else ""),
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(devices)
            with trio.move_on_after(limit):
                await _scenario(run, fleet, done)
            await done.wait()
    await _after(run, initial, log_path)


async def _scenario(run: _Run, fleet: Fleet, done: trio.Event) -> None:
    drill, cluster = run.drill, run.cluster
    half = max(1, cluster.options.devices // 2)
    match drill.kind:
        case "timed" | "guide" | "no_recovery":
            with trio.move_on_after(90) as scope:
                await fleet.wait_acked(2, half)
            if not run.check(
                "load reached", not scope.cancelled_caught, f"{half} updates of iteration 2 acknowledged"
            ):
                return
            run.kill_iteration = 2
            nodes = [_target(cluster, t) for t in drill.targets]
            for node in nodes:
                await _thread(cluster.kill, node)
            run.check(
                "killed", True, f"SIGKILL {', '.join(n.label for n in nodes)} at {dict(fleet.acked)} acks"
            )
            if drill.kind == "no_recovery":
                return
            await trio.sleep(1.0)
            for node in sorted(nodes, key=lambda n: n.node_id):
                await _restart(run, fleet, node)
            await _ready_again(run)
        case "crash" if drill.targets[0] == "scheduler":
            if drill.name != "scheduler.forming":
                await _scheduler_crash(run, during_formation=False, done=done)
        case "crash":
            node = cluster.servers[drill.targets[0]]
            died = await _wait_death_or(cluster, node, done)
            point = drill.crash.split(":")[0]
            run.kill_iteration = max(fleet.acked, default=1)
            if not run.check(
                f"crash point {point} reached",
                died,
                f"{node.label} killed itself there"
                if died
                else f"{node.label} never reached {drill.crash!r}: it ran until the devices ended (no "
                "crash_point() call at that place yet?)",
            ):
                return
            line = f"crash point {point} reached"
            run.check(
                "planned death", line in node.log.read_text(errors="replace"), f"{line!r} in {node.log}"
            )
            await trio.sleep(1.0)
            await _restart(run, fleet, node)
            await _ready_again(run)
        case "live_id":
            await _live_id(run)
        case "bad_store":
            pass
        case _:
            raise AssertionError(f"unknown drill kind {drill.kind!r}")


def _target(cluster: DrillCluster, target: str) -> Node:
    if target.startswith("rank"):
        return cluster.node_of_rank(int(target[4:]))
    return cluster.servers[target]


async def _wait_death_or(cluster: DrillCluster, node: Node, done: trio.Event) -> bool:
    while not done.is_set():
        if not pid_running(node.pid):
            return True
        await trio.sleep(0.1)
    return not pid_running(node.pid)


async def _restart(run: _Run, fleet: Fleet, node: Node) -> None:
    cluster = run.cluster
    try:
        new, took = await trio.to_thread.run_sync(cluster.restart_server, node.node_id)
    except AssertionError as exc:
        run.check(f"{node.label} restarted", False, str(exc)[-2000:])
        run.timings.append((f"{node.label}: restart -> serving", None))
        return
    fleet.replace_server(node.url, new.url)
    run.timings.append((f"{node.label}: restart -> serving", took))
    run.check(
        f"{node.label} restarted",
        True,
        f"port {node.device_port} -> {new.device_port}, serving after {took:.1f} s",
    )


async def _ready_again(run: _Run) -> None:
    waited = await _thread(run.cluster.wait_state, "CLUSTER_READY", 60.0)
    run.check("back to CLUSTER_READY", waited is not None, f"/state {run.cluster.state()!r}")


async def _scheduler_crash(run: _Run, *, during_formation: bool, done: trio.Event | None = None) -> None:
    cluster = run.cluster
    sched = cluster.scheduler
    assert sched is not None
    if done is None:
        died = bool(await _thread(cluster.wait_death, sched, 60.0))
    else:
        died = await _wait_death_or(cluster, sched, done)
    point = run.drill.crash.split(":")[0]
    if not run.check(
        f"crash point {point} reached",
        died,
        "the Scheduler killed itself there"
        if died
        else f"the Scheduler never reached {run.drill.crash!r} (no crash_point() call at that place yet?)",
    ):
        return
    await trio.sleep(1.0)
    took = await _thread(cluster.restart_scheduler)
    run.timings.append(("scheduler: restart -> CLUSTER_READY", took if isinstance(took, float) else None))
    run.check("scheduler restarted", took is not None, f"CLUSTER_READY {took} s after the restart")


async def _live_id(run: _Run) -> None:
    cluster = run.cluster
    original = cluster.servers["1"]
    port = cluster.fl_port + cluster.options.server_num + 7
    second = await trio.to_thread.run_sync(cluster.start_server, "1", port)
    cluster.servers["1"] = original
    ended = bool(await _thread(cluster.wait_death, second, 30.0))
    text = second.log.read_text(errors="replace") if second.log.exists() else ""
    refused = any(
        why in text
        for why in ("another open store holds the file", "already running here", "is held by a live Server")
    )
    run.check(
        "second process for live node id 1 refused",
        ended and refused,
        "it ended, saying why"
        if ended and refused
        else f"after 30 s it {'ended' if ended else 'still ran'}; its log's last lines: {text[-600:]!r}",
    )
    if not ended:
        cluster.kill(second)
    run.check("the live node 1 kept running", pid_running(original.pid), f"pid {original.pid}")
    run.check("node 1 keeps its rank", cluster.ranks().get("1") is not None, f"/nodes: {cluster.ranks()}")


async def _after(run: _Run, initial: dict[str, FloatArray], log_path: Path) -> None:
    cluster, o = run.cluster, run.cluster.options
    if run.drill.kind == "no_recovery":
        waited = await _thread(cluster.wait_state, "NODE_TIMEOUT", 3 * o.heartbeat_timeout)
        run.check(
            "dead Server reported",
            waited is not None,
            f"/state {cluster.state()!r}, /nodes {cluster.alive_rows()}",
        )
    else:
        waited = await _thread(cluster.wait_state, "CLUSTER_READY", 30.0)
        run.check("CLUSTER_READY at the end", waited is not None, f"/state {cluster.state()!r}")
    live = {f"{n.label} (:{n.device_port})": n.url for n in cluster.servers.values() if pid_running(n.pid)}
    served: dict[str, dict[int, dict[str, FloatArray] | None]] = {}
    async with httpx.AsyncClient(timeout=10) as client:
        for label, url in live.items():
            served[label] = {
                k: await fetch_model(client, url, FL_NAME, k, tries=5) for k in range(o.fl_iteration_num + 1)
            }
    entries = read_log(log_path)
    run.findings += check_device_log(entries, o.fl_iteration_num)
    acks = acknowledged_updates(entries)
    outcomes = read_metrics(cluster.metrics_path)
    run.check(
        "iteration outcomes",
        True,
        f"metrics.json: { {k: ['ok' if r else 'fail' for r in v] for k, v in sorted(outcomes.items())} }; "
        f"acknowledged: { {k: len(v) for k, v in sorted(acks.items())} }",
    )
    if run.drill.kind == "no_recovery":
        # spec/recovery.md §8: only the iteration in flight may fail; the next ones run on the Servers up.
        late = [k for k in range(run.kill_iteration + 1, o.fl_iteration_num + 1) if outcomes.get(k) != [True]]
        rule = f"every iteration after the kill (in iteration {run.kill_iteration}) completes (spec §8)"
    else:
        # spec/recovery.md §1.3: a node back within the round window does not fail the iteration.
        late = [k for k in range(1, o.fl_iteration_num + 1) if outcomes.get(k) != [True]]
        rule = "every iteration completes: the node was back within the round window (spec §1.3)"
    run.check("iterations completed", not late, rule if not late else f"{rule}; not so for {late}")
    run.findings += check_models(
        fl_iteration_num=o.fl_iteration_num,
        initial=initial,
        served=served,
        acks=acks,
        outcomes=outcomes,
        seed=run.seed,
    )
    if run.drill.kind == "bad_store":
        await _bad_store(run)


async def _bad_store(run: _Run) -> None:
    """Stop the cluster, then start node 1 on a corrupt, a truncated and a foreign store (spec §7)."""
    from flcluster.store import NodeIdentity, StoreRole, open_sqlite_store

    cluster = run.cluster
    await _thread(cluster.finish)
    run.finished = True
    store = node_store_path(cluster.config_dir / "recovery.json", StoreRole.SERVER, "1")
    real = store.exists() and store.stat().st_size > 0
    run.check("node 1 has a store after a run with recovery", real, str(store))
    original = store.with_name(store.name + ".orig")
    if real:
        shutil.copyfile(store, original)
    else:
        async with open_sqlite_store(
            original, NodeIdentity(StoreRole.SERVER, "1", FL_NAME, cluster.options.server_num)
        ):
            pass
    data = original.read_bytes()
    foreign = store.with_name(store.name + ".foreign")
    foreign.unlink(missing_ok=True)
    async with open_sqlite_store(foreign, NodeIdentity(StoreRole.SERVER, "1", "another-job", 7)):
        pass
    variants = {
        "corrupt": data[:100] + bytes(range(256)) * 4 + data[100 + 1024 :],
        "truncated": data[: max(len(data) // 2, 1)],
        "foreign": foreign.read_bytes(),
    }
    for what, content in variants.items():
        store.write_bytes(content)
        for side in (store.with_name(store.name + "-wal"), store.with_name(store.name + "-shm")):
            side.unlink(missing_ok=True)
        before = hashlib.sha256(content).hexdigest()
        node = await trio.to_thread.run_sync(lambda: cluster.start_server("1", cluster.fl_port + 1))
        ended = bool(await _thread(cluster.wait_death, node, 20.0))
        if not ended:
            cluster.kill(node)
        text = node.log.read_text(errors="replace") if node.log.exists() else ""
        names = str(store) in text
        unchanged = hashlib.sha256(store.read_bytes()).hexdigest() == before
        run.check(
            f"{what} store refused",
            ended and names and unchanged,
            f"ended: {ended}, log names {store.name}: {names}, file left as it was: {unchanged}"
            + ("" if ended and names else f"; log ends: {text[-400:]!r}"),
        )
