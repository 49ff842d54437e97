"""Start-up refusals: what an FL context may say but flcluster does not do yet.

FLContext represents every parameter of the original. A role must never start with a feature that is not
implemented turned on: its operator would believe in a protection it does not have.
:func:`refuse_unimplemented` is called once per role when its settings are derived
(:mod:`flcluster.settings`) and by the launchers before anything starts; it refuses with a message that
names the parameter, the value, says the feature is not implemented yet, and says what to set instead
(``spec/configuration.md`` §2.4).

Nothing is refused now: every ``encrypt_type`` runs (spec/privacy.md, spec/secure-aggregation.md), TLS
(``enable_ssl``, :mod:`flcluster.tls`) and client verification (``pki_verify``, :mod:`flcluster.verify`) are
implemented and check their own files when a role starts, and the last refusal, PW_ENCRYPT with
``pki_verify``, was lifted with the client-list signatures (``/pushListSign``, ``/getListSign``;
spec/secure-aggregation.md §R8). The function stays the one place a parameter of the original that flcluster
cannot honour is refused.
"""

from __future__ import annotations

from flcluster.config.context import FLContext

__all__ = ["refuse_unimplemented"]


def refuse_unimplemented(ctx: FLContext) -> None:
    """Refuse a context that turns on a feature flcluster does not implement yet (none at present).

    Args:
        ctx: the validated context a role is about to run with.

    Raises:
        ConfigError: never at present; a feature not implemented would be refused here, the message naming
            the parameter and what to set instead.
    """
    del ctx  # every feature the context can turn on is implemented (module docstring)
