"""A node's TLS: what it loads at start-up, and the certificate watcher while it runs.

Theory of operation
===================

:func:`load_node_tls` runs once per role, where its settings are derived (:mod:`flcluster.settings`), before
any port opens. With ``enable_ssl=False`` it returns ``None`` and every link stays plain. With
``enable_ssl=True`` it reads the files ``config.json`` names, checks them (spec/cluster-protocol.md §7.3:
every refusal names the key and the file) and builds the contexts the role needs, in a :class:`NodeTls`:

=============  =====================================  ==========================================
role           files                                  contexts
=============  =====================================  ==========================================
Scheduler      server_cert_path, ca_cert_path (, crl)  cluster listener, HTTPS (management)
Server         + client_cert_path                     cluster listener and connector, HTTPS (devices)
operator tool  client_cert_path, ca_cert_path (, crl)  cluster connector (``flcluster finish``)
=============  =====================================  ==========================================

:func:`watch_certificates` is a task of the node's nursery: at start and every ``cert_check_interval_in_hour``
it logs a warning for each loaded certificate that expires within ``cert_expire_warning_time_in_day`` days,
and an error for one that has expired since start-up (spec/cluster-protocol.md §7.4). It reads the wall
clock through an argument, so tests give it their own.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import ssl
from collections.abc import Callable
from typing import Final

import attrs
import trio

from flcluster.config import ClusterConfig, FLContext
from flcluster.errors import ConfigError
from flcluster.tls.certificates import (
    Identity,
    WatchedCertificate,
    check_issued_by,
    check_not_revoked,
    expiry_notice,
    load_ca_bundle,
    load_crl,
    load_identity,
    refuse_outside_validity,
)
from flcluster.tls.contexts import (
    cluster_connector_context,
    cluster_listener_context,
    https_server_context,
    parse_cipher_list,
)

__all__ = ["NodeTls", "TlsRole", "load_node_tls", "utc_now", "watch_certificates"]

log = logging.getLogger("flcluster.tls")


class TlsRole(enum.Enum):
    """Which side of the cluster's connections a process is on (see the module docstring)."""

    SCHEDULER = "Scheduler"
    SERVER = "Server"
    TOOL = "operator tool"


_NEEDS: Final[dict[TlsRole, tuple[str, ...]]] = {
    TlsRole.SCHEDULER: ("server_cert_path", "ca_cert_path"),
    TlsRole.SERVER: ("server_cert_path", "client_cert_path", "ca_cert_path"),
    TlsRole.TOOL: ("client_cert_path", "ca_cert_path"),
}


@attrs.frozen
class NodeTls:
    """The TLS contexts of one process, built once at start-up.

    Attributes:
        listener: The listening side of cluster links (client certificates required); None for a tool.
        connector: The connecting side of cluster links; None for the Scheduler.
        https: The device or management HTTPS port; None for a tool.
        watched: Every certificate loaded (the node's own and the CAs'), for :func:`watch_certificates`.
        warning_days: ``cert_expire_warning_time_in_day``.
        check_interval_hours: ``cert_check_interval_in_hour``.
    """

    listener: ssl.SSLContext | None
    connector: ssl.SSLContext | None
    https: ssl.SSLContext | None
    watched: tuple[WatchedCertificate, ...]
    warning_days: int
    check_interval_hours: int


def utc_now() -> dt.datetime:
    """The wall clock, as an aware UTC datetime (certificates' validity is in wall time)."""
    return dt.datetime.now(dt.UTC)


def _missing(ctx: FLContext, role: TlsRole, key: str) -> ConfigError:
    needed = ", ".join(_NEEDS[role])
    if not ctx.config_file_path:
        return ConfigError(
            f"enable_ssl=True needs config_file_path: a config.json that names the TLS files ({needed} for "
            f"a {role.value}; spec/cluster-protocol.md §7)"
        )
    return ConfigError(
        f"enable_ssl=True needs config.json key {key!r} in {ctx.config_file_path!r} ({needed} for a "
        f"{role.value}; spec/cluster-protocol.md §7)"
    )


def load_node_tls(
    ctx: FLContext,
    cluster_config: ClusterConfig | None,
    role: TlsRole,
    *,
    now: dt.datetime | None = None,
) -> NodeTls | None:
    """Load and check the TLS files of ``role``; build its contexts (spec/cluster-protocol.md §7.3).

    Args:
        ctx: The node's context (``enable_ssl``, ``server_password``, ``client_password``).
        cluster_config: ``config.json`` (the file keys, ``cipher_list``, the expiry settings); ``None``: none.
        role: Which contexts to build.
        now: The wall clock's time (default: now).

    Returns:
        ``None`` with ``enable_ssl=False``, else the contexts.

    Raises:
        ConfigError: a file is missing, unreadable, unusable, expired, not issued by the CA or revoked, or
            ``cipher_list`` is refused; the message names the key and the file.
    """
    if not ctx.enable_ssl:
        return None
    config = cluster_config if cluster_config is not None else ClusterConfig()
    for key in _NEEDS[role]:
        if not getattr(config, key):
            raise _missing(ctx, role, key)
    moment = utc_now() if now is None else now
    ciphers = parse_cipher_list(config.cipher_list)
    cas = load_ca_bundle("ca_cert_path", config.ca_cert_path)
    watched = [WatchedCertificate.of("ca_cert_path", config.ca_cert_path, ca) for ca in cas]
    for ca in watched:
        refuse_outside_validity(ca, now=moment)
    crl = load_crl("crl_path", config.crl_path, cas, now=moment) if config.crl_path else None

    def identity(key: str, password_key: str, password: str) -> Identity:
        loaded = load_identity(key, getattr(config, key), password_key=password_key, password=password)
        refuse_outside_validity(loaded.watched(), now=moment)
        check_issued_by(loaded, cas, ca_key="ca_cert_path")
        if crl is not None:
            check_not_revoked(loaded, crl, crl_key="crl_path")
        watched.append(loaded.watched())
        return loaded

    server = (
        identity("server_cert_path", "server_password", ctx.server_password)
        if "server_cert_path" in _NEEDS[role]
        else None
    )
    client = (
        identity("client_cert_path", "client_password", ctx.client_password)
        if "client_cert_path" in _NEEDS[role]
        else None
    )
    tls = NodeTls(
        listener=None if server is None else cluster_listener_context(server, cas, crl, ciphers),
        connector=None if client is None else cluster_connector_context(client, cas, crl, ciphers),
        https=None if server is None else https_server_context(server, ciphers),
        watched=tuple(watched),
        warning_days=config.cert_expire_warning_time_in_day,
        check_interval_hours=config.cert_check_interval_in_hour,
    )
    log.info(
        "TLS on for this %s: %s",
        role.value,
        "; ".join(f"{w.key} {w.path!r} ({w.subject}) valid until {w.not_after:%Y-%m-%d}" for w in watched),
    )
    return tls


def report_expiry(tls: NodeTls, *, now: dt.datetime) -> int:
    """Log :func:`~flcluster.tls.certificates.expiry_notice` of each certificate; return how many said."""
    said = 0
    for watched in tls.watched:
        notice = expiry_notice(watched, now=now, warning_days=tls.warning_days)
        if notice is None:
            continue
        level, text = notice
        (log.error if level == "error" else log.warning)("%s", text)
        said += 1
    return said


async def watch_certificates(tls: NodeTls, *, clock: Callable[[], dt.datetime] = utc_now) -> None:
    """Report expiring certificates now and every ``check_interval_hours`` (runs until cancelled)."""
    while True:
        report_expiry(tls, now=clock())
        await trio.sleep(tls.check_interval_hours * 3600)
