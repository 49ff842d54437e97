"""Bad device input thrown at a live cluster: every answer is the protocol's, and nothing changes.

A Scheduler and four Servers run in this trio process over real loopback sockets (like
:func:`tests.helpers.cluster`, but with a small ``max_device_body`` and a handle on the Servers, so the
leader's :class:`~flcluster.core.iteration.IterationMachine` can be compared before and after). Devices
reach random Servers over HTTP, as the original's ``useElb`` client does (reference §2.1).

Every bad request must get the answer spec/device-protocol.md and spec/state-machines.md prescribe:

- a malformed body (random bytes, truncated FlatBuffers, another table's body, huge declared lengths,
  broken limits, missing required fields) gets HTTP 200 with the round's response table, retcode
  ``RequestError`` and the original's reason ("The schema of <Table> is invalid." / "Verify flatbuffers
  schema failed for <Table>."); an empty body gets the original's HTTP 500 JSON "Get post message
  failed"; a body over ``max_device_body`` gets 413 in the same JSON shape;
- a well-formed but wrong request (wrong iteration, unknown fl_id, repeated startFLJob or updateModel,
  bad data_size) gets ``OutOfTime`` with the state machine's reason and a ``next_req_time`` in the
  future; an update with a wrong tensor name or size, NaN or Inf gets ``RequestError`` ("Verify model
  feature map failed");

never a traceback, an unexpected 500 or a dropped connection, and the leader's iteration state (the
counters, the declared data sizes, the windows) is exactly what it was. The bad requests are thrown into
a running iteration (12 devices, threshold 12, some updates already folded); the iteration is then
completed and its model must equal FedAvg of exactly the acknowledged updates (the exactness rule of
tests/unit/test_rounds_exactness.py), with the data size each device *first* declared: a refused update
or declaration never entered the sum. A clean iteration follows the well-formed-but-wrong requests.

The test at the end pins a bug found this way: an unbounded download_compress_types list.
"""

from __future__ import annotations

import logging
import random
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import flatbuffers
import httpx
import numpy as np
import pytest
import trio

from flcluster.core.iteration import (
    IterationMachine,
    IterationSnapshot,
    Phase,
    Visits,
    reason_repeated_update,
)
from flcluster.runtime.driver import Leader
from flcluster.runtime.server import ServerNode
from flcluster.wire.client_codec import (
    decode_get_model_response,
    decode_start_fl_job_response,
    decode_update_model_response,
    encode_get_model_request,
    encode_start_fl_job_request,
    encode_update_model_request,
)
from flcluster.wire.codes import SAFEMODE_TEXT, CompressType, ResponseCode
from flcluster.wire.records import CompressFeatureMapView
from flcluster.wire.server_codec import decode_start_fl_job
from tests.helpers import FL_NAME, lenet_job, open_cluster

SERVERS = 4
DEVICES = 12
ITERATIONS = 5
#: Small enough to test cheaply, large enough for a whole LeNet update (266 004 bytes).
MAX_BODY = 300_000

START, UPDATE, GET = "/startFLJob", "/updateModel", "/getModel"
INVALID = {
    START: "The schema of RequestFLJob is invalid.",
    UPDATE: "The schema of RequestUpdateModel is invalid.",
    GET: "The schema of RequestGetModel is invalid.",
}
REQUIRED = {
    START: "Verify flatbuffers schema failed for RequestFLJob.",
    UPDATE: "Verify flatbuffers schema failed for RequestUpdateModel.",
}
FEATURE_MAP_FAILED = "Verify model feature map failed"
#: Every reason a body that is not a well-formed request of the round may get.
MALFORMED = {
    START: (INVALID[START], REQUIRED[START]),
    UPDATE: (INVALID[UPDATE], REQUIRED[UPDATE], FEATURE_MAP_FAILED),
    GET: (INVALID[GET],),
}

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")

Maps = dict[str, np.ndarray[Any, Any]]


#: What a device is told when its earlier upload's fold is not confirmed yet (the safemode text).
RETRY_LATER = -1

# ------------------------------------------------------------------------------------------ cluster


@attrs.frozen
class Cluster:
    urls: list[str]
    servers: list[ServerNode]

    @property
    def leader(self) -> Leader:
        """The leader's driver (Server rank 0 runs the only one)."""
        leaders = [s.leader for s in self.servers if s.leader is not None]
        assert len(leaders) == 1
        return leaders[0]

    @property
    def machine(self) -> IterationMachine:
        """The leader's iteration machine: the cluster's counters and declared data sizes."""
        return self.leader.machine

    def state(self) -> IterationSnapshot:
        """The leader's iteration state but its metrics visits (which count refused requests too)."""
        return attrs.evolve(self.machine.snapshot(), visits=Visits())


@asynccontextmanager
async def open_fleet_cluster() -> AsyncIterator[Cluster]:
    """The shared in-process cluster (``tests.helpers.open_cluster``) with ``max_device_body=MAX_BODY``."""
    async with open_cluster(
        SERVERS, lambda: lenet_job(DEVICES, ITERATIONS), max_device_body=MAX_BODY
    ) as running:
        yield Cluster(running.urls, running.servers)


# ------------------------------------------------------------------------------------------ devices


def now_ms() -> int:
    return int(time.time() * 1000)


