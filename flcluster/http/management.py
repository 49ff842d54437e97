"""The Scheduler's management REST API (spec/management-api.md).

The shapes are the original's (reference §4): every answer is JSON; success is HTTP 200 with
``"code": "0"``; an error is HTTP 400 with ``{"error_message": ..., "code": "1"}`` (the one JSON error
shape, flcluster/http/answers.py; an flcluster error that escapes a view gets its status hint). As in the
original, the HTTP method is not checked, and bodies sent to endpoints that take none are ignored.
Unlike the original, the bind address is configurable (``scheduler_manage_host``, loopback by
default) and an unknown path gets a JSON 404 in the same error shape.

The app only *reads* the cluster through a :class:`ClusterView`; it never changes membership itself.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from quart import Response, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from flcluster.core.cluster import ClusterState, Member
from flcluster.http.answers import error_for, json_error

log = logging.getLogger("flcluster.management")

ANY_METHOD = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


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


def create_management_app(view: ClusterView, *, max_body: int) -> QuartTrio:
    """Build the management app over ``view``; bodies over ``max_body`` bytes are refused."""
    app = QuartTrio("flcluster.management")
    app.config["MAX_CONTENT_LENGTH"] = max_body

    @app.before_request
    async def read_body() -> None:
        # Read (and so bound) every body, even where it is ignored: the limit then applies to every
        # endpoint, and the keep-alive connection stays in sync for the next request.
        await request.get_data(cache=False)

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
