# mypy: disallow-untyped-calls=False
"""Secure-aggregation codecs (spec/cipher.fbs; spec/secure-aggregation.md §R5, §R7).

Round trips of every cipher request and answer, bodies built directly with the flatc-generated builders (as
the original's Java client builds them), the limits (accepted exactly, refused one past), the required
fields, and a hypothesis fuzz: random bytes, truncations and mutations decode or raise SchemaError, nothing
else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import flatbuffers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flcluster.core.cipher import CipherAnswer, DeviceKeys, ListSignature, Share
from flcluster.errors import SchemaError
from flcluster.wire import cipher_client_codec as client
from flcluster.wire import cipher_server_codec as server
from flcluster.wire.cipher_records import (
    CipherAck,
    ExchangeKeysRequest,
    FetchRequest,
    ListSignRequest,
    ListSignsResponse,
    SharesRequest,
)
from flcluster.wire.codes import (
    MAX_FL_ID_BYTES,
    MAX_IV_BYTES,
    MAX_KEY_BYTES,
    MAX_SALT_BYTES,
    MAX_SHARE_BYTES,
    MAX_SHARES,
    MAX_SIGNATURE_BYTES,
    CipherRound,
    ResponseCode,
)
from flcluster.wire.fbs import ClientShare as fb_share
from flcluster.wire.fbs import GetExchangeKeys as fb_get_keys
from flcluster.wire.fbs import RequestExchangeKeys as fb_req_exchange
from flcluster.wire.fbs import RequestShareSecrets as fb_req_share
from flcluster.wire.fbs import SendClientListSign as fb_push_list_sign

KEYS = DeviceKeys("fl_lenet_3", b"c" * 32, b"s" * 32, b"i" * 16, b"p" * 16, b"t" * 32)
SHARES = (Share("fl_lenet_1", b"\x01" * 80, 0), Share("fl_lenet_2", b"\x02" * 80, 7))
FETCHES = (
    CipherRound.GET_KEYS,
    CipherRound.GET_SECRETS,
    CipherRound.GET_CLIENT_LIST,
    CipherRound.GET_LIST_SIGN,
)
SUBMITS = (CipherRound.SHARE_SECRETS, CipherRound.RECONSTRUCT_SECRETS)
ACKS = (
    CipherRound.EXCHANGE_KEYS,
    CipherRound.SHARE_SECRETS,
    CipherRound.RECONSTRUCT_SECRETS,
    CipherRound.PUSH_LIST_SIGN,
)
SIGNATURES = (ListSignature("fl_lenet_1", b"\x05" * 256), ListSignature("fl_lenet_2", b"\x06" * 72))


def exchange_body(keys: DeviceKeys = KEYS) -> bytes:
    return client.encode_exchange_keys_request(keys=keys, iteration=4, timestamp="1700000000000")


def valid_requests() -> dict[str, tuple[CipherRound, bytes]]:
    bodies = {"exchangeKeys": (CipherRound.EXCHANGE_KEYS, exchange_body())}
    for r in FETCHES:
        bodies[r.value] = (r, client.encode_fetch_request(r, fl_id="fl_lenet_3", iteration=4, timestamp="t"))
    for r in SUBMITS:
        body = client.encode_shares_request(r, fl_id="fl_lenet_3", iteration=4, timestamp="t", shares=SHARES)
        bodies[r.value] = (r, body)
    bodies["pushListSign"] = (
        CipherRound.PUSH_LIST_SIGN,
        client.encode_push_list_sign_request(
            fl_id="fl_lenet_3", iteration=4, timestamp="t", signature=b"L" * 256, req_signature=b"R" * 256
        ),
    )
    return bodies


def answers() -> dict[str, tuple[CipherRound, bytes]]:
    out = {}
    for r in CipherRound:
        answer = CipherAnswer(
            r,
            ResponseCode.SUCCEED,
            "ok",
            4,
            1_700_000_001_000,
            keys=(KEYS,) if r is CipherRound.GET_KEYS else (),
            shares=SHARES if r is CipherRound.GET_SECRETS else (),
            clients=("a", "b") if r is CipherRound.GET_CLIENT_LIST else (),
            signatures=SIGNATURES if r is CipherRound.GET_LIST_SIGN else (),
        )
        out[r.value] = (r, server.encode_cipher_answer(answer))
    return out


def decode_answer(round_: CipherRound, body: bytes) -> object:
    match round_:
        case CipherRound.GET_KEYS:
            return client.decode_get_keys_response(body)
        case CipherRound.GET_SECRETS:
            return client.decode_get_secrets_response(body)
        case CipherRound.GET_CLIENT_LIST:
            return client.decode_client_list_response(body)
        case CipherRound.GET_LIST_SIGN:
            return client.decode_list_signs_response(body)
        case _:
            return client.decode_ack(round_, body)


# ---------------------------------------------------------------------------------------------- round trips


def test_exchange_keys_round_trip() -> None:
    request = server.decode_cipher_request(CipherRound.EXCHANGE_KEYS, exchange_body())
    assert request == ExchangeKeysRequest(KEYS, 4, "1700000000000")
    assert isinstance(request, ExchangeKeysRequest) and request.keys.c_pk == KEYS.c_pk


def test_exchange_keys_with_signature_and_certificates_and_without_c_pk() -> None:
    keys = DeviceKeys("d", b"", b"s" * 32, b"i" * 16, b"p" * 16, b"t")
    body = client.encode_exchange_keys_request(
        keys=keys, iteration=1, timestamp="t", signature=b"sig", certificate_chain=("pem1", "pem2")
    )
    assert server.decode_exchange_keys(body) == ExchangeKeysRequest(keys, 1, "t", b"sig", ("pem1", "pem2"))


@pytest.mark.parametrize("round_", FETCHES)
def test_fetch_round_trip(round_: CipherRound) -> None:
    body = client.encode_fetch_request(round_, fl_id="x", iteration=9, timestamp="t", signature=b"s")
    assert server.decode_cipher_request(round_, body) == FetchRequest("x", 9, "t", b"s")


@pytest.mark.parametrize("round_", SUBMITS)
def test_shares_request_signature_round_trip(round_: CipherRound) -> None:
    """The request signature of shareSecrets and reconstructSecrets (field 4, spec/secure-aggregation.md
    §R8.6); an unsigned request reads as empty, for the leader to refuse under pki_verify."""
    body = client.encode_shares_request(
        round_, fl_id="x", iteration=9, timestamp="t", shares=SHARES, signature=b"S" * 256
    )
    assert server.decode_cipher_request(round_, body) == SharesRequest("x", 9, "t", SHARES, b"S" * 256)
    with pytest.raises(ValueError, match="signature may hold at most 1024 bytes"):
        client.encode_shares_request(
            round_, fl_id="x", iteration=9, timestamp="t", shares=SHARES, signature=b"S" * 1025
        )


@pytest.mark.parametrize("round_", SUBMITS)
def test_shares_round_trip(round_: CipherRound) -> None:
    body = client.encode_shares_request(round_, fl_id="x", iteration=9, timestamp="t", shares=SHARES)
    decoded = server.decode_cipher_request(round_, body)
    assert decoded == SharesRequest("x", 9, "t", SHARES)
    assert isinstance(decoded, SharesRequest)
    assert [s.share for s in decoded.shares] == [s.share for s in SHARES]


@pytest.mark.parametrize("round_", list(CipherRound))
def test_every_answer_round_trips(round_: CipherRound) -> None:
    _, body = answers()[round_.value]
    decoded = decode_answer(round_, body)
    assert getattr(decoded, "retcode") == 200  # noqa: B009
    assert getattr(decoded, "iteration") == 4  # noqa: B009
    assert getattr(decoded, "next_req_time") == "1700000001000"  # noqa: B009
    if round_ is CipherRound.GET_KEYS:
        (got,) = getattr(decoded, "keys")  # noqa: B009
        assert (got.fl_id, got.c_pk, got.s_pk, got.pw_iv, got.pw_salt) == (
            KEYS.fl_id, KEYS.c_pk, KEYS.s_pk, KEYS.pw_iv, KEYS.pw_salt,
        )  # fmt: skip
        assert got.ind_iv == b""  # the individual mask's IV stays on the leader
    elif round_ is CipherRound.GET_SECRETS:
        assert getattr(decoded, "shares") == SHARES  # noqa: B009
        assert [s.share for s in getattr(decoded, "shares")] == [s.share for s in SHARES]  # noqa: B009
    elif round_ is CipherRound.GET_CLIENT_LIST:
        assert getattr(decoded, "clients") == ("a", "b")  # noqa: B009
        assert getattr(decoded, "reason") == "ok"  # noqa: B009
    elif round_ is CipherRound.GET_LIST_SIGN:
        assert decoded == ListSignsResponse(200, "ok", SIGNATURES, 4, "1700000001000")
    else:
        assert decoded == CipherAck(200, "ok", 4, "1700000001000")


@pytest.mark.parametrize("round_", list(CipherRound))
def test_error_answers_carry_the_retcode(round_: CipherRound) -> None:
    body = server.encode_cipher_error(round_, retcode=300, reason="no", iteration=2, next_req_time="5")
    decoded = decode_answer(round_, body)
    assert getattr(decoded, "retcode") == 300  # noqa: B009
    assert getattr(decoded, "next_req_time") == "5"  # noqa: B009
    if round_ in ACKS or round_ in (CipherRound.GET_CLIENT_LIST, CipherRound.GET_LIST_SIGN):
        assert getattr(decoded, "reason") == "no"  # noqa: B009
    if round_ is CipherRound.GET_LIST_SIGN:
        assert getattr(decoded, "signatures") == ()  # noqa: B009


def test_push_list_sign_round_trip_and_its_schema_reason() -> None:
    body = client.encode_push_list_sign_request(
        fl_id="x", iteration=3, timestamp="17", signature=b"L" * 70, req_signature=b"R" * 71
    )
    assert server.decode_cipher_request(CipherRound.PUSH_LIST_SIGN, body) == ListSignRequest(
        "x", 3, "17", b"L" * 70, b"R" * 71
    )
    # Unsigned (a device without pki): both signatures read as empty, for the leader to refuse.
    bare = client.encode_push_list_sign_request(fl_id="x", iteration=3, timestamp="17", signature=b"")
    assert server.decode_push_list_sign(bare) == ListSignRequest("x", 3, "17")
    with pytest.raises(SchemaError) as caught:
        server.decode_push_list_sign(b"garbage!" * 4)
    assert caught.value.reason == "The schema of PushClientListSign is invalid."  # the original's words
    with pytest.raises(SchemaError) as caught:
        server.decode_fetch(b"garbage!" * 4, CipherRound.GET_LIST_SIGN)
    assert caught.value.reason == "The schema of RequestAllClientListSign is invalid."


def test_push_list_sign_as_the_java_client_builds_it_and_its_limits() -> None:
    """``SendClientListSign.createSendClientListSign(builder, id, iteration, time, signed, reqSigned)``."""

    def body(signature: int, req_signature: int, *, fl_id: bool = True) -> bytes:
        b = flatbuffers.Builder(0)
        fid, ts = b.CreateString("java"), b.CreateString("123")
        sig, req = b.CreateByteVector(b"s" * signature), b.CreateByteVector(b"r" * req_signature)
        m = fb_push_list_sign
        m.SendClientListSignStart(b)
        if fl_id:
            m.SendClientListSignAddFlId(b, fid)
        m.SendClientListSignAddIteration(b, 5)
        m.SendClientListSignAddTimestamp(b, ts)
        m.SendClientListSignAddSignature(b, sig)
        m.SendClientListSignAddReqSignature(b, req)
        b.Finish(m.SendClientListSignEnd(b))
        return bytes(b.Output())

    assert server.decode_push_list_sign(body(256, 256)) == ListSignRequest(
        "java", 5, "123", b"s" * 256, b"r" * 256
    )
    server.decode_push_list_sign(body(MAX_SIGNATURE_BYTES, MAX_SIGNATURE_BYTES))
    for sizes, field in (
        ((MAX_SIGNATURE_BYTES + 1, 1), "signature"),
        ((1, MAX_SIGNATURE_BYTES + 1), "req_signature"),
    ):
        with pytest.raises(SchemaError) as caught:
            server.decode_push_list_sign(body(*sizes))
        assert (
            caught.value.reason == "The schema of PushClientListSign is invalid."
            and field in caught.value.detail
        )
    with pytest.raises(SchemaError) as caught:
        server.decode_push_list_sign(body(1, 1, fl_id=False))
    assert caught.value.reason == "Verify flatbuffers schema failed for SendClientListSign."
    with pytest.raises(ValueError, match="req_signature may hold at most 1024 bytes"):
        client.encode_push_list_sign_request(
            fl_id="x", iteration=1, timestamp="t", signature=b"", req_signature=b"r" * 1025
        )


def test_signed_keys_are_relayed_by_get_keys() -> None:
    """With the list signatures ClientPublicKeys carries timestamp, iteration, signature, chain (§R8.1)."""
    signed = DeviceKeys(
        "d", b"c" * 32, b"s" * 32, b"i" * 16, b"p" * 16, b"t" * 32, "1700000000000", b"S" * 256, ("A", "E")
    )
    body = server.encode_get_keys_response(retcode=200, iteration=7, keys=[signed, KEYS], next_req_time="1")
    got, plain = client.decode_get_keys_response(body).keys
    assert got == DeviceKeys(
        "d", b"c" * 32, b"s" * 32, b"", b"p" * 16, b"t" * 32, "1700000000000", b"S" * 256, ("A", "E")
    )
    assert not plain.signed  # unsigned keys relay no pki fields, as before
    from flcluster.wire.fbs import ReturnExchangeKeys as fb_rsp_keys

    assert fb_rsp_keys.ReturnExchangeKeys.GetRootAs(body, 0).RemotePublickeys(0).Iteration() == 7


def test_stable_keys_answer_leaves_c_pk_out() -> None:
    keys = DeviceKeys("d", b"", b"s" * 32, b"", b"p" * 16, b"t")
    body = server.encode_get_keys_response(retcode=200, iteration=1, keys=[keys], next_req_time="1")
    (got,) = client.decode_get_keys_response(body).keys
    assert got.c_pk == b"" and got.s_pk == keys.s_pk


def test_bodies_built_with_the_generated_builders_decode() -> None:
    """A device built against the original's schema writes the same tables (field by field)."""
    b = flatbuffers.Builder(0)
    fl_id, ts = b.CreateString("java"), b.CreateString("123")
    c_pk, s_pk = b.CreateByteVector(b"c" * 32), b.CreateByteVector(b"s" * 32)
    ivs = [b.CreateByteVector(x) for x in (b"i" * 16, b"p" * 16, b"t" * 32)]
    fb_req_exchange.RequestExchangeKeysStart(b)
    fb_req_exchange.RequestExchangeKeysAddFlId(b, fl_id)
    fb_req_exchange.RequestExchangeKeysAddCPk(b, c_pk)
    fb_req_exchange.RequestExchangeKeysAddSPk(b, s_pk)
    fb_req_exchange.RequestExchangeKeysAddIteration(b, 2)
    fb_req_exchange.RequestExchangeKeysAddTimestamp(b, ts)
    fb_req_exchange.RequestExchangeKeysAddIndIv(b, ivs[0])
    fb_req_exchange.RequestExchangeKeysAddPwIv(b, ivs[1])
    fb_req_exchange.RequestExchangeKeysAddPwSalt(b, ivs[2])
    b.Finish(fb_req_exchange.RequestExchangeKeysEnd(b))
    decoded = server.decode_exchange_keys(bytes(b.Output()))
    assert decoded.keys == DeviceKeys("java", b"c" * 32, b"s" * 32, b"i" * 16, b"p" * 16, b"t" * 32)
    # shareSecrets as the Java client writes it: ClientShare without an index.
    b = flatbuffers.Builder(0)
    owner, data = b.CreateString("peer"), b.CreateByteVector(b"x" * 96)
    fb_share.ClientShareStart(b)
    fb_share.ClientShareAddFlId(b, owner)
    fb_share.ClientShareAddShare(b, data)
    share = fb_share.ClientShareEnd(b)
    b.StartVector(4, 1, 4)
    b.PrependUOffsetTRelative(share)
    vec = b.EndVector()
    fl_id, ts = b.CreateString("java"), b.CreateString("123")
    fb_req_share.RequestShareSecretsStart(b)
    fb_req_share.RequestShareSecretsAddFlId(b, fl_id)
    fb_req_share.RequestShareSecretsAddEncryptedShares(b, vec)
    fb_req_share.RequestShareSecretsAddIteration(b, 2)
    fb_req_share.RequestShareSecretsAddTimestamp(b, ts)
    b.Finish(fb_req_share.RequestShareSecretsEnd(b), b"FLJ0")  # with the file identifier, too
    assert server.decode_shares(bytes(b.Output()), CipherRound.SHARE_SECRETS).shares == (
        Share("peer", b"x" * 96, 0),
    )


