"""The guide's launch scripts refuse a bad context on the operator's terminal, before starting anything."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "mobile"
REPO = EXAMPLES.parents[1]


@pytest.mark.parametrize("script", ["run_mobile_server.py", "run_mobile_sched.py"])
@pytest.mark.parametrize(
    ("flag", "said"),
    [
        ("--enable_ssl=True", "enable_ssl=True needs config_file_path"),
        ("--start_fl_job_threshold=-3", "start_fl_job_threshold"),
    ],
)
def test_a_refused_context_starts_no_process(script: str, flag: str, said: str, tmp_path: Path) -> None:
    shutil.copy(EXAMPLES / script, tmp_path / script)
    out = subprocess.run(
        [sys.executable, script, "--scheduler_ip=127.0.0.1", "--server_num=2", *flag.split()],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out
    assert said in out.stderr and "started" not in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [script]  # no server_<i>/ or scheduler/
