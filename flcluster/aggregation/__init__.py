"""Aggregation: pure torch, no trio or HTTP (the runtime calls it through ``trio.to_thread.run_sync``).

- :mod:`~flcluster.aggregation.model`: the model's layout and the update check, immutable weights.
- :mod:`~flcluster.aggregation.fedavg`: running FedAvg sums, partial sums across Servers and their encoding.
- :mod:`~flcluster.aggregation.device`: the configured CPU/CUDA device.
- :mod:`~flcluster.aggregation.store`: the last models in memory and the getModel rule.
- :mod:`~flcluster.aggregation.checkpoint`: checkpoint files with working rotation.
- :mod:`~flcluster.aggregation.metrics`: the ``metrics.json`` line per iteration.

The rules and their reasons are in spec/aggregation.md.
"""

from __future__ import annotations

from flcluster.aggregation.checkpoint import (
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)
from flcluster.aggregation.device import resolve_device
from flcluster.aggregation.fedavg import FedAvgAccumulator, PartialSum, combine, finalize
from flcluster.aggregation.metrics import ClientVisitedInfo, InstanceStatus, IterationMetrics, MetricsWriter
from flcluster.aggregation.model import (
    CheckedUpdate,
    FeatureMaps,
    ModelSpec,
    ModelWeights,
    as_float32_tensor,
)
from flcluster.aggregation.store import ModelStore
from flcluster.errors import AggregationError, CheckpointError, UpdateRejected

__all__ = [
    "AggregationError",
    "CheckedUpdate",
    "CheckpointError",
    "ClientVisitedInfo",
    "FeatureMaps",
    "FedAvgAccumulator",
    "InstanceStatus",
    "IterationMetrics",
    "MetricsWriter",
    "ModelSpec",
    "ModelStore",
    "ModelWeights",
    "PartialSum",
    "UpdateRejected",
    "as_float32_tensor",
    "checkpoint_name",
    "combine",
    "finalize",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_checkpoint",
    "resolve_device",
    "save_checkpoint",
]
