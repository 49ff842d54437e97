"""``flcluster finish``: stop the whole cluster gracefully through the Scheduler (cluster-protocol §6).

The tool sends ``finish_cluster`` to the Scheduler, which shuts every Server down and answers with
every process of the cluster. The tool then waits for each process on this host to end and prints
``killed <pid>`` for it, as the guide shows; a process still there after the grace period gets
SIGTERM, then SIGKILL. When the Scheduler cannot be reached at all, the tool falls back to the
original's way: signal every local process whose command line names this ``--scheduler_port``.

The request carries the management access token (``""`` when the cluster has none), and with
``enable_ssl`` it goes over TLS with the operator's client certificate (spec/cluster-protocol.md §6, §7).
A Scheduler that refuses the token is an answer, not an absence: the tool raises
:class:`~flcluster.errors.AccessRefused` and signals nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import trio

from flcluster.errors import AccessRefused, ClusterError, FrameError
from flcluster.runtime.links import FramedLink, LinkClosed, open_stream
from flcluster.wire.messages import ErrorReply, FinishCluster, FinishReply, NodeProcess

log = logging.getLogger("flcluster.finish")

REPLY_TIMEOUT = 30.0
FALLBACK_GRACE = 3.0
#: The Scheduler's ``error`` reason for a ``finish_cluster`` without the right token (one home).
ACCESS_REFUSED = (
    "finish_cluster is refused: the cluster has a management access token (manage_token) and this request "
    "does not carry it"
)


def pid_running(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process on this host."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # The state letter follows the parenthesised command name, which may itself contain spaces.
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def _ancestors() -> set[int]:
    """This process and its ancestors (a shell that ran ``finish_mobile.py --scheduler_port=P``)."""
    pids = set()
    pid = os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def processes_naming_port(port: int) -> list[int]:
    """Local pids whose command line carries ``--scheduler_port=<port>`` (or as two arguments).

    This process and its ancestors are left out.
    """
    found = []
    mine = _ancestors()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in args]
        pairs = zip(text, [*text[1:], ""], strict=True)
        if f"--scheduler_port={port}" in text or any(
            a == "--scheduler_port" and b == str(port) for a, b in pairs
        ):
            found.append(int(entry.name))
    return sorted(found)


async def request_finish(
    host: str, port: int, *, token: str = "", tls: ssl.SSLContext | None = None
) -> tuple[NodeProcess, ...]:
    """Ask the Scheduler at ``host:port`` to finish the cluster; return every process it reports.

    Args:
        host: The Scheduler's address.
        port: Its cluster port.
        token: The management access token (``""``: none).
        tls: The operator's cluster connector context (``enable_ssl``), or None for plain TCP.

    Raises:
        AccessRefused: the Scheduler refused the token.
        ClusterError: the Scheduler refused or answered something else (a failed TLS handshake included).
        OSError: the Scheduler could not be reached.
    """
    with trio.fail_after(REPLY_TIMEOUT):
        stream = await open_stream(host, port, tls)
    link = FramedLink(stream)
    try:
        await link.send(FinishCluster(token=token))
        with trio.fail_after(REPLY_TIMEOUT):
            msg, _ = await link.receive()
    except (LinkClosed, FrameError, trio.TooSlowError) as exc:
        raise ClusterError(
            f"the Scheduler at {host}:{port} did not answer the finish request: {exc}"
        ) from None
    finally:
        await link.aclose()
    if isinstance(msg, ErrorReply) and msg.reason == ACCESS_REFUSED:
        raise AccessRefused(
            f"the Scheduler at {host}:{port} refused to finish: {msg.reason}; give the token with "
            "FLCLUSTER_MANAGE_TOKEN or --config_file_path"
        )
    if isinstance(msg, ErrorReply):
        raise ClusterError(f"the Scheduler refused to finish: {msg.reason}")
    if not isinstance(msg, FinishReply):
        raise ClusterError(f"the Scheduler answered the finish request with {msg.TYPE!r}")
    return msg.nodes


async def wait_and_kill(
    pids: Iterable[int], *, grace: float, report: Callable[[int], None], poll: float = 0.05
) -> list[int]:
    """Wait up to ``grace`` seconds for each pid to end, then SIGTERM, then SIGKILL those still there.

    Each phase polls at least once; ``report(pid)`` is called as each process ends.

    Returns:
        The pids that ended.
    """
    pending = [p for p in dict.fromkeys(pids) if p > 0]
    ended: list[int] = []
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if not pending:
            break
        if sig is not None:
            for pid in pending:
                log.warning("process %d did not end on its own; sending %s", pid, sig.name)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + max(grace, poll)
        while True:
            for pid in list(pending):
                if not pid_running(pid):
                    pending.remove(pid)
                    ended.append(pid)
                    report(pid)
            if not pending or time.monotonic() >= deadline:
                break
            await trio.sleep(poll)
    for pid in pending:
        log.error("process %d is still running", pid)
    return ended


async def finish_cluster(
    host: str,
    port: int,
    *,
    grace: float = 15.0,
    report: Callable[[int], None] | None = None,
    token: str = "",
    tls: ssl.SSLContext | None = None,
) -> list[int]:
    """Finish the cluster whose Scheduler listens on ``host:port``; return the pids that ended.

    Prints ``killed <pid>`` for each (or calls ``report``). ``token`` and ``tls`` are passed to
    :func:`request_finish`.

    Raises:
        AccessRefused: the Scheduler refused the token (nothing is signalled).
    """
    say = report or (lambda pid: print(f"killed {pid}", flush=True))
    try:
        nodes = await request_finish(host, port, token=token, tls=tls)
    except (OSError, ClusterError, trio.TooSlowError) as exc:
        log.warning("%s; falling back to signals for processes naming --scheduler_port=%d", exc, port)
        return await wait_and_kill(processes_naming_port(port), grace=FALLBACK_GRACE, report=say)
    local = [n.pid for n in nodes if n.role == "SCHEDULER" or is_local_address(n.host)]
    # A Server still starting (not registered yet) is not in the Scheduler's answer; like the
    # original, every local process naming this Scheduler port belongs to the cluster.
    local.extend(p for p in processes_naming_port(port) if p not in local)
    return await wait_and_kill(local, grace=grace, report=say)


def is_local_address(host: str) -> bool:
    """Whether ``host`` is an address of this host (it can be bound here), so its pids are ours."""
    if host in ("", "localhost") or host.startswith("127."):
        return True
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True
