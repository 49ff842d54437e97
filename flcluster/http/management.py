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

The app reads the cluster through a :class:`ClusterView` and changes it only through the view's operator
calls (``/scaleout``, ``/scalein``, ``/scaleoutRollback``, ``/newInstance``, ``/queryInstance``,
``/enableFLS``, ``/disableFLS``; spec/management-api.md). A body is judged first
(:mod:`flcluster.http.manage_bodies`), then the view's machine judges the request against the cluster's
state; either refusal is the error shape with the original's message, and nothing changes.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, Final, Protocol

from quart import Response, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from flcluster.core.cluster import ClusterState, Member, OperatorReply
from flcluster.core.scaling import InstanceResult
from flcluster.http.answers import error_for, json_error
from flcluster.http.manage_bodies import BodyRefused, new_instance_params, scale_in_ids, scale_out_count

log = logging.getLogger("flcluster.management")

ANY_METHOD = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
#: The answers to a request without the token, and with a wrong one.
NO_TOKEN: Final = "The management API needs an access token: send 'Authorization: Bearer <token>'."
WRONG_TOKEN: Final = "The management API refused the request: the access token is wrong."
#: The instance operations' answers (reference §4).
NEW_INSTANCE_OK: Final = "Start new instance successful."
NEW_INSTANCE_FAILED: Final = "Start new instance failed."
QUERY_INSTANCE_OK: Final = "Query Instance successful."
TIMEOUTS: Final = {
    "newInstance": "The new instance is timeout.",
    "queryInstance": "The query instance is timeout.",
    "disableFLS": "The disable FLS is timeout.",
    "enableFLS": "The enable FLS is timeout.",
}


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

    async def scale_out(self, server_num: int) -> OperatorReply:
        """``/scaleout``: add ``server_num`` Servers."""
        ...

    async def scale_in(self, node_ids: tuple[str, ...]) -> OperatorReply:
        """``/scalein``: remove these Servers."""
        ...

    async def scale_out_rollback(self) -> OperatorReply:
        """``/scaleoutRollback``."""
        ...

    async def disable_fls(self) -> tuple[OperatorReply, InstanceResult | None]:
        """``/disableFLS``: the machine's reply and, when accepted, the leader's answer."""
        ...

    async def enable_fls(self) -> tuple[OperatorReply, InstanceResult | None]:
        """``/enableFLS``: the machine's reply and, when accepted, the leader's answer."""
        ...

    async def new_instance(self, params: dict[str, object]) -> tuple[OperatorReply, InstanceResult | None]:
        """``/newInstance``: the machine's reply and, when accepted, the leader's answer."""
        ...

    async def query_instance(self) -> tuple[str | None, InstanceResult | None]:
        """``/queryInstance``: the refusal (or None) and the leader's answer."""
        ...


def _switch_answer(endpoint: str, reply: OperatorReply, result: InstanceResult | None) -> Response:
    """The answer of /enableFLS or /disableFLS: the Scheduler's refusal, the leader's timeout or
    refusal, or success (spec/management-api.md)."""
    if not reply.ok:
        return json_error(reply.message)
    if result is None or not result.answered:
        return json_error(TIMEOUTS[endpoint])
    if not result.ok:
        return json_error(result.message)
    return _ok(reply.message, result=True)


def _ok(message: str, **extra: object) -> Response:
    return jsonify({"code": "0", "message": message, **extra})


def _operator(reply: OperatorReply) -> Response:
    return _ok(reply.message) if reply.ok else json_error(reply.message)


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
        await request.get_data(cache=True)
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

    async def body() -> bytes:
        data = await request.get_data(cache=True, as_text=False)
        assert isinstance(data, bytes)
        return data

    @app.route("/scaleout", methods=ANY_METHOD, provide_automatic_options=False)
    async def scaleout() -> Response:
        try:
            count = scale_out_count(await body())
        except BodyRefused as exc:
            return json_error(exc.message)
        return _operator(await view.scale_out(count))

    @app.route("/scalein", methods=ANY_METHOD, provide_automatic_options=False)
    async def scalein() -> Response:
        try:
            ids = scale_in_ids(await body())
        except BodyRefused as exc:
            return json_error(exc.message)
        return _operator(await view.scale_in(ids))

    @app.route("/scaleoutRollback", methods=ANY_METHOD, provide_automatic_options=False)
    async def scaleout_rollback() -> Response:
        return _operator(await view.scale_out_rollback())

    @app.route("/disableFLS", methods=ANY_METHOD, provide_automatic_options=False)
    async def disable_fls() -> Response:
        return _switch_answer("disableFLS", *await view.disable_fls())

    @app.route("/enableFLS", methods=ANY_METHOD, provide_automatic_options=False)
    async def enable_fls() -> Response:
        return _switch_answer("enableFLS", *await view.enable_fls())

    @app.route("/newInstance", methods=ANY_METHOD, provide_automatic_options=False)
    async def new_instance() -> Response:
        try:
            params = new_instance_params(await body())
        except BodyRefused as exc:
            return json_error(exc.message)
        reply, result = await view.new_instance(params)
        if not reply.ok:
            return json_error(reply.message)
        if result is None or not result.answered:
            return json_error(TIMEOUTS["newInstance"])
        if result.ok:
            return _ok(NEW_INSTANCE_OK, result=True)
        # The original answers a failed new instance with HTTP 200 (reference §4); the reason is ours.
        return jsonify(
            {"code": "1", "error_message": NEW_INSTANCE_FAILED, "result": False, "reason": result.message}
        )

    @app.route("/queryInstance", methods=ANY_METHOD, provide_automatic_options=False)
    async def query_instance() -> Response:
        refusal, result = await view.query_instance()
        if refusal is not None:
            return json_error(refusal)
        if result is None or not result.answered:
            return json_error(TIMEOUTS["queryInstance"])
        if not result.ok:
            return json_error(result.message)
        return _ok(QUERY_INSTANCE_OK, result=result.result)

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
