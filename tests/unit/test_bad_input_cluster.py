"""Bad input thrown at a live, CLUSTER_READY cluster (Scheduler + 2 Servers in-process, real loopback).

Every bad connection to the Scheduler's cluster port must get a clear answer (``error`` or a refused
``register_reply``) and be closed; every bad management request must get the original's JSON error shape
``{"error_message": ..., "code": "1"}`` where an error is due. After each one the cluster must still be
CLUSTER_READY with both Servers alive: one misbehaving peer never hurts the others.
"""

from __future__ import annotations

import json
import logging
import random
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import h11
import httpx
import pytest
import trio

from flcluster.config import FLContext
from flcluster.core.cluster import ClusterState, Role
from flcluster.runtime.scheduler import SchedulerAddresses, SchedulerNode
from flcluster.runtime.server import ServerNode
from flcluster.wire.frames import HEADER_LENGTH, LENGTH, FrameDecoder, encode_frame
from flcluster.wire.messages import ErrorReply, HeartbeatMsg, Register, RegisterReply, from_frame, to_header
from tests.helpers import lenet_job, open_cluster

MAX_MESSAGE = 1024 * 1024
ANSWER_WITHIN = 5.0
#: The Servers' heartbeat period (FLContext's default), in seconds of the (virtual) clock.
HEARTBEAT_INTERVAL = FLContext().heartbeat_interval
#: Real seconds of quiet after which the autojump clock moves on (loopback traffic settles well within).
SETTLED = 0.05


@attrs.frozen
class Cluster:
    scheduler: SchedulerNode
    servers: list[ServerNode]
    addresses: SchedulerAddresses
    ranks: dict[str, int]  # node id -> rank, as given at start-up (by order of arrival)

    @property
    def manage_url(self) -> str:
        return self.addresses.manage_urls[0]

    def assert_healthy(self, after: str) -> None:
        """Still CLUSTER_READY with both Servers registered, alive and on their ranks, as seen by all."""
        assert self.scheduler.state is ClusterState.CLUSTER_READY, after
        members = self.scheduler.members()
        assert {m.node_id: m.rank for m in members} == self.ranks, after
        assert [m.alive for m in members] == [True, True], after
        assert [s.cluster_state for s in self.servers] == [ClusterState.CLUSTER_READY] * 2, after
        assert {s.settings.node_id: s.rank for s in self.servers} == self.ranks, after


@asynccontextmanager
async def ready_cluster() -> AsyncIterator[Cluster]:
    cluster = open_cluster(
        2, lambda: lenet_job(threshold=2, iterations=20), scheduler_context={"max_message_size": MAX_MESSAGE}
    )
    async with cluster as running:
        scheduler = running.scheduler
        ranks = {m.node_id: m.rank for m in scheduler.members()}
        assert sorted(ranks.items()) in ([("0", 0), ("1", 1)], [("0", 1), ("1", 0)])
        healthy = Cluster(scheduler, running.servers, running.addresses, ranks)
        healthy.assert_healthy("start-up")
        yield healthy


