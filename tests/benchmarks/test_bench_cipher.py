"""The cost of PW_ENCRYPT: iteration time with and without it, 20 devices, 4 Servers, same run.

Two clusters of real processes (the guide's scripts: a Scheduler and 4 Servers on loopback, recovery on as in
the guide's ``config.json``) run one after the other in the same run, one with ``encrypt_type=NOT_ENCRYPT``
(the baseline) and one with ``PW_ENCRYPT`` (no drop-outs, ``share_secrets_ratio=1``,
``reconstruct_secrets_threshold=10``). Each runs ``ITERATIONS`` iterations of 20 SDK devices in this process
(LeNet-size updates, no training: the cost measured is the protocol's, the devices' cryptography included,
on the same cores as the Servers). An iteration's time is from its devices' first startFLJob to the last
device holding the new model. Figures: per mode the median, min and max over the iterations, and the ratio
of the medians. Nothing is asserted about time.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio

from flcluster.client.device import Device, DevicePolicy, IterationOutcome, TrainingTask, TrainResult
from recovery.harness import copy_examples, kill_leftovers, run_script, started_pids, wait_for_log_line
from tests.helpers import free_ports

pytestmark = pytest.mark.bench

DEVICES = 20
ITERATIONS = 3
POLICY = DevicePolicy(wait_interval=0.05, max_wait_tries=10_000)


async def _train(task: TrainingTask) -> TrainResult:
    rng = np.random.default_rng([hash(task.fl_id) % 2**32, task.iteration])
    upload = {n: (np.asarray(v) + rng.random(v.size, dtype=np.float32)) * np.float32(task.data_size)
              for n, v in task.model.items()}  # fmt: skip
    return TrainResult(feature_maps=upload, loss=0.0)


async def _one(device: Device, reports: list[Any]) -> None:
    reports.append(await device.run_iteration(_train, data_size=32))


async def _iterations(urls: list[str]) -> list[float]:
    times = []
    async with httpx.AsyncClient(timeout=120) as client:
        devices = [
            Device(
                f"bench-{i:02d}", urls[i % 4 :] + urls[: i % 4], fl_name="Lenet", client=client, policy=POLICY
            )
            for i in range(DEVICES)
        ]
        for _ in range(ITERATIONS):
            reports: list[Any] = []
            began = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for d in devices:
                    nursery.start_soon(_one, d, reports)
            times.append(time.perf_counter() - began)
            assert all(r.outcome is IterationOutcome.COMPLETED for r in reports), [r.reason for r in reports]
    return times


def _run(tmp_path: Path, encrypt_type: str) -> list[float]:
    sched_port, fl_port = free_ports(2)
    fl_port = 20000 + fl_port % 20000
    mobile = copy_examples(tmp_path / encrypt_type)
    common = [
        "--scheduler_ip=127.0.0.1",
        f"--scheduler_port={sched_port}",
        f"--fl_server_port={fl_port}",
        "--server_num=4",
        f"--config_file_path={mobile / 'config.json'}",
    ]
    try:
        sched = run_script(
            mobile, "run_mobile_sched.py", [*common, f"--scheduler_manage_port={free_ports(1)[0]}"]
        )
        servers = run_script(
            mobile,
            "run_mobile_server.py",
            [
                *common,
                f"--start_fl_job_threshold={DEVICES}",
                f"--encrypt_type={encrypt_type}",
                "--share_secrets_ratio=1.0",
                "--reconstruct_secrets_threshold=10",
                f"--fl_iteration_num={ITERATIONS + 1}",
            ],
        )
        assert len(started_pids(sched.stdout) + started_pids(servers.stdout)) == 5, servers.stderr
        for i in range(4):
            wait_for_log_line(
                mobile / f"server_{i}" / "server.log", "Server started successfully.", timeout=180
            )
        return trio.run(_iterations, [f"http://127.0.0.1:{fl_port + i}" for i in range(4)])
    finally:
        kill_leftovers(sched_port)


def test_bench_pw_encrypt_against_no_encryption(tmp_path: Path) -> None:
    figures = {mode: _run(tmp_path, mode) for mode in ("NOT_ENCRYPT", "PW_ENCRYPT")}
    print()
    for mode, times in figures.items():
        print(
            f"{mode:12s} one iteration, {DEVICES} devices, 4 Servers: "
            f"median {statistics.median(times):.2f} s "
            f"(min {min(times):.2f}, max {max(times):.2f}; {len(times)} iterations)"
        )
    ratio = statistics.median(figures["PW_ENCRYPT"]) / statistics.median(figures["NOT_ENCRYPT"])
    print(f"PW_ENCRYPT / NOT_ENCRYPT: {ratio:.2f}x")
