"""updateModel ingest of one Server process for LeNet-size updates, next to a bare HTTP endpoint.

Set-up, all on loopback, each in its own process:

- flcluster: ``python -m flcluster scheduler ...`` and ONE Server (``python -m flcluster server ...
  --server_num=1``) with ``start_fl_job_threshold`` far above the devices sent and hour-long windows, so
  the iteration never completes during the run: every update is decoded, checked, counted by the leader
  and folded into the running FedAvg sums, and nothing else happens;
- baseline: a bare Hypercorn + Quart-Trio endpoint (``bench_util.BARE_SERVER``: nothing of flcluster, no
  torch; the Servers' Hypercorn settings) that only reads the same body and answers 200;
- durability: a second flcluster Server with disaster recovery on (``config.json``'s ``recovery``: every
  node keeps its SQLite recovery store, and no update is answered SUCCEED before the partial sum that
  holds it is committed, group-committed; spec/recovery.md), to show what durability costs;
- the load generator (``bench_util loadgen``): raw HTTP/1.1 keep-alive connections, pre-encoded bodies.

Each run sends ``UPDATES`` updateModel bodies (66,404 float32, the same bytes for every target apart from
the device id) over ``CONCURRENCY`` connections; before a run against a Server, the same devices do
startFLJob (not timed). Runs of the three targets are interleaved, ``REPEATS`` times, so that load from
elsewhere on the host falls on all of them alike. Printed per run: updates/s, request-body MB/s, the
target's CPU time per update, and the CPU the target and the load generator used (fractions of one core:
a generator far below 1.0 while the target is near its share of the host means the target, not the
client, set the rate). Then the medians and the ratio flcluster / bare (target >= 0.8): the median of
the ratios of runs taken side by side, and the ratio of CPU time per update, which load from elsewhere
on the host disturbs less than the rates. Nothing about time is asserted; every answer must be SUCCEED
(or HTTP 200 from the baseline).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.benchmarks.bench_util import (
    HTTP_200,
    SUCCEED,
    LoadGenerator,
    PhaseResult,
    lenet_spec,
    open_bare,
    open_cluster,
    update_body_bytes,
)

pytestmark = pytest.mark.bench

UPDATES = 400
REPEATS = 3
CONCURRENCY = 16
WARMUP = 40
THRESHOLD = 100_000


@dataclass
class Target:
    """One endpoint under load and the next free device index on it."""

    label: str
    url: str
    pid: int
    expect: str
    starts_devices: bool
    next_device: int = 0
    runs: list[PhaseResult] = field(default_factory=list)

    def send(self, gen: LoadGenerator, count: int) -> PhaseResult:
        """startFLJob (Servers only, not timed) then updateModel for ``count`` new devices."""
        first = self.next_device
        self.next_device += count
        if self.starts_devices:
            started = gen.run("startFLJob", [self.url], first=first, count=count, concurrency=CONCURRENCY)
            assert started.only(SUCCEED), started.outcomes
        result = gen.run(
            "updateModel", [self.url], first=first, count=count, concurrency=CONCURRENCY, watch=[self.pid]
        )
        assert result.only(self.expect), result.outcomes
        return result


def _line(label: str, r: PhaseResult, pid: int) -> str:
    return (
        f"ingest | {label:<49} | {r.rate:7.1f} updates/s | {r.megabytes_per_s:6.1f} MB/s"
        f" | target CPU {1000 * r.watched_cpu[str(pid)] / r.requests:6.2f} ms/update"
        f" ({r.watched_load(pid):4.2f} core) | load generator {r.client_load:4.2f} core"
    )


def test_bench_update_model_ingest(tmp_path: Path) -> None:
    with (
        LoadGenerator(tmp_path / "loadgen") as gen,
        open_bare(tmp_path / "bare") as bare,
        open_cluster(tmp_path / "flcluster", server_num=1, threshold=THRESHOLD) as cluster,
        open_cluster(
            tmp_path / "flcluster-recovery", server_num=1, threshold=THRESHOLD, recovery=True
        ) as durable,
    ):
        targets = [
            Target("bare", bare.urls[0], bare.pids[0], HTTP_200, False),
            Target("flcluster", cluster.urls[0], cluster.server_pids[0], SUCCEED, True),
            Target("flcluster, recovery on", durable.urls[0], durable.server_pids[0], SUCCEED, True),
        ]
        for target in targets:
            target.send(gen, WARMUP)
        failed_starts = cluster.failed_starts + durable.failed_starts
        lines = [
            "",
            f"ingest | host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before the runs",
            f"ingest | body: {update_body_bytes():,} bytes ({lenet_spec().total_elements:,} float32);"
            f" {UPDATES} updates per run over {CONCURRENCY} connections; {REPEATS} runs per target,"
            f" interleaved; {WARMUP} warm-up updates each, not counted",
            "ingest | bare: Hypercorn + Quart-Trio in its own process, reads the body and answers 200;"
            " flcluster: one Server process (Scheduler beside it), threshold never reached",
        ]
        for repeat in range(REPEATS):
            for target in targets:
                result = target.send(gen, UPDATES)
                target.runs.append(result)
                lines.append(_line(f"run {repeat + 1}: {target.label}", result, target.pid))

    costs = {}
    for target in targets:
        rate = statistics.median(r.rate for r in target.runs)
        mbs = statistics.median(r.megabytes_per_s for r in target.runs)
        cpu = statistics.median(1000 * r.watched_cpu[str(target.pid)] / r.requests for r in target.runs)
        costs[target.label] = cpu
        lines.append(
            f"ingest | {'median: ' + target.label:<49} | {rate:7.1f} updates/s | {mbs:6.1f} MB/s"
            f" | target CPU {cpu:6.2f} ms/update"
        )
    baseline = targets[0]
    for target in targets[1:]:
        label = target.label
        paired = [mine.rate / base.rate for mine, base in zip(target.runs, baseline.runs, strict=True)]
        lines.append(
            f"ingest | ratio {label} / bare, updates/s: {statistics.median(paired):.2f}"
            f" (median of the runs' ratios {', '.join(f'{r:.2f}' for r in paired)}; target >= 0.8);"
            f" by target CPU per update (bare / {label.split(' (')[0]}):"
            f" {costs[baseline.label] / costs[label]:.2f}"
        )
    plain, durable_target = targets[1], targets[2]
    paired = [d.rate / p.rate for d, p in zip(durable_target.runs, plain.runs, strict=True)]
    lines.append(
        f"ingest | cost of durability, recovery on / off, updates/s: {statistics.median(paired):.2f}"
        f" (median of the runs' ratios {', '.join(f'{r:.2f}' for r in paired)}; target >= 0.8);"
        f" by target CPU per update (off / on): {costs[plain.label] / costs[durable_target.label]:.2f}"
    )
    lines.append(f"ingest | host load average after the runs: {os.getloadavg()[0]:.2f}")
    lines += [f"ingest | NOTE: a cluster start-up lost a Server and was redone: {f}" for f in failed_starts]
    print("\n".join(lines))
