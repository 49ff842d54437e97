"""The secure-aggregation rounds of one iteration, as the leader holds them (spec/secure-aggregation.md).

Theory of operation
-------------------
With ``encrypt_type`` PW_ENCRYPT (or STABLE_PW_ENCRYPT) a device goes through the cipher rounds between
startFLJob and getModel: exchangeKeys, getKeys, shareSecrets, getSecrets, then its masked updateModel, then
getClientList, with ``pki_verify`` pushListSign and getListSign (spec §R8), and reconstructSecrets (PW only).
The leader keeps the lists those rounds build (U1 and the public keys, K, U2 and the encrypted shares, S, L, P
and the list signatures, G, R and the reconstruction shares) in one
:class:`CipherRounds`, owned by its :class:`~flcluster.core.iteration.IterationMachine`: the iteration machine
checks what every request shares (instance state, iteration number, safemode), then hands the request here and
carries out what comes back.

What comes back is a :class:`Step`: the :class:`Verdict` for the device (retcode, reason, and the keys,
shares or client ids it gets; the machine adds the iteration and ``next_req_time``) and the effects on the
iteration, named by round so this module needs nothing of the iteration machine's: windows to arm and disarm
(the iteration machine's ``WindowKind`` values are the round names), a reason to fail the iteration, and
whether the aggregation may start. The rules (spec §R2–§R5):

- a **submit** round (exchangeKeys, shareSecrets, pushListSign) closes when every device that can still
  join it has joined, or when its window ends with at least its threshold of devices (a quorum, not a cap:
  improvement over reference §8.13); it fails the iteration when its window ends below the threshold;
- a **fetch** round (getKeys, getSecrets, getClientList, getListSign) serves its list only once that list is
  frozen, and must see its threshold of fetches before its window ends;
- each round's window is armed when the round before it closes or reaches its threshold;
- a repeat, a fetch before its list is frozen, a submit after it is frozen or a request from a device that is
  not entitled to the round gets its answer and changes nothing.

This module is pure: no clock, no I/O, no cryptography. It checks keys and shares for their shape only
(lengths, who they are addressed to); what they mean is for ``flcluster.secure``. Whether a list signature
verifies over U3 is the driver's to find out (``flcluster.verify.lists``): the event says so
(:attr:`PushListSignReceived.signs_u3`), and the rule uses it at its place in the order of checks.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Iterable
from fractions import Fraction
from typing import final

import attrs

from flcluster.errors import IllegalEvent
from flcluster.wire.codes import (
    CIPHER_ROUNDS_PW,
    CIPHER_ROUNDS_PW_LIST_SIGN,
    CIPHER_ROUNDS_STABLE_PW,
    IV_BYTES,
    KEY_BYTES,
    SALT_BYTES,
    CipherRound,
    ResponseCode,
)

__all__ = [
    "REASON_NOT_READY",
    "UPDATE_MODEL_WINDOW",
    "CipherAnswer",
    "CipherConfig",
    "CipherDevice",
    "CipherEvent",
    "CipherMode",
    "CipherRounds",
    "CipherSnapshot",
    "CipherState",
    "CipherThresholds",
    "DeviceKeys",
    "ExchangeKeysReceived",
    "GetClientListReceived",
    "GetKeysReceived",
    "GetListSignReceived",
    "GetSecretsReceived",
    "ListSignature",
    "PushListSignReceived",
    "ReconstructSecretsReceived",
    "Share",
    "ShareSecretsReceived",
    "Step",
    "SubmittedShares",
    "UnmaskInputs",
    "Verdict",
    "reason_cipher_lost",
]

#: The name of the updateModel window, which a cipher round may arm (the iteration machine's ``WindowKind``).
UPDATE_MODEL_WINDOW = "updateModel"

# ----------------------------------------------------------------------------------------------- reasons

REASON_EXCHANGE_REPEAT = "The server has received the request, please do not request again."
REASON_EXCHANGE_ACCEPTED = "Success, but the server is not ready yet."
REASON_EXCHANGE_ENOUGH = "Current amount for exchangeKey is enough. Please retry later."
REASON_KEYS_NOT_READY = "The server is not ready yet: the exchangeKeys round is open."
REASON_SHARE_NOT_IN_KEYS = "client share secret is not in getkeys list. && client is illegal"
REASON_SHARE_REPEAT = "client sharesecret already exists."
REASON_SHARE_ENOUGH = "Current amount for ShareSecretsKernel is enough."
REASON_SHARE_ACCEPTED = "OK"
REASON_SECRETS_NOT_READY = "The server is not ready yet: the shareSecrets round is open."
#: getClientList / reconstructSecrets before the client list is frozen (the original's words).
REASON_NOT_READY = "The server is not ready."
REASON_CLIENT_LIST_ACCEPTED = "send clients_list succeed!"
REASON_RECONSTRUCT_ENOUGH = "Current amount for ReconstructSecretsKernel is enough."
REASON_RECONSTRUCT_NOT_LISTED = "The client is not in update model client list."
REASON_RECONSTRUCT_REPEAT = "Client has sended messages."
REASON_RECONSTRUCT_WAITING = "Success, but the server is not ready to reconstruct secret yet."
REASON_RECONSTRUCT_DONE = "Success,the secret is reconstructing."
REASON_SUCCESS = "success"
# The list signatures (spec §R5, §R8; the original's words, trailing space included).
REASON_LIST_SIGN_ENOUGH = "Current amount for PushListSignKernel is enough."
REASON_LIST_SIGN_NOT_LISTED = (
    "client send signature is not in get update model client list. && client is illegal"
)
REASON_LIST_SIGN_REPEAT = "The server has received the request, please do not request again."
REASON_LIST_SIGN_BAD = (
    "verify signature failed: the client list signature does not verify over the update model client list"
)
REASON_LIST_SIGN_ACCEPTED = "send update model client list signature success. "
REASON_LIST_SIGNS_UNSENT = "client not send list signature, but in update model client list."
REASON_LIST_SIGNS_ILLEGAL = "client not send list signature, && client is illegal"

_WRONG_ITERATION = {
    CipherRound.EXCHANGE_KEYS: "iter num is error.",
    CipherRound.GET_KEYS: "GetKeys iteration number is invalid.",
    CipherRound.SHARE_SECRETS: "ShareSecretsKernel iteration invalid",
    CipherRound.GET_SECRETS: "GetSecrets iteration number is invalid.",
    CipherRound.GET_CLIENT_LIST: "iter num is error.",
    CipherRound.RECONSTRUCT_SECRETS: (
        "The iteration round of the client does not match the current iteration."
    ),
    CipherRound.PUSH_LIST_SIGN: "push list sign iteration number is invalid",
    CipherRound.GET_LIST_SIGN: "iter num is error.",
}


def reason_cipher_lost() -> str:
    """Failure reason when a restarted leader has lost the cipher lists of the running iteration (§R6)."""
    return (
        "The leader restarted during the secure-aggregation rounds of this iteration; their keys and shares "
        "are not kept. This iteration is invalid. Proceed to next iteration."
    )


def _round_timeout(name: str) -> str:
    return f"Round {name} timeout! This iteration is invalid. Proceed to next iteration."


# ------------------------------------------------------------------------------------------------ config


class CipherMode(enum.StrEnum):
    """The encrypt types that run cipher rounds (the ``encrypt_type`` values)."""

    PW = "PW_ENCRYPT"
    STABLE_PW = "STABLE_PW_ENCRYPT"


def _ceil(n: int, ratio: float) -> int:
    """``ceil(n × ratio)`` on the ratio's decimal value (as ``update_model_threshold``)."""
    return math.ceil(Fraction(repr(ratio)) * n)