def answer_of(path: str, response: httpx.Response, sent_ms: int, what: str) -> tuple[int, str]:
    """(retcode, reason) of a FlatBuffer protocol answer; fails on anything else.

    An OutOfTime answer must carry a ``next_req_time`` after the moment the request was sent
    (spec/state-machines.md, "next_req_time").
    """
    assert response.status_code == 200, (what, response.status_code, response.text[:300])
    assert response.headers["content-type"] == "application/octet-stream", (what, response.text[:300])
    body = response.content
    if path == START:
        fl_job = decode_start_fl_job_response(body)
        if fl_job.retcode != ResponseCode.SUCCEED:
            assert not fl_job.is_selected and fl_job.fl_plan is None and not fl_job.feature_maps, what
        retcode, reason, next_req_time = fl_job.retcode, fl_job.reason, fl_job.next_req_time
    elif path == UPDATE:
        update = decode_update_model_response(body)
        retcode, reason, next_req_time = update.retcode, update.reason, update.next_req_time
    else:
        got = decode_get_model_response(body)
        retcode, reason, next_req_time = got.retcode, got.reason, got.timestamp
    if retcode == ResponseCode.OutOfTime:
        assert int(next_req_time) > sent_ms, (what, reason, next_req_time, sent_ms)
    return retcode, reason


class Devices:
    """A fleet of synthetic devices on one HTTP client, and what the cluster acknowledged."""

    def __init__(self, cluster: Cluster, client: httpx.AsyncClient, seed: int) -> None:
        self.cluster = cluster
        self.client = client
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        job = lenet_job(DEVICES, ITERATIONS)
        self.spec = job.spec
        self.model: Maps = {name: t.numpy().reshape(-1).copy() for name, t in job.initial.items()}
        self.sizes: dict[str, int] = {}
        self.acknowledged: dict[str, Maps] = {}
        self.checked = 0

    def url(self, path: str) -> str:
        return f"{self.rng.choice(self.cluster.urls)}{path}"

    async def post(self, path: str, body: bytes) -> httpx.Response:
        return await self.client.post(self.url(path), content=body)

    async def ask(self, path: str, body: bytes, what: str) -> tuple[int, str]:
        """POST ``body`` to ``path`` on a random Server; the answer's (retcode, reason)."""
        sent_ms = now_ms()
        return answer_of(path, await self.post(path, body), sent_ms, what)

    # ---------------------------------------------------------------------------- good requests

    async def start(self, fl_id: str, iteration: int) -> None:
        self.sizes[fl_id] = size = self.rng.randint(1, 100)
        body = encode_start_fl_job_request(
            fl_name=FL_NAME, fl_id=fl_id, iteration=iteration, data_size=size, timestamp="t"
        )
        answer = decode_start_fl_job_response((await self.post(START, body)).content)
        assert answer.retcode == ResponseCode.SUCCEED, (fl_id, answer.reason)
        assert answer.iteration == iteration and answer.is_selected
        got = {m.name: np.asarray(m.data) for m in answer.feature_maps}
        for name in self.spec.names:
            np.testing.assert_array_equal(got[name], self.model[name])

    def weights(self, fl_id: str) -> Maps:
        """A fresh update of ``fl_id``, pre-multiplied by its declared data size."""
        return {
            name: self.np_rng.standard_normal(size).astype(np.float32) * np.float32(self.sizes[fl_id])
            for name, size in zip(self.spec.names, self.spec.sizes, strict=True)
        }

    async def upload(self, fl_id: str, iteration: int, maps: Maps) -> int:
        """Send one update; remember it if acknowledged. Returns the retcode."""
        body = encode_update_model_request(
            fl_name=FL_NAME, fl_id=fl_id, iteration=iteration, feature_maps=list(maps.items()), timestamp="t"
        )
        retcode, reason = await self.ask(UPDATE, body, f"upload {fl_id}")
        if retcode == ResponseCode.SUCCEED:
            assert fl_id not in self.acknowledged, f"{fl_id} acknowledged twice in one iteration"
            assert reason == "success not ready"
            self.acknowledged[fl_id] = maps
        return retcode

    async def check_model(self, iteration: int) -> None:
        """Model ``iteration`` is FedAvg of exactly the acknowledged updates, on every Server; then
        wait until the leader has moved on to the next iteration (so its state is still again)."""
        total = sum(self.sizes[f] for f in self.acknowledged)
        expected = {
            name: sum(self.acknowledged[f][name].astype(np.float64) for f in sorted(self.acknowledged))
            / total
            for name in self.spec.names
        }
        request = encode_get_model_request(fl_name=FL_NAME, iteration=iteration, timestamp="t")
        with trio.fail_after(15):
            # The iteration ends only once every follower has installed the model: no polling.
            assert await self.cluster.leader.wait_ended(iteration), f"iteration {iteration} failed"
        models = []
        for url in self.cluster.urls:
            answer = decode_get_model_response(
                (await self.client.post(f"{url}{GET}", content=request)).content
            )
            assert answer.retcode == ResponseCode.SUCCEED, answer.reason
            assert answer.iteration == iteration + 1
            models.append({m.name: np.asarray(m.data) for m in answer.feature_maps})
        assert (self.cluster.machine.current_iteration, self.cluster.machine.phase) == (
            iteration + 1,
            Phase.WAITING,
        )
        got = models[0]
        for name in self.spec.names:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5)
            for other in models[1:]:
                np.testing.assert_array_equal(other[name], got[name])
        self.model = {name: got[name].copy() for name in self.spec.names}

    async def clean_round(self, iteration: int) -> None:
        """A whole iteration of well-behaved devices (the exactness test's round)."""
        self.sizes.clear()
        self.acknowledged.clear()
        devices = [f"device-{i}" for i in range(DEVICES)]
        for fl_id in devices:
            await self.start(fl_id, iteration)
        async with trio.open_nursery() as nursery:
            for fl_id in devices:
                nursery.start_soon(self.upload, fl_id, iteration, self.weights(fl_id))
        assert set(self.acknowledged) == set(devices)
        await self.check_model(iteration)

    # ----------------------------------------------------------------------------- bad requests

    async def refused(
        self,
        path: str,
        body: bytes,
        retcodes: Sequence[int],
        reasons: Sequence[str],
        what: str,
    ) -> tuple[int, str]:
        """Send a bad request: a protocol answer with one of ``retcodes``, a reason starting with one of
        ``reasons``, and the leader's state exactly as before."""
        before = self.cluster.state()
        retcode, reason = await self.ask(path, body, what)
        assert retcode in retcodes, (what, retcode, reason)
        assert reason.startswith(tuple(reasons)), (what, reason)
        assert self.cluster.state() == before, what
        self.checked += 1
        return retcode, reason

    async def malformed(self, path: str, body: bytes, what: str) -> None:
        """A body that is no well-formed request of ``path``: RequestError with the decoder's reason."""
        if path == GET:
            before = self.cluster.state()
            retcode, reason = await self.ask(path, body, what)
            # A getModel body can decode by chance (every field is optional); it changes nothing anyway.
            if retcode == ResponseCode.RequestError:
                assert reason.startswith(INVALID[GET]), (what, reason)
            else:
                assert retcode in (ResponseCode.SUCCEED, ResponseCode.SucNotReady), (what, retcode)
            assert self.cluster.state() == before, what
            self.checked += 1
            return
        await self.refused(path, body, [ResponseCode.RequestError], MALFORMED[path], what)


