"""Every public error flcluster raises, in one hierarchy split by who is at fault.

Theory of operation
-------------------
Every error message states the rule that was broken, the offending value (with ``!r``) and what was
expected, so an operator or a device always gets a clear answer rather than a traceback.

Each class says two things about itself, as class attributes (h11's ``error_status_hint`` is the model):

- :attr:`FLClusterError.fault`, who has to change something for the same request to succeed, seen from
  the code that raises it: :attr:`Fault.THEIRS`, the input was wrong (a device's body, a peer node's frame,
  an operator's flag or ``config.json``, a calling program's argument) and sending it again fails again;
  :attr:`Fault.OURS`, the input was acceptable but this side could not do the job now (not ready, a peer
  gone, a deadline passed, a result that does not add up), and a later try may succeed.
- :attr:`FLClusterError.status_hint`, the HTTP status a server boundary answers when this error reaches
  it: 4xx for :attr:`~Fault.THEIRS`, 5xx for :attr:`~Fault.OURS`. The device protocol answers its own
  refusals with HTTP 200 and a ``retcode`` (spec/device-protocol.md); the hint is for errors that escape
  to the HTTP layer (flcluster/http/answers.py) and for logs.

The tree::

    FLClusterError
    ├── ConfigError (ValueError)      theirs  400  a refused parameter, flag, environment variable, file
    │   └── CheckpointError           theirs  400  a checkpoint in checkpoint_dir cannot be used
    ├── ProtocolError                 theirs  400  a message broke a protocol rule; nothing changed
    │   ├── FrameError                theirs  400  a cluster TCP frame is malformed (the link is closed)
    │   │   └── MessageError          theirs  400  a well-framed message is unknown or ill-typed
    │   ├── IllegalEvent              theirs  409  an event a state machine does not take in its state
    │   ├── SchemaError               theirs  400  a FlatBuffers body does not match its table
    │   ├── UpdateRejected            theirs  400  a device's update breaks a model rule
    │   ├── CipherInputError          theirs  400  a secure-aggregation key, IV or share is malformed
    │   ├── MalformedAnswer           theirs  502  (device SDK) a server's answer is not the protocol's
    │   ├── VerificationFailed        theirs  400  a device's certificate, signature or timestamp fails
    │   ├── AccessRefused             theirs  401  an operator request without the right access token
    │   └── BodyRefused               theirs  400  a management request body breaks its endpoint's rules
    └── ClusterError                  ours    503  the cluster cannot do what was asked now
        ├── RegistrationRefused       ours    503  the Scheduler refused a Server's registration
        ├── LinkClosed                ours    503  a cluster TCP link closed or broke
        │   └── HandshakeFailed       ours    503  a cluster link's TLS handshake failed
        ├── AggregationError          ours    500  an iteration's aggregate cannot be formed
        │   └── UnmaskError           ours    500  the masks cannot be removed (too few or bad shares)
        ├── DeviceTransportError      ours    503  (device SDK) a request got no HTTP answer
        ├── DeviceHTTPError           ours    502  (device SDK) a server answered a status other than 200
        └── ModelUnavailable          ours    503  (device SDK) no model could be fetched
    StoreError                        ours    500  the recovery store (spec/store.md)
    ├── StoreOpenError                theirs  409  a store file refused at start-up (never reset)
    │   ├── StoreCorrupt, StoreForeign, StoreTooNew, StoreLocked
    ├── TransitionRefused (ValueError) ours   500  a transition breaks a store rule (a caller bug)
    ├── StoreClosed                   ours    500  used after close
    └── StoreWriteError               ours    503  a commit failed (disk full, I/O error)

Catch :class:`FLClusterError` at a boundary (the command line, an HTTP app); catch a leaf where the code
knows what to do about it.
"""

from __future__ import annotations

import enum
from typing import ClassVar

__all__ = [
    "FRESH_START",
    "NEVER_RESET",
    "AccessRefused",
    "AggregationError",
    "BodyRefused",
    "CheckpointError",
    "CipherInputError",
    "ClusterError",
    "ConfigError",
    "DeviceHTTPError",
    "DeviceTransportError",
    "FLClusterError",
    "Fault",
    "FollowerLeft",
    "FrameError",
    "HandshakeFailed",
    "IllegalEvent",
    "LinkClosed",
    "MalformedAnswer",
    "MessageError",
    "ModelUnavailable",
    "ProtocolError",
    "RegistrationRefused",
    "SchemaError",
    "StoreClosed",
    "StoreCorrupt",
    "StoreError",
    "StoreForeign",
    "StoreLocked",
    "StoreOpenError",
    "StoreTooNew",
    "StoreWriteError",
    "TransitionRefused",
    "UnmaskError",
    "UpdateRejected",
    "ValueRefused",
    "VerificationFailed",
]

