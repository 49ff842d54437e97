"""Configuration: the FL context, its flags and environment, and ``config.json``.

Theory of operation
===================

flcluster is configured the way MindSpore Federated's cloud cluster is (``spec/configuration.md`` is the
authority; ``reference/mindspore-fl-behaviour.md`` §1 records the original):

- **The FL context** (:class:`FLContext`) holds every ``set_fl_context`` keyword of the original plus a few
  of flcluster's own (bind addresses, heartbeat timing, size limits, the aggregation device). It is a frozen
  attrs record: every field is converted and validated when the record is built, then cross-field rules run
  in ``__attrs_post_init__``. A bad value raises :class:`~flcluster.errors.ConfigError` naming the parameter,
  the value (``!r``) and what is allowed. Nothing is ever replaced silently: where the original logs a warning
  and substitutes a default (an unknown ``encrypt_type`` becomes ``DP_ENCRYPT``, an out-of-range ``dp_eps``
  becomes 50, ...), flcluster refuses.

  Values are converted by the field's annotated type before they are checked, because callers hand us text
  (flags, environment) and JSON numbers (the original's REST tool sends every number as a float):

  - ``int``: an ``int`` (never a ``bool``), or a float with an integral value (``8.0`` becomes ``8``);
  - ``float``: an ``int`` or a ``float``, converted to ``float``; it must be finite;
  - ``bool``: only ``True`` or ``False`` (``0``, ``1`` and ``"true"`` are refused here; flags parse text);
  - ``str``: only a ``str``.

- **Sources and precedence.** A node's context is built from three layers, later ones winning::

      FLContext defaults  <  MS_* environment variables  <  explicit keywords / command-line flags

  :func:`build_fl_context` does the whole merge and validates the result once;
  :func:`environment_kwargs`, :func:`apply_environment` and :func:`context_kwargs_from_args` are the pieces.
  "Explicit" means the caller named the key: a flag given on the command line (flags are added with
  ``default=argparse.SUPPRESS``, so an absent flag leaves no trace in the namespace) or a keyword passed to
  :func:`set_fl_context`. The module keeps the process-wide current context, as MindSpore does, behind
  :func:`set_fl_context` / :func:`get_fl_context` / :func:`reset_fl_context`, and remembers which keys were
  set explicitly (:func:`explicit_fl_context_keys`), so a runtime can apply the environment afterwards without
  overriding what the script chose.

- **config.json** (``config_file_path``) is a separate record, :class:`ClusterConfig`, loaded by
  :func:`load_cluster_config`. Unknown keys, bad JSON and wrong types are refused with the file and key named.
  Two misspellings from MindSpore's own guide and examples (``storge_type``, ``storge_file_path``) are read as
  the keys they meant, with a warning; the original silently disabled recovery with them. Legacy password keys
  are accepted and ignored with a warning. Relative paths are taken relative to the file's directory.

- **Node identity** (:func:`resolve_node_id`): ``MS_NODE_ID`` (via ``node_id``), else ``config.json``'s
  ``node_id``, else a random UUID, as the original.

This module does no I/O apart from reading ``config.json`` and logging; it starts no tasks.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import numbers
import os
import re
import threading
import uuid
from collections.abc import Callable, Mapping, Set
from fractions import Fraction
from typing import Any, Final, TypeVar, cast

import attrs

from flcluster.errors import ConfigError

__all__ = [
    "DOWNLOAD_COMPRESS_TYPES",
    "ENCRYPT_TYPES",
    "ENVIRONMENT_VARIABLES",
    "MS_ROLES",
    "SERVER_MODES",
    "UPLOAD_COMPRESS_TYPES",
    "ClusterConfig",
    "FLContext",
    "StorageConfig",
    "add_context_arguments",
    "apply_environment",
    "build_fl_context",
    "context_kwargs_from_args",
    "environment_kwargs",
    "explicit_fl_context_keys",
    "get_fl_context",
    "load_cluster_config",
    "reset_fl_context",
    "resolve_node_id",
    "set_fl_context",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]

SERVER_MODES: Final = ("FEDERATED_LEARNING", "HYBRID_TRAINING")
MS_ROLES: Final = ("MS_SERVER", "MS_WORKER", "MS_SCHED")
ENCRYPT_TYPES: Final = ("NOT_ENCRYPT", "DP_ENCRYPT", "PW_ENCRYPT", "STABLE_PW_ENCRYPT", "SIGNDS")
UPLOAD_COMPRESS_TYPES: Final = ("NO_COMPRESS", "DIFF_SPARSE_QUANT")
DOWNLOAD_COMPRESS_TYPES: Final = ("NO_COMPRESS", "QUANT")
# encrypt types with which the server cannot take sparse, quantised uploads (the original forces NO_COMPRESS).
_NO_UPLOAD_COMPRESSION: Final = frozenset({"PW_ENCRYPT", "STABLE_PW_ENCRYPT", "SIGNDS"})
_SECRET_FIELDS: Final = frozenset({"client_password", "server_password"})
_MAX_ID_CHARS: Final = 100
_MAX_PARTICIPATION_MINUTES: Final = 2880

# ------------------------------------------------------------------------------------------------------------
# Refusals and rules
# ------------------------------------------------------------------------------------------------------------


class _Refused(ConfigError):
    """A single value is refused; ``parameter`` and ``allowed`` let callers re-word the message."""

    parameter: str = ""
    allowed: str = ""


def _show(name: str, value: object) -> str:
    if name in _SECRET_FIELDS:
        return f"<hidden {type(value).__name__}>"
    return repr(value)


def _refused(name: str, value: object, allowed: str) -> _Refused:
    err = _Refused(f"{name}={_show(name, value)} is refused: expected {allowed}")
    err.parameter = name
    err.allowed = allowed
    return err


@attrs.frozen
class _Rule:
    """An attrs validator: ``accepts(value)`` must hold, otherwise ``allowed`` says what would have."""

    allowed: str
    accepts: Callable[[Any], bool]

    def __call__(self, instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not self.accepts(value):
            raise _refused(attribute.name, value, self.allowed)


def _bounds_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    assert hi is not None
    return f"{'<' if hi_open else '<='} {hi}"


def _within(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    noun: str = "a number",
) -> _Rule:
    """A range rule; written as ``not`` of the allowed region so NaN is always refused."""

    def accepts(value: float) -> bool:
        if lo is not None and not (value > lo if lo_open else value >= lo):
            return False
        return hi is None or (value < hi if hi_open else value <= hi)

    return _Rule(f"{noun} {_bounds_text(lo, hi, lo_open, hi_open)}", accepts)


_POSITIVE_INT: Final = _within(1, noun="an integer")
_NON_NEGATIVE_INT: Final = _within(0, noun="an integer")
_POSITIVE: Final = _within(0, lo_open=True)
_RATIO: Final = _within(0, 1, lo_open=True)
_PORT: Final = _within(1, 65535, noun="a port number")
_MILLISECONDS: Final = _within(1, noun="a duration in milliseconds, an integer")
_SECONDS: Final = _within(0, lo_open=True, noun="a duration in seconds, a number")


def _one_of(*choices: str) -> _Rule:
    return _Rule("one of " + ", ".join(repr(c) for c in choices), lambda v: v in choices)


def _max_chars(limit: int, *, non_empty: bool = False) -> _Rule:
    lo = 1 if non_empty else 0
    what = (
        f"a string of {lo} to {limit} characters" if non_empty else f"a string of at most {limit} characters"
    )
    return _Rule(what, lambda v: lo <= len(v) <= limit)


def _matches(pattern: str, allowed: str) -> _Rule:
    compiled = re.compile(pattern)
    return _Rule(allowed, lambda v: compiled.fullmatch(v) is not None)


_HOST: Final = _matches(
    r"[A-Za-z0-9._:%\[\]-]{1,253}",
    "a host name or IP address (letters, digits and . : - _ % [ ], 1 to 253 characters)",
)
_FL_NAME: Final = _Rule(
    "a name without '/', a backslash or NUL (it names checkpoint files)",
    lambda v: not any(c in v for c in "/\\\x00"),
)
_URL_PREFIX: Final = _matches(
    r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*",
    "'' or a URL path such as '/fl' or '/a/b' (leading '/', no trailing '/', no spaces, '?' or '#')",
)
_DEVICE: Final = _matches(r"cpu|cuda|cuda:[0-9]+", "'cpu', 'cuda' or 'cuda:N'")
_PARTICIPATION_RE: Final = re.compile(r"\s*([0-9]+)\s*,\s*([0-9]+)\s*")


def _participation_levels(text: str) -> tuple[int, int] | None:
    match = _PARTICIPATION_RE.fullmatch(text)
    if match is None:
        return None
    first, second = int(match.group(1)), int(match.group(2))
    if not 0 < first < second <= _MAX_PARTICIPATION_MINUTES:
        return None
    return first, second


_PARTICIPATION: Final = _Rule(
    f"'a,b' with integers 0 < a < b <= {_MAX_PARTICIPATION_MINUTES} (minutes)",
    lambda v: _participation_levels(v) is not None,
)

# ------------------------------------------------------------------------------------------------------------
# Conversion by annotated type
# ------------------------------------------------------------------------------------------------------------


def _to_int(name: str) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool):
            raise _refused(name, value, "an integer (not a bool)")
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _refused(name, value, "an integer (a float is accepted only with an integral value)")

    return convert


def _to_float(name: str) -> Callable[[object], float]:
    def convert(value: object) -> float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            result = float(value)
            if math.isfinite(result):
                return result
        raise _refused(name, value, "a finite number (int or float)")

    return convert


def _to_bool(name: str) -> Callable[[object], bool]:
    def convert(value: object) -> bool:
        if isinstance(value, bool):
            return value
        raise _refused(name, value, "a bool, True or False")

    return convert


def _to_str(name: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if isinstance(value, str):
            return value
        raise _refused(name, value, "a string")

    return convert


_CONVERTERS: Final[Mapping[str, Callable[[str], Callable[[object], Any]]]] = {
    "int": _to_int,
    "float": _to_float,
    "bool": _to_bool,
    "str": _to_str,
}


def _kind(attribute: attrs.Attribute[Any]) -> str:
    """``"int"``, ``"float"``, ``"bool"`` or ``"str"`` from the annotation (a string or a type)."""
    annotation = attribute.type
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    if kind not in _CONVERTERS:
        raise TypeError(f"FLContext field {attribute.name!r} has an unsupported type {annotation!r}")
    return kind


def _convert_by_type(cls: type, fields: list[attrs.Attribute[Any]]) -> list[attrs.Attribute[Any]]:
    """attrs field transformer: give every field the converter of its annotated type."""
    return [field.evolve(converter=_CONVERTERS[_kind(field)](field.name)) for field in fields]


def _field(default: _T, *rules: _Validator, doc: str, secret: bool = False) -> _T:
    validator = list(rules) if rules else None
    return attrs.field(default=default, validator=validator, repr=not secret, metadata={"doc": doc})


# ------------------------------------------------------------------------------------------------------------
# FLContext
# ------------------------------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True, field_transformer=_convert_by_type)
class FLContext:
    """Every ``set_fl_context`` keyword of the original, validated, plus flcluster's own settings.

    The fields, their defaults, allowed values and where they differ from MindSpore are listed in
    ``spec/configuration.md``; each field's one-line meaning is also in ``attrs.fields(FLContext).<name>
    .metadata["doc"]`` (shown by ``--help``). Build one with :meth:`from_kwargs` (untyped input, unknown keys
    refused) or the constructor; derive variants with :meth:`evolve`. Time windows of the original are integer
    milliseconds; flcluster's own timings are float seconds.

    Raises:
        ConfigError: from the constructor, :meth:`from_kwargs` and :meth:`evolve`, when a value has the wrong
            type or is out of range, or when two fields contradict each other.
    """

    # --- roles and cluster shape
    server_mode: str = _field(
        "FEDERATED_LEARNING",
        _one_of(*SERVER_MODES),
        doc="training mode: FEDERATED_LEARNING or HYBRID_TRAINING",
    )
    ms_role: str = _field(
        "MS_SERVER", _one_of(*MS_ROLES), doc="process role: MS_SERVER, MS_WORKER or MS_SCHED"
    )
    worker_num: int = _field(0, _NON_NEGATIVE_INT, doc="number of workers (0 for cross-device; 1 in hybrid)")
    server_num: int = _field(1, _POSITIVE_INT, doc="global number of Servers, the same on every process")
    scheduler_ip: str = _field(
        "0.0.0.0",
        _max_chars(_MAX_ID_CHARS, non_empty=True),
        _HOST,
        doc="address of the Scheduler (Servers connect to it; the Scheduler binds it)",
    )
    scheduler_port: int = _field(6667, _PORT, doc="Scheduler TCP port for cluster traffic")
    fl_server_port: int = _field(6668, _PORT, doc="device HTTP port of this Server")
    enable_fl_client: bool = _field(False, doc="cross-silo worker flag")
    # --- rounds and iterations
    start_fl_job_threshold: int = _field(
        1, _POSITIVE_INT, doc="accepted startFLJob requests that close the startFLJob round"
    )
    start_fl_job_time_window: int = _field(300000, _MILLISECONDS, doc="startFLJob round window (ms)")
    update_model_ratio: float = _field(
        1.0, _RATIO, doc="updateModel threshold = ceil(start_fl_job_threshold * ratio)"
    )
    update_model_time_window: int = _field(300000, _MILLISECONDS, doc="updateModel round window (ms)")
    share_secrets_ratio: float = _field(1.0, _RATIO, doc="shrinks the PW_ENCRYPT round thresholds")
    cipher_time_window: int = _field(300000, _MILLISECONDS, doc="window of each cipher round (ms)")
    reconstruct_secrets_threshold: int = _field(
        2000, _POSITIVE_INT, doc="Shamir threshold t; reconstructSecrets needs t+1 devices"
    )
    fl_name: str = _field("", _FL_NAME, doc="job name; also names checkpoints")
    fl_iteration_num: int = _field(20, _POSITIVE_INT, doc="iterations in the job, failed ones included")
    client_epoch_num: int = _field(25, _POSITIVE_INT, doc="epochs per iteration sent to devices (FLPlan)")
    client_batch_size: int = _field(32, _POSITIVE_INT, doc="mini-batch size sent to devices (FLPlan)")
    client_learning_rate: float = _field(0.001, _POSITIVE, doc="learning rate sent to devices (FLPlan)")
    # --- privacy
    encrypt_type: str = _field("NOT_ENCRYPT", _one_of(*ENCRYPT_TYPES), doc="privacy mechanism")
    dp_eps: float = _field(50.0, _POSITIVE, doc="DP_ENCRYPT epsilon")
    dp_delta: float = _field(0.01, _within(0, 1, lo_open=True, hi_open=True), doc="DP_ENCRYPT delta")
    dp_norm_clip: float = _field(1.0, _POSITIVE, doc="DP_ENCRYPT norm clip")
    sign_k: float = _field(0.01, _within(0, 0.25, lo_open=True), doc="SIGNDS top-k ratio")
    sign_eps: float = _field(100.0, _within(0, 100, lo_open=True), doc="SIGNDS privacy budget")
    sign_thr_ratio: float = _field(0.6, _within(0.5, 1), doc="SIGNDS threshold ratio")
    sign_global_lr: float = _field(1.0, _POSITIVE, doc="SIGNDS global learning rate")
    sign_dim_out: int = _field(0, _within(0, 50, noun="an integer"), doc="SIGNDS output dimension")
    root_first_ca_path: str = _field("", doc="first root CA for device certificates (pki_verify)")
    root_second_ca_path: str = _field("", doc="second root CA for device certificates (pki_verify)")
    equip_crl_path: str = _field("", doc="CRL of device certificates (pki_verify)")
    pki_verify: bool = _field(False, doc="verify device certificates, signatures and timestamps")
    replay_attack_time_diff: int = _field(
        600000, _MILLISECONDS, doc="allowed |server time - device timestamp| with pki_verify (ms)"
    )
    # --- TLS, management, files
    enable_ssl: bool = _field(False, doc="TLS on device HTTP and cluster TCP")
    client_password: str = _field("", doc="password of the client p12 file", secret=True)
    server_password: str = _field("", doc="password of the server p12 file", secret=True)
    scheduler_manage_port: int = _field(11202, _PORT, doc="Scheduler REST management port")
    config_file_path: str = _field("", doc="path of config.json")
    http_url_prefix: str = _field("", _URL_PREFIX, doc="device URL path = prefix + '/' + round name")
    global_iteration_time_window: int = _field(3600000, _MILLISECONDS, doc="whole-iteration window (ms)")
    upload_compress_type: str = _field(
        "NO_COMPRESS", _one_of(*UPLOAD_COMPRESS_TYPES), doc="compression of device uploads"
    )
    upload_sparse_rate: float = _field(0.4, _RATIO, doc="DIFF_SPARSE_QUANT sparsity; must match the devices'")
    download_compress_type: str = _field(
        "NO_COMPRESS", _one_of(*DOWNLOAD_COMPRESS_TYPES), doc="compression of models sent to devices"
    )
    checkpoint_dir: str = _field("", doc="directory of <fl_name>_iteration_<N>.ckpt checkpoints")
    instance_name: str = _field("", doc="instance name; empty means 'instance_<start time>'")
    participation_time_level: str = _field(
        "5,15", _PARTICIPATION, doc="two minute thresholds 'a,b' bucketing participation time in metrics"
    )
    continuous_failure_times: int = _field(
        10, _POSITIVE_INT, doc="failed iterations in a row that write a failure event"
    )
    worker_step_num_per_iteration: int = _field(65, _POSITIVE_INT, doc="hybrid worker steps per iteration")
    enable_fl: bool = _field(True, doc="federated-learning mode (accepted for compatibility)")
    # --- flcluster's own
    node_id: str = _field("", _max_chars(_MAX_ID_CHARS), doc="stable node id (MS_NODE_ID); empty: see spec")
    heartbeat_interval: float = _field(3.0, _SECONDS, doc="node -> Scheduler heartbeat period (s)")
    heartbeat_timeout: float = _field(30.0, _SECONDS, doc="silence after which a node is not alive (s)")
    cluster_available_timeout: float = _field(
        900.0, _SECONDS, doc="time allowed to build the cluster before CLUSTER_EXIT (s)"
    )
    connect_interval: float = _field(3.0, _SECONDS, doc="pause between reconnects to the Scheduler (s)")
    scheduler_manage_host: str = _field("127.0.0.1", _HOST, doc="bind address of the management port")
    fl_server_host: str = _field("0.0.0.0", _HOST, doc="bind address of the device HTTP port")
    aggregation_device: str = _field("cpu", _DEVICE, doc="torch device for aggregation: cpu, cuda or cuda:N")
    max_message_size: int = _field(
        100 * 1024 * 1024, _POSITIVE_INT, doc="largest cluster TCP frame or management body (bytes)"
    )
    max_device_body: int = _field(64 * 1024 * 1024, _POSITIVE_INT, doc="largest device HTTP body (bytes)")
    checkpoint_keep: int = _field(3, _POSITIVE_INT, doc="checkpoints kept on disk")

    def __attrs_post_init__(self) -> None:
        if self.upload_compress_type == "DIFF_SPARSE_QUANT" and self.encrypt_type in _NO_UPLOAD_COMPRESSION:
            raise ConfigError(
                f"upload_compress_type={self.upload_compress_type!r} cannot be combined with "
                f"encrypt_type={self.encrypt_type!r}: sparse quantised uploads are allowed only with "
                "encrypt_type 'NOT_ENCRYPT' or 'DP_ENCRYPT' (use upload_compress_type='NO_COMPRESS')"
            )
        if not self.heartbeat_interval < self.heartbeat_timeout:
            raise ConfigError(
                f"heartbeat_interval={self.heartbeat_interval!r} must be less than "
                f"heartbeat_timeout={self.heartbeat_timeout!r}"
            )
        if self.ms_role == "MS_WORKER" and self.worker_num < 1:
            raise ConfigError(
                f"ms_role={self.ms_role!r} needs worker_num >= 1, got worker_num={self.worker_num!r}"
            )
        if self.server_mode == "HYBRID_TRAINING" and self.worker_num != 1:
            raise ConfigError(
                f"server_mode={self.server_mode!r} needs worker_num == 1, got worker_num={self.worker_num!r}"
            )
        if self.pki_verify:
            for name in ("root_first_ca_path", "root_second_ca_path"):
                if not getattr(self, name):
                    raise ConfigError(
                        f"pki_verify={self.pki_verify!r} needs {name} (a root CA file), got {name}=''"
                    )
        if self.encrypt_type == "PW_ENCRYPT" and not (
            self.reconstruct_secrets_threshold < self.update_model_threshold
        ):
            raise ConfigError(
                f"encrypt_type='PW_ENCRYPT' needs reconstruct_secrets_threshold < update_model_threshold "
                f"(reconstructSecrets needs t+1 of the devices that uploaded), got "
                f"reconstruct_secrets_threshold={self.reconstruct_secrets_threshold!r} with "
                f"start_fl_job_threshold={self.start_fl_job_threshold!r} and "
                f"update_model_ratio={self.update_model_ratio!r} "
                f"(update_model_threshold={self.update_model_threshold})"
            )

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> FLContext:
        """Build a context from untyped keywords, as ``set_fl_context`` takes them.

        Args:
            **kwargs: any subset of :meth:`field_names`; the rest keep their defaults.

        Returns:
            The validated context.

        Raises:
            ConfigError: on an unknown keyword or a refused value.
        """
        _check_known(kwargs)
        ctx: FLContext = cast(Any, cls)(**kwargs)
        return ctx

    def evolve(self, **changes: object) -> FLContext:
        """Return a copy with ``changes`` applied, converted and validated as a whole.

        Raises:
            ConfigError: on an unknown keyword or a refused value.
        """
        _check_known(changes)
        evolved: FLContext = cast(Any, attrs.evolve)(self, **changes)
        return evolved

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Every field name, in declaration order."""
        return _FIELD_NAMES

    @property
    def update_model_threshold(self) -> int:
        """``ceil(start_fl_job_threshold * update_model_ratio)``, computed on the ratio's decimal value.

        The product is taken on the shortest decimal form of the ratio (as the user wrote it), so
        ``100 * 0.07`` is exactly 7, not ``ceil(7.000000000000001) == 8``.
        """
        return math.ceil(self.start_fl_job_threshold * Fraction(repr(self.update_model_ratio)))

    @property
    def iteration_time_window_ms(self) -> int:
        """``start_fl_job_time_window + update_model_time_window``: the basis of ``next_req_time`` (ms)."""
        return self.start_fl_job_time_window + self.update_model_time_window

    @property
    def participation_time_levels(self) -> tuple[int, int]:
        """``participation_time_level`` parsed: the two thresholds in minutes."""
        levels = _participation_levels(self.participation_time_level)
        assert levels is not None  # the validator guarantees it
        return levels