# ------------------------------------------------------------------------------------------- required fields


@pytest.mark.parametrize("missing", ["fl_id", "timestamp"])
def test_a_fetch_without_a_required_field(missing: str) -> None:
    b = flatbuffers.Builder(0)
    fl_id, ts = b.CreateString("x"), b.CreateString("t")
    fb_get_keys.GetExchangeKeysStart(b)
    if missing != "fl_id":
        fb_get_keys.GetExchangeKeysAddFlId(b, fl_id)
    if missing != "timestamp":
        fb_get_keys.GetExchangeKeysAddTimestamp(b, ts)
    b.Finish(fb_get_keys.GetExchangeKeysEnd(b))
    with pytest.raises(SchemaError) as caught:
        server.decode_fetch(bytes(b.Output()), CipherRound.GET_KEYS)
    assert caught.value.reason == "Verify flatbuffers schema failed for GetExchangeKeys."
    assert missing in caught.value.detail


def test_a_share_without_fl_id_is_refused() -> None:
    b = flatbuffers.Builder(0)
    data = b.CreateByteVector(b"x")
    fb_share.ClientShareStart(b)
    fb_share.ClientShareAddShare(b, data)
    share = fb_share.ClientShareEnd(b)
    b.StartVector(4, 1, 4)
    b.PrependUOffsetTRelative(share)
    vec = b.EndVector()
    fl_id, ts = b.CreateString("x"), b.CreateString("t")
    fb_req_share.RequestShareSecretsStart(b)
    fb_req_share.RequestShareSecretsAddFlId(b, fl_id)
    fb_req_share.RequestShareSecretsAddEncryptedShares(b, vec)
    fb_req_share.RequestShareSecretsAddTimestamp(b, ts)
    b.Finish(fb_req_share.RequestShareSecretsEnd(b))
    with pytest.raises(SchemaError, match="share 0 has no fl_id"):
        server.decode_shares(bytes(b.Output()), CipherRound.SHARE_SECRETS)


