"""PW_ENCRYPT on real processes: the guide's scripts start a Scheduler and 4 Servers, 20 SDK devices train.

Three devices drop out after shareSecrets and two after updateModel (spec/secure-aggregation.md §R1). The test
keeps every device's update in the clear (its trainer's output) and checks:

- the published model, the same on every Server, equals plain FedAvg over exactly the 17 devices that
  uploaded, within the bound of spec/secure-aggregation.md §3 (``flcluster.secure.bound``);
- no Server ever holds an individual update in the clear: while the updates are in (the devices are held
  before getClientList), each Server's committed partial sum (its SQLite store) differs from the sum of the
  clear updates it names by the masks, and no device's clear update appears in any Server's store files or
  logs, then or at the end.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio

from flcluster.aggregation import ModelSpec, PartialSum
from flcluster.client.device import Device, DevicePolicy, IterationOutcome, TrainingTask, TrainResult
from flcluster.secure.bound import model_error_bound
from flcluster.wire.client_codec import decode_update_model_response
from flcluster.wire.codes import ResponseCode
from flcluster.wire.server_codec import decode_update_model
from recovery.harness import copy_examples, kill_leftovers, run_script, started_pids, wait_for_log_line
from tests.helpers import free_ports

pytestmark = pytest.mark.integration

DEVICES = 20
DROP_SHARE = 3
DROP_UPDATE = 2
POLICY = DevicePolicy(wait_interval=0.1, max_wait_tries=3000)
Model = dict[str, np.ndarray[Any, Any]]


@pytest.fixture
def ports() -> Iterator[tuple[int, int]]:
    sched, fl = free_ports(2)
    fl = 20000 + fl % 20000
    yield sched, fl
    kill_leftovers(sched)


def files_of(mobile: Path) -> list[Path]:
    """Everything the Servers wrote: their store files (with WAL) and logs."""
    logs = [p for p in mobile.glob("server_*/*") if p.is_file()]
    return sorted([*logs, *mobile.glob("recovery.server-*.sqlite*")])


def partial_sums(mobile: Path, spec: ModelSpec) -> list[tuple[PartialSum, list[str]]]:
    """Each Server's committed partial sum and the fl_ids it holds, read from its store."""
    out = []
    for path in sorted(mobile.glob("recovery.server-*.sqlite")):
        # The Server holds its store exclusively: read a copy of the file and its WAL (what is committed).
        copy = mobile / "copies" / path.name
        copy.parent.mkdir(exist_ok=True)
        for suffix in ("", "-wal"):
            source = path.with_name(path.name + suffix)
            if source.exists():
                shutil.copyfile(source, copy.with_name(copy.name + suffix))
        db = sqlite3.connect(copy)
        try:
            row = db.execute("SELECT data FROM partial_sum").fetchone()
            ids = [r[0] for r in db.execute("SELECT fl_id FROM partial_fl_ids")]
        finally:
            db.close()
        if row is not None:
            out.append((PartialSum.from_bytes(row[0], spec), ids))
    return out


def assert_nothing_in_the_clear(mobile: Path, clear: dict[str, Model]) -> None:
    contents = [p.read_bytes() for p in files_of(mobile)]
    assert contents, "the Servers wrote nothing"
    for fl_id, update in clear.items():
        for name, value in update.items():
            probe = np.ascontiguousarray(value, dtype="<f4").tobytes()[:64]
            assert not any(probe in c for c in contents), (fl_id, name)


def test_pw_encrypt_20_devices_4_servers_with_drop_outs(tmp_path: Path, ports: tuple[int, int]) -> None:
    sched_port, fl_port = ports
    mobile = copy_examples(tmp_path)
    common = [
        "--scheduler_ip=127.0.0.1",
        f"--scheduler_port={sched_port}",
        f"--fl_server_port={fl_port}",
        "--server_num=4",
        f"--config_file_path={mobile / 'config.json'}",
    ]
    sched = run_script(
        mobile, "run_mobile_sched.py", [*common, f"--scheduler_manage_port={free_ports(1)[0]}"]
    )
    assert sched.returncode == 0, sched.stderr
    # S = 20, u = ceil(20 × 0.85) = 17 = the devices that upload; r = 0.85: exchangeKeys, getKeys,
    # shareSecrets and getSecrets 17; getClientList max(15, t + 1) = 15 = the devices left; R: t + 1 = 9.
    servers = run_script(
        mobile,
        "run_mobile_server.py",
        [
            *common,
            f"--start_fl_job_threshold={DEVICES}",
            "--update_model_ratio=0.85",
            "--encrypt_type=PW_ENCRYPT",
            "--share_secrets_ratio=0.85",
            "--reconstruct_secrets_threshold=8",
            "--cipher_time_window=300000",
            "--fl_iteration_num=1",
        ],
    )
    assert servers.returncode == 0, servers.stderr
    assert len(started_pids(sched.stdout) + started_pids(servers.stdout)) == 5
    for i in range(4):
        wait_for_log_line(mobile / f"server_{i}" / "server.log", "Server started successfully.", timeout=180)
    urls = [f"http://127.0.0.1:{fl_port + i}" for i in range(4)]
    trio.run(_devices, mobile, urls)