_FIELDS: Final[Mapping[str, attrs.Attribute[Any]]] = attrs.fields_dict(FLContext)
_FIELD_NAMES: Final = tuple(_FIELDS)


def _check_known(kwargs: Mapping[str, object]) -> None:
    for key in kwargs:
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, _FIELD_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"Set FL context keyword {key!r} is not recognized{hint}; known keywords: "
                + ", ".join(_FIELD_NAMES)
            )


def _check_field(name: str, value: object) -> object:
    """Convert and validate one FLContext value on its own (no cross-field rules)."""
    attribute = _FIELDS[name]
    assert attribute.converter is not None
    converted = cast(Callable[[object], object], attribute.converter)(value)
    if attribute.validator is not None:
        attribute.validator(None, attribute, converted)
    return converted


# ------------------------------------------------------------------------------------------------------------
# The process-wide context (MindSpore's set_fl_context)
# ------------------------------------------------------------------------------------------------------------

_lock = threading.Lock()
_current = FLContext()
_explicit: frozenset[str] = frozenset()


def set_fl_context(**kwargs: object) -> None:
    """Merge ``kwargs`` onto the current FL context, as MindSpore's ``set_fl_context``.

    The merged context is validated as a whole; on error the current context is left unchanged. The keys are
    remembered as explicitly set (see :func:`explicit_fl_context_keys`). The environment is not read here; the
    runtime applies it with :func:`apply_environment`, and explicit keys win.

    Raises:
        ConfigError: on an unknown keyword, a refused value or a broken cross-field rule.
    """
    global _current, _explicit
    with _lock:
        _current = _current.evolve(**kwargs)
        _explicit = _explicit | frozenset(kwargs)


