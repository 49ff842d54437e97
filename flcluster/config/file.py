"""``config.json`` (``config_file_path``): :class:`ClusterConfig` and :func:`load_cluster_config`.

Theory of operation
===================

``config.json`` is a separate record from the FL context, :class:`ClusterConfig`, loaded by
:func:`load_cluster_config` (``spec/configuration.md`` §6). Unknown keys, bad JSON and wrong types are refused
with the file and key named; JSON values are checked strictly (``"1"`` or ``true`` is not an integer). Two
misspellings from MindSpore's own guide and examples (``storge_type``, ``storge_file_path``) are read as the
keys they meant, with a warning; the original silently disabled recovery with them. Legacy password keys are
accepted and ignored with a warning. Relative paths are taken relative to the file's directory.

Reading the file is this module's only I/O.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any, Final, cast

import attrs

from flcluster.config import rules
from flcluster.errors import ConfigError

__all__ = ["ClusterConfig", "StorageConfig", "load_cluster_config"]

logger = logging.getLogger(__name__)


def _optional_storage(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, StorageConfig):
        raise rules.refused(attribute.name, value, "a storage object or None")


@attrs.frozen(kw_only=True)
class StorageConfig:
    """A storage section of ``config.json`` (``recovery``, ``server_recovery``, ``metrics``, ...).

    Attributes:
        storage_type: must be 1 (file storage), the only type the original supports.
        storage_file_path: the file (or, for ``dataRate``, the directory); resolved against the directory of
            ``config.json`` by :func:`load_cluster_config`.
        scheduler_storage_file_path: the Scheduler's node table file (``recovery`` only; may be empty).
    """

    storage_type: int = attrs.field(validator=rules.strict_int(rules.FILE_STORAGE))
    storage_file_path: str = attrs.field(validator=rules.strict_str(rules.max_chars(4096, non_empty=True)))
    scheduler_storage_file_path: str = attrs.field(default="", validator=rules.strict_str())


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
        manage_token: the management port's access token (spec/management-api.md); empty: none. Never shown.
    """

    recovery: StorageConfig | None = attrs.field(default=None, validator=_optional_storage)
    server_recovery: StorageConfig | None = attrs.field(default=None, validator=_optional_storage)
    metrics: StorageConfig | None = attrs.field(default=None, validator=_optional_storage)
    data_rate: StorageConfig | None = attrs.field(default=None, validator=_optional_storage)
    failure_event: StorageConfig | None = attrs.field(default=None, validator=_optional_storage)
    server_cert_path: str = attrs.field(default="", validator=rules.strict_str())
    client_cert_path: str = attrs.field(default="", validator=rules.strict_str())
    ca_cert_path: str = attrs.field(default="", validator=rules.strict_str())
    crl_path: str = attrs.field(default="", validator=rules.strict_str())
    cipher_list: str = attrs.field(default="", validator=rules.strict_str())
    cert_expire_warning_time_in_day: int = attrs.field(
        default=90, validator=rules.strict_int(rules.within(7, 180, noun="an integer"))
    )
    cert_check_interval_in_hour: int = attrs.field(
        default=168, validator=rules.strict_int(rules.POSITIVE_INT)
    )
    connection_num: int = attrs.field(default=10000, validator=rules.strict_int(rules.POSITIVE_INT))
    node_id: str = attrs.field(default="", validator=rules.strict_str(rules.max_chars(rules.MAX_ID_CHARS)))
    manage_token: str = attrs.field(default="", repr=False, validator=rules.strict_str(rules.MANAGE_TOKEN))

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
    "manage_token",
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
    except rules.Refused as err:
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
    except rules.Refused as err:
        value = data[err.parameter]
        shown = f"<hidden {type(value).__name__}>" if err.parameter in rules.SECRET_FIELDS else repr(value)
        raise ConfigError(
            f"config file {file!r}: key {err.parameter!r} is refused: expected {err.allowed}, got {shown}"
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
