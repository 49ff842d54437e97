"""Start-up refusals: what an FL context may say but flcluster does not do yet.

FLContext represents every parameter of the original, including features flcluster has not implemented:
pairwise-masked secure aggregation (``encrypt_type`` ``PW_ENCRYPT`` and ``STABLE_PW_ENCRYPT``;
``DP_ENCRYPT`` and ``SIGNDS`` run, spec/privacy.md). Their cross-field rules still hold in FLContext. A
role, however, must never start with one of them turned on: it would aggregate updates in the clear while
its operator believes otherwise. (TLS, ``enable_ssl``, is implemented: :mod:`flcluster.tls` checks its files
when a role starts; so is ``pki_verify``: :mod:`flcluster.verify` checks its files when a Server starts.)
:func:`refuse_unimplemented` is called once per role when its
settings are derived (:mod:`flcluster.settings`), and refuses with a message that names the parameter, the
value, says the feature is not implemented yet, and says what to set instead (``spec/configuration.md`` §2.4).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from flcluster.config.context import FLContext
from flcluster.errors import ConfigError

__all__ = ["refuse_unimplemented"]

#: The encrypt types flcluster does not run yet (DP_ENCRYPT and SIGNDS run: spec/privacy.md).
_ENCRYPTION: Final[Mapping[str, str]] = {
    "PW_ENCRYPT": "pairwise-masked secure aggregation (PW_ENCRYPT)",
    "STABLE_PW_ENCRYPT": "pairwise-masked secure aggregation (STABLE_PW_ENCRYPT)",
}


def refuse_unimplemented(ctx: FLContext) -> None:
    """Refuse a context that turns on a feature flcluster does not implement yet.

    Args:
        ctx: the validated context a role is about to run with.

    Raises:
        ConfigError: ``encrypt_type`` ``'PW_ENCRYPT'`` or ``'STABLE_PW_ENCRYPT'``; the message names the
            parameter and its value and says what to set instead.
    """
    what = _ENCRYPTION.get(ctx.encrypt_type)
    if what is not None:
        raise ConfigError(
            f"encrypt_type={ctx.encrypt_type!r} is refused: {what} is not implemented yet in flcluster, so "
            "updates would be aggregated without it; set encrypt_type='NOT_ENCRYPT'"
        )
