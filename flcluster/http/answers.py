"""The answers both HTTP apps send besides their protocol bodies: plain texts and the one JSON error shape.

Theory of operation
-------------------
The original answers an HTTP-level failure (an empty device body, a management request it refuses) with
``{"error_message": <why>, "code": "1"}`` (reference §2.1, §4). :func:`json_error` is the only place that
shape is built; the device app (flcluster/http/device.py) and the management app
(flcluster/http/management.py) both use it. After an error the connection is closed: the request body may
not have been read in full, and a keep-alive connection would then be out of step.

:func:`error_for` is the last boundary of an app (STYLE rule 10): an :class:`~flcluster.errors.FLClusterError`
that reaches it is answered with its own message and its :attr:`~flcluster.errors.FLClusterError.status_hint`
(4xx when the request was at fault, 5xx when this side was); anything else is a bug, logged with its
traceback and answered ``500 Internal error: <type>``, never with the traceback.

The plain texts themselves (safemode, not ready, disabled or finished) live in :mod:`flcluster.wire.codes`;
:func:`plain_text` only sends one.
"""

from __future__ import annotations

import logging

from quart import Response, jsonify

from flcluster.errors import FLClusterError

__all__ = ["error_for", "json_error", "plain_text"]


def plain_text(text: str, status: int = 200) -> Response:
    """A plain-text answer (UTF-8), as the original sends for the not-ready/safemode/finished cases.

    Args:
        text: The exact body; clients compare it whole (:class:`~flcluster.wire.codes.ServerText`).
        status: The HTTP status (the device protocol always uses 200).

    Returns:
        The response.
    """
    return Response(text, status=status, content_type="text/plain; charset=utf-8")


def json_error(message: str, status: int = 400) -> Response:
    """The original's error shape, ``{"error_message": message, "code": "1"}``, and ``Connection: close``.

    Args:
        message: Why the request failed (the rule, the bad value and what was expected).
        status: The HTTP status.

    Returns:
        The response.
    """
    response = jsonify({"error_message": message, "code": "1"})
    response.status_code = status
    response.headers["Connection"] = "close"  # the body may not have been read in full
    return response


def error_for(exc: Exception, log: logging.Logger) -> Response:
    """The answer to an exception that escaped an app's views.

    Args:
        exc: The exception.
        log: Where a non-flcluster exception (a bug) is logged with its traceback.

    Returns:
        ``exc``'s message with its status hint for an :class:`~flcluster.errors.FLClusterError`, else
        ``500 Internal error: <type>``.
    """
    if isinstance(exc, FLClusterError):
        log.warning("request refused (%s, %s at fault): %s", exc.status_hint, exc.fault.value, exc)
        return json_error(str(exc), exc.status_hint)
    log.error("request failed", exc_info=exc)
    return json_error(f"Internal error: {type(exc).__name__}", 500)
