"""The decoded secure-aggregation bodies as frozen records (spec/cipher.fbs; spec/secure-aggregation.md).

Theory of operation
-------------------
One record per request table a Server reads and per response table a device reads, for the rounds
exchangeKeys, getKeys, shareSecrets, getSecrets, getClientList, pushListSign, getListSign and
reconstructSecrets. The keys and shares
they carry are the core's records (:class:`~flcluster.core.cipher.DeviceKeys`,
:class:`~flcluster.core.cipher.Share`), so what a Server decodes goes to the leader's machine as it is. The
codecs (:mod:`flcluster.wire.cipher_server_codec`, :mod:`flcluster.wire.cipher_client_codec`) make them;
nothing here reads or writes bytes.
"""

from __future__ import annotations

import attrs

from flcluster.core.cipher import DeviceKeys, ListSignature, Share

__all__ = [
    "CipherAck",
    "ClientListResponse",
    "DeviceKeys",
    "ExchangeKeysRequest",
    "FetchRequest",
    "KeysResponse",
    "ListSignRequest",
    "ListSignature",
    "ListSignsResponse",
    "SecretsResponse",
    "Share",
    "SharesRequest",
]


@attrs.frozen
class ExchangeKeysRequest:
    """A decoded ``RequestExchangeKeys``: the device's keys (absent vectors read as empty bytes)."""

    keys: DeviceKeys
    iteration: int
    timestamp: str
    signature: bytes = b""
    certificate_chain: tuple[str, ...] = ()


@attrs.frozen
class FetchRequest:
    """A decoded ``GetExchangeKeys``, ``GetShareSecrets``, ``GetClientList`` or ``RequestAllClientListSign``
    (they share their fields)."""

    fl_id: str
    iteration: int
    timestamp: str
    signature: bytes = b""


@attrs.frozen
class SharesRequest:
    """A decoded ``RequestShareSecrets`` or ``SendReconstructSecret``."""

    fl_id: str
    iteration: int
    timestamp: str
    shares: tuple[Share, ...]
    signature: bytes = b""


@attrs.frozen
class ListSignRequest:
    """A decoded ``SendClientListSign`` (pushListSign, spec/secure-aggregation.md §R8.2).

    Attributes:
        signature: The list signature (of the digest of U3).
        req_signature: The request signature (over ``timestamp + str(iteration)``).
    """

    fl_id: str
    iteration: int
    timestamp: str
    signature: bytes = b""
    req_signature: bytes = b""


@attrs.frozen
class CipherAck:
    """A decoded ``ResponseExchangeKeys``, ``ResponseShareSecrets``, ``ResponseClientListSign`` or
    ``ReconstructSecret``."""

    retcode: int
    reason: str
    iteration: int
    next_req_time: str


@attrs.frozen
class KeysResponse:
    """A decoded ``ReturnExchangeKeys`` (getKeys); ``DeviceKeys.ind_iv`` is not relayed and reads as empty."""

    retcode: int
    iteration: int
    keys: tuple[DeviceKeys, ...]
    next_req_time: str

    @property
    def reason(self) -> str:
        """The table has no reason field; the retcode says it all."""
        return ""


@attrs.frozen
class SecretsResponse:
    """A decoded ``ReturnShareSecrets`` (getSecrets); ``Share.fl_id`` is the device that sent the share."""

    retcode: int
    iteration: int
    shares: tuple[Share, ...]
    next_req_time: str

    @property
    def reason(self) -> str:
        """The table has no reason field; the retcode says it all."""
        return ""


@attrs.frozen
class ListSignsResponse:
    """A decoded ``ReturnAllClientListSign`` (getListSign): the list signatures of P."""

    retcode: int
    reason: str
    signatures: tuple[ListSignature, ...]
    iteration: int
    next_req_time: str


@attrs.frozen
class ClientListResponse:
    """A decoded ``ReturnClientList`` (getClientList): U3."""

    retcode: int
    reason: str
    clients: tuple[str, ...]
    iteration: int
    next_req_time: str
