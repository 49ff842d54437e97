"""Node identity: which id a node registers with (``spec/configuration.md`` §7).

``MS_NODE_ID`` (read into ``FLContext.node_id``, or ``--node_id``), else ``config.json``'s ``node_id``, else a
random UUID, as the original. A node with a random id cannot be recovered after a restart.
"""

from __future__ import annotations

import uuid

from flcluster.config.context import FLContext
from flcluster.config.file import ClusterConfig

__all__ = ["resolve_node_id"]


def resolve_node_id(ctx: FLContext, cluster_config: ClusterConfig) -> str:
    """Return this node's id: ``ctx.node_id`` (``MS_NODE_ID`` or ``--node_id``), else ``config.json``'s
    ``node_id``, else a fresh random UUID (a node without a stable id cannot be recovered).
    """
    if ctx.node_id:
        return ctx.node_id
    if cluster_config.node_id:
        return cluster_config.node_id
    return str(uuid.uuid4())
