"""Resident memory of one Server process as accepted updates pile up in one iteration.

A Scheduler and ONE Server run as real processes on loopback (``start_fl_job_threshold`` = 100,000, above
every device sent, hour-long windows: the iteration never completes, so nothing is ever aggregated or
dropped). Synthetic devices, in chunks, each do startFLJob and then updateModel with a LeNet-size body
(66,404 float32); ``VmRSS`` of the Server (``/proc/<pid>/status``) is read after start-up, after 100
accepted updates and after every chunk up to ``TARGET``. The Server keeps one model's worth of running
sums whatever the number of updates (spec/aggregation.md), so what grows is the per-device bookkeeping
and whatever the allocator keeps of the request bodies.

On a slow or busy host, ``TARGET`` updates may not fit in ``BUDGET_S`` seconds; the run then stops at the
chunk that does, prints how many updates it reached, and extrapolates to ``TARGET`` along a straight
line fitted (least squares) to the readings of the second half of the run, clearly labelled as an
extrapolation.

Baseline, same run: the same requests (startFLJob answered with a body of the Server's answer size,
then the updateModel bodies), as many as the Server took or as fit in ``BASELINE_BUDGET_S``, sent to a
bare Hypercorn + Quart-Trio process (no flcluster, no torch) that reads each body and answers 200: the
part of the growth that the HTTP stack and the allocator account for on their own.

Nothing is asserted about memory (target: growth < 50 MB from 100 to 10,000 updates); every answer must
be SUCCEED (HTTP 200 from the baseline).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.benchmarks.bench_util import (
    HTTP_200,
    SUCCEED,
    LoadGenerator,
    open_bare,
    open_cluster,
    peak_rss_bytes,
    rss_bytes,
    start_reply_bytes,
    update_body_bytes,
)

pytestmark = pytest.mark.bench

FIRST = 100
TARGET = 10_000
CHUNK = 500
BUDGET_S = 150.0
BASELINE_BUDGET_S = 60.0
THRESHOLD = 100_000
CONCURRENCY = 16
MIN_POINTS = 3
MIB = 1024 * 1024


def _fill(
    gen: LoadGenerator, url: str, expect: str, counts: list[int], rss: Callable[[], int], budget: float
) -> list[tuple[int, int]]:
    """Bring the devices at ``url`` to each count in ``counts`` (startFLJob, then updateModel).

    Returns (accepted updates, VmRSS) after each count reached. Stops early, but never before
    ``MIN_POINTS`` counts, once the next chunk would likely end more than ``budget`` seconds after the
    start (judged by the pace of the chunk just done).
    """
    curve: list[tuple[int, int]] = []
    done = 0
    start = time.monotonic()
    for count, following in zip(counts, [*counts[1:], None], strict=True):
        began = time.monotonic()
        started = gen.run("startFLJob", [url], first=done, count=count - done, concurrency=CONCURRENCY)
        assert started.only(expect), started.outcomes
        updated = gen.run("updateModel", [url], first=done, count=count - done, concurrency=CONCURRENCY)
        assert updated.only(expect), updated.outcomes
        per_device = (time.monotonic() - began) / (count - done)
        done = count
        curve.append((count, rss()))
        if following is None or len(curve) < MIN_POINTS:
            continue
        if time.monotonic() - start + per_device * (following - count) > budget:
            break
    return curve


def _mib(value: float) -> str:
    return f"{value / MIB:.1f} MiB"


def test_bench_server_rss_over_10000_updates(tmp_path: Path) -> None:
    counts = [FIRST, *range(CHUNK, TARGET + 1, CHUNK)]
    lines = [
        "",
        f"memory | host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before the runs",
        f"memory | each device: startFLJob, then updateModel with a {update_body_bytes():,}-byte body;"
        f" threshold {THRESHOLD:,} (the iteration never completes); {CONCURRENCY} connections;"
        f" VmRSS after every {CHUNK} updates",
    ]
    with LoadGenerator(tmp_path / "loadgen") as gen:
        with open_cluster(tmp_path / "flcluster", server_num=1, threshold=THRESHOLD) as cluster:
            pid = cluster.server_pids[0]
            failed_starts = cluster.failed_starts
            at_start = rss_bytes(pid)
            began = time.monotonic()
            curve = _fill(gen, cluster.urls[0], SUCCEED, counts, lambda: rss_bytes(pid), BUDGET_S)
            took = time.monotonic() - began
            peak = peak_rss_bytes(pid)
        reached = curve[-1][0]
        with open_bare(tmp_path / "bare", start_reply=start_reply_bytes()) as bare:
            bare_pid = bare.pids[0]
            bare_start = rss_bytes(bare_pid)
            bare_curve = _fill(
                gen,
                bare.urls[0],
                HTTP_200,
                [c for c in counts if c <= reached],
                lambda: rss_bytes(bare_pid),
                BASELINE_BUDGET_S,
            )

    (_, at_first), (_, at_end) = curve[0], curve[-1]
    growth = at_end - at_first
    lines += [
        f"memory | flcluster Server VmRSS after start-up:              {_mib(at_start)}",
        f"memory | flcluster Server VmRSS after {FIRST:>6,} accepted updates: {_mib(at_first)}",
        f"memory | flcluster Server VmRSS after {reached:>6,} accepted updates: {_mib(at_end)}"
        f" (VmHWM, the peak: {_mib(peak)}; {took:.0f} s for the {reached:,} devices)",
        f"memory | growth from {FIRST:,} to {reached:,} updates: {_mib(growth)}"
        f" = {growth / (reached - FIRST) / 1024:.2f} KiB/update (target < 50 MB from 100 to 10,000)",
    ]
    if reached < TARGET:
        tail = [point for point in curve if point[0] >= reached / 2]
        slope = float(np.polyfit([n for n, _ in tail], [rss for _, rss in tail], 1)[0])
        projected = growth + slope * (TARGET - reached)
        lines += [
            f"memory | only {reached:,} of {TARGET:,} updates fitted in the {BUDGET_S:.0f} s budget"
            " on this host",
            f"memory | EXTRAPOLATED, NOT MEASURED: growth from {FIRST:,} to {TARGET:,} updates"
            f" ~ {_mib(projected)} (measured growth plus a straight line, {slope / 1024:.2f} KiB/update,"
            f" fitted to the {len(tail)} readings from {tail[0][0]:,} to {reached:,} updates)",
        ]
    lines.append(
        "memory | curve (accepted updates: VmRSS MiB): "
        + ", ".join(f"{count:,}: {rss / MIB:.1f}" for count, rss in curve)
    )
    (_, bare_first), (bare_reached, bare_end) = bare_curve[0], bare_curve[-1]
    lines += [
        "memory | baseline, bare Hypercorn + Quart-Trio, same requests: VmRSS after start-up"
        f" {_mib(bare_start)}, after {FIRST:,}: {_mib(bare_first)}, after {bare_reached:,}: {_mib(bare_end)};"
        f" growth {_mib(bare_end - bare_first)}"
        f" = {(bare_end - bare_first) / max(bare_reached - FIRST, 1) / 1024:.2f} KiB/update",
        f"memory | host load average after the runs: {os.getloadavg()[0]:.2f}",
    ]
    lines += [f"memory | NOTE: a cluster start-up lost a Server and was redone: {f}" for f in failed_starts]
    print("\n".join(lines))