# ----------------------------------------------------------------------------- crafted FlatBuffers


def root_of(body: bytes) -> int:
    return int(_U32.unpack_from(body, 0)[0])


def field_at(body: bytes, table: int, slot: int) -> int:
    """Where field ``slot`` of the table at ``table`` lies (it must be present)."""
    vtable = table - _I32.unpack_from(body, table)[0]
    entry = _U16.unpack_from(body, vtable + 4 + 2 * slot)[0]
    assert entry, f"slot {slot} absent"
    return table + int(entry)


def deref(body: bytes, at: int) -> int:
    """Where the uoffset stored at ``at`` points (a table, or a string's or vector's length prefix)."""
    return at + int(_U32.unpack_from(body, at)[0])


def patched(body: bytes, at: int, value: int, fmt: struct.Struct = _U32) -> bytes:
    out = bytearray(body)
    fmt.pack_into(out, at, value)
    return bytes(out)


def raw_start_fl_job(
    *,
    fl_name: bytes | None = FL_NAME.encode(),
    fl_id: bytes | None,
    data_size: int = 1,
    timestamp: bytes | None = b"t",
    compress_types: bytes = b"",
) -> bytes:
    """A RequestFLJob written field by field, with whatever bytes we like (the codec would refuse)."""
    b = flatbuffers.Builder(256 + len(compress_types))
    types = b.CreateByteVector(compress_types) if compress_types else None
    strings = {
        slot: b.CreateString(v) for slot, v in ((0, fl_name), (1, fl_id), (4, timestamp)) if v is not None
    }
    b.StartObject(12)
    for slot, off in strings.items():
        b.PrependUOffsetTRelativeSlot(slot, off, 0)
    b.PrependInt32Slot(3, data_size, 0)
    if types is not None:
        b.PrependUOffsetTRelativeSlot(10, types, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())


def raw_get_model(*, iteration: int, compress_types: bytes) -> bytes:
    """A RequestGetModel with a download_compress_types vector of any bytes (written in bulk)."""
    b = flatbuffers.Builder(256 + len(compress_types))
    types = b.CreateByteVector(compress_types)
    name, timestamp = b.CreateString(FL_NAME), b.CreateString("t")
    b.StartObject(4)
    b.PrependUOffsetTRelativeSlot(0, name, 0)
    b.PrependInt32Slot(1, iteration, 0)
    b.PrependUOffsetTRelativeSlot(2, timestamp, 0)
    b.PrependUOffsetTRelativeSlot(3, types, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())


def raw_update_model(
    *,
    fl_id: bytes | None,
    iteration: int = 1,
    maps: Sequence[tuple[bytes | None, np.ndarray[Any, Any] | None]] | None,
    timestamp: bytes | None = b"t",
) -> bytes:
    """A RequestUpdateModel written field by field (``maps=None``: no feature_map vector at all)."""
    b = flatbuffers.Builder(1024)
    tables = []
    for name, data in maps or ():
        name_off = b.CreateString(name) if name is not None else None
        data_off = b.CreateNumpyVector(data) if data is not None else None
        b.StartObject(2)
        if name_off is not None:
            b.PrependUOffsetTRelativeSlot(0, name_off, 0)
        if data_off is not None:
            b.PrependUOffsetTRelativeSlot(1, data_off, 0)
        tables.append(b.EndObject())
    vector = None
    if maps is not None:
        b.StartVector(4, len(tables), 4)
        for off in reversed(tables):
            b.PrependUOffsetTRelative(off)
        vector = b.EndVector()
    strings = {
        slot: b.CreateString(v)
        for slot, v in ((0, FL_NAME.encode()), (1, fl_id), (4, timestamp))
        if v is not None
    }
    b.StartObject(16)
    for slot, off in strings.items():
        b.PrependUOffsetTRelativeSlot(slot, off, 0)
    b.PrependInt32Slot(2, iteration, 0)
    if vector is not None:
        b.PrependUOffsetTRelativeSlot(3, vector, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())