async def _devices(mobile: Path, urls: list[str]) -> None:
    clear: dict[str, Model] = {}
    acknowledged: set[str] = set()
    all_in = trio.Event()
    released = trio.Event()
    uploading = DEVICES - DROP_SHARE

    async def on_request(request: httpx.Request) -> None:
        if request.url.path.endswith("/getClientList"):
            await released.wait()  # every device waits here until the test has looked at the stores

    async def on_response(response: httpx.Response) -> None:
        if not response.request.url.path.endswith("/updateModel"):
            return
        await response.aread()
        if decode_update_model_response(response.content).retcode == ResponseCode.SUCCEED:
            acknowledged.add(decode_update_model(response.request.content).fl_id)
            if len(acknowledged) == uploading:
                all_in.set()

    def trainer(index: int, fl_id: str) -> Any:
        async def train(task: TrainingTask) -> TrainResult:
            rng = np.random.default_rng([index, task.iteration])
            upload = {
                n: (np.asarray(v) + rng.standard_normal(v.size).astype(np.float32) * np.float32(0.05))
                * np.float32(task.data_size)
                for n, v in task.model.items()
            }
            clear[fl_id] = upload
            return TrainResult(feature_maps=upload, loss=0.5)

        return train

    sizes = [5 + 3 * i for i in range(DEVICES)]
    hooks = {"request": [on_request], "response": [on_response]}
    async with httpx.AsyncClient(timeout=120, event_hooks=hooks) as client:
        devices = [
            Device(
                f"pw-{i:02d}", urls[i % 4 :] + urls[: i % 4], fl_name="Lenet", client=client, policy=POLICY
            )
            for i in range(DEVICES)
        ]
        drops = {i: "shareSecrets" for i in range(DROP_SHARE)}
        drops |= {i: "updateModel" for i in range(DROP_SHARE, DROP_SHARE + DROP_UPDATE)}
        reports: list[Any] = []

        async def one(i: int) -> None:
            d = devices[i]
            reports.append(
                await d.run_iteration(trainer(i, d.fl_id), data_size=sizes[i], drop_after=drops.get(i))
            )

        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                for i in range(DEVICES):
                    nursery.start_soon(one, i)
                await all_in.wait()
                # Every update is in and committed; the unmasking has not started.
                spec = ModelSpec(tuple((n, (v.size,)) for n, v in next(iter(clear.values())).items()))
                held = partial_sums(mobile, spec)
                assert sorted(f for _p, ids in held for f in ids) == sorted(acknowledged), files_of(mobile)
                for partial, ids in held:
                    for name, s in zip(spec.names, partial.sums, strict=True):
                        plain = sum(clear[f][name].astype(np.float64) for f in ids)
                        # The masks (PRG values in [-1, 1], up to 19 pairwise and 1 individual each) remain.
                        assert np.mean(np.abs(s.numpy() - plain)) > 0.05, (ids, name)
                assert_nothing_in_the_clear(mobile, {f: clear[f] for f in acknowledged})
                released.set()
        by_id = {r.fl_id: r for r in reports}
        for i in range(DEVICES):
            want = IterationOutcome.FAILED if i in drops else IterationOutcome.COMPLETED
            assert by_id[f"pw-{i:02d}"].outcome is want, by_id[f"pw-{i:02d}"].reason
        uploaded = sorted(acknowledged)
        assert uploaded == [f"pw-{i:02d}" for i in range(DROP_SHARE, DEVICES)]
        models = []
        for url in urls:
            reader = Device("reader", [url], fl_name="Lenet", client=client, policy=POLICY)
            answer = await reader.fetch_model(1)
            models.append({fm.name: np.array(fm.data) for fm in answer.feature_maps})
    for other in models[1:]:
        for name, value in models[0].items():
            np.testing.assert_array_equal(other[name], value)
    index = {f"pw-{i:02d}": i for i in range(DEVICES)}
    total = sum(sizes[index[f]] for f in uploaded)
    for name, value in models[0].items():
        terms = [clear[f][name].astype(np.float32) for f in uploaded]
        plain = (sum(t.astype(np.float64) for t in terms) / total).astype(np.float32)
        abs_sum = sum(np.abs(t.astype(np.float64)) for t in terms)
        bound = model_error_bound(abs_sum, np.abs(plain.astype(np.float64)), total, len(uploaded), DEVICES)
        error = np.abs(value.astype(np.float64) - plain.astype(np.float64))
        assert np.all(error <= bound), (name, float(np.max(error - bound)))
    assert_nothing_in_the_clear(mobile, {f: clear[f] for f in uploaded})
