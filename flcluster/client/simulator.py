"""A fleet of simulated devices in one trio process, pointed at a cluster's device ports.

Theory of operation
-------------------
:func:`simulate` builds ``num_devices`` :class:`~flcluster.client.device.Device` objects sharing one
:class:`httpx.AsyncClient` and runs ``iterations`` simulator iterations. In each, every device whose job has
not stopped runs :meth:`~flcluster.client.device.Device.run_iteration` concurrently (a progress bar counts
the devices done); then, in ``train`` mode, the newest global model is fetched with getModel and scored on
a held-out test set, and one line is printed: iteration, server iteration, accuracy, loss, devices
completed and elapsed time. The loop ends early once every device's job has stopped (for example when the
cluster has run its ``fl_iteration_num`` iterations and answers "disabled or finished").

A simulator iteration is not always one server iteration: devices turned away with OutOfTime sleep until
``next_req_time`` and take part in the following server iteration (at most one restart each, as the
original's client), so the summary records the newest server iteration a device completed in.

Modes:

- ``train``: the data set (scikit-learn's digits, MNIST from a folder of IDX files, or LEAF FEMNIST from a
  folder with ``train/`` and ``test/``) is split into a training part and a test part. Digits and MNIST are
  spread over the devices with the seeded Dirichlet partition (``dirichlet_alpha``; small = non-IID);
  FEMNIST gives device *i* the *i*-th writer's data, its natural non-IID split. Each device trains LeNet-5
  with :func:`~flcluster.client.training.train_local` on the model startFLJob sent, with the FLPlan's
  epochs, batch size and learning rate (unless overridden), and uploads
  :func:`~flcluster.client.training.premultiply`'s weights × data size. Training and evaluation run in
  worker threads behind one :class:`trio.CapacityLimiter` of ``train_concurrency`` slots, so at most that
  many train at once and the event loop stays responsive.
- ``synthetic``: no data and no training; each device uploads :func:`synthetic_update` values (seeded,
  uniform in [0, 1) × data size, as the original's simulator) with exactly the names and sizes of the model
  startFLJob sent (LeNet-5's when it sent none). For load tests.

Everything random (partition, split, shuffles, synthetic values, server choice with ``use_elb``, and the
DP noise and SignDS draws of a cluster with ``encrypt_type`` ``DP_ENCRYPT`` or ``SIGNDS``, spec/privacy.md)
derives from ``seed``, so a run can be repeated (and its noise is known to whoever knows the seed: a
simulator is a test tool); with ``use_elb`` off, device *i* talks to ``servers[i % len(servers)]``.

Nursery tree::

    simulate ─┬ one task per active device (per iteration): run_iteration
              │   └ training in worker threads, behind the limiter
              └ evaluation of the new global model (worker thread, behind the limiter)
"""

from __future__ import annotations

import functools
import logging
import math
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import attrs
import httpx
import numpy as np
import numpy.typing as npt
import torch
import trio

from flcluster.client.datasets import (
    Dataset,
    dirichlet_partition,
    load_digits_dataset,
    load_leaf_femnist,
    load_mnist_idx,
    train_test_split,
)
from flcluster.client.device import (
    Device,
    DeviceHTTPError,
    DevicePolicy,
    DeviceTransportError,
    IterationOutcome,
    IterationReport,
    MalformedAnswer,
    ModelUnavailable,
    TrainingTask,
    TrainResult,
)
from flcluster.client.lenet import lenet_shapes
from flcluster.client.training import evaluate, premultiply, train_local
from flcluster.errors import ConfigError
from flcluster.tls import https_client_context
from flcluster.verify.identity import DeviceIdentity

__all__ = [
    "IterationSummary",
    "SimulationReport",
    "SimulatorConfig",
    "default_servers",
    "lenet_sizes",
    "simulate",
    "synthetic_update",
]

log = logging.getLogger("flcluster.client")

FloatArray = npt.NDArray[np.float32]


