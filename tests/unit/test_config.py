"""Tests for flcluster.config: FLContext validation, flags, environment, config.json, node id."""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flcluster.config import (
    ClusterConfig,
    FLContext,
    StorageConfig,
    add_context_arguments,
    apply_environment,
    build_fl_context,
    context_kwargs_from_args,
    environment_kwargs,
    explicit_fl_context_keys,
    get_fl_context,
    load_cluster_config,
    reset_fl_context,
    resolve_node_id,
    set_fl_context,
)
from flcluster.errors import ConfigError

SPEC = Path(__file__).resolve().parents[2] / "spec" / "configuration.md"


@pytest.fixture(autouse=True)
def _fresh_context() -> Iterator[None]:
    reset_fl_context()
    yield
    reset_fl_context()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_mobile_server.py")
    add_context_arguments(parser)
    return parser


# ---------------------------------------------------------------------------------------------------------
# Defaults: the spec's table is the authority
# ---------------------------------------------------------------------------------------------------------


def _spec_table() -> dict[str, tuple[str, object]]:
    """``{name: (type column, default)}`` from spec/configuration.md §2."""
    text = SPEC.read_text(encoding="utf-8")
    section = text.split("## 2. FLContext parameters", 1)[1].split("### 2.1", 1)[0]
    rows: dict[str, tuple[str, object]] = {}
    for line in section.splitlines():
        match = re.match(r"\| `(\w+)` \| ([^|]+) \| `([^`]*)` \|", line)
        if match:
            name, kind, default = match.groups()
            assert name not in rows, f"{name} appears twice in the spec table"
            rows[name] = (kind.strip(), ast.literal_eval(default))
    return rows


def test_defaults_equal_the_spec_table() -> None:
    table = _spec_table()
    assert list(table) == list(FLContext.field_names())
    ctx = FLContext()
    for name, (kind, default) in table.items():
        value = getattr(ctx, name)
        assert value == default, name
        assert type(value).__name__ == kind.split()[0], name


def test_selected_defaults_and_deviations() -> None:
    ctx = FLContext()
    # deviations from the original's invalid code defaults
    assert ctx.server_mode == "FEDERATED_LEARNING"
    assert ctx.server_num == 1
    assert ctx.start_fl_job_threshold == 1
    assert ctx.enable_fl is True
    # code defaults kept
    assert ctx.start_fl_job_time_window == 300000
    assert ctx.reconstruct_secrets_threshold == 2000
    assert ctx.scheduler_manage_port == 11202
    assert ctx.max_message_size == 100 * 1024 * 1024
    assert ctx.max_device_body == 64 * 1024 * 1024
    assert "feature_maps" not in FLContext.field_names()


def test_context_is_frozen_and_hides_passwords() -> None:
    ctx = FLContext(server_password="s3cret", client_password="hunter2")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        ctx.server_num = 2  # type: ignore[misc]
    assert "s3cret" not in repr(ctx)
    assert "hunter2" not in repr(ctx)
    with pytest.raises(ConfigError) as info:
        FLContext.from_kwargs(server_password=1234)
    assert "1234" not in str(info.value)
    assert "server_password" in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Per-field validation
# ---------------------------------------------------------------------------------------------------------

