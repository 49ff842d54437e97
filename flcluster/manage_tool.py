"""``flcluster scale`` and ``flcluster instance``: the operator's side of the management API.

Theory of operation
-------------------
Like the original's restful tool (reference §4), ``scale --servers N`` reads ``/nodes`` and turns the
wanted total into the request that makes it: ``/scaleout`` with ``{"worker_num": 0, "server_num": N - n}``
when ``N > n``, ``/scalein`` with the node ids of the ``n - N`` highest-ranked Servers when ``N < n``
(rank 0 leads and is never removed; the original's tool picks the highest pod indices, which are its
highest ranks), nothing when ``N == n``. :func:`scale_request` is that rule, pure, so it is tested alone.
``instance new|query|enable|disable`` map to ``/newInstance`` (the given ``--key value`` pairs as a JSON
object), ``/queryInstance``, ``/enableFLS`` and ``/disableFLS``.

Every request carries the management token and uses TLS as :mod:`flcluster.operator` says. The answer's
JSON is printed; the exit status is 0 for HTTP 200 with ``"code": "0"``, else 1.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence

import httpx

from flcluster.errors import ConfigError
from flcluster.operator import OperatorAccess

__all__ = ["INSTANCE_PATHS", "call", "instance_body", "scale_request"]

INSTANCE_PATHS = {
    "new": "/newInstance",
    "query": "/queryInstance",
    "enable": "/enableFLS",
    "disable": "/disableFLS",
}


def scale_request(nodes: Mapping[str, object], servers: int) -> tuple[str, dict[str, object]] | None:
    """The request that takes the cluster ``/nodes`` describes to ``servers`` Servers (None: nothing to do).

    Raises:
        ConfigError: ``servers`` is below 1, or ``/nodes`` is not the Scheduler's answer.
    """
    if servers < 1:
        raise ConfigError(f"--servers={servers!r}: a cluster needs at least 1 Server")
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


def instance_body(pairs: Sequence[str]) -> dict[str, object]:
    """``/newInstance``'s object from ``key=value`` pairs (values read as JSON numbers).

    Raises:
        ConfigError: a pair is not ``key=value`` with a number.
    """
    body: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        try:
            value = json.loads(text) if sep else None
        except json.JSONDecodeError:
            value = None
        if not key or isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{pair!r}: a new instance takes key=number pairs, e.g. fl_iteration_num=20")
        body[key] = value
    return body


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
        print(f"flcluster: {path} answered HTTP {status}", file=sys.stderr)
    return 0 if ok else 1
