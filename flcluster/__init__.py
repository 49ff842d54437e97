"""flcluster: a federated-learning cloud cluster (one Scheduler, N Servers, devices over HTTP)."""

from __future__ import annotations

__version__ = "0.1.0"
