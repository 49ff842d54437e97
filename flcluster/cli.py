"""The ``flcluster`` command.

::

    flcluster scheduler [--<any FL context key>=<value> ...]
    flcluster server    [--<any FL context key>=<value> ...] [--local_server_num N] [--background]
    flcluster finish    [--scheduler_ip 127.0.0.1] --scheduler_port P [ACCESS]
    flcluster nodes     [--scheduler_manage_host 127.0.0.1] [--scheduler_manage_port 11202] [ACCESS]
    flcluster state     [--scheduler_manage_host 127.0.0.1] [--scheduler_manage_port 11202] [ACCESS]
    flcluster scale     --servers N [MANAGE] [ACCESS]
    flcluster instance  new KEY=VALUE ... | query | enable | disable [MANAGE] [ACCESS]

    MANAGE: [--scheduler_manage_host 127.0.0.1] [--scheduler_manage_port 11202]

    ACCESS: [--config_file_path config.json] [--enable_ssl True] [--client_password ...] (finish only)

``scheduler`` and ``server`` take every :class:`~flcluster.config.FLContext` key as a flag, exactly as
the guide's scripts do. ``server`` with ``--local_server_num N`` (N > 1, or ``--background``) starts N
Server processes, one per device port ``fl_server_port + i``, in ``./server_<i>/``; in the foreground
it then waits for them and stops them on Ctrl-C, with ``--background`` it returns at once as the
guide's ``run_mobile_server.py`` does.

The operator commands send the management token (``FLCLUSTER_MANAGE_TOKEN``, else ``config.json``'s
``manage_token``) and, with ``--enable_ssl True``, use TLS as the cluster does (:mod:`flcluster.operator`).
``scale`` and ``instance`` are :mod:`flcluster.manage_tool` (``/scaleout`` or ``/scalein`` computed against
``/nodes``; the instance endpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence

import httpx

from flcluster.config import (
    FLContext,
    add_context_arguments,
    build_fl_context,
    context_kwargs_from_args,
    load_cluster_config,
    refuse_unimplemented,
)
from flcluster.errors import FLClusterError
from flcluster.launch import start_servers
from flcluster.manage_tool import (
    INSTANCE_PATHS,
    check_server_total,
    instance_body,
    scale_next_step,
    scale_request,
)
from flcluster.manage_tool import call as manage_call
from flcluster.manage_tool import run as manage_run
from flcluster.operator import OperatorAccess, access_from_args, add_access_arguments, finish_from_args
from flcluster.roles import configure_logging, run_role
from flcluster.tls import TlsRole, load_node_tls


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flcluster", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sched = sub.add_parser("scheduler", help="run the Scheduler in the foreground")
    add_context_arguments(sched)

    server = sub.add_parser("server", help="run one Server, or start several with --local_server_num")
    add_context_arguments(server)
    server.add_argument("--local_server_num", type=int, default=-1, help="Servers to start on this host")
    server.add_argument("--background", action="store_true", help="start the Servers and return at once")

    finish = sub.add_parser("finish", help="stop the whole cluster gracefully through the Scheduler")
    finish.add_argument("--scheduler_ip", default="127.0.0.1")
    finish.add_argument("--scheduler_port", type=int, default=6667)
    finish.add_argument("--grace", type=float, default=15.0, help="seconds to wait before signalling")
    add_access_arguments(finish, finish=True)

    for name, what in (
        ("nodes", "list the nodes (GET /nodes)"),
        ("state", "show the cluster state (GET /state)"),
    ):
        query = sub.add_parser(name, help=what)
        query.add_argument("--scheduler_manage_host", default="127.0.0.1")
        query.add_argument("--scheduler_manage_port", type=int, default=11202)
        add_access_arguments(query, finish=False)

    scale = sub.add_parser("scale", help="scale out or in to N Servers (POST /scaleout or /scalein)")
    scale.add_argument("--servers", type=int, required=True, help="the total number of Servers wanted")
    instance = sub.add_parser("instance", help="new, query, enable or disable the training instance")
    instance.add_argument("action", choices=sorted(INSTANCE_PATHS))
    instance.add_argument("params", nargs="*", help="new: KEY=VALUE pairs, e.g. fl_iteration_num=20")
    for tool in (scale, instance):
        tool.add_argument("--scheduler_manage_host", default="127.0.0.1")
        tool.add_argument("--scheduler_manage_port", type=int, default=11202)
        add_access_arguments(tool, finish=False)
    return parser


def _scale(args: argparse.Namespace, access: OperatorAccess) -> int:
    check_server_total(args.servers)
    base = f"{access.scheme}://{args.scheduler_manage_host}:{args.scheduler_manage_port}"
    status, nodes = manage_call(base, "/nodes", access)
    if status != 200 or not isinstance(nodes, dict):
        print(f"flcluster: /nodes answered HTTP {status}: {nodes}", file=sys.stderr)
        return 1
    request = scale_request(nodes, args.servers)
    if request is None:
        print(f"flcluster: the cluster already has {args.servers} Servers; nothing to do")
        return 0
    path, body = request
    print(f"flcluster: POST {path} {json.dumps(body)}")
    code = manage_run(base, path, access, body)
    if code == 0:
        print(scale_next_step(path, body, args.servers))
    return code


def _instance(args: argparse.Namespace, access: OperatorAccess) -> int:
    base = f"{access.scheme}://{args.scheduler_manage_host}:{args.scheduler_manage_port}"
    if args.params and args.action != "new":
        print(f"flcluster: instance {args.action} takes no KEY=VALUE pairs", file=sys.stderr)
        return 2
    body = instance_body(args.params) if args.action == "new" else None
    return manage_run(base, INSTANCE_PATHS[args.action], access, body)


def _context(args: argparse.Namespace, role: str) -> tuple[FLContext, dict[str, object]]:
    kwargs = context_kwargs_from_args(args)
    kwargs["ms_role"] = role
    ctx = build_fl_context(kwargs, os.environ)
    # Refused here too, before any Server process is launched in the background.
    refuse_unimplemented(ctx)
    load_node_tls(
        ctx,
        load_cluster_config(ctx.config_file_path or None),
        TlsRole.SCHEDULER if role == "MS_SCHED" else TlsRole.SERVER,
    )
    return ctx, kwargs


def _run_servers(args: argparse.Namespace) -> int:
    ctx, kwargs = _context(args, "MS_SERVER")
    count = ctx.server_num if args.local_server_num == -1 else args.local_server_num
    if not 1 <= count <= ctx.server_num:
        print(
            f"flcluster: --local_server_num={count} must be between 1 and server_num={ctx.server_num}",
            file=sys.stderr,
        )
        return 2
    if count == 1 and not args.background:
        return run_role(ctx)
    # Each child runs exactly one Server in the foreground (never launches again).
    command = [sys.executable, "-u", "-m", "flcluster", "server", "--local_server_num=1"]
    started = start_servers(command, kwargs, local_server_num=count)
    for _proc, launched in started:
        print(f"started Server pid {launched.pid}, log {launched.log}", flush=True)
    if args.background:
        return 0
    try:
        codes = [proc.wait() for proc, _ in started]
    except KeyboardInterrupt:
        for proc, _ in started:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait() for proc, _ in started]
    return max(codes, default=0)


def _query(host: str, port: int, path: str, access: OperatorAccess) -> int:
    try:
        response = httpx.get(
            f"{access.scheme}://{host}:{port}{path}",
            headers=access.headers(),
            verify=access.https if access.https is not None else True,
            timeout=10.0,
        )
    except httpx.HTTPError as exc:
        print(
            f"flcluster: the Scheduler's management port {host}:{port} did not answer: {exc}", file=sys.stderr
        )
        return 1
    print(json.dumps(response.json(), indent=4))
    return 0 if response.status_code == 200 else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flcluster`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    configure_logging()
    try:
        match args.command:
            case "scheduler":
                ctx, _ = _context(args, "MS_SCHED")
                return run_role(ctx)
            case "server":
                return _run_servers(args)
            case "finish":
                return 0 if finish_from_args(args) else 1
            case "scale":
                return _scale(args, access_from_args(args, finish=False))
            case "instance":
                return _instance(args, access_from_args(args, finish=False))
            case "nodes" | "state":
                access = access_from_args(args, finish=False)
                return _query(
                    args.scheduler_manage_host, args.scheduler_manage_port, f"/{args.command}", access
                )
    except FLClusterError as exc:
        print(f"flcluster: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
