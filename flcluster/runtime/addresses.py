"""Which address a node advertises to its peers (spec/cluster-protocol.md §5)."""

from __future__ import annotations

import socket


def advertised_address(scheduler_host: str) -> str:
    """The first usable IPv4 address of this host on the way to the Scheduler.

    Loopback when the Scheduler is on loopback; otherwise the source address the kernel picks for the
    route to the Scheduler (a UDP ``connect`` sends nothing), which on a single-NIC host is the NIC's
    address, as the guide expects.
    """
    try:
        infos = socket.getaddrinfo(scheduler_host, None, socket.AF_INET)
    except socket.gaierror:
        return "127.0.0.1"
    target = str(infos[0][4][0])
    if target.startswith("127."):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((target, 9))
        except OSError:
            return "127.0.0.1"
        return str(probe.getsockname()[0])