BAD_VALUES: list[tuple[str, object, str]] = [
    ("server_mode", "", "one of 'FEDERATED_LEARNING', 'HYBRID_TRAINING'"),
    ("server_mode", "federated_learning", "FEDERATED_LEARNING"),
    ("ms_role", "MS_PSERVER", "one of 'MS_SERVER', 'MS_WORKER', 'MS_SCHED'"),
    ("worker_num", -1, ">= 0"),
    ("server_num", 0, "an integer >= 1"),
    ("server_num", -4, "an integer >= 1"),
    ("server_num", 2.5, "integral value"),
    ("server_num", "4", "an integer"),
    ("server_num", True, "not a bool"),
    ("scheduler_ip", "", "1 to 100 characters"),
    ("scheduler_ip", "a" * 101, "1 to 100 characters"),
    ("scheduler_ip", "10.0.0.1 ", "host name or IP address"),
    ("scheduler_ip", "http://x", "host name or IP address"),
    ("scheduler_port", 0, "a port number in [1, 65535]"),
    ("scheduler_port", 65536, "a port number in [1, 65535]"),
    ("fl_server_port", -1, "a port number in [1, 65535]"),
    ("scheduler_manage_port", 70000, "a port number in [1, 65535]"),
    ("enable_fl_client", 1, "a bool"),
    ("enable_ssl", "true", "a bool"),
    ("pki_verify", 0, "a bool"),
    ("enable_fl", None, "a bool"),
    ("start_fl_job_threshold", 0, "an integer in [1, 4294967295]"),
    ("start_fl_job_threshold", 0x100000000, "an integer in [1, 4294967295]"),
    ("start_fl_job_time_window", 0, "in [1, 4294967295]"),
    ("update_model_time_window", -3000, "in [1, 4294967295]"),
    ("cipher_time_window", 0, ">= 1"),
    ("global_iteration_time_window", 0, "in [1, 4294967295]"),
    ("global_iteration_time_window", 0x100000000, "in [1, 4294967295]"),
    ("replay_attack_time_diff", 0, ">= 1"),
    ("update_model_ratio", 0.0, "in (0, 1]"),
    ("update_model_ratio", 1.5, "in (0, 1]"),
    ("update_model_ratio", math.nan, "finite"),
    ("share_secrets_ratio", 0, "in (0, 1]"),
    ("share_secrets_ratio", 1.01, "in (0, 1]"),
    ("upload_sparse_rate", 0.0, "in (0, 1]"),
    ("reconstruct_secrets_threshold", 0, "an integer >= 1"),
    ("fl_name", "../evil", "without '/'"),
    ("fl_name", "a\\b", "without '/'"),
    ("fl_name", 5, "a string"),
    ("fl_iteration_num", 0, "an integer in [1, 4294967295]"),
    ("client_epoch_num", 0, "an integer >= 1"),
    ("client_batch_size", 0, "an integer >= 1"),
    ("client_learning_rate", 0.0, "> 0"),
    ("client_learning_rate", -0.1, "> 0"),
    ("client_learning_rate", math.inf, "finite"),
    ("encrypt_type", "DP", "one of 'NOT_ENCRYPT', 'DP_ENCRYPT', 'PW_ENCRYPT', 'STABLE_PW_ENCRYPT', 'SIGNDS'"),
    ("encrypt_type", "not_encrypt", "NOT_ENCRYPT"),
    ("dp_eps", 0.0, "> 0"),
    ("dp_delta", 0.0, "in (0, 1)"),
    ("dp_delta", 1.0, "in (0, 1)"),
    ("dp_norm_clip", -1.0, "> 0"),
    ("sign_k", 0.0, "in (0, 0.25]"),
    ("sign_k", 0.3, "in (0, 0.25]"),
    ("sign_eps", 0.0, "in (0, 100]"),
    ("sign_eps", 100.5, "in (0, 100]"),
    ("sign_thr_ratio", 0.49, "in [0.5, 1]"),
    ("sign_thr_ratio", 1.1, "in [0.5, 1]"),
    ("sign_global_lr", 0.0, "> 0"),
    ("sign_dim_out", -1, "in [0, 50]"),
    ("sign_dim_out", 51, "in [0, 50]"),
    ("root_first_ca_path", None, "a string"),
    ("config_file_path", Path("config.json"), "a string"),
    ("http_url_prefix", "fl", "leading '/'"),
    ("http_url_prefix", "/fl/", "no trailing '/'"),
    ("http_url_prefix", "/f l", "no spaces"),
    ("upload_compress_type", "QUANT", "one of 'NO_COMPRESS', 'DIFF_SPARSE_QUANT'"),
    ("download_compress_type", "DIFF_SPARSE_QUANT", "one of 'NO_COMPRESS', 'QUANT'"),
    ("participation_time_level", "15,5", "0 < a < b <= 2880"),
    ("participation_time_level", "5,5", "0 < a < b <= 2880"),
    ("participation_time_level", "0,15", "0 < a < b <= 2880"),
    ("participation_time_level", "5,2881", "0 < a < b <= 2880"),
    ("participation_time_level", "5", "'a,b'"),
    ("participation_time_level", "5,15,20", "'a,b'"),
    ("participation_time_level", "a,b", "'a,b'"),
    ("continuous_failure_times", 0, "an integer >= 1"),
    ("worker_step_num_per_iteration", 0, "an integer >= 1"),
    ("node_id", "n" * 101, "at most 100 characters"),
    ("node_id", 7, "a string"),
    ("heartbeat_interval", 0, "> 0"),
    ("heartbeat_timeout", -1.0, "> 0"),
    ("cluster_available_timeout", 0.0, "> 0"),
    ("connect_interval", 0, "> 0"),
    ("connect_interval", "3", "a finite number"),
    ("scheduler_manage_host", "", "host name or IP address"),
    ("fl_server_host", "0.0.0.0/0", "host name or IP address"),
    ("aggregation_device", "gpu", "'cpu', 'cuda' or 'cuda:N'"),
    ("aggregation_device", "cuda:", "'cpu', 'cuda' or 'cuda:N'"),
    ("aggregation_device", "CUDA", "'cpu', 'cuda' or 'cuda:N'"),
    ("max_message_size", 0, "an integer >= 1"),
    ("max_device_body", 0, "an integer >= 1"),
    ("checkpoint_keep", 0, "an integer >= 1"),
    ("model_keep", 0, "an integer >= 1"),
    ("min_retry_delay_ms", 0, "in [1, 3600000]"),
    ("min_retry_delay_ms", 3_600_001, "in [1, 3600000]"),
    ("advertise_host", "10.0.0.1 ", "'' or a host name or IP address"),
    ("finish_timeout", 0, "> 0"),
    ("scaling_timeout", 0, "> 0"),
]


@pytest.mark.parametrize(("name", "value", "allowed"), BAD_VALUES)
def test_bad_value_is_refused_naming_parameter_value_and_rule(name: str, value: object, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        FLContext.from_kwargs(**{name: value})
    message = str(info.value)
    assert f"{name}={value!r}" in message
    assert allowed in message
    # the constructor and evolve refuse the same way
    with pytest.raises(ConfigError):
        FLContext().evolve(**{name: value})
    with pytest.raises(ConfigError):
        set_fl_context(**{name: value})
    assert get_fl_context() == FLContext()


def test_bad_values_cover_every_constrained_field() -> None:
    unconstrained_strings = {
        "root_second_ca_path",
        "equip_crl_path",
        "client_password",
        "server_password",
        "checkpoint_dir",
        "instance_name",
    }
    covered = {name for name, _, _ in BAD_VALUES}
    assert set(FLContext.field_names()) - covered == unconstrained_strings
    for name in unconstrained_strings:
        with pytest.raises(ConfigError, match=name):
            FLContext.from_kwargs(**{name: 1})


GOOD_VALUES: list[tuple[str, object]] = [
    ("server_mode", "HYBRID_TRAINING"),
    ("ms_role", "MS_SCHED"),
    ("scheduler_ip", "a" * 100),
    ("scheduler_ip", "::1"),
    ("scheduler_ip", "fl-scheduler.example.com"),
    ("scheduler_port", 65535),
    ("fl_server_port", 1),
    ("update_model_ratio", 1.0),
    ("update_model_ratio", 1e-9),
    ("dp_delta", 0.999),
    ("sign_k", 0.25),
    ("sign_eps", 100),
    ("sign_thr_ratio", 0.5),
    ("sign_dim_out", 50),
    ("http_url_prefix", "/fl"),
    ("http_url_prefix", "/a/b-c"),
    ("participation_time_level", "1,2880"),
    ("participation_time_level", " 5 , 15 "),
    ("aggregation_device", "cuda"),
    ("aggregation_device", "cuda:3"),
    ("node_id", "n" * 100),
    ("fl_name", "LeNet"),
    ("fl_name", ""),
    ("start_fl_job_threshold", 0xFFFFFFFF),
    ("global_iteration_time_window", 0xFFFFFFFF),
    ("min_retry_delay_ms", 3_600_000),
    ("advertise_host", "10.0.0.7"),
]


@pytest.mark.parametrize(("name", "value"), GOOD_VALUES)
def test_boundary_values_are_accepted(name: str, value: object) -> None:
    kwargs: dict[str, object] = {name: value}
    if value == "HYBRID_TRAINING":
        kwargs["worker_num"] = 1
    assert getattr(FLContext.from_kwargs(**kwargs), name) == value


def test_type_conversion() -> None:
    ctx = FLContext.from_kwargs(
        server_num=4.0,  # the original's REST tool sends floats
        start_fl_job_threshold=8.0,
        update_model_ratio=1,
        dp_eps=10,
        heartbeat_timeout=60,
    )
    assert ctx.server_num == 4 and type(ctx.server_num) is int
    assert ctx.start_fl_job_threshold == 8 and type(ctx.start_fl_job_threshold) is int
    assert ctx.update_model_ratio == 1.0 and type(ctx.update_model_ratio) is float
    assert type(ctx.dp_eps) is float
    assert type(ctx.heartbeat_timeout) is float
    with pytest.raises(ConfigError, match=r"start_fl_job_threshold=8\.5"):
        FLContext.from_kwargs(start_fl_job_threshold=8.5)
    with pytest.raises(ConfigError, match="dp_eps=True"):
        FLContext.from_kwargs(dp_eps=True)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError, match="server_num=0"):
        FLContext(server_num=0)
    assert FLContext(server_num=3) == FLContext.from_kwargs(server_num=3)


