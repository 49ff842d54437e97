"""The secure-aggregation rounds every Server serves (spec/secure-aggregation.md §R1, §R6).

Theory of operation
-------------------
With ``encrypt_type`` PW_ENCRYPT (six rounds; eight with ``pki_verify``: pushListSign and getListSign, spec
§R8) or STABLE_PW_ENCRYPT (exchangeKeys and getKeys) the
Server's device route table gains one handler per cipher round (:func:`cipher_routes`). A handler decodes
the body where it landed (a malformed one gets the round's ``RequestError`` and never leaves this
Server), then forwards the body as it came to the leader through the Server's
:class:`~flcluster.runtime.rounds.LeaderLine`: a direct call on rank 0, a pipelined ``cipher_call`` frame
on a follower. The leader's answer (a response table or a plain text) goes back to the device byte for
byte. While no role is attached (or the link to the leader is down) the device gets the safemode text
and nothing changed.

The Server holds none of the cipher lists: they are the leader's (spec §R6).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from flcluster.errors import SchemaError
from flcluster.http.device import DeviceAnswer, DeviceHandler
from flcluster.wire.cipher_server_codec import decode_cipher_request, encode_cipher_error
from flcluster.wire.codes import (
    CIPHER_ROUNDS_PW,
    CIPHER_ROUNDS_PW_LIST_SIGN,
    CIPHER_ROUNDS_STABLE_PW,
    CipherRound,
    ResponseCode,
)

__all__ = ["CIPHER_MODES", "cipher_routes", "runs_cipher_rounds"]

#: The encrypt types that run cipher rounds, and their rounds.
CIPHER_MODES = {"PW_ENCRYPT": CIPHER_ROUNDS_PW, "STABLE_PW_ENCRYPT": CIPHER_ROUNDS_STABLE_PW}


def runs_cipher_rounds(encrypt_type: str) -> bool:
    """True when ``encrypt_type`` runs the cipher rounds."""
    return encrypt_type in CIPHER_MODES


def cipher_routes(
    encrypt_type: str,
    forward: Callable[[CipherRound, bytes], Awaitable[DeviceAnswer]],
    view: Callable[[], tuple[int, int]],
    *,
    list_sign: bool = False,
) -> dict[str, DeviceHandler]:
    """The cipher rounds' route table entries for ``encrypt_type`` (none without cipher rounds).

    Args:
        encrypt_type: The job's encrypt type.
        forward: Sends one decoded-once body to the leader and returns its answer.
        view: This Server's (iteration, next_req_time_ms), for the answers it makes itself.
        list_sign: ``pki_verify``: PW_ENCRYPT serves the list signatures too (spec/secure-aggregation.md §R8).
    """

    def handler(round_: CipherRound) -> DeviceHandler:
        async def serve(body: bytes) -> DeviceAnswer:
            try:
                decode_cipher_request(round_, body)
            except SchemaError as exc:
                iteration, next_ms = view()
                return encode_cipher_error(
                    round_,
                    retcode=int(ResponseCode.RequestError),
                    reason=str(exc),
                    iteration=iteration,
                    next_req_time=str(next_ms),
                )
            return await forward(round_, body)

        return serve

    rounds = CIPHER_MODES.get(encrypt_type, ())
    if list_sign and rounds == CIPHER_ROUNDS_PW:
        rounds = CIPHER_ROUNDS_PW_LIST_SIGN
    return {r.value: handler(r) for r in rounds}