def lenet_sizes(num_classes: int = 62, num_channels: int = 3) -> dict[str, int]:
    """Element count of every LeNet-5 tensor, in the original's order (66 404 in all for 62 classes).

    Args:
        num_classes: Size of the output layer.
        num_channels: Input channels.

    Returns:
        ``{name: number of float32 values}``.
    """
    return {name: math.prod(shape) for name, shape in lenet_shapes(num_classes, num_channels).items()}


def synthetic_update(
    sizes: Mapping[str, int], *, data_size: int, seed: int | Sequence[int]
) -> dict[str, FloatArray]:
    """A made-up upload: per tensor, uniform [0, 1) values times ``data_size`` (as the original's simulator).

    Args:
        sizes: Tensor name → number of values (e.g. :func:`lenet_sizes`), in upload order.
        data_size: The data size the device declared (the upload is premultiplied by it), >= 1.
        seed: Seed (an int or a sequence of ints, e.g. ``(seed, device, iteration)``); same seed, same values.

    Returns:
        Name → flat float32 array, in the order of ``sizes``.

    Raises:
        ConfigError: ``data_size`` < 1 or a negative size.
    """
    if isinstance(data_size, bool) or not isinstance(data_size, int) or data_size < 1:
        raise ConfigError(f"data_size must be an int >= 1, got {data_size!r}")
    rng = np.random.default_rng(seed)
    result: dict[str, FloatArray] = {}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ConfigError(f"the size of {name!r} must be an int >= 0, got {size!r}")
        result[name] = rng.random(size, dtype=np.float32) * np.float32(data_size)
    return result


# ----------------------------------------------------------------------------------------------------------
# Configuration and reports
# ----------------------------------------------------------------------------------------------------------