# ------------------------------------------------------------------------------------------------- limits


def _raw_exchange(**sizes: int) -> bytes:
    """An exchangeKeys body from the generated builder, fields of the given sizes (no encoder check)."""
    b = flatbuffers.Builder(0)
    fl_id = b.CreateString("x" * sizes.get("fl_id", 1))
    vectors = {name: b.CreateByteVector(b"v" * sizes.get(name, 16)) for name in ("c_pk", "s_pk", "ind_iv")}
    vectors |= {name: b.CreateByteVector(b"v" * sizes.get(name, 16)) for name in ("pw_iv", "pw_salt")}
    ts = b.CreateString("t")
    m = fb_req_exchange
    m.RequestExchangeKeysStart(b)
    m.RequestExchangeKeysAddFlId(b, fl_id)
    m.RequestExchangeKeysAddCPk(b, vectors["c_pk"])
    m.RequestExchangeKeysAddSPk(b, vectors["s_pk"])
    m.RequestExchangeKeysAddTimestamp(b, ts)
    m.RequestExchangeKeysAddIndIv(b, vectors["ind_iv"])
    m.RequestExchangeKeysAddPwIv(b, vectors["pw_iv"])
    m.RequestExchangeKeysAddPwSalt(b, vectors["pw_salt"])
    b.Finish(m.RequestExchangeKeysEnd(b))
    return bytes(b.Output())


