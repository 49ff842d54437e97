"""The device SDK's reactions to every kind of answer, against a scripted HTTP server on loopback.

The server double is a quart-trio app served by hypercorn on port 0 (``serve_app``); it answers each round
from a script (FlatBuffers built with the server codec's encoders, the plain texts, HTTP errors)
and records when each request arrived. Tests that involve waiting run on ``autojump_clock``, so the times
of the device's requests are exact virtual times.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import numpy as np
import pytest
import trio
from quart import Response, request
from quart_trio import QuartTrio

from flcluster.client import (
    LENET_TENSOR_ORDER,
    Device,
    DeviceHTTPError,
    DevicePolicy,
    DeviceTransportError,
    IterationOutcome,
    MalformedAnswer,
    ModelUnavailable,
    ServerText,
    SimulatorConfig,
    TrainingTask,
    TrainResult,
    lenet_sizes,
    make_lenet,
    plot_accuracy,
    simulate,
    synthetic_update,
)
from flcluster.core import iteration
from flcluster.errors import ConfigError
from flcluster.http.serving import serve_app
from flcluster.wire import codes
from flcluster.wire.codes import ResponseCode
from flcluster.wire.records import FLPlanParams, StartFLJobResponse
from flcluster.wire.server_codec import (
    decode_get_model,
    decode_start_fl_job,
    decode_update_model,
    encode_get_model_response,
    encode_start_fl_job_response,
    encode_update_model_response,
)
from tests.helpers import refusing_port

BASE_MS = 1_700_000_000_000
MODEL = {"w": np.arange(4, dtype=np.float32), "b": np.array([0.5], dtype=np.float32)}
PLAN = FLPlanParams(fl_name="Lenet", iterations=5, epochs=2, mini_batch=8, lr=0.25)


def plan_of(plan: FLPlanParams | None) -> tuple[object, ...]:
    """The plan fields a device trains with (the float32 ones chosen exactly representable)."""
    assert plan is not None
    return (plan.fl_name, plan.iterations, plan.epochs, plan.mini_batch, plan.lr)


PLANNED = plan_of(PLAN)


def now_ms() -> int:
    """Epoch milliseconds on trio's (virtual) clock."""
    return BASE_MS + round(trio.current_time() * 1000)


# ----------------------------------------------------------------------------------------------------------
# Answers
# ----------------------------------------------------------------------------------------------------------


def fl_job(
    retcode: int = ResponseCode.SUCCEED,
    *,
    iteration: int = 1,
    next_req_time: str = "",
    reason: str = "success",
    model: Mapping[str, np.ndarray] = MODEL,
) -> bytes:
    return encode_start_fl_job_response(
        retcode=retcode,
        reason=reason,
        iteration=iteration,
        is_selected=retcode == ResponseCode.SUCCEED,
        next_req_time=next_req_time,
        fl_plan=PLAN,
        feature_maps=list(model.items()),
    )


def update(retcode: int = ResponseCode.SUCCEED, *, next_req_time: str = "", reason: str = "") -> bytes:
    return encode_update_model_response(
        retcode=retcode, reason=reason or "success not ready", next_req_time=next_req_time
    )


def get(
    retcode: int = ResponseCode.SUCCEED,
    *,
    iteration: int = 2,
    timestamp: str = "",
    model: Mapping[str, np.ndarray] = MODEL,
) -> bytes:
    return encode_get_model_response(
        retcode=retcode,
        reason="success" if retcode == ResponseCode.SUCCEED else "not this time",
        iteration=iteration,
        feature_maps=list(model.items()),
        timestamp=timestamp,
    )


def out_of_time(round_name: str, next_req_time: str | Callable[[], str]) -> Callable[[], bytes]:
    """An OutOfTime answer for ``round_name`` whose next_req_time is computed when the request arrives."""

    def answer() -> bytes:
        when = next_req_time() if callable(next_req_time) else next_req_time
        if round_name == "startFLJob":
            return fl_job(ResponseCode.OutOfTime, next_req_time=when, reason="come back later")
        if round_name == "updateModel":
            return update(ResponseCode.OutOfTime, next_req_time=when, reason="come back later")
        return get(ResponseCode.OutOfTime, timestamp=when)

    return answer


