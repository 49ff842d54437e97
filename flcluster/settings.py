"""Every role's settings, derived from one validated :class:`~flcluster.config.FLContext`.

Theory of operation
===================

FLContext is the one source of truth of a node's configuration. The runtime's settings records
(:class:`~flcluster.runtime.scheduler.SchedulerSettings`, :class:`~flcluster.runtime.server.ServerSettings`,
:class:`~flcluster.runtime.server.JobSettings`, :class:`~flcluster.runtime.options.LeaderOptions` and the
core's :class:`~flcluster.core.iteration.IterationConfig`) have no defaults and no validators of their own:
this module fills every field from the context, in one place each, so a value set with ``set_fl_context``, a
flag or an ``MS_*`` variable always reaches the part of the node that uses it, and the only rules are the ones
FLContext checked (``spec/configuration.md`` §8).

:func:`scheduler_settings`, :func:`server_settings` and :func:`job_settings` are where a role starts, so they
first call :func:`~flcluster.config.refuse_unimplemented`: a context that turns on a feature flcluster does
not implement yet would never start a role (none is left). With
``enable_ssl`` the node's TLS files are loaded and checked there too (:func:`~flcluster.tls.load_node_tls`),
so a role whose certificates cannot be used never opens a port.

The Server's records load torch and the Server runtime, so they are imported when first built, never at
import time: a Scheduler never loads torch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flcluster.config import ClusterConfig, FLContext, refuse_unimplemented
from flcluster.tls import TlsRole, load_node_tls

if TYPE_CHECKING:
    from torch import nn

    from flcluster.core.iteration import IterationConfig
    from flcluster.runtime.options import LeaderOptions
    from flcluster.runtime.scheduler import SchedulerSettings
    from flcluster.runtime.server import JobSettings, ServerSettings
    from flcluster.store import StoreRole
    from flcluster.verify import ClientVerification
    from flcluster.wire.records import FLPlanParams

__all__ = [
    "client_verification",
    "fl_plan",
    "iteration_config",
    "job_settings",
    "leader_options",
    "scheduler_settings",
    "server_settings",
]

log = logging.getLogger("flcluster")


def _store_path(cluster_config: ClusterConfig | None, role: StoreRole, node_id: str) -> str:
    """This node's recovery store file (spec/recovery.md §2); ``""`` without a ``recovery`` section."""
    from flcluster.store import node_store_path

    recovery = cluster_config.recovery if cluster_config is not None else None
    if recovery is None:
        return ""
    return str(node_store_path(recovery.storage_file_path, role, node_id))


def scheduler_settings(
    ctx: FLContext, node_id: str, cluster_config: ClusterConfig | None = None
) -> SchedulerSettings:
    """The Scheduler's settings from a validated context and ``config.json``.

    Args:
        ctx: the node's context.
        node_id: the Scheduler's node id (see :func:`~flcluster.config.resolve_node_id`).
        cluster_config: ``config.json``; its ``recovery`` section names the Scheduler's store (one file
            per node next to ``storage_file_path``, spec/recovery.md §2), ``None`` or no section: none.

    Raises:
        ConfigError: the context turns on a feature that is not implemented yet, or its TLS files are
            refused (spec/cluster-protocol.md §7.3).
    """
    from flcluster.runtime.scheduler import SchedulerSettings
    from flcluster.store import StoreRole

    refuse_unimplemented(ctx)
    store_path = _store_path(cluster_config, StoreRole.SCHEDULER, node_id)
    return SchedulerSettings(
        node_id=node_id,
        fl_name=ctx.fl_name,
        server_num=ctx.server_num,
        bind_host=ctx.scheduler_ip,
        port=ctx.scheduler_port,
        manage_host=ctx.scheduler_manage_host,
        manage_port=ctx.scheduler_manage_port,
        heartbeat_timeout=ctx.heartbeat_timeout,
        cluster_available_timeout=ctx.cluster_available_timeout,
        finish_timeout=ctx.finish_timeout,
        scaling_timeout=ctx.scaling_timeout,
        max_message_size=ctx.max_message_size,
        store_path=store_path,
        tls=load_node_tls(ctx, cluster_config, TlsRole.SCHEDULER),
        manage_token=cluster_config.manage_token if cluster_config is not None else "",
    )


