"""The Scheduler's management REST API (spec/management-api.md).

The shapes are the original's (reference §4): every answer is JSON; success is HTTP 200 with
``"code": "0"``; an error is HTTP 400 with ``{"error_message": ..., "code": "1"}`` (the one JSON error
shape, flcluster/http/answers.py; an flcluster error that escapes a view gets its status hint). As in the
original, the HTTP method is not checked, and bodies sent to endpoints that take none are ignored.
Unlike the original, the bind address is configurable (``scheduler_manage_host``, loopback by
default) and an unknown path gets a JSON 404 in the same error shape.

**Access token** (spec/management-api.md, "Access token"). With a token, every request must carry
``Authorization: Bearer <token>``; the check runs first, before the body is read, compares in constant
time (:func:`hmac.compare_digest`) and answers 401 in the error shape with ``WWW-Authenticate``.

The app only *reads* the cluster through a :class:`ClusterView`; it never changes membership itself.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, Final, Protocol

from quart import Response, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from flcluster.core.cluster import ClusterState, Member
from flcluster.http.answers import error_for, json_error

log = logging.getLogger("flcluster.management")

ANY_METHOD = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
#: The answers to a request without the token, and with a wrong one.
NO_TOKEN: Final = "The management API needs an access token: send 'Authorization: Bearer <token>'."
WRONG_TOKEN: Final = "The management API refused the request: the access token is wrong."


def _unauthorized(message: str) -> Response:
    response = json_error(message, 401)
    response.headers["WWW-Authenticate"] = 'Bearer realm="flcluster"'
    return response


def _token_problem(header: str | None, token: str) -> str | None:
    """Why ``header`` (an ``Authorization`` value) does not carry ``token``; None when it does."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return NO_TOKEN
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        return WRONG_TOKEN
    return None


class ClusterView(Protocol):
    """What the management API needs to know about the cluster."""

    @property
    def state(self) -> ClusterState:
        """The current cluster state."""
        ...

    @property
    def scheduler_node_id(self) -> str:
        """The Scheduler's own node id."""
        ...

    def members(self) -> tuple[Member, ...]:
        """Every registered Server, by rank."""
        ...


def create_management_app(view: ClusterView, *, max_body: int, token: str = "") -> QuartTrio:
    """Build the management app over ``view``.

    Args:
        view: What the app reads of the cluster.
        max_body: Bodies over this many bytes are refused.
        token: The access token every request must carry (``""``: none; spec/management-api.md).
    """
    app = QuartTrio("flcluster.management")
    app.config["MAX_CONTENT_LENGTH"] = max_body

    @app.before_request
    async def read_body() -> Response | None:
        if token:
            problem = _token_problem(request.headers.get("Authorization"), token)
            if problem is not None:
                log.warning("refused a management request to %s: %s", request.path, problem)
                return _unauthorized(problem)
        # Read (and so bound) every body, even where it is ignored: the limit then applies to every
        # endpoint, and the keep-alive connection stays in sync for the next request.
        await request.get_data(cache=False)
        return None

    @app.route("/nodes", methods=ANY_METHOD, provide_automatic_options=False)
    async def nodes() -> Response:
        rows: list[dict[str, Any]] = [
            {
                "alive": "true" if m.alive else "false",
                "nodeId": m.node_id,
                "rankId": str(m.rank),
                "role": "SERVER",
            }
            for m in view.members()
        ]
        rows.append({"alive": "true", "nodeId": view.scheduler_node_id, "rankId": "0", "role": "SCHEDULER"})
        return jsonify({"code": "0", "message": "Get nodes info successful.", "nodeIds": rows})

    @app.route("/state", methods=ANY_METHOD, provide_automatic_options=False)
    async def state() -> Response:
        return jsonify(
            {"code": "0", "message": "Get cluster state successful.", "cluster_state": view.state.name}
        )

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        if exc.code == 413:
            return json_error(f"The post message is bigger than {max_body} bytes.")
        if exc.code == 404:
            return json_error(f"The management API has no endpoint at this path: {exc.description}", 404)
        return json_error(str(exc.description), exc.code or 400)

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        return error_for(exc, log)

    return app
