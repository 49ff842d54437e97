"""Start-up refusals: what an FL context may say but flcluster does not do yet.

FLContext represents every parameter of the original, including features flcluster has not implemented:
TLS (``enable_ssl``), device certificate verification (``pki_verify``) and pairwise-masked secure
aggregation (``encrypt_type`` ``PW_ENCRYPT`` and ``STABLE_PW_ENCRYPT``; ``DP_ENCRYPT`` and ``SIGNDS`` run,
spec/privacy.md). Their cross-field rules still hold in FLContext. A role, however, must
never start with one of them turned on: it would serve plain HTTP and plain TCP, or aggregate updates in the
clear, while its operator believes otherwise. :func:`refuse_unimplemented` is called once per role when its
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
        ConfigError: ``enable_ssl=True``, ``pki_verify=True`` or ``encrypt_type`` ``'PW_ENCRYPT'`` or
            ``'STABLE_PW_ENCRYPT'``; the message names the parameter and its value and says what to set
            instead.
    """
    if ctx.enable_ssl:
        raise ConfigError(
            f"enable_ssl={ctx.enable_ssl!r} is refused: TLS is not implemented yet in flcluster, so device "
            "HTTP and the cluster's TCP links would be plain text, not encrypted; set enable_ssl=False "
            "(and protect the links by other means, such as a private network or a TLS-terminating proxy)"
        )
    if ctx.pki_verify:
        raise ConfigError(
            f"pki_verify={ctx.pki_verify!r} is refused: verifying device certificates, signatures and "
            "timestamps is not implemented yet in flcluster, so no device would be verified; "
            "set pki_verify=False"
        )
    what = _ENCRYPTION.get(ctx.encrypt_type)
    if what is not None:
        raise ConfigError(
            f"encrypt_type={ctx.encrypt_type!r} is refused: {what} is not implemented yet in flcluster, so "
            "updates would be aggregated without it; set encrypt_type='NOT_ENCRYPT'"
        )