def huge_length_bodies(update: bytes) -> dict[str, bytes]:
    """A valid full update with one declared length (or offset) made absurd, each its own case."""
    root = root_of(update)
    vector = deref(update, field_at(update, root, 3))
    count = int(_U32.unpack_from(update, vector)[0])
    cases: dict[str, bytes] = {}
    for i in range(count):
        element = deref(update, vector + 4 + 4 * i)
        data = deref(update, field_at(update, element, 1))
        name = deref(update, field_at(update, element, 0))
        for value in (2**31 - 1, 2**32 - 1, 2**29):
            cases[f"feature_map[{i}].data length {value}"] = patched(update, data, value)
        length = int(_U32.unpack_from(update, data)[0])
        cases[f"feature_map[{i}].data one element longer"] = patched(update, data, length + 1)
        cases[f"feature_map[{i}].data one element shorter"] = patched(update, data, length - 1)
        cases[f"feature_map[{i}].weight_fullname length 2**32-1"] = patched(update, name, 2**32 - 1)
        cases[f"feature_map[{i}] offset past the end"] = patched(update, vector + 4 + 4 * i, len(update))
    for value in (2**31 - 1, 2**32 - 1, 4097, count + 1):
        cases[f"feature_map count {value}"] = patched(update, vector, value)
    for slot, field in ((1, "fl_id"), (4, "timestamp"), (0, "fl_name")):
        at = deref(update, field_at(update, root, slot))
        for value in (2**31 - 1, 2**32 - 1, 4096):
            cases[f"{field} length {value}"] = patched(update, at, value)
    cases["root offset past the end"] = patched(update, 0, len(update))
    cases["root offset 2**32-1"] = patched(update, 0, 2**32 - 1)
    cases["root offset 0"] = patched(update, 0, 0)
    cases["vtable offset huge"] = patched(update, root, 2**31 - 1, _I32)
    cases["vtable offset negative"] = patched(update, root, -(2**31), _I32)
    cases["vtable offset into the tensors"] = patched(update, root, -len(update) // 2, _I32)
    return cases


def mutants(body: bytes, rng: random.Random, count: int) -> list[bytes]:
    """``count`` copies of ``body``, each with a few bytes or one aligned word changed."""
    interesting = [0, 1, 4, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, len(body), len(body) - 4, 0xFFFF]
    out = []
    for _ in range(count):
        data = bytearray(body)
        if rng.random() < 0.5:
            at = rng.randrange(0, len(body) - 3) & ~3
            _U32.pack_into(data, at, rng.choice(interesting))
        else:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(body))] = rng.randrange(256)
        out.append(bytes(data))
    return out


def random_bodies(rng: random.Random, count: int) -> list[bytes]:
    """Random bytes; half of them start with a plausible (small, aligned) root offset."""
    out = []
    for i in range(count):
        data = bytearray(rng.randbytes(rng.choice([1, 2, 3, 4, 7, 8, 16, 33, 64, 200, 1000, 5000])))
        if i % 2 and len(data) >= 8:
            _U32.pack_into(data, 0, rng.randrange(4, min(len(data), 256)) & ~3)
        out.append(bytes(data))
    out.append(rng.randbytes(MAX_BODY))
    return out


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], errors


# When a Server closes the connection after its 413, httpx abandons the rest of the upload and its body
# iterator (an async generator) is collected unfinished: harmless, but pytest would report it.
ABANDONED_UPLOAD = (
    r"ignore:Exception ignored in. <async_generator object \w*ByteStream"
    ":pytest.PytestUnraisableExceptionWarning"
)


class Chunks:
    """A body of ``total`` zero bytes sent without a Content-Length (chunked), 64 KiB at a time."""

    def __init__(self, total: int) -> None:
        self.left = total

    def __aiter__(self) -> Chunks:
        return self

    async def __anext__(self) -> bytes:
        if self.left <= 0:
            raise StopAsyncIteration
        self.left -= 65536
        return bytes(65536)


# ---------------------------------------------------------------------------------- malformed bodies


