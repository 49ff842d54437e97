"""Tests for flcluster.settings: every settings record is derived from FLContext, and nothing else.

Also the start-up refusals (flcluster.config.refuse_unimplemented, none left: PW_ENCRYPT with pki_verify
starts since the list signatures exist) and the refusals of a role whose files cannot be used.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch

from flcluster.config import ClusterConfig, FLContext, StorageConfig, refuse_unimplemented
from flcluster.core.iteration import IterationConfig
from flcluster.errors import ConfigError
from flcluster.roles import run_role
from flcluster.runtime.options import LeaderOptions
from flcluster.runtime.scheduler import SchedulerSettings
from flcluster.runtime.server import JobSettings, ServerSettings
from flcluster.settings import (
    fl_plan,
    iteration_config,
    job_settings,
    leader_options,
    scheduler_settings,
    server_settings,
)

# A context in which every value a settings record takes differs from its default.
CHANGED: dict[str, object] = {
    "server_num": 3,
    "fl_iteration_num": 7,
    "scheduler_ip": "10.1.2.3",
    "scheduler_port": 7001,
    "fl_server_port": 7002,
    "fl_server_host": "127.0.0.2",
    "http_url_prefix": "/fl",
    "advertise_host": "10.9.8.7",
    "scheduler_manage_host": "127.0.0.3",
    "scheduler_manage_port": 7003,
    "heartbeat_interval": 1.5,
    "heartbeat_timeout": 12.0,
    "cluster_available_timeout": 77.0,
    "connect_interval": 0.25,
    "finish_timeout": 4.5,
    "scaling_timeout": 45.0,
    "max_message_size": 12345,
    "max_device_body": 54321,
    "start_fl_job_threshold": 9,
    "update_model_ratio": 0.5,
    "start_fl_job_time_window": 1111,
    "update_model_time_window": 2222,
    "global_iteration_time_window": 3333,
    "min_retry_delay_ms": 44,
    "fl_name": "Job",
    "checkpoint_dir": "ckpts",
    "checkpoint_keep": 5,
    "instance_name": "inst",
    "participation_time_level": "2,9",
    "model_keep": 6,
    "client_epoch_num": 3,
    "client_batch_size": 8,
    "client_learning_rate": 0.5,
    "reconstruct_secrets_threshold": 4,
    "dp_eps": 5.0,
    "dp_delta": 0.5,
    "dp_norm_clip": 2.0,
    "sign_k": 0.2,
    "sign_eps": 10.0,
    "sign_thr_ratio": 0.7,
    "sign_global_lr": 2.0,
    "sign_dim_out": 5,
}

# Each record field and the FLContext field it comes from.
SOURCES: dict[type, dict[str, str]] = {
    SchedulerSettings: {
        "fl_name": "fl_name",
        "server_num": "server_num",
        "bind_host": "scheduler_ip",
        "port": "scheduler_port",
        "manage_host": "scheduler_manage_host",
        "manage_port": "scheduler_manage_port",
        "heartbeat_timeout": "heartbeat_timeout",
        "cluster_available_timeout": "cluster_available_timeout",
        "finish_timeout": "finish_timeout",
        "scaling_timeout": "scaling_timeout",
        "max_message_size": "max_message_size",
    },
    ServerSettings: {
        "server_num": "server_num",
        "fl_iteration_num": "fl_iteration_num",
        "scheduler_host": "scheduler_ip",
        "scheduler_port": "scheduler_port",
        "device_port": "fl_server_port",
        "device_host": "fl_server_host",
        "url_prefix": "http_url_prefix",
        "advertise_host": "advertise_host",
        "heartbeat_interval": "heartbeat_interval",
        "connect_interval": "connect_interval",
        "max_message_size": "max_message_size",
        "max_device_body": "max_device_body",
    },
    IterationConfig: {
        "start_fl_job_threshold": "start_fl_job_threshold",
        "update_model_ratio": "update_model_ratio",
        "start_fl_job_time_window": "start_fl_job_time_window",
        "update_model_time_window": "update_model_time_window",
        "global_iteration_time_window": "global_iteration_time_window",
        "fl_iteration_num": "fl_iteration_num",
        "min_retry_delay_ms": "min_retry_delay_ms",
    },
    LeaderOptions: {
        "fl_name": "fl_name",
        "checkpoint_dir": "checkpoint_dir",
        "checkpoint_keep": "checkpoint_keep",
        "instance_name": "instance_name",
    },
}


def build(record: type, ctx: FLContext) -> Any:
    if record is SchedulerSettings:
        return scheduler_settings(ctx, "sched")
    if record is ServerSettings:
        return server_settings(ctx, "s0")
    if record is IterationConfig:
        return iteration_config(ctx)
    assert record is LeaderOptions
    return leader_options(ctx)


@pytest.mark.parametrize(
    "record", [SchedulerSettings, ServerSettings, JobSettings, LeaderOptions, IterationConfig]
)
def test_settings_records_have_no_defaults_of_their_own(record: type) -> None:
    with_default = [a.name for a in attrs.fields(record) if a.default is not attrs.NOTHING]
    assert with_default == []
    assert [a.name for a in attrs.fields(record) if a.validator is not None] == []


@pytest.mark.parametrize("record", list(SOURCES))
def test_every_field_is_taken_from_the_context(record: type) -> None:
    ctx = FLContext.from_kwargs(**CHANGED)
    built = build(record, ctx)
    default = build(record, FLContext())
    for name, source in SOURCES[record].items():
        assert getattr(built, name) == getattr(ctx, source), name
        # the non-default value reached the record: the default context gives something else
        assert getattr(built, name) != getattr(default, name), name


def test_the_sources_table_names_every_field() -> None:
    not_from_context = {
        # tls and manage_token come from enable_ssl and config.json (test_tls_cluster.py, test_tls_files.py).
        SchedulerSettings: {"node_id", "store_path", "tls", "manage_token"},
        ServerSettings: {"node_id", "store_path", "tls"},
        IterationConfig: {"cipher"},
        LeaderOptions: {"metrics_path", "participation_levels"},
    }
    for record, sources in SOURCES.items():
        assert {a.name for a in attrs.fields(record)} == set(sources) | not_from_context[record], record


def test_tls_and_the_token_come_from_enable_ssl_and_config_json(tmp_path: Any) -> None:
    from tests.tls_material import CLIENT_PASSWORD, SERVER_PASSWORD, make_pki

    pki = make_pki(tmp_path)
    config = pki.config(manage_token="t" * 16)
    ctx = FLContext(enable_ssl=True, server_password=SERVER_PASSWORD, client_password=CLIENT_PASSWORD)
    scheduler = scheduler_settings(ctx, "20", config)
    assert (
        scheduler.tls is not None and scheduler.tls.connector is None and scheduler.manage_token == "t" * 16
    )
    assert "t" * 16 not in repr(scheduler)
    server = server_settings(ctx, "0", config)
    assert server.tls is not None and server.tls.connector is not None
    plain = FLContext()
    assert (
        scheduler_settings(plain, "20", config).tls is None
        and server_settings(plain, "0", config).tls is None
    )


def test_the_scheduler_store_path_comes_from_config_json_recovery(tmp_path: Any) -> None:
    """spec/recovery.md §2: one file per node next to ``storage_file_path``; no section, no store."""
    ctx = FLContext.from_kwargs(**CHANGED)
    recovery = ClusterConfig(
        recovery=StorageConfig(storage_type=1, storage_file_path=str(tmp_path / "recovery.json"))
    )
    expected = str(tmp_path / "recovery.scheduler-20.sqlite")
    assert scheduler_settings(ctx, "20", recovery).store_path == expected
    assert scheduler_settings(ctx, "20", ClusterConfig()).store_path == ""
    assert scheduler_settings(ctx, "20").store_path == ""


def test_node_id_metrics_and_participation_levels() -> None:
    ctx = FLContext.from_kwargs(**CHANGED)
    assert scheduler_settings(ctx, "sched").node_id == "sched"
    assert server_settings(ctx, "s0").node_id == "s0"
    metrics = ClusterConfig(metrics=StorageConfig(storage_type=1, storage_file_path="/m/metrics.json"))
    options = leader_options(ctx, metrics)
    assert options.metrics_path == "/m/metrics.json"
    assert options.participation_levels == (2, 9)
    assert leader_options(ctx).metrics_path == ""
    assert leader_options(FLContext()).participation_levels == (5, 15)


def test_the_recovery_section_gives_each_server_its_store_file() -> None:
    ctx = FLContext.from_kwargs(**CHANGED)
    assert server_settings(ctx, "s0").store_path == ""
    recovery = ClusterConfig(recovery=StorageConfig(storage_type=1, storage_file_path="/r/recovery.json"))
    assert server_settings(ctx, "s0", recovery).store_path == "/r/recovery.server-s0.sqlite"


def test_update_model_threshold_is_computed_once() -> None:
    ctx = FLContext.from_kwargs(start_fl_job_threshold=100, update_model_ratio=0.07)
    assert ctx.update_model_threshold == iteration_config(ctx).update_model_threshold == 7


def test_fl_plan_carries_the_context() -> None:
    ctx = FLContext.from_kwargs(**CHANGED)
    plan = fl_plan(ctx)
    assert (plan.fl_name, plan.iterations, plan.epochs, plan.mini_batch, plan.lr) == ("Job", 7, 3, 8, 0.5)
    assert (plan.pw_t, plan.dp_eps, plan.dp_delta, plan.dp_norm_clip) == (4, 5.0, 0.5, 2.0)
    assert (plan.sign_k, plan.sign_eps, plan.sign_thr_ratio, plan.sign_global_lr, plan.sign_dim_out) == (
        0.2,
        10.0,
        0.7,
        2.0,
        5,
    )
    assert plan.encrypt_type == "NOT_ENCRYPT"


def test_job_settings_from_the_context(tmp_path: Path) -> None:
    ctx = FLContext.from_kwargs(**{**CHANGED, "checkpoint_dir": str(tmp_path)})
    job = job_settings(ctx)
    assert job.iteration == iteration_config(ctx)
    assert job.plan == fl_plan(ctx)
    assert job.leader == leader_options(ctx)
    assert job.model_keep == 6
    assert job.device == torch.device("cpu")
    assert job.spec.names  # LeNet5 when the script hands no model


# ---------------------------------------------------------------------------------------------------------
# Start-up refusals: features FLContext represents but flcluster does not implement yet
# ---------------------------------------------------------------------------------------------------------


def test_pw_encrypt_with_pki_verify_starts_and_signs_its_client_lists(tmp_path: Path) -> None:
    """The last start-up refusal is lifted: the list signatures exist (spec/secure-aggregation.md §R8)."""
    from tests.pki import write_trust

    ctx = FLContext.from_kwargs(
        encrypt_type="PW_ENCRYPT", start_fl_job_threshold=4, reconstruct_secrets_threshold=2,
        **write_trust(tmp_path),
    )  # fmt: skip
    refuse_unimplemented(ctx)
    scheduler_settings(ctx, "sched")
    server_settings(ctx, "s0")
    job = job_settings(ctx)
    assert job.client_verification is not None
    cipher = iteration_config(ctx).cipher
    assert cipher is not None and cipher.list_sign
    assert [r.value for r in cipher.rounds][-3:] == ["pushListSign", "getListSign", "reconstructSecrets"]
    # Without pki_verify, or with STABLE_PW_ENCRYPT, there are no list signatures.
    assert not iteration_config(ctx.evolve(pki_verify=False)).cipher.list_sign  # type: ignore[union-attr]
    stable = iteration_config(ctx.evolve(encrypt_type="STABLE_PW_ENCRYPT")).cipher
    assert stable is not None and not stable.list_sign


def test_tls_is_no_longer_refused_but_its_files_are_checked() -> None:
    # TLS is implemented (spec/cluster-protocol.md §7): enable_ssl passes refuse_unimplemented, and a role
    # without its certificate files is refused by the TLS layer instead, naming what is missing.
    ctx = FLContext(enable_ssl=True)
    refuse_unimplemented(ctx)
    for start in (lambda: scheduler_settings(ctx, "sched"), lambda: server_settings(ctx, "s0")):
        with pytest.raises(ConfigError, match=r"^enable_ssl=True needs config_file_path"):
            start()


def test_the_default_context_starts() -> None:
    refuse_unimplemented(FLContext())
    refuse_unimplemented(FLContext(enable_ssl=False, pki_verify=False, encrypt_type="NOT_ENCRYPT"))


@pytest.mark.parametrize("encrypt_type", ["PW_ENCRYPT", "STABLE_PW_ENCRYPT"])
def test_pw_and_stable_pw_start_and_the_plan_carries_the_job_prime(encrypt_type: str) -> None:
    # spec/secure-aggregation.md §1.1: the FLPlan carries t and the job's prime, the same on every Server.
    from flcluster.secure import check_prime

    ctx = FLContext.from_kwargs(
        encrypt_type=encrypt_type, start_fl_job_threshold=4, update_model_ratio=1.0,
        reconstruct_secrets_threshold=2, fl_name="job-a",
    )  # fmt: skip
    refuse_unimplemented(ctx)
    server_settings(ctx, "s0")
    plan = job_settings(ctx).plan
    assert (plan.encrypt_type, plan.pw_t) == (encrypt_type, 2)
    assert check_prime(plan.pw_prime).bit_length() == 264
    assert job_settings(ctx).plan.pw_prime == plan.pw_prime
    assert job_settings(ctx.evolve(fl_name="job-b")).plan.pw_prime != plan.pw_prime
    assert job_settings(ctx.evolve(encrypt_type="NOT_ENCRYPT")).plan.pw_prime == bytes(33)


@pytest.mark.parametrize("encrypt_type", ["DP_ENCRYPT", "SIGNDS"])
def test_dp_and_signds_start_and_reach_the_plan(encrypt_type: str) -> None:
    # spec/privacy.md: both run, so a role starts with them and the FLPlan carries the type.
    ctx = FLContext.from_kwargs(encrypt_type=encrypt_type, dp_eps=2.0, sign_global_lr=0.5)
    refuse_unimplemented(ctx)
    scheduler_settings(ctx, "sched")
    server_settings(ctx, "s0")
    plan = job_settings(ctx).plan
    assert (plan.encrypt_type, plan.dp_eps, plan.sign_global_lr) == (encrypt_type, 2.0, 0.5)


def test_run_role_refuses_with_one_line_and_status_1(caplog: pytest.LogCaptureFixture) -> None:
    ctx = FLContext(ms_role="MS_SCHED", enable_ssl=True)
    with caplog.at_level(logging.ERROR, logger="flcluster"):
        assert run_role(ctx) == 1
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage().startswith("enable_ssl=True needs config_file_path")


def test_flcluster_server_refuses_before_launching_any_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from flcluster.cli import main

    monkeypatch.chdir(tmp_path)
    argv = [
        "server",
        "--server_num=2",
        "--local_server_num=2",
        "--background",
        "--enable_ssl=True",
    ]
    assert main(argv) == 1
    assert "enable_ssl=True needs config_file_path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no server_<i> directory: nothing was launched


def test_iteration_config_carries_the_cipher_rounds_of_pw_encrypt() -> None:
    from flcluster.core.cipher import CipherConfig

    assert iteration_config(FLContext()).cipher is None
    ctx = FLContext.from_kwargs(
        encrypt_type="PW_ENCRYPT",
        start_fl_job_threshold=8,
        share_secrets_ratio=0.75,
        cipher_time_window=1234,
        reconstruct_secrets_threshold=3,
    )
    assert iteration_config(ctx).cipher == CipherConfig(
        mode="PW_ENCRYPT", share_secrets_ratio=0.75, cipher_time_window=1234, reconstruct_secrets_threshold=3
    )
    stable = iteration_config(ctx.evolve(encrypt_type="STABLE_PW_ENCRYPT")).cipher
    assert stable is not None and stable.mode == "STABLE_PW_ENCRYPT"
    assert iteration_config(ctx.evolve(encrypt_type="DP_ENCRYPT")).cipher is None