@pytest.mark.parametrize(
    ("field", "limit"),
    [
        ("fl_id", MAX_FL_ID_BYTES),
        ("c_pk", MAX_KEY_BYTES),
        ("s_pk", MAX_KEY_BYTES),
        ("ind_iv", MAX_IV_BYTES),
        ("pw_iv", MAX_IV_BYTES),
        ("pw_salt", MAX_SALT_BYTES),
    ],
)
def test_exchange_keys_limits_accepted_exactly_and_refused_one_past(field: str, limit: int) -> None:
    server.decode_exchange_keys(_raw_exchange(**{field: limit}))
    with pytest.raises(SchemaError) as caught:
        server.decode_exchange_keys(_raw_exchange(**{field: limit + 1}))
    assert caught.value.reason == "The schema of RequestExchangeKeys is invalid."
    assert field in caught.value.detail


def test_share_count_and_size_limits() -> None:
    def body(count: int, size: int) -> bytes:
        shares = [Share(f"d{i}", b"x" * size) for i in range(count)]
        return client.encode_shares_request(
            CipherRound.RECONSTRUCT_SECRETS, fl_id="x", iteration=1, timestamp="t", shares=shares
        )

    assert (
        len(server.decode_shares(body(MAX_SHARES, 1), CipherRound.RECONSTRUCT_SECRETS).shares) == MAX_SHARES
    )
    server.decode_shares(body(1, MAX_SHARE_BYTES), CipherRound.RECONSTRUCT_SECRETS)
    with pytest.raises(ValueError, match="at most 16384 shares"):
        body(MAX_SHARES + 1, 1)
    with pytest.raises(ValueError, match="share may hold at most 1024 bytes"):
        body(1, MAX_SHARE_BYTES + 1)
    # A body past the limits, written by hand, is refused by the decoder.
    b = flatbuffers.Builder(0)
    offsets = []
    for i in range(MAX_SHARES + 1):
        owner, data = b.CreateString(f"d{i}"), b.CreateByteVector(b"x")
        fb_share.ClientShareStart(b)
        fb_share.ClientShareAddFlId(b, owner)
        fb_share.ClientShareAddShare(b, data)
        offsets.append(fb_share.ClientShareEnd(b))
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    vec = b.EndVector()
    fl_id, ts = b.CreateString("x"), b.CreateString("t")
    fb_req_share.RequestShareSecretsStart(b)
    fb_req_share.RequestShareSecretsAddFlId(b, fl_id)
    fb_req_share.RequestShareSecretsAddEncryptedShares(b, vec)
    fb_req_share.RequestShareSecretsAddTimestamp(b, ts)
    b.Finish(fb_req_share.RequestShareSecretsEnd(b))
    with pytest.raises(SchemaError, match="The schema of RequestShareSecrets is invalid"):
        server.decode_shares(bytes(b.Output()), CipherRound.SHARE_SECRETS)


