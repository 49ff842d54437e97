"""What a drill checks, computed from the device log alone: FedAvg per iteration and the model chain.

Theory of operation
-------------------
The checker never trusts the cluster's account of itself. From the device log (``recovery/devicelog.py``)
it takes, per iteration ``k``, the updates the cluster **acknowledged** (:func:`acknowledged_updates`):

- an updateModel answered ``SUCCEED``;
- or, after an updateModel of the same device and iteration whose answer was lost (no HTTP answer, or an
  HTTP error: the Server died between commit and answer, ``server.committed_not_acked`` in
  ``spec/recovery.md`` §5), a retry answered with the repeated-update reason
  (:func:`flcluster.core.iteration.reason_repeated_update`): the cluster says that update is in.

It recomputes each acknowledged upload from the seeded generator (``recovery/updates.py``; the logged
digest must match) and computes FedAvg independently, in numpy float64 (:func:`fedavg`):
``Σ upload_i / Σ data_size_i`` per tensor, the weights being the data sizes declared at startFLJob.

:func:`check_models` then walks iterations ``1 .. fl_iteration_num``. Whether iteration ``k`` completed
or failed is read from the leader's ``metrics.json`` (``iterationResult``); a completed iteration's model
must be FedAvg over exactly its acknowledged updates, a failed one's must be the previous model (carried
over), and the model every Server serves for ``k`` (getModel) must be that model within
:data:`RTOL` / :data:`ATOL` (float32 sums against float64; the differences seen are ~1e-7).
:func:`check_device_log` checks the log's own rules (each acknowledged update follows an accepted
startFLJob of that iteration with the same data size; no device acknowledged twice in one iteration; no
iteration outside ``1 .. fl_iteration_num``).

Every check yields a :class:`Finding`; a drill passes when none has ``ok=False``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import attrs
import numpy as np
import numpy.typing as npt

from flcluster.core.iteration import reason_repeated_update
from recovery.devicelog import HTTP, TRANSPORT, LogEntry
from recovery.updates import device_index, digest, update

__all__ = [
    "ATOL",
    "RTOL",
    "Ack",
    "Finding",
    "acknowledged_updates",
    "check_device_log",
    "check_models",
    "compare_model",
    "fedavg",
    "read_metrics",
]

#: The tolerance of a served (float32) model against the float64 FedAvg: |got − want| <= ATOL + RTOL·|want|.
RTOL = 1e-5
ATOL = 1e-6

Model = Mapping[str, npt.NDArray[np.floating]]


@attrs.frozen
class Finding:
    """One check's result: ``ok`` and what was seen."""

    check: str
    ok: bool
    detail: str

    def line(self) -> str:
        """``PASS check: detail`` / ``FAIL check: detail``."""
        return f"{'PASS' if self.ok else 'FAIL'} {self.check}: {self.detail}"


@attrs.frozen
class Ack:
    """One acknowledged update: the device, its iteration, its declared data size, how it was acknowledged."""

    fl_id: str
    iteration: int
    data_size: int
    digest: str
    how: str  # "SUCCEED" or "repeated"


def acknowledged_updates(entries: Iterable[LogEntry]) -> dict[int, list[Ack]]:
    """Iteration → the updates the cluster acknowledged in it (module docstring), in log order."""
    lost: set[tuple[str, int]] = set()
    acks: dict[int, list[Ack]] = defaultdict(list)
    for e in entries:
        if e.op != "updateModel":
            continue
        key = (e.fl_id, e.iteration)
        if e.retcode == "SUCCEED":
            acks[e.iteration].append(Ack(e.fl_id, e.iteration, e.data_size, e.digest, "SUCCEED"))
        elif e.retcode in (TRANSPORT, HTTP):
            lost.add(key)
        elif key in lost and e.reason == reason_repeated_update(e.fl_id):
            acks[e.iteration].append(Ack(e.fl_id, e.iteration, e.data_size, e.digest, "repeated"))
            lost.discard(key)
    return dict(acks)


def fedavg(acks: Sequence[Ack], sizes: Mapping[str, int], seed: int) -> dict[str, npt.NDArray[np.float64]]:
    """FedAvg over ``acks`` in float64: Σ upload / Σ data_size per tensor (uploads recomputed from the seed).

    Raises:
        ValueError: no update, or an upload whose recomputed digest differs from the one the device logged
            (the generator and the device disagree: the check itself would be wrong).
    """
    if not acks:
        raise ValueError("FedAvg over no update is undefined")
    total = {name: np.zeros(size, dtype=np.float64) for name, size in sizes.items()}
    weight = 0
    for ack in acks:
        upload = update(sizes, seed, device_index(ack.fl_id), ack.iteration, ack.data_size)
        if ack.digest and digest(upload) != ack.digest:
            raise ValueError(
                f"the upload of {ack.fl_id} in iteration {ack.iteration} recomputed from seed {seed} has "
                f"digest {digest(upload)!r}, but the device logged {ack.digest!r}"
            )
        for name, values in upload.items():
            total[name] += values.astype(np.float64)
        weight += ack.data_size
    return {name: values / weight for name, values in total.items()}


