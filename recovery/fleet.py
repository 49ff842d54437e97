"""The drills' device fleet: seeded synthetic devices in one trio process, every answer logged.

Theory of operation
-------------------
:class:`Fleet` runs ``devices`` drill devices concurrently against the Servers' device ports. It speaks
the device protocol itself (the FlatBuffers codecs of :mod:`flcluster.wire.client_codec` over one
:class:`httpx.AsyncClient`), not through the SDK's ``run_iteration``, because a drill must log *every*
answer (a lost answer followed by a repeated-update retry is how ``server.committed_not_acked`` shows),
and because the Server list changes while it runs: a restarted Server comes back on another port and
:meth:`Fleet.replace_server` swaps its URL in.

Each device loops until it has taken part in ``fl_iteration_num`` iterations or the cluster answers
"disabled or finished":

1. startFLJob with :func:`recovery.updates.data_size` for the iteration it aims at; safemode, "not
   ready" and transport errors are retried (on a randomly chosen Server each time, the SDK's
   ``use_elb``); OutOfTime sleeps until ``next_req_time`` (capped at :data:`MAX_SLEEP`) and retries;
2. updateModel with :func:`recovery.updates.update` for the iteration it was accepted in; a lost
   answer is retried; OutOfTime that is not the repeated-update answer sends it back to step 1;
3. getModel of that iteration, polled until SUCCEED; then it aims at the next iteration.

A device stops ("finished") at the first "disabled or finished" answer, whichever request got it
(getModel gets it only from a disabled instance: a finished job still serves its models).

Every answer is one :class:`~recovery.devicelog.LogEntry`. :meth:`Fleet.wait_acked` lets a drill act
"under load": it returns when ``n`` updates of iteration ``k`` have been acknowledged.
"""

from __future__ import annotations

import random
import time

import attrs
import httpx
import numpy as np
import trio

from flcluster.core.iteration import reason_repeated_update
from flcluster.errors import SchemaError
from flcluster.wire.client_codec import (
    decode_get_model_response,
    decode_start_fl_job_response,
    decode_update_model_response,
    encode_get_model_request,
    encode_start_fl_job_request,
    encode_update_model_request,
)
from flcluster.wire.codes import ResponseCode, ServerText
from flcluster.wire.records import GetModelResponse, StartFLJobResponse, UpdateModelResponse
from recovery.devicelog import HTTP, TEXT, TRANSPORT, DeviceLog, LogEntry
from recovery.updates import FloatArray, data_size, device_id, digest, update

__all__ = ["MAX_SLEEP", "Fleet", "fetch_model"]

#: Longest single sleep of a device until ``next_req_time`` (s); it asks again afterwards.
MAX_SLEEP = 3.0
#: Pause before a device retries after safemode, "not ready", SucNotReady or no answer (s).
RETRY = 0.2
_TEXTS = {member.value.encode(): member for member in ServerText}
_HEADERS = {"Content-Type": "application/octet-stream"}


@attrs.frozen
class _Answer:
    retcode: str
    reason: str
    body: object = None


def _retcode_name(code: int) -> str:
    try:
        return ResponseCode(code).name
    except ValueError:
        return f"retcode {code}"


