"""Which models a Server keeps for getModel when the leader's models reach it (RoundService.install_model)."""

from __future__ import annotations

import torch

from flcluster.aggregation import ModelWeights
from flcluster.runtime.rounds import LeaderLine, RoundService
from tests.helpers import lenet_job


def rounds() -> RoundService:
    job = lenet_job(threshold=1, iterations=10)
    return RoundService(
        spec=job.spec, initial=job.initial, plan=job.plan, device=job.device, line=LeaderLine(), keep=10
    )


def model(service: RoundService, value: float) -> ModelWeights:
    return ModelWeights(
        [
            (name, torch.full((size,), value))
            for name, size in zip(service.spec.names, service.spec.sizes, strict=True)
        ]
    )


def held(service: RoundService) -> dict[int, float]:
    out = {}
    for i in range(11):
        weights = service.store.get(i)
        if weights is not None:
            out[i] = float(weights[service.spec.names[0]][0])
    return out


def test_a_fresh_followers_own_initial_model_is_replaced_by_the_leaders() -> None:
    service = rounds()
    service.install_model(3, model(service, 3.0), from_leader=True)
    assert held(service) == {3: 3.0}  # its own model 0 was never the cluster's


def test_a_resync_at_the_latest_iteration_keeps_the_history() -> None:
    service = rounds()
    service.install_model(0, model(service, 0.0), from_leader=True)
    service.install_model(1, model(service, 1.0), from_leader=True)
    service.install_model(2, model(service, 2.0), from_leader=True)
    service.install_model(2, model(service, 2.5), from_leader=True)  # re-sync after a reconnect
    assert held(service) == {0: 0.0, 1: 1.0, 2: 2.5}


def test_a_leader_behind_this_server_starts_it_over() -> None:
    service = rounds()
    service.install_model(0, model(service, 0.0), from_leader=True)
    service.install_model(1, model(service, 1.0), from_leader=True)
    service.install_model(2, model(service, 2.0), from_leader=True)
    service.install_model(1, model(service, 1.5), from_leader=True)
    assert held(service) == {1: 1.5}


def test_the_leaders_own_models_add_to_its_initial_model() -> None:
    service = rounds()
    service.install_model(1, model(service, 1.0))
    assert set(held(service)) == {0, 1}