def compare_model(got: Model, want: Model) -> str | None:
    """``None`` when ``got`` equals ``want`` within the tolerance, else what differs."""
    if list(got) != list(want):
        return f"tensor names differ: got {list(got)[:4]}..., want {list(want)[:4]}..."
    for name in want:
        g = np.asarray(got[name], dtype=np.float64)
        w = np.asarray(want[name], dtype=np.float64)
        if g.shape != w.shape:
            return f"tensor {name!r} has {g.size} values, want {w.size}"
        excess = np.abs(g - w) - (ATOL + RTOL * np.abs(w))
        if np.any(excess > 0):
            i = int(np.argmax(excess))
            return (
                f"tensor {name!r}[{i}] is {g[i]!r}, want {w[i]!r} (|diff| {abs(g[i] - w[i]):.3g} > "
                f"atol {ATOL} + rtol {RTOL}·|want|)"
            )
    return None


def read_metrics(path: Path, *, skip: int = 0) -> dict[int, list[bool]]:
    """``metrics.json`` → iteration → the ``iterationResult`` of each line written for it (``success``).

    ``skip`` lines are left out first (those of an instance before a new instance, whose iteration numbers
    start again at 1).
    """
    results: dict[int, list[bool]] = defaultdict(list)
    if not path.exists():
        return {}
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for line in lines[skip:]:
        row = json.loads(line)
        results[int(row["currentIteration"])].append(row["iterationResult"] == "success")
    return dict(results)


def check_device_log(entries: Sequence[LogEntry], fl_iteration_num: int) -> list[Finding]:
    """The device log's own rules (module docstring)."""
    findings: list[Finding] = []
    started: dict[tuple[str, int], int] = {}
    for e in entries:
        if e.op == "startFLJob" and e.retcode == "SUCCEED":
            started[(e.fl_id, e.iteration)] = e.data_size
    acks = acknowledged_updates(entries)
    bad_order = []
    twice = []
    outside = []
    for k, items in sorted(acks.items()):
        if not 1 <= k <= fl_iteration_num:
            outside.append(f"{len(items)} in iteration {k}")
        seen: set[str] = set()
        for ack in items:
            if started.get((ack.fl_id, k)) != ack.data_size:
                bad_order.append(f"{ack.fl_id}@{k}")
            if ack.fl_id in seen:
                twice.append(f"{ack.fl_id}@{k}")
            seen.add(ack.fl_id)
    findings.append(
        Finding(
            "acks follow startFLJob",
            not bad_order,
            "every acknowledged update follows an accepted startFLJob of its iteration with its data size"
            if not bad_order
            else f"without a matching accepted startFLJob: {bad_order[:8]}",
        )
    )
    findings.append(
        Finding(
            "one ack per device and iteration",
            not twice,
            "no device was acknowledged twice in one iteration" if not twice else f"twice: {twice[:8]}",
        )
    )
    findings.append(
        Finding(
            "ack iterations in range",
            not outside,
            f"all in 1..{fl_iteration_num}" if not outside else f"outside 1..{fl_iteration_num}: {outside}",
        )
    )
    return findings


def check_models(
    *,
    fl_iteration_num: int,
    initial: Model,
    served: Mapping[str, Mapping[int, Model | None]],
    acks: Mapping[int, Sequence[Ack]],
    outcomes: Mapping[int, Sequence[bool]],
    seed: int,
) -> list[Finding]:
    """The model chain: each Server's model of every iteration against FedAvg or the carried-over model.

    Args:
        fl_iteration_num: iterations the job runs (1 .. this are checked).
        initial: the model of iteration 0 (fetched before any kill).
        served: Server label → iteration → the model it served with getModel (``None``: none served).
        acks: :func:`acknowledged_updates` of the device log.
        outcomes: :func:`read_metrics` of the leader's ``metrics.json``.
        seed: the drill's seed (to recompute the uploads).
    """
    findings: list[Finding] = []
    sizes = {name: int(np.asarray(values).size) for name, values in initial.items()}
    previous: Model = initial
    for label, models in served.items():
        wrong = "no model" if models.get(0) is None else compare_model(models[0] or {}, initial)
        if wrong:
            findings.append(Finding(f"model 0 on {label}", False, wrong))
    for k in range(1, fl_iteration_num + 1):
        results = list(outcomes.get(k, ()))
        updates = list(acks.get(k, ()))
        if len(results) != 1:
            findings.append(
                Finding(
                    f"iteration {k} ended once",
                    False,
                    f"metrics.json has {len(results)} lines for iteration {k} (want exactly 1)",
                )
            )
        completed = results[-1] if results else None
        want: Model
        if completed is None:
            # No account of the iteration: take whichever of the two the first Server's model is, so the
            # Servers can at least be compared with each other (the missing line is already a failure).
            first = next((m.get(k) for m in served.values() if m.get(k) is not None), None)
            candidate = fedavg(updates, sizes, seed) if updates else None
            if first is not None and candidate is not None and compare_model(first, candidate) is None:
                want, what = candidate, f"FedAvg over {len(updates)} acknowledged updates (inferred)"
            else:
                want, what = previous, "the previous model (inferred)"
        elif completed:
            if not updates:
                findings.append(
                    Finding(f"iteration {k}", False, "completed, but no device had an update acknowledged")
                )
                want, what = previous, "(nothing to average)"
            else:
                want, what = fedavg(updates, sizes, seed), f"FedAvg over {len(updates)} acknowledged updates"
        else:
            what = f"the previous model (failed; {len(updates)} updates had been acknowledged)"
            want = previous
        for label, models in served.items():
            got = models.get(k)
            if got is None:
                findings.append(Finding(f"model {k} on {label}", False, f"no model served; want {what}"))
                continue
            wrong = compare_model(got, want)
            detail = what if wrong is None else f"{wrong}; want {what}"
            findings.append(Finding(f"model {k} on {label}", wrong is None, detail))
        previous = want
    return findings