def in_ms(delay: int) -> Callable[[], str]:
    return lambda: str(now_ms() + delay)


@attrs.frozen
class HTTPAnswer:
    status: int
    body: str


Answer = bytes | str | HTTPAnswer | Callable[[], bytes]
ROUNDS = ["startFLJob", "updateModel", "getModel"]
HAPPY: dict[str, list[Answer]] = {"startFLJob": [fl_job()], "updateModel": [update()], "getModel": [get()]}


def script(**rounds: Sequence[Answer]) -> dict[str, list[Answer]]:
    """The happy path, with the given rounds' answers in front of it."""
    return {name: [*rounds.get(name, ()), *answers] for name, answers in HAPPY.items()}


# ----------------------------------------------------------------------------------------------------------
# The server double
# ----------------------------------------------------------------------------------------------------------


@attrs.frozen
class Seen:
    round_name: str
    at: float
    server: int
    body: bytes


async def request_body() -> bytes:
    data = await request.get_data()
    assert isinstance(data, bytes)
    return data


def scripted_app(answers: dict[str, deque[Answer]], seen: list[Seen], server: int, prefix: str) -> QuartTrio:
    app = QuartTrio(f"scripted-{server}")

    @app.route(f"{prefix}/<round_name>", methods=["POST"])
    async def round_(round_name: str) -> Response:
        seen.append(Seen(round_name, trio.current_time(), server, await request_body()))
        queue = answers.get(round_name)
        if not queue:
            return Response(f"script exhausted for {round_name}", status=599)
        answer = queue.popleft()
        if callable(answer):
            answer = answer()
        if isinstance(answer, HTTPAnswer):
            return Response(answer.body, status=answer.status, content_type="application/json")
        if isinstance(answer, str):
            return Response(answer, status=200, content_type="text/plain; charset=utf-8")
        return Response(answer, status=200, content_type="application/octet-stream")

    return app


@asynccontextmanager
async def scripted_servers(
    rounds: Mapping[str, Sequence[Answer]], *, count: int = 1, prefix: str = ""
) -> AsyncIterator[tuple[list[str], list[Seen]]]:
    """``count`` servers sharing one script; yields their base URLs and the requests they saw."""
    answers = {name: deque(items) for name, items in rounds.items()}
    seen: list[Seen] = []
    async with trio.open_nursery() as nursery:
        urls = []
        for index in range(count):
            bound = await nursery.start(serve_app, scripted_app(answers, seen, index, prefix), "127.0.0.1", 0)
            urls.append(bound[0])
        yield urls, seen
        nursery.cancel_scope.cancel()


class RecordingTrainer:
    """Uploads the global model times the data size, with a fixed loss; records every task."""

    def __init__(self) -> None:
        self.tasks: list[TrainingTask] = []

    async def __call__(self, task: TrainingTask) -> TrainResult:
        self.tasks.append(task)
        upload = {name: np.asarray(data) * np.float32(task.data_size) for name, data in task.model.items()}
        return TrainResult(feature_maps=upload, loss=0.25, accuracy=0.5)


def rounds_of(seen: list[Seen]) -> list[str]:
    return [s.round_name for s in seen]


def make_device(client: httpx.AsyncClient, urls: Sequence[str], **kwargs: object) -> Device:
    options: dict[str, object] = {"fl_name": "Lenet", "client": client, "now_ms": now_ms}
    options.update(kwargs)
    return Device("fl_lenet_0", urls, **options)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# Single requests
# ----------------------------------------------------------------------------------------------------------


def test_server_texts_are_the_originals_exact_strings_from_their_one_home() -> None:
    assert ServerText is codes.ServerText
    assert {t.name: t.value for t in ServerText} == {
        "NOT_READY": "The server's training job is not ready.",
        "SAFEMODE": "The cluster is in safemode.",
        "DISABLED_OR_FINISHED": "The server's training job is disabled or finished.",
    }
    assert tuple(ServerText) == (codes.NOT_READY_TEXT, codes.SAFEMODE_TEXT, codes.JOB_NOT_AVAILABLE_TEXT)
    # The Server's side sends the same objects: the core's replies and the device app's "not ready".
    assert iteration.SAFEMODE_TEXT is codes.SAFEMODE_TEXT
    assert iteration.JOB_NOT_AVAILABLE_TEXT is codes.JOB_NOT_AVAILABLE_TEXT


