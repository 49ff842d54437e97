"""``flcluster scale`` / ``instance``: the requests computed from ``/nodes`` and the command line."""

from __future__ import annotations

import pytest

from flcluster import cli
from flcluster.errors import ConfigError
from flcluster.manage_tool import instance_body, refusal_line, scale_next_step, scale_request

NODES = {
    "code": "0",
    "message": "Get nodes info successful.",
    "nodeIds": [
        {"alive": "true", "nodeId": "3", "rankId": "3", "role": "SERVER"},
        {"alive": "true", "nodeId": "0", "rankId": "0", "role": "SERVER"},
        {"alive": "true", "nodeId": "2", "rankId": "2", "role": "SERVER"},
        {"alive": "true", "nodeId": "1", "rankId": "1", "role": "SERVER"},
        {"alive": "true", "nodeId": "20", "rankId": "0", "role": "SCHEDULER"},
    ],
}


def test_scale_computes_scaleout_or_scalein_against_the_nodes() -> None:
    assert scale_request(NODES, 6) == ("/scaleout", {"worker_num": 0, "server_num": 2})
    # The highest ranks go, as the guide's example (ranks 2 and 3); rank 0 never.
    assert scale_request(NODES, 2) == ("/scalein", {"node_ids": ["2", "3"]})
    assert scale_request(NODES, 1) == ("/scalein", {"node_ids": ["1", "2", "3"]})
    assert scale_request(NODES, 4) is None


@pytest.mark.parametrize("servers", [0, -1])
def test_scale_to_no_server_is_refused(servers: int) -> None:
    with pytest.raises(ConfigError, match="at least 1 Server"):
        scale_request(NODES, servers)


def test_scale_refuses_an_answer_that_is_not_a_node_list() -> None:
    with pytest.raises(ConfigError, match="did not answer a node list"):
        scale_request({"code": "1", "error_message": "x"}, 3)


def test_instance_new_takes_key_number_pairs() -> None:
    assert instance_body(["fl_iteration_num=20", "client_learning_rate=0.01"]) == {
        "fl_iteration_num": 20,
        "client_learning_rate": 0.01,
    }
    for bad in (["fl_iteration_num"], ["fl_iteration_num=x"], ["=3"], ["a=true"]):
        with pytest.raises(ConfigError, match="key=number"):
            instance_body(bad)


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_instance_new_refuses_a_number_that_is_not_finite(text: str) -> None:
    # json.loads reads these, and json.dumps would send them as no JSON at all.
    with pytest.raises(ConfigError, match="finite numbers"):
        instance_body([f"client_learning_rate={text}"])


def test_a_refusal_says_why_the_scheduler_or_the_leader_refused() -> None:
    # /newInstance refused by the leader: HTTP 200, "code": "1", the reason is the leader's.
    answer = {
        "code": "1",
        "error_message": "Start new instance failed.",
        "result": False,
        "reason": "This is just the first iteration, do not need to new instance.",
    }
    assert refusal_line("/newInstance", 200, answer) == (
        "flcluster: /newInstance was refused (HTTP 200): Start new instance failed. "
        "This is just the first iteration, do not need to new instance."
    )
    assert refusal_line("/scaleout", 400, {"error_message": "The cluster is not ready.", "code": "1"}) == (
        "flcluster: /scaleout was refused (HTTP 400): The cluster is not ready."
    )
    assert refusal_line("/scalein", 502, ["x"]) == 'flcluster: /scalein answered HTTP 502 with ["x"]'


def test_scale_tells_the_operator_what_to_do_next() -> None:
    out = scale_next_step("/scaleout", {"worker_num": 0, "server_num": 2}, 6)
    assert "waits for 2 new Servers" in out
    assert "--node_id=scale_node --server_num=6 --local_server_num=2" in out
    out = scale_next_step("/scalein", {"node_ids": ["2", "3"]}, 2)
    assert "Servers 2, 3 leave the cluster" in out
    assert "SIGTERM (kill -15 <pid>)" in out


@pytest.mark.parametrize("servers", ["0", "-1"])
def test_flcluster_scale_below_one_is_refused_before_the_scheduler_is_asked(
    servers: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Port 1 answers nothing: the refusal must come before any request.
    assert cli.main(["scale", "--servers", servers, "--scheduler_manage_port", "1"]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"flcluster: --servers={servers}: a cluster needs at least 1 Server\n"
    assert captured.out == ""