def get_fl_context() -> FLContext:
    """Return the current FL context (defaults until :func:`set_fl_context` is called)."""
    with _lock:
        return _current


def explicit_fl_context_keys() -> frozenset[str]:
    """Return the keys given to :func:`set_fl_context` since the last reset."""
    with _lock:
        return _explicit


def reset_fl_context() -> None:
    """Restore the default FL context and forget the explicit keys (for tests)."""
    global _current, _explicit
    with _lock:
        _current = FLContext()
        _explicit = frozenset()


# ------------------------------------------------------------------------------------------------------------
# Command-line flags
# ------------------------------------------------------------------------------------------------------------

_INT_TEXT: Final = re.compile(r"[+-]?[0-9]+")
_TRUE_TEXT: Final = frozenset({"true", "1"})
_FALSE_TEXT: Final = frozenset({"false", "0"})


def _int_from_text(text: str) -> int:
    stripped = text.strip()
    if _INT_TEXT.fullmatch(stripped):
        return int(stripped)
    try:
        number = float(stripped)
    except ValueError:
        number = math.nan
    if math.isfinite(number) and number.is_integer():
        return int(number)
    raise ValueError(f"expected an integer, got {text!r}")


def _float_from_text(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {text!r}")
    return number


def _bool_from_text(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE_TEXT:
        return True
    if lowered in _FALSE_TEXT:
        return False
    raise ValueError(f"expected True, False, true, false, 1 or 0, got {text!r}")


_FROM_TEXT: Final[Mapping[str, Callable[[str], object]]] = {
    "int": _int_from_text,
    "float": _float_from_text,
    "bool": _bool_from_text,
    "str": str,
}


def _argparse_type(parse: Callable[[str], object], kind: str) -> Callable[[str], object]:
    def parse_flag(text: str) -> object:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    parse_flag.__name__ = kind
    return parse_flag


def add_context_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a ``--<key>`` flag for every FLContext field to ``parser``.

    Each flag parses its field's type (bools take ``True``/``False``/``true``/``false``/``1``/``0``, like the
    original's ``ast.literal_eval``; ints also take integral floats such as ``8.0``) and has
    ``default=argparse.SUPPRESS``, so only flags actually given appear in the namespace. Ranges are checked
    later, when the keywords reach :class:`FLContext`. ``parse_known_args`` works as usual, so scripts may
    keep their own extra flags (``--local_server_num``). Adding a flag the parser already has raises
    argparse's ``ArgumentError``.

    Args:
        parser: the parser (or subparser) to extend; the flags go into a "FL context" argument group.
    """
    group = parser.add_argument_group("FL context", "set_fl_context keywords; see spec/configuration.md")
    for name, attribute in _FIELDS.items():
        kind = _kind(attribute)
        default = "<hidden>" if name in _SECRET_FIELDS else repr(attribute.default)
        doc = str(attribute.metadata.get("doc", "")).replace("%", "%%")
        group.add_argument(
            f"--{name}",
            dest=name,
            type=_argparse_type(_FROM_TEXT[kind], kind),
            default=argparse.SUPPRESS,
            metavar=kind.upper(),
            help=f"{doc} (default: {default.replace('%', '%%')})",
        )


def context_kwargs_from_args(namespace: argparse.Namespace) -> dict[str, object]:
    """Return the FLContext keywords present in ``namespace``: exactly the flags that were given.

    Attributes that are not FLContext fields (a script's own flags) are left out.
    """
    given = vars(namespace)
    return {name: given[name] for name in _FIELD_NAMES if name in given}


# ------------------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------------------

ENVIRONMENT_VARIABLES: Final[Mapping[str, str]] = {
    "MS_ROLE": "ms_role",
    "MS_SERVER_NUM": "server_num",
    "MS_WORKER_NUM": "worker_num",
    "MS_SCHED_HOST": "scheduler_ip",
    "MS_SCHED_PORT": "scheduler_port",
    "MS_SCHED_MANAGE_PORT": "scheduler_manage_port",
    "MS_NODE_ID": "node_id",
}


def environment_kwargs(environ: Mapping[str, str]) -> dict[str, object]:
    """Read the ``MS_*`` variables of :data:`ENVIRONMENT_VARIABLES` into FLContext keywords.

    An unset or empty variable is skipped (an empty ``MS_NODE_ID`` means "no node id", as in the original).
    Each value is parsed and range-checked on its own; cross-field rules run when the keywords are applied.

    Args:
        environ: usually ``os.environ``.

    Returns:
        Keywords for :meth:`FLContext.from_kwargs` / :meth:`FLContext.evolve`.

    Raises:
        ConfigError: naming the variable, its value and what is allowed, when a value is malformed.
    """
    kwargs: dict[str, object] = {}
    for variable, name in ENVIRONMENT_VARIABLES.items():
        raw = environ.get(variable, "")
        if raw == "":
            continue
        kind = _kind(_FIELDS[name])
        try:
            kwargs[name] = _check_field(name, _FROM_TEXT[kind](raw))
        except ValueError as err:
            allowed = err.allowed if isinstance(err, _Refused) else f"text that parses as {kind}"
            raise ConfigError(
                f"environment variable {variable}={raw!r} is refused: it sets {name}, which expects {allowed}"
            ) from err
    return kwargs


def apply_environment(
    ctx: FLContext, environ: Mapping[str, str], *, explicit: Set[str] = frozenset()
) -> FLContext:
    """Return ``ctx`` with the ``MS_*`` environment applied, except for explicitly given keys.

    Precedence is defaults < environment < explicit: a key in ``explicit`` (a flag that was given, a keyword
    passed to :func:`set_fl_context`) keeps its value in ``ctx`` even when its variable is set. Pass
    ``explicit=frozenset(context_kwargs_from_args(ns))`` or :func:`explicit_fl_context_keys`. With no
    ``explicit`` set, the environment overrides everything it names.

    Args:
        ctx: the context to start from.
        environ: usually ``os.environ``.
        explicit: FLContext keys the caller set on purpose.

    Returns:
        The new, validated context.

    Raises:
        ConfigError: a malformed variable (named), an unknown key in ``explicit``, or a cross-field rule the
            combination breaks.
    """
    _check_known(dict.fromkeys(explicit))
    changes = {k: v for k, v in environment_kwargs(environ).items() if k not in explicit}
    return ctx.evolve(**changes) if changes else ctx


def build_fl_context(
    kwargs: Mapping[str, object] | None = None, environ: Mapping[str, str] | None = None
) -> FLContext:
    """Build a context from defaults, the environment, then explicit ``kwargs``, validated once.

    Validating the merged keywords once avoids refusing a half-applied state (``--ms_role=MS_WORKER`` with
    ``MS_WORKER_NUM=1`` in the environment is fine, though either alone would not be).

    Args:
        kwargs: explicit keywords (for example from :func:`context_kwargs_from_args`); they win.
        environ: the environment to read (usually ``os.environ``); ``None`` reads none.

    Raises:
        ConfigError: as :func:`environment_kwargs` and :meth:`FLContext.from_kwargs`.
    """
    merged = environment_kwargs(environ) if environ is not None else {}
    merged.update(kwargs or {})
    return FLContext.from_kwargs(**merged)


# ------------------------------------------------------------------------------------------------------------
# config.json
# ------------------------------------------------------------------------------------------------------------


def _strict_int(rule: _Rule) -> _Rule:
    """``rule`` on a real int (JSON integer): a bool or a float is refused."""
    return _Rule(rule.allowed, lambda v: isinstance(v, int) and not isinstance(v, bool) and rule.accepts(v))


def _strict_str(rule: _Rule | None = None) -> _Rule:
    """``rule`` (whose text must describe a string) on a real str; without ``rule``, any string."""
    if rule is None:
        return _Rule("a string", lambda v: isinstance(v, str))
    return _Rule(rule.allowed, lambda v: isinstance(v, str) and rule.accepts(v))


def _optional_storage(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, StorageConfig):
        raise _refused(attribute.name, value, "a storage object or None")


_FILE_STORAGE: Final = _Rule("the number 1 (file storage)", lambda v: v == 1)


@attrs.frozen(kw_only=True)
class StorageConfig:
    """A storage section of ``config.json`` (``recovery``, ``server_recovery``, ``metrics``, ...).

    Attributes:
        storage_type: must be 1 (file storage), the only type the original supports.
        storage_file_path: the file (or, for ``dataRate``, the directory); resolved against the directory of
            ``config.json`` by :func:`load_cluster_config`.
        scheduler_storage_file_path: the Scheduler's node table file (``recovery`` only; may be empty).
    """

    storage_type: int = attrs.field(validator=_strict_int(_FILE_STORAGE))
    storage_file_path: str = attrs.field(validator=_strict_str(_max_chars(4096, non_empty=True)))
    scheduler_storage_file_path: str = attrs.field(default="", validator=_strict_str())


@attrs.frozen(kw_only=True)
class ClusterConfig:
    """The contents of ``config.json`` (reference §1.3); every field is optional.

    Attributes:
        recovery: turns on disaster recovery (the recovery store lives at its ``storage_file_path``).
        server_recovery: where Servers persist the iteration number and instance state.
        metrics: per-iteration metrics file (JSON key ``metrics``).
        data_rate: traffic statistics directory (JSON key ``dataRate``).
        failure_event: failure-event file (JSON key ``failureEvent``).
        server_cert_path: server certificate (TLS).
        client_cert_path: client certificate for cluster TCP links (TLS).
        ca_cert_path: CA certificate (TLS).
        crl_path: certificate revocation list (TLS).
        cipher_list: OpenSSL cipher list; empty means flcluster's default list.
        cert_expire_warning_time_in_day: warn this many days before a certificate expires (7 to 180).
        cert_check_interval_in_hour: hours between certificate checks.
        connection_num: maximum cluster TCP connections.
        node_id: fallback node id when ``MS_NODE_ID`` is not set.
    """

    recovery: StorageConfig | None = attrs.field(default=None, validator=_optional_storage)
    server_recovery: StorageConfig | None = attrs.field(default=None, validator=_optional_storage)
    metrics: StorageConfig | None = attrs.field(default=None, validator=_optional_storage)
    data_rate: StorageConfig | None = attrs.field(default=None, validator=_optional_storage)
    failure_event: StorageConfig | None = attrs.field(default=None, validator=_optional_storage)
    server_cert_path: str = attrs.field(default="", validator=_strict_str())
    client_cert_path: str = attrs.field(default="", validator=_strict_str())
    ca_cert_path: str = attrs.field(default="", validator=_strict_str())
    crl_path: str = attrs.field(default="", validator=_strict_str())
    cipher_list: str = attrs.field(default="", validator=_strict_str())
    cert_expire_warning_time_in_day: int = attrs.field(
        default=90, validator=_strict_int(_within(7, 180, noun="an integer"))
    )
    cert_check_interval_in_hour: int = attrs.field(default=168, validator=_strict_int(_POSITIVE_INT))
    connection_num: int = attrs.field(default=10000, validator=_strict_int(_POSITIVE_INT))
    node_id: str = attrs.field(default="", validator=_strict_str(_max_chars(_MAX_ID_CHARS)))

    @property
    def recovery_enabled(self) -> bool:
        """Whether ``recovery`` is configured (disaster recovery on)."""
        return self.recovery is not None


_STORAGE_SECTIONS: Final[Mapping[str, str]] = {
    "recovery": "recovery",
    "server_recovery": "server_recovery",
    "metrics": "metrics",
    "dataRate": "data_rate",
    "failureEvent": "failure_event",
}
_PATH_KEYS: Final = ("server_cert_path", "client_cert_path", "ca_cert_path", "crl_path")
_PLAIN_KEYS: Final = (
    *_PATH_KEYS,
    "cipher_list",
    "cert_expire_warning_time_in_day",
    "cert_check_interval_in_hour",
    "connection_num",
    "node_id",
)
_LEGACY_KEYS: Final = frozenset({"server_password", "client_password", "Key_encrypt_decrypt_algorithm"})
_STORAGE_KEYS: Final = ("storage_type", "storage_file_path", "scheduler_storage_file_path")
_STORAGE_ALIASES: Final[Mapping[str, str]] = {
    "storge_type": "storage_type",
    "storge_file_path": "storage_file_path",
}


class _DuplicateKey(Exception):
    pass


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _resolve(base: str, path: object) -> object:
    if isinstance(path, str) and path and not os.path.isabs(path):
        return os.path.join(base, path)
    return path


def _json_type(value: object) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return "null" if value is None else repr(value)


def _storage_section(file: str, section: str, raw: object, base: str) -> StorageConfig:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file {file!r}: key {section!r} must be a JSON object, got {_json_type(raw)}"
        )
    values: dict[str, object] = {}
    for key, value in raw.items():
        name = _STORAGE_ALIASES.get(key, key)
        if name not in _STORAGE_KEYS:
            raise ConfigError(
                f"config file {file!r}: key '{section}.{key}' is not recognized; known keys: "
                + ", ".join(_STORAGE_KEYS)
            )
        if name != key:
            if name in raw:
                raise ConfigError(
                    f"config file {file!r}: both '{section}.{name}' and its misspelling "
                    f"'{section}.{key}' are given; keep only '{section}.{name}'"
                )
            logger.warning(
                "config file %r: key '%s.%s' is a misspelling of '%s.%s' (as in MindSpore's guide and "
                "examples); reading it as '%s'. MindSpore itself ignores it, which silently disables %s.",
                file,
                section,
                key,
                section,
                name,
                name,
                section,
            )
        values[name] = value
    for name in ("storage_type", "storage_file_path"):
        if name not in values:
            raise ConfigError(f"config file {file!r}: key '{section}.{name}' is required")
    for name in ("storage_file_path", "scheduler_storage_file_path"):
        if name in values:
            values[name] = _resolve(base, values[name])
    try:
        return StorageConfig(**cast(Any, values))
    except _Refused as err:
        raise ConfigError(
            f"config file {file!r}: key '{section}.{err.parameter}' is refused: expected {err.allowed}, "
            f"got {values[err.parameter]!r}"
        ) from err


def load_cluster_config(path: str | os.PathLike[str] | None) -> ClusterConfig:
    """Load ``config.json`` (``config_file_path``) into a :class:`ClusterConfig`.

    ``None`` or ``""`` gives all defaults (no recovery, no TLS files). Relative paths in the file are taken
    relative to the file's directory and returned as absolute paths. ``storge_type`` / ``storge_file_path``
    are read as ``storage_type`` / ``storage_file_path`` with a warning; ``server_password``,
    ``client_password`` and ``Key_encrypt_decrypt_algorithm`` are ignored with a warning; a numeric
    ``node_id`` (the MindSpore example writes ``"node_id": 1``) is taken as its decimal text.

    Args:
        path: the file, or ``None``/``""`` for none.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: naming the file, the key and the problem, when the file cannot be read, is not a JSON
            object, repeats a key, has an unknown key, or has a value of the wrong type or out of range.
    """
    if path is None or os.fspath(path) == "":
        return ClusterConfig()
    file = os.fspath(path)
    try:
        with open(file, encoding="utf-8") as stream:
            text = stream.read()
    except OSError as err:
        raise ConfigError(f"config file {file!r} cannot be read: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {file!r} is not UTF-8 text: {err}") from err
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"config file {file!r} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from err
    except _DuplicateKey as err:
        raise ConfigError(f"config file {file!r}: key {err.args[0]!r} is given more than once") from err
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {file!r}: the top level must be a JSON object, got {_json_type(data)}"
        )

    base = os.path.dirname(os.path.abspath(file))
    values: dict[str, object] = {}
    for key, value in data.items():
        if key in _STORAGE_SECTIONS:
            values[_STORAGE_SECTIONS[key]] = _storage_section(file, key, value, base)
        elif key in _LEGACY_KEYS:
            logger.warning(
                "config file %r: legacy key %r is ignored (passwords are set with set_fl_context "
                "server_password / client_password)",
                file,
                key,
            )
        elif key in _PLAIN_KEYS:
            if key == "node_id" and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            values[key] = _resolve(base, value) if key in _PATH_KEYS else value
        else:
            raise ConfigError(
                f"config file {file!r}: key {key!r} is not recognized; known keys: "
                + ", ".join([*_STORAGE_SECTIONS, *_PLAIN_KEYS])
            )
    try:
        config = ClusterConfig(**cast(Any, values))
    except _Refused as err:
        raise ConfigError(
            f"config file {file!r}: key {err.parameter!r} is refused: expected {err.allowed}, "
            f"got {data[err.parameter]!r}"
        ) from err
    if config.recovery is not None and os.path.abspath(config.recovery.storage_file_path) == os.path.abspath(
        file
    ):
        logger.warning(
            "config file %r: recovery.storage_file_path points at the config file itself (as in MindSpore's "
            "guide); the recovery store must keep its state elsewhere",
            file,
        )
    return config


# ------------------------------------------------------------------------------------------------------------
# Node identity
# ------------------------------------------------------------------------------------------------------------


def resolve_node_id(ctx: FLContext, cluster_config: ClusterConfig) -> str:
    """Return this node's id: ``ctx.node_id`` (``MS_NODE_ID`` or ``--node_id``), else ``config.json``'s
    ``node_id``, else a fresh random UUID (a node without a stable id cannot be recovered).
    """
    if ctx.node_id:
        return ctx.node_id
    if cluster_config.node_id:
        return cluster_config.node_id
    return str(uuid.uuid4())