_EXCERPT = 200


class Fault(enum.Enum):
    """Who has to change something for the same request to succeed (see the module docstring)."""

    #: This side could not do it now (not ready, a peer gone, a deadline passed): a later try may succeed.
    OURS = "ours"
    #: The input was wrong (a body, a frame, a flag, an argument): the same input fails again.
    THEIRS = "theirs"


class FLClusterError(Exception):
    """Base of every error flcluster raises on purpose.

    Attributes:
        fault: Who is at fault (:class:`Fault`); set by every subclass.
        status_hint: The HTTP status a server answers when this error reaches its HTTP boundary.
    """

    fault: ClassVar[Fault] = Fault.OURS
    status_hint: ClassVar[int] = 500


# ------------------------------------------------------------------------------------------ theirs


class ConfigError(FLClusterError, ValueError):
    """A configuration value is refused: the message names the parameter, the value and what is allowed."""

    fault = Fault.THEIRS
    status_hint = 400


class ValueRefused(ConfigError):
    """One configuration value is refused by its rule (``flcluster.config.rules``).

    Attributes:
        parameter: The parameter's name, so a caller that knows where the value came from (an
            environment variable, a key of ``config.json``) can re-word the message.
        allowed: The rule's text of what it accepts.
    """

    parameter: str = ""
    allowed: str = ""


class CheckpointError(ConfigError):
    """A checkpoint in the configured directory cannot be used (corrupt, or for another model)."""


class ProtocolError(FLClusterError):
    """A message broke a protocol rule; the state it was meant to change is left as it was."""

    fault = Fault.THEIRS
    status_hint = 400


class FrameError(ProtocolError):
    """A cluster TCP frame is malformed, truncated, oversized or of an unknown type."""


class MessageError(FrameError):
    """A well-framed cluster message is of an unknown type or has missing, extra or mistyped fields.

    Unlike other frame errors the byte stream is still in sync: the receiver answers and reads on.
    """


class IllegalEvent(ProtocolError):
    """A state machine was fed an event that is not legal in its current state (nothing changed)."""

    status_hint = 409


class SchemaError(ProtocolError):
    """A FlatBuffers body does not match the schema it was decoded as, or breaks one of its limits.

    Attributes:
        reason: The answer for the peer, in the original's words where it has them (for example
            ``"The schema of RequestFLJob is invalid."``).
        detail: What exactly was wrong and where, for logs and for the curious peer.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason} {detail}".rstrip())
        self.reason = reason
        self.detail = detail


class UpdateRejected(ProtocolError):
    """A device's update breaks a model rule (spec/aggregation.md, "Update check"); nothing was changed."""