class Fleet:
    """Drill devices ``0 .. devices-1`` (see the module docstring)."""

    def __init__(
        self,
        urls: list[str],
        *,
        devices: int,
        seed: int,
        fl_name: str,
        fl_iteration_num: int,
        log: DeviceLog,
    ) -> None:
        self.urls = list(urls)
        self.devices = devices
        self.seed = seed
        self.fl_name = fl_name
        self.fl_iteration_num = fl_iteration_num
        self.log = log
        self.acked: dict[int, int] = {}
        self.done: dict[str, str] = {}  # fl_id → how it ended
        self._watchers: list[tuple[int, int, trio.Event]] = []
        self._client: httpx.AsyncClient | None = None

    def replace_server(self, old: str, new: str) -> None:
        """A restarted Server answers at ``new`` instead of ``old``."""
        self.urls = [new if url == old else url for url in self.urls]

    def drop_server(self, url: str) -> None:
        """Stop sending to ``url`` (a Server that is not coming back); devices learn it from errors too."""
        if len(self.urls) > 1:
            self.urls = [u for u in self.urls if u != url]

    async def wait_acked(self, iteration: int, count: int) -> None:
        """Return once ``count`` updates of ``iteration`` have been acknowledged (or a later one began)."""
        if self.acked.get(iteration, 0) >= count or max(self.acked, default=0) > iteration:
            return
        event = trio.Event()
        self._watchers.append((iteration, count, event))
        await event.wait()

    def _ack(self, iteration: int) -> None:
        self.acked[iteration] = self.acked.get(iteration, 0) + 1
        for k, n, event in self._watchers:
            if self.acked.get(k, 0) >= n or iteration > k:
                event.set()

    async def run(self) -> None:
        """Run every device to its end (the caller bounds it with a cancel scope)."""
        limits = httpx.Limits(max_connections=4 * self.devices, max_keepalive_connections=2 * self.devices)
        async with httpx.AsyncClient(timeout=15.0, limits=limits) as client:
            self._client = client
            async with trio.open_nursery() as nursery:
                for d in range(self.devices):
                    nursery.start_soon(self._device, d)

    async def _post(self, rng: random.Random, op: str, body: bytes) -> tuple[str, _Answer]:
        assert self._client is not None
        url = rng.choice(self.urls)
        try:
            response = await self._client.post(f"{url}/{op}", content=body, headers=_HEADERS)
        except httpx.HTTPError as exc:
            return url, _Answer(TRANSPORT, f"{type(exc).__name__}: {exc}")
        if response.status_code != 200:
            return url, _Answer(HTTP, f"HTTP {response.status_code}: {response.content[:200]!r}")
        text = _TEXTS.get(response.content)
        if text is not None:
            return url, _Answer(TEXT, text.value)
        decoded: StartFLJobResponse | UpdateModelResponse | GetModelResponse
        try:
            match op:
                case "startFLJob":
                    decoded = decode_start_fl_job_response(response.content)
                case "updateModel":
                    decoded = decode_update_model_response(response.content)
                case _:
                    decoded = decode_get_model_response(response.content)
        except SchemaError as exc:
            return url, _Answer(HTTP, f"malformed {op} answer: {exc}")
        return url, _Answer(_retcode_name(decoded.retcode), decoded.reason, decoded)

    def _write(
        self, fl_id: str, op: str, iteration: int, declared: int, url: str, a: _Answer, dig: str = ""
    ) -> None:
        self.log.write(
            LogEntry(
                fl_id=fl_id,
                op=op,
                iteration=iteration,
                data_size=declared,
                retcode=a.retcode,
                reason=a.reason,
                time=time.time(),
                server=url,
                digest=dig,
            )
        )

    async def _sleep_until(self, next_req_time: str) -> None:
        target = int(next_req_time) / 1000 if next_req_time.isdigit() else 0.0
        await trio.sleep(min(max(target - time.time(), RETRY), MAX_SLEEP))

    async def _device(self, d: int) -> None:
        fl_id = device_id(d)
        rng = random.Random(f"{self.seed}-{d}")
        aim = 1
        while aim <= self.fl_iteration_num:
            declared = data_size(self.seed, d, aim)
            # 1. startFLJob
            body = encode_start_fl_job_request(
                fl_name=self.fl_name,
                fl_id=fl_id,
                iteration=aim,
                data_size=declared,
                timestamp=str(time.time_ns() // 1_000_000),
            )
            url, a = await self._post(rng, "startFLJob", body)
            start = a.body
            k = getattr(start, "iteration", aim) if a.retcode == "SUCCEED" else aim
            self._write(fl_id, "startFLJob", k, declared, url, a)
            if a.retcode == TEXT and a.reason == ServerText.DISABLED_OR_FINISHED.value:
                self.done[fl_id] = "finished"
                return
            if a.retcode == "OutOfTime":
                await self._sleep_until(getattr(start, "next_req_time", ""))
                continue
            if a.retcode != "SUCCEED":
                await trio.sleep(RETRY)
                continue
            if k > self.fl_iteration_num:
                break
            maps = {fm.name: np.asarray(fm.data) for fm in getattr(start, "feature_maps", ())}
            sizes = {name: int(values.size) for name, values in maps.items()}
            upload: dict[str, FloatArray] = update(sizes, self.seed, d, k, declared)
            dig = digest(upload)
            body = encode_update_model_request(
                fl_name=self.fl_name,
                fl_id=fl_id,
                iteration=k,
                feature_maps=list(upload.items()),
                timestamp="0",
            )
            # 2. updateModel
            restart = False
            while True:
                url, a = await self._post(rng, "updateModel", body)
                self._write(fl_id, "updateModel", k, declared, url, a, dig)
                if a.retcode == "SUCCEED":
                    self._ack(k)
                    break
                if a.retcode == TEXT and a.reason == ServerText.DISABLED_OR_FINISHED.value:
                    self.done[fl_id] = "finished"
                    return
                if a.retcode in (TRANSPORT, HTTP, TEXT):
                    await trio.sleep(RETRY)
                    continue
                if a.reason == reason_repeated_update(fl_id):
                    break  # already in (the answer to an earlier try was lost)
                await self._sleep_until(getattr(a.body, "next_req_time", ""))
                restart = True
                break
            if restart:
                aim = k if a.retcode != "OutOfTime" else k + 1
                continue
            # 3. getModel
            body = encode_get_model_request(fl_name=self.fl_name, iteration=k, timestamp="0")
            while True:
                url, a = await self._post(rng, "getModel", body)
                if a.retcode != "SucNotReady":
                    self._write(fl_id, "getModel", k, declared, url, a)
                if a.retcode == "SUCCEED":
                    break
                if a.retcode == TEXT and a.reason == ServerText.DISABLED_OR_FINISHED.value:
                    # getModel is served after the job finished: this is an instance disabled meanwhile.
                    self.done[fl_id] = "finished"
                    return
                await trio.sleep(RETRY)
            aim = k + 1
        self.done[fl_id] = f"ran to iteration {aim - 1}"


async def fetch_model(
    client: httpx.AsyncClient, url: str, fl_name: str, iteration: int, *, tries: int = 25
) -> dict[str, FloatArray] | None:
    """The model ``url`` serves for ``iteration`` (getModel), or ``None`` if it serves none.

    SucNotReady, safemode and transport errors are retried ``tries`` times, :data:`RETRY` apart.
    """
    body = encode_get_model_request(fl_name=fl_name, iteration=iteration, timestamp="0")
    for _ in range(tries):
        try:
            response = await client.post(f"{url}/getModel", content=body, headers=_HEADERS)
        except httpx.HTTPError:
            await trio.sleep(RETRY)
            continue
        if response.status_code == 200 and response.content not in _TEXTS:
            answer = decode_get_model_response(response.content)
            if answer.retcode == ResponseCode.SUCCEED:
                return {fm.name: np.array(fm.data, dtype=np.float32) for fm in answer.feature_maps}
        await trio.sleep(RETRY)
    return None
