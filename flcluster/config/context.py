"""The FL context: :class:`FLContext`, its cross-field rules, and the process-wide current context.

Theory of operation
===================

:class:`FLContext` holds every ``set_fl_context`` keyword of the original plus a few of flcluster's own (bind
addresses, heartbeat timing, size limits, the aggregation device). It is a frozen attrs record: every field is
converted by its annotated type and checked by its rule (:mod:`flcluster.config.rules`) when the record is
built, then the cross-field rules run in ``__attrs_post_init__``. A bad value raises
:class:`~flcluster.errors.ConfigError` naming the parameter, the value (``!r``) and what is allowed. Nothing
is ever replaced silently: where the original logs a warning and substitutes a default (an unknown
``encrypt_type`` becomes ``DP_ENCRYPT``, an out-of-range ``dp_eps`` becomes 50, ...), flcluster refuses.

FLContext is the one source of truth: every role's settings record (:mod:`flcluster.settings`) is derived from
it, field by field, and has no defaults or rules of its own. FLContext represents every parameter of the
original, and their cross-field rules hold; a feature flcluster did not implement would be refused by
:func:`~flcluster.config.refuse_unimplemented` when a role starts (none is left).

The module keeps the process-wide current context, as MindSpore does, behind :func:`set_fl_context` /
:func:`get_fl_context` / :func:`reset_fl_context` (one lock), and remembers which keys were set explicitly
(:func:`explicit_fl_context_keys`), so a runtime can apply the environment afterwards
(:func:`~flcluster.config.apply_environment`) without overriding what the script chose.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Callable, Mapping
from typing import Any, Final, cast

import attrs

from flcluster.config import rules
from flcluster.core.iteration import update_model_threshold
from flcluster.errors import ConfigError

__all__ = [
    "DOWNLOAD_COMPRESS_TYPES",
    "ENCRYPT_TYPES",
    "FIELDS",
    "FIELD_NAMES",
    "MS_ROLES",
    "SERVER_MODES",
    "UPLOAD_COMPRESS_TYPES",
    "FLContext",
    "check_field",
    "check_known",
    "explicit_fl_context_keys",
    "get_fl_context",
    "reset_fl_context",
    "set_fl_context",
]

SERVER_MODES: Final = ("FEDERATED_LEARNING", "HYBRID_TRAINING")
MS_ROLES: Final = ("MS_SERVER", "MS_WORKER", "MS_SCHED")
ENCRYPT_TYPES: Final = ("NOT_ENCRYPT", "DP_ENCRYPT", "PW_ENCRYPT", "STABLE_PW_ENCRYPT", "SIGNDS")
UPLOAD_COMPRESS_TYPES: Final = ("NO_COMPRESS", "DIFF_SPARSE_QUANT")
DOWNLOAD_COMPRESS_TYPES: Final = ("NO_COMPRESS", "QUANT")
# encrypt types with which the server cannot take sparse, quantised uploads (the original forces NO_COMPRESS).
NO_UPLOAD_COMPRESSION: Final = frozenset({"PW_ENCRYPT", "STABLE_PW_ENCRYPT", "SIGNDS"})


@attrs.frozen(kw_only=True, field_transformer=rules.convert_by_type)
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
    server_mode: str = rules.field(
        "FEDERATED_LEARNING",
        rules.one_of(*SERVER_MODES),
        doc="training mode: FEDERATED_LEARNING or HYBRID_TRAINING",
    )
    ms_role: str = rules.field(
        "MS_SERVER", rules.one_of(*MS_ROLES), doc="process role: MS_SERVER, MS_WORKER or MS_SCHED"
    )
    worker_num: int = rules.field(
        0, rules.NON_NEGATIVE_INT, doc="number of workers (0 for cross-device; 1 in hybrid)"
    )
    server_num: int = rules.field(
        1, rules.POSITIVE_INT, doc="global number of Servers, the same on every process"
    )
    scheduler_ip: str = rules.field(
        "0.0.0.0",
        rules.max_chars(rules.MAX_ID_CHARS, non_empty=True),
        rules.HOST,
        doc="address of the Scheduler (Servers connect to it; the Scheduler binds it)",
    )
    scheduler_port: int = rules.field(6667, rules.PORT, doc="Scheduler TCP port for cluster traffic")
    fl_server_port: int = rules.field(6668, rules.PORT, doc="device HTTP port of this Server")
    enable_fl_client: bool = rules.field(False, doc="cross-silo worker flag")
    # --- rounds and iterations
    start_fl_job_threshold: int = rules.field(
        1, rules.UINT32_COUNT, doc="accepted startFLJob requests that close the startFLJob round"
    )
    start_fl_job_time_window: int = rules.field(
        300000, rules.UINT32_MILLISECONDS, doc="startFLJob round window (ms)"
    )
    update_model_ratio: float = rules.field(
        1.0, rules.RATIO, doc="updateModel threshold = ceil(start_fl_job_threshold * ratio)"
    )
    update_model_time_window: int = rules.field(
        300000, rules.UINT32_MILLISECONDS, doc="updateModel round window (ms)"
    )
    share_secrets_ratio: float = rules.field(1.0, rules.RATIO, doc="shrinks the PW_ENCRYPT round thresholds")
    cipher_time_window: int = rules.field(300000, rules.MILLISECONDS, doc="window of each cipher round (ms)")
    reconstruct_secrets_threshold: int = rules.field(
        2000, rules.POSITIVE_INT, doc="Shamir threshold t; reconstructSecrets needs t+1 devices"
    )
    fl_name: str = rules.field("", rules.FL_NAME, doc="job name; also names checkpoints")
    fl_iteration_num: int = rules.field(
        20, rules.UINT32_COUNT, doc="iterations in the job, failed ones included"
    )
    client_epoch_num: int = rules.field(
        25, rules.POSITIVE_INT, doc="epochs per iteration sent to devices (FLPlan)"
    )
    client_batch_size: int = rules.field(
        32, rules.POSITIVE_INT, doc="mini-batch size sent to devices (FLPlan)"
    )
    client_learning_rate: float = rules.field(
        0.001, rules.POSITIVE, doc="learning rate sent to devices (FLPlan)"
    )
    # --- privacy
    encrypt_type: str = rules.field("NOT_ENCRYPT", rules.one_of(*ENCRYPT_TYPES), doc="privacy mechanism")
    dp_eps: float = rules.field(50.0, rules.POSITIVE, doc="DP_ENCRYPT epsilon")
    dp_delta: float = rules.field(
        0.01, rules.within(0, 1, lo_open=True, hi_open=True), doc="DP_ENCRYPT delta"
    )
    dp_norm_clip: float = rules.field(1.0, rules.POSITIVE, doc="DP_ENCRYPT norm clip")
    sign_k: float = rules.field(0.01, rules.within(0, 0.25, lo_open=True), doc="SIGNDS top-k ratio")
    sign_eps: float = rules.field(100.0, rules.within(0, 100, lo_open=True), doc="SIGNDS privacy budget")
    sign_thr_ratio: float = rules.field(0.6, rules.within(0.5, 1), doc="SIGNDS threshold ratio")
    sign_global_lr: float = rules.field(1.0, rules.POSITIVE, doc="SIGNDS global learning rate")
    sign_dim_out: int = rules.field(0, rules.within(0, 50, noun="an integer"), doc="SIGNDS output dimension")
    root_first_ca_path: str = rules.field("", doc="first root CA for device certificates (pki_verify)")
    root_second_ca_path: str = rules.field("", doc="second root CA for device certificates (pki_verify)")
    equip_crl_path: str = rules.field("", doc="CRL of device certificates (pki_verify)")
    pki_verify: bool = rules.field(False, doc="verify device certificates, signatures and timestamps")
    replay_attack_time_diff: int = rules.field(
        600000, rules.MILLISECONDS, doc="allowed |server time - device timestamp| with pki_verify (ms)"
    )
    # --- TLS, management, files
    enable_ssl: bool = rules.field(False, doc="TLS on device HTTP and cluster TCP")
    client_password: str = rules.field("", doc="password of the client p12 file", secret=True)
    server_password: str = rules.field("", doc="password of the server p12 file", secret=True)
    scheduler_manage_port: int = rules.field(11202, rules.PORT, doc="Scheduler REST management port")
    config_file_path: str = rules.field("", doc="path of config.json")
    http_url_prefix: str = rules.field(
        "", rules.URL_PREFIX, doc="device URL path = prefix + '/' + round name"
    )
    global_iteration_time_window: int = rules.field(
        3600000, rules.UINT32_MILLISECONDS, doc="whole-iteration window (ms)"
    )
    upload_compress_type: str = rules.field(
        "NO_COMPRESS", rules.one_of(*UPLOAD_COMPRESS_TYPES), doc="compression of device uploads"
    )
    upload_sparse_rate: float = rules.field(
        0.4, rules.RATIO, doc="DIFF_SPARSE_QUANT sparsity; must match the devices'"
    )
    download_compress_type: str = rules.field(
        "NO_COMPRESS", rules.one_of(*DOWNLOAD_COMPRESS_TYPES), doc="compression of models sent to devices"
    )
    checkpoint_dir: str = rules.field("", doc="directory of <fl_name>_iteration_<N>.ckpt checkpoints")
    instance_name: str = rules.field("", doc="instance name; empty means 'instance_<start time>'")
    participation_time_level: str = rules.field(
        "5,15", rules.PARTICIPATION, doc="two minute thresholds 'a,b' bucketing participation time in metrics"
    )
    continuous_failure_times: int = rules.field(
        10, rules.POSITIVE_INT, doc="failed iterations in a row that write a failure event"
    )
    worker_step_num_per_iteration: int = rules.field(
        65, rules.POSITIVE_INT, doc="hybrid worker steps per iteration"
    )
    enable_fl: bool = rules.field(True, doc="federated-learning mode (accepted for compatibility)")
    # --- flcluster's own
    node_id: str = rules.field(
        "", rules.max_chars(rules.MAX_ID_CHARS), doc="stable node id (MS_NODE_ID); empty: see spec"
    )
    heartbeat_interval: float = rules.field(3.0, rules.SECONDS, doc="node -> Scheduler heartbeat period (s)")
    heartbeat_timeout: float = rules.field(
        30.0, rules.SECONDS, doc="silence after which a node is not alive (s)"
    )
    cluster_available_timeout: float = rules.field(
        900.0, rules.SECONDS, doc="time allowed to build the cluster before CLUSTER_EXIT (s)"
    )
    connect_interval: float = rules.field(
        3.0, rules.SECONDS, doc="pause between reconnects to the Scheduler (s)"
    )
    scheduler_manage_host: str = rules.field(
        "127.0.0.1", rules.HOST, doc="bind address of the management port"
    )
    fl_server_host: str = rules.field("0.0.0.0", rules.HOST, doc="bind address of the device HTTP port")
    aggregation_device: str = rules.field(
        "cpu", rules.DEVICE, doc="torch device for aggregation: cpu, cuda or cuda:N"
    )
    max_message_size: int = rules.field(
        100 * 1024 * 1024, rules.POSITIVE_INT, doc="largest cluster TCP frame or management body (bytes)"
    )
    max_device_body: int = rules.field(
        64 * 1024 * 1024, rules.POSITIVE_INT, doc="largest device HTTP body (bytes)"
    )
    checkpoint_keep: int = rules.field(3, rules.POSITIVE_INT, doc="checkpoints kept on disk")
    model_keep: int = rules.field(3, rules.POSITIVE_INT, doc="models kept in memory for getModel")
    min_retry_delay_ms: int = rules.field(
        1000,
        rules.within(1, 3_600_000, noun="a duration in milliseconds, an integer"),
        doc="least delay, after now, that any next_req_time names (ms)",
    )
    advertise_host: str = rules.field(
        "",
        rules.optional(rules.HOST),
        doc="address peers reach this Server at; empty: its first usable address towards the Scheduler",
    )
    finish_timeout: float = rules.field(
        10.0, rules.SECONDS, doc="time a graceful finish waits for the Servers before giving up on them (s)"
    )
    scaling_timeout: float = rules.field(
        300.0, rules.SECONDS, doc="time a scaling may take before it rolls back (s)"
    )

    def __attrs_post_init__(self) -> None:
        if self.upload_compress_type == "DIFF_SPARSE_QUANT" and self.encrypt_type in NO_UPLOAD_COMPRESSION:
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
        check_known(kwargs)
        ctx: FLContext = cast(Any, cls)(**kwargs)
        return ctx

    def evolve(self, **changes: object) -> FLContext:
        """Return a copy with ``changes`` applied, converted and validated as a whole.

        Raises:
            ConfigError: on an unknown keyword or a refused value.
        """
        check_known(changes)
        evolved: FLContext = cast(Any, attrs.evolve)(self, **changes)
        return evolved

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Every field name, in declaration order."""
        return FIELD_NAMES

    @property
    def update_model_threshold(self) -> int:
        """``ceil(start_fl_job_threshold * update_model_ratio)``, computed on the ratio's decimal value.

        The product is taken on the shortest decimal form of the ratio (as the user wrote it), so
        ``100 * 0.07`` is exactly 7, not ``ceil(7.000000000000001) == 8``.
        """
        return update_model_threshold(self.start_fl_job_threshold, self.update_model_ratio)

    @property
    def iteration_time_window_ms(self) -> int:
        """``start_fl_job_time_window + update_model_time_window``: the basis of ``next_req_time`` (ms)."""
        return self.start_fl_job_time_window + self.update_model_time_window

    @property
    def participation_time_levels(self) -> tuple[int, int]:
        """``participation_time_level`` parsed: the two thresholds in minutes."""
        levels = rules.participation_levels(self.participation_time_level)
        assert levels is not None  # the validator guarantees it
        return levels


FIELDS: Final[Mapping[str, attrs.Attribute[Any]]] = attrs.fields_dict(FLContext)
FIELD_NAMES: Final = tuple(FIELDS)


def check_known(kwargs: Mapping[str, object]) -> None:
    """Refuse any key that is not an FLContext field, suggesting the closest one."""
    for key in kwargs:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"Set FL context keyword {key!r} is not recognized{hint}; known keywords: "
                + ", ".join(FIELD_NAMES)
            )


def check_field(name: str, value: object) -> object:
    """Convert and validate one FLContext value on its own (no cross-field rules)."""
    attribute = FIELDS[name]
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
