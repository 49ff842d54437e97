"""The device side of flcluster: a device SDK, a simulator of many devices, LeNet-5 and data sets.

- :mod:`flcluster.client.device`: :class:`Device` speaks the original's device protocol over HTTP and reacts
  to every answer as the original's client does (:meth:`Device.run_iteration`).
- :mod:`flcluster.client.simulator`: :func:`simulate` runs a fleet of devices (real LeNet-5 training on real
  data, or synthetic uploads for load) against a cluster's device ports.
- :mod:`flcluster.client.plot`: :func:`plot_accuracy` draws a simulation's accuracy per iteration.
- :mod:`flcluster.client.lenet`, :mod:`flcluster.client.datasets`, :mod:`flcluster.client.training`: the
  model, the data and local training.
"""

from __future__ import annotations

from flcluster.client.datasets import (
    FEMNIST_NUM_CLASSES,
    Dataset,
    dirichlet_partition,
    load_digits_dataset,
    load_leaf_femnist,
    load_mnist_idx,
    train_test_split,
)
from flcluster.client.device import (
    MAX_SLEEP_TIME_MS,
    RESTART_TIME_PER_ITER,
    Device,
    DeviceHTTPError,
    DevicePolicy,
    DeviceTransportError,
    GetModelResult,
    IterationOutcome,
    IterationReport,
    MalformedAnswer,
    ModelUnavailable,
    ServerText,
    StartFLJobResult,
    Trainer,
    TrainingTask,
    TrainResult,
    UpdateModelResult,
    wall_clock_ms,
)
from flcluster.client.lenet import (
    LENET_INPUT_SIDE,
    LENET_TENSOR_ORDER,
    LeNet5,
    lenet_shapes,
    make_lenet,
    ordered_weights,
)
from flcluster.client.plot import plot_accuracy
from flcluster.client.simulator import (
    IterationSummary,
    SimulationReport,
    SimulatorConfig,
    default_servers,
    lenet_sizes,
    simulate,
    synthetic_update,
)
from flcluster.client.training import LocalResult, evaluate, lenet_from_weights, premultiply, train_local

__all__ = [
    "FEMNIST_NUM_CLASSES",
    "LENET_INPUT_SIDE",
    "LENET_TENSOR_ORDER",
    "MAX_SLEEP_TIME_MS",
    "RESTART_TIME_PER_ITER",
    "Dataset",
    "Device",
    "DeviceHTTPError",
    "DevicePolicy",
    "DeviceTransportError",
    "GetModelResult",
    "IterationOutcome",
    "IterationReport",
    "IterationSummary",
    "LeNet5",
    "LocalResult",
    "MalformedAnswer",
    "ModelUnavailable",
    "ServerText",
    "SimulationReport",
    "SimulatorConfig",
    "StartFLJobResult",
    "TrainResult",
    "Trainer",
    "TrainingTask",
    "UpdateModelResult",
    "default_servers",
    "dirichlet_partition",
    "evaluate",
    "lenet_from_weights",
    "lenet_shapes",
    "lenet_sizes",
    "load_digits_dataset",
    "load_leaf_femnist",
    "load_mnist_idx",
    "make_lenet",
    "ordered_weights",
    "plot_accuracy",
    "premultiply",
    "simulate",
    "synthetic_update",
    "train_local",
    "train_test_split",
    "wall_clock_ms",
]