# ---------------------------------------------------------------------------------------------------------
# Cross-field rules
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encrypt_type", ["PW_ENCRYPT", "STABLE_PW_ENCRYPT", "SIGNDS"])
def test_sparse_upload_compression_refused_with_encryption(encrypt_type: str) -> None:
    extra: dict[str, object] = {}
    if encrypt_type == "PW_ENCRYPT":
        extra = {"start_fl_job_threshold": 4, "reconstruct_secrets_threshold": 2}
    with pytest.raises(ConfigError) as info:
        FLContext.from_kwargs(upload_compress_type="DIFF_SPARSE_QUANT", encrypt_type=encrypt_type, **extra)
    message = str(info.value)
    assert "upload_compress_type='DIFF_SPARSE_QUANT'" in message
    assert f"encrypt_type={encrypt_type!r}" in message
    # each alone is fine, and evolving into the conflict is refused
    ctx = FLContext.from_kwargs(encrypt_type=encrypt_type, **extra)
    with pytest.raises(ConfigError, match="DIFF_SPARSE_QUANT"):
        ctx.evolve(upload_compress_type="DIFF_SPARSE_QUANT")


@pytest.mark.parametrize("encrypt_type", ["NOT_ENCRYPT", "DP_ENCRYPT"])
def test_sparse_upload_compression_allowed_without_masking(encrypt_type: str) -> None:
    ctx = FLContext.from_kwargs(upload_compress_type="DIFF_SPARSE_QUANT", encrypt_type=encrypt_type)
    assert ctx.upload_compress_type == "DIFF_SPARSE_QUANT"


@pytest.mark.parametrize(("interval", "timeout"), [(30.0, 30.0), (31.0, 30.0), (3.0, 2.0)])
def test_heartbeat_interval_must_be_below_timeout(interval: float, timeout: float) -> None:
    with pytest.raises(ConfigError) as info:
        FLContext.from_kwargs(heartbeat_interval=interval, heartbeat_timeout=timeout)
    assert f"heartbeat_interval={interval!r}" in str(info.value)
    assert f"heartbeat_timeout={timeout!r}" in str(info.value)


def test_worker_rules() -> None:
    with pytest.raises(ConfigError, match=r"ms_role='MS_WORKER'.*worker_num=0"):
        FLContext.from_kwargs(ms_role="MS_WORKER")
    assert FLContext.from_kwargs(ms_role="MS_WORKER", worker_num=2).worker_num == 2
    with pytest.raises(ConfigError, match=r"server_mode='HYBRID_TRAINING'.*worker_num=2"):
        FLContext.from_kwargs(server_mode="HYBRID_TRAINING", worker_num=2)


def test_pki_verify_needs_root_certificates() -> None:
    with pytest.raises(ConfigError, match=r"pki_verify=True.*root_first_ca_path"):
        FLContext.from_kwargs(pki_verify=True)
    with pytest.raises(ConfigError, match=r"pki_verify=True.*root_second_ca_path"):
        FLContext.from_kwargs(pki_verify=True, root_first_ca_path="a.pem")
    ctx = FLContext.from_kwargs(pki_verify=True, root_first_ca_path="a.pem", root_second_ca_path="b.pem")
    assert ctx.pki_verify


def test_pw_encrypt_needs_reconstruct_threshold_below_update_threshold() -> None:
    with pytest.raises(ConfigError) as info:
        FLContext.from_kwargs(encrypt_type="PW_ENCRYPT", start_fl_job_threshold=8)
    message = str(info.value)
    assert "reconstruct_secrets_threshold=2000" in message
    assert "start_fl_job_threshold=8" in message
    assert "update_model_threshold=8" in message
    with pytest.raises(ConfigError, match="reconstruct_secrets_threshold=4"):
        FLContext.from_kwargs(
            encrypt_type="PW_ENCRYPT",
            start_fl_job_threshold=8,
            update_model_ratio=0.5,
            reconstruct_secrets_threshold=4,
        )
    ctx = FLContext.from_kwargs(
        encrypt_type="PW_ENCRYPT",
        start_fl_job_threshold=8,
        update_model_ratio=0.5,
        reconstruct_secrets_threshold=3,
    )
    assert ctx.update_model_threshold == 4
    # STABLE_PW_ENCRYPT has no secret sharing, so no such rule
    assert FLContext.from_kwargs(encrypt_type="STABLE_PW_ENCRYPT").reconstruct_secrets_threshold == 2000