async def test_each_call_posts_the_original_request_and_decodes_the_answer(autojump_clock: object) -> None:
    async with scripted_servers(HAPPY) as (urls, seen), httpx.AsyncClient() as client:
        device = make_device(client, urls)
        started = await device.start_fl_job(32, iteration=3)
        updated = await device.update_model(1, {"w": np.ones(4, np.float32)}, upload_loss=1.5)
        model = await device.get_model(1)
    assert isinstance(started, StartFLJobResponse)
    assert (started.retcode, started.iteration, plan_of(started.fl_plan)) == (200, 1, PLANNED)
    assert [fm.name for fm in started.feature_maps] == ["w", "b"]
    assert not isinstance(updated, ServerText) and updated.retcode == 200
    assert not isinstance(model, ServerText) and model.iteration == 2
    start_req = decode_start_fl_job(seen[0].body)
    assert (start_req.fl_name, start_req.fl_id, start_req.data_size, start_req.iteration) == (
        "Lenet",
        "fl_lenet_0",
        32,
        3,
    )
    assert start_req.timestamp == str(BASE_MS)
    update_req = decode_update_model(seen[1].body)
    assert (update_req.fl_id, update_req.iteration, update_req.upload_loss) == ("fl_lenet_0", 1, 1.5)
    assert [fm.name for fm in update_req.feature_maps] == ["w"]
    assert decode_get_model(seen[2].body).iteration == 1
    assert rounds_of(seen) == ["startFLJob", "updateModel", "getModel"]


@pytest.mark.parametrize("text", list(ServerText))
async def test_plain_texts_are_told_apart_by_exact_match(text: ServerText) -> None:
    rounds: dict[str, list[Answer]] = {name: [text.value] for name in HAPPY}
    async with scripted_servers(rounds) as (urls, _), httpx.AsyncClient() as client:
        device = make_device(client, urls)
        assert await device.start_fl_job(1) is text
        assert await device.update_model(1, MODEL) is text
        assert await device.get_model(1) is text


@pytest.mark.parametrize(
    "body", ["The cluster is in safemode", "the cluster is in safemode.", "The round getModel is empty.", ""]
)
async def test_other_bodies_are_malformed_answers(body: str) -> None:
    async with scripted_servers({"getModel": [body]}) as (urls, _), httpx.AsyncClient() as client:
        with pytest.raises(MalformedAnswer, match="neither one of the server's plain texts"):
            await make_device(client, urls).get_model(1)


@pytest.mark.parametrize("status", [400, 404, 500])
async def test_a_status_other_than_200_is_an_http_error(status: int) -> None:
    error = HTTPAnswer(status, '{"error_message": "boom", "code": "1"}')
    async with scripted_servers({"startFLJob": [error]}) as (urls, _), httpx.AsyncClient() as client:
        with pytest.raises(DeviceHTTPError, match=f"HTTP {status}") as info:
            await make_device(client, urls).start_fl_job(1)
    assert info.value.status == status
    assert b"boom" in info.value.body


async def test_no_answer_is_a_transport_error() -> None:
    with refusing_port() as port:
        async with httpx.AsyncClient() as client:
            with pytest.raises(DeviceTransportError, match="got no HTTP answer"):
                await make_device(client, [f"http://127.0.0.1:{port}"]).start_fl_job(1)


async def test_url_prefix_is_put_before_the_round_name() -> None:
    async with scripted_servers(HAPPY, prefix="/fl/v1") as (urls, seen), httpx.AsyncClient() as client:
        answer = await make_device(client, urls, url_prefix="/fl/v1").start_fl_job(1)
    assert isinstance(answer, StartFLJobResponse)
    assert rounds_of(seen) == ["startFLJob"]


