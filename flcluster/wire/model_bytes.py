"""The model as raw bytes on a cluster link: the payload of ``publish_model`` (spec/device-protocol.md).

Theory of operation
-------------------
A model travels between Servers as its tensors' float32 values, little-endian, concatenated in model order
(:attr:`~flcluster.aggregation.model.ModelSpec.names`), with no header: both ends hold the same
:class:`~flcluster.aggregation.model.ModelSpec`, so the names and sizes need not travel. The frame that
carries the payload (flcluster/wire/frames.py) bounds its length; :func:`weights_from_bytes` refuses
a payload of the wrong length and copies the values out, so the tensors it returns own their memory.
Nothing is ever unpickled.
"""

from __future__ import annotations

import numpy as np
import torch

from flcluster.aggregation.model import ModelSpec, ModelWeights

__all__ = ["weights_from_bytes", "weights_to_bytes"]


def weights_to_bytes(weights: ModelWeights, spec: ModelSpec) -> bytes:
    """The model as little-endian float32 bytes in model order (the payload of ``publish_model``).

    Args:
        weights: The model's tensors.
        spec: The model's layout; its order is the payload's order.

    Returns:
        ``4 * spec.total_elements`` bytes.
    """
    return b"".join(
        weights[name].detach().cpu().numpy().astype("<f4", copy=False).tobytes() for name in spec.names
    )


def weights_from_bytes(data: bytes, spec: ModelSpec) -> ModelWeights:
    """Inverse of :func:`weights_to_bytes`; refuses a payload of the wrong size.

    Args:
        data: The payload.
        spec: The model's layout.

    Returns:
        The model, each tensor a copy (the payload may be freed).

    Raises:
        ValueError: the payload does not hold exactly the model's float32 elements.
    """
    if len(data) != 4 * spec.total_elements:
        raise ValueError(f"model payload of {len(data)} bytes; the model needs {4 * spec.total_elements}")
    flat = np.frombuffer(data, dtype="<f4")
    out: list[tuple[str, torch.Tensor]] = []
    offset = 0
    for name, size in zip(spec.names, spec.sizes, strict=True):
        out.append((name, torch.from_numpy(flat[offset : offset + size].copy())))
        offset += size
    return ModelWeights(out)
