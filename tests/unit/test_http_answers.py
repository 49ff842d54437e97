"""The device app over a route table, and the one JSON error shape (flcluster/http/device.py, answers.py).

The app is driven through quart's test client with a real :class:`DeviceRounds` (a small table of async
handlers), not a mock: the routes it serves are exactly the table's, a handler's ``str`` answer is a plain
text and its ``bytes`` answer a FlatBuffer body, and an exception that escapes a handler gets the JSON error
shape with the status its class hints (spec/device-protocol.md, "Endpoints and answers").
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import pytest

from flcluster.errors import IllegalEvent, RegistrationRefused, SchemaError
from flcluster.http.device import DeviceHandler, DeviceRounds, create_device_app
from flcluster.wire.codes import EMPTY_BODY_MESSAGE, NOT_READY_TEXT, SAFEMODE_TEXT, DeviceRound

ROOT = Path(__file__).resolve().parents[2]
ERRORS: dict[bytes, Exception] = {
    b"schema": SchemaError("The schema of RequestGetModel is invalid.", "truncated"),
    b"illegal": IllegalEvent("enable: the instance is finished"),
    b"refused": RegistrationRefused("server_num 3 != 4"),
}


class Table:
    """A DeviceRounds with the standard rounds plus a secure-aggregation round, recording what it got."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, bytes]] = []

    def routes(self) -> Mapping[str, DeviceHandler]:
        async def start_fl_job(body: bytes) -> bytes | str:
            self.bodies.append(("startFLJob", body))
            return b"\x04\x00\x00\x00flatbuffer"

        async def update_model(body: bytes) -> bytes | str:
            self.bodies.append(("updateModel", body))
            return SAFEMODE_TEXT

        async def get_model(body: bytes) -> bytes | str:
            raise ERRORS.get(body, RuntimeError("bug"))

        async def exchange_keys(body: bytes) -> bytes | str:
            self.bodies.append(("exchangeKeys", body))
            return b"keys"

        return {
            DeviceRound.START_FL_JOB: start_fl_job,
            DeviceRound.UPDATE_MODEL: update_model,
            DeviceRound.GET_MODEL: get_model,
            "exchangeKeys": exchange_keys,
        }


async def test_round_service_serves_the_standard_table_through_the_app() -> None:
    from flcluster.runtime.rounds import LeaderLine, RoundService
    from flcluster.wire.client_codec import decode_get_model_response, encode_get_model_request
    from tests.helpers import lenet_job

    job = lenet_job(threshold=1, iterations=1)
    rounds: DeviceRounds = RoundService(
        spec=job.spec, initial=job.initial, plan=job.plan, device=job.device, line=LeaderLine()
    )
    assert list(rounds.routes()) == ["startFLJob", "updateModel", "getModel"]
    client = create_device_app(rounds, url_prefix="", max_body=1 << 20).test_client()
    response = await client.post(
        "/getModel", data=encode_get_model_request(fl_name="x", iteration=0, timestamp="")
    )
    assert response.status_code == 200
    answer = decode_get_model_response(await response.get_data())
    assert answer.retcode == 200 and [m.name for m in answer.feature_maps] == list(job.spec.names)


def test_the_http_layer_does_not_import_the_runtime() -> None:
    for path in (ROOT / "flcluster" / "http").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("flcluster.runtime"), (path.name, node.module)


async def test_the_app_serves_exactly_the_route_table() -> None:
    rounds: DeviceRounds = Table()
    client = create_device_app(rounds, url_prefix="/fl", max_body=1024).test_client()

    response = await client.post("/fl/startFLJob", data=b"job")
    assert response.status_code == 200
    assert response.mimetype == "application/octet-stream"
    assert await response.get_data() == b"\x04\x00\x00\x00flatbuffer"

    response = await client.put("/fl/updateModel", data=b"update")
    assert response.status_code == 200
    assert response.content_type == "text/plain; charset=utf-8"
    assert await response.get_data(as_text=True) == SAFEMODE_TEXT

    response = await client.get("/fl/exchangeKeys", data=b"k")  # a joined round; the method is not checked
    assert (response.status_code, await response.get_data()) == (200, b"keys")
    assert isinstance(rounds, Table)
    assert rounds.bodies == [("startFLJob", b"job"), ("updateModel", b"update"), ("exchangeKeys", b"k")]

    response = await client.post("/fl/getKeys", data=b"k")  # not in the table
    assert response.status_code == 404
    body = await response.get_json()
    assert set(body) == {"error_message", "code"} and body["code"] == "1"


async def test_an_empty_body_is_the_originals_500() -> None:
    client = create_device_app(Table(), url_prefix="", max_body=1024).test_client()
    response = await client.post("/startFLJob", data=b"")
    assert response.status_code == 500
    assert await response.get_json() == {"error_message": EMPTY_BODY_MESSAGE, "code": "1"}
    assert response.headers["Connection"] == "close"


async def test_without_rounds_every_standard_round_is_not_ready() -> None:
    client = create_device_app(None, url_prefix="", max_body=1024).test_client()
    for name in DeviceRound:
        response = await client.post(f"/{name}", data=b"x")
        assert (response.status_code, await response.get_data(as_text=True)) == (200, NOT_READY_TEXT)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"schema", 400, "The schema of RequestGetModel is invalid. truncated"),
        (b"illegal", 409, "enable: the instance is finished"),
        (b"refused", 503, "server_num 3 != 4"),
        (b"bug", 500, "Internal error: RuntimeError"),
    ],
)
async def test_an_escaping_error_gets_the_json_shape_and_its_status_hint(
    body: bytes, status: int, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = create_device_app(Table(), url_prefix="", max_body=1024).test_client()
    response = await client.post("/getModel", data=body)
    assert response.status_code == status
    assert await response.get_json() == {"error_message": message, "code": "1"}
    assert response.headers["Connection"] == "close"
    if status == 500:
        assert "RuntimeError: bug" in caplog.text  # a bug is logged with its traceback, never sent
    else:
        assert "Traceback" not in caplog.text


async def test_a_body_over_the_limit_is_a_413_in_the_json_shape() -> None:
    client = create_device_app(Table(), url_prefix="", max_body=16).test_client()
    response = await client.post("/startFLJob", data=b"x" * 17)
    assert response.status_code == 413
    body = await response.get_json()
    assert body["code"] == "1" and body["error_message"].startswith("413 ")