async def test_without_elb_every_request_goes_to_the_first_server() -> None:
    rounds = {"getModel": [get()] * 12}
    async with scripted_servers(rounds, count=3) as (urls, seen), httpx.AsyncClient() as client:
        device = make_device(client, urls)
        for _ in range(12):
            await device.get_model(1)
    assert {s.server for s in seen} == {0}


async def test_elb_picks_a_seeded_random_server_per_request() -> None:
    rounds = {"getModel": [get()] * 48}
    picks: list[list[int]] = []
    async with scripted_servers(rounds, count=3) as (urls, seen), httpx.AsyncClient() as client:
        for seed in (7, 7, 8):
            before = len(seen)
            device = make_device(client, urls, use_elb=True, seed=seed)
            for _ in range(16):
                await device.get_model(1)
            picks.append([s.server for s in seen[before:]])
    assert picks[0] == picks[1]
    assert picks[0] != picks[2]
    assert set(picks[0]) == {0, 1, 2}


# ----------------------------------------------------------------------------------------------------------
# run_iteration: the reaction to every answer
# ----------------------------------------------------------------------------------------------------------


async def test_happy_iteration_trains_on_the_global_model_and_uploads_premultiplied(
    autojump_clock: object,
) -> None:
    trainer = RecordingTrainer()
    rounds = script(startFLJob=[fl_job(iteration=7)])
    async with scripted_servers(rounds) as (urls, seen), httpx.AsyncClient() as client:
        device = make_device(client, urls)
        report = await device.run_iteration(trainer, data_size=32)
    assert report.outcome is IterationOutcome.COMPLETED
    assert (report.iteration, report.model_iteration, report.restarts, report.waits) == (7, 2, 0, 0)
    assert (report.loss, report.data_size, plan_of(report.plan), report.elapsed) == (0.25, 32, PLANNED, 0.0)
    assert device.iteration == 7 and device.stopped is None
    (task,) = trainer.tasks
    assert (task.fl_id, task.iteration, task.data_size, plan_of(task.plan)) == ("fl_lenet_0", 7, 32, PLANNED)
    assert {name: list(data) for name, data in task.model.items()} == {"w": [0, 1, 2, 3], "b": [0.5]}
    assert rounds_of(seen) == ["startFLJob", "updateModel", "getModel"]
    upload = decode_update_model(seen[1].body)
    assert upload.iteration == 7
    assert (upload.upload_loss, upload.upload_accuracy) == (0.25, 0.5)
    assert {fm.name: list(fm.data) for fm in upload.feature_maps} == {"w": [0, 32, 64, 96], "b": [16]}
    assert decode_start_fl_job(seen[0].body).data_size == 32
    assert decode_get_model(seen[2].body).iteration == 7


async def test_suc_not_ready_polls_get_model_every_wait_interval(autojump_clock: object) -> None:
    not_ready = get(ResponseCode.SucNotReady)
    rounds = script(getModel=[not_ready] * 3)
    async with scripted_servers(rounds) as (urls, seen), httpx.AsyncClient() as client:
        report = await make_device(client, urls).run_iteration(RecordingTrainer(), data_size=1)
    assert report.outcome is IterationOutcome.COMPLETED
    assert report.waits == 3
    assert [s.at for s in seen if s.round_name == "getModel"] == [0.0, 0.5, 1.0, 1.5]
    assert rounds_of(seen) == ["startFLJob", "updateModel", *["getModel"] * 4]


async def test_waits_are_bounded_then_the_iteration_fails(autojump_clock: object) -> None:
    rounds = script(getModel=[get(ResponseCode.SucNotReady)] * 3)
    policy = DevicePolicy(wait_interval=2.0, max_wait_tries=2)
    async with scripted_servers(rounds) as (urls, seen), httpx.AsyncClient() as client:
        device = make_device(client, urls, policy=policy)
        report = await device.run_iteration(RecordingTrainer(), data_size=1)
    assert report.outcome is IterationOutcome.FAILED
    assert "max_wait_tries=2" in report.reason and "SucNotReady" in report.reason
    assert [s.at for s in seen if s.round_name == "getModel"] == [0.0, 2.0, 4.0]
    assert device.stopped is None


