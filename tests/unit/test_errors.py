"""The error hierarchy (flcluster/errors.py): one home, every public error under FLClusterError, each with
its fault and its HTTP status hint."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import flcluster
from flcluster import errors
from flcluster.errors import Fault, FLClusterError

ROOT = Path(flcluster.__file__).resolve().parent
OURS, THEIRS = Fault.OURS, Fault.THEIRS

#: Every public error, its fault and its status hint: a change here is a change of the public contract.
EXPECTED = {
    "FLClusterError": (OURS, 500),
    "ConfigError": (THEIRS, 400),
    "CheckpointError": (THEIRS, 400),
    "ValueRefused": (THEIRS, 400),
    "ProtocolError": (THEIRS, 400),
    "FrameError": (THEIRS, 400),
    "MessageError": (THEIRS, 400),
    "IllegalEvent": (THEIRS, 409),
    "SchemaError": (THEIRS, 400),
    "UpdateRejected": (THEIRS, 400),
    "VerificationFailed": (THEIRS, 400),
    "CipherInputError": (THEIRS, 400),
    "MalformedAnswer": (THEIRS, 502),
    "AccessRefused": (THEIRS, 401),
    "BodyRefused": (THEIRS, 400),
    "ClusterError": (OURS, 503),
    "RegistrationRefused": (OURS, 503),
    "LinkClosed": (OURS, 503),
    "HandshakeFailed": (OURS, 503),
    "AggregationError": (OURS, 500),
    "FollowerLeft": (OURS, 500),
    "UnmaskError": (OURS, 500),
    "DeviceTransportError": (OURS, 503),
    "DeviceHTTPError": (OURS, 502),
    "ModelUnavailable": (OURS, 503),
    "StoreError": (OURS, 500),
    "StoreOpenError": (THEIRS, 409),
    "StoreCorrupt": (THEIRS, 409),
    "StoreForeign": (THEIRS, 409),
    "StoreTooNew": (THEIRS, 409),
    "StoreLocked": (THEIRS, 409),
    "TransitionRefused": (OURS, 500),
    "StoreClosed": (OURS, 500),
    "StoreWriteError": (OURS, 503),
}


def error_classes() -> dict[str, type[BaseException]]:
    return {
        name: obj
        for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == errors.__name__
    }


def test_every_error_in_errors_py_has_the_expected_fault_and_status_hint() -> None:
    found = error_classes()
    assert set(found) == set(EXPECTED)
    assert set(errors.__all__) == set(EXPECTED) | {"Fault", "NEVER_RESET", "FRESH_START"}
    for name, cls in found.items():
        assert issubclass(cls, FLClusterError), name
        assert (cls.fault, cls.status_hint) == EXPECTED[name], name
        assert cls.__doc__, name


def test_the_hint_follows_the_fault() -> None:
    # 4xx: the request was wrong; 5xx: this side could not do it, or (502) an upstream answer was wrong.
    for name, cls in error_classes().items():
        assert issubclass(cls, FLClusterError)
        if cls.fault is THEIRS and cls.status_hint != 502:
            assert 400 <= cls.status_hint < 500, name
        else:
            assert 500 <= cls.status_hint < 600, name


def test_config_error_stays_a_value_error() -> None:
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.CheckpointError, ValueError)


EXCEPTION_SUFFIXES = ("Error", "Exception", "Refused", "Closed", "Event", "Rejected", "Answer", "Unavailable")


def defined_exceptions(path: Path) -> list[str]:
    """Public classes in ``path`` whose bases name an exception (by the names exceptions end with)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            bases = [ast.unparse(b) for b in node.bases]
            if any(b.endswith(EXCEPTION_SUFFIXES) for b in bases):
                names.append(node.name)
    return names


def test_no_public_error_is_defined_outside_errors_py() -> None:
    for path in ROOT.rglob("*.py"):
        if "fbs" in path.parts or path.name == "errors.py":
            continue
        assert defined_exceptions(path) == [], path.relative_to(ROOT)


@pytest.mark.parametrize(
    "module",
    sorted(
        m.name
        for m in pkgutil.walk_packages([str(ROOT)], "flcluster.")
        if ".fbs" not in m.name and not m.name.endswith("__main__")
    ),
)
def test_every_error_a_module_exposes_is_the_one_in_errors_py(module: str) -> None:
    mod = importlib.import_module(module)
    for name, obj in vars(mod).items():
        if name.startswith("_") or not inspect.isclass(obj) or not issubclass(obj, BaseException):
            continue
        if obj.__module__.startswith("flcluster"):
            assert obj.__module__ == "flcluster.errors", (module, name)
            assert issubclass(obj, FLClusterError), (module, name)


def test_schema_error_keeps_reason_and_detail() -> None:
    exc = errors.SchemaError("The schema of RequestFLJob is invalid.", "truncated at byte 3")
    assert (exc.reason, exc.detail) == ("The schema of RequestFLJob is invalid.", "truncated at byte 3")
    assert str(exc) == "The schema of RequestFLJob is invalid. truncated at byte 3"
    assert str(errors.SchemaError("only a reason")) == "only a reason"
