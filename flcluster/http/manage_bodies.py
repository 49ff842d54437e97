"""Request bodies of the management API's operator endpoints (spec/management-api.md).

Theory of operation
-------------------
``/scaleout``, ``/scalein`` and ``/newInstance`` take a JSON object. Each body is judged here, before any
precondition of the cluster, in the order of the spec's table: empty, not a JSON object, a required key
missing, a count that is not an integer, a negative count. A refusal is a :class:`BodyRefused` carrying
the original's message; the caller answers it in the error shape (HTTP 400) and nothing changes. The
functions are pure (bytes in, values or a refusal out), so the unit tests check each refusal directly.

The original's restful tool sends counts as floats (``2.0``), so an integral float is an integer here; a
bool, a string or ``1.5`` is not.
"""

from __future__ import annotations

import json
from typing import Final

from flcluster.errors import BodyRefused

__all__ = [
    "EMPTY_BODY",
    "NEGATIVE",
    "WORKER_SCALE_OUT",
    "BodyRefused",
    "json_object",
    "new_instance_params",
    "scale_in_ids",
    "scale_out_count",
]

EMPTY_BODY: Final = "The post message size is invalid."
NEGATIVE: Final = "The value should not be less than 0."
WORKER_SCALE_OUT: Final = "The Worker does not currently support scale out."


def _missing(key: str) -> BodyRefused:
    return BodyRefused(f"The json is not contain the key:{key}")


def json_object(body: bytes) -> dict[str, object]:
    """The body as a JSON object.

    Raises:
        BodyRefused: empty, not JSON, or JSON that is not an object.
    """
    if not body:
        raise BodyRefused(EMPTY_BODY)
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BodyRefused(f"Illegal JSON format:{exc}") from None
    if not isinstance(value, dict):
        raise BodyRefused(f"Illegal JSON format:expected a JSON object, got {type(value).__name__}")
    return value


def _count(data: dict[str, object], key: str) -> int:
    if key not in data:
        raise _missing(key)
    value = data[key]
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral:
        raise BodyRefused(f"The value of the key:{key} should be an integer, got {value!r:.80}.")
    assert isinstance(value, int | float)
    if value < 0:
        raise BodyRefused(NEGATIVE)
    return int(value)


def scale_out_count(body: bytes) -> int:
    """``/scaleout``'s ``server_num`` increment (``worker_num`` must be 0).

    Raises:
        BodyRefused: the body breaks a rule of spec/management-api.md (``/scaleout`` and the body table).
    """
    data = json_object(body)
    workers = _count(data, "worker_num")
    servers = _count(data, "server_num")
    if workers > 0:
        raise BodyRefused(WORKER_SCALE_OUT)
    return servers


def scale_in_ids(body: bytes) -> tuple[str, ...]:
    """``/scalein``'s node ids (a repeated id once, in first-seen order; the machine judges each id).

    Raises:
        BodyRefused: the body breaks a rule of spec/management-api.md (``/scalein`` and the body table).
    """
    data = json_object(body)
    if "node_ids" not in data:
        raise _missing("node_ids")
    ids = data["node_ids"]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        what = f"{ids!r:.80}"
        raise BodyRefused(f"The value of the key:node_ids should be a list of node id strings, got {what}.")
    return tuple(dict.fromkeys(ids))


def new_instance_params(body: bytes) -> dict[str, object]:
    """``/newInstance``'s object, as sent (the leader judges the keys and values against the job's rules).

    Raises:
        BodyRefused: empty, or not a JSON object.
    """
    return json_object(body)