# ---------------------------------------------------------------------------------------------------------
# Derived values, from_kwargs / evolve / field_names
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("threshold", "ratio", "expected"),
    [
        (8, 1.0, 8),
        (8, 0.5, 4),
        (7, 0.5, 4),
        (10, 0.3, 3),
        (10, 0.7, 7),
        (100, 0.07, 7),
        (100, 0.57, 57),
        (100, 0.29, 29),
        (3, 1 / 3, 1),
        (1, 1e-9, 1),
        (100, 0.01, 1),
    ],
)
def test_update_model_threshold(threshold: int, ratio: float, expected: int) -> None:
    ctx = FLContext.from_kwargs(start_fl_job_threshold=threshold, update_model_ratio=ratio)
    assert ctx.update_model_threshold == expected


def test_iteration_time_window_and_participation_levels() -> None:
    ctx = FLContext.from_kwargs(start_fl_job_time_window=3000, update_model_time_window=4000)
    assert ctx.iteration_time_window_ms == 7000
    assert FLContext().iteration_time_window_ms == 600000
    assert FLContext().participation_time_levels == (5, 15)
    assert FLContext.from_kwargs(participation_time_level="1, 2880").participation_time_levels == (1, 2880)


def test_unknown_keyword_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        FLContext.from_kwargs(reconstruct_secrets_threshhold=3)
    message = str(info.value)
    assert message.startswith("Set FL context keyword 'reconstruct_secrets_threshhold' is not recognized")
    assert "did you mean 'reconstruct_secrets_threshold'?" in message
    assert "known keywords: server_mode, ms_role" in message
    with pytest.raises(ConfigError, match="'feature_maps' is not recognized"):
        FLContext().evolve(feature_maps=[])
    with pytest.raises(ConfigError, match="'bogus' is not recognized"):
        set_fl_context(bogus=1)


def test_evolve_returns_a_validated_copy() -> None:
    ctx = FLContext()
    changed = ctx.evolve(server_num=4, fl_name="LeNet")
    assert (changed.server_num, changed.fl_name) == (4, "LeNet")
    assert ctx == FLContext()
    assert changed.evolve() == changed


def test_field_names() -> None:
    names = FLContext.field_names()
    assert names == tuple(a.name for a in attrs.fields(FLContext))
    assert names[0] == "server_mode"
    assert {"enable_fl", "node_id", "checkpoint_keep", "worker_step_num_per_iteration"} <= set(names)
    assert len(names) == len(set(names)) == 66


# ---------------------------------------------------------------------------------------------------------
# set_fl_context / get_fl_context / reset_fl_context
# ---------------------------------------------------------------------------------------------------------


def test_set_get_reset() -> None:
    assert get_fl_context() == FLContext()
    assert explicit_fl_context_keys() == frozenset()
    # the guide's call
    set_fl_context(
        enable_fl=True,
        server_mode="FEDERATED_LEARNING",
        ms_role="MS_SERVER",
        server_num=4,
        scheduler_ip="192.168.216.124",
        scheduler_port=6667,
        fl_server_port=6668,
        fl_name="LeNet",
        scheduler_manage_port=11202,
        config_file_path="./config.json",
    )
    set_fl_context(start_fl_job_threshold=8)  # merges
    ctx = get_fl_context()
    assert (ctx.server_num, ctx.scheduler_ip, ctx.fl_name, ctx.start_fl_job_threshold) == (
        4,
        "192.168.216.124",
        "LeNet",
        8,
    )
    assert "start_fl_job_threshold" in explicit_fl_context_keys()
    assert "server_num" in explicit_fl_context_keys()
    reset_fl_context()
    assert get_fl_context() == FLContext()
    assert explicit_fl_context_keys() == frozenset()


def test_set_is_validated_as_a_whole_and_atomic() -> None:
    set_fl_context(heartbeat_timeout=10.0)
    with pytest.raises(ConfigError, match=r"heartbeat_interval=12\.0"):
        set_fl_context(heartbeat_interval=12.0, server_num=9)
    assert get_fl_context() == FLContext(heartbeat_timeout=10.0)
    assert explicit_fl_context_keys() == {"heartbeat_timeout"}
    set_fl_context(heartbeat_interval=12.0, heartbeat_timeout=20.0)
    assert get_fl_context().heartbeat_interval == 12.0


# ---------------------------------------------------------------------------------------------------------
# argparse
# ---------------------------------------------------------------------------------------------------------


def test_guide_flags_round_trip() -> None:
    argv = [
        "--scheduler_ip=127.0.0.1",
        "--scheduler_port=6667",
        "--fl_server_port=6668",
        "--server_num=4",
        "--start_fl_job_threshold=8",
        "--config_file_path=/srv/mobile/config.json",
        "--local_server_num=2",  # the example script's own flag
    ]
    args, unknown = _parser().parse_known_args(argv)
    assert unknown == ["--local_server_num=2"]
    kwargs = context_kwargs_from_args(args)
    assert kwargs == {
        "scheduler_ip": "127.0.0.1",
        "scheduler_port": 6667,
        "fl_server_port": 6668,
        "server_num": 4,
        "start_fl_job_threshold": 8,
        "config_file_path": "/srv/mobile/config.json",
    }
    ctx = FLContext.from_kwargs(**kwargs)
    assert ctx.server_num == 4 and ctx.start_fl_job_threshold == 8
    assert ctx.fl_name == "" and ctx.scheduler_manage_port == 11202


def test_guide_scale_out_flags() -> None:
    argv = "--node_id=scale_node --scheduler_ip=192.168.216.124 --scheduler_port=6667 --fl_server_port=6672 "
    argv += "--server_num=6 --start_fl_job_threshold=8 --local_server_num=2 --config_file_path=/x/config.json"
    args, _ = _parser().parse_known_args(argv.split())
    ctx = FLContext.from_kwargs(**context_kwargs_from_args(args))
    assert (ctx.node_id, ctx.fl_server_port, ctx.server_num) == ("scale_node", 6672, 6)


