"""The validation toolkit of the configuration package: refusals, rules and conversion by type.

Theory of operation
===================

Every configuration record (:class:`~flcluster.config.FLContext`, :class:`~flcluster.config.StorageConfig`,
:class:`~flcluster.config.ClusterConfig`) is a frozen attrs class whose fields carry a :class:`Rule` as their
validator. A rule is a predicate plus the text that says what it accepts; when the predicate fails the field
is refused with a :class:`Refused` error, ``"<name>=<value!r> is refused: expected <allowed>"``. ``Refused``
is a :class:`~flcluster.errors.ConfigError` that also carries the parameter and the allowed text, so a caller
that knows better where the value came from (an environment variable, a key of ``config.json``) re-words the
message without re-stating the rule.

Values given to :class:`~flcluster.config.FLContext` are first converted by the field's annotated type
(:func:`convert_by_type`, an attrs field transformer), because callers hand us text turned into values by the
flag parser and JSON numbers (the original's REST tool sends every number as a float):

- ``int``: an ``int`` (never a ``bool``), or a float with an integral value (``8.0`` becomes ``8``);
- ``float``: an ``int`` or a ``float``, converted to ``float``; it must be finite;
- ``bool``: only ``True`` or ``False``;
- ``str``: only a ``str``.

``config.json`` is stricter (a JSON integer must be an integer): :func:`strict_int` and :func:`strict_str`
wrap a rule with a type check instead of a conversion.

Each rule of flcluster's configuration is written once, here or next to the field it guards; the runtime's
settings records carry no validators of their own (``spec/configuration.md`` §8).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

import attrs

from flcluster.errors import ValueRefused as Refused

__all__ = [
    "DEVICE",
    "FILE_STORAGE",
    "FL_NAME",
    "HOST",
    "MANAGE_TOKEN",
    "MAX_ID_CHARS",
    "MAX_PARTICIPATION_MINUTES",
    "MILLISECONDS",
    "NON_NEGATIVE_INT",
    "PARTICIPATION",
    "PORT",
    "POSITIVE",
    "POSITIVE_INT",
    "RATIO",
    "SECONDS",
    "SECRET_FIELDS",
    "UINT32_COUNT",
    "UINT32_MAX",
    "UINT32_MILLISECONDS",
    "URL_PREFIX",
    "Refused",
    "Rule",
    "convert_by_type",
    "field",
    "kind_of",
    "matches",
    "max_chars",
    "one_of",
    "optional",
    "participation_levels",
    "refused",
    "strict_int",
    "strict_str",
    "within",
]

_T = TypeVar("_T")
_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]

#: Fields whose values never appear in a ``repr`` or a message.
SECRET_FIELDS: Final = frozenset({"client_password", "server_password", "manage_token"})
#: The original's limit on node ids and the Scheduler's address.
MAX_ID_CHARS: Final = 100
#: The largest participation-time threshold, in minutes (two days).
MAX_PARTICIPATION_MINUTES: Final = 2880
#: The largest count or window (ms) an iteration is held against (the original keeps them in 32 bits).
UINT32_MAX: Final = 0xFFFFFFFF

# ------------------------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------------------------


def _show(name: str, value: object) -> str:
    if name in SECRET_FIELDS:
        return f"<hidden {type(value).__name__}>"
    return repr(value)


def refused(name: str, value: object, allowed: str) -> Refused:
    """The error for ``name=value`` (hidden for a password) that is not ``allowed``."""
    err = Refused(f"{name}={_show(name, value)} is refused: expected {allowed}")
    err.parameter = name
    err.allowed = allowed
    return err


# ------------------------------------------------------------------------------------------------------------
# Rules
# ------------------------------------------------------------------------------------------------------------


@attrs.frozen
class Rule:
    """An attrs validator: ``accepts(value)`` must hold, otherwise ``allowed`` says what would have."""

    allowed: str
    accepts: Callable[[Any], bool]

    def __call__(self, instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not self.accepts(value):
            raise refused(attribute.name, value, self.allowed)


def _bounds_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    assert hi is not None
    return f"{'<' if hi_open else '<='} {hi}"


def within(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    noun: str = "a number",
) -> Rule:
    """A range rule; written as ``not`` of the allowed region so NaN is always refused."""

    def accepts(value: float) -> bool:
        if lo is not None and not (value > lo if lo_open else value >= lo):
            return False
        return hi is None or (value < hi if hi_open else value <= hi)

    return Rule(f"{noun} {_bounds_text(lo, hi, lo_open, hi_open)}", accepts)


def one_of(*choices: str) -> Rule:
    """The value is one of ``choices`` (exactly, case included)."""
    return Rule("one of " + ", ".join(repr(c) for c in choices), lambda v: v in choices)


def max_chars(limit: int, *, non_empty: bool = False) -> Rule:
    """A string of at most ``limit`` characters (and at least one with ``non_empty``)."""
    lo = 1 if non_empty else 0
    what = (
        f"a string of {lo} to {limit} characters" if non_empty else f"a string of at most {limit} characters"
    )
    return Rule(what, lambda v: lo <= len(v) <= limit)


def matches(pattern: str, allowed: str) -> Rule:
    """The whole string matches the regular expression ``pattern``."""
    compiled = re.compile(pattern)
    return Rule(allowed, lambda v: compiled.fullmatch(v) is not None)


def optional(rule: Rule) -> Rule:
    """``""`` (not set) or a value ``rule`` accepts."""
    return Rule(f"'' or {rule.allowed}", lambda v: v == "" or rule.accepts(v))


POSITIVE_INT: Final = within(1, noun="an integer")
#: ``config.json``'s ``manage_token``: none, or 16 to 4096 printable ASCII characters without spaces.
MANAGE_TOKEN: Final = optional(
    matches(r"[!-~]{16,4096}", "16 to 4096 printable ASCII characters without spaces (an HTTP bearer token)")
)
NON_NEGATIVE_INT: Final = within(0, noun="an integer")
UINT32_COUNT: Final = within(1, UINT32_MAX, noun="an integer")
POSITIVE: Final = within(0, lo_open=True)
RATIO: Final = within(0, 1, lo_open=True)
PORT: Final = within(1, 65535, noun="a port number")
MILLISECONDS: Final = within(1, noun="a duration in milliseconds, an integer")
UINT32_MILLISECONDS: Final = within(1, UINT32_MAX, noun="a duration in milliseconds, an integer")
SECONDS: Final = within(0, lo_open=True, noun="a duration in seconds, a number")
HOST: Final = matches(
    r"[A-Za-z0-9._:%\[\]-]{1,253}",
    "a host name or IP address (letters, digits and . : - _ % [ ], 1 to 253 characters)",
)
FL_NAME: Final = Rule(
    "a name without '/', a backslash or NUL (it names checkpoint files)",
    lambda v: not any(c in v for c in "/\\\x00"),
)
URL_PREFIX: Final = matches(
    r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*",
    "'' or a URL path such as '/fl' or '/a/b' (leading '/', no trailing '/', no spaces, '?' or '#')",
)
DEVICE: Final = matches(r"cpu|cuda|cuda:[0-9]+", "'cpu', 'cuda' or 'cuda:N'")
FILE_STORAGE: Final = Rule("the number 1 (file storage)", lambda v: v == 1)
_PARTICIPATION_RE: Final = re.compile(r"\s*([0-9]+)\s*,\s*([0-9]+)\s*")


def participation_levels(text: str) -> tuple[int, int] | None:
    """``"a,b"`` parsed into ``(a, b)`` when ``0 < a < b <= 2880``, else ``None``."""
    match = _PARTICIPATION_RE.fullmatch(text)
    if match is None:
        return None
    first, second = int(match.group(1)), int(match.group(2))
    if not 0 < first < second <= MAX_PARTICIPATION_MINUTES:
        return None
    return first, second


PARTICIPATION: Final = Rule(
    f"'a,b' with integers 0 < a < b <= {MAX_PARTICIPATION_MINUTES} (minutes)",
    lambda v: participation_levels(v) is not None,
)


def strict_int(rule: Rule) -> Rule:
    """``rule`` on a real int (JSON integer): a bool or a float is refused."""
    return Rule(rule.allowed, lambda v: isinstance(v, int) and not isinstance(v, bool) and rule.accepts(v))


def strict_str(rule: Rule | None = None) -> Rule:
    """``rule`` (whose text must describe a string) on a real str; without ``rule``, any string."""
    if rule is None:
        return Rule("a string", lambda v: isinstance(v, str))
    return Rule(rule.allowed, lambda v: isinstance(v, str) and rule.accepts(v))


# ------------------------------------------------------------------------------------------------------------
# Conversion by annotated type
# ------------------------------------------------------------------------------------------------------------


def _to_int(name: str) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool):
            raise refused(name, value, "an integer (not a bool)")
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise refused(name, value, "an integer (a float is accepted only with an integral value)")

    return convert


def _to_float(name: str) -> Callable[[object], float]:
    def convert(value: object) -> float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            result = float(value)
            if math.isfinite(result):
                return result
        raise refused(name, value, "a finite number (int or float)")

    return convert


def _to_bool(name: str) -> Callable[[object], bool]:
    def convert(value: object) -> bool:
        if isinstance(value, bool):
            return value
        raise refused(name, value, "a bool, True or False")

    return convert


def _to_str(name: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if isinstance(value, str):
            return value
        raise refused(name, value, "a string")

    return convert


_CONVERTERS: Final[Mapping[str, Callable[[str], Callable[[object], Any]]]] = {
    "int": _to_int,
    "float": _to_float,
    "bool": _to_bool,
    "str": _to_str,
}


def kind_of(attribute: attrs.Attribute[Any]) -> str:
    """``"int"``, ``"float"``, ``"bool"`` or ``"str"`` from the annotation (a string or a type)."""
    annotation = attribute.type
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    if kind not in _CONVERTERS:
        raise TypeError(f"FLContext field {attribute.name!r} has an unsupported type {annotation!r}")
    return kind


def convert_by_type(cls: type, fields: list[attrs.Attribute[Any]]) -> list[attrs.Attribute[Any]]:
    """attrs field transformer: give every field the converter of its annotated type."""
    return [
        attribute.evolve(converter=_CONVERTERS[kind_of(attribute)](attribute.name)) for attribute in fields
    ]


def field(default: _T, *rules: _Validator, doc: str, secret: bool = False) -> _T:
    """An FLContext field: its default, its rules, its one-line meaning (shown by ``--help``)."""
    validator = list(rules) if rules else None
    return attrs.field(default=default, validator=validator, repr=not secret, metadata={"doc": doc})
