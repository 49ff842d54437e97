"""A PNG of a simulation's test accuracy (and loss) per iteration.

matplotlib is imported only when a plot is drawn (it is in flcluster's ``examples`` extra), and drawn on a
private :class:`~matplotlib.figure.Figure` with the Agg canvas: no pyplot, no global backend switch, safe in
worker threads and on machines without a display.
"""

from __future__ import annotations

import os
from pathlib import Path

from flcluster.client.simulator import SimulationReport
from flcluster.errors import ConfigError

__all__ = ["plot_accuracy"]


def plot_accuracy(
    report: SimulationReport, path: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """Draw test accuracy (left axis) and test loss (right axis) per simulator iteration into a PNG.

    Iterations that were not evaluated (no device completed, or ``synthetic`` mode) are left out.

    Args:
        report: What :func:`~flcluster.client.simulator.simulate` returned.
        path: Where to write the PNG (its folder must exist).
        title: The plot's title; by default it names the mode, data, devices and servers.

    Returns:
        The path written.

    Raises:
        ConfigError: matplotlib is not installed, or the folder of ``path`` does not exist.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("plots need matplotlib; install flcluster[examples] (matplotlib>=3.8)") from exc
    target = Path(path)
    if not target.parent.is_dir():
        raise ConfigError(f"the plot's folder {str(target.parent)!r} does not exist")
    points = [
        (s.index, s.accuracy, s.loss)
        for s in report.iterations
        if s.accuracy is not None and s.loss is not None
    ]
    x = [index for index, _, _ in points]
    config = report.config
    figure = Figure(figsize=(7.0, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot(x, [accuracy for _, accuracy, _ in points], marker="o", color="tab:blue", label="test accuracy")
    axes.set_xlabel("iteration")
    axes.set_ylabel("test accuracy", color="tab:blue")
    axes.set_ylim(0.0, 1.0)
    axes.grid(True, alpha=0.3)
    loss_axes = axes.twinx()
    losses = [loss for _, _, loss in points]
    loss_axes.plot(x, losses, marker="s", linestyle="--", color="tab:red", label="test loss")
    loss_axes.set_ylabel("test loss", color="tab:red")
    if not points:
        axes.text(0.5, 0.5, "no evaluated iteration", ha="center", va="center", transform=axes.transAxes)
    servers = len(config.servers)
    devices = config.num_devices
    default = (
        f"{config.mode}: {config.data}, {devices} device{'s' * (devices != 1)}, "
        f"{servers} server{'s' * (servers != 1)}{', ELB' if config.use_elb else ''}"
    )
    axes.set_title(title or default)
    figure.tight_layout()
    figure.savefig(target, format="png")
    return target
