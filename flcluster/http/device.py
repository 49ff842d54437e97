"""The device HTTP app every Server opens on ``fl_server_port + i`` (spec/device-protocol.md).

Theory of operation
-------------------
The app knows nothing of how rounds are served: it is built over a :class:`DeviceRounds`, anything with a
*route table* (:meth:`DeviceRounds.routes`) mapping a round name to an async handler that takes the raw
request body and returns the answer. Each entry becomes ``<http_url_prefix>/<name>``; the Server's
:class:`~flcluster.runtime.rounds.RoundService` supplies ``startFLJob``, ``updateModel`` and ``getModel``
(:class:`~flcluster.wire.codes.DeviceRound`), and the secure-aggregation rounds (``exchangeKeys``,
``getKeys``, ...) join by adding entries to the table. With no rounds at all (``None``) the standard rounds
answer "not ready".

As in the original, every protocol answer is HTTP 200: a FlatBuffer (``bytes``, sent as
``application/octet-stream``) or one of the original's plain texts (``str``,
:class:`~flcluster.wire.codes.ServerText`), which clients tell apart by matching the exact strings. The
method is not checked. An empty body is the original's HTTP 500 ``{"error_message": "Get post message
failed", "code": "1"}``; a body over ``max_device_body`` bytes is refused with 413 before it is read; an
exception that escapes a handler is answered in the same JSON shape (flcluster/http/answers.py), never with
a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, TypeAlias

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from flcluster.http.answers import error_for, json_error, plain_text
from flcluster.wire.codes import EMPTY_BODY_MESSAGE, NOT_READY_TEXT, DeviceRound

__all__ = ["METHODS", "DeviceAnswer", "DeviceHandler", "DeviceRounds", "create_device_app"]

log = logging.getLogger("flcluster.device")

DeviceAnswer: TypeAlias = bytes | str
"""A FlatBuffer response (bytes) or one of the original's plain-text answers (str)."""
DeviceHandler: TypeAlias = Callable[[bytes], Awaitable[DeviceAnswer]]
"""One device round: the raw, non-empty request body in, the answer out."""

#: The methods a device round accepts (the original does not check the method).
METHODS = ["GET", "POST", "PUT"]


class DeviceRounds(Protocol):
    """What the device app serves: a table of rounds."""

    def routes(self) -> Mapping[str, DeviceHandler]:
        """The route table: round name (the last part of the URL, ``startFLJob``) → its handler."""
        ...


def _answer(answer: DeviceAnswer) -> Response:
    if isinstance(answer, str):
        return plain_text(answer)
    return Response(answer, status=200, content_type="application/octet-stream")


def _view(handler: DeviceHandler | None) -> Callable[[], Awaitable[Response]]:
    async def view() -> Response:
        body = await request.get_data(cache=False, as_text=False)
        if handler is None:
            return plain_text(NOT_READY_TEXT)
        if not body:
            return json_error(EMPTY_BODY_MESSAGE, 500)
        assert isinstance(body, bytes)
        return _answer(await handler(body))

    return view


def create_device_app(rounds: DeviceRounds | None, *, url_prefix: str, max_body: int) -> QuartTrio:
    """Build the device app over ``rounds``' route table.

    Args:
        rounds: The rounds to serve; ``None``: every standard round answers "not ready".
        url_prefix: ``http_url_prefix`` ('' or a path starting with '/').
        max_body: Bodies over this many bytes are refused with 413 before they are read.

    Returns:
        The app, for :func:`flcluster.http.serving.serve_app`.
    """
    app = QuartTrio("flcluster.device")
    app.config["MAX_CONTENT_LENGTH"] = max_body
    table: Mapping[str, DeviceHandler | None] = (
        {name: None for name in DeviceRound} if rounds is None else rounds.routes()
    )
    for name, handler in table.items():
        app.add_url_rule(f"{url_prefix}/{name}", endpoint=name, view_func=_view(handler), methods=METHODS)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        return json_error(f"{exc.code} {exc.name}: {exc.description}", exc.code or 400)

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        return error_for(exc, log)

    return app