def server_settings(
    ctx: FLContext, node_id: str, cluster_config: ClusterConfig | None = None
) -> ServerSettings:
    """A Server's settings from a validated context.

    Args:
        ctx: the node's context.
        node_id: the Server's node id (see :func:`~flcluster.config.resolve_node_id`).
        cluster_config: ``config.json``; its ``recovery`` section gives the Server its store file
            (:func:`~flcluster.store.node_store_path`, spec/recovery.md §2); ``None``: no recovery.

    Raises:
        ConfigError: the context turns on a feature that is not implemented yet, or its TLS files are
            refused (spec/cluster-protocol.md §7.3).
    """
    from flcluster.runtime.server import ServerSettings
    from flcluster.store import StoreRole

    refuse_unimplemented(ctx)
    store_path = _store_path(cluster_config, StoreRole.SERVER, node_id)
    return ServerSettings(
        node_id=node_id,
        server_num=ctx.server_num,
        fl_iteration_num=ctx.fl_iteration_num,
        scheduler_host=ctx.scheduler_ip,
        scheduler_port=ctx.scheduler_port,
        device_port=ctx.fl_server_port,
        device_host=ctx.fl_server_host,
        url_prefix=ctx.http_url_prefix,
        advertise_host=ctx.advertise_host,
        heartbeat_interval=ctx.heartbeat_interval,
        connect_interval=ctx.connect_interval,
        max_message_size=ctx.max_message_size,
        max_device_body=ctx.max_device_body,
        store_path=store_path,
        tls=load_node_tls(ctx, cluster_config, TlsRole.SERVER),
    )


def iteration_config(ctx: FLContext) -> IterationConfig:
    """The numbers every iteration is held against, from a validated context."""
    from flcluster.core.cipher import CipherConfig, CipherMode
    from flcluster.core.iteration import IterationConfig

    cipher = None
    if ctx.encrypt_type in (CipherMode.PW, CipherMode.STABLE_PW):
        cipher = CipherConfig(
            mode=ctx.encrypt_type,
            share_secrets_ratio=ctx.share_secrets_ratio,
            cipher_time_window=ctx.cipher_time_window,
            reconstruct_secrets_threshold=ctx.reconstruct_secrets_threshold,
            # spec/secure-aggregation.md §R8: PW_ENCRYPT under pki_verify signs its client lists.
            list_sign=ctx.pki_verify and ctx.encrypt_type == CipherMode.PW,
        )
    return IterationConfig(
        start_fl_job_threshold=ctx.start_fl_job_threshold,
        update_model_ratio=ctx.update_model_ratio,
        start_fl_job_time_window=ctx.start_fl_job_time_window,
        update_model_time_window=ctx.update_model_time_window,
        global_iteration_time_window=ctx.global_iteration_time_window,
        fl_iteration_num=ctx.fl_iteration_num,
        min_retry_delay_ms=ctx.min_retry_delay_ms,
        cipher=cipher,
    )


def leader_options(ctx: FLContext, cluster_config: ClusterConfig | None = None) -> LeaderOptions:
    """What the leader does besides counting, from a validated context and ``config.json``'s ``metrics``."""
    from flcluster.runtime.options import LeaderOptions

    metrics = cluster_config.metrics if cluster_config is not None else None
    return LeaderOptions(
        fl_name=ctx.fl_name,
        checkpoint_dir=ctx.checkpoint_dir,
        checkpoint_keep=ctx.checkpoint_keep,
        metrics_path=metrics.storage_file_path if metrics is not None else "",
        instance_name=ctx.instance_name,
        participation_levels=ctx.participation_time_levels,
    )