def _servers(value: Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _check_servers(
    instance: SimulatorConfig, attribute: attrs.Attribute[tuple[str, ...]], value: Any
) -> None:
    if not value or not all(isinstance(s, str) and s.startswith(("http://", "https://")) for s in value):
        raise ConfigError(f"SimulatorConfig.servers must be base URLs 'http[s]://host:port', got {value!r}")


def _positive_int(instance: Any, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"SimulatorConfig.{attribute.name} must be an int >= 1, got {value!r}")


def _optional_positive_int(instance: Any, attribute: Any, value: int | None) -> None:
    if value is not None:
        _positive_int(instance, attribute, value)


def _positive_float(instance: Any, attribute: attrs.Attribute[float], value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ConfigError(f"SimulatorConfig.{attribute.name} must be a finite number > 0, got {value!r}")


def _optional_positive_float(instance: Any, attribute: Any, value: float | None) -> None:
    if value is not None:
        _positive_float(instance, attribute, value)


def _mode(instance: Any, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in ("train", "synthetic"):
        raise ConfigError(f"SimulatorConfig.mode must be 'train' or 'synthetic', got {value!r}")


def _fraction(instance: Any, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value < 1.0:
        raise ConfigError(f"SimulatorConfig.{attribute.name} must be strictly between 0 and 1, got {value!r}")


def _prefix(instance: Any, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or (value and not value.startswith("/")):
        raise ConfigError(f"SimulatorConfig.url_prefix must be '' or start with '/', got {value!r}")


@attrs.frozen
class SimulatorConfig:
    """What to simulate.

    Attributes:
        servers: Base URLs of the Servers' device ports (``http://127.0.0.1:6668``, …).
        num_devices: Number of devices.
        mode: ``"train"`` (LeNet-5 on real data) or ``"synthetic"`` (made-up uploads, no training).
        iterations: Simulator iterations to run (fewer if every device's job stops first).
        data: ``"digits"`` (scikit-learn's, shipped), a folder of MNIST IDX files, or a LEAF FEMNIST folder
            (one with ``train/`` and ``test/`` sub-folders). ``train`` mode only.
        dirichlet_alpha: Concentration of the non-IID split of digits/MNIST (small = skewed).
        seed: Seed of everything random.
        use_elb: Every request goes to a random server (the original's ``useElb``).
        train_concurrency: Most devices training (or evaluating) at once, each in a worker thread.
        fl_name: ``fl_name`` of every request.
        url_prefix: The cluster's ``http_url_prefix``.
        fl_id_prefix: Device *i* is ``f"{fl_id_prefix}{i}"`` (the original's simulator: ``fl_lenet_<pid>``).
        test_fraction: Share of the digits held out for testing (MNIST and FEMNIST have their own test sets).
        min_device_samples: Least samples per device in the Dirichlet split.
        synthetic_data_size: Data size each device declares in ``synthetic`` mode (the original's: 32).
        epochs: Local epochs; ``None``: the FLPlan's.
        batch_size: Local batch size; ``None``: the FLPlan's.
        lr: Local learning rate; ``None``: the FLPlan's.
        policy: The devices' waiting and restart policy.
        http_timeout: Seconds one HTTP request may take (the original's client: 30).
        max_connections: Most HTTP connections open at once, over all devices (more requests queue; httpx's
            pool scans every connection per request, so a few dozen beat hundreds).
        torch_threads: torch's intra-op threads while simulating (``torch.set_num_threads``, process-wide,
            restored afterwards); 1 suits ``train_concurrency`` trainings on as many cores. ``None`` leaves
            torch's setting alone.
        progress: Show a progress bar and print one line per iteration (needs tqdm).
        ca_cert: CA bundle that checks the Servers' HTTPS certificates (``https://`` servers of a cluster
            with ``enable_ssl``); ``""``: the system's trusted CAs.
        client_cert: A client certificate the devices present (PKCS#12 or PEM with its key); ``""``: none.
        client_password: Opens ``client_cert``.
        identities: With ``pki_verify``: one :class:`~flcluster.verify.DeviceIdentity` per device, which
            signs its requests; device *i* is then ``identities[i].fl_id`` (``fl_id_prefix`` names only
            the evaluator). Empty: unsigned devices.
    """

    servers: tuple[str, ...] = attrs.field(converter=_servers, validator=_check_servers)
    num_devices: int = attrs.field(default=20, validator=_positive_int)
    mode: Literal["train", "synthetic"] = attrs.field(default="train", validator=_mode)
    iterations: int = attrs.field(default=10, validator=_positive_int)
    data: str = "digits"
    dirichlet_alpha: float = attrs.field(default=0.5, validator=_positive_float)
    seed: int = 0
    use_elb: bool = False
    train_concurrency: int = attrs.field(default=2, validator=_positive_int)
    fl_name: str = "Lenet"
    url_prefix: str = attrs.field(default="", validator=_prefix)
    fl_id_prefix: str = "fl_lenet_"
    test_fraction: float = attrs.field(default=0.2, validator=_fraction)
    min_device_samples: int = attrs.field(default=10, validator=_positive_int)
    synthetic_data_size: int = attrs.field(default=32, validator=_positive_int)
    epochs: int | None = attrs.field(default=None, validator=_optional_positive_int)
    batch_size: int | None = attrs.field(default=None, validator=_optional_positive_int)
    lr: float | None = attrs.field(default=None, validator=_optional_positive_float)
    policy: DevicePolicy = attrs.field(factory=DevicePolicy)
    http_timeout: float = attrs.field(default=30.0, validator=_positive_float)
    max_connections: int = attrs.field(default=32, validator=_positive_int)
    torch_threads: int | None = attrs.field(default=1, validator=_optional_positive_int)
    progress: bool = True
    ca_cert: str = ""
    client_cert: str = ""
    client_password: str = attrs.field(default="", repr=False)
    identities: tuple[DeviceIdentity, ...] = attrs.field(default=(), converter=tuple)

    def __attrs_post_init__(self) -> None:
        if self.identities and len(self.identities) != self.num_devices:
            raise ConfigError(
                f"identities must hold one identity per device: {len(self.identities)} given for "
                f"num_devices={self.num_devices}"
            )


@attrs.frozen
class IterationSummary:
    """One simulator iteration.

    Attributes:
        index: 1-based simulator iteration.
        server_iteration: Newest server iteration a device completed in (``None`` if none completed).
        completed: Devices that completed.
        failed: Devices whose iteration failed.
        stopped: Devices whose job stopped (in this iteration or before).
        accuracy: Test accuracy of the global model after the iteration (``None`` if not evaluated).
        loss: Test loss of that model (``None`` if not evaluated).
        train_loss: Mean training loss of the completed devices, weighted by data size.
        elapsed: Seconds the iteration took, evaluation included.
    """

    index: int
    server_iteration: int | None
    completed: int
    failed: int
    stopped: int
    accuracy: float | None
    loss: float | None
    train_loss: float | None
    elapsed: float


@attrs.frozen
class SimulationReport:
    """What :func:`simulate` did.

    Attributes:
        config: The configuration.
        iterations: One summary per simulator iteration run.
        device_reports: Per iteration, the report of every device that took part.
        elapsed: Seconds in all.
    """

    config: SimulatorConfig
    iterations: tuple[IterationSummary, ...]
    device_reports: tuple[tuple[IterationReport, ...], ...]
    elapsed: float

    @property
    def accuracies(self) -> list[float | None]:
        """Test accuracy after each iteration (``None`` where not evaluated)."""
        return [summary.accuracy for summary in self.iterations]


# ----------------------------------------------------------------------------------------------------------
# Data and trainers
# ----------------------------------------------------------------------------------------------------------


def _load_data(config: SimulatorConfig) -> tuple[list[Dataset], Dataset]:
    """Per-device training sets and the held-out test set (runs in a worker thread)."""
    if config.data == "digits":
        train, test = train_test_split(load_digits_dataset(), config.test_fraction, config.seed)
    else:
        folder = Path(config.data)
        if not folder.is_dir():
            raise ConfigError(
                f"SimulatorConfig.data must be 'digits' or a folder of MNIST IDX files or LEAF FEMNIST, got "
                f"{config.data!r}, which is not a directory"
            )
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            writers, writers_test = load_leaf_femnist(folder)
            if config.num_devices > len(writers):
                raise ConfigError(
                    f"SimulatorConfig.num_devices={config.num_devices!r} exceeds the {len(writers)!r} "
                    f"writers of the LEAF data in {config.data!r} (one writer per device)"
                )
            names = list(writers)[: config.num_devices]
            held_out = [
                writers_test[name] for name in names if name in writers_test and len(writers_test[name])
            ]
            if not held_out:
                raise ConfigError(
                    f"the LEAF data in {config.data!r} has no test samples for the chosen writers"
                )
            test = Dataset(x=torch.cat([d.x for d in held_out]), y=torch.cat([d.y for d in held_out]))
            return [writers[name] for name in names], test
        train, test = load_mnist_idx(folder)
    parts = dirichlet_partition(
        train.y, config.num_devices, config.dirichlet_alpha, config.seed, min_size=config.min_device_samples
    )
    return [train.subset(part) for part in parts], test


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _writable_tensors(model: Mapping[str, FloatArray]) -> dict[str, torch.Tensor]:
    # The views into the answer are read-only; torch warns about those, so copy (66 404 floats for LeNet).
    return {name: torch.from_numpy(np.array(array, dtype=np.float32)) for name, array in model.items()}


@attrs.frozen(eq=False)
class _LeNetTrainer:
    data: Dataset
    limiter: trio.CapacityLimiter
    seed: int
    device_index: int
    epochs: int | None
    batch_size: int | None
    lr: float | None

    async def __call__(self, task: TrainingTask) -> TrainResult:
        seed = _derived_seed(self.seed, self.device_index, task.iteration)
        train = functools.partial(
            train_local,
            _writable_tensors(task.model),
            self.data,
            epochs=task.plan.epochs if self.epochs is None else self.epochs,
            batch_size=task.plan.mini_batch if self.batch_size is None else self.batch_size,
            lr=task.plan.lr if self.lr is None else self.lr,
            seed=seed,
        )
        result = await trio.to_thread.run_sync(train, limiter=self.limiter)
        upload = premultiply(result.weights, task.data_size)
        # The weights before the multiplication, for DP_ENCRYPT and SIGNDS (spec/privacy.md).
        trained = {name: result.weights[name].reshape(-1).numpy() for name in upload}
        return TrainResult(feature_maps=upload, loss=result.loss, weights=trained)


@attrs.frozen(eq=False)
class _SyntheticTrainer:
    seed: int
    device_index: int

    async def __call__(self, task: TrainingTask) -> TrainResult:
        sizes = {name: int(array.size) for name, array in task.model.items()} or lenet_sizes()
        upload = synthetic_update(
            sizes, data_size=task.data_size, seed=(self.seed, self.device_index, task.iteration)
        )
        return TrainResult(feature_maps=upload, loss=0.0)


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


class _Bar(Protocol):
    def update(self, n: int = 1) -> Any: ...

    def close(self) -> None: ...


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _tqdm() -> Any:
    try:
        from tqdm import tqdm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "progress bars need tqdm; install flcluster[examples] or set SimulatorConfig.progress=False"
        ) from exc
    return tqdm


def _format(summary: IterationSummary, total: int, devices: int) -> str:
    server = "-" if summary.server_iteration is None else str(summary.server_iteration)
    accuracy = "n/a" if summary.accuracy is None else f"{summary.accuracy:.4f}"
    loss = "n/a" if summary.loss is None else f"{summary.loss:.4f}"
    return (
        f"iteration {summary.index}/{total}: server iteration {server}, accuracy {accuracy}, loss {loss}, "
        f"{summary.completed}/{devices} devices completed ({summary.failed} failed, {summary.stopped} "
        f"stopped), {summary.elapsed:.2f} s"
    )


async def _evaluate(
    evaluator: Device, iteration: int, test: Dataset, limiter: trio.CapacityLimiter
) -> tuple[float, float] | None:
    try:
        answer = await evaluator.fetch_model(iteration)
    except (ModelUnavailable, DeviceTransportError, DeviceHTTPError, MalformedAnswer) as exc:
        log.warning("simulator: could not fetch the model of iteration %d to evaluate it: %s", iteration, exc)
        return None
    weights = _writable_tensors({fm.name: fm.data for fm in answer.feature_maps})
    return await trio.to_thread.run_sync(functools.partial(evaluate, weights, test), limiter=limiter)


async def simulate(config: SimulatorConfig) -> SimulationReport:
    """Run a fleet of devices against a cluster; see the module docstring.

    Args:
        config: What to simulate.

    Returns:
        A summary per iteration (test accuracy and loss in ``train`` mode) and every device's reports.

    Raises:
        ConfigError: Bad data (missing files, too few samples for the devices, …) or a trainer refusing the
            FLPlan's hyper-parameters.
    """
    threads = torch.get_num_threads()
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    try:
        return await _simulate(config)
    finally:
        if config.torch_threads is not None:
            torch.set_num_threads(threads)


async def _simulate(config: SimulatorConfig) -> SimulationReport:
    started = trio.current_time()
    limiter = trio.CapacityLimiter(config.train_concurrency)
    tqdm = _tqdm() if config.progress else None
    test: Dataset | None = None
    if config.mode == "train":
        shards, test = await trio.to_thread.run_sync(_load_data, config)
        sizes = [len(shard) for shard in shards]
    else:
        sizes = [config.synthetic_data_size] * config.num_devices
    summaries: list[IterationSummary] = []
    all_reports: list[tuple[IterationReport, ...]] = []
    timeout = httpx.Timeout(config.http_timeout, pool=None)
    limits = httpx.Limits(
        max_connections=config.max_connections, max_keepalive_connections=config.max_connections
    )
    verify: ssl.SSLContext | bool = True
    if config.ca_cert or config.client_cert:
        verify = https_client_context(config.ca_cert, config.client_cert, config.client_password)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, verify=verify) as client:
        n = len(config.servers)

        def device(index: int, fl_id: str, identity: DeviceIdentity | None = None) -> Device:
            rotated = config.servers[index % n :] + config.servers[: index % n]
            return Device(
                fl_id if identity is None else identity.fl_id,
                rotated,
                fl_name=config.fl_name,
                client=client,
                url_prefix=config.url_prefix,
                use_elb=config.use_elb,
                seed=_derived_seed(config.seed, index, 0xE1B),
                policy=config.policy,
                identity=identity,
                noise_seed=_derived_seed(config.seed, index, 0xD9),
            )

        identities: Sequence[DeviceIdentity | None] = config.identities or [None] * config.num_devices
        devices = [device(i, f"{config.fl_id_prefix}{i}", identities[i]) for i in range(config.num_devices)]
        trainers: list[Any] = [
            _LeNetTrainer(shards[i], limiter, config.seed, i, config.epochs, config.batch_size, config.lr)
            if config.mode == "train"
            else _SyntheticTrainer(config.seed, i)
            for i in range(config.num_devices)
        ]
        evaluator = device(0, f"{config.fl_id_prefix}evaluator")
        for index in range(1, config.iterations + 1):
            active = [i for i, d in enumerate(devices) if d.stopped is None]
            if not active:
                log.info("simulator: every device's job has stopped; ending after %d iterations", index - 1)
                break
            begun = trio.current_time()
            reports: list[IterationReport] = []
            bar: _Bar = (
                tqdm(total=len(active), desc=f"iteration {index}", unit="device", leave=False)
                if tqdm is not None
                else _NoBar()
            )

            async def run_one(i: int, bar: _Bar, reports: list[IterationReport]) -> None:
                reports.append(await devices[i].run_iteration(trainers[i], data_size=sizes[i]))
                bar.update(1)

            try:
                async with trio.open_nursery() as nursery:
                    for i in active:
                        nursery.start_soon(run_one, i, bar, reports)
            finally:
                bar.close()
            reports.sort(key=lambda r: r.fl_id)
            completed = [r for r in reports if r.outcome is IterationOutcome.COMPLETED]
            newest = max((r.iteration for r in completed if r.iteration is not None), default=None)
            scores = None
            if test is not None and newest is not None:
                scores = await _evaluate(evaluator, newest, test, limiter)
            weight = sum(r.data_size for r in completed if r.loss is not None)
            train_loss = (
                sum(r.loss * r.data_size for r in completed if r.loss is not None) / weight
                if weight
                else None
            )
            summary = IterationSummary(
                index=index,
                server_iteration=newest,
                completed=len(completed),
                failed=sum(r.outcome is IterationOutcome.FAILED for r in reports),
                stopped=sum(d.stopped is not None for d in devices),
                accuracy=None if scores is None else scores[0],
                loss=None if scores is None else scores[1],
                train_loss=train_loss,
                elapsed=trio.current_time() - begun,
            )
            summaries.append(summary)
            all_reports.append(tuple(reports))
            line = _format(summary, config.iterations, len(devices))
            log.info("simulator: %s", line)
            if tqdm is not None:
                tqdm.write(line)
    return SimulationReport(
        config=config,
        iterations=tuple(summaries),
        device_reports=tuple(all_reports),
        elapsed=trio.current_time() - started,
    )


def default_servers(host: str, base_port: int, server_num: int, *, scheme: str = "http") -> tuple[str, ...]:
    """The device URLs of a cluster started with the guide's scripts: ``base_port + i`` for each Server.

    Args:
        host: The Servers' address.
        base_port: ``fl_server_port`` of Server 0.
        server_num: Number of Servers.
        scheme: ``"http"`` or ``"https"``.

    Returns:
        ``("http://host:base_port", …)``.
    """
    if server_num < 1:
        raise ConfigError(f"server_num must be >= 1, got {server_num!r}")
    host_part = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return tuple(f"{scheme}://{host_part}:{base_port + i}" for i in range(server_num))
