"""Conversions between the leader's replies and views and their peer-link messages.

The counting part of a device request travels from a follower to the leader as a
:class:`~flcluster.wire.messages.LeaderCall` and its answer comes back as a
:class:`~flcluster.wire.messages.LeaderAnswer`; the leader's iteration status goes out as
:class:`~flcluster.wire.messages.IterationStatus` (spec/device-protocol.md, "How the Servers share an
iteration"). These functions are the only place that maps one form to the other, so both ends of the
peer link agree by construction. Every field with a closed set of values is an enum on the wire; the
frame codec refuses a value it does not know before anything here sees it.
"""

from __future__ import annotations

import base64
import binascii
from typing import assert_never

from flcluster.core.iteration import Accepted, PlainText, Rejected
from flcluster.errors import MessageError
from flcluster.runtime.rounds import CountRequest, IterationView, LeaderReply
from flcluster.wire.codes import SAFEMODE_TEXT, ResponseCode
from flcluster.wire.messages import AnswerKind, IterationStatus, LeaderAnswer, LeaderCall


def view_of(status: IterationStatus) -> IterationView:
    """The :class:`IterationView` a status message describes."""
    return IterationView(
        iteration=status.iteration,
        phase=status.phase,
        instance_state=status.instance_state,
        next_req_time_ms=status.next_req_time_ms,
    )


def call_of(call_id: int, request: CountRequest) -> LeaderCall:
    """The wire form of one counting request, numbered ``call_id`` on its link."""
    r = request
    return LeaderCall(
        call_id,
        r.op,
        r.fl_id,
        r.data_size,
        r.iteration,
        r.upload_loss,
        r.upload_accuracy,
        r.timestamp,
        base64.b64encode(r.signature).decode("ascii"),
        base64.b64encode(r.device_key).decode("ascii"),
    )


def _bytes(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise MessageError(f"leader_call.{field}: {text!r:.40} is not base64") from None


def request_of(call: LeaderCall) -> CountRequest:
    """The counting request a wire call carries.

    Raises:
        MessageError: ``signature`` or ``device_key`` is not base64.
    """
    return CountRequest(
        call.op,
        call.fl_id,
        call.data_size,
        call.iteration,
        call.upload_loss,
        call.upload_accuracy,
        call.timestamp,
        _bytes(call.signature, "signature"),
        _bytes(call.device_key, "device_key"),
    )


def answer_of(call_id: int, reply: LeaderReply) -> LeaderAnswer:
    """The wire form of a leader reply."""
    match reply:
        case Accepted(iteration=it, data_size=size, next_req_time_ms=next_ms, reason=reason):
            return LeaderAnswer(
                call_id, AnswerKind.ACCEPTED, int(ResponseCode.SUCCEED), reason, it, size, next_ms, ""
            )
        case Rejected(retcode=retcode, reason=reason, next_req_time_ms=next_ms):
            return LeaderAnswer(call_id, AnswerKind.REJECTED, int(retcode), reason, 0, 0, next_ms, "")
        case PlainText(text=text):
            return LeaderAnswer(call_id, AnswerKind.PLAIN, 0, "", 0, 0, 0, text)
        case _:
            assert_never(reply)


def reply_of(answer: LeaderAnswer) -> LeaderReply:
    """The leader reply a wire answer carries (a rejection with an unknown retcode reads as safemode)."""
    match answer.kind:
        case AnswerKind.ACCEPTED:
            return Accepted(answer.iteration, answer.data_size, answer.next_req_time_ms, answer.reason)
        case AnswerKind.REJECTED:
            if answer.retcode not in ResponseCode._value2member_map_:
                return PlainText(SAFEMODE_TEXT)
            return Rejected(ResponseCode(answer.retcode), answer.reason, answer.next_req_time_ms)
        case AnswerKind.PLAIN:
            return PlainText(answer.text)
        case _:
            assert_never(answer.kind)


__all__ = ["answer_of", "call_of", "reply_of", "request_of", "view_of"]
