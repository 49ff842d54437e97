"""One federated iteration of 1,000 synthetic devices on 4 Server processes, phase by phase.

A Scheduler and 4 Servers run as real processes on loopback (``python -m flcluster server
--local_server_num=4 --background``), with ``start_fl_job_threshold`` = 1,000 and ``update_model_ratio``
1.0. The load generator (its own process, at most ``CONCURRENCY`` requests in flight) plays the devices:
every device does startFLJob, then every device uploads a LeNet-size update (66,404 float32), each
request to one of the 4 Servers drawn at random (as the original's client does with ``useElb``), so the
counting at the leader and the collection of partial sums from the followers are both exercised. Then it
polls getModel for iteration 1 on every Server (every ``POLL`` seconds) until each answers SUCCEED.

Printed: wall time from the first startFLJob sent to the model published (getModel SUCCEED on the first
Server, and on all 4), and its split: the startFLJob phase (first sent to last answered), the updateModel
phase, and aggregation until published (last updateModel answered to getModel SUCCEED); the leader's
``iteration 1 completed`` log line is placed on the same clock. Baseline, same run, once before and once
after the iteration: the same two phases (same devices, same random spread, same concurrency) against 4
bare Hypercorn + Quart-Trio processes that read each body and answer 200 (startFLJob with a body of the
size of a Server's answer, which carries the model): what the transport alone costs on this host.
Nothing about time is asserted; every answer must be SUCCEED (HTTP 200 from the baseline) and every
Server must publish the model.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest

from tests.benchmarks.bench_util import (
    HTTP_200,
    SUCCEED,
    LoadGenerator,
    PhaseResult,
    first_log_time,
    open_bare,
    open_cluster,
    phase_spec,
    start_reply_bytes,
)

pytestmark = pytest.mark.bench

DEVICES = 1000
SERVERS = 4
CONCURRENCY = 32
POLL = 0.05
START_SEED, UPDATE_SEED = 1, 2


def _spread(result: PhaseResult, urls: list[str]) -> str:
    return "/".join(str(result.per_url.get(url, 0)) for url in urls)


def _phase(label: str, result: PhaseResult) -> str:
    return (
        f"iteration |   {label:<12} phase: {result.last_answered - result.first_sent:7.2f} s"
        f" ({result.requests:,} answered, {result.rate:6.1f} requests/s;"
        f" load generator {result.client_load:4.2f} core)"
    )


def _baseline(gen: LoadGenerator, urls: list[str]) -> tuple[PhaseResult, PhaseResult]:
    start, update = gen.sequence(
        [
            phase_spec("startFLJob", urls, count=DEVICES, concurrency=CONCURRENCY, seed=START_SEED),
            phase_spec("updateModel", urls, count=DEVICES, concurrency=CONCURRENCY, seed=UPDATE_SEED),
        ]
    )
    assert start.only(HTTP_200) and update.only(HTTP_200), (start.outcomes, update.outcomes)
    return start, update


def test_bench_one_iteration_1000_devices_on_4_servers(tmp_path: Path) -> None:
    lines = [
        "",
        f"iteration | host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before the runs",
        f"iteration | {DEVICES:,} synthetic devices, {SERVERS} Server processes + Scheduler,"
        f" start_fl_job_threshold={DEVICES}, update_model_ratio=1.0; each request to a Server drawn at"
        f" random; at most {CONCURRENCY} requests in flight; getModel polled every {POLL * 1000:.0f} ms",
    ]
    with (
        LoadGenerator(tmp_path / "loadgen") as gen,
        open_bare(tmp_path / "bare", count=SERVERS, start_reply=start_reply_bytes()) as bare,
    ):
        # The baseline runs before and after the cluster's iteration (its processes idle meanwhile),
        # so that load from elsewhere on the host that drifts over the run weighs on both sides.
        baselines = [_baseline(gen, bare.urls)]
        with open_cluster(tmp_path / "flcluster", server_num=SERVERS, threshold=DEVICES) as cluster:
            start, update, published = gen.sequence(
                [
                    phase_spec(
                        "startFLJob", cluster.urls, count=DEVICES, concurrency=CONCURRENCY, seed=START_SEED
                    ),
                    phase_spec(
                        "updateModel", cluster.urls, count=DEVICES, concurrency=CONCURRENCY, seed=UPDATE_SEED
                    ),
                    phase_spec("getModel", cluster.urls, iteration=1, poll=POLL),
                ]
            )
            completed = first_log_time(cluster.logs(), "iteration 1 completed")
            urls = cluster.urls
            failed_starts = cluster.failed_starts
        baselines.append(_baseline(gen, bare.urls))

    assert start.only(SUCCEED), start.outcomes
    assert update.only(SUCCEED), update.outcomes
    assert sorted(published.answered_at) == sorted(urls), published.outcomes
    first, everywhere = min(published.answered_at.values()), max(published.answered_at.values())
    t0 = start.first_sent
    polls = sum(published.outcomes.values())
    lines += [
        f"iteration | devices per Server: startFLJob {_spread(start, urls)},"
        f" updateModel {_spread(update, urls)}",
        f"iteration | flcluster: first startFLJob -> model published: {first - t0:7.2f} s"
        f" (getModel SUCCEED on the first Server; on all {SERVERS}: {everywhere - t0:.2f} s)",
        _phase("startFLJob", start),
        "iteration |   between the phases (load generator):"
        f" {1000 * (update.first_sent - start.last_answered):.1f} ms",
        _phase("updateModel", update),
        f"iteration |   aggregation until published: {first - update.last_answered:7.2f} s"
        f" (last updateModel answered -> getModel SUCCEED on the first Server;"
        f" on all {SERVERS}: {everywhere - update.last_answered:.2f} s; {polls} getModel polls)",
    ]
    if completed is not None:
        lines.append(
            f"iteration |   the leader logged 'iteration 1 completed' {completed - t0:.2f} s after the first"
            f" startFLJob ({completed - update.last_answered:+.2f} s from the last updateModel answer;"
            " log time stamps have millisecond resolution)"
        )
    totals = [upd.last_answered - st.first_sent for st, upd in baselines]
    for when, (base_start, base_update), total in zip(("before", "after"), baselines, totals, strict=True):
        lines += [
            f"iteration | baseline {when} the iteration, the same requests to {SERVERS} bare Hypercorn +"
            f" Quart-Trio processes: {total:.2f} s for both phases",
            _phase("startFLJob", base_start),
            _phase("updateModel", base_update),
        ]
    lines += [
        f"iteration | flcluster / baseline (mean of before and after), startFLJob + updateModel phases"
        f" (first sent -> last answered): {(update.last_answered - t0) / statistics.mean(totals):.2f}x",
        f"iteration | host load average after the runs: {os.getloadavg()[0]:.2f}",
    ]
    lines += [
        f"iteration | NOTE: a cluster start-up lost a Server and was redone: {f}" for f in failed_starts
    ]
    print("\n".join(lines))