@pytest.mark.parametrize(
    ("encode", "match"),
    [
        (lambda: exchange_body(DeviceKeys("x" * 257, b"", b"", b"", b"", b"")), "fl_id"),
        (lambda: exchange_body(DeviceKeys("x", b"c" * 257, b"", b"", b"", b"")), "c_pk"),
        (lambda: exchange_body(DeviceKeys("x", b"", b"", b"", b"", b"s" * 65)), "pw_salt"),
        (
            lambda: client.encode_fetch_request(
                CipherRound.GET_KEYS, fl_id="x", iteration=2**31, timestamp=""
            ),
            "iteration",
        ),
        (
            lambda: client.encode_fetch_request(
                CipherRound.EXCHANGE_KEYS, fl_id="x", iteration=1, timestamp=""
            ),
            "not a fetch round",
        ),
        (
            lambda: client.encode_shares_request(
                CipherRound.GET_KEYS, fl_id="x", iteration=1, timestamp="", shares=()
            ),
            "sends no shares",
        ),
        (
            lambda: server.encode_client_list_response(
                retcode=200, reason="", clients=["x" * 257], iteration=1, next_req_time=""
            ),
            "client fl_id",
        ),
    ],
)
def test_encoders_refuse_what_decoders_would_refuse(encode: Callable[[], bytes], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode()


# ---------------------------------------------------------------------------------------- malformed bodies


@pytest.mark.parametrize("name", sorted(valid_requests()))
@pytest.mark.parametrize("body", [b"", b"\x00", b"\xff" * 3, b"\x04\x00\x00\x00", b"garbage!" * 9])
def test_garbage_requests_are_schema_errors(name: str, body: bytes) -> None:
    round_, _ = valid_requests()[name]
    with pytest.raises(SchemaError):
        server.decode_cipher_request(round_, body)


@pytest.mark.parametrize("name", sorted(valid_requests()))
def test_every_truncation_is_a_schema_error(name: str) -> None:
    round_, body = valid_requests()[name]
    whole = server.decode_cipher_request(round_, body)
    for cut in range(len(body)):
        # Builders write back to front: the last bytes may be alignment padding after the first object
        # written; cutting only padding leaves the same message, any other cut is refused.
        try:
            part = server.decode_cipher_request(round_, body[:cut])
        except SchemaError:
            continue
        assert part == whole and cut >= len(body) - 7, cut


@pytest.mark.parametrize("name", sorted(answers()))
def test_every_truncated_answer_is_a_schema_error(name: str) -> None:
    round_, body = answers()[name]
    whole = decode_answer(round_, body)
    for cut in range(len(body)):
        try:
            part = decode_answer(round_, body[:cut])
        except SchemaError:
            continue
        assert part == whole and cut >= len(body) - 7, cut


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(valid_requests())), st.data())
def test_fuzz_mutated_requests_decode_or_raise_schema_error(name: str, data: st.DataObject) -> None:
    round_, body = valid_requests()[name]
    mutated = bytearray(body)
    for _ in range(data.draw(st.integers(1, 6))):
        mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(SchemaError):
        server.decode_cipher_request(round_, bytes(mutated))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(answers())), st.binary(max_size=200))
def test_fuzz_random_answers_decode_or_raise_schema_error(name: str, body: bytes) -> None:
    round_, _ = answers()[name]
    with contextlib.suppress(SchemaError):
        decode_answer(round_, body)
