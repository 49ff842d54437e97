"""flcluster: a federated-learning cloud cluster (one Scheduler, N Servers, devices over HTTP).

The public API for training scripts, as MindSpore's::

    import flcluster
    flcluster.set_fl_context(ms_role="MS_SERVER", server_num=4, scheduler_ip="127.0.0.1", ...)
    flcluster.run_role()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flcluster.config import FLContext, get_fl_context, reset_fl_context, set_fl_context
from flcluster.errors import ClusterError, ConfigError, FLClusterError, ProtocolError

if TYPE_CHECKING:
    from flcluster.client.device import Device
    from flcluster.client.simulator import SimulatorConfig, simulate
    from flcluster.roles import run_role

__version__ = "0.1.0"

# Imported on first use: a Scheduler (and a script that only sets the context) never loads torch.
_LAZY = {
    "run_role": "flcluster.roles",
    "Device": "flcluster.client.device",
    "SimulatorConfig": "flcluster.client.simulator",
    "simulate": "flcluster.client.simulator",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flcluster' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "ClusterError",
    "ConfigError",
    "Device",
    "FLClusterError",
    "FLContext",
    "ProtocolError",
    "SimulatorConfig",
    "get_fl_context",
    "reset_fl_context",
    "run_role",
    "set_fl_context",
    "simulate",
]