@pytest.mark.parametrize("round_name", ["startFLJob", "updateModel", "getModel"])
@pytest.mark.parametrize("text", [ServerText.SAFEMODE, ServerText.NOT_READY])
async def test_safemode_and_not_ready_wait_then_retry_the_same_request(
    autojump_clock: object, round_name: str, text: ServerText
) -> None:
    rounds = script(**{round_name: [text.value, text.value]})
    async with scripted_servers(rounds) as (urls, seen), httpx.AsyncClient() as client:
        report = await make_device(client, urls).run_iteration(RecordingTrainer(), data_size=4)
    assert report.outcome is IterationOutcome.COMPLETED
    assert (report.waits, report.restarts) == (2, 0)
    assert [s.at for s in seen if s.round_name == round_name] == [0.0, 0.5, 1.0]
    expected = ["startFLJob", "updateModel", "getModel"]
    position = expected.index(round_name)
    assert rounds_of(seen) == [*expected[:position], *[round_name] * 3, *expected[position + 1 :]]


@pytest.mark.parametrize("round_name", ["startFLJob", "updateModel", "getModel"])
async def test_out_of_time_sleeps_exactly_until_next_req_time_then_restarts(
    autojump_clock: object, round_name: str
) -> None:
    rounds = script(**{round_name: [out_of_time(round_name, in_ms(7250))]})
    for earlier in ROUNDS[: ROUNDS.index(round_name)]:
        rounds[earlier].extend(HAPPY[earlier])  # answered once more after the restart
    async with scripted_servers(rounds) as (urls, seen), httpx.AsyncClient() as client:
        report = await make_device(client, urls).run_iteration(RecordingTrainer(), data_size=4)
    assert report.outcome is IterationOutcome.COMPLETED
    assert report.restarts == 1
    starts = [s.at for s in seen if s.round_name == "startFLJob"]
    assert starts == [0.0, 7.25]
    expected = ["startFLJob", "updateModel", "getModel"]
    position = expected.index(round_name)
    assert rounds_of(seen) == [*expected[: position + 1], *expected]
    assert report.elapsed == 7.25


async def test_a_second_out_of_time_fails_the_iteration_without_sleeping(autojump_clock: object) -> None:
    late = out_of_time("startFLJob", in_ms(3000))
    rounds = script(startFLJob=[late, late])
    async with scripted_servers(rounds) as (urls, seen), httpx.AsyncClient() as client:
        device = make_device(client, urls)
        report = await device.run_iteration(RecordingTrainer(), data_size=4)
        assert trio.current_time() == 3.0
    assert report.outcome is IterationOutcome.FAILED
    assert "max_restarts=1" in report.reason and "OutOfTime" in report.reason
    assert rounds_of(seen) == ["startFLJob", "startFLJob"]
    assert device.stopped is None


@pytest.mark.parametrize("max_restarts", [0, 2, 3])
async def test_the_restart_limit_is_configurable(autojump_clock: object, max_restarts: int) -> None:
    late = out_of_time("updateModel", in_ms(1000))
    rounds = script(startFLJob=[fl_job(), fl_job()], updateModel=[late, late])
    policy = DevicePolicy(max_restarts=max_restarts)
    async with scripted_servers(rounds) as (urls, seen), httpx.AsyncClient() as client:
        report = await make_device(client, urls, policy=policy).run_iteration(RecordingTrainer(), data_size=4)
    if max_restarts < 2:
        assert report.outcome is IterationOutcome.FAILED
        assert rounds_of(seen) == ["startFLJob", "updateModel"]
    else:
        assert report.outcome is IterationOutcome.COMPLETED
        assert report.restarts == 2
        assert [s.at for s in seen if s.round_name == "startFLJob"] == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("next_req_time", ["", "soon", "-5", "12.5", lambda: str(now_ms()), in_ms(-1)])
