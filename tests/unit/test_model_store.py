"""ModelStore: the last models by iteration and the original getModel rule.

See spec/aggregation.md, "Model store".
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flcluster.aggregation import ModelSpec, ModelStore, ModelWeights

SPEC = ModelSpec([("w", (2,)), ("b", (1,))])


def model(value: float) -> ModelWeights:
    return ModelWeights({"w": torch.full((2,), value), "b": torch.full((1,), value)})


def test_initial_model_is_iteration_zero() -> None:
    store = ModelStore()
    initial = model(0.0)
    store.reset(initial)
    assert store.iterations() == (0,)
    assert store.latest() == (0, initial)
    # startFLJob of iteration 1 serves the model of iteration 0.
    assert store.lookup(0, 1) is initial


def test_requesting_the_current_iteration_before_its_model_is_not_ready() -> None:
    store = ModelStore()
    store.reset(model(0.0))
    assert store.lookup(1, 1) is None
    m1 = model(1.0)
    store.put(1, m1)
    # While the cluster is still in iteration 1 (the model was just stored), it is served.
    assert store.lookup(1, 1) is m1
    # After the iteration ends, cur = req + 1 and the device gets the aggregate of its iteration.
    assert store.lookup(1, 2) is m1
    assert store.lookup(2, 2) is None


def test_an_iteration_not_stored_gets_the_latest() -> None:
    store = ModelStore(keep=3)
    store.reset(model(0.0))
    for i in range(1, 6):
        store.put(i, model(float(i)))
    assert store.iterations() == (3, 4, 5)
    latest = store.latest()[1]
    assert store.lookup(1, 6) is latest  # evicted
    assert store.lookup(0, 6) is latest  # evicted initial model
    assert store.lookup(17, 6) is latest  # the future
    assert store.lookup(4, 6) is store.get(4)
    assert store.lookup(6, 6) is None


def test_a_failed_iteration_stores_a_copy_of_the_latest() -> None:
    store = ModelStore()
    store.reset(model(0.0))
    store.put(1, model(1.0))
    _, latest = store.latest()
    store.put(2, latest)  # iteration 2 failed: the global model is unchanged
    assert store.lookup(2, 3) is latest


def test_reset_forgets_everything() -> None:
    store = ModelStore()
    store.reset(model(0.0))
    store.put(1, model(1.0))
    fresh = model(9.0)
    store.reset(fresh)
    assert store.iterations() == (0,)
    assert store.lookup(1, 2) is fresh


def test_refusals() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ModelStore(keep=0)
    store = ModelStore()
    with pytest.raises(LookupError, match="empty"):
        store.lookup(1, 1)
    with pytest.raises(LookupError):
        store.put(1, model(1.0))
    store.reset(model(0.0))
    store.put(2, model(2.0))
    with pytest.raises(ValueError, match="above the latest"):
        store.put(2, model(2.5))
    with pytest.raises(ValueError, match="above the latest"):
        store.put(1, model(1.0))


@settings(max_examples=200, deadline=None)
@given(
    keep=st.integers(1, 4),
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("put"), st.integers(1, 3)),
            st.tuples(st.just("lookup"), st.integers(-1, 3)),
        ),
        max_size=30,
    ),
)
def test_store_invariants_after_every_step(keep: int, steps: list[tuple[str, int]]) -> None:
    store = ModelStore(keep=keep)
    store.reset(model(0.0))
    every: dict[int, ModelWeights] = {0: store.latest()[1]}
    current = 1
    for action, value in steps:
        if action == "put":
            # The iteration ends (maybe skipping numbers, as after a recovery) and its model is stored.
            current += value - 1
            weights = model(float(current))
            store.put(current, weights)
            every[current] = weights
            current += 1
        else:
            requested = current + value if value != 3 else 0
            got = store.lookup(requested, current)
            _, latest = store.latest()
            if requested in store.iterations():
                assert got is every[requested]
            elif requested == current:
                assert got is None
            else:
                assert got is latest
        stored = store.iterations()
        assert len(stored) <= keep
        assert list(stored) == sorted(stored)
        assert stored == tuple(sorted(every)[-keep:])
        assert store.latest()[0] == max(every)
