"""Local training for simulated devices: plain SGD on LeNet-5, evaluation, and the upload convention.

A device in MindSpore Federated receives the global model (a flat list of named float32 tensors), trains it
on its own data, and uploads every tensor multiplied by the data size it declared at startFLJob; the server
sums the uploads and divides by the sum of the sizes (``reference/mindspore-fl-behaviour.md`` §2.6 and §7:
the simulator's ``after = data × 32``). :func:`premultiply` produces that upload; FedAvg on the server side is
then ``sum(premultiplied) / sum(sizes)``.

:func:`train_local` is a pure function of its inputs: it builds a fresh model from the given weights,
shuffles with a private :class:`torch.Generator` seeded by ``seed``, and returns new tensors. It never reads
or advances torch's global random state and never changes ``torch.set_num_threads``, so it can run in worker
threads beside other code. On CPU, the same weights, data and seed give bit-identical results for a given
torch build and intra-op thread count (a different thread count changes float sums in the last bits).

Speed: one epoch over ~90 samples costs 20-50 ms of CPU (batch 32; about 1.5× that at batch 8). On a
busy machine torch's OpenMP threads spin at every barrier when they lose their core, which can make small
LeNet steps 10-20× slower; a caller that trains many devices at once should pick the thread count
(``torch.set_num_threads``) for the whole process itself, as the simulator's ``torch_threads`` does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import attrs
import numpy as np
import numpy.typing as npt
import torch
from torch.nn import functional as F

from flcluster.client.datasets import Dataset
from flcluster.client.lenet import LENET_TENSOR_ORDER, LeNet5, lenet_shapes, ordered_weights
from flcluster.errors import ConfigError

__all__ = ["LocalResult", "evaluate", "lenet_from_weights", "premultiply", "train_local"]

_CONV1_PER_CHANNEL = 6 * 5 * 5


@attrs.frozen(eq=False)
class LocalResult:
    """What one device's local training produced.

    Attributes:
        weights: The trained tensors, shaped as LeNet-5's, in
            :data:`~flcluster.client.lenet.LENET_TENSOR_ORDER`.
        loss: Mean cross-entropy over the samples of the last epoch (measured while training).
        num_samples: Number of samples trained on (the data size a device declares).
    """

    weights: dict[str, torch.Tensor]
    loss: float
    num_samples: int


def lenet_from_weights(weights: Mapping[str, torch.Tensor]) -> LeNet5:
    """Build a :class:`LeNet5` holding ``weights`` (copied).

    The class and channel counts are read from ``fc3.bias`` and ``conv1.weight``. Tensors may be shaped or
    flat (as they travel on the wire); a flat tensor is reshaped when its size matches.

    Args:
        weights: Exactly the eight LeNet-5 tensors, by name.

    Returns:
        A new model on CPU holding float32 copies of the weights.

    Raises:
        ConfigError: If a name is missing or unknown, or a tensor has the wrong number of elements.
    """
    names, expected = set(weights), set(LENET_TENSOR_ORDER)
    if names != expected:
        raise ConfigError(
            f"LeNet-5 weights must be exactly {list(LENET_TENSOR_ORDER)!r}: missing "
            f"{sorted(expected - names)!r}, unexpected {sorted(names - expected)!r}"
        )
    num_classes = weights["fc3.bias"].numel()
    conv1 = weights["conv1.weight"].numel()
    if num_classes < 1 or conv1 == 0 or conv1 % _CONV1_PER_CHANNEL:
        raise ConfigError(
            f"LeNet-5 fc3.bias must be non-empty and conv1.weight a multiple of {_CONV1_PER_CHANNEL!r} "
            f"elements, got {num_classes!r} and {conv1!r}"
        )
    shapes = lenet_shapes(num_classes, conv1 // _CONV1_PER_CHANNEL)
    state: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        tensor = weights[name]
        if tensor.numel() != math.prod(shape):
            raise ConfigError(
                f"LeNet-5 tensor {name!r} must have {math.prod(shape)!r} elements (shape {shape!r}), got "
                f"{tensor.numel()!r} (shape {tuple(tensor.shape)!r})"
            )
        state[name] = tensor.detach().reshape(shape)
    model = LeNet5(num_classes, conv1 // _CONV1_PER_CHANNEL)
    model.load_state_dict(state)
    return model


def _check_labels(model: LeNet5, data: Dataset) -> None:
    if len(data) == 0:
        raise ConfigError("the data set is empty: a device needs at least one sample")
    top = int(data.y.max())
    if top >= model.num_classes:
        raise ConfigError(f"label {top!r} is out of range for a model with {model.num_classes!r} classes")


def _positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")


def train_local(
    model_weights: Mapping[str, torch.Tensor],
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> LocalResult:
    """Train LeNet-5 on one device's data with plain SGD and cross-entropy, on CPU.

    Each epoch visits every sample once in an order drawn from a generator seeded with ``seed``; the last
    batch of an epoch may be smaller. The input weights are not modified.

    Args:
        model_weights: The global model, as given to :func:`lenet_from_weights`.
        data: The device's samples.
        epochs: Passes over the data, >= 1.
        batch_size: Samples per SGD step, >= 1.
        lr: Learning rate, finite and > 0.
        seed: Seed of the shuffling (same inputs and seed, same result).

    Returns:
        The trained weights, the last epoch's mean loss and the sample count.

    Raises:
        ConfigError: On bad weights, an empty data set, a label beyond the model's classes, or a bad
            hyper-parameter.
    """
    _positive_int("epochs", epochs)
    _positive_int("batch_size", batch_size)
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be a finite number > 0, got {lr!r}")
    model = lenet_from_weights(model_weights)
    _check_labels(model, data)
    model.train()
    params: list[torch.Tensor] = list(model.parameters())
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    n = len(data)
    epoch_loss = torch.zeros((), dtype=torch.float64)
    for _ in range(epochs):
        epoch_loss = torch.zeros((), dtype=torch.float64)
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(model(data.x[index]), data.y[index])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for param, grad in zip(params, grads, strict=True):
                    param.sub_(grad, alpha=lr)  # plain SGD: w <- w - lr * grad
            epoch_loss += loss.detach().double() * index.numel()
    trained = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    return LocalResult(weights=ordered_weights(trained), loss=float(epoch_loss) / n, num_samples=n)


def evaluate(
    weights: Mapping[str, torch.Tensor], data: Dataset, *, batch_size: int = 512
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of LeNet-5 with ``weights`` on ``data``.

    Args:
        weights: The model, as given to :func:`lenet_from_weights`.
        data: Samples to score.
        batch_size: Samples per forward pass (memory only; the result does not depend on it).

    Returns:
        ``(accuracy, loss)``: the share of correct predictions in [0, 1] and the mean loss per sample.

    Raises:
        ConfigError: On bad weights, an empty data set or a label beyond the model's classes.
    """
    _positive_int("batch_size", batch_size)
    model = lenet_from_weights(weights)
    _check_labels(model, data)
    model.eval()
    correct = 0
    total_loss = 0.0
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            logits = model(data.x[start : start + batch_size])
            labels = data.y[start : start + batch_size]
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=1) == labels).sum())
    return correct / len(data), total_loss / len(data)


def premultiply(
    weights: Mapping[str, torch.Tensor | npt.NDArray[np.floating]], data_size: int
) -> dict[str, npt.NDArray[np.float32]]:
    """A device's upload in the original's convention: every tensor times the device's data size.

    Args:
        weights: Named tensors (torch or numpy), e.g. :attr:`LocalResult.weights`.
        data_size: The data size the device declared at startFLJob, >= 1.

    Returns:
        Flat (1-D) float32 arrays, LeNet-5 names in :data:`~flcluster.client.lenet.LENET_TENSOR_ORDER` first,
        any other names after them in their given order.

    Raises:
        ConfigError: If ``data_size`` is not a positive int.
    """
    _positive_int("data_size", data_size)
    result: dict[str, npt.NDArray[np.float32]] = {}
    for name, value in ordered_weights(weights).items():
        if isinstance(value, torch.Tensor):
            array = value.detach().cpu().to(torch.float32).reshape(-1).numpy()
        else:
            array = np.asarray(value, dtype=np.float32).reshape(-1)
        result[name] = array * np.float32(data_size)
    return result
