"""Start Server (and Scheduler) processes the way the guide's scripts do.

``run_mobile_server.py --local_server_num=N`` and ``flcluster server --local_server_num=N`` start N
Server processes on this host, one per device port ``fl_server_port + i``, each in its own working
directory ``./server_<i>/`` with its log in ``server.log``, and (like the original) return at once.
``run_mobile_sched.py`` starts the Scheduler the same way in ``./scheduler/``.

Node ids (spec/cluster-protocol.md §3, "Node ids of launched Servers"):

- ``--node_id=X``: ``X`` for one process, else ``X0, X1, …`` (the guide's scale-out form);
- else ``MS_NODE_ID`` from the environment, for one process (the guide's restart form);
- else ``"0" … "N-1"`` when this host starts all ``server_num`` Servers (the original's ids);
- else the Servers are split over hosts (the guide's two-node form), where plain indexes would
  collide across hosts: ``<advertised address>-<device port>``, unique per host and stable across
  restarts of the same command.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs

from flcluster.config import build_fl_context, load_cluster_config, refuse_unimplemented
from flcluster.runtime.addresses import advertised_address


def server_node_ids(
    *,
    local_server_num: int,
    server_num: int,
    fl_server_port: int,
    scheduler_ip: str,
    node_id: str = "",
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """The node ids of the ``local_server_num`` Servers this host starts (see the module docstring)."""
    env = os.environ if environ is None else environ
    if node_id:
        return [node_id] if local_server_num == 1 else [f"{node_id}{i}" for i in range(local_server_num)]
    if local_server_num == 1 and env.get("MS_NODE_ID"):
        return [env["MS_NODE_ID"]]
    if local_server_num == server_num:
        return [str(i) for i in range(local_server_num)]
    host = advertised_address(scheduler_ip)
    return [f"{host}-{fl_server_port + i}" for i in range(local_server_num)]


@attrs.frozen
class Launched:
    """A process started in the background: its pid, working directory and log file."""

    pid: int
    workdir: Path
    log: Path


def flags(kwargs: Mapping[str, object]) -> list[str]:
    """``{"server_num": 4}`` → ``["--server_num=4"]`` (bools as ``True``/``False``, as the original)."""
    return [f"--{key}={value}" for key, value in kwargs.items()]


def start_process(
    argv: Sequence[str], *, workdir: Path, log_name: str, env: Mapping[str, str]
) -> tuple[subprocess.Popen[bytes], Launched]:
    """Start ``argv`` in a fresh ``workdir`` (recreated), logging to ``workdir/log_name``.

    The child gets its own session, so it outlives the launcher and a Ctrl-C in its terminal.
    """
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    log_path = workdir / log_name
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            list(argv),
            cwd=workdir,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, Launched(pid=proc.pid, workdir=workdir, log=log_path)


def start_servers(
    command: Sequence[str],
    kwargs: Mapping[str, object],
    *,
    local_server_num: int,
    base: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[tuple[subprocess.Popen[bytes], Launched]]:
    """Start ``local_server_num`` Servers: ``command`` + the flags of ``kwargs``, one device port each.

    Args:
        command: the program to run for each Server, e.g. ``[python, test_mobile_lenet.py]``.
        kwargs: FLContext keywords to pass on as flags (``ms_role`` and ``fl_server_port`` are set here).
        local_server_num: how many Servers to start on this host.
        base: where the ``server_<i>`` directories go (default: the current directory).
        environ: the environment to start them with (default: this process's).
    """
    env = dict(os.environ if environ is None else environ)
    server_num = int(str(kwargs.get("server_num", 1)))
    port = int(str(kwargs.get("fl_server_port", 6668)))
    ids = server_node_ids(
        local_server_num=local_server_num,
        server_num=server_num,
        fl_server_port=port,
        scheduler_ip=str(kwargs.get("scheduler_ip", "127.0.0.1")),
        node_id=str(kwargs.get("node_id", "")),
        environ=env,
    )
    root = Path.cwd() if base is None else base
    started = []
    passed = {k: v for k, v in kwargs.items() if k not in ("ms_role", "fl_server_port", "node_id")}
    for i, node_id in enumerate(ids):
        argv = [*command, "--ms_role=MS_SERVER", *flags(passed), f"--fl_server_port={port + i}"]
        started.append(
            start_process(
                argv, workdir=root / f"server_{i}", log_name="server.log", env={**env, "MS_NODE_ID": node_id}
            )
        )
    return started


def refuse_before_launch(
    kwargs: Mapping[str, object], role: str, environ: Mapping[str, str] | None = None
) -> None:
    """Check the context the launched nodes would run with, before any process starts.

    The launched processes would refuse a bad context (an unimplemented feature such as
    ``pki_verify=True``, or TLS files that cannot be used) themselves, but only their logs would say so
    while the launcher printed ``started``; this refuses it here, on the operator's terminal.

    Raises:
        ConfigError: a value is refused, a feature flcluster does not implement yet is turned on, or with
            ``enable_ssl`` a TLS file is refused (spec/cluster-protocol.md §7.3).
    """
    from flcluster.tls import TlsRole, load_node_tls

    ctx = build_fl_context({**kwargs, "ms_role": role}, os.environ if environ is None else environ)
    refuse_unimplemented(ctx)
    cluster_config = load_cluster_config(ctx.config_file_path or None)
    load_node_tls(ctx, cluster_config, TlsRole.SCHEDULER if role == "MS_SCHED" else TlsRole.SERVER)


def python_command(script: Path) -> list[str]:
    """``[this python, -u, script]``: children use the launcher's interpreter and unbuffered logs."""
    return [sys.executable, "-u", str(script)]
