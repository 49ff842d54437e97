"""The last few models in memory, keyed by iteration, with the original getModel rule as a pure method.

Theory of operation (spec/aggregation.md, "Model store"): iteration 0 is the initial model; when iteration
``N`` ends the Server stores its model as ``N`` (the aggregate on success, a copy of the latest model on
failure), keeping only the newest ``keep`` (3 in the original). :meth:`ModelStore.lookup` answers a getModel
for ``requested`` while the cluster is in ``current``:

- ``requested == current`` and no model stored for ``current`` yet → ``None`` (answer ``SucNotReady``);
- a stored ``requested`` → that model;
- anything else → the latest stored model.

The store holds :class:`ModelWeights`, which are immutable, so a model handed out stays valid after it is
evicted.
"""

from __future__ import annotations

from flcluster.aggregation.model import ModelWeights


class ModelStore:
    """The newest ``keep`` models by iteration number (iteration 0 = the initial model)."""

    def __init__(self, keep: int = 3) -> None:
        """An empty store; call :meth:`reset` with the initial model before anything else.

        Raises:
            ValueError: ``keep`` is not an integer >= 1.
        """
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep={keep!r} is refused; the store must keep at least 1 model")
        self._keep = keep
        self._models: dict[int, ModelWeights] = {}

    @property
    def keep(self) -> int:
        """How many models are kept."""
        return self._keep

    def iterations(self) -> tuple[int, ...]:
        """The stored iteration numbers, oldest first."""
        return tuple(self._models)

    def reset(self, initial: ModelWeights) -> None:
        """Forget every model and store ``initial`` as iteration 0 (start of a job or a new instance)."""
        self._models = {0: initial}

    def restart_at(self, iteration: int, weights: ModelWeights) -> None:
        """Forget every model and hold ``weights`` as the model of ``iteration``.

        A Server that joins (or rejoins) the leader takes the leader's latest model this way.

        Raises:
            ValueError: ``iteration`` is not an integer >= 0.
        """
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
            raise ValueError(f"iteration {iteration!r} is refused; expected an integer >= 0")
        self._models = {iteration: weights}

    def replace_latest(self, weights: ModelWeights) -> None:
        """Hold ``weights`` as the model of the latest stored iteration, keeping the older ones.

        Raises:
            LookupError: the store is empty.
        """
        iteration, _ = self.latest()
        self._models[iteration] = weights

    def put(self, iteration: int, weights: ModelWeights) -> None:
        """Store the model of ``iteration``, evicting the oldest beyond ``keep``.

        Raises:
            ValueError: the store is empty, or ``iteration`` is not greater than the latest stored one
                (iteration numbers only grow; a new instance starts with :meth:`reset`).
        """
        latest, _ = self.latest()
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration <= latest:
            raise ValueError(
                f"iteration {iteration!r} is refused; expected an integer above the latest stored {latest}"
            )
        self._models[iteration] = weights
        while len(self._models) > self._keep:
            del self._models[next(iter(self._models))]

    def latest(self) -> tuple[int, ModelWeights]:
        """The newest stored ``(iteration, model)``.

        Raises:
            LookupError: the store is empty (:meth:`reset` was never called).
        """
        if not self._models:
            raise LookupError("the model store is empty; reset it with the initial model first")
        iteration = next(reversed(self._models))
        return iteration, self._models[iteration]

    def get(self, iteration: int) -> ModelWeights | None:
        """The model stored for exactly ``iteration``, or ``None``."""
        return self._models.get(iteration)

    def lookup(self, requested_iteration: int, current_iteration: int) -> ModelWeights | None:
        """What a getModel for ``requested_iteration`` gets while the cluster is in ``current_iteration``.

        Returns:
            ``None`` when ``requested_iteration == current_iteration`` and no model is stored for it yet
            (answer ``SucNotReady``: the device polls again); otherwise the stored model for
            ``requested_iteration`` if there is one, else the latest stored model.

        Raises:
            LookupError: the store is empty.
        """
        _, latest = self.latest()
        stored = self._models.get(requested_iteration)
        if stored is not None:
            return stored
        if requested_iteration == current_iteration:
            return None
        return latest
