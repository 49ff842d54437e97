"""One small error hierarchy for flcluster, split by who is at fault.

Every error message states the rule that was broken, the offending value (with ``!r``) and what was
expected, so an operator or a device always gets a clear answer rather than a traceback.

- :class:`ConfigError`: the operator gave a bad parameter, flag, environment variable or ``config.json``.
- :class:`ProtocolError`: a peer (device, node or operator tool) sent something that breaks a protocol
  rule; the receiver answers with the protocol's error and changes nothing.
- :class:`ClusterError`: the cluster itself cannot do what was asked (not ready, refused, timed out).
"""

from __future__ import annotations


class FLClusterError(Exception):
    """Base of every error flcluster raises on purpose."""


class ConfigError(FLClusterError, ValueError):
    """A configuration value is refused: the message names the parameter, the value and what is allowed."""


class ProtocolError(FLClusterError):
    """A message broke a protocol rule; the state it was meant to change is left as it was."""


class FrameError(ProtocolError):
    """A cluster TCP frame is malformed, truncated, oversized or of an unknown type."""


class MessageError(FrameError):
    """A well-framed cluster message is of an unknown type or has missing, extra or mistyped fields.

    Unlike other frame errors the byte stream is still in sync: the receiver answers and reads on.
    """


class IllegalEvent(ProtocolError):
    """A state machine was fed an event that is not legal in its current state (nothing changed)."""


class ClusterError(FLClusterError):
    """The cluster cannot do what was asked: not ready, refused, or a deadline passed."""


class RegistrationRefused(ClusterError):
    """The Scheduler refused a Server's registration; the message says which rule and why."""
