"""The device HTTP app every Server opens on ``fl_server_port + i`` (spec/device-protocol.md).

Until a Server has its iteration machinery (federated rounds), every round path answers, as the
original does before its training job is initialised, HTTP 200 with the plain text
``The server's training job is not ready.`` — which the original's clients understand as "come back
later" — never a fabricated round answer. Bodies are limited to ``max_device_body`` bytes.
"""

from __future__ import annotations

from quart import Response
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

NOT_READY = "The server's training job is not ready."
SAFEMODE = "The cluster is in safemode."
DISABLED_OR_FINISHED = "The server's training job is disabled or finished."

ROUNDS = (
    "startFLJob",
    "updateModel",
    "getModel",
    "exchangeKeys",
    "getKeys",
    "shareSecrets",
    "getSecrets",
    "getClientList",
    "reconstructSecrets",
    "pushListSign",
    "getListSign",
)


def plain(text: str, status: int = 200) -> Response:
    """A plain-text answer, as the original sends for the not-ready/safemode/finished cases."""
    return Response(text, status=status, content_type="text/plain; charset=utf-8")


def create_device_app(*, url_prefix: str, max_body: int) -> QuartTrio:
    """Build the device app; every round path answers "not ready" until rounds are wired in."""
    app = QuartTrio("flcluster.device")
    app.config["MAX_CONTENT_LENGTH"] = max_body
    methods = ["GET", "POST", "PUT"]

    async def not_ready() -> Response:
        return plain(NOT_READY)

    for name in ROUNDS:
        app.add_url_rule(f"{url_prefix}/{name}", endpoint=name, view_func=not_ready, methods=methods)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        return plain(f"{exc.code} {exc.name}: {exc.description}", exc.code or 400)

    return app
