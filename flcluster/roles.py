"""Run this process as the role its FL context names: the body of every training script.

A training script (``examples/mobile/test_mobile_lenet.py``) calls ``flcluster.set_fl_context(...)``
and then :func:`run_role`; so do ``flcluster scheduler`` and ``flcluster server``. The role's settings
are derived here, once, from the validated :class:`~flcluster.config.FLContext`, the ``MS_*``
environment (explicit keys win) and ``config.json``; then one ``trio.run`` drives the node until it
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
    ClusterConfig,
    FLContext,
    apply_environment,
    explicit_fl_context_keys,
    get_fl_context,
    load_cluster_config,
    resolve_node_id,
)
from flcluster.errors import ConfigError, FLClusterError
from flcluster.runtime.scheduler import SchedulerSettings, run_scheduler

if TYPE_CHECKING:
    from torch import nn

    from flcluster.runtime.server import JobSettings, ServerSettings

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


def scheduler_settings(ctx: FLContext, node_id: str) -> SchedulerSettings:
    """The Scheduler's settings from a validated context."""
    return SchedulerSettings(
        node_id=node_id,
        server_num=ctx.server_num,
        bind_host=ctx.scheduler_ip,
        port=ctx.scheduler_port,
        manage_host=ctx.scheduler_manage_host,
        manage_port=ctx.scheduler_manage_port,
        heartbeat_timeout=ctx.heartbeat_timeout,
        cluster_available_timeout=ctx.cluster_available_timeout,
        max_message_size=ctx.max_message_size,
    )


def server_settings(ctx: FLContext, node_id: str) -> ServerSettings:
    """A Server's settings from a validated context."""
    from flcluster.runtime.server import ServerSettings

    return ServerSettings(
        node_id=node_id,
        server_num=ctx.server_num,
        fl_iteration_num=ctx.fl_iteration_num,
        scheduler_host=ctx.scheduler_ip,
        scheduler_port=ctx.scheduler_port,
        device_port=ctx.fl_server_port,
        device_host=ctx.fl_server_host,
        url_prefix=ctx.http_url_prefix,
        heartbeat_interval=ctx.heartbeat_interval,
        connect_interval=ctx.connect_interval,
        max_message_size=ctx.max_message_size,
        max_device_body=ctx.max_device_body,
    )


def job_settings(
    ctx: FLContext, model: nn.Module | None = None, cluster_config: ClusterConfig | None = None
) -> JobSettings:
    """The federated job from a validated context and the training script's model.

    The initial model is the newest ``<fl_name>_iteration_<N>.ckpt`` in ``checkpoint_dir`` when there is
    one, else the weights of ``model`` (LeNet5 with seed 0 when the script hands none). Only the leader's
    initial model matters: followers take the leader's model when they join.
    """
    # torch and the Server runtime load here, not at import: the Scheduler never needs them.
    from flcluster.aggregation import ModelSpec, ModelWeights, load_latest_checkpoint, resolve_device
    from flcluster.client.lenet import make_lenet
    from flcluster.core.iteration import IterationConfig
    from flcluster.runtime.options import LeaderOptions
    from flcluster.runtime.server import JobSettings
    from flcluster.wire.device import FLPlanParams

    module = make_lenet(seed=0) if model is None else model
    spec = ModelSpec.from_module(module)
    initial = ModelWeights.from_state_dict(module.state_dict(), spec)
    if ctx.checkpoint_dir:
        found = load_latest_checkpoint(ctx.checkpoint_dir, ctx.fl_name, spec)
        if found is not None:
            iteration, initial = found
            log.info("initial model from the checkpoint of iteration %d in %s", iteration, ctx.checkpoint_dir)
    metrics = cluster_config.metrics if cluster_config is not None else None
    return JobSettings(
        spec=spec,
        initial=initial,
        iteration=IterationConfig(
            start_fl_job_threshold=ctx.start_fl_job_threshold,
            update_model_ratio=ctx.update_model_ratio,
            start_fl_job_time_window=ctx.start_fl_job_time_window,
            update_model_time_window=ctx.update_model_time_window,
            global_iteration_time_window=ctx.global_iteration_time_window,
            fl_iteration_num=ctx.fl_iteration_num,
        ),
        plan=FLPlanParams(
            server_mode=ctx.server_mode,
            fl_name=ctx.fl_name,
            iterations=ctx.fl_iteration_num,
            epochs=ctx.client_epoch_num,
            mini_batch=ctx.client_batch_size,
            lr=ctx.client_learning_rate,
            encrypt_type=ctx.encrypt_type,
            pw_t=ctx.reconstruct_secrets_threshold,
            dp_eps=ctx.dp_eps,
            dp_delta=ctx.dp_delta,
            dp_norm_clip=ctx.dp_norm_clip,
            sign_k=ctx.sign_k,
            sign_eps=ctx.sign_eps,
            sign_thr_ratio=ctx.sign_thr_ratio,
            sign_global_lr=ctx.sign_global_lr,
            sign_dim_out=ctx.sign_dim_out,
        ),
        device=resolve_device(ctx.aggregation_device),
        leader=LeaderOptions(
            fl_name=ctx.fl_name,
            checkpoint_dir=ctx.checkpoint_dir,
            checkpoint_keep=ctx.checkpoint_keep,
            metrics_path=metrics.storage_file_path if metrics is not None else "",
            instance_name=ctx.instance_name,
            participation_levels=ctx.participation_time_levels,
        ),
    )


def resolve_context(environ: Mapping[str, str] | None = None) -> FLContext:
    """The process's context: :func:`~flcluster.config.set_fl_context` values over the environment."""
    env = os.environ if environ is None else environ
    return apply_environment(get_fl_context(), env, explicit=explicit_fl_context_keys())


def run_role(ctx: FLContext | None = None, *, model: nn.Module | None = None) -> int:
    """Run this process as ``ctx.ms_role`` until the node exits; return the exit status.

    Args:
        ctx: the context to run; by default the one set with ``set_fl_context`` plus the environment.
        model: the model a Server starts from (see :func:`job_settings`); the Scheduler ignores it.

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
                result = trio.run(run_scheduler, scheduler_settings(ctx, node_id))
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
                        run_server, server_settings(ctx, node_id), job_settings(ctx, model, cluster_config)
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
