"""Configuration: the FL context, its flags and environment, ``config.json`` and the node id.

Theory of operation
===================

flcluster is configured the way MindSpore Federated's cloud cluster is (``spec/configuration.md`` is the
authority; ``reference/mindspore-fl-behaviour.md`` §1 records the original). One record is the source of
truth, :class:`FLContext`; everything else either feeds it or is derived from it:

- :mod:`~flcluster.config.rules`: the validation toolkit (rules, refusals, conversion by type); every rule of
  the configuration is written once, there or on the field it guards.
- :mod:`~flcluster.config.context`: :class:`FLContext` and its cross-field rules; the process-wide current
  context (:func:`set_fl_context`, :func:`get_fl_context`, :func:`reset_fl_context`,
  :func:`explicit_fl_context_keys`).
- :mod:`~flcluster.config.sources`: command-line flags and ``MS_*`` environment variables, merged with
  defaults < environment < explicit keys by :func:`build_fl_context`.
- :mod:`~flcluster.config.file`: ``config.json`` (:class:`ClusterConfig`, :func:`load_cluster_config`).
- :mod:`~flcluster.config.node_id`: :func:`resolve_node_id`.
- :mod:`~flcluster.config.startup`: :func:`refuse_unimplemented`, the start-up refusal of features flcluster
  does not implement yet (none is left).

Each role's settings records are built from a validated FLContext by :mod:`flcluster.settings`; they have no
defaults and no rules of their own. This package does no I/O apart from reading ``config.json`` and logging;
it starts no tasks.
"""

from __future__ import annotations

from flcluster.config.context import (
    DOWNLOAD_COMPRESS_TYPES,
    ENCRYPT_TYPES,
    MS_ROLES,
    SERVER_MODES,
    UPLOAD_COMPRESS_TYPES,
    FLContext,
    explicit_fl_context_keys,
    get_fl_context,
    reset_fl_context,
    set_fl_context,
)
from flcluster.config.file import ClusterConfig, StorageConfig, load_cluster_config
from flcluster.config.node_id import resolve_node_id
from flcluster.config.sources import (
    ENVIRONMENT_VARIABLES,
    add_context_arguments,
    apply_environment,
    build_fl_context,
    context_kwargs_from_args,
    environment_kwargs,
)
from flcluster.config.startup import refuse_unimplemented

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
    "refuse_unimplemented",
    "reset_fl_context",
    "resolve_node_id",
    "set_fl_context",
]