@pytest.mark.filterwarnings(ABANDONED_UPLOAD)
async def test_malformed_bodies_get_protocol_answers_and_change_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    rng = random.Random(11)
    async with open_fleet_cluster() as cluster, httpx.AsyncClient(timeout=30) as client:
        fleet = Devices(cluster, client, seed=11)
        devices = [f"device-{i}" for i in range(DEVICES)]
        # Iteration 1 is running: half the devices joined, one update is already in a Server's sums.
        for fl_id in devices[:6]:
            await fleet.start(fl_id, 1)
        assert await fleet.upload("device-0", 1, fleet.weights("device-0")) == ResponseCode.SUCCEED
        before = cluster.state()
        assert (len(before.devices), before.updated, before.phase) == (6, ("device-0",), Phase.RUNNING)

        # An empty body: the original's HTTP 500 JSON, whatever the method.
        for path in (START, UPDATE, GET):
            for method in ("POST", "GET", "PUT"):
                response = await client.request(method, fleet.url(path), content=b"")
                assert response.status_code == 500, (path, method, response.text)
                assert response.json() == {"error_message": "Get post message failed", "code": "1"}

        # Over max_device_body: 413 in the same JSON shape, with and without a Content-Length.
        # (A fresh connection each time: see test_the_next_request_after_a_413_...)
        bodies: list[Callable[[], Any]] = [
            lambda: b"\x00" * (MAX_BODY + 1),
            lambda: rng.randbytes(MAX_BODY + 4096),
            lambda: Chunks(MAX_BODY + 65536),
        ]
        async with httpx.AsyncClient(timeout=30, headers={"connection": "close"}) as fresh:
            for path in (START, UPDATE, GET):
                for make in bodies:
                    response = await fresh.post(fleet.url(path), content=make())
                    assert response.status_code == 413, (path, response.text)
                    body = response.json()
                    assert set(body) == {"error_message", "code"} and body["code"] == "1", body
                    assert body["error_message"].startswith("413 Request Entity Too Large"), body
                    assert cluster.state() == before, path

        # Random bytes (one body of exactly max_device_body bytes among them).
        for path in (START, UPDATE, GET):
            for i, body in enumerate(random_bodies(rng, 60)):
                await fleet.malformed(path, body, f"random body #{i} ({len(body)} bytes) to {path}")

        # Valid FlatBuffers truncated: every prefix of the small ones, every ~1% of a whole update.
        start_request = encode_start_fl_job_request(
            fl_name=FL_NAME, fl_id="device-6", iteration=1, data_size=5, timestamp="t"
        )
        get_request = encode_get_model_request(fl_name=FL_NAME, iteration=1, timestamp="t")
        update_request = encode_update_model_request(
            fl_name=FL_NAME,
            fl_id="device-1",
            iteration=1,
            feature_maps=list(fleet.weights("device-1").items()),
            timestamp="t",
        )
        # The last object written is fl_name ("Lenet" and its NUL); only the padding after it may go.
        ends = {body: body.rindex(b"Lenet\x00") + 6 for body in (start_request, get_request, update_request)}
        assert all(len(body) - end == 2 for body, end in ends.items())
        truncations = [
            (START, start_request, range(1, ends[start_request])),
            (GET, get_request, range(1, ends[get_request])),
            (
                UPDATE,
                update_request,
                [*range(1, ends[update_request], len(update_request) // 97), ends[update_request] - 1],
            ),
        ]
        for path, body, lengths in truncations:
            for n in lengths:
                await fleet.malformed(path, body[:n], f"{path} body cut to {n} of {len(body)} bytes")

        # Another round's body, and the server's own answers, at each round.
        start_answer = (
            await client.post(fleet.url(START), content=start_request.replace(b"e-6", b"e-0"))
        ).content
        update_answer = (await fleet.post(UPDATE, update_request.replace(b"device-1", b"device-0"))).content
        get_answer = (await fleet.post(GET, get_request)).content
        assert cluster.state() == before
        others = {
            START: [get_request, start_answer, update_answer, get_answer],
            UPDATE: [start_request, get_request, start_answer, update_answer, get_answer],
            GET: [start_request, start_answer, update_answer, get_answer],
        }
        for path, wrong in others.items():
            for i, body in enumerate(wrong):
                await fleet.malformed(path, body, f"another table's body #{i} to {path}")
        # FlatBuffers carry no type tag: an update's body read as a RequestFLJob is a *valid* one (its
        # feature_map offset becomes data_size). Sent for a device that has joined, it is a repeat.
        as_start = decode_start_fl_job(update_request)
        assert (as_start.fl_id, as_start.timestamp) == ("device-1", "t") and 1 <= as_start.data_size <= 65535
        await fleet.refused(
            START,
            update_request,
            [ResponseCode.OutOfTime],
            ["Updating device metadata failed for fl id device-1"],
            "an update's body to /startFLJob",
        )

        # Huge or wrong declared lengths and offsets in a whole update.
        for name, body in huge_length_bodies(update_request).items():
            await fleet.malformed(UPDATE, body, name)

        # Broken limits, bad UTF-8, missing required fields (fresh fl_ids: an acceptance would count).
        sizes = zip(fleet.spec.names, fleet.spec.sizes, strict=True)
        good = [(n.encode(), np.full(s, 1.0, np.float32)) for n, s in sizes]
        crafted = {
            START: {
                "fl_id of 257 bytes": raw_start_fl_job(fl_id=b"x" * 257),
                "fl_name of 257 bytes": raw_start_fl_job(fl_name=b"x" * 257, fl_id=b"crafted-1"),
                "fl_id not UTF-8": raw_start_fl_job(fl_id=b"crafted-\xff\xfe"),
                "fl_id not UTF-8 (lone surrogate)": raw_start_fl_job(fl_id=b"\xed\xa0\x80"),
                "no fl_id": raw_start_fl_job(fl_id=None),
                "no fl_name": raw_start_fl_job(fl_name=None, fl_id=b"crafted-2"),
                "no timestamp": raw_start_fl_job(fl_id=b"crafted-3", timestamp=None),
            },
            UPDATE: {
                "fl_id of 257 bytes": raw_update_model(fl_id=b"x" * 257, maps=good),
                "fl_id not UTF-8": raw_update_model(fl_id=b"device-\xff", maps=good),
                "no fl_id": raw_update_model(fl_id=None, maps=good),
                "no timestamp": raw_update_model(fl_id=b"device-1", maps=good, timestamp=None),
                "no feature_map": raw_update_model(fl_id=b"device-1", maps=None),
                "empty feature_map": raw_update_model(fl_id=b"device-1", maps=[]),
                "a feature map without a name": raw_update_model(
                    fl_id=b"device-1", maps=[*good[:-1], (None, good[-1][1])]
                ),
                "a feature map without data": raw_update_model(
                    fl_id=b"device-1", maps=[*good[:-1], (good[-1][0], None)]
                ),
                "a weight name of 1025 bytes": raw_update_model(
                    fl_id=b"device-1", maps=[*good[:-1], (b"w" * 1025, good[-1][1])]
                ),
                "a weight name not UTF-8": raw_update_model(
                    fl_id=b"device-1", maps=[*good[:-1], (b"fc3.bias\xc3", good[-1][1])]
                ),
                "4097 feature maps": raw_update_model(
                    fl_id=b"device-1", maps=[(b"fc3.bias", np.zeros(1, np.float32))] * 4097
                ),
            },
        }
        for path, cases in crafted.items():
            for name, body in cases.items():
                await fleet.malformed(path, body, name)

        # Mutated small valid bodies. An update from an fl_id that never joined: whatever survives
        # decoding is refused by the leader (unknown device or wrong iteration), never counted.
        small_update = encode_update_model_request(
            fl_name=FL_NAME,
            fl_id="mutant-00",
            iteration=1,
            feature_maps=[("fc3.bias", np.full(62, 2.0, np.float32))],
            timestamp="t",
        )
        for i, body in enumerate(mutants(small_update, rng, 150)):
            await fleet.refused(
                UPDATE,
                body,
                [ResponseCode.RequestError, ResponseCode.OutOfTime],
                [*MALFORMED[UPDATE], "devices_meta for ", "UpdateModel iteration number is invalid:"],
                f"mutated update #{i}",
            )
        for i, body in enumerate(mutants(get_request, rng, 60)):
            await fleet.malformed(GET, body, f"mutated getModel #{i}")
        assert cluster.state() == before

        # The other half joins; the startFLJob round is closed, so a mutated startFLJob that still
        # decodes is refused by the count (and any other is malformed).
        for fl_id in devices[6:]:
            await fleet.start(fl_id, 1)
        closed = cluster.state()
        for i, body in enumerate(mutants(start_request, rng, 150)):
            await fleet.refused(
                START,
                body,
                [ResponseCode.RequestError, ResponseCode.OutOfTime],
                [*MALFORMED[START], "Current amount for startFLJob has reached the threshold."],
                f"mutated startFLJob #{i}",
            )
        assert cluster.state() == closed

        # Iteration 1 completes; its model is FedAvg of exactly the acknowledged updates.
        async with trio.open_nursery() as nursery:
            for fl_id in devices[1:]:
                nursery.start_soon(fleet.upload, fl_id, 1, fleet.weights(fl_id))
        assert set(fleet.acknowledged) == set(devices)
        await fleet.check_model(1)
        assert fleet.checked > 800
        no_errors_logged(caplog)


# ---------------------------------------------------------------------------- well-formed, but wrong


def update_body(fl_id: str, iteration: int, maps: Sequence[tuple[str, Any]], **fields: Any) -> bytes:
    return encode_update_model_request(
        fl_name=FL_NAME, fl_id=fl_id, iteration=iteration, feature_maps=maps, timestamp="t", **fields
    )


def start_body(fl_id: str, data_size: int) -> bytes:
    return encode_start_fl_job_request(
        fl_name=FL_NAME, fl_id=fl_id, iteration=1, data_size=data_size, timestamp="t"
    )


async def test_wrong_requests_are_refused_and_only_acknowledged_updates_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    async with open_fleet_cluster() as cluster, httpx.AsyncClient(timeout=30) as client:
        fleet = Devices(cluster, client, seed=23)
        devices = [f"device-{i}" for i in range(DEVICES)]
        for fl_id in devices[:10]:
            await fleet.start(fl_id, 1)
        out_of_time = [ResponseCode.OutOfTime]
        request_error = [ResponseCode.RequestError]

        # startFLJob: data_size out of [1, 65535]; a repeat (the first declaration stands).
        for size, reason in (
            (0, "FL job data size is not enough."),
            (-1, "FL job data size is not enough."),
            (-(2**31), "FL job data size is not enough."),
            (65536, "FL job data size is too large."),
            (2**31 - 1, "FL job data size is too large."),
        ):
            await fleet.refused(
                START, start_body("newcomer", size), out_of_time, [reason], f"data_size {size}"
            )
        await fleet.refused(
            START,
            start_body("device-0", fleet.sizes["device-0"] + 7),
            out_of_time,
            ["Updating device metadata failed for fl id device-0"],
            "repeated startFLJob of device-0 with another data size",
        )
        # The same startFLJob again (its first answer lost, spec/recovery.md §5): answered again, the
        # machine unchanged (nothing counted twice).
        before = cluster.state()
        retcode, reason = await fleet.ask(START, start_body("device-1", fleet.sizes["device-1"]), "retry")
        assert (retcode, reason) == (ResponseCode.SUCCEED, "success")
        assert cluster.state() == before

        # updateModel before any update was acknowledged.
        good = fleet.weights("device-0")
        items = list(good.items())
        for fl_id in ("stranger", "newcomer"):
            await fleet.refused(
                UPDATE,
                update_body(fl_id, 1, items),
                out_of_time,
                [f"devices_meta for {fl_id} is not set. Please retry later."],
                f"update from {fl_id}, which never joined",
            )
        for iteration in (0, 2, -1, 2**31 - 1):
            _, reason = await fleet.refused(
                UPDATE,
                update_body("device-0", iteration, items),
                out_of_time,
                [f"UpdateModel iteration number is invalid:{iteration}, current iteration:1, Retry "],
                f"update for iteration {iteration}",
            )
            assert reason.endswith(", fl id is device-0"), reason

        nan, inf = np.float32("nan"), np.float32("inf")

        def spoiled(name: str, index: int, value: np.float32) -> list[tuple[str, Any]]:
            array = good[name].copy()
            array[index] = value
            return [(n, array if n == name else a) for n, a in items]

        bad_maps: dict[str, list[tuple[str, Any]]] = {
            "an unknown tensor name": [("conv1.weightX" if n == "conv1.weight" else n, a) for n, a in items],
            "an empty tensor name": [("", a) if n == "fc3.bias" else (n, a) for n, a in items],
            "a tensor named twice": [*items, items[0]],
            "a tensor one element short": [(n, a[:-1] if n == "fc1.weight" else a) for n, a in items],
            "a tensor one element long": [
                (n, np.append(a, a[:1]) if n == "fc3.bias" else a) for n, a in items
            ],
            "an empty tensor": [(n, a[:0] if n == "conv2.weight" else a) for n, a in items],
            "a NaN in the last tensor": spoiled("fc3.bias", 61, nan),
            "a NaN in the first value": spoiled("conv1.weight", 0, nan),
            "+Inf": spoiled("fc1.weight", 47_999, inf),
            "-Inf": spoiled("fc2.weight", 5000, -inf),
            "no tensor at all": [],
        }
        for what, maps in bad_maps.items():
            for fl_id in ("device-0", "stranger"):
                await fleet.refused(
                    UPDATE,
                    update_body(fl_id, 1, maps),
                    request_error,
                    [FEATURE_MAP_FAILED],
                    f"{what} ({fl_id})",
                )
        for field, value in (("upload_loss", nan), ("upload_accuracy", inf), ("upload_loss", -inf)):
            await fleet.refused(
                UPDATE,
                update_body("device-0", 1, items, **{field: float(value)}),
                request_error,
                [REQUIRED[UPDATE]],
                f"{field} {value}",
            )
        # Upload forms this cluster does not serve (no compression, no SignDS configured) carry no
        # plain weights: refused, not counted as an empty participant.
        squeezed = [CompressFeatureMapView(n, np.ones(a.size, np.int8), -1.0, 1.0) for n, a in items]
        for what, fields in {
            "a DIFF_SPARSE_QUANT upload": {
                "upload_compress_type": CompressType.DIFF_SPARSE_QUANT,
                "compress_feature_maps": squeezed,
                "name_vec": list(good),
                "upload_sparse_rate": 0.4,
            },
            "a QUANT upload": {"upload_compress_type": CompressType.QUANT, "compress_feature_maps": squeezed},
        }.items():
            # Refused even with plain weights alongside: the flag says they are not what was sent.
            await fleet.refused(
                UPDATE,
                update_body("device-0", 1, [("fc3.bias", good["fc3.bias"])], **fields),
                request_error,
                ["upload_compress_type "],
                what,
            )
        await fleet.refused(
            UPDATE,
            update_body("device-0", 1, [], sign=1, index_array=[1, 5, 9]),
            request_error,
            [FEATURE_MAP_FAILED],
            "a SignDS upload",
        )

        # The update is accepted after all those refusals; a repeat is refused and does not count.
        assert await fleet.upload("device-0", 1, good) == ResponseCode.SUCCEED
        again = {name: array + np.float32(1.0) for name, array in good.items()}
        await fleet.refused(
            UPDATE,
            update_body("device-0", 1, list(again.items())),
            out_of_time,
            ["Updating metadata of UpdateModelClientList failed for fl id device-0"],
            "repeated update of device-0",
        )
        await fleet.refused(
            UPDATE,
            update_body("device-0", 1, spoiled("fc3.bias", 0, nan)),
            request_error,
            [FEATURE_MAP_FAILED],
            "repeated update of device-0 with a NaN",
        )
        # getModel for the running iteration is not ready; for others it answers; nothing changes.
        for iteration in (1, 0, -1, 2, 2**31 - 1, -(2**31)):
            body = encode_get_model_request(fl_name=FL_NAME, iteration=iteration, timestamp="t")
            expected = ResponseCode.SucNotReady if iteration == 1 else ResponseCode.SUCCEED
            await fleet.refused(GET, body, [expected], [""], f"getModel for iteration {iteration}")

        # The round closes; every later startFLJob is refused by the count, repeats included.
        for fl_id in devices[10:]:
            await fleet.start(fl_id, 1)
        for fl_id in ("late", "device-11", "device-3"):
            await fleet.refused(
                START,
                start_body(fl_id, 3),
                out_of_time,
                ["Current amount for startFLJob has reached the threshold. Please startFLJob later."],
                f"startFLJob of {fl_id} after the round closed",
            )

        # The rest upload concurrently, to random Servers, with bad company: device-5 sends two
        # different updates at once (exactly one may count), device-6 a NaN one beside its good one,
        # device-7 one for the wrong iteration beside its good one.
        outcomes: dict[str, list[int]] = {fl_id: [] for fl_id in devices}

        async def upload(fl_id: str, iteration: int, maps: Maps) -> None:
            outcomes[fl_id].append(await fleet.upload(fl_id, iteration, maps))

        async def racing_upload(fl_id: str, maps: Maps) -> None:
            # Of two uploads at once, the one that arrives while the other's fold is unconfirmed is
            # told to retry later (the safemode text, spec/recovery.md §4); one that arrives after the
            # confirmation is a repeat (OutOfTime).
            body = encode_update_model_request(
                fl_name=FL_NAME, fl_id=fl_id, iteration=1, feature_maps=list(maps.items()), timestamp="t"
            )
            response = await fleet.post(UPDATE, body)
            if response.headers["content-type"].startswith("text/plain"):
                assert response.text == SAFEMODE_TEXT, response.text
                outcomes[fl_id].append(RETRY_LATER)
                return
            retcode = decode_update_model_response(response.content).retcode
            if retcode == ResponseCode.SUCCEED:
                assert fl_id not in fleet.acknowledged, f"{fl_id} acknowledged twice in one iteration"
                fleet.acknowledged[fl_id] = maps
            outcomes[fl_id].append(retcode)

        poisoned = fleet.weights("device-6")
        poisoned["fc2.bias"][3] = nan
        async with trio.open_nursery() as nursery:
            for fl_id in devices[1:]:
                if fl_id != "device-5":
                    nursery.start_soon(upload, fl_id, 1, fleet.weights(fl_id))
            nursery.start_soon(racing_upload, "device-5", fleet.weights("device-5"))
            nursery.start_soon(racing_upload, "device-5", fleet.weights("device-5"))
            nursery.start_soon(upload, "device-6", 1, poisoned)
            nursery.start_soon(upload, "device-7", 2, fleet.weights("device-7"))
        assert set(fleet.acknowledged) == set(devices)
        assert sorted(outcomes["device-5"]) in (
            [ResponseCode.SUCCEED, ResponseCode.OutOfTime],
            [RETRY_LATER, ResponseCode.SUCCEED],
        )
        assert sorted(outcomes["device-6"]) == [ResponseCode.SUCCEED, ResponseCode.RequestError]
        assert sorted(outcomes["device-7"]) == [ResponseCode.SUCCEED, ResponseCode.OutOfTime]
        # FedAvg of exactly the acknowledged updates, with the data sizes first declared.
        await fleet.check_model(1)

        # Iteration 1 is over: its updates are refused now, and nothing changes. A device whose update
        # is in model 1 is told so (a lost SUCCEED, spec/recovery.md §5); one that never counted in it
        # is sent back to startFLJob.
        reason_wrong_iteration_prefix = (
            "UpdateModel iteration number is invalid:1, current iteration:2, Retry later at time: "
        )
        for fl_id in ("device-0", "device-1", "newcomer"):
            counted = fl_id in fleet.acknowledged
            _, reason = await fleet.refused(
                UPDATE,
                update_body(fl_id, 1, items),
                out_of_time,
                [reason_repeated_update(fl_id) if counted else reason_wrong_iteration_prefix],
                f"late update of {fl_id}",
            )
        await fleet.refused(
            UPDATE,
            update_body("device-2", 2, items),
            out_of_time,
            ["devices_meta for device-2 is not set. Please retry later."],
            "update for iteration 2 before joining it",
        )
        await fleet.clean_round(2)
        no_errors_logged(caplog)


@pytest.mark.filterwarnings(ABANDONED_UPLOAD)
async def test_the_next_request_after_a_413_on_the_same_connection_is_answered() -> None:
    """A 413 is sent before the body is read; the connection must not stay open half-read.

    Without ``Connection: close`` on the 413, hypercorn either drops or stalls the keep-alive connection
    (a race: about 3 tries in 4), and the device's next request on it gets no answer or a reset.
    """
    get_request = encode_get_model_request(fl_name=FL_NAME, iteration=1, timestamp="t")
    async with open_fleet_cluster() as cluster:
        # A race in the server decides each try; every one of them must be answered.
        for attempt in range(10):
            url = cluster.urls[attempt % SERVERS]
            async with httpx.AsyncClient(timeout=3, limits=httpx.Limits(max_connections=1)) as client:
                response = await client.post(f"{url}{GET}", content=b"\x00" * 2_000_000)
                assert response.status_code == 413
                response = await client.post(f"{url}{GET}", content=get_request)
                assert response.status_code == 200
                assert decode_get_model_response(response.content).retcode == ResponseCode.SucNotReady


async def test_an_absurd_download_compress_types_list_is_refused() -> None:
    absurd = bytes(250_000)  # 250 000 NO_COMPRESS entries; CompressType has 3 values
    async with open_fleet_cluster() as cluster, httpx.AsyncClient(timeout=30) as client:
        fleet = Devices(cluster, client, seed=5)
        await fleet.refused(
            GET,
            raw_get_model(iteration=1, compress_types=absurd),
            [ResponseCode.RequestError],
            [INVALID[GET]],
            "getModel with 250 000 download_compress_types",
        )
        await fleet.refused(
            START,
            raw_start_fl_job(fl_id=b"device-0", data_size=3, compress_types=absurd),
            [ResponseCode.RequestError],
            [INVALID[START]],
            "startFLJob with 250 000 download_compress_types",
        )
