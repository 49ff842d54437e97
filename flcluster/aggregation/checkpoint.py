"""Checkpoints of the global model in ``checkpoint_dir``: atomic writes, rotation that works, safe loading.

Theory of operation (spec/aggregation.md, "Checkpoints"). The leader saves the model of iteration ``N`` as
``<fl_name>_iteration_<N>.ckpt``, the original's name, holding a plain torch state dict (the spec's names
and shapes, float32), so ``module.load_state_dict(torch.load(path, weights_only=True))`` works.

- **Atomic**: the file is written under a temporary name in the same directory, flushed and fsynced, then
  renamed over the final name with ``os.replace``; a crash leaves the old file or the new one, never half
  of one.
- **Rotation**: after a save, every checkpoint of this ``fl_name`` except the one just written and the
  newest ``keep - 1`` others (by iteration number) is deleted. The original meant to do this but built its
  prefix with ``os.path.join(name, "_iteration_")``, which never matches a file, so its checkpoints piled up.
- **Loading** uses ``torch.load(..., weights_only=True)`` only (never a full unpickle of a file someone else
  could have written), checks names and shapes against the spec, and refuses a corrupt latest file with a
  :class:`CheckpointError` instead of silently falling back to an older one.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from flcluster.aggregation.model import ModelSpec, ModelWeights
from flcluster.errors import CheckpointError, ConfigError

SUFFIX = ".ckpt"
"""Checkpoint file suffix."""


def _check_fl_name(fl_name: str) -> None:
    if (
        not isinstance(fl_name, str)
        or any(ch in fl_name for ch in ("/", "\\", "\x00"))
        or fl_name in (".", "..")
    ):
        raise ConfigError(
            f"fl_name {fl_name!r} cannot name a checkpoint file; it must not contain '/', '\\' or NUL"
        )


def _pattern(fl_name: str) -> re.Pattern[str]:
    return re.compile(re.escape(fl_name) + r"_iteration_(0|[1-9][0-9]*)" + re.escape(SUFFIX))


def checkpoint_name(fl_name: str, iteration: int) -> str:
    """The file name of a checkpoint: ``<fl_name>_iteration_<iteration>.ckpt``.

    Raises:
        ConfigError: ``fl_name`` cannot be part of a file name.
        ValueError: ``iteration`` is not an integer >= 0.
    """
    _check_fl_name(fl_name)
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration {iteration!r} is refused; expected an integer >= 0")
    return f"{fl_name}_iteration_{iteration}{SUFFIX}"


def list_checkpoints(directory: str | os.PathLike[str], fl_name: str) -> list[tuple[int, Path]]:
    """The checkpoints of ``fl_name`` in ``directory`` as ``(iteration, path)``, oldest first.

    Only regular files named exactly ``<fl_name>_iteration_<N>.ckpt`` count (no leading zeros); anything
    else in the directory is ignored. A missing directory holds no checkpoints.
    """
    _check_fl_name(fl_name)
    root = Path(directory)
    if not root.is_dir():
        return []
    pattern = _pattern(fl_name)
    found: list[tuple[int, Path]] = []
    for entry in root.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is not None and entry.is_file():
            found.append((int(match.group(1)), entry))
    found.sort()
    return found


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    directory: str | os.PathLike[str],
    fl_name: str,
    iteration: int,
    weights: ModelWeights,
    spec: ModelSpec,
    *,
    keep: int = 3,
) -> Path:
    """Write the model of ``iteration`` atomically, then delete all but the newest ``keep`` checkpoints.

    Args:
        directory: ``checkpoint_dir`` (created if missing).
        fl_name: the job name that prefixes the file.
        iteration: the iteration the model belongs to (0 = initial model).
        weights: the model.
        spec: its shapes (the file holds reshaped tensors).
        keep: how many checkpoints of this ``fl_name`` to keep, the new one included.

    Returns:
        The path written.

    Raises:
        ConfigError: ``fl_name`` cannot be part of a file name.
        ValueError: bad ``iteration`` or ``keep``, or the weights do not match the spec.
        OSError: the directory cannot be written (the old checkpoints are then untouched).
    """
    name = checkpoint_name(fl_name, iteration)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep={keep!r} is refused; at least the new checkpoint must be kept")
    state = weights.to_state_dict(spec)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    fd, temp_name = tempfile.mkstemp(dir=root, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    _fsync_directory(root)
    others = [path for number, path in list_checkpoints(root, fl_name) if number != iteration]
    for path in others[: max(0, len(others) - (keep - 1))]:
        path.unlink(missing_ok=True)
    return target


def load_checkpoint(path: str | os.PathLike[str], spec: ModelSpec) -> ModelWeights:
    """Load one checkpoint file with ``weights_only=True`` and check it against ``spec``.

    Non-floating entries (such as ``num_batches_tracked``) are ignored, floating ones are converted to
    float32.

    Raises:
        CheckpointError: the file cannot be read, is not a state dict of tensors, or its names, shapes or
            values (NaN/Inf) do not fit the model.
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the boundary: any failure to read or unpickle means "corrupt"
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} cannot be read as a torch state dict: {exc}"
        ) from exc
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} holds a {type(loaded).__name__}, "
            "expected a state dict of tensors"
        )
    try:
        return ModelWeights.from_state_dict(loaded, spec)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} does not fit the model: {exc}") from exc


def load_latest_checkpoint(
    directory: str | os.PathLike[str], fl_name: str, spec: ModelSpec
) -> tuple[int, ModelWeights] | None:
    """The newest checkpoint of ``fl_name`` in ``directory``, as ``(iteration, weights)``, or ``None``.

    Raises:
        CheckpointError: the newest checkpoint is corrupt or does not fit the model (older ones are not
            tried: a damaged checkpoint directory is for the operator to look at).
    """
    found = list_checkpoints(directory, fl_name)
    if not found:
        return None
    iteration, path = found[-1]
    return iteration, load_checkpoint(path, spec)
