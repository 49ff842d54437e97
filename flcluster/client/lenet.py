"""LeNet-5 as in MindSpore Federated's mobile example, in torch, with the original's tensor names.

The cloud cluster only ever sees a flat list of named float32 tensors (see
``reference/mindspore-fl-behaviour.md`` §2.6). For the guide's ``LeNet5(62)`` those are, in the order the
original simulator sends them (:data:`LENET_TENSOR_ORDER`)::

    conv1.weight  6×3×5×5   450      (no bias: MindSpore's Conv2d has has_bias=False by default)
    conv2.weight  16×6×5×5  2400     (no bias)
    fc1.weight    120×400   48000
    fc2.weight    84×120    10080
    fc3.weight    62×84     5208
    fc1.bias      120
    fc2.bias      84
    fc3.bias      62                 total 66 404 floats

The network is conv(5×5, valid) → ReLU → max-pool 2 → conv(5×5, valid) → ReLU → max-pool 2 → flatten → three
dense layers with ReLU between them, on 3×32×32 inputs.

Initialisation is deterministic and never touches torch's global random state: sub-modules are built on
the meta device and filled from a private :class:`torch.Generator` seeded by the caller, so two
processes that call :func:`make_lenet` with the same seed hold bit-identical weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TypeVar

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "LENET_INPUT_SIDE",
    "LENET_TENSOR_ORDER",
    "LeNet5",
    "lenet_shapes",
    "make_lenet",
    "ordered_weights",
]

LENET_TENSOR_ORDER: tuple[str, ...] = (
    "conv1.weight",
    "conv2.weight",
    "fc1.weight",
    "fc2.weight",
    "fc3.weight",
    "fc1.bias",
    "fc2.bias",
    "fc3.bias",
)
"""Tensor names in the order the original simulator sends them (weights first, then biases)."""

LENET_INPUT_SIDE = 32
"""Side of the square images LeNet-5 takes (the 16×5×5 flatten of ``fc1`` depends on it)."""

_KERNEL = 5
_T = TypeVar("_T")


def lenet_shapes(num_classes: int = 62, num_channels: int = 3) -> dict[str, tuple[int, ...]]:
    """Shape of every LeNet-5 tensor, keyed by name, in :data:`LENET_TENSOR_ORDER`.

    Args:
        num_classes: Size of the output layer (62 for FEMNIST, the guide's default).
        num_channels: Input channels (3 in the guide).

    Returns:
        ``{name: shape}`` in the original's order.
    """
    return {
        "conv1.weight": (6, num_channels, _KERNEL, _KERNEL),
        "conv2.weight": (16, 6, _KERNEL, _KERNEL),
        "fc1.weight": (120, 16 * 5 * 5),
        "fc2.weight": (84, 120),
        "fc3.weight": (num_classes, 84),
        "fc1.bias": (120,),
        "fc2.bias": (84,),
        "fc3.bias": (num_classes,),
    }


class LeNet5(nn.Module):
    """LeNet-5 for 32×32 images with the tensor names and sizes of MindSpore's ``LeNet5``.

    The constructor initialises the weights as :func:`make_lenet` with seed 0 does; use :func:`make_lenet` to
    choose the seed.

    Args:
        num_classes: Number of output classes (62 in the guide's example).
        num_channels: Number of input channels (3 in the guide's example).

    Raises:
        ValueError: If either argument is not a positive integer.
    """

    def __init__(self, num_classes: int = 62, num_channels: int = 3) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("num_channels", num_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LeNet5 {name} must be a positive int, got {value!r}")
        self.num_classes = num_classes
        self.num_channels = num_channels
        # Built on the meta device (no storage, no draw from the global generator), then given real storage.
        meta = torch.device("meta")
        self.conv1 = nn.Conv2d(num_channels, 6, _KERNEL, bias=False, device=meta)
        self.conv2 = nn.Conv2d(6, 16, _KERNEL, bias=False, device=meta)
        self.fc1 = nn.Linear(16 * 5 * 5, 120, device=meta)
        self.fc2 = nn.Linear(120, 84, device=meta)
        self.fc3 = nn.Linear(84, num_classes, device=meta)
        self.to_empty(device="cpu")
        self.reset_parameters(0)

    def reset_parameters(self, seed: int) -> None:
        """Fill every tensor deterministically from ``seed``, without using torch's global generator.

        Tensors are drawn uniformly, one after the other in :data:`LENET_TENSOR_ORDER`: the weights of the
        ReLU layers (conv1, conv2, fc1, fc2) from ±√(6/fan_in) (He), the output layer's from ±√(3/fan_in)
        (unit gain), biases from ±1/√fan_in (torch's default). He scaling keeps the signal from shrinking
        through the four ReLU layers, so plain SGD leaves the initial loss plateau within a few hundred steps
        (torch's default ±1/√fan_in for every tensor takes several times longer on the digits data set).

        Args:
            seed: Seed of the private generator.
        """
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed)
        params = dict(self.named_parameters())
        fan_in = {
            "conv1": self.num_channels * _KERNEL * _KERNEL,
            "conv2": 6 * _KERNEL * _KERNEL,
            "fc1": 16 * 5 * 5,
            "fc2": 120,
            "fc3": 84,
        }
        with torch.no_grad():
            for name in LENET_TENSOR_ORDER:
                layer, kind = name.split(".")
                if kind == "bias":
                    bound = 1.0 / math.sqrt(fan_in[layer])
                elif layer == "fc3":
                    bound = math.sqrt(3.0 / fan_in[layer])
                else:
                    bound = math.sqrt(6.0 / fan_in[layer])
                params[name].uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images.

        Args:
            x: ``N×num_channels×32×32`` float32 images.

        Returns:
            ``N×num_classes`` logits.
        """
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)  # type: ignore[no-any-return]


def make_lenet(seed: int, num_classes: int = 62, num_channels: int = 3) -> LeNet5:
    """Build a :class:`LeNet5` whose weights are a deterministic function of ``seed``.

    Args:
        seed: Seed of the initialisation (same seed, same weights, on any machine with the same torch).
        num_classes: Number of output classes.
        num_channels: Number of input channels.

    Returns:
        The initialised model, on CPU, in training mode.
    """
    model = LeNet5(num_classes, num_channels)
    model.reset_parameters(seed)
    return model


def ordered_weights(weights: Mapping[str, _T]) -> dict[str, _T]:
    """Reorder a weight mapping: LeNet names first in :data:`LENET_TENSOR_ORDER`, any others after, as given.

    Args:
        weights: Named tensors or arrays (a ``state_dict``, an update).

    Returns:
        A new dict holding the same objects in the original's order.
    """
    known = [name for name in LENET_TENSOR_ORDER if name in weights]
    others = [name for name in weights if name not in LENET_TENSOR_ORDER]
    return {name: weights[name] for name in (*known, *others)}