def test_no_flags_gives_no_kwargs_and_script_attributes_are_ignored() -> None:
    parser = _parser()
    parser.add_argument("--local_server_num", type=int, default=2)
    args = parser.parse_args([])
    assert context_kwargs_from_args(args) == {}
    assert args.local_server_num == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [("True", True), ("False", False), ("true", True), ("false", False), ("1", True), ("0", False)],
)
def test_bool_flags(text: str, expected: bool) -> None:
    args = _parser().parse_args([f"--enable_ssl={text}", "--pki_verify", text, "--root_first_ca_path=a"])
    assert context_kwargs_from_args(args)["enable_ssl"] is expected
    assert context_kwargs_from_args(args)["pki_verify"] is expected


@pytest.mark.parametrize(
    ("flag", "text"),
    [
        ("enable_ssl", "yes"),
        ("enable_ssl", "2"),
        ("server_num", "four"),
        ("server_num", "4.5"),
        ("dp_eps", "nan"),
    ],
)
def test_unparsable_flag_is_an_argparse_error(
    flag: str, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        _parser().parse_args([f"--{flag}={text}"])
    assert info.value.code == 2
    assert f"--{flag}" in capsys.readouterr().err


def test_numeric_flag_text() -> None:
    args = _parser().parse_args(["--server_num=4.0", "--update_model_ratio=1", "--dp_eps=1e2"])
    assert context_kwargs_from_args(args) == {"server_num": 4, "update_model_ratio": 1.0, "dp_eps": 100.0}


def test_out_of_range_flag_is_refused_by_the_context() -> None:
    args = _parser().parse_args(["--server_num=0"])
    with pytest.raises(ConfigError, match="server_num=0"):
        FLContext.from_kwargs(**context_kwargs_from_args(args))


def test_help_lists_every_flag_and_hides_password_defaults() -> None:
    text = _parser().format_help()
    for name in FLContext.field_names():
        assert f"--{name}" in text
    assert "(default: <hidden>)" in text
    assert "(default: 'FEDERATED_LEARNING')" in text


def test_adding_flags_twice_is_an_argparse_error() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server_num")
    with pytest.raises(argparse.ArgumentError):
        add_context_arguments(parser)


# a valid value for every field; cross-field rules are repaired in _valid_kwargs
_POSITIVE_INT = st.integers(min_value=1, max_value=2**40)
_UINT32 = st.integers(min_value=1, max_value=0xFFFFFFFF)
_POSITIVE_FLOAT = st.floats(min_value=0, exclude_min=True, allow_nan=False, allow_infinity=False)
_RATIO = st.floats(min_value=0, max_value=1, exclude_min=True)
# argparse treats a lone "--" as the end of options even in "--flag=--" and hands back [] (refused
# with a clear ConfigError, but not a round trip), so that one value is left out of the property.
_ANY_TEXT = st.text(max_size=30).filter(lambda text: text != "--")
_HOST_TEXT = st.from_regex(r"[A-Za-z0-9._:%\[\]-]{1,100}", fullmatch=True).filter(lambda text: text != "--")
FIELD_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "server_mode": st.sampled_from(["FEDERATED_LEARNING", "HYBRID_TRAINING"]),
    "ms_role": st.sampled_from(["MS_SERVER", "MS_WORKER", "MS_SCHED"]),
    "worker_num": st.integers(min_value=0, max_value=10),
    "server_num": _POSITIVE_INT,
    "scheduler_ip": _HOST_TEXT,
    "scheduler_port": st.integers(1, 65535),
    "fl_server_port": st.integers(1, 65535),
    "enable_fl_client": st.booleans(),
    "start_fl_job_threshold": _UINT32,
    "start_fl_job_time_window": _UINT32,
    "update_model_ratio": _RATIO,
    "update_model_time_window": _UINT32,
    "share_secrets_ratio": _RATIO,
    "cipher_time_window": _POSITIVE_INT,
    "reconstruct_secrets_threshold": _POSITIVE_INT,
    "fl_name": _ANY_TEXT.filter(lambda s: not set(s) & {"/", "\\", "\x00"}),
    "fl_iteration_num": _UINT32,
    "client_epoch_num": _POSITIVE_INT,
    "client_batch_size": _POSITIVE_INT,
    "client_learning_rate": _POSITIVE_FLOAT,
    "encrypt_type": st.sampled_from(
        ["NOT_ENCRYPT", "DP_ENCRYPT", "PW_ENCRYPT", "STABLE_PW_ENCRYPT", "SIGNDS"]
    ),
    "dp_eps": _POSITIVE_FLOAT,
    "dp_delta": st.floats(min_value=0, max_value=1, exclude_min=True, exclude_max=True),
    "dp_norm_clip": _POSITIVE_FLOAT,
    "sign_k": st.floats(min_value=0, max_value=0.25, exclude_min=True),
    "sign_eps": st.floats(min_value=0, max_value=100, exclude_min=True),
    "sign_thr_ratio": st.floats(min_value=0.5, max_value=1),
    "sign_global_lr": _POSITIVE_FLOAT,
    "sign_dim_out": st.integers(0, 50),
    "root_first_ca_path": _ANY_TEXT,
    "root_second_ca_path": _ANY_TEXT,
    "equip_crl_path": _ANY_TEXT,
    "pki_verify": st.booleans(),
    "replay_attack_time_diff": _POSITIVE_INT,
    "enable_ssl": st.booleans(),
    "client_password": _ANY_TEXT,
    "server_password": _ANY_TEXT,
    "scheduler_manage_port": st.integers(1, 65535),
    "config_file_path": _ANY_TEXT,
    "http_url_prefix": st.from_regex(r"(/[A-Za-z0-9._~%@:-]{1,8}){0,3}", fullmatch=True),
    "global_iteration_time_window": _UINT32,
    "upload_compress_type": st.sampled_from(["NO_COMPRESS", "DIFF_SPARSE_QUANT"]),
    "upload_sparse_rate": _RATIO,
    "download_compress_type": st.sampled_from(["NO_COMPRESS", "QUANT"]),
    "checkpoint_dir": _ANY_TEXT,
    "instance_name": _ANY_TEXT,
    "participation_time_level": st.tuples(st.integers(1, 2879), st.integers(1, 2879)).map(
        lambda ab: f"{min(ab)},{max(ab) + 1}"
    ),
    "continuous_failure_times": _POSITIVE_INT,
    "worker_step_num_per_iteration": _POSITIVE_INT,
    "enable_fl": st.booleans(),
    "node_id": st.text(max_size=100),
    "heartbeat_interval": _POSITIVE_FLOAT,
    "heartbeat_timeout": _POSITIVE_FLOAT,
    "cluster_available_timeout": _POSITIVE_FLOAT,
    "connect_interval": _POSITIVE_FLOAT,
    "scheduler_manage_host": _HOST_TEXT,
    "fl_server_host": _HOST_TEXT,
    "aggregation_device": st.one_of(
        st.sampled_from(["cpu", "cuda"]), st.integers(0, 15).map("cuda:{}".format)
    ),
    "max_message_size": _POSITIVE_INT,
    "max_device_body": _POSITIVE_INT,
    "checkpoint_keep": _POSITIVE_INT,
    "model_keep": _POSITIVE_INT,
    "min_retry_delay_ms": st.integers(1, 3_600_000),
    "advertise_host": st.one_of(st.just(""), _HOST_TEXT),
    "finish_timeout": _POSITIVE_FLOAT,
    "scaling_timeout": _POSITIVE_FLOAT,
}


