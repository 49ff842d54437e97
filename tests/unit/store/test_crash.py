"""A real crash (STYLE rule 13): a child commits in a loop and acknowledges each commit on stdout; it is
SIGKILLed at a random moment, three times over; every reopen must show every acknowledged transition,
and a state that is exactly the one after some transition (no half-committed group).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import trio

from flcluster.store import PartialSumState, StoreContents, open_sqlite_store
from tests.unit.store import crash_writer as child

REPO = Path(__file__).resolve().parents[3]
ROUNDS = 3


def run_and_kill(path: Path, rng: random.Random) -> int:
    """Run the child until it has acknowledged a few hundred commits, SIGKILL it; the last n acknowledged."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.unit.store.crash_writer", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    acked: list[int] = []
    assert proc.stdout is not None

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.endswith(b"\n"):  # a line cut by the kill is no acknowledgement
                acked.append(int(line.split()[1]))

    reader = threading.Thread(target=read)
    reader.start()
    target = rng.randrange(50, 400)
    deadline = time.monotonic() + 60
    while len(acked) < target and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(rng.random() * 0.05)  # kill somewhere inside a transaction, not just after one
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join()
    assert proc.stderr is not None
    stderr = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, stderr
    assert len(acked) >= target, f"the child acknowledged {len(acked)} of {target} commits: {stderr}"
    return max(acked)


def committed_state(contents: StoreContents) -> int:
    """The n of the last transition committed, after checking the store holds exactly its state."""
    partial = contents.partial
    assert partial is not None
    last = child.written_by(partial.data)
    iteration = child.iteration_of(last)
    start = (iteration - 1) * child.PER_ITERATION
    folds = tuple(f"dev-{k}" for k in range(start + 1, last + 1) if k % child.PER_ITERATION)
    assert partial == PartialSumState(iteration, child.blob(last), folds, len(folds))
    if iteration > 1:
        assert contents.server is not None and contents.server.iteration == iteration
        assert contents.models[-1].iteration == iteration - 1
        assert contents.models[-1].weights == child.blob(start)
        assert len(contents.models) == min(3, iteration - 1)
    return last


async def reopen(path: Path) -> StoreContents:
    async with open_sqlite_store(path, child.IDENTITY) as store:
        return await store.load()


def test_every_acknowledged_commit_survives_sigkill(tmp_path: Path) -> None:
    rng = random.Random(os.getpid() ^ int(time.time()))
    path = tmp_path / "crash.sqlite"
    previous = 0
    for _ in range(ROUNDS):
        last_acked = run_and_kill(path, rng)
        last = committed_state(trio.run(reopen, path))
        assert last >= last_acked, f"transition {last_acked} was acknowledged but the store ends at {last}"
        assert last > previous
        previous = last
