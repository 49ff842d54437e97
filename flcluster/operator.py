"""What the operator tools need to reach a cluster: the management token and TLS.

``flcluster nodes``, ``flcluster state``, ``flcluster finish`` and ``examples/mobile/finish_mobile.py`` take
the cluster's ``config.json`` (``--config_file_path``) and ``--enable_ssl``, as the nodes do, and build an
:class:`OperatorAccess` with :func:`operator_access`:

- the **token** (spec/management-api.md, "Access token"): ``FLCLUSTER_MANAGE_TOKEN`` when it is set, else
  ``config.json``'s ``manage_token``; sent as ``Authorization: Bearer`` to the management port and in the
  ``finish_cluster`` frame;
- with ``enable_ssl`` (spec/cluster-protocol.md §7): the **cluster connector** context for ``finish``
  (``client_cert_path`` and ``client_password``, checked as a node checks them), and the **HTTPS client**
  context for the management port (its certificate and host name checked against ``ca_cert_path``).
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Mapping
from functools import partial
from typing import Final

import attrs
import trio

from flcluster.config import FLContext, load_cluster_config, rules
from flcluster.errors import ConfigError
from flcluster.runtime.finish import finish_cluster
from flcluster.tls import TlsRole, https_client_context, load_node_tls

__all__ = [
    "MANAGE_TOKEN_ENV",
    "OperatorAccess",
    "access_from_args",
    "add_access_arguments",
    "finish_from_args",
    "operator_access",
]

#: The environment variable that gives the tools the management token (over ``config.json``'s).
MANAGE_TOKEN_ENV: Final = "FLCLUSTER_MANAGE_TOKEN"


@attrs.frozen
class OperatorAccess:
    """How an operator tool reaches the cluster.

    Attributes:
        token: The management access token (``""``: none).
        cluster_tls: The cluster connector context for ``finish`` (``enable_ssl``), else None.
        https: The HTTPS client context for the management port (``enable_ssl``), else None.
    """

    token: str = attrs.field(repr=False)
    cluster_tls: ssl.SSLContext | None
    https: ssl.SSLContext | None

    @property
    def scheme(self) -> str:
        """``https`` with TLS, else ``http``."""
        return "http" if self.https is None else "https"

    def headers(self) -> dict[str, str]:
        """The headers of a management request (the token's)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def operator_access(
    *,
    config_file_path: str = "",
    enable_ssl: bool = False,
    client_password: str = "",
    finish: bool = False,
    environ: Mapping[str, str] | None = None,
) -> OperatorAccess:
    """Build what a tool needs from its flags and the environment (see the module docstring).

    Args:
        config_file_path: The cluster's ``config.json`` (``""``: none).
        enable_ssl: The cluster runs with TLS.
        client_password: Opens ``client_cert_path`` (``finish`` only).
        finish: Build the cluster connector too (``flcluster finish``).
        environ: The environment (default: this process's).

    Raises:
        ConfigError: ``config.json`` or ``FLCLUSTER_MANAGE_TOKEN`` is refused, or a TLS file is.
    """
    env = os.environ if environ is None else environ
    cluster_config = load_cluster_config(config_file_path or None)
    token = cluster_config.manage_token
    if env.get(MANAGE_TOKEN_ENV):
        token = env[MANAGE_TOKEN_ENV]
        if not rules.MANAGE_TOKEN.accepts(token):
            raise ConfigError(
                f"environment variable {MANAGE_TOKEN_ENV}=<hidden str> is refused: expected "
                f"{rules.MANAGE_TOKEN.allowed}"
            )
    if not enable_ssl:
        return OperatorAccess(token=token, cluster_tls=None, https=None)
    ctx = FLContext(enable_ssl=True, config_file_path=config_file_path, client_password=client_password)
    cluster_tls = None
    if finish:
        node_tls = load_node_tls(ctx, cluster_config, TlsRole.TOOL)
        assert node_tls is not None  # enable_ssl is on
        cluster_tls = node_tls.connector
    if not cluster_config.ca_cert_path:
        raise ConfigError(
            "enable_ssl=True needs config_file_path with the config.json key 'ca_cert_path' (the CA that "
            "issued the Scheduler's certificate)"
        )
    https = https_client_context(cluster_config.ca_cert_path)
    return OperatorAccess(token=token, cluster_tls=cluster_tls, https=https)


def _flag_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected True, False, true, false, 1 or 0, got {text!r}")


def add_access_arguments(parser: argparse.ArgumentParser, *, finish: bool) -> None:
    """Add ``--config_file_path``, ``--enable_ssl`` (and ``--client_password`` for ``finish``) to a tool."""
    parser.add_argument("--config_file_path", default="", help="the cluster's config.json (token, TLS files)")
    parser.add_argument(
        "--enable_ssl", type=_flag_bool, default=False, help="the cluster runs with TLS (True or False)"
    )
    if finish:
        parser.add_argument("--client_password", default="", help="opens config.json's client_cert_path")


def access_from_args(args: argparse.Namespace, *, finish: bool) -> OperatorAccess:
    """:func:`operator_access` from the flags :func:`add_access_arguments` added."""
    return operator_access(
        config_file_path=args.config_file_path,
        enable_ssl=args.enable_ssl,
        client_password=getattr(args, "client_password", ""),
        finish=finish,
    )


def finish_from_args(args: argparse.Namespace) -> list[int]:
    """Finish the cluster the parsed ``finish`` flags name (``flcluster finish``, ``finish_mobile.py``).

    ``args`` carries ``scheduler_ip``, ``scheduler_port``, ``grace`` and the access flags of
    :func:`add_access_arguments` (``finish=True``). Returns what
    :func:`~flcluster.runtime.finish.finish_cluster` returns (the pids of the processes that ended).

    Raises:
        FLClusterError: the access flags are refused, or the Scheduler refuses the request.
    """
    access = access_from_args(args, finish=True)
    ended: list[int] = trio.run(
        partial(
            finish_cluster,
            args.scheduler_ip,
            args.scheduler_port,
            grace=args.grace,
            token=access.token,
            tls=access.cluster_tls,
        )
    )
    return ended
