"""``flcluster scale`` / ``instance``: the requests computed from ``/nodes`` and the command line."""

from __future__ import annotations

import pytest

from flcluster.errors import ConfigError
from flcluster.manage_tool import instance_body, scale_request

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
