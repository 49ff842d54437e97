"""Start-up refusals: what an FL context may say but flcluster does not do yet.

FLContext represents every parameter of the original, including features flcluster has not implemented:
the list signatures of PW_ENCRYPT under ``pki_verify`` (every ``encrypt_type`` runs: spec/privacy.md,
spec/secure-aggregation.md). Their cross-field rules still hold in FLContext. A role, however, must never
start with one of them turned on: its operator would believe in a protection it does not have. (TLS,
``enable_ssl``, is implemented: :mod:`flcluster.tls` checks its files when a role starts; so is
``pki_verify``: :mod:`flcluster.verify` checks its files when a Server starts.)
:func:`refuse_unimplemented` is called once per role when its
settings are derived (:mod:`flcluster.settings`), and refuses with a message that names the parameter, the
value, says the feature is not implemented yet, and says what to set instead (``spec/configuration.md`` §2.4).
"""

from __future__ import annotations

from flcluster.config.context import FLContext
from flcluster.errors import ConfigError

__all__ = ["refuse_unimplemented"]


def refuse_unimplemented(ctx: FLContext) -> None:
    """Refuse a context that turns on a feature flcluster does not implement yet.

    Every ``encrypt_type`` runs now (PW_ENCRYPT and STABLE_PW_ENCRYPT: spec/secure-aggregation.md). What is
    left is the list signatures of PW_ENCRYPT under ``pki_verify`` (``/pushListSign``, ``/getListSign``):
    without them a lying Server could tell devices different client lists, which the operator who turned on
    ``pki_verify`` believes is excluded.

    Args:
        ctx: the validated context a role is about to run with.

    Raises:
        ConfigError: ``encrypt_type='PW_ENCRYPT'`` with ``pki_verify``; the message names both parameters
            and says what to set instead.
    """
    if ctx.encrypt_type == "PW_ENCRYPT" and ctx.pki_verify:
        raise ConfigError(
            "encrypt_type='PW_ENCRYPT' with pki_verify=True is refused: the client-list signatures "
            "(/pushListSign, /getListSign) are not implemented yet in flcluster, so the client lists would "
            "not be signed; set pki_verify=False or encrypt_type='STABLE_PW_ENCRYPT'"
        )
