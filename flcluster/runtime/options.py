"""What the leader does besides counting (checkpoints and metrics.json), as configured.

Built from :class:`~flcluster.config.FLContext` by :func:`flcluster.settings.leader_options`; it has no
defaults of its own.

Re-exported by :mod:`flcluster.runtime.driver`.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class LeaderOptions:
    """What the leader does besides counting: checkpoints, their rotation, and metrics.json.

    Attributes:
        fl_name: The job name (names checkpoints and metrics lines).
        checkpoint_dir: Where ``<fl_name>_iteration_<N>.ckpt`` goes after each completed iteration.
        checkpoint_keep: Checkpoints kept on disk.
        metrics_path: ``metrics.json`` (from config.json's ``metrics`` section); empty: none.
        instance_name: The instance name written in metrics lines.
        participation_levels: ``participation_time_level`` in minutes (startFLJob → updateModel buckets).
    """

    fl_name: str
    checkpoint_dir: str
    checkpoint_keep: int
    metrics_path: str
    instance_name: str
    participation_levels: tuple[int, int]


__all__ = ["LeaderOptions"]