class VerificationFailed(ProtocolError):
    """A device's request failed client verification (spec/device-protocol.md, "Client verification").

    Its certificate chain, a signature, its timestamp or the replay check; nothing was changed.

    Attributes:
        reason: What failed and why, for the device.
        retry_later: True when a later request may pass (a timestamp out of the window, no key kept for
            the device yet): the original answers these ``OutOfTime`` in updateModel, the rest
            ``RequestError``.
    """

    def __init__(self, reason: str, *, retry_later: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_later = retry_later


class CipherInputError(ProtocolError):
    """A secure-aggregation key, IV, salt or share is malformed (spec/secure-aggregation.md, "Primitives").

    Wrong sizes, a public key X25519 refuses, a share that does not decrypt or parse: sending the same
    input again fails again.
    """


def _excerpt(body: bytes) -> str:
    text = body[:_EXCERPT].decode("utf-8", errors="replace")
    return text + ("…" if len(body) > _EXCERPT else "")


class MalformedAnswer(ProtocolError):
    """(Device SDK) An HTTP 200 body is neither one of the server's plain texts nor a well-formed table.

    Attributes:
        url: The URL the device posted to.
        body: The answer's body.
    """

    status_hint = 502

    def __init__(self, url: str, table: str, error: SchemaError, body: bytes) -> None:
        super().__init__(
            f"POST {url} answered a body that is neither one of the server's plain texts nor a valid "
            f"{table}: {error}; body starts {_excerpt(body)!r}"
        )
        self.url = url
        self.body = body


class AccessRefused(ProtocolError):
    """An operator request lacks the management access token, or carries a wrong one (management-api.md)."""

    status_hint = 401


class BodyRefused(ProtocolError):
    """A management request body its endpoint refuses (spec/management-api.md, the body table).

    Attributes:
        message: The answer's ``error_message``, in the original's words.
    """

    def __init__(self, message: str) -> None:
        """Refuse with ``message`` (also the exception's text)."""
        super().__init__(message)
        self.message = message


# -------------------------------------------------------------------------------------------- ours


class ClusterError(FLClusterError):
    """The cluster cannot do what was asked: not ready, refused, or a deadline passed."""

    fault = Fault.OURS
    status_hint = 503


class RegistrationRefused(ClusterError):
    """The Scheduler refused a Server's registration; the message says which rule and why."""


class LinkClosed(ClusterError):
    """A cluster TCP link closed: the other side closed it, or it broke (spec/cluster-protocol.md)."""


class HandshakeFailed(LinkClosed):
    """A cluster link's TLS handshake failed (spec/cluster-protocol.md §7.4).

    The peer refused this node's certificate, this node refused the peer's, or only one side speaks TLS.
    """


class AggregationError(ClusterError):
    """The aggregate cannot be formed (it is not finite, or the partial sums do not fit together)."""

    status_hint = 500


class FollowerLeft(AggregationError):
    """A follower whose partial sums an aggregation needs has no link to the leader (it may come back)."""


class UnmaskError(AggregationError):
    """The masks cannot be removed (spec/secure-aggregation.md, "Masks"); the caller fails the iteration.

    A peer has fewer than ``t`` shares, its shares disagree, or a rebuilt key does not match the peer's
    public key. Nothing rebuilt is published.
    """


class DeviceTransportError(ClusterError):
    """(Device SDK) A request never got an HTTP answer (connection refused or reset, timeout, TLS failure).

    Attributes:
        url: The URL the device posted to.
    """

    def __init__(self, url: str, cause: BaseException) -> None:
        super().__init__(f"POST {url} got no HTTP answer: {type(cause).__name__}: {cause}")
        self.url = url


class DeviceHTTPError(ClusterError):
    """(Device SDK) A server answered an HTTP status other than 200 (every protocol answer is 200).

    Attributes:
        url: The URL the device posted to.
        status: The HTTP status code.
        body: The answer's body.
    """

    status_hint = 502

    def __init__(self, url: str, status: int, body: bytes) -> None:
        super().__init__(
            f"POST {url} answered HTTP {status!r}, expected 200 (every device-protocol answer is 200); "
            f"body: {_excerpt(body)!r}"
        )
        self.url = url
        self.status = status
        self.body = body


class ModelUnavailable(ClusterError):
    """(Device SDK) :meth:`~flcluster.client.device.Device.fetch_model` got no model; the reason says why."""


# ------------------------------------------------------------------------------- recovery store

NEVER_RESET = "a recovery store is never reset automatically"
"""The sentence every refusal to open carries."""

FRESH_START = (
    "to start this node afresh, move the file (and its -wal file, if any) aside; to recover, restore it "
    "from a backup"
)
"""The operator's way out of a damaged store, quoted in :class:`StoreCorrupt` messages."""


class StoreError(FLClusterError):
    """Base of the recovery store's errors (spec/store.md, "Errors")."""

    fault = Fault.OURS
    status_hint = 500


class StoreOpenError(StoreError):
    """A store file was refused at start-up; the message names the file, the problem and the way out.

    The operator's file is at fault (damaged, of another job, of a newer flcluster, held by another
    node); the store never deletes, truncates or rewrites a file it refuses.
    """

    fault = Fault.THEIRS
    status_hint = 409

    def __init__(self, location: str, problem: str, remedy: str = FRESH_START) -> None:
        """Build the message from the file, what is wrong with it and what the operator can do.

        Args:
            location: the store file's path (or the memory volume's name).
            problem: what is wrong, with the offending values (``!r``) and what was expected.
            remedy: what the operator can do about it.
        """
        self.location = location
        self.problem = problem
        super().__init__(f"recovery store {location}: {problem}; {NEVER_RESET}: {remedy}")


class StoreCorrupt(StoreOpenError):
    """The file is not a readable recovery store (empty, cut short, damaged, not SQLite, bad contents)."""


class StoreForeign(StoreOpenError):
    """The file is a recovery store of another job, node or role, or a database of another program."""


class StoreTooNew(StoreOpenError):
    """The file was written by a newer flcluster, with a schema version this code does not know."""


class StoreLocked(StoreOpenError):
    """Another open store holds the file (two nodes given the same store file)."""


class TransitionRefused(StoreError, ValueError):
    """A transition breaks a store rule; nothing of it was committed (the message names the rule)."""


class StoreClosed(StoreError):
    """The store was used after :meth:`~flcluster.store.api.RecoveryStore.aclose`."""


class StoreWriteError(StoreError):
    """A commit failed in SQLite (disk full, I/O error); nothing of the transitions it held was committed."""

    status_hint = 503