async def test_a_next_req_time_not_in_the_future_is_logged_and_backed_off(
    autojump_clock: object, caplog: pytest.LogCaptureFixture, next_req_time: str | Callable[[], str]
) -> None:
    rounds = script(startFLJob=[out_of_time("startFLJob", next_req_time)])
    policy = DevicePolicy(bad_next_req_time_backoff=2.5)
    with caplog.at_level(logging.WARNING, logger="flcluster.client"):
        async with scripted_servers(rounds) as (urls, seen), httpx.AsyncClient() as client:
            report = await make_device(client, urls, policy=policy).run_iteration(
                RecordingTrainer(), data_size=4
            )
    assert report.outcome is IterationOutcome.COMPLETED
    assert [s.at for s in seen if s.round_name == "startFLJob"] == [0.0, 2.5]
    (record,) = [r for r in caplog.records if "next_req_time" in r.getMessage()]
    assert "fl_lenet_0" in record.getMessage() and "aborts" in record.getMessage()


@pytest.mark.parametrize(("max_sleep_ms", "expected"), [(None, 1800.0), (60_000, 60.0)])
async def test_the_sleep_until_next_req_time_is_capped(
    autojump_clock: object, max_sleep_ms: int | None, expected: float
) -> None:
    rounds = script(startFLJob=[out_of_time("startFLJob", in_ms(10 * 3600 * 1000))])
    policy = DevicePolicy() if max_sleep_ms is None else DevicePolicy(max_sleep_ms=max_sleep_ms)
    async with scripted_servers(rounds) as (urls, seen), httpx.AsyncClient() as client:
        report = await make_device(client, urls, policy=policy).run_iteration(RecordingTrainer(), data_size=4)
    assert report.outcome is IterationOutcome.COMPLETED
    assert [s.at for s in seen if s.round_name == "startFLJob"] == [0.0, expected]


def retcode_answer(round_name: str, retcode: int) -> bytes:
    """``round_name``'s response table with ``retcode``."""
    if round_name == "startFLJob":
        return fl_job(retcode, reason="refused")
    if round_name == "updateModel":
        return update(retcode, reason="refused")
    return get(retcode)


STOPPERS: dict[str, Callable[[str], Answer]] = {
    "RequestError": lambda r: retcode_answer(r, ResponseCode.RequestError),
    "SystemError": lambda r: retcode_answer(r, ResponseCode.SystemError),
    "unknown retcode": lambda r: retcode_answer(r, ResponseCode.NotSelected),
    "disabled or finished": lambda r: ServerText.DISABLED_OR_FINISHED.value,
    "HTTP 400": lambda r: HTTPAnswer(400, "400 Bad Request"),
    "HTTP 500": lambda r: HTTPAnswer(500, '{"error_message": "Get post message failed", "code": "1"}'),
    "malformed": lambda r: "The output of the round startFLJob is empty.",
}


@pytest.mark.parametrize("round_name", ["startFLJob", "updateModel", "getModel"])
@pytest.mark.parametrize("kind", list(STOPPERS))
async def test_errors_and_finished_stop_the_devices_job(
    autojump_clock: object, round_name: str, kind: str
) -> None:
    rounds = script(**{round_name: [STOPPERS[kind](round_name)]})
    trainer = RecordingTrainer()
    async with scripted_servers(rounds) as (urls, seen), httpx.AsyncClient() as client:
        device = make_device(client, urls)
        report = await device.run_iteration(trainer, data_size=4)
        sent = len(seen)
        again = await device.run_iteration(trainer, data_size=4)
    assert report.outcome is IterationOutcome.STOPPED
    assert device.stopped == report.reason
    assert report.reason
    expected = ["startFLJob", "updateModel", "getModel"]
    assert rounds_of(seen) == expected[: expected.index(round_name) + 1]
    assert len(trainer.tasks) == (0 if round_name == "startFLJob" else 1)
    assert again.outcome is IterationOutcome.STOPPED and again.reason == report.reason
    assert len(seen) == sent
    assert trio.current_time() == 0.0


async def test_a_transport_error_fails_the_iteration_but_not_the_job() -> None:
    with refusing_port() as port:
        async with httpx.AsyncClient() as client:
            device = make_device(client, [f"http://127.0.0.1:{port}"])
            report = await device.run_iteration(RecordingTrainer(), data_size=4)
    assert report.outcome is IterationOutcome.FAILED
    assert "got no HTTP answer" in report.reason
    assert device.stopped is None


