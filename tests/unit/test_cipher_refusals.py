"""The Servers' refusals in the cipher rounds (spec/secure-aggregation.md §R5, §R6, §R7), in process.

Requests go as raw bodies to a follower (which decodes them once and forwards them to the leader) or to the
leader; every refused, repeated or out-of-order request gets the protocol's answer and leaves the leader's
machine (cipher lists included) exactly as it was. A round that misses its threshold fails the iteration.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from flcluster.core.cipher import DeviceKeys, Share
from flcluster.runtime.cipher_rounds import cipher_routes
from flcluster.runtime.driver import Leader
from flcluster.secure.job_prime import job_prime
from flcluster.settings import job_settings
from flcluster.wire.cipher_client_codec import (
    decode_ack,
    decode_get_keys_response,
    encode_exchange_keys_request,
    encode_fetch_request,
    encode_shares_request,
)
from flcluster.wire.client_codec import encode_start_fl_job_request
from flcluster.wire.codes import CipherRound, ResponseCode
from tests.helpers import FL_NAME, lenet_context, open_cluster


def keys(fl_id: str, **bad: bytes) -> DeviceKeys:
    fields = {
        "c_pk": b"c" * 32,
        "s_pk": b"s" * 32,
        "ind_iv": b"i" * 16,
        "pw_iv": b"p" * 16,
        "pw_salt": b"t" * 32,
    }
    return DeviceKeys(fl_id, **{**fields, **bad})


class Cluster:
    def __init__(self, cluster: Any, client: httpx.AsyncClient) -> None:
        leader, follower = cluster.by_rank()
        self.leader: Leader = leader.leader
        self.leader_url = cluster.url_of(leader)
        self.follower_url = cluster.url_of(follower)
        self.client = client

    async def post(self, url: str, path: str, body: bytes) -> bytes:
        response = await self.client.post(f"{url}/{path}", content=body)
        assert response.status_code == 200
        return response.content

    async def start(self, fl_id: str) -> None:
        body = encode_start_fl_job_request(
            fl_name=FL_NAME, fl_id=fl_id, iteration=1, data_size=10, timestamp="1"
        )
        await self.post(self.follower_url, "startFLJob", body)

    async def exchange(self, k: DeviceKeys, url: str | None = None) -> Any:
        body = encode_exchange_keys_request(keys=k, iteration=1, timestamp="1")
        return decode_ack(
            CipherRound.EXCHANGE_KEYS, await self.post(url or self.follower_url, "exchangeKeys", body)
        )

    def state(self) -> Any:
        m = self.leader.machine
        return m.snapshot(), m.cipher_state()


@asynccontextmanager
async def pw_cluster(**kw: Any) -> AsyncIterator[Cluster]:
    ctx = lenet_context(3, 2).evolve(encrypt_type="PW_ENCRYPT", reconstruct_secrets_threshold=1, **kw)
    async with open_cluster(2, lambda: job_settings(ctx)) as cluster, httpx.AsyncClient(timeout=30) as client:
        yield Cluster(cluster, client)


async def test_refused_repeated_and_out_of_order_requests_change_nothing() -> None:
    async with pw_cluster(cipher_time_window=60_000) as c:
        # Malformed body: refused by the follower it reached (RequestError), never forwarded.
        before = c.state()
        answer = decode_ack(
            CipherRound.EXCHANGE_KEYS, await c.post(c.follower_url, "exchangeKeys", b"\x00" * 24)
        )
        assert answer.retcode == ResponseCode.RequestError
        assert "RequestExchangeKeys" in answer.reason
        # Out of order: exchangeKeys before the device's startFLJob.
        answer = await c.exchange(keys("d0"))
        assert (answer.retcode, answer.reason) == (
            ResponseCode.OutOfTime,
            "devices_meta for d0 is not set. Please retry later.",
        )
        assert c.state() == before
        for d in ("d0", "d1", "d2"):
            await c.start(d)
        # Malformed keys, well-formed body: the leader's rule (spec §R7).
        before = c.state()
        answer = await c.exchange(keys("d0", s_pk=b"s" * 31, pw_salt=b"t" * 8))
        assert answer.retcode == ResponseCode.RequestError
        assert answer.reason.startswith("exchangeKeys keys are malformed: s_pk has 31 bytes")
        assert c.state() == before
        # Accepted, then repeated (the first keys stand).
        assert (await c.exchange(keys("d0"))).retcode == ResponseCode.SUCCEED
        before = c.state()
        repeat = await c.exchange(keys("d0", s_pk=b"x" * 32), url=c.leader_url)
        assert (repeat.retcode, repeat.reason) == (
            ResponseCode.SUCCEED,
            "The server has received the request, please do not request again.",
        )
        assert c.state() == before
        # A fetch before its list is frozen.
        body = encode_fetch_request(CipherRound.GET_KEYS, fl_id="d0", iteration=1, timestamp="1")
        got = decode_get_keys_response(await c.post(c.follower_url, "getKeys", body))
        assert got.retcode == ResponseCode.SucNotReady and got.keys == ()
        # A submit of a later round from a device not entitled to it.
        shares = [Share("d1", b"blob")]
        body = encode_shares_request(
            CipherRound.SHARE_SECRETS, fl_id="d0", iteration=1, timestamp="1", shares=shares
        )
        answer = decode_ack(CipherRound.SHARE_SECRETS, await c.post(c.follower_url, "shareSecrets", body))
        assert answer.retcode == ResponseCode.RequestError
        # A reconstruction share not below the job's prime: refused at the leader before the machine.
        big = (job_prime(FL_NAME) + 1).to_bytes(33, "big")
        body = encode_shares_request(
            CipherRound.RECONSTRUCT_SECRETS,
            fl_id="d0",
            iteration=1,
            timestamp="1",
            shares=[Share("d1", big, 1)],
        )
        answer = decode_ack(
            CipherRound.RECONSTRUCT_SECRETS, await c.post(c.follower_url, "reconstructSecrets", body)
        )
        assert answer.retcode == ResponseCode.RequestError
        assert "not below the prime" in answer.reason
        assert c.state() == before


async def test_a_cipher_round_that_misses_its_threshold_fails_the_iteration() -> None:
    async with pw_cluster(cipher_time_window=300) as c:
        for d in ("d0", "d1", "d2"):
            await c.start(d)
        assert (await c.exchange(keys("d0"))).retcode == ResponseCode.SUCCEED
        with trio.fail_after(30):
            assert not await c.leader.wait_ended(1)  # failed: U1 below its threshold when its window ended
        assert c.leader.machine.current_iteration == 2
        assert c.leader.machine.cipher_state().u1 == ()  # type: ignore[union-attr]
        # The iteration is over: its requests get the round's OutOfTime.
        answer = await c.exchange(keys("d1"))
        assert (answer.retcode, answer.reason) == (ResponseCode.OutOfTime, "iter num is error.")


def test_the_routes_exist_only_for_the_rounds_of_the_mode() -> None:
    async def forward(round_: CipherRound, body: bytes) -> bytes:
        return b""

    def view() -> tuple[int, int]:
        return 1, 0

    list_rounds = {"pushListSign", "getListSign"}
    assert set(cipher_routes("PW_ENCRYPT", forward, view)) == {r.value for r in CipherRound} - list_rounds
    # pki_verify: the list signatures too (spec/secure-aggregation.md §R8); STABLE_PW has no list to sign.
    assert set(cipher_routes("PW_ENCRYPT", forward, view, list_sign=True)) == {r.value for r in CipherRound}
    assert set(cipher_routes("STABLE_PW_ENCRYPT", forward, view)) == {"exchangeKeys", "getKeys"}
    assert set(cipher_routes("STABLE_PW_ENCRYPT", forward, view, list_sign=True)) == {
        "exchangeKeys",
        "getKeys",
    }
    assert cipher_routes("NOT_ENCRYPT", forward, view) == {}
    assert cipher_routes("DP_ENCRYPT", forward, view) == {}