@final
@attrs.frozen(kw_only=True)
class CipherConfig:
    """The secure-aggregation settings of a job (reference §1.1; built by ``flcluster.settings``).

    Attributes:
        mode: PW_ENCRYPT or STABLE_PW_ENCRYPT.
        share_secrets_ratio: In (0, 1]; shrinks the round thresholds (§R2).
        cipher_time_window: Milliseconds each cipher round's window lasts.
        reconstruct_secrets_threshold: ``t``, the Shamir threshold (reconstructSecrets needs ``t + 1``).
        list_sign: PW with ``pki_verify``: the list signatures run (pushListSign, getListSign; spec §R8).
    """

    mode: CipherMode = attrs.field(converter=CipherMode)
    share_secrets_ratio: float
    cipher_time_window: int
    reconstruct_secrets_threshold: int
    list_sign: bool = attrs.field(default=False)

    @list_sign.validator
    def _list_sign_is_pw(self, attribute: attrs.Attribute[bool], value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"list_sign must be a bool, got {value!r:.80}")
        if value and self.mode is not CipherMode.PW:
            raise ValueError(
                f"list_sign=True with mode={self.mode.value!r}: only PW_ENCRYPT has client lists to sign"
            )

    @property
    def rounds(self) -> tuple[CipherRound, ...]:
        """The cipher rounds this mode runs, in the device's order."""
        if self.mode is CipherMode.STABLE_PW:
            return CIPHER_ROUNDS_STABLE_PW
        return CIPHER_ROUNDS_PW_LIST_SIGN if self.list_sign else CIPHER_ROUNDS_PW

    @property
    def window_count(self) -> int:
        """How many cipher windows an iteration runs through (6 for PW, 8 with the list signatures, 2 for
        STABLE_PW; reference §2.5: one per round)."""
        return len(self.rounds)


@final
@attrs.frozen
class CipherThresholds:
    """The thresholds of the cipher rounds (spec/secure-aggregation.md §R2, the original's formulas)."""

    exchange_keys: int
    get_keys: int
    share_secrets: int
    get_secrets: int
    get_client_list: int
    push_list_sign: int
    get_list_sign: int
    reconstruct_secrets: int

    @classmethod
    def of(
        cls, config: CipherConfig, start_fl_job_threshold: int, update_model_threshold: int
    ) -> CipherThresholds:
        """The thresholds for a job with these startFLJob and updateModel thresholds."""
        r, u = config.share_secrets_ratio, update_model_threshold
        m = config.reconstruct_secrets_threshold + 1
        exchange = max(_ceil(start_fl_job_threshold, r), u)
        get_keys = max(_ceil(exchange, r), u)
        share = max(_ceil(get_keys, r), u)
        client_list = max(_ceil(u, r), m)
        push_list_sign = max(_ceil(client_list, r), m)
        return cls(
            exchange_keys=exchange,
            get_keys=get_keys,
            share_secrets=share,
            get_secrets=max(_ceil(share, r), u),
            get_client_list=client_list,
            push_list_sign=push_list_sign,
            get_list_sign=max(_ceil(push_list_sign, r), m),
            reconstruct_secrets=m,
        )


# ----------------------------------------------------------------------------------------------- records


def _bytes(instance: object, attribute: attrs.Attribute[bytes], value: bytes) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{attribute.name} must be bytes, got {type(value).__name__}")


