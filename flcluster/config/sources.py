"""Where an FL context comes from: command-line flags, ``MS_*`` environment variables, and their merge.

Theory of operation
===================

A node's context is built from three layers, later ones winning::

    FLContext defaults  <  MS_* environment variables  <  explicit keywords / command-line flags

:func:`build_fl_context` does the whole merge and validates the result once; :func:`environment_kwargs`,
:func:`apply_environment` and :func:`context_kwargs_from_args` are the pieces. "Explicit" means the caller
named the key: a flag given on the command line (flags are added with ``default=argparse.SUPPRESS``, so an
absent flag leaves no trace in the namespace) or a keyword passed to
:func:`~flcluster.config.set_fl_context`.

Text (a flag, a variable) is parsed by the field's type here; ranges and cross-field rules are FLContext's
(:mod:`flcluster.config.context`), so each rule is written once. An environment value is checked on its own
with :func:`~flcluster.config.context.check_field` so its refusal names the variable.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Mapping, Set
from typing import Final

from flcluster.config import rules
from flcluster.config.context import FIELD_NAMES, FIELDS, FLContext, check_field, check_known
from flcluster.errors import ConfigError

__all__ = [
    "ENVIRONMENT_VARIABLES",
    "add_context_arguments",
    "apply_environment",
    "build_fl_context",
    "context_kwargs_from_args",
    "environment_kwargs",
]

# ------------------------------------------------------------------------------------------------------------
# Command-line flags
# ------------------------------------------------------------------------------------------------------------

_INT_TEXT: Final = re.compile(r"[+-]?[0-9]+")
_TRUE_TEXT: Final = frozenset({"true", "1"})
_FALSE_TEXT: Final = frozenset({"false", "0"})


def _int_from_text(text: str) -> int:
    stripped = text.strip()
    if _INT_TEXT.fullmatch(stripped):
        return int(stripped)
    try:
        number = float(stripped)
    except ValueError:
        number = math.nan
    if math.isfinite(number) and number.is_integer():
        return int(number)
    raise ValueError(f"expected an integer, got {text!r}")


def _float_from_text(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {text!r}")
    return number


def _bool_from_text(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE_TEXT:
        return True
    if lowered in _FALSE_TEXT:
        return False
    raise ValueError(f"expected True, False, true, false, 1 or 0, got {text!r}")


_FROM_TEXT: Final[Mapping[str, Callable[[str], object]]] = {
    "int": _int_from_text,
    "float": _float_from_text,
    "bool": _bool_from_text,
    "str": str,
}


def _argparse_type(parse: Callable[[str], object], kind: str) -> Callable[[str], object]:
    def parse_flag(text: str) -> object:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    parse_flag.__name__ = kind
    return parse_flag


def add_context_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a ``--<key>`` flag for every FLContext field to ``parser``.

    Each flag parses its field's type (bools take ``True``/``False``/``true``/``false``/``1``/``0``, like the
    original's ``ast.literal_eval``; ints also take integral floats such as ``8.0``) and has
    ``default=argparse.SUPPRESS``, so only flags actually given appear in the namespace. Ranges are checked
    later, when the keywords reach :class:`FLContext`. ``parse_known_args`` works as usual, so scripts may
    keep their own extra flags (``--local_server_num``). Adding a flag the parser already has raises
    argparse's ``ArgumentError``.

    Args:
        parser: the parser (or subparser) to extend; the flags go into a "FL context" argument group.
    """
    group = parser.add_argument_group("FL context", "set_fl_context keywords; see spec/configuration.md")
    for name, attribute in FIELDS.items():
        kind = rules.kind_of(attribute)
        default = "<hidden>" if name in rules.SECRET_FIELDS else repr(attribute.default)
        doc = str(attribute.metadata.get("doc", "")).replace("%", "%%")
        group.add_argument(
            f"--{name}",
            dest=name,
            type=_argparse_type(_FROM_TEXT[kind], kind),
            default=argparse.SUPPRESS,
            metavar=kind.upper(),
            help=f"{doc} (default: {default.replace('%', '%%')})",
        )


