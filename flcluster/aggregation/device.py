"""Where the aggregation sums live: resolve the operator's device name to a ``torch.device``.

A bad name is refused at start-up with a :class:`~flcluster.errors.ConfigError` rather than failing at the
first update (STYLE rule 7): ``"cuda"`` on a machine without a usable CUDA device is refused, never
silently replaced by the CPU.
"""

from __future__ import annotations

import re

import torch

from flcluster.errors import ConfigError

_DEVICE = re.compile(r"(cpu|cuda)(?::([0-9]+))?")


def resolve_device(name: str) -> torch.device:
    """Turn ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into a ``torch.device``, checking it exists here.

    Args:
        name: the configured aggregation device.

    Raises:
        ConfigError: the name is not one of those forms, CUDA is requested but
            ``torch.cuda.is_available()`` is false, or ``N`` is not below the number of CUDA devices.
    """
    match = _DEVICE.fullmatch(name.strip().lower()) if isinstance(name, str) else None
    if match is None:
        raise ConfigError(
            f"aggregation device {name!r} is not recognised; expected 'cpu', 'cuda' or 'cuda:N'"
        )
    kind, index_text = match.group(1), match.group(2)
    if kind == "cpu":
        if index_text not in (None, "0"):
            raise ConfigError(f"aggregation device {name!r}: the CPU has only index 0; use 'cpu'")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"aggregation device {name!r} needs CUDA, but torch.cuda.is_available() is false on this machine "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda!r}); use 'cpu' or install a "
            "CUDA build of torch on a machine with a GPU"
        )
    if index_text is None:
        return torch.device("cuda", torch.cuda.current_device())
    index = int(index_text)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"aggregation device {name!r}: this machine has {count} CUDA device(s), expected an index "
            f"below {count}"
        )
    return torch.device("cuda", index)
