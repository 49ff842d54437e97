"""The guide's scripts with ``--enable_ssl=True`` (spec/cluster-protocol.md §7), real processes on loopback.

The Scheduler and two Servers start from the guide's launch scripts with the original's p12 files and
passwords; the management port is HTTPS with an access token, ``flcluster state`` reaches it with the
cluster's ``config.json``; devices get HTTPS answers; ``finish_mobile.py`` finishes the cluster over TLS
with the token, after a try without the token changed nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from flcluster.tls import https_client_context
from flcluster.wire.client_codec import decode_start_fl_job_response
from flcluster.wire.codes import ResponseCode
from recovery.harness import (
    REPO,
    copy_examples,
    kill_leftovers,
    run_script,
    started_pids,
    wait_for_log_line,
    wait_gone,
)
from tests.helpers import free_ports
from tests.tls_material import CLIENT_PASSWORD, SERVER_PASSWORD, make_pki

pytestmark = pytest.mark.integration

TOKEN = "integration-token-0123456789"


def test_guide_scripts_with_tls_and_a_management_token(tmp_path: Path) -> None:
    sched_port, manage_port, base = free_ports(3)
    fl_port = 21000 + base % 20000
    mobile = copy_examples(tmp_path)
    pki = make_pki(tmp_path / "pki")
    config = mobile / "config.json"
    config.write_text(
        json.dumps(
            {
                "server_cert_path": str(pki.server_p12),
                "client_cert_path": str(pki.client_p12),
                "ca_cert_path": str(pki.ca_path),
                "manage_token": TOKEN,
            }
        )
    )
    tls = [
        "--enable_ssl=True",
        f"--server_password={SERVER_PASSWORD}",
        f"--client_password={CLIENT_PASSWORD}",
        f"--config_file_path={config}",
    ]
    common = ["--scheduler_ip=127.0.0.1", f"--scheduler_port={sched_port}", "--server_num=2", *tls]
    try:
        sched = run_script(
            mobile,
            "run_mobile_sched.py",
            [*common, f"--fl_server_port={fl_port}", f"--scheduler_manage_port={manage_port}"],
        )
        assert sched.returncode == 0, sched.stderr
        servers = run_script(mobile, "run_mobile_server.py", [*common, f"--fl_server_port={fl_port}"])
        assert servers.returncode == 0, servers.stderr
        pids = started_pids(sched.stdout) + started_pids(servers.stdout)
        assert len(pids) == 3
        for i in range(2):
            wait_for_log_line(mobile / f"server_{i}" / "server.log", "Server started successfully.")

        state = [sys.executable, "-m", "flcluster", "state", f"--scheduler_manage_port={manage_port}"]
        env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
        deadline = time.monotonic() + 60
        while True:
            out = subprocess.run(
                [*state, f"--config_file_path={config}", "--enable_ssl=True"],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
                check=False,
            )
            if out.returncode == 0 and json.loads(out.stdout)["cluster_state"] == "CLUSTER_READY":
                break
            assert time.monotonic() < deadline, out
            time.sleep(0.2)
        # Without the token (but with TLS): 401.
        refused = httpx.get(
            f"https://127.0.0.1:{manage_port}/state", verify=https_client_context(str(pki.ca_path))
        )
        assert refused.status_code == 401

        with httpx.Client(verify=https_client_context(str(pki.ca_path))) as client:
            for i in range(2):
                answer = client.post(f"https://127.0.0.1:{fl_port + i}/startFLJob", content=b"\x00" * 16)
                assert answer.status_code == 200
                assert decode_start_fl_job_response(answer.content).retcode == ResponseCode.RequestError

        def finish(*args: str, token: str = "") -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "finish_mobile.py", f"--scheduler_port={sched_port}", *args],
                cwd=mobile,
                env={**env, **({"FLCLUSTER_MANAGE_TOKEN": token} if token else {})},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        # TLS without the files: refused on the operator's terminal.
        no_files = finish("--enable_ssl=True")
        assert no_files.returncode == 1 and "enable_ssl=True needs config_file_path" in no_files.stderr
        # Over TLS with a wrong token: refused by the Scheduler; nothing signalled, the cluster runs on.
        wrong = finish("--enable_ssl=True", *tls[2:], token="a-wrong-token-of-some-length")
        assert wrong.returncode == 1 and "finish_cluster is refused" in wrong.stderr, wrong.stderr
        assert "killed" not in wrong.stdout and wait_gone(pids, timeout=0.5) == pids
        # With the token from config.json: finished.
        done = finish("--enable_ssl=True", *tls[2:])
        assert done.returncode == 0, done.stderr
        killed = [int(p) for p in re.findall(r"^killed (\d+)$", done.stdout, re.MULTILINE)]
        assert sorted(killed) == sorted(pids)
        assert wait_gone(pids, timeout=5) == []
        assert "TLS on for this Scheduler" in (mobile / "scheduler" / "scheduler.log").read_text()
    finally:
        kill_leftovers(sched_port)
