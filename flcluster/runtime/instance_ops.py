"""The leader's answers to the Scheduler's instance operations (spec/cluster-protocol.md §9).

Theory of operation
-------------------
The Scheduler sends one ``instance_call`` to the rank-0 member per ``/newInstance``, ``/queryInstance``,
``/enableFLS`` and ``/disableFLS`` (spec/management-api.md). The Server that gets it answers with
:func:`answer_call` from its :class:`~flcluster.runtime.driver.Leader`, once what the operation changed
is committed to the leader's recovery store (when there is one):

- ``query_instance``: the nine values in force (the machine's :class:`IterationConfig` and the FLPlan
  values devices get now);
- ``disable`` / ``enable``: :class:`DisableRequested` / :class:`EnableRequested` (a finished job stays
  finished: the answer says so, and nothing changes);
- ``new_instance``: the request's object, judged key by key with the FLContext's own rules
  (:func:`flcluster.config.check_field`; an unknown key is refused), merged onto the values in force and
  built into a new :class:`IterationConfig` (whose rules are checked together), then
  :class:`NewInstanceRequested`; the machine says whether it applies now, later, or not at all. With a
  recovery store, one that applies now is answered after the commit that starts the stored history over
  (spec/cluster-protocol.md §9, "With recovery configured").

Every answer carries ``instance_state`` in its result, so the Scheduler can settle its own state
(``CLUSTER_DISABLE_FLS`` or not) from what the leader holds. A Server that does not lead answers
``ok=False``; the Scheduler then reports the operation as not answered in time.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Final

import attrs

from flcluster.config.context import FIELD_NAMES, check_field
from flcluster.core.iteration import (
    ClientParams,
    DisableRequested,
    EnableRequested,
    InstanceState,
    IterationConfig,
    NewInstanceRequested,
    OperatorAnswer,
)
from flcluster.errors import ConfigError, IllegalEvent
from flcluster.runtime.driver import Leader
from flcluster.wire.messages import InstanceAnswer, InstanceCall, InstanceOp

__all__ = ["INSTANCE_KEYS", "NOT_LEADER", "answer_call", "instance_values"]

log = logging.getLogger("flcluster.leader")

#: The keys ``/newInstance`` may change and ``/queryInstance`` shows (reference §3.8).
INSTANCE_KEYS: Final = (
    "start_fl_job_threshold",
    "start_fl_job_time_window",
    "update_model_ratio",
    "update_model_time_window",
    "fl_iteration_num",
    "client_epoch_num",
    "client_batch_size",
    "client_learning_rate",
    "global_iteration_time_window",
)
NOT_LEADER: Final = "This Server does not lead the cluster (it is not rank 0)."
#: The IterationConfig field of each instance key that is one.
_CONFIG_FIELDS: Final = {
    "start_fl_job_threshold": "start_fl_job_threshold",
    "start_fl_job_time_window": "start_fl_job_time_window",
    "update_model_ratio": "update_model_ratio",
    "update_model_time_window": "update_model_time_window",
    "fl_iteration_num": "fl_iteration_num",
    "global_iteration_time_window": "global_iteration_time_window",
}
_INTEGER_KEYS: Final = frozenset(INSTANCE_KEYS) - {"update_model_ratio", "client_learning_rate"}
_CLIENT_FIELDS: Final = {
    "client_epoch_num": "epochs",
    "client_batch_size": "mini_batch",
    "client_learning_rate": "lr",
}


def instance_values(leader: Leader) -> dict[str, object]:
    """The nine values in force on ``leader`` (``/queryInstance``'s result)."""
    config = leader.machine.config
    client = leader.rounds.client()
    values: dict[str, object] = {key: getattr(config, field) for key, field in _CONFIG_FIELDS.items()}
    values.update({key: getattr(client, field) for key, field in _CLIENT_FIELDS.items()})
    return {key: values[key] for key in INSTANCE_KEYS}


def _judged(
    params: object, config: IterationConfig, client: ClientParams
) -> tuple[IterationConfig, ClientParams]:
    """The config and FLPlan values a ``/newInstance`` object asks for.

    Raises:
        ValueError: a key is unknown or a value breaks its rule (the message says which).
    """
    if not isinstance(params, dict):
        raise ValueError(f"the new instance's parameters must be a JSON object, got {params!r:.80}")
    unknown = sorted(k for k in params if k not in INSTANCE_KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown!r}; a new instance may set {list(INSTANCE_KEYS)!r}")
    changes: dict[str, Any] = {}
    plan: dict[str, Any] = {}
    for key, value in params.items():
        assert key in FIELD_NAMES, key
        if key in _INTEGER_KEYS and isinstance(value, float) and value.is_integer():
            value = int(value)  # the restful tool sends floats
        try:
            checked = check_field(key, value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if key in _CONFIG_FIELDS:
            changes[_CONFIG_FIELDS[key]] = checked
        else:
            plan[_CLIENT_FIELDS[key]] = checked
    return attrs.evolve(config, **changes), attrs.evolve(client, **plan)


async def answer_call(leader: Leader | None, call: InstanceCall) -> InstanceAnswer:
    """The answer to one ``instance_call`` (see the module docstring)."""
    if leader is None:
        return InstanceAnswer(call.call_id, False, NOT_LEADER, "{}")
    ok, message = True, ""
    match call.op:
        case InstanceOp.QUERY_INSTANCE:
            pass
        case InstanceOp.DISABLE | InstanceOp.ENABLE if leader.machine.state is InstanceState.FINISHED:
            message = "The job has finished: it stays finished."
        case InstanceOp.DISABLE:
            leader.feed(DisableRequested(f"instance:{call.call_id}", leader.clock.now_ms()))
        case InstanceOp.ENABLE:
            leader.feed(EnableRequested(f"instance:{call.call_id}", leader.clock.now_ms()))
        case InstanceOp.NEW_INSTANCE:
            try:
                config, client = _judged(
                    json.loads(call.params), leader.machine.config, leader.rounds.client()
                )
                reply = leader.feed(
                    NewInstanceRequested(f"instance:{call.call_id}", config, client, leader.clock.now_ms())
                )
            except (ValueError, IllegalEvent) as exc:
                ok, message = False, str(exc)
            else:
                assert isinstance(reply, OperatorAnswer)
                ok, message = reply.changed, reply.message
    await leader.wait_durable()
    result: dict[str, object] = {"instance_state": leader.machine.state.value}
    if call.op is InstanceOp.QUERY_INSTANCE:
        result.update(instance_values(leader))
    log.info("instance operation %s: ok=%s %s", call.op.value, ok, message)
    return InstanceAnswer(call.call_id, ok, message, json.dumps(result))
