"""Run a Quart-Trio app on Hypercorn inside a caller's nursery.

:func:`serve_app` is a *startable*: ``urls = await nursery.start(serve_app, app, host, port)`` returns
once the socket is bound and listening, with the real bound URLs (so port 0 works in tests), and the
server runs until the surrounding scope is cancelled. Access logging is off (a device fleet would
flood it); errors go to the ``flcluster.http`` logger.
"""

from __future__ import annotations

import logging

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart_trio import QuartTrio

log = logging.getLogger("flcluster.http")


async def serve_app(
    app: QuartTrio,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until cancelled; report the bound URLs when listening."""
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = log
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = 75.0
    await serve(app, config, task_status=task_status)


def bound_port(urls: list[str]) -> int:
    """The TCP port of the first URL hypercorn reported (``http://127.0.0.1:6668`` → 6668)."""
    return int(urls[0].rsplit(":", 1)[1])
