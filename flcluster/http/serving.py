"""Run a Quart-Trio app on Hypercorn inside a caller's nursery.

:func:`serve_app` is a *startable*: ``urls = await nursery.start(serve_app, app, host, port)`` returns
once the socket is bound and listening, with the real bound URLs (so port 0 works in tests), and the
server runs until the surrounding scope is cancelled. Access logging is off (a device fleet would
flood it); errors go to the ``flcluster.http`` logger.

With an SSL context (``enable_ssl``, spec/cluster-protocol.md §7) the port is HTTPS and the URLs say
``https://``. Hypercorn builds its own context from certificate *files*; :class:`_TlsConfig` hands it the
node's context instead, built once by :mod:`flcluster.tls` from PKCS#12 or PEM, so no key is written out
for Hypercorn.
"""

from __future__ import annotations

import logging
import ssl

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart_trio import QuartTrio

log = logging.getLogger("flcluster.http")


class _TlsConfig(Config):
    """A Hypercorn configuration that serves TLS with a context built elsewhere."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__()
        self._context = context

    @property
    def ssl_enabled(self) -> bool:
        return True

    def create_ssl_context(self) -> ssl.SSLContext:
        return self._context


async def serve_app(
    app: QuartTrio,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until cancelled; report the bound URLs when listening.

    Args:
        app: The app.
        host: Bind address.
        port: Port (0: one the OS picks).
        ssl_context: Serve HTTPS with this context (:func:`flcluster.tls.contexts.https_server_context`);
            None: plain HTTP.
        task_status: Reports the bound URLs.
    """
    config = Config() if ssl_context is None else _TlsConfig(ssl_context)
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = log
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = 75.0
    await serve(app, config, task_status=task_status)


def bound_port(urls: list[str]) -> int:
    """The TCP port of the first URL hypercorn reported (``http://127.0.0.1:6668`` → 6668)."""
    return int(urls[0].rsplit(":", 1)[1])