def context_kwargs_from_args(namespace: argparse.Namespace) -> dict[str, object]:
    """Return the FLContext keywords present in ``namespace``: exactly the flags that were given.

    Attributes that are not FLContext fields (a script's own flags) are left out.
    """
    given = vars(namespace)
    return {name: given[name] for name in FIELD_NAMES if name in given}


# ------------------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------------------

ENVIRONMENT_VARIABLES: Final[Mapping[str, str]] = {
    "MS_ROLE": "ms_role",
    "MS_SERVER_NUM": "server_num",
    "MS_WORKER_NUM": "worker_num",
    "MS_SCHED_HOST": "scheduler_ip",
    "MS_SCHED_PORT": "scheduler_port",
    "MS_SCHED_MANAGE_PORT": "scheduler_manage_port",
    "MS_NODE_ID": "node_id",
}


def environment_kwargs(environ: Mapping[str, str]) -> dict[str, object]:
    """Read the ``MS_*`` variables of :data:`ENVIRONMENT_VARIABLES` into FLContext keywords.

    An unset or empty variable is skipped (an empty ``MS_NODE_ID`` means "no node id", as in the original).
    Each value is parsed and range-checked on its own; cross-field rules run when the keywords are applied.

    Args:
        environ: usually ``os.environ``.

    Returns:
        Keywords for :meth:`FLContext.from_kwargs` / :meth:`FLContext.evolve`.

    Raises:
        ConfigError: naming the variable, its value and what is allowed, when a value is malformed.
    """
    kwargs: dict[str, object] = {}
    for variable, name in ENVIRONMENT_VARIABLES.items():
        raw = environ.get(variable, "")
        if raw == "":
            continue
        kind = rules.kind_of(FIELDS[name])
        try:
            kwargs[name] = check_field(name, _FROM_TEXT[kind](raw))
        except ValueError as err:
            allowed = err.allowed if isinstance(err, rules.Refused) else f"text that parses as {kind}"
            raise ConfigError(
                f"environment variable {variable}={raw!r} is refused: it sets {name}, which expects {allowed}"
            ) from err
    return kwargs


def apply_environment(
    ctx: FLContext, environ: Mapping[str, str], *, explicit: Set[str] = frozenset()
) -> FLContext:
    """Return ``ctx`` with the ``MS_*`` environment applied, except for explicitly given keys.

    Precedence is defaults < environment < explicit: a key in ``explicit`` (a flag that was given, a keyword
    passed to :func:`set_fl_context`) keeps its value in ``ctx`` even when its variable is set. Pass
    ``explicit=frozenset(context_kwargs_from_args(ns))`` or :func:`explicit_fl_context_keys`. With no
    ``explicit`` set, the environment overrides everything it names.

    Args:
        ctx: the context to start from.
        environ: usually ``os.environ``.
        explicit: FLContext keys the caller set on purpose.

    Returns:
        The new, validated context.

    Raises:
        ConfigError: a malformed variable (named), an unknown key in ``explicit``, or a cross-field rule the
            combination breaks.
    """
    check_known(dict.fromkeys(explicit))
    changes = {k: v for k, v in environment_kwargs(environ).items() if k not in explicit}
    return ctx.evolve(**changes) if changes else ctx


def build_fl_context(
    kwargs: Mapping[str, object] | None = None, environ: Mapping[str, str] | None = None
) -> FLContext:
    """Build a context from defaults, the environment, then explicit ``kwargs``, validated once.

    Validating the merged keywords once avoids refusing a half-applied state (``--ms_role=MS_WORKER`` with
    ``MS_WORKER_NUM=1`` in the environment is fine, though either alone would not be).

    Args:
        kwargs: explicit keywords (for example from :func:`context_kwargs_from_args`); they win.
        environ: the environment to read (usually ``os.environ``); ``None`` reads none.

    Raises:
        ConfigError: as :func:`environment_kwargs` and :meth:`FLContext.from_kwargs`.
    """
    merged = environment_kwargs(environ) if environ is not None else {}
    merged.update(kwargs or {})
    return FLContext.from_kwargs(**merged)
