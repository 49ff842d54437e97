"""Run this process as the role its FL context names: the body of every training script.

A training script (``examples/mobile/test_mobile_lenet.py``) calls ``flcluster.set_fl_context(...)``
and then :func:`run_role`; so do ``flcluster scheduler`` and ``flcluster server``. The role's context is
resolved here, once: the validated :class:`~flcluster.config.FLContext`, the ``MS_*`` environment
(explicit keys win) and ``config.json``; its settings are derived from it by :mod:`flcluster.settings`
(which refuses features that are not implemented yet); then one ``trio.run`` drives the node until it
exits. A refused registration or a bad configuration ends the process with a one-line message and
exit status 1, never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from functools import partial
from typing import TYPE_CHECKING

import trio

from flcluster.config import (
    FLContext,
    apply_environment,
    explicit_fl_context_keys,
    get_fl_context,
    load_cluster_config,
    resolve_node_id,
)
from flcluster.errors import ConfigError, FLClusterError
from flcluster.runtime.scheduler import run_scheduler
from flcluster.settings import job_settings, scheduler_settings, server_settings

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("flcluster")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """Log to stderr in one format for every role (idempotent)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("hypercorn", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def resolve_context(environ: Mapping[str, str] | None = None) -> FLContext:
    """The process's context: :func:`~flcluster.config.set_fl_context` values over the environment."""
    env = os.environ if environ is None else environ
    return apply_environment(get_fl_context(), env, explicit=explicit_fl_context_keys())


def run_role(ctx: FLContext | None = None, *, model: nn.Module | None = None) -> int:
    """Run this process as ``ctx.ms_role`` until the node exits; return the exit status.

    Args:
        ctx: the context to run; by default the one set with ``set_fl_context`` plus the environment.
        model: the model a Server starts from (see :func:`flcluster.settings.job_settings`); the Scheduler
            ignores it.

    Returns:
        0 when the node finished normally, 1 when it was refused or misconfigured.
    """
    configure_logging()
    try:
        ctx = resolve_context() if ctx is None else ctx
        cluster_config = load_cluster_config(ctx.config_file_path or None)
        node_id = resolve_node_id(ctx, cluster_config)
        match ctx.ms_role:
            case "MS_SCHED":
                result = trio.run(run_scheduler, scheduler_settings(ctx, node_id, cluster_config))
                log.info("Scheduler finished: %s", result.reason)
            case "MS_SERVER":
                import torch

                from flcluster.runtime.server import run_server

                # A Server folds each update (a few small tensor adds) on its event loop: one torch
                # thread is ~30x faster there than a contended pool, and FedAvg's final division
                # runs in a worker thread anyway (tests/benchmarks/test_bench_ingest.py).
                torch.set_num_threads(1)

                trio.run(
                    partial(
                        run_server,
                        server_settings(ctx, node_id, cluster_config),
                        job_settings(ctx, model, cluster_config),
                    )
                )
                log.info("Server %r finished.", node_id)
            case _:
                raise ConfigError(
                    f"ms_role={ctx.ms_role!r} cannot be run by flcluster: a cross-device cluster has only "
                    "MS_SCHED and MS_SERVER processes"
                )
    except (FLClusterError, BaseExceptionGroup) as exc:
        leaves = list(leaf_exceptions(exc))
        if not all(isinstance(leaf, FLClusterError) for leaf in leaves):
            raise
        for leaf in leaves:
            log.error("%s", leaf)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def leaf_exceptions(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (possibly nested) exception groups, or ``exc`` itself."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaf_exceptions(inner)
    else:
        yield exc
