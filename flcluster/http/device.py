"""The device HTTP app every Server opens on ``fl_server_port + i`` (spec/device-protocol.md).

Routes ``<http_url_prefix>/startFLJob``, ``/updateModel`` and ``/getModel`` to the Server's
:class:`~flcluster.runtime.rounds.RoundService`. As in the original, every protocol answer is HTTP 200:
a FlatBuffer (``application/octet-stream``) or one of the original's plain texts (safemode, not ready,
disabled or finished), which clients tell apart by matching the exact strings. The method is not
checked. An empty body is the original's HTTP 500 ``{"error_message": "Get post message failed",
"code": "1"}``; a body over ``max_device_body`` bytes is refused with 413 before it is read; an
unexpected failure is a 500 in the same JSON shape, never a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from quart import Response, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from flcluster.core.iteration import JOB_NOT_AVAILABLE_TEXT, SAFEMODE_TEXT
from flcluster.runtime.rounds import DeviceAnswer, RoundService

log = logging.getLogger("flcluster.device")

NOT_READY = "The server's training job is not ready."
SAFEMODE = SAFEMODE_TEXT
DISABLED_OR_FINISHED = JOB_NOT_AVAILABLE_TEXT

METHODS = ["GET", "POST", "PUT"]


def plain(text: str, status: int = 200) -> Response:
    """A plain-text answer, as the original sends for the not-ready/safemode/finished cases."""
    return Response(text, status=status, content_type="text/plain; charset=utf-8")


def _json_error(message: str, status: int) -> Response:
    response = jsonify({"error_message": message, "code": "1"})
    response.status_code = status
    response.headers["Connection"] = "close"  # the body may not have been read in full
    return response


def _answer(answer: DeviceAnswer) -> Response:
    if isinstance(answer, str):
        return plain(answer)
    return Response(answer, status=200, content_type="application/octet-stream")


def create_device_app(rounds: RoundService | None, *, url_prefix: str, max_body: int) -> QuartTrio:
    """Build the device app over ``rounds`` (None: every round answers "not ready")."""
    app = QuartTrio("flcluster.device")
    app.config["MAX_CONTENT_LENGTH"] = max_body

    def route(
        handler: Callable[[bytes], Awaitable[DeviceAnswer]] | None,
    ) -> Callable[[], Awaitable[Response]]:
        async def view() -> Response:
            body = await request.get_data(cache=False, as_text=False)
            if handler is None:
                return plain(NOT_READY)
            if not body:
                return _json_error("Get post message failed", 500)
            assert isinstance(body, bytes)
            return _answer(await handler(body))

        return view

    handlers = {
        "startFLJob": rounds.start_fl_job if rounds else None,
        "updateModel": rounds.update_model if rounds else None,
        "getModel": rounds.get_model if rounds else None,
    }
    for name, handler in handlers.items():
        app.add_url_rule(f"{url_prefix}/{name}", endpoint=name, view_func=route(handler), methods=METHODS)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        return _json_error(f"{exc.code} {exc.name}: {exc.description}", exc.code or 400)

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.exception("device request failed")
        return _json_error(f"Internal error: {type(exc).__name__}", 500)

    return app
