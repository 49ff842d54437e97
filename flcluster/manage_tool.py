"""``flcluster scale`` and ``flcluster instance``: the operator's side of the management API.

Theory of operation
-------------------
Like the original's restful tool (reference §4), ``scale --servers N`` reads ``/nodes`` and turns the
wanted total into the request that makes it: ``/scaleout`` with ``{"worker_num": 0, "server_num": N - n}``
when ``N > n``, ``/scalein`` with the node ids of the ``n - N`` highest-ranked Servers when ``N < n``
(rank 0 leads and is never removed; the original's tool picks the highest pod indices, which are its
highest ranks), nothing when ``N == n``. :func:`scale_request` is that rule, pure, so it is tested alone.
A wanted total below 1 is refused before the Scheduler is asked anything.

A scaling only begins with the answer: :func:`scale_next_step` is what the operator must do next, printed
after it. A scale-out waits for the new Servers, which the operator starts with the new total
(``--server_num=N``) and node ids no Server uses, as the guide's ``--node_id=scale_node``; a scale-in
releases the chosen Servers, which stay up until they get SIGTERM (spec/cluster-protocol.md §8).

``instance new|query|enable|disable`` map to ``/newInstance`` (the given ``KEY=VALUE`` pairs as a JSON
object of numbers), ``/queryInstance``, ``/enableFLS`` and ``/disableFLS``.

Every request carries the management token and uses TLS as :mod:`flcluster.operator` says. The answer's
JSON is printed; the exit status is 0 for HTTP 200 with ``"code": "0"``, else 1, with
:func:`refusal_line` on stderr: the Scheduler's ``error_message`` and, for a refused new instance (HTTP
200 with ``"code": "1"``, as the original), the leader's ``reason``.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence

import httpx

from flcluster.errors import ConfigError
from flcluster.operator import OperatorAccess

__all__ = [
    "INSTANCE_PATHS",
    "call",
    "check_server_total",
    "instance_body",
    "refusal_line",
    "scale_next_step",
    "scale_request",
]

INSTANCE_PATHS = {
    "new": "/newInstance",
    "query": "/queryInstance",
    "enable": "/enableFLS",
    "disable": "/disableFLS",
}


def check_server_total(servers: int) -> None:
    """Refuse a wanted total of Servers below 1.

    Raises:
        ConfigError: ``servers`` is below 1.
    """
    if servers < 1:
        raise ConfigError(f"--servers={servers!r}: a cluster needs at least 1 Server")


def scale_request(nodes: Mapping[str, object], servers: int) -> tuple[str, dict[str, object]] | None:
    """The request that takes the cluster ``/nodes`` describes to ``servers`` Servers (None: nothing to do).

    Raises:
        ConfigError: ``servers`` is below 1, or ``/nodes`` is not the Scheduler's answer.
    """
    check_server_total(servers)
    rows = nodes.get("nodeIds")
    if not isinstance(rows, list):
        raise ConfigError(f"/nodes did not answer a node list: {json.dumps(nodes)[:200]}")
    ranked: list[tuple[int, str]] = []
    for row in rows:
        if isinstance(row, dict) and row.get("role") == "SERVER":
            ranked.append((int(str(row["rankId"])), str(row["nodeId"])))
    ranked.sort()
    current = len(ranked)
    if servers > current:
        return "/scaleout", {"worker_num": 0, "server_num": servers - current}
    if servers < current:
        return "/scalein", {"node_ids": [node_id for _rank, node_id in ranked[servers:]]}
    return None


def scale_next_step(path: str, body: Mapping[str, object], servers: int) -> str:
    """What the operator does once ``path`` (``/scaleout`` or ``/scalein``) has been accepted."""
    if path == "/scaleout":
        k = body["server_num"]
        noun = "Server" if k == 1 else "Servers"
        return (
            f"flcluster: the cluster waits for {k} new {noun}: start them with --server_num={servers} and "
            f"node ids no Server uses, e.g. flcluster server --node_id=scale_node --server_num={servers} "
            f"--local_server_num={k} and the cluster's other flags; the cluster is CLUSTER_READY again "
            "once they have joined (a scaling not done within scaling_timeout is rolled back)"
        )
    ids = body["node_ids"]
    assert isinstance(ids, list)
    return (
        f"flcluster: Servers {', '.join(map(str, ids))} leave the cluster once the running iteration has "
        "ended (CLUSTER_READY again); each then logs that it was scaled in and stays up until it gets "
        "SIGTERM (kill -15 <pid>)"
    )


def _finite(text: str) -> float:
    raise ValueError(f"{text} is not a finite number")


def instance_body(pairs: Sequence[str]) -> dict[str, object]:
    """``/newInstance``'s object from ``key=value`` pairs (values read as finite JSON numbers).

    Raises:
        ConfigError: a pair is not ``key=value`` with a finite number.
    """
    body: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        try:
            value = json.loads(text, parse_constant=_finite) if sep else None
        except ValueError:  # json.JSONDecodeError is one
            value = None
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not key or not number or (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(
                f"{pair!r}: a new instance takes key=number pairs (finite numbers), e.g. fl_iteration_num=20"
            )
        body[key] = value
    return body


def refusal_line(path: str, status: int, answer: object) -> str:
    """The stderr line of a refused request: the Scheduler's ``error_message`` and the leader's ``reason``."""
    if not isinstance(answer, dict):
        return f"flcluster: {path} answered HTTP {status} with {json.dumps(answer)[:200]}"
    words = [str(answer[key]) for key in ("error_message", "reason") if answer.get(key)]
    why = " ".join(words) if words else json.dumps(answer)[:200]
    return f"flcluster: {path} was refused (HTTP {status}): {why}"


def call(
    base: str, path: str, access: OperatorAccess, body: dict[str, object] | None = None
) -> tuple[int, object]:
    """Send one management request; return the HTTP status and the JSON answer.

    Raises:
        ConfigError: the management port did not answer.
    """
    try:
        response = httpx.post(
            f"{base}{path}",
            content=b"" if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **access.headers()},
            verify=access.https if access.https is not None else True,
            timeout=60.0,
        )
    except httpx.HTTPError as exc:
        raise ConfigError(f"the Scheduler's management port at {base} did not answer: {exc}") from None
    try:
        answer = response.json()
    except ValueError:
        answer = {"code": "1", "error_message": response.text[:200]}
    return response.status_code, answer


def run(base: str, path: str, access: OperatorAccess, body: dict[str, object] | None = None) -> int:
    """:func:`call`, print the answer, and return the exit status."""
    status, answer = call(base, path, access, body)
    print(json.dumps(answer, indent=4))
    ok = status == 200 and isinstance(answer, dict) and answer.get("code") == "0"
    if not ok:
        print(refusal_line(path, status, answer), file=sys.stderr)
    return 0 if ok else 1