def _str(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{attribute.name} must be a str, got {value!r:.80}")


def _int(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attribute.name} must be an int, got {value!r:.80}")


def _non_negative(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    _int(instance, attribute, value)
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    out = tuple(values)
    if not all(isinstance(v, str) for v in out):
        raise TypeError(f"expected strings, got {out!r:.80}")
    return out


def _cause(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty str, got {value!r}")


@final
@attrs.frozen
class DeviceKeys:
    """What a device sent at exchangeKeys: its two public keys and the IVs and salt of its masks.

    ``ind_iv`` (the IV of its individual mask) stays on the leader; getKeys relays the rest. With the list
    signatures (spec §R8.1) the keys also carry the request's ``timestamp``, its ``signature`` over
    ``c_pk ‖ s_pk ‖ timestamp ‖ iteration`` and the device's ``certificate_chain`` (key attestation, equip
    certificate), which getKeys relays so that the devices can check each other; otherwise they are empty.
    """

    fl_id: str = attrs.field(validator=_str)
    c_pk: bytes = attrs.field(validator=_bytes, repr=False)
    s_pk: bytes = attrs.field(validator=_bytes, repr=False)
    ind_iv: bytes = attrs.field(validator=_bytes, repr=False)
    pw_iv: bytes = attrs.field(validator=_bytes, repr=False)
    pw_salt: bytes = attrs.field(validator=_bytes, repr=False)
    timestamp: str = attrs.field(default="", validator=_str, repr=False)
    signature: bytes = attrs.field(default=b"", validator=_bytes, repr=False)
    certificate_chain: tuple[str, ...] = attrs.field(default=(), converter=_strings, repr=False)

    @property
    def signed(self) -> bool:
        """The keys carry a signature and certificates (the list signatures' relay, spec §R8.1)."""
        return bool(self.signature or self.certificate_chain or self.timestamp)

    def to_json_value(self) -> list[object]:
        """The keys as a JSON value (``fl_id`` left out): five hex strings, then, when :attr:`signed`, the
        timestamp, the signature in hex and the certificates."""
        out: list[object] = [b.hex() for b in (self.c_pk, self.s_pk, self.ind_iv, self.pw_iv, self.pw_salt)]
        if self.signed:
            out += [self.timestamp, self.signature.hex(), list(self.certificate_chain)]
        return out

    @classmethod
    def from_json_value(cls, fl_id: str, value: object) -> DeviceKeys:
        """The keys :meth:`to_json_value` wrote (five entries: a row written before the relay, or unsigned).

        Raises:
            TypeError, ValueError: ``value`` is not such a list.
        """
        if not isinstance(value, list) or len(value) not in (5, 8):
            raise ValueError(f"keys must be a list of 5 or 8, got {value!r:.80}")
        c_pk, s_pk, ind_iv, pw_iv, pw_salt = (bytes.fromhex(h) for h in value[:5])
        if len(value) == 5:
            return cls(fl_id, c_pk, s_pk, ind_iv, pw_iv, pw_salt)
        timestamp, signature, chain = value[5:]
        if not isinstance(chain, list):
            raise TypeError(f"certificate_chain must be a list, got {chain!r:.40}")
        return cls(fl_id, c_pk, s_pk, ind_iv, pw_iv, pw_salt, timestamp, bytes.fromhex(signature), chain)


@final
@attrs.frozen
class Share:
    """One ``ClientShare``: an (encrypted, at shareSecrets) share and the device it is to or from."""

    fl_id: str = attrs.field(validator=_str)
    share: bytes = attrs.field(validator=_bytes, repr=False)
    index: int = attrs.field(default=0, validator=_int)


def _shares(values: Iterable[Share]) -> tuple[Share, ...]:
    return tuple(values)


@final
@attrs.frozen
class ListSignature:
    """One ``ClientListSign``: the list signature a device of P pushed (spec §R8.2)."""

    fl_id: str = attrs.field(validator=_str)
    signature: bytes = attrs.field(validator=_bytes, repr=False)


@final
@attrs.frozen
class SubmittedShares:
    """The reconstruction shares one device of R sent (``fl_id`` is the sender)."""

    fl_id: str
    shares: tuple[Share, ...]


@final
@attrs.frozen
class UnmaskInputs:
    """What the unmasking of a PW iteration needs (carried by ``AggregateIteration``, spec §R6).

    Attributes:
        t: The Shamir threshold (``reconstruct_secrets_threshold``).
        u2: The devices that shared secrets, sorted (their pairwise masks may be in the sum).
        u3: The devices whose masked update is in the sum, sorted.
        keys: The exchangeKeys keys of every device of U1, sorted by fl_id.
        shares: The shares each device of R sent back, sorted by sender.
    """

    t: int
    u2: tuple[str, ...]
    u3: tuple[str, ...]
    keys: tuple[DeviceKeys, ...]
    shares: tuple[SubmittedShares, ...]


# ------------------------------------------------------------------------------------------------ events


@final
@attrs.frozen
class ExchangeKeysReceived:
    """A device's exchangeKeys (body already decoded where it landed)."""

    cause: str = attrs.field(validator=_cause)
    keys: DeviceKeys
    iteration: int = attrs.field(validator=_int)
    now_ms: int = attrs.field(validator=_non_negative)
    round: CipherRound = attrs.field(default=CipherRound.EXCHANGE_KEYS, init=False)

    @property
    def fl_id(self) -> str:
        """The device."""
        return self.keys.fl_id


@final
@attrs.frozen
class GetKeysReceived:
    """A device's getKeys."""

    cause: str = attrs.field(validator=_cause)
    fl_id: str = attrs.field(validator=_str)
    iteration: int = attrs.field(validator=_int)
    now_ms: int = attrs.field(validator=_non_negative)
    round: CipherRound = attrs.field(default=CipherRound.GET_KEYS, init=False)


@final
@attrs.frozen
class ShareSecretsReceived:
    """A device's shareSecrets: one encrypted share per other device of U1 (``Share.fl_id``: to whom)."""

    cause: str = attrs.field(validator=_cause)
    fl_id: str = attrs.field(validator=_str)
    iteration: int = attrs.field(validator=_int)
    shares: tuple[Share, ...] = attrs.field(converter=_shares)
    now_ms: int = attrs.field(validator=_non_negative)
    round: CipherRound = attrs.field(default=CipherRound.SHARE_SECRETS, init=False)


@final
@attrs.frozen
class GetSecretsReceived:
    """A device's getSecrets."""

    cause: str = attrs.field(validator=_cause)
    fl_id: str = attrs.field(validator=_str)
    iteration: int = attrs.field(validator=_int)
    now_ms: int = attrs.field(validator=_non_negative)
    round: CipherRound = attrs.field(default=CipherRound.GET_SECRETS, init=False)


@final
@attrs.frozen
class GetClientListReceived:
    """A device's getClientList."""

    cause: str = attrs.field(validator=_cause)
    fl_id: str = attrs.field(validator=_str)
    iteration: int = attrs.field(validator=_int)
    now_ms: int = attrs.field(validator=_non_negative)
    round: CipherRound = attrs.field(default=CipherRound.GET_CLIENT_LIST, init=False)


@final
@attrs.frozen
class ReconstructSecretsReceived:
    """A device's reconstructSecrets: the decrypted shares it holds (``Share.fl_id``: whose share it is)."""

    cause: str = attrs.field(validator=_cause)
    fl_id: str = attrs.field(validator=_str)
    iteration: int = attrs.field(validator=_int)
    shares: tuple[Share, ...] = attrs.field(converter=_shares)
    now_ms: int = attrs.field(validator=_non_negative)
    round: CipherRound = attrs.field(default=CipherRound.RECONSTRUCT_SECRETS, init=False)


@final
@attrs.frozen
class PushListSignReceived:
    """A device's pushListSign (spec §R8): its signature of U3, whose request signature the leader verified.

    Attributes:
        signature: The list signature, kept and relayed as sent.
        signs_u3: Whether ``signature`` verifies over U3's digest with the device's key, as the driver found
            against the machine's U3 at that moment (False while U3 is not final; spec §R8.3).
    """

    cause: str = attrs.field(validator=_cause)
    fl_id: str = attrs.field(validator=_str)
    iteration: int = attrs.field(validator=_int)
    signature: bytes = attrs.field(validator=_bytes, repr=False)
    signs_u3: bool = attrs.field(validator=attrs.validators.instance_of(bool))
    now_ms: int = attrs.field(validator=_non_negative)
    round: CipherRound = attrs.field(default=CipherRound.PUSH_LIST_SIGN, init=False)


@final
@attrs.frozen
class GetListSignReceived:
    """A device's getListSign (spec §R8)."""

    cause: str = attrs.field(validator=_cause)
    fl_id: str = attrs.field(validator=_str)
    iteration: int = attrs.field(validator=_int)
    now_ms: int = attrs.field(validator=_non_negative)
    round: CipherRound = attrs.field(default=CipherRound.GET_LIST_SIGN, init=False)


CipherEvent = (
    ExchangeKeysReceived
    | GetKeysReceived
    | ShareSecretsReceived
    | GetSecretsReceived
    | GetClientListReceived
    | PushListSignReceived
    | GetListSignReceived
    | ReconstructSecretsReceived
)

# ---------------------------------------------------------------------------------------- replies, steps


@final
@attrs.frozen
class Verdict:
    """What a cipher rule decided for one request (the machine adds the iteration and next_req_time)."""

    retcode: ResponseCode
    reason: str
    keys: tuple[DeviceKeys, ...] = ()
    shares: tuple[Share, ...] = ()
    clients: tuple[str, ...] = ()
    signatures: tuple[ListSignature, ...] = ()


@final
@attrs.frozen
class CipherAnswer:
    """The answer to a cipher request (the reply of a cipher event).

    Attributes:
        round: The round answered (it says which response table to encode).
        retcode: The ``retcode``.
        reason: The ``reason`` (tables without one do not send it).
        iteration: The current iteration.
        next_req_time_ms: Always after the request's ``now_ms``.
        keys: getKeys: U1's keys.
        shares: getSecrets: the shares addressed to the caller (``Share.fl_id``: the sender).
        clients: getClientList: U3.
        signatures: getListSign: the list signatures of P, sorted by fl_id.
    """

    round: CipherRound
    retcode: ResponseCode
    reason: str
    iteration: int
    next_req_time_ms: int
    keys: tuple[DeviceKeys, ...] = ()
    shares: tuple[Share, ...] = ()
    clients: tuple[str, ...] = ()
    signatures: tuple[ListSignature, ...] = ()


@final
@attrs.frozen
class Step:
    """What one cipher rule did: the verdict and the effects on the iteration (window names are round names).

    Attributes:
        verdict: The answer's content (None for a window that closed).
        disarm: Windows to disarm (those not armed are skipped).
        arm: Windows to arm (those already armed are kept).
        fail: The iteration fails with this reason.
        aggregate: R is complete: the aggregation (with unmasking) may start.
    """

    verdict: Verdict | None = None
    disarm: tuple[str, ...] = ()
    arm: tuple[str, ...] = ()
    fail: str | None = None
    aggregate: bool = False

    def then(self, other: Step) -> Step:
        """This step followed by ``other`` (the first verdict stands)."""
        return Step(
            self.verdict or other.verdict,
            self.disarm + other.disarm,
            self.arm + other.arm,
            self.fail or other.fail,
            self.aggregate or other.aggregate,
        )


@final
@attrs.frozen
class CipherDevice:
    """What the cipher lists hold about one device: its part of the leader's device row (spec §R6).

    Attributes:
        fl_id: The device.
        keys: Its exchangeKeys keys (in U1), or None.
        got_keys: It fetched U1 (in K).
        shares: The encrypted shares it sent, sorted by addressee (in U2), or None.
        got_secrets: It fetched its shares (in S).
        got_clients: It fetched U3 (in L).
        reconstruction: The shares it sent back, sorted by owner (in R), or None.
        list_signature: Its list signature (in P, spec §R8), or None.
        got_signatures: It fetched P's signatures (in G).
    """

    fl_id: str = attrs.field(validator=_str)
    keys: DeviceKeys | None = None
    got_keys: bool = False
    shares: tuple[Share, ...] | None = None
    got_secrets: bool = False
    got_clients: bool = False
    reconstruction: tuple[Share, ...] | None = None
    list_signature: bytes | None = None
    got_signatures: bool = False

    @property
    def empty(self) -> bool:
        """The device is in none of the lists."""
        return (
            self.keys is None
            and self.shares is None
            and self.reconstruction is None
            and self.list_signature is None
            and not (self.got_keys or self.got_secrets or self.got_clients or self.got_signatures)
        )

    def to_json_value(self) -> list[object]:
        """The record as a JSON value (bytes as hex; ``fl_id`` is the row's key and is left out).

        Six entries, and two more (the list signature, whether it fetched P) once the device is in P or G:
        a store written before the list signatures reads as it is (spec §R6, "Recovery").
        """
        k = self.keys
        out: list[object] = [
            None if k is None else k.to_json_value(),
            self.got_keys,
            None if self.shares is None else [[x.fl_id, x.share.hex(), x.index] for x in self.shares],
            self.got_secrets,
            self.got_clients,
            None
            if self.reconstruction is None
            else [[x.fl_id, x.share.hex(), x.index] for x in self.reconstruction],
        ]
        if self.list_signature is not None or self.got_signatures:
            out += [None if self.list_signature is None else self.list_signature.hex(), self.got_signatures]
        return out

    @classmethod
    def from_json_value(cls, fl_id: str, value: object) -> CipherDevice:
        """The record :meth:`to_json_value` wrote for ``fl_id``.

        Raises:
            ValueError: ``value`` is not such a record (the message says what is wrong).
        """
        try:
            if not isinstance(value, list) or len(value) not in (6, 8):
                raise ValueError(f"expected a list of 6 or 8, got {value!r:.80}")
            keys, got_keys, shares, got_secrets, got_clients, reconstruction = value[:6]
            signature, got_signatures = value[6:] if len(value) == 8 else (None, False)
            if signature is not None and not isinstance(signature, str):
                raise TypeError(f"the list signature must be hex text, got {signature!r:.40}")
            return cls(
                fl_id,
                None if keys is None else DeviceKeys.from_json_value(fl_id, keys),
                _flag(got_keys),
                _shares_from_json(shares),
                _flag(got_secrets),
                _flag(got_clients),
                _shares_from_json(reconstruction),
                None if signature is None else bytes.fromhex(signature),
                _flag(got_signatures),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not the cipher record of {fl_id!r}: {exc}") from None


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r:.40}")
    return value


def _shares_from_json(value: object) -> tuple[Share, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise TypeError(f"shares must be a list, got {value!r:.40}")
    return tuple(Share(f, bytes.fromhex(h), i) for f, h, i in value)


@final
@attrs.frozen
class CipherSnapshot:
    """The cipher lists as plain records, for the leader's store (spec §R6).

    The header of the leader's store carries the flags (``devices`` empty); each device's row carries its
    :class:`CipherDevice` (:mod:`flcluster.core.device_rows`).

    Attributes:
        lost: The lists of the running iteration were lost (a store written before they were kept).
        u1_closed: U1 is frozen.
        u2_closed: U2 is frozen.
        devices: Every device in some list, sorted by fl_id.
        p_closed: P (the list signatures, spec §R8) is frozen.
    """

    lost: bool = False
    u1_closed: bool = False
    u2_closed: bool = False
    devices: tuple[CipherDevice, ...] = ()
    p_closed: bool = False


@final
@attrs.frozen
class CipherState:
    """The lists of the running iteration as plain records (for tests and logs)."""

    lost: bool
    u1: tuple[str, ...]
    u1_closed: bool
    k: tuple[str, ...]
    u2: tuple[str, ...]
    u2_closed: bool
    s: tuple[str, ...]
    l: tuple[str, ...]  # noqa: E741 - the list's name in the spec
    r: tuple[str, ...]
    p: tuple[str, ...] = ()
    p_closed: bool = False
    g: tuple[str, ...] = ()


def _answer(retcode: ResponseCode, reason: str, **payload: object) -> Step:
    return Step(Verdict(retcode, reason, **payload))  # type: ignore[arg-type]


def _ok(reason: str) -> Step:
    return _answer(ResponseCode.SUCCEED, reason)


def _out_of_time(reason: str) -> Step:
    return _answer(ResponseCode.OutOfTime, reason)


def _request_error(reason: str) -> Step:
    return _answer(ResponseCode.RequestError, reason)


def _not_ready(reason: str) -> Step:
    return _answer(ResponseCode.SucNotReady, reason)


# ------------------------------------------------------------------------------------------------ rules


class CipherRounds:
    """The cipher lists of the current iteration and the rules of their rounds (module docstring)."""

    __slots__ = (
        "_g",
        "_k",
        "_l",
        "_lost",
        "_p",
        "_p_closed",
        "_r",
        "_s",
        "_u1",
        "_u1_closed",
        "_u2",
        "_u2_closed",
        "config",
        "thresholds",
    )

    def __init__(self, config: CipherConfig, thresholds: CipherThresholds, *, lost: bool = False) -> None:
        """Empty lists; ``lost``: a leader rebuilt from its store mid-iteration (the lists are gone, §R6)."""
        self.config = config
        self.thresholds = thresholds
        self._lost = lost
        self._u1: dict[str, DeviceKeys] = {}
        self._u1_closed = False
        self._k: set[str] = set()
        self._u2: dict[str, tuple[Share, ...]] = {}
        self._u2_closed = False
        self._s: set[str] = set()
        self._l: set[str] = set()
        self._p: dict[str, bytes] = {}
        self._p_closed = False
        self._g: set[str] = set()
        self._r: dict[str, tuple[Share, ...]] = {}

    # ---------------------------------------------------------------------------------- queries

    @property
    def lost(self) -> bool:
        """True when the lists of the running iteration were lost with a leader restart."""
        return self._lost

    @property
    def pw(self) -> bool:
        """True in PW_ENCRYPT (full protocol), False in STABLE_PW_ENCRYPT (keys only)."""
        return self.config.mode is CipherMode.PW

    @property
    def list_sign(self) -> bool:
        """True when the list signatures run (PW_ENCRYPT with ``pki_verify``, spec §R8)."""
        return self.config.list_sign

    def state(self) -> CipherState:
        """The lists as plain sorted records."""
        return CipherState(
            lost=self._lost,
            u1=tuple(sorted(self._u1)),
            u1_closed=self._u1_closed,
            k=tuple(sorted(self._k)),
            u2=tuple(sorted(self._u2)),
            u2_closed=self._u2_closed,
            s=tuple(sorted(self._s)),
            l=tuple(sorted(self._l)),
            r=tuple(sorted(self._r)),
            p=tuple(sorted(self._p)),
            p_closed=self._p_closed,
            g=tuple(sorted(self._g)),
        )

    def device_ids(self) -> set[str]:
        """Every device in some list."""
        return (
            set(self._u1)
            | self._k
            | set(self._u2)
            | self._s
            | self._l
            | set(self._r)
            | set(self._p)
            | self._g
        )

    def device(self, fl_id: str) -> CipherDevice | None:
        """What the lists hold about ``fl_id`` (None when it is in none of them)."""
        record = CipherDevice(
            fl_id,
            self._u1.get(fl_id),
            fl_id in self._k,
            self._u2.get(fl_id),
            fl_id in self._s,
            fl_id in self._l,
            self._r.get(fl_id),
            self._p.get(fl_id),
            fl_id in self._g,
        )
        return None if record.empty else record

    def snapshot(self, *, devices: bool = True) -> CipherSnapshot:
        """The lists as plain records (``devices=False``: the flags only, the header's part)."""
        records: tuple[CipherDevice, ...] = ()
        if devices:
            found = (self.device(f) for f in sorted(self.device_ids()))
            records = tuple(r for r in found if r is not None)
        return CipherSnapshot(self._lost, self._u1_closed, self._u2_closed, records, self._p_closed)

    def restore(self, snapshot: CipherSnapshot) -> None:
        """Replace the lists with the snapshot's (a leader rebuilt from its store).

        Raises:
            ValueError: the snapshot breaks a rule no run can break (K ⊆ U1, U2 ⊆ K, S ⊆ U2, R ⊆ L, P ⊆ L,
                G ⊆ P; the list signatures only where they run).
        """
        self.reset()
        self._lost = snapshot.lost
        self._u1_closed = snapshot.u1_closed
        self._u2_closed = snapshot.u2_closed
        self._p_closed = snapshot.p_closed
        for d in snapshot.devices:
            if d.keys is not None:
                self._u1[d.fl_id] = d.keys
            if d.got_keys:
                self._k.add(d.fl_id)
            if d.shares is not None:
                self._u2[d.fl_id] = d.shares
            if d.got_secrets:
                self._s.add(d.fl_id)
            if d.got_clients:
                self._l.add(d.fl_id)
            if d.reconstruction is not None:
                self._r[d.fl_id] = d.reconstruction
            if d.list_signature is not None:
                self._p[d.fl_id] = d.list_signature
            if d.got_signatures:
                self._g.add(d.fl_id)
        problems = [
            f"{name} holds {sorted(a - b)[:3]!r}, not in {outer}"
            for name, a, outer, b in (
                ("K", self._k, "U1", set(self._u1)),
                ("U2", set(self._u2), "K", self._k),
                ("S", self._s, "U2", set(self._u2)),
                ("R", set(self._r), "L", self._l),
                ("P", set(self._p), "L", self._l),
                ("G", self._g, "P", set(self._p)),
            )
            if a - b
        ]
        if (self._p or self._p_closed) and not self.list_sign:
            problems.append("P is not empty or frozen but this job runs no list signatures")
        if (self._k or self._u2) and not self._u1_closed:
            problems.append("K or U2 is not empty but U1 is not frozen")
        if self._s and not self._u2_closed:
            problems.append("S is not empty but U2 is not frozen")
        if problems:
            self.reset()
            raise ValueError("inconsistent cipher lists: " + "; ".join(problems))

    def serves(self, round_: CipherRound) -> bool:
        """True when this mode runs ``round_``."""
        return round_ in self.config.rounds

    def wrong_iteration(self, round_: CipherRound) -> str:
        """The reason of the OutOfTime for a request naming another iteration (the original's, per round)."""
        return _WRONG_ITERATION[round_]

    def may_upload(self, fl_id: str) -> bool:
        """Whether ``fl_id`` may send updateModel: it fetched its secrets (PW) or the keys (STABLE_PW)."""
        return fl_id in (self._s if self.pw else self._k)

    def upload_refusal(self, fl_id: str) -> str:
        """The reason an updateModel from a device that may not upload is refused (spec §R5)."""
        what = "secrets" if self.pw else "keys"
        return f"The fl_id {fl_id} did not get the {what} of this iteration; it cannot upload."

    def stable_target(self) -> int | None:
        """STABLE_PW: the counted updates that start the aggregation (all of U1, once frozen); else None."""
        if self.pw or not self._u1_closed:
            return None
        return len(self._u1)

    def unmask_inputs(self, u3: Collection[str]) -> UnmaskInputs:
        """What the unmasking needs, once R is complete (spec §R6)."""
        return UnmaskInputs(
            t=self.config.reconstruct_secrets_threshold,
            u2=tuple(sorted(self._u2)),
            u3=tuple(sorted(u3)),
            keys=tuple(self._u1[f] for f in sorted(self._u1)),
            shares=tuple(SubmittedShares(f, self._r[f]) for f in sorted(self._r)),
        )

    # -------------------------------------------------------------------------- iteration hooks

    def reset(self) -> None:
        """The iteration ended: empty every list (the next iteration's lists are intact)."""
        self._lost = False
        self._u1.clear()
        self._u1_closed = False
        self._k.clear()
        self._u2.clear()
        self._u2_closed = False
        self._s.clear()
        self._l.clear()
        self._p.clear()
        self._p_closed = False
        self._g.clear()
        self._r.clear()

    def start_round_closed(self) -> Step:
        """The startFLJob round closed: the exchangeKeys window starts (in place of the updateModel one)."""
        if self._u1_closed:
            return Step()
        return Step(arm=(CipherRound.EXCHANGE_KEYS.value,))

    def unmasking_began(self) -> Step:
        """PW: the updateModel threshold is reached; the getClientList window starts."""
        return Step(
            disarm=(CipherRound.GET_SECRETS.value, UPDATE_MODEL_WINDOW),
            arm=(CipherRound.GET_CLIENT_LIST.value,),
        )

    def window_closed(self, name: str) -> Step:
        """The window of round ``name`` ended (the machine has already dropped it from its armed windows)."""
        t = self.thresholds
        if name == CipherRound.EXCHANGE_KEYS and not self._u1_closed and len(self._u1) >= t.exchange_keys:
            return self._close_u1()
        if name == CipherRound.SHARE_SECRETS and not self._u2_closed and len(self._u2) >= t.share_secrets:
            return self._close_u2()
        if name == CipherRound.PUSH_LIST_SIGN and not self._p_closed and len(self._p) >= t.push_list_sign:
            return self._close_p()
        return Step(fail=_round_timeout(name))

    # ---------------------------------------------------------------------------------- requests

    def exchange_keys(self, ev: ExchangeKeysReceived, devices: Collection[str], start_closed: bool) -> Step:
        """exchangeKeys (spec §R5): join U1; U1 closes once every device of the iteration is in it."""
        fl_id = ev.fl_id
        if fl_id in self._u1:
            return _ok(REASON_EXCHANGE_REPEAT)
        if self._u1_closed:
            return _out_of_time(REASON_EXCHANGE_ENOUGH)
        if fl_id not in devices:
            return _out_of_time(f"devices_meta for {fl_id} is not set. Please retry later.")
        problem = self._malformed_keys(ev.keys)
        if problem:
            return _request_error(f"exchangeKeys keys are malformed: {problem}")
        self._u1[fl_id] = ev.keys
        step = _ok(REASON_EXCHANGE_ACCEPTED)
        if start_closed and len(self._u1) >= len(devices):
            step = step.then(self._close_u1())
        return step

    def get_keys(self, ev: GetKeysReceived) -> Step:
        """getKeys: U1's keys, once U1 is frozen, to a device of U1 (which joins K)."""
        if not self._u1_closed:
            return _not_ready(REASON_KEYS_NOT_READY)
        if ev.fl_id not in self._u1:
            return _request_error(f"The fl_id {ev.fl_id} is not in the exchangeKeys list.")
        first = ev.fl_id not in self._k
        self._k.add(ev.fl_id)
        keys = tuple(self._u1[f] for f in sorted(self._u1))
        step = _answer(ResponseCode.SUCCEED, REASON_SUCCESS, keys=keys)
        if first and len(self._k) == self.thresholds.get_keys and not self._u2_closed:
            after = CipherRound.SHARE_SECRETS.value if self.pw else UPDATE_MODEL_WINDOW
            step = step.then(Step(disarm=(CipherRound.GET_KEYS.value,), arm=(after,)))
        return step

    def share_secrets(self, ev: ShareSecretsReceived) -> Step:
        """shareSecrets: a device of K joins U2 with one share per other device of U1."""
        fl_id = ev.fl_id
        if fl_id not in self._k:
            return _request_error(REASON_SHARE_NOT_IN_KEYS)
        if fl_id in self._u2:
            return _ok(REASON_SHARE_REPEAT)
        if self._u2_closed:
            return _out_of_time(REASON_SHARE_ENOUGH)
        problem = self._malformed_shares(ev.shares, set(self._u1) - {fl_id}, exact=True)
        if problem:
            return _request_error(f"shareSecrets shares are malformed: {problem}")
        self._u2[fl_id] = tuple(sorted(ev.shares, key=lambda s: s.fl_id))
        step = _ok(REASON_SHARE_ACCEPTED)
        if len(self._u2) >= len(self._u1):
            step = step.then(self._close_u2())
        return step

    def get_secrets(self, ev: GetSecretsReceived) -> Step:
        """getSecrets: the shares U2 sent to the caller, once U2 is frozen (the caller joins S)."""
        fl_id = ev.fl_id
        if not self._u2_closed:
            return _not_ready(REASON_SECRETS_NOT_READY)
        if fl_id not in self._u2:
            return _request_error(f"The fl_id {fl_id} is not in the shareSecrets list.")
        first = fl_id not in self._s
        self._s.add(fl_id)
        mine = []
        for sender in sorted(self._u2):
            if sender == fl_id:
                continue
            for share in self._u2[sender]:
                if share.fl_id == fl_id:
                    mine.append(Share(sender, share.share, share.index))
                    break
        step = _answer(ResponseCode.SUCCEED, REASON_SUCCESS, shares=tuple(mine))
        if first and len(self._s) == self.thresholds.get_secrets:
            step = step.then(Step(disarm=(CipherRound.GET_SECRETS.value,), arm=(UPDATE_MODEL_WINDOW,)))
        return step

    def get_client_list(self, ev: GetClientListReceived, u3: tuple[str, ...] | None) -> Step:
        """getClientList (PW, unmasking): U3 once it is final (``u3``; None while not) to a device of U3."""
        if u3 is None:
            return _not_ready(REASON_NOT_READY)
        if ev.fl_id not in u3:
            return _request_error(f"fl_id: {ev.fl_id} is not in the update_model_clients")
        first = ev.fl_id not in self._l
        self._l.add(ev.fl_id)
        step = _answer(ResponseCode.SUCCEED, REASON_CLIENT_LIST_ACCEPTED, clients=u3)
        if first and len(self._l) == self.thresholds.get_client_list:
            after = CipherRound.PUSH_LIST_SIGN if self.list_sign else CipherRound.RECONSTRUCT_SECRETS
            step = step.then(Step(disarm=(CipherRound.GET_CLIENT_LIST.value,), arm=(after.value,)))
        return step

    def push_list_sign(self, ev: PushListSignReceived, u3: tuple[str, ...] | None) -> Step:
        """pushListSign (spec §R5, §R8.3): a device of L joins P with its signature of U3.

        ``u3`` is U3 once final (None while not). P closes once it holds every device of U3.
        """
        fl_id = ev.fl_id
        if u3 is None:
            return _not_ready(REASON_NOT_READY)
        listed = fl_id in u3
        if self._p_closed:
            return _ok(REASON_LIST_SIGN_ENOUGH) if listed else _out_of_time(REASON_LIST_SIGN_ENOUGH)
        if fl_id not in self._l:
            return _ok(REASON_LIST_SIGN_NOT_LISTED) if listed else _out_of_time(REASON_LIST_SIGN_NOT_LISTED)
        if fl_id in self._p:
            return _ok(REASON_LIST_SIGN_REPEAT)
        if not ev.signs_u3:
            return _request_error(REASON_LIST_SIGN_BAD)
        self._p[fl_id] = ev.signature
        step = _ok(REASON_LIST_SIGN_ACCEPTED)
        if len(self._p) >= len(u3):
            step = step.then(self._close_p())
        return step

    def get_list_sign(self, ev: GetListSignReceived, u3: tuple[str, ...] | None) -> Step:
        """getListSign (spec §R5, §R8.3): P's signatures, once P is frozen, to a device of P (joins G)."""
        fl_id = ev.fl_id
        if u3 is None or not self._p_closed:
            return _not_ready(REASON_NOT_READY)
        signatures = tuple(ListSignature(f, self._p[f]) for f in sorted(self._p))
        if fl_id not in self._p:
            if fl_id in u3:
                return _answer(ResponseCode.SUCCEED, REASON_LIST_SIGNS_UNSENT, signatures=signatures)
            return _out_of_time(REASON_LIST_SIGNS_ILLEGAL)
        first = fl_id not in self._g
        self._g.add(fl_id)
        step = _answer(ResponseCode.SUCCEED, REASON_LIST_SIGN_ACCEPTED, signatures=signatures)
        if first and len(self._g) == self.thresholds.get_list_sign:
            step = step.then(
                Step(disarm=(CipherRound.GET_LIST_SIGN.value,), arm=(CipherRound.RECONSTRUCT_SECRETS.value,))
            )
        return step

    def reconstruct_secrets(
        self, ev: ReconstructSecretsReceived, u3: tuple[str, ...] | None, *, aggregating: bool
    ) -> Step:
        """reconstructSecrets (PW): a device of L joins R with its shares; R complete at ``t + 1``.

        ``u3`` is U3 once final (None while not, or before the unmasking phase); ``aggregating``: R is
        complete and the iteration is aggregating.
        """
        fl_id = ev.fl_id
        if aggregating:
            assert u3 is not None
            if fl_id in u3:
                return _ok(REASON_RECONSTRUCT_ENOUGH)
            return _out_of_time(REASON_RECONSTRUCT_ENOUGH)
        if u3 is None:
            return _not_ready(REASON_NOT_READY)
        if fl_id not in self._l:
            if fl_id in u3:
                return _ok(f"The client {fl_id} is not in get clients list, but in update model client list.")
            return _request_error(REASON_RECONSTRUCT_NOT_LISTED)
        if fl_id in self._r:
            return _ok(REASON_RECONSTRUCT_REPEAT)
        problem = self._malformed_shares(ev.shares, set(self._u2) - {fl_id}, exact=False)
        if problem:
            return _request_error(f"reconstructSecrets shares are malformed: {problem}")
        first = not self._r
        self._r[fl_id] = tuple(sorted(ev.shares, key=lambda s: s.fl_id))
        if len(self._r) >= self.thresholds.reconstruct_secrets:
            every = tuple(r.value for r in self.config.rounds)
            return Step(Verdict(ResponseCode.SUCCEED, REASON_RECONSTRUCT_DONE), disarm=every, aggregate=True)
        step = _ok(REASON_RECONSTRUCT_WAITING)
        if first:
            step = step.then(Step(arm=(CipherRound.RECONSTRUCT_SECRETS.value,)))
        return step

    # ---------------------------------------------------------------------------------- helpers

    def _close_u1(self) -> Step:
        self._u1_closed = True
        return Step(
            disarm=(CipherRound.EXCHANGE_KEYS.value,),
            arm=(CipherRound.GET_KEYS.value,),
        )

    def _close_u2(self) -> Step:
        self._u2_closed = True
        return Step(
            disarm=(CipherRound.SHARE_SECRETS.value, CipherRound.GET_KEYS.value),
            arm=(CipherRound.GET_SECRETS.value,),
        )

    def _close_p(self) -> Step:
        self._p_closed = True
        return Step(
            disarm=(CipherRound.PUSH_LIST_SIGN.value, CipherRound.GET_CLIENT_LIST.value),
            arm=(CipherRound.GET_LIST_SIGN.value,),
        )

    def _malformed_keys(self, keys: DeviceKeys) -> str:
        """What is wrong with the shape of ``keys`` ('' when nothing; spec §R7)."""
        problems = []
        c_pk_ok = len(keys.c_pk) == KEY_BYTES or (not self.pw and not keys.c_pk)
        if not c_pk_ok:
            problems.append(f"c_pk has {len(keys.c_pk)} bytes, expected {KEY_BYTES}")
        if len(keys.s_pk) != KEY_BYTES:
            problems.append(f"s_pk has {len(keys.s_pk)} bytes, expected {KEY_BYTES}")
        for name in ("ind_iv", "pw_iv"):
            size = len(getattr(keys, name))
            if size != IV_BYTES:
                problems.append(f"{name} has {size} bytes, expected {IV_BYTES}")
        if len(keys.pw_salt) != SALT_BYTES:
            problems.append(f"pw_salt has {len(keys.pw_salt)} bytes, expected {SALT_BYTES}")
        return "; ".join(problems)

    @staticmethod
    def _malformed_shares(shares: tuple[Share, ...], allowed: set[str], *, exact: bool) -> str:
        """What is wrong with ``shares`` ('' when nothing): each addressed to (or of) a device of ``allowed``,
        none twice, none empty; ``exact``: every device of ``allowed`` has one."""
        named = [s.fl_id for s in shares]
        problems = []
        twice = sorted({f for f in named if named.count(f) > 1})
        if twice:
            problems.append(f"{len(twice)} device(s) named twice, such as {twice[0]!r:.80}")
        strangers = sorted(set(named) - allowed)
        if strangers:
            problems.append(
                f"{len(strangers)} share(s) name a device not allowed here, such as {strangers[0]!r:.80}"
            )
        missing = sorted(allowed - set(named)) if exact else []
        if missing:
            problems.append(f"no share for {len(missing)} device(s), such as {missing[0]!r:.80}")
        if any(not s.share for s in shares):
            problems.append("an empty share")
        if any(s.index < 0 for s in shares):
            problems.append("a negative index")
        return "; ".join(problems)


def check_served(rounds: CipherRounds | None, round_: CipherRound) -> CipherRounds:
    """The cipher rounds that serve ``round_``.

    Raises:
        IllegalEvent: the job runs no cipher rounds, or not this one (its route does not exist).
    """
    if rounds is None:
        raise IllegalEvent(f"{round_.value} is not a round of this job: encrypt_type runs no cipher rounds")
    if not rounds.serves(round_):
        raise IllegalEvent(f"{round_.value} is not a round of {rounds.config.mode.value}")
    return rounds