def _job_prime(ctx: FLContext) -> bytes:
    from flcluster.secure.job_prime import job_prime_bytes

    return job_prime_bytes(ctx.fl_name)


def fl_plan(ctx: FLContext) -> FLPlanParams:
    """The FLPlan sent to devices at startFLJob, from a validated context."""
    from flcluster.wire.records import FLPlanParams

    return FLPlanParams(
        server_mode=ctx.server_mode,
        fl_name=ctx.fl_name,
        iterations=ctx.fl_iteration_num,
        epochs=ctx.client_epoch_num,
        mini_batch=ctx.client_batch_size,
        lr=ctx.client_learning_rate,
        encrypt_type=ctx.encrypt_type,
        pw_t=ctx.reconstruct_secrets_threshold,
        # spec/secure-aggregation.md §1.1: one prime per job, the same on every Server.
        pw_prime=_job_prime(ctx) if ctx.encrypt_type in ("PW_ENCRYPT", "STABLE_PW_ENCRYPT") else bytes(33),
        dp_eps=ctx.dp_eps,
        dp_delta=ctx.dp_delta,
        dp_norm_clip=ctx.dp_norm_clip,
        sign_k=ctx.sign_k,
        sign_eps=ctx.sign_eps,
        sign_thr_ratio=ctx.sign_thr_ratio,
        sign_global_lr=ctx.sign_global_lr,
        sign_dim_out=ctx.sign_dim_out,
    )


def client_verification(ctx: FLContext) -> ClientVerification | None:
    """With ``pki_verify``, the trust anchors (read now) and the replay window; ``None`` without.

    spec/device-protocol.md, "Client verification", "Configuration".

    Raises:
        ConfigError: A root or CRL file cannot be read or holds no certificate / CRL.
    """
    if not ctx.pki_verify:
        return None
    from flcluster.verify import ClientVerification, load_trust_anchors

    trust = load_trust_anchors(ctx.root_first_ca_path, ctx.root_second_ca_path, ctx.equip_crl_path)
    return ClientVerification(trust, ctx.replay_attack_time_diff)


def job_settings(
    ctx: FLContext, model: nn.Module | None = None, cluster_config: ClusterConfig | None = None
) -> JobSettings:
    """The federated job from a validated context and the training script's model.

    The initial model is the newest ``<fl_name>_iteration_<N>.ckpt`` in ``checkpoint_dir`` when there is
    one, else the weights of ``model`` (LeNet5 with seed 0 when the script hands none). Only the leader's
    initial model matters: followers take the leader's model when they join.

    Args:
        ctx: the node's context.
        model: the training script's model, or ``None`` for LeNet5 with seed 0.
        cluster_config: ``config.json`` (its ``metrics`` section names the metrics file), or ``None``.

    Raises:
        ConfigError: the context turns on a feature that is not implemented yet.
    """
    refuse_unimplemented(ctx)
    # torch and the Server runtime load here, not at import: the Scheduler never needs them.
    from flcluster.aggregation import ModelSpec, ModelWeights, load_latest_checkpoint, resolve_device
    from flcluster.client.lenet import make_lenet
    from flcluster.runtime.server import JobSettings

    module = make_lenet(seed=0) if model is None else model
    spec = ModelSpec.from_module(module)
    initial = ModelWeights.from_state_dict(module.state_dict(), spec)
    if ctx.checkpoint_dir:
        found = load_latest_checkpoint(ctx.checkpoint_dir, ctx.fl_name, spec)
        if found is not None:
            iteration, initial = found
            log.info("initial model from the checkpoint of iteration %d in %s", iteration, ctx.checkpoint_dir)
    return JobSettings(
        spec=spec,
        initial=initial,
        iteration=iteration_config(ctx),
        plan=fl_plan(ctx),
        device=resolve_device(ctx.aggregation_device),
        model_keep=ctx.model_keep,
        leader=leader_options(ctx, cluster_config),
        client_verification=client_verification(ctx),
    )