async def test_a_success_without_a_plan_stops_the_job(autojump_clock: object) -> None:
    planless = encode_start_fl_job_response(
        retcode=200,
        reason="success",
        iteration=1,
        is_selected=True,
        next_req_time="",
        fl_plan=None,
        feature_maps=[],
    )
    async with scripted_servers(script(startFLJob=[planless])) as (urls, _), httpx.AsyncClient() as client:
        report = await make_device(client, urls).run_iteration(RecordingTrainer(), data_size=4)
    assert report.outcome is IterationOutcome.STOPPED
    assert "without an FLPlan" in report.reason


async def test_fetch_model_waits_through_safemode_and_not_ready(autojump_clock: object) -> None:
    rounds: dict[str, list[Answer]] = {
        "getModel": [ServerText.SAFEMODE.value, get(ResponseCode.SucNotReady), get(iteration=9)]
    }
    async with scripted_servers(rounds) as (urls, seen), httpx.AsyncClient() as client:
        answer = await make_device(client, urls).fetch_model(8)
    assert answer.iteration == 9
    assert [s.at for s in seen] == [0.0, 0.5, 1.0]


async def test_fetch_model_refused_raises_model_unavailable(autojump_clock: object) -> None:
    rounds: dict[str, list[Answer]] = {"getModel": [get(ResponseCode.RequestError)]}
    async with scripted_servers(rounds) as (urls, _), httpx.AsyncClient() as client:
        with pytest.raises(ModelUnavailable, match="RequestError"):
            await make_device(client, urls).fetch_model(3)


async def test_bad_arguments_are_refused() -> None:
    async with httpx.AsyncClient() as client:
        for servers in ([], "http://127.0.0.1:6668", ["127.0.0.1:6668"], ["http://h:1/path"]):
            with pytest.raises(ConfigError, match="server"):
                make_device(client, servers)
        with pytest.raises(ConfigError, match="url_prefix"):
            make_device(client, ["http://127.0.0.1:6668"], url_prefix="fl")
        device = make_device(client, ["http://127.0.0.1:6668"])
        with pytest.raises(ConfigError, match="data_size"):
            await device.run_iteration(RecordingTrainer(), data_size=0)
    for bad in (
        {"wait_interval": -1.0},
        {"max_wait_tries": -1},
        {"max_restarts": 1.5},
        {"max_sleep_ms": True},
    ):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            DevicePolicy(**bad)


# ----------------------------------------------------------------------------------------------------------
# Synthetic updates and the simulator
# ----------------------------------------------------------------------------------------------------------


def test_synthetic_updates_are_seeded_and_have_exactly_lenets_names_and_sizes() -> None:
    sizes = lenet_sizes()
    assert list(sizes) == list(LENET_TENSOR_ORDER)
    assert sizes == {
        "conv1.weight": 450,
        "conv2.weight": 2400,
        "fc1.weight": 48000,
        "fc2.weight": 10080,
        "fc3.weight": 5208,
        "fc1.bias": 120,
        "fc2.bias": 84,
        "fc3.bias": 62,
    }
    assert sum(sizes.values()) == 66_404
    a = synthetic_update(sizes, data_size=32, seed=(1, 2, 3))
    b = synthetic_update(sizes, data_size=32, seed=(1, 2, 3))
    c = synthetic_update(sizes, data_size=32, seed=(1, 2, 4))
    assert list(a) == list(LENET_TENSOR_ORDER)
    assert {name: array.shape for name, array in a.items()} == {name: (n,) for name, n in sizes.items()}
    assert all(array.dtype == np.float32 for array in a.values())
    assert all(np.array_equal(a[name], b[name]) for name in a)
    assert not np.array_equal(a["fc1.weight"], c["fc1.weight"])
    assert all(float(array.min()) >= 0.0 and float(array.max()) < 32.0 for array in a.values())
    with pytest.raises(ConfigError, match="data_size"):
        synthetic_update(sizes, data_size=0, seed=1)