async def exchange(port: int, data: bytes, *, then_close: bool = True) -> list[Any]:
    """Send raw bytes to the Scheduler's cluster port; return the messages it answers before closing.

    With ``then_close`` our side is half-closed after sending (the peer sees end of stream); without it,
    the Scheduler has to decide on what it has and close the connection itself.
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = bytearray()
    async with stream:
        await stream.send_all(data)
        if then_close:
            await stream.send_eof()
        with trio.fail_after(ANSWER_WITHIN):
            while chunk := await stream.receive_some(65536):
                received += chunk
    decoder = FrameDecoder()
    decoder.feed(received)
    answers = []
    while (frame := decoder.next_frame()) is not None:
        answers.append(from_frame(frame))
    assert decoder.buffered == 0, f"half a frame came back: {bytes(received)!r}"
    return answers


def frame_of(msg: Any) -> bytes:
    return encode_frame(to_header(msg))


def raw_frame(header: bytes) -> bytes:
    body = HEADER_LENGTH.pack(len(header)) + header
    return LENGTH.pack(len(body)) + body


def register(node_id: str, **changes: Any) -> Register:
    values: dict[str, Any] = {
        "node_id": node_id,
        "role": Role.SERVER,
        "host": "127.0.0.1",
        "port": 7777,
        "device_port": 7778,
        "pid": 1,
        "server_num": 2,
        "fl_iteration_num": 20,
        "recovering": False,
    }
    values.update(changes)
    return Register(**values)


def random_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


# ------------------------------------------------------------------------------- cluster TCP port

BAD_STREAMS: dict[str, tuple[bytes, bool, str]] = {
    # name: (bytes sent, then half-close, text the error reply must contain)
    "random bytes": (random_bytes(1, 64), True, ""),
    "random bytes with a small length": (struct.pack("<I", 40) + random_bytes(2, 44), True, ""),
    "random bytes, short": (random_bytes(3, 3), True, "link closed in the middle of a frame"),
    "truncated frame then close": (
        frame_of(register("9"))[:-7],
        True,
        "link closed in the middle of a frame",
    ),
    "length prefix of 2 GB": (struct.pack("<I", 2**31), False, "exceeds the limit of 1048576 bytes"),
    "length prefix of 4 GB - 1 with data": (b"\xff\xff\xff\xff" + b"x" * 100, False, "exceeds the limit"),
    "length too short for a header": (struct.pack("<I", 1) + b"\x00", False, "too short"),
    "header not JSON": (raw_frame(b"{register"), False, "not valid UTF-8 JSON"),
    "header NaN": (raw_frame(b'{"type":"register","pid":NaN}'), False, "NaN is not allowed"),
    "header without type": (raw_frame(b'{"node_id":"0"}'), False, "string 'type'"),
    "valid frame of an unknown type": (raw_frame(b'{"type":"scale_out","server_num":9}'), False, "unknown"),
    "register with missing fields": (raw_frame(b'{"type":"register","node_id":"2"}'), False, "missing field"),
    "register with a bool for an int": (
        encode_frame(to_header(register("2")) | {"server_num": True}),
        False,
        "register.server_num: expected an int",
    ),
    "heartbeat as the first frame": (
        frame_of(HeartbeatMsg(node_id="0")),
        False,
        "expected 'register' or 'finish_cluster', got 'heartbeat'",
    ),
}


async def test_bad_streams_get_an_error_and_hurt_nobody() -> None:
    async with ready_cluster() as cluster:
        for name, (data, then_close, expected) in BAD_STREAMS.items():
            answers = await exchange(cluster.addresses.port, data, then_close=then_close)
            assert len(answers) == 1, (name, answers)
            assert isinstance(answers[0], ErrorReply), (name, answers)
            assert expected in answers[0].reason, (name, answers)
            cluster.assert_healthy(name)


REFUSED: dict[str, tuple[Register, list[str]]] = {
    "a third node": (register("2"), ["server_num=2", "'0'", "'1'"]),
    "a new node with another server_num": (register("2", server_num=3), ["server_num=3", "server_num=2"]),
    # A known node id is not held to the total (scaling changes it, spec/cluster-protocol.md §3 rule 3):
    # another process is refused because node '0' is live (rule 6).
    "a known node id with another server_num": (
        register("0", server_num=3),
        ["Node id '0' is held by a live Server"],
    ),
    "a known node id with another fl_iteration_num": (
        register("1", fl_iteration_num=21),
        ["fl_iteration_num=21", "fl_iteration_num=20"],
    ),
    "a Worker": (register("2", role=Role.WORKER), ["WORKER"]),
}


async def test_an_unknown_role_is_refused_by_the_codec_and_hurts_nobody() -> None:
    """``register.role`` is an enum on the wire: an unknown role is a message error, answered ``error``."""
    async with ready_cluster() as cluster:
        header = to_header(register("2"))
        header["role"] = "BOSS"
        answers = await exchange(cluster.addresses.port, encode_frame(header), then_close=False)
        assert [type(a) for a in answers] == [ErrorReply]
        assert "register.role" in answers[0].reason and "'BOSS'" in answers[0].reason
        cluster.assert_healthy("an unknown role")


async def test_bad_registrations_are_refused_with_a_reason(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    # Virtual time, jumping only once the loopback traffic has settled for a moment of real time.
    autojump_clock.autojump_threshold = SETTLED
    caplog.set_level(logging.INFO, logger="flcluster")
    async with ready_cluster() as cluster:
        for name, (msg, expected) in REFUSED.items():
            answers = await exchange(cluster.addresses.port, frame_of(msg), then_close=False)
            assert len(answers) == 1, (name, answers)
            reply = answers[0]
            assert isinstance(reply, RegisterReply), (name, reply)
            assert (reply.accepted, reply.rank) == (False, -1), (name, reply)
            for text in expected:
                assert text in reply.reason, (name, text, reply.reason)
            cluster.assert_healthy(name)
        await trio.sleep(3 * HEARTBEAT_INTERVAL)  # several heartbeats later, on the virtual clock
        cluster.assert_healthy("after the refusals")
        # Refusing an impostor must not have cut the real Servers' links to the Scheduler.
        lost = [r.getMessage() for r in caplog.records if "lost the Scheduler link" in r.getMessage()]
        assert lost == []
        registered = [r.getMessage() for r in caplog.records if "registered from" in r.getMessage()]
        assert len(registered) == 2, registered


async def test_a_shallow_nested_header_is_only_an_unknown_message() -> None:
    """Control for the deep case below: a *shallow* nested header is only an unknown message."""
    async with ready_cluster() as cluster:
        header = b'{"type":"x","v":' + b"[" * 50 + b"]" * 50 + b"}"
        answers = await exchange(cluster.addresses.port, raw_frame(header), then_close=False)
        assert [type(a) for a in answers] == [ErrorReply]
        cluster.assert_healthy("shallow nesting")


async def test_a_deeply_nested_header_is_refused_and_hurts_nobody(
    autojump_clock: trio.testing.MockClock,
) -> None:
    autojump_clock.autojump_threshold = SETTLED
    async with ready_cluster() as cluster:
        header = b'{"type":"x","v":' + b"[" * 20_000 + b"]" * 20_000 + b"}"
        answers = await exchange(cluster.addresses.port, raw_frame(header), then_close=False)
        await trio.sleep(3 * HEARTBEAT_INTERVAL)  # several heartbeats later, on the virtual clock
        cluster.assert_healthy("deep nesting")
        assert [type(a) for a in answers] == [ErrorReply]


# ------------------------------------------------------------------------------ management port


def assert_error_shape(response: httpx.Response, status: int, what: str) -> str:
    assert response.status_code == status, (what, response.status_code, response.text)
    assert response.headers["content-type"] == "application/json", what
    body = response.json()
    assert set(body) == {"error_message", "code"}, (what, body)
    assert body["code"] == "1", what
    assert isinstance(body["error_message"], str), what
    assert body["error_message"], what
    message: str = body["error_message"]
    return message


def assert_nodes(cluster: Cluster, response: httpx.Response, what: str) -> None:
    assert response.status_code == 200, (what, response.text)
    assert response.headers["content-type"] == "application/json", what
    by_rank = sorted(cluster.ranks, key=cluster.ranks.__getitem__)
    assert response.json() == {
        "code": "0",
        "message": "Get nodes info successful.",
        "nodeIds": [
            *(
                {"nodeId": n, "rankId": str(cluster.ranks[n]), "role": "SERVER", "alive": "true"}
                for n in by_rank
            ),
            {"nodeId": "20", "rankId": "0", "role": "SCHEDULER", "alive": "true"},
        ],
    }, what


BAD_BODIES = [b"{", b"[1,", b'{"server_num": }', b"\xff\xfe\x00", b"null", b"", b'{"a":' * 1000]


async def test_bad_management_requests_get_the_original_error_shape() -> None:
    async with ready_cluster() as cluster, httpx.AsyncClient(timeout=ANSWER_WITHIN) as client:
        url = cluster.manage_url
        # Bodies are ignored by /nodes and /state, as in the original: bad JSON is no error there.
        for body in BAD_BODIES:
            what = f"bad JSON {body[:20]!r}"
            headers = {"content-type": "application/json"}
            assert_nodes(cluster, await client.post(f"{url}/nodes", content=body, headers=headers), what)
            response = await client.post(f"{url}/state", content=body, headers=headers)
            assert response.status_code == 200, what
            assert response.json()["cluster_state"] == "CLUSTER_READY", what
            cluster.assert_healthy(what)

        for path in ["/metrics", "/scaleOut", "/nodes/", "/nodes/0", "/", "/state/x", "/%00", "/..%2f"]:
            message = assert_error_shape(await client.post(f"{url}{path}", content=b"{}"), 404, path)
            assert message.startswith("The management API has no endpoint at this path"), path
            cluster.assert_healthy(path)
        # The operator endpoints judge their bodies (tests/unit/test_management_operators.py has them all).
        for path, key in (("/scaleout", "worker_num"), ("/scalein", "node_ids")):
            message = assert_error_shape(await client.post(f"{url}{path}", content=b"{}"), 400, path)
            assert message == f"The json is not contain the key:{key}", path
            cluster.assert_healthy(path)

        for method in ["GET", "POST", "PUT", "DELETE", "PATCH"]:
            assert_nodes(cluster, await client.request(method, f"{url}/nodes", content=b'{"x":1}'), method)
        head = await client.head(f"{url}/nodes")
        assert (head.status_code, head.headers["content-type"], head.content) == (
            200,
            "application/json",
            b"",
        )
        for method in ["TRACE", "PROPFIND", "BREW"]:
            assert_error_shape(await client.request(method, f"{url}/nodes"), 405, method)
        cluster.assert_healthy("methods")


async def test_options_on_nodes_is_answered_in_json() -> None:
    async with ready_cluster() as cluster, httpx.AsyncClient(timeout=ANSWER_WITHIN) as client:
        response = await client.options(f"{cluster.manage_url}/nodes")
        assert response.headers["content-type"] == "application/json"


@attrs.frozen
class RawAnswer:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def _send_until_refused(stream: trio.SocketStream, data: bytes, done: list[bool]) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return  # the server answered and closed before taking all of the body; that is its right
    done.append(True)


async def _read_answer(conn: h11.Connection, stream: trio.SocketStream) -> RawAnswer:
    status, content_type, body = 0, "", bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            status = event.status_code
            content_type = dict(event.headers).get(b"content-type", b"").decode()
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return RawAnswer(status, content_type, bytes(body))
        else:
            raise AssertionError(f"the management port closed without a whole answer: {event!r}")


async def http_on_one_connection(
    url: str, requests: list[tuple[str, str, bytes]], *, within: float = ANSWER_WITHIN
) -> list[RawAnswer]:
    """Send requests one after another on one keep-alive connection, reading each answer while the
    request is still being sent (a server may answer before it has read the whole body).

    httpx is not used here: when a server answers early it abandons the request body mid-stream,
    which trio reports as a ResourceWarning (an error under ``filterwarnings = error``).
    """
    port = int(url.rsplit(":", 1)[1])
    conn = h11.Connection(our_role=h11.CLIENT)
    answers = []
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        for method, path, body in requests:
            headers = [("Host", "127.0.0.1"), ("Content-Length", str(len(body)))]
            wire = conn.send(h11.Request(method=method, target=path, headers=headers))
            if body:
                wire += conn.send(h11.Data(data=body))
            wire += conn.send(h11.EndOfMessage())
            sent: list[bool] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send_until_refused, stream, wire, sent)
                with trio.fail_after(within):
                    answers.append(await _read_answer(conn, stream))
                nursery.cancel_scope.cancel()
            if not sent or conn.their_state is not h11.DONE:
                break
            conn.start_next_cycle()
    return answers


async def test_a_huge_management_body_hurts_nobody() -> None:
    async with ready_cluster() as cluster:
        for size in [MAX_MESSAGE + 1, 4 * MAX_MESSAGE]:
            (answer,) = await http_on_one_connection(cluster.manage_url, [("POST", "/nodes", b"x" * size)])
            assert answer.content_type == "application/json", size
            assert answer.json()["code"] in ("0", "1"), size
            cluster.assert_healthy(f"{size} bytes")
        async with httpx.AsyncClient(timeout=ANSWER_WITHIN) as client:
            assert_nodes(cluster, await client.get(f"{cluster.manage_url}/nodes"), "after the huge bodies")


async def test_a_body_over_max_body_is_refused_in_the_error_shape() -> None:
    async with ready_cluster() as cluster:
        body = b"x" * (MAX_MESSAGE + 1)
        (answer,) = await http_on_one_connection(cluster.manage_url, [("POST", "/nodes", body)])
        assert (answer.status, answer.content_type) == (400, "application/json")
        assert answer.json() == {
            "error_message": f"The post message is bigger than {MAX_MESSAGE} bytes.",
            "code": "1",
        }


async def test_a_keep_alive_connection_survives_a_body_within_max_body() -> None:
    async with ready_cluster() as cluster:
        answers = await http_on_one_connection(
            cluster.manage_url,
            [("POST", "/nodes", b"x" * MAX_MESSAGE), ("GET", "/state", b"")],
            within=1.0,
        )
        assert [(a.status, a.content_type) for a in answers] == [(200, "application/json")] * 2
        assert answers[1].json()["cluster_state"] == "CLUSTER_READY"
