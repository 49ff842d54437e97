"""flcluster: a federated-learning cloud cluster (one Scheduler, N Servers, devices over HTTP).

The public API for training scripts, as MindSpore's::

    import flcluster
    flcluster.set_fl_context(ms_role="MS_SERVER", server_num=4, scheduler_ip="127.0.0.1", ...)
    flcluster.run_role()
"""

from __future__ import annotations

from flcluster.config import FLContext, get_fl_context, reset_fl_context, set_fl_context
from flcluster.errors import ClusterError, ConfigError, FLClusterError, ProtocolError
from flcluster.roles import run_role

__version__ = "0.1.0"

__all__ = [
    "ClusterError",
    "ConfigError",
    "FLClusterError",
    "FLContext",
    "ProtocolError",
    "get_fl_context",
    "reset_fl_context",
    "run_role",
    "set_fl_context",
]