class FakeCluster:
    """A one-server stand-in that accepts every device and serves a fixed LeNet model for every iteration."""

    def __init__(self) -> None:
        weights = make_lenet(seed=3, num_classes=10).state_dict()
        self.model = [(name, weights[name].reshape(-1).numpy()) for name in LENET_TENSOR_ORDER]
        self.uploads: list[tuple[str, dict[str, np.ndarray]]] = []

    def app(self) -> QuartTrio:
        app = QuartTrio("fake-cluster")
        plan = FLPlanParams(fl_name="Lenet", iterations=2, epochs=1, mini_batch=16, lr=0.05)

        @app.route("/<round_name>", methods=["POST"])
        async def round_(round_name: str) -> Response:
            body = await request_body()
            if round_name == "startFLJob":
                answer = encode_start_fl_job_response(
                    retcode=200,
                    reason="success",
                    iteration=1,
                    is_selected=True,
                    next_req_time=str(BASE_MS),
                    fl_plan=plan,
                    feature_maps=self.model,
                )
            elif round_name == "updateModel":
                req = decode_update_model(body)
                self.uploads.append((req.fl_id, {fm.name: np.array(fm.data) for fm in req.feature_maps}))
                answer = update()
            else:
                answer = encode_get_model_response(
                    retcode=200, reason="success", iteration=2, feature_maps=self.model, timestamp=""
                )
            return Response(answer, status=200, content_type="application/octet-stream")

        return app


@pytest.mark.parametrize("mode", ["train", "synthetic"])
async def test_simulate_runs_every_device_and_records_each_iteration(mode: str, tmp_path: Path) -> None:
    cluster = FakeCluster()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(serve_app, cluster.app(), "127.0.0.1", 0)
        config = SimulatorConfig(
            servers=urls,
            num_devices=3,
            mode=mode,  # type: ignore[arg-type]
            iterations=2,
            seed=5,
            batch_size=64,
            progress=False,
        )
        report = await simulate(config)
        nursery.cancel_scope.cancel()
    assert [s.index for s in report.iterations] == [1, 2]
    assert all(s.completed == 3 and s.failed == 0 and s.server_iteration == 1 for s in report.iterations)
    assert all(len(reports) == 3 for reports in report.device_reports)
    assert len(cluster.uploads) == 6
    assert {fl_id for fl_id, _ in cluster.uploads} == {"fl_lenet_0", "fl_lenet_1", "fl_lenet_2"}
    sizes = {name: n for name, n in zip(LENET_TENSOR_ORDER, lenet_sizes(10).values(), strict=True)}
    for _, upload in cluster.uploads:
        assert list(upload) == list(LENET_TENSOR_ORDER)
        assert {name: a.size for name, a in upload.items()} == sizes
        assert all(np.isfinite(a).all() for a in upload.values())
    if mode == "train":
        data_sizes = {r.fl_id: r.data_size for r in report.device_reports[0]}
        assert sum(data_sizes.values()) == 1797 - round(1797 * 0.2)
        for fl_id, upload in cluster.uploads:
            # premultiplied: divided by the data size, the weights are close to the model sent
            sent = dict(cluster.model)["fc3.bias"]
            assert np.abs(upload["fc3.bias"] / data_sizes[fl_id] - sent).max() < 1.0
        for summary in report.iterations:
            assert summary.accuracy is not None and 0.0 <= summary.accuracy <= 1.0
            assert summary.loss is not None and math.isfinite(summary.loss)
            assert summary.train_loss is not None
        written = plot_accuracy(report, tmp_path / "accuracy.png")
        assert written.read_bytes().startswith(b"\x89PNG")
    else:
        assert all(r.data_size == 32 for r in report.device_reports[0])
        assert all(s.accuracy is None for s in report.iterations)


def test_simulator_config_refuses_bad_values() -> None:
    with pytest.raises(ConfigError, match="mode"):
        SimulatorConfig(servers=("http://127.0.0.1:6668",), mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="servers"):
        SimulatorConfig(servers=("127.0.0.1:6668",))
    with pytest.raises(ConfigError, match="num_devices"):
        SimulatorConfig(servers=("http://127.0.0.1:6668",), num_devices=0)
    with pytest.raises(ConfigError, match="dirichlet_alpha"):
        SimulatorConfig(servers=("http://127.0.0.1:6668",), dirichlet_alpha=0.0)
