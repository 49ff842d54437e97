"""The README's main job: a local cluster on loopback training LeNet with simulated devices.

    python examples/mobile/demo.py [--server_num 4] [--device_num 20] [--iterations 20] [--keep]

Starts the Scheduler and the Servers with the guide's ``run_mobile_sched.py`` / ``run_mobile_server.py``
(in a scratch directory), waits for ``CLUSTER_READY`` and prints how long that took and the ``/nodes``
answer; then ``run_mobile_devices.py`` trains LeNet-5 on scikit-learn's digits with ``--device_num``
simulated devices (non-IID, each request to a random Server), printing the global model's test
accuracy after every iteration and writing ``accuracy.png``; then ``finish_mobile.py`` stops the
cluster (unless ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent


def run(script: str, *args: str, cwd: Path) -> str:
    """Run one of the guide's scripts and return what it printed (fails loudly on error)."""
    done = subprocess.run(
        [sys.executable, str(HERE / script), *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.exit(f"{script} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def wait_ready(manage_port: int, timeout: float) -> float:
    """Poll /state until CLUSTER_READY; return the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if (
                httpx.get(f"http://127.0.0.1:{manage_port}/state", timeout=2).json()["cluster_state"]
                == "CLUSTER_READY"
            ):
                return time.monotonic() - start
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.05)
    sys.exit(f"the cluster did not become ready within {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server_num", type=int, default=4)
    parser.add_argument("--scheduler_port", type=int, default=6667)
    parser.add_argument("--fl_server_port", type=int, default=6668)
    parser.add_argument("--scheduler_manage_port", type=int, default=11202)
    parser.add_argument("--device_num", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=None, help="where logs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="leave the cluster running")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="flcluster-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # The guide's config.json, plus the metrics file (one line per iteration) in the scratch directory.
    config = json.loads((HERE / "config.json").read_text())
    config["metrics"] = {"storage_type": 1, "storage_file_path": str(workdir / "metrics.json")}
    config_path = workdir / "config.json"
    config_path.write_text(json.dumps(config, indent=4))
    common = [
        "--scheduler_ip=127.0.0.1",
        f"--scheduler_port={args.scheduler_port}",
        f"--fl_server_port={args.fl_server_port}",
        f"--server_num={args.server_num}",
        f"--config_file_path={config_path}",
        f"--fl_iteration_num={args.iterations}",
        # The FLPlan every device trains with (the original's defaults, 25 epochs at lr 0.001, are
        # for phones; these suit the small digits data set).
        "--client_epoch_num=2",
        "--client_batch_size=16",
        "--client_learning_rate=0.05",
    ]
    launched = time.monotonic()
    print(
        run(
            "run_mobile_sched.py",
            *common,
            f"--scheduler_manage_port={args.scheduler_manage_port}",
            cwd=workdir,
        ),
        end="",
    )
    print(
        run("run_mobile_server.py", *common, f"--start_fl_job_threshold={args.device_num}", cwd=workdir),
        end="",
    )
    wait_ready(args.scheduler_manage_port, timeout=120)
    print(f"CLUSTER_READY {time.monotonic() - launched:.2f} s after launch (logs in {workdir})")
    nodes = httpx.get(f"http://127.0.0.1:{args.scheduler_manage_port}/nodes", timeout=5).json()
    print(json.dumps(nodes, indent=4))
    devices = [
        sys.executable,
        str(HERE / "run_mobile_devices.py"),
        f"--fl_server_port={args.fl_server_port}",
        f"--server_num={args.server_num}",
        f"--device_num={args.device_num}",
        "--mode=train",
        f"--iterations={args.iterations}",
        "--use_elb",
        f"--plot={workdir / 'accuracy.png'}",
    ]
    trained = subprocess.run(devices, cwd=workdir, check=False)
    if trained.returncode != 0:
        print(f"the devices failed (exit status {trained.returncode}); logs in {workdir}", file=sys.stderr)
    print(f"metrics.json: {workdir / 'metrics.json'}; accuracy plot: {workdir / 'accuracy.png'}")
    if args.keep:
        finish = HERE / "finish_mobile.py"
        print(f"left running; stop it with: python {finish} --scheduler_port={args.scheduler_port}")
        return
    print(run("finish_mobile.py", f"--scheduler_port={args.scheduler_port}", cwd=workdir), end="")


if __name__ == "__main__":
    main()