def _repair(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Adjust a dict of individually valid values so the cross-field rules hold too."""
    fixed = dict(kwargs)

    def value(name: str) -> Any:
        return fixed.get(name, getattr(FLContext(), name))

    if value("upload_compress_type") == "DIFF_SPARSE_QUANT" and value("encrypt_type") in {
        "PW_ENCRYPT",
        "STABLE_PW_ENCRYPT",
        "SIGNDS",
    }:
        fixed["upload_compress_type"] = "NO_COMPRESS"
    low, high = sorted([value("heartbeat_interval"), value("heartbeat_timeout")])
    if not low < high:
        # Double the larger bound, or halve the smaller one where doubling would overflow to inf.
        high = low * 2
        if math.isinf(high):
            low, high = low / 2, low
    if (low, high) != (value("heartbeat_interval"), value("heartbeat_timeout")):
        fixed["heartbeat_interval"], fixed["heartbeat_timeout"] = low, high
    if value("server_mode") == "HYBRID_TRAINING" or (
        value("ms_role") == "MS_WORKER" and value("worker_num") < 1
    ):
        fixed["worker_num"] = 1
    if value("pki_verify"):
        fixed["root_first_ca_path"] = value("root_first_ca_path") or "root1.pem"
        fixed["root_second_ca_path"] = value("root_second_ca_path") or "root2.pem"
    if value("encrypt_type") == "PW_ENCRYPT":
        probe = FLContext.from_kwargs(
            start_fl_job_threshold=value("start_fl_job_threshold"),
            update_model_ratio=value("update_model_ratio"),
        )
        if value("reconstruct_secrets_threshold") >= probe.update_model_threshold:
            fixed["start_fl_job_threshold"] = max(value("start_fl_job_threshold"), 2)
            fixed["update_model_ratio"] = 1.0
            fixed["reconstruct_secrets_threshold"] = 1
    return fixed


@st.composite
def _valid_kwargs(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.sets(st.sampled_from(sorted(FIELD_STRATEGIES))))
    return _repair({name: draw(FIELD_STRATEGIES[name]) for name in sorted(names)})


def _flag_text(value: object) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def test_strategies_cover_every_field() -> None:
    assert set(FIELD_STRATEGIES) == set(FLContext.field_names())


@settings(max_examples=300, deadline=None)
@given(_valid_kwargs())
def test_any_valid_kwargs_round_trip_through_argparse(kwargs: dict[str, Any]) -> None:
    expected = FLContext.from_kwargs(**kwargs)
    argv = [f"--{name}={_flag_text(value)}" for name, value in kwargs.items()]
    args, unknown = _parser().parse_known_args([*argv, "--local_server_num=1"])
    assert unknown == ["--local_server_num=1"]
    parsed = context_kwargs_from_args(args)
    assert set(parsed) == set(kwargs)
    assert FLContext.from_kwargs(**parsed) == expected


# ---------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------

FULL_ENVIRONMENT = {
    "MS_ROLE": "MS_SCHED",
    "MS_SERVER_NUM": "4",
    "MS_WORKER_NUM": "0",
    "MS_SCHED_HOST": "10.1.2.3",
    "MS_SCHED_PORT": "8113",
    "MS_SCHED_MANAGE_PORT": "11203",
    "MS_NODE_ID": "20",
    "PATH": "/usr/bin",
}


def test_environment_is_read() -> None:
    assert environment_kwargs(FULL_ENVIRONMENT) == {
        "ms_role": "MS_SCHED",
        "server_num": 4,
        "worker_num": 0,
        "scheduler_ip": "10.1.2.3",
        "scheduler_port": 8113,
        "scheduler_manage_port": 11203,
        "node_id": "20",
    }
    ctx = apply_environment(FLContext(), FULL_ENVIRONMENT)
    assert (ctx.ms_role, ctx.server_num, ctx.scheduler_ip, ctx.scheduler_port) == (
        "MS_SCHED",
        4,
        "10.1.2.3",
        8113,
    )
    assert (ctx.scheduler_manage_port, ctx.node_id) == (11203, "20")


def test_empty_and_missing_variables_are_skipped() -> None:
    assert environment_kwargs({"MS_NODE_ID": "", "MS_ROLE": ""}) == {}
    ctx = FLContext(node_id="keep")
    assert apply_environment(ctx, {}) is ctx


def test_explicit_keys_win_over_environment() -> None:
    args = _parser().parse_args(["--server_num=2", "--scheduler_ip=127.0.0.1"])
    given_kwargs = context_kwargs_from_args(args)
    ctx = apply_environment(
        FLContext.from_kwargs(**given_kwargs), FULL_ENVIRONMENT, explicit=frozenset(given_kwargs)
    )
    assert ctx.server_num == 2 and ctx.scheduler_ip == "127.0.0.1"  # flags win
    assert ctx.scheduler_port == 8113 and ctx.node_id == "20"  # environment fills the rest
    # the same through the process-wide context
    set_fl_context(server_num=3)
    ctx = apply_environment(get_fl_context(), FULL_ENVIRONMENT, explicit=explicit_fl_context_keys())
    assert ctx.server_num == 3 and ctx.ms_role == "MS_SCHED"
    # and through build_fl_context
    built = build_fl_context(given_kwargs, FULL_ENVIRONMENT)
    assert built.server_num == 2 and built.scheduler_port == 8113
    assert build_fl_context() == FLContext()
    assert build_fl_context({"fl_name": "x"}) == FLContext(fl_name="x")


def test_build_validates_the_merged_keywords_once() -> None:
    ctx = build_fl_context({"ms_role": "MS_WORKER"}, {"MS_WORKER_NUM": "1"})
    assert (ctx.ms_role, ctx.worker_num) == ("MS_WORKER", 1)


def test_environment_does_not_override_a_flag_equal_to_the_default() -> None:
    args = _parser().parse_args(["--scheduler_port=6667"])
    given_kwargs = context_kwargs_from_args(args)
    ctx = build_fl_context(given_kwargs, {"MS_SCHED_PORT": "7000"})
    assert ctx.scheduler_port == 6667


@pytest.mark.parametrize(
    ("variable", "raw", "allowed"),
    [
        ("MS_ROLE", "MS_PSERVER", "one of 'MS_SERVER'"),
        ("MS_ROLE", "ms_server", "one of 'MS_SERVER'"),
        ("MS_SERVER_NUM", "four", "text that parses as int"),
        ("MS_SERVER_NUM", "0", "an integer >= 1"),
        ("MS_WORKER_NUM", "-1", ">= 0"),
        ("MS_SCHED_HOST", "a" * 101, "1 to 100 characters"),
        ("MS_SCHED_PORT", "99999", "a port number in [1, 65535]"),
        ("MS_SCHED_PORT", "66 67", "text that parses as int"),
        ("MS_SCHED_MANAGE_PORT", "x", "text that parses as int"),
        ("MS_NODE_ID", "n" * 101, "at most 100 characters"),
    ],
)
def test_malformed_variable_is_refused_naming_it(variable: str, raw: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_environment(FLContext(), {variable: raw})
    message = str(info.value)
    assert message.startswith(f"environment variable {variable}={raw!r} is refused")
    assert allowed in message


def test_malformed_variable_is_refused_even_when_the_key_is_explicit() -> None:
    with pytest.raises(ConfigError, match="MS_SERVER_NUM"):
        apply_environment(FLContext(), {"MS_SERVER_NUM": "x"}, explicit={"server_num"})


def test_explicit_must_name_real_keys() -> None:
    with pytest.raises(ConfigError, match="'servers' is not recognized"):
        apply_environment(FLContext(), {}, explicit={"servers"})


def test_environment_cross_field_error_names_fields() -> None:
    with pytest.raises(ConfigError, match=r"ms_role='MS_WORKER'.*worker_num=0"):
        apply_environment(FLContext(), {"MS_ROLE": "MS_WORKER"})


# ---------------------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------------------


def _write(tmp_path: Path, content: object, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def test_no_config_file_gives_defaults() -> None:
    for path in (None, ""):
        config = load_cluster_config(path)
        assert config == ClusterConfig()
        assert config.recovery is None and not config.recovery_enabled
        assert (config.cert_expire_warning_time_in_day, config.cert_check_interval_in_hour) == (90, 168)
        assert config.connection_num == 10000 and config.node_id == ""


def test_guide_recovery_snippet_with_typo(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    snippet = """{
    "recovery": {
        "storage_type": 1,
        "storge_file_path": "config.json"
    }
}"""
    path = _write(tmp_path, snippet)
    with caplog.at_level(logging.WARNING, logger="flcluster.config"):
        config = load_cluster_config(path)
    assert config.recovery == StorageConfig(storage_type=1, storage_file_path=str(tmp_path / "config.json"))
    assert config.recovery_enabled
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "'recovery.storge_file_path' is a misspelling of 'recovery.storage_file_path'" in m for m in messages
    )
    assert any("points at the config file itself" in m for m in messages)


def test_legacy_mindspore_example(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # MindSpore tests/st/fl/mobile/config.json, as shipped
    legacy = """{
    "recovery": {
        "storge_type": 1,
        "storage_file_path": "recovery.json"
    },
    "server_cert_path": "server.crt",
    "server_password": "server_password",
    "crl_path": "server.crl",
    "client_cert_path": "client.crt",
    "client_password": "client_password",
    "ca_cert_path": "ca.crt",
    "Key_encrypt_decrypt_algorithm": "",
    "node_id": 1
}"""
    path = _write(tmp_path, legacy)
    with caplog.at_level(logging.WARNING, logger="flcluster.config"):
        config = load_cluster_config(str(path))
    assert config.recovery == StorageConfig(storage_type=1, storage_file_path=str(tmp_path / "recovery.json"))
    assert config.server_cert_path == str(tmp_path / "server.crt")
    assert config.client_cert_path == str(tmp_path / "client.crt")
    assert config.ca_cert_path == str(tmp_path / "ca.crt")
    assert config.crl_path == str(tmp_path / "server.crl")
    assert config.node_id == "1"
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "'recovery.storge_type' is a misspelling of 'recovery.storage_type'" in text
    for key in ("server_password", "client_password", "Key_encrypt_decrypt_algorithm"):
        assert f"legacy key {key!r} is ignored" in text
    assert 'server_password"' not in repr(config)


def test_full_config(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    content = {
        "recovery": {
            "storage_type": 1,
            "storage_file_path": "recovery.json",
            "scheduler_storage_file_path": "scheduler_recovery.json",
        },
        "server_recovery": {"storage_type": 1, "storage_file_path": "../server_recovery.json"},
        "metrics": {"storage_type": 1, "storage_file_path": "/var/log/fl/metrics.json"},
        "dataRate": {"storage_type": 1, "storage_file_path": "datarate"},
        "failureEvent": {"storage_type": 1, "storage_file_path": "event.txt"},
        "server_cert_path": "",
        "cipher_list": "ECDHE-ECDSA-AES128-GCM-SHA256",
        "cert_expire_warning_time_in_day": 7,
        "cert_check_interval_in_hour": 24,
        "connection_num": 500,
        "node_id": "server-a",
    }
    with caplog.at_level(logging.WARNING, logger="flcluster.config"):
        config = load_cluster_config(_write(sub, content))
    assert caplog.records == []
    assert config.recovery == StorageConfig(
        storage_type=1,
        storage_file_path=str(sub / "recovery.json"),
        scheduler_storage_file_path=str(sub / "scheduler_recovery.json"),
    )
    assert config.server_recovery is not None
    assert os.path.normpath(config.server_recovery.storage_file_path) == str(
        tmp_path / "server_recovery.json"
    )
    assert config.metrics is not None and config.metrics.storage_file_path == "/var/log/fl/metrics.json"
    assert config.data_rate is not None and config.data_rate.storage_file_path == str(sub / "datarate")
    assert config.failure_event is not None and config.failure_event.storage_file_path == str(
        sub / "event.txt"
    )
    assert config.server_cert_path == ""
    assert (config.cert_expire_warning_time_in_day, config.cert_check_interval_in_hour) == (7, 24)
    assert (config.connection_num, config.node_id, config.cipher_list) == (
        500,
        "server-a",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
    )


def test_relative_config_path_is_resolved_against_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = tmp_path / "mobile"
    sub.mkdir()
    _write(sub, {"metrics": {"storage_type": 1, "storage_file_path": "metrics.json"}})
    monkeypatch.chdir(tmp_path)
    config = load_cluster_config(Path("mobile/config.json"))
    assert config.metrics is not None
    assert config.metrics.storage_file_path == str(sub / "metrics.json")


BAD_FILES: list[tuple[str, str]] = [
    ('{"recovery": ', "is not valid JSON"),
    ("", "is not valid JSON"),
    ("[1, 2]", "the top level must be a JSON object, got an array"),
    ('"recovery"', "the top level must be a JSON object"),
    ('{"recover": {"storage_type": 1, "storage_file_path": "r.json"}}', "key 'recover' is not recognized"),
    ('{"data_rate": {"storage_type": 1, "storage_file_path": "d"}}', "key 'data_rate' is not recognized"),
    (
        '{"recovery": {"storage_type": 1, "storage_file_path": "r", "path": 1}}',
        "'recovery.path' is not recognized",
    ),
    ('{"recovery": {"storage_file_path": "r.json"}}', "'recovery.storage_type' is required"),
    ('{"recovery": {"storage_type": 1}}', "'recovery.storage_file_path' is required"),
    ('{"recovery": {"storage_type": 2, "storage_file_path": "r"}}', "'recovery.storage_type' is refused"),
    ('{"recovery": {"storage_type": "1", "storage_file_path": "r"}}', "the number 1 (file storage), got '1'"),
    ('{"recovery": {"storage_type": true, "storage_file_path": "r"}}', "got True"),
    ('{"recovery": {"storage_type": 1, "storage_file_path": ""}}', "'recovery.storage_file_path' is refused"),
    ('{"metrics": {"storage_type": 1, "storage_file_path": 5}}', "'metrics.storage_file_path' is refused"),
    ('{"recovery": null}', "key 'recovery' must be a JSON object, got null"),
    ('{"dataRate": ["x"]}', "key 'dataRate' must be a JSON object, got an array"),
    (
        '{"recovery": {"storage_type": 1, "storge_type": 1, "storage_file_path": "r"}}',
        "both 'recovery.storage_type' and its misspelling 'recovery.storge_type'",
    ),
    ('{"cert_expire_warning_time_in_day": 5}', "key 'cert_expire_warning_time_in_day' is refused"),
    ('{"cert_expire_warning_time_in_day": 181}', "an integer in [7, 180], got 181"),
    ('{"cert_expire_warning_time_in_day": 90.0}', "got 90.0"),
    ('{"cert_check_interval_in_hour": 0}', "key 'cert_check_interval_in_hour' is refused"),
    ('{"connection_num": "10000"}', "key 'connection_num' is refused"),
    ('{"server_cert_path": 1}', "key 'server_cert_path' is refused: expected a string"),
    ('{"cipher_list": ["a"]}', "key 'cipher_list' is refused"),
    ('{"node_id": true}', "key 'node_id' is refused"),
    ('{"node_id": "' + "n" * 101 + '"}', "at most 100 characters"),
    ('{"connection_num": 1, "connection_num": 2}', "key 'connection_num' is given more than once"),
]


@pytest.mark.parametrize(("content", "problem"), BAD_FILES)
def test_bad_config_file_is_refused(tmp_path: Path, content: str, problem: str) -> None:
    path = _write(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load_cluster_config(path)
    message = str(info.value)
    assert f"config file {str(path)!r}" in message
    assert problem in message


def test_missing_and_undecodable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_cluster_config(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_cluster_config(tmp_path)
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b'{"node_id": "\xe9"}')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_cluster_config(bad)


def test_records_validate_direct_construction() -> None:
    with pytest.raises(ConfigError, match="storage_type=2"):
        StorageConfig(storage_type=2, storage_file_path="x")
    with pytest.raises(ConfigError, match="cert_expire_warning_time_in_day=6"):
        ClusterConfig(cert_expire_warning_time_in_day=6)
    with pytest.raises(ConfigError, match="recovery="):
        ClusterConfig(recovery="r.json")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Node id
# ---------------------------------------------------------------------------------------------------------


def test_resolve_node_id_order() -> None:
    from_file = ClusterConfig(node_id="file-id")
    assert resolve_node_id(FLContext(node_id="env-id"), from_file) == "env-id"
    assert resolve_node_id(FLContext(), from_file) == "file-id"
    env_ctx = apply_environment(FLContext(), {"MS_NODE_ID": "3"})
    assert resolve_node_id(env_ctx, from_file) == "3"
    first = resolve_node_id(FLContext(), ClusterConfig())
    second = resolve_node_id(FLContext(), ClusterConfig())
    assert uuid.UUID(first).version == 4
    assert first != second
