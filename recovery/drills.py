"""``python -m recovery.drills [--drill NAME] [--seed S] [--repeat N] [--short] [--keep] [--list]``.

Plays the kill-and-restart drills (``recovery/drill.py``; README.md says what each kills and checks),
each in its own temporary directory, and prints for each its findings, its duration and the time from
each restart to the node serving again. Exit status 0 only when every finding of every drill passed.
``--keep`` keeps the work directories (logs, device log, stores) and prints where they are; a failing
drill's directory is always kept.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from recovery.drill import DRILLS, DrillResult, run_drill


def _print(result: DrillResult) -> None:
    print(f"== drill {result.name} (seed {result.seed}): {'PASS' if result.ok else 'FAIL'}", flush=True)
    for finding in result.findings:
        print(f"   {finding.line()}")
    for what, took in result.timings:
        print(f"   time {what}: {'never' if took is None else f'{took:.1f} s'}")
    print(f"   duration {result.duration:.1f} s; work directory {result.workdir}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the drills the arguments select; 0 when all passed."""
    parser = argparse.ArgumentParser(prog="python -m recovery.drills", description=__doc__)
    parser.add_argument(
        "--drill", action="append", default=[], help="a drill's name (repeatable); default: all"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the devices' updates (default 0)")
    parser.add_argument("--repeat", type=int, default=1, help="play each drill N times, seeds S, S+1, ...")
    parser.add_argument(
        "--short", action="store_true", help="the short set, with fewer devices and iterations"
    )
    parser.add_argument("--keep", action="store_true", help="keep every work directory")
    parser.add_argument("--list", action="store_true", help="list the drills and exit")
    args = parser.parse_args(argv)
    if args.list:
        for drill in DRILLS:
            print(f"{drill.name:28} {'short' if drill.short else '     '}  {drill.kills}")
        return 0
    known = {d.name: d for d in DRILLS}
    unknown = [name for name in args.drill if name not in known]
    if unknown:
        parser.error(f"unknown drill(s) {unknown}; known: {sorted(known)}")
    chosen = (
        [known[n] for n in args.drill] if args.drill else [d for d in DRILLS if d.short or not args.short]
    )
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat!r}")
    results: list[DrillResult] = []
    for round_ in range(args.repeat):
        for drill in chosen:
            workdir = Path(tempfile.mkdtemp(prefix=f"drill-{drill.name}-"))
            result = run_drill(drill, seed=args.seed + round_, short=args.short, workdir=workdir)
            _print(result)
            if result.ok and not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
            results.append(result)
    failed = [r for r in results if not r.ok]
    total = sum(r.duration for r in results)
    print(f"== {len(results) - len(failed)}/{len(results)} drills passed in {total:.0f} s", flush=True)
    for r in failed:
        print(f"   FAILED {r.name} (seed {r.seed}): {r.workdir}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
