"""One store file per node, next to config.json's recovery.storage_file_path (spec/recovery.md §2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flcluster.store import node_store_path


def test_each_node_gets_its_own_file_next_to_the_base() -> None:
    base = Path("/srv/job/recovery.json")
    assert node_store_path(base, "server", "0") == Path("/srv/job/recovery.server-0.sqlite")
    assert node_store_path(base, "server", "1") == Path("/srv/job/recovery.server-1.sqlite")
    assert node_store_path(base, "scheduler", "20") == Path("/srv/job/recovery.scheduler-20.sqlite")


def test_the_guides_base_at_config_json_never_names_config_json() -> None:
    config = Path("/srv/job/config.json")
    assert node_store_path(config, "server", "0") != config
    assert node_store_path(config, "server", "0").parent == config.parent


def test_a_node_id_cannot_leave_the_directory() -> None:
    path = node_store_path(Path("/srv/job/recovery.json"), "server", "../../etc/x")
    assert path.parent == Path("/srv/job")


def test_an_empty_node_id_is_refused() -> None:
    with pytest.raises(ValueError, match="node_id"):
        node_store_path("recovery.json", "server", "")
