"""PW_ENCRYPT with pki_verify end to end in process: the client-list signatures (spec/secure-aggregation.md
§R8).

A Scheduler and two Servers run in this trio process over loopback with the trust files of tests/pki.py;
devices of the SDK with real identities (RSA and EC) go through every cipher round spread over both Servers,
the list signatures included: they sign their keys, check each other's at getKeys, sign U3 and check the
others' signatures before they reveal any share. The published model equals plain FedAvg of the acknowledged
uploads within the stated bound. A device whose list signature (or request signature) is wrong is refused
with the protocol's answer and changes nothing; a device that drops before pushListSign is left out of P when
the pushListSign window ends, and its update stays in the (unmasked) sum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
import numpy as np
import trio

from flcluster.client.device import Device, IterationOutcome
from flcluster.core.cipher import CipherState
from flcluster.runtime.driver import Leader
from flcluster.settings import job_settings
from flcluster.verify import (
    DeviceIdentity,
    client_list_digest,
    exchange_keys_signed_data,
    signs_client_list,
    update_model_signed_data,
)
from flcluster.verify.admission import REASON_EXCHANGE_KEYS_TIMEOUT, REASON_START_FL_JOB_VERIFY
from flcluster.wire.cipher_client_codec import (
    decode_ack,
    decode_client_list_response,
    decode_get_keys_response,
    decode_get_secrets_response,
    decode_list_signs_response,
    encode_exchange_keys_request,
    encode_fetch_request,
    encode_shares_request,
)
from flcluster.wire.cipher_records import CipherAck
from flcluster.wire.codes import CipherRound, ResponseCode, ServerText
from tests.helpers import FL_NAME, InProcessCluster, open_cluster
from tests.pki import pki_context, shared
from tests.unit.test_cipher_cluster import (
    POLICY,
    STEP_TIMEOUT,
    Trainers,
    Uploads,
    assert_within_bound,
    published,
)

TEXTS = {t.value.encode() for t in ServerText}


def identities(n: int) -> list[DeviceIdentity]:
    """``n`` devices of the session's PKIs: RSA devices of the first root and the EC one of the second."""
    pki = shared()
    return [*pki.devices[: n - 1], pki.ec_device]


def signed_job(directory: Path, devices: int, encrypt_type: str, **cipher: Any) -> Any:
    ctx = pki_context(directory, devices, 1).evolve(encrypt_type=encrypt_type, **cipher)
    return partial(job_settings, ctx)


def signed_pw_job(directory: Path, devices: int, **cipher: Any) -> Any:
    return signed_job(directory, devices, "PW_ENCRYPT", **cipher)


def signed_stable_pw_job(directory: Path, devices: int, **cipher: Any) -> Any:
    return signed_job(directory, devices, "STABLE_PW_ENCRYPT", **cipher)


def leader_of(cluster: InProcessCluster) -> Leader:
    leader = cluster.by_rank()[0].leader
    assert leader is not None
    return leader


_A = TypeVar("_A")


class RoundAnswers(Generic[_A]):
    """Every answer of one round the devices received, decoded (an httpx response hook); ``keep`` chooses."""

    def __init__(
        self, path: str, decode: Callable[[bytes], _A], keep: Callable[[_A], object] = lambda _a: True
    ) -> None:
        self.seen: list[_A] = []
        self._path, self._decode, self._keep = path, decode, keep

    async def hook(self, response: httpx.Response) -> None:
        if response.request.url.path.endswith(self._path):
            await response.aread()
            if response.content not in TEXTS:
                answer = self._decode(response.content)
                if self._keep(answer):
                    self.seen.append(answer)


def signed_devices(
    ids: Sequence[DeviceIdentity], cluster: InProcessCluster, client: httpx.AsyncClient
) -> list[Device]:
    """One SDK device per identity of ``ids``, on every Server of ``cluster`` (seeded by its index)."""
    return [
        Device(i.fl_id, cluster.urls, fl_name=FL_NAME, client=client, policy=POLICY, use_elb=True,
               seed=n, identity=i)
        for n, i in enumerate(ids)
    ]  # fmt: skip


async def run_devices(
    devices: Sequence[Device], trainers: Trainers, sizes: Sequence[int], drops: dict[str, str]
) -> dict[str, Any]:
    reports: dict[str, Any] = {}

    async def one(i: int) -> None:
        d = devices[i]
        report = await d.run_iteration(
            trainers.of(i, d.fl_id), data_size=sizes[i], drop_after=drops.get(d.fl_id)
        )
        reports[d.fl_id] = report

    with trio.fail_after(STEP_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for i in range(len(devices)):
                nursery.start_soon(one, i)
    return reports


async def test_signed_devices_train_pw_encrypt_and_check_each_others_client_lists(tmp_path: Path) -> None:
    # 6 devices, u = 6, t = 2: every threshold 6 but reconstructSecrets (3); P closes with all six signatures.
    job = signed_pw_job(tmp_path, 6, reconstruct_secrets_threshold=2, cipher_time_window=60_000)
    uploads, trainers, signs = Uploads(), Trainers(), RoundAnswers("/getListSign", decode_list_signs_response)
    ids = identities(6)
    sizes = [3, 5, 8, 13, 21, 34]
    hooks = {"response": [uploads.hook, signs.hook]}
    async with (
        open_cluster(2, job) as cluster,
        httpx.AsyncClient(timeout=60, event_hooks=hooks) as client,
    ):
        devices = signed_devices(ids, cluster, client)
        reports = await run_devices(devices, trainers, sizes, {})
        assert all(r.outcome is IterationOutcome.COMPLETED for r in reports.values()), [
            r.reason for r in reports.values()
        ]
        assert leader_of(cluster).machine.completed == (1,)
        model = await published(cluster.urls, client, 1)
        u3 = sorted(uploads.seen)
        assert u3 == sorted(i.fl_id for i in ids)
        assert_within_bound(
            model, [trainers.clear[f] for f in u3], [sizes[[i.fl_id for i in ids].index(f)] for f in u3], m=6
        )
        # Every getListSign answer held the six signatures of the same U3, each the signer's (RSA and EC).
        keys = {i.fl_id: i.private_key.public_key() for i in ids}
        # Each device that sent reconstructSecrets had its getListSign answered first, and the iteration
        # needed t + 1 = 3 of them; a device later than that is told OutOfTime (on to getModel).
        ok = [a for a in signs.seen if a.retcode == ResponseCode.SUCCEED]
        assert len(ok) >= 3, [(a.retcode, a.reason) for a in signs.seen]
        for answer in ok:
            assert [s.fl_id for s in answer.signatures] == u3
            assert all(signs_client_list(keys[s.fl_id], u3, s.signature) for s in answer.signatures)


class BadSigner(Device):
    """A device that first pushes a wrong list signature and a wrongly signed request, then the right one.

    The refused requests are real ones, through the same Servers; the answers and the leader's P after each
    refusal are recorded (the other devices go on meanwhile, so only this device's part is compared).
    """

    def __init__(self, *args: Any, leader: Leader, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.leader = leader
        self.refusals: list[tuple[CipherAck, CipherState | None]] = []
        self.accepted: CipherAck | None = None
        self.imposter: DeviceIdentity | None = None

    async def cipher_request(self, round_: CipherRound, iteration: int, **kw: Any) -> Any:
        if round_ is CipherRound.PUSH_LIST_SIGN and not self.refusals:
            assert self._identity is not None
            # 1. A signature of another list (U3 without this device).
            lists = self.leader.machine.client_list()
            assert lists is not None
            other = self._identity.sign(client_list_digest([f for f in lists if f != self.fl_id]))
            await self._refused(round_, iteration, signature=other)
            # 2. The right list signature, in a request signed by another device's key.
            right = kw["signature"]
            honest, self._identity = self._identity, self.imposter
            try:
                await self._refused(round_, iteration, signature=right)
            finally:
                self._identity = honest
            answer = await super().cipher_request(round_, iteration, **kw)
            assert isinstance(answer, CipherAck), answer
            self.accepted = answer
            return answer
        return await super().cipher_request(round_, iteration, **kw)

    async def _refused(self, round_: CipherRound, iteration: int, **kw: Any) -> None:
        answer = await super().cipher_request(round_, iteration, **kw)
        assert isinstance(answer, CipherAck), answer
        self.refusals.append((answer, self.leader.machine.cipher_state()))


async def test_a_wrong_list_signature_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    job = signed_pw_job(tmp_path, 4, reconstruct_secrets_threshold=2, cipher_time_window=60_000)
    uploads, trainers = Uploads(), Trainers()
    ids = identities(4)
    sizes = [4, 6, 9, 11]
    async with (
        open_cluster(2, job) as cluster,
        httpx.AsyncClient(timeout=60, event_hooks={"response": [uploads.hook]}) as client,
    ):
        leader = leader_of(cluster)
        common = {"fl_name": FL_NAME, "client": client, "policy": POLICY, "use_elb": True}
        bad = BadSigner(ids[0].fl_id, cluster.urls, identity=ids[0], leader=leader, seed=0, **common)
        bad.imposter = ids[1]
        devices = [bad] + [
            Device(i.fl_id, cluster.urls, identity=i, seed=n, **common) for n, i in enumerate(ids[1:], 1)
        ]
        reports = await run_devices(devices, trainers, sizes, {})
        assert all(r.outcome is IterationOutcome.COMPLETED for r in reports.values()), [
            r.reason for r in reports.values()
        ]
        (wrong_list, after), (wrong_key, after2) = bad.refusals
        assert (wrong_list.retcode, wrong_list.reason) == (
            ResponseCode.RequestError,
            "verify signature failed: the client list signature does not verify over the update model client "
            "list",
        )
        assert (wrong_key.retcode, wrong_key.reason) == (
            ResponseCode.RequestError,
            "verify signature failed.",
        )
        # Nothing kept: the device is not in P after either refusal, and its right signature is then taken
        # as its first (not answered as a repeat).
        for state in (after, after2):
            assert state is not None and ids[0].fl_id not in state.p and not state.p_closed
        for answer in (wrong_list, wrong_key):
            assert answer.iteration == 1 and int(answer.next_req_time) > 0
        assert bad.accepted is not None
        assert bad.accepted.reason == "send update model client list signature success. "
        # Then its right signature was taken and the iteration completed with it.
        model = await published(cluster.urls, client, 1)
        u3 = sorted(uploads.seen)
        assert u3 == sorted(i.fl_id for i in ids)
        index = {i.fl_id: n for n, i in enumerate(ids)}
        assert_within_bound(model, [trainers.clear[f] for f in u3], [sizes[index[f]] for f in u3], m=4)


#: The rounds whose request signature §R8.6 adds (pushListSign's and getListSign's are checked above).
PROBED = (
    CipherRound.GET_KEYS,
    CipherRound.SHARE_SECRETS,
    CipherRound.GET_SECRETS,
    CipherRound.GET_CLIENT_LIST,
    CipherRound.RECONSTRUCT_SECRETS,
)
#: The rounds STABLE_PW_ENCRYPT runs under pki_verify with a signature to check (§R8.1, §R8.6, §R8.7).
PROBED_STABLE = (CipherRound.EXCHANGE_KEYS, CipherRound.GET_KEYS)
#: What the original answers a stale timestamp (or no key) in each: shareSecrets and exchangeKeys say more.
STALE = {r: "verify signature timestamp failed." for r in PROBED} | {
    CipherRound.SHARE_SECRETS: REASON_EXCHANGE_KEYS_TIMEOUT,
    CipherRound.EXCHANGE_KEYS: REASON_EXCHANGE_KEYS_TIMEOUT,
}


def decode_cipher_answer(round_: CipherRound, body: bytes | str) -> Any:
    assert isinstance(body, bytes), body
    match round_:
        case CipherRound.GET_KEYS:
            return decode_get_keys_response(body)
        case CipherRound.GET_SECRETS:
            return decode_get_secrets_response(body)
        case CipherRound.GET_CLIENT_LIST:
            return decode_client_list_response(body)
        case _:
            return decode_ack(round_, body)


class RequestProber(Device):
    """A device that sends each round of ``probed`` (:data:`PROBED` unless told) wrongly before it sends it
    right.

    Before its first request of such a round it sends the same request unsigned and signed with another
    device's key, through the Servers (what a device is told: ``over_http``); then, straight to the leader's
    ``cipher`` between two snapshots of its machine and its verifier, unsigned, signed by another device,
    signed over a stale timestamp, and (once its right request went out) that right body again, a replay.
    A refusal does not reach a checkpoint, so nothing else runs between the snapshots: they must be equal.
    exchangeKeys signs its keys (§R8.1): "unsigned" sends neither signature nor certificates, "imposter" the
    device's own certificates with the other device's signature of the keys.
    """

    def __init__(
        self,
        *args: Any,
        leader: Leader,
        imposter: DeviceIdentity,
        probed: Sequence[CipherRound] = PROBED,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.leader = leader
        self.imposter = imposter
        self.probed = tuple(probed)
        assert self._identity is not None
        self.honest: DeviceIdentity = self._identity
        self.over_http: dict[CipherRound, dict[str, Any]] = {}
        self.at_leader: dict[CipherRound, dict[str, tuple[Any, bool]]] = {}

    def _state(self) -> tuple[Any, Any]:
        verifier = self.leader.verifier
        assert verifier is not None
        return self.leader.machine.snapshot(), verifier.statistics()

    async def _at_leader(self, round_: CipherRound, kind: str, body: bytes) -> None:
        before = self._state()
        answer = await self.leader.cipher(round_, body, "probe")
        self.at_leader.setdefault(round_, {})[kind] = (
            decode_cipher_answer(round_, answer),
            before == self._state(),
        )

    @staticmethod
    def _signed(round_: CipherRound, iteration: int, timestamp: str, kw: Any) -> bytes:
        """What the round signs: exchangeKeys its keys (§R8.1), the others ``timestamp + iteration``."""
        if round_ is CipherRound.EXCHANGE_KEYS:
            return exchange_keys_signed_data(kw["keys"].c_pk, kw["keys"].s_pk, timestamp, iteration)
        return update_model_signed_data(timestamp, iteration)

    def _chain(self, signature: bytes) -> tuple[str, ...]:
        """exchangeKeys: the device's own ``[key_attestation, equip_cert]`` with any signature."""
        honest = self.honest
        return (honest.key_attestation, honest.equip_cert) if signature else ()

    def _body(self, round_: CipherRound, iteration: int, timestamp: str, signature: bytes, kw: Any) -> bytes:
        if round_ is CipherRound.EXCHANGE_KEYS:
            return encode_exchange_keys_request(
                keys=kw["keys"],
                iteration=iteration,
                timestamp=timestamp,
                signature=signature,
                certificate_chain=self._chain(signature),
            )
        common = {"fl_id": self.fl_id, "iteration": iteration, "timestamp": timestamp, "signature": signature}
        if round_ in (CipherRound.SHARE_SECRETS, CipherRound.RECONSTRUCT_SECRETS):
            return encode_shares_request(round_, shares=kw["shares"], **common)
        return encode_fetch_request(round_, **common)

    async def cipher_request(self, round_: CipherRound, iteration: int, **kw: Any) -> Any:
        if round_ in self.probed and round_ not in self.over_http:
            honest = self._identity
            assert honest is not None
            self.over_http[round_] = {}
            for kind, identity in (("unsigned", None), ("imposter", self.imposter)):
                wrong = dict(kw)
                if round_ is CipherRound.EXCHANGE_KEYS:

                    def signer(ts: str, by: DeviceIdentity | None = identity) -> tuple[bytes, Any]:
                        sig = b"" if by is None else by.sign(self._signed(round_, iteration, ts, kw))
                        return sig, self._chain(sig)

                    wrong["key_signer"] = signer
                try:
                    self._identity = identity
                    self.over_http[round_][kind] = await super().cipher_request(round_, iteration, **wrong)
                finally:
                    self._identity = honest
            fresh = self._timestamp()
            signed = self._signed(round_, iteration, fresh, kw)
            await self._at_leader(round_, "unsigned", self._body(round_, iteration, fresh, b"", kw))
            await self._at_leader(
                round_, "imposter", self._body(round_, iteration, fresh, self.imposter.sign(signed), kw)
            )
            stale = str(self.leader.clock.now_ms() - 600_000 - 60_000)
            stale_signature = honest.sign(self._signed(round_, iteration, stale, kw))
            await self._at_leader(round_, "stale", self._body(round_, iteration, stale, stale_signature, kw))
        return await super().cipher_request(round_, iteration, **kw)

    async def _post(self, round_name: str, body: bytes) -> tuple[str, bytes]:
        answer = await super()._post(round_name, body)
        round_ = CipherRound(round_name) if round_name in set(CipherRound) else None
        # The right request (after both probes over HTTP), once: send its body again.
        sent = self.over_http.get(round_) if round_ in self.probed else None
        if sent is not None and len(sent) == 2 and "replay" not in self.at_leader.get(round_, {}):
            await self._at_leader(round_, "replay", body)
        return answer


def assert_probes_refused(prober: RequestProber) -> None:
    """Every probe of :class:`RequestProber` got the original's answer and changed nothing (§R8.1, §R8.6)."""
    assert set(prober.over_http) == set(prober.probed) == set(prober.at_leader)
    failed = "verify signature failed."
    for round_ in prober.probed:
        expected = {
            "unsigned": (ResponseCode.RequestError, failed),
            "imposter": (ResponseCode.RequestError, failed),
            "stale": (ResponseCode.OutOfTime, STALE[round_]),
            "replay": (ResponseCode.RequestError, f"{failed}: replayed"),
        }
        told = {k: (a, True) for k, a in prober.over_http[round_].items()}
        for where, answers in (("http", told), ("leader", prober.at_leader[round_])):
            assert set(answers) == ({"unsigned", "imposter"} if where == "http" else set(expected))
            for kind, (answer, unchanged) in answers.items():
                retcode, reason = expected[kind]
                why = (round_, where, kind, answer)
                assert unchanged, why
                assert (answer.retcode, answer.iteration) == (retcode, 1), why
                assert int(answer.next_req_time) > 0, why
                if round_ in (CipherRound.GET_KEYS, CipherRound.GET_SECRETS):
                    assert answer.reason == "", why  # their tables have no reason field
                elif kind in ("stale", "replay"):
                    assert answer.reason.startswith(reason), why  # and why, after ": "
                else:
                    assert answer.reason == reason, why
                assert not getattr(answer, "keys", ()) and not getattr(answer, "shares", ()), why
                assert not getattr(answer, "clients", ()), why


async def test_wrongly_signed_requests_of_the_other_cipher_rounds_are_refused_and_change_nothing(
    tmp_path: Path,
) -> None:
    """getKeys, shareSecrets, getSecrets, getClientList, reconstructSecrets under pki_verify (§R8.6)."""
    # t = 3 with 4 devices: the reconstruction needs every device, the prober included.
    job = signed_pw_job(tmp_path, 4, reconstruct_secrets_threshold=3, cipher_time_window=60_000)
    uploads, trainers = Uploads(), Trainers()
    ids = identities(4)
    sizes = [4, 6, 9, 11]
    async with (
        open_cluster(2, job) as cluster,
        httpx.AsyncClient(timeout=60, event_hooks={"response": [uploads.hook]}) as client,
    ):
        leader = leader_of(cluster)
        common = {"fl_name": FL_NAME, "client": client, "policy": POLICY, "use_elb": True}
        prober = RequestProber(
            ids[0].fl_id, cluster.urls, identity=ids[0], leader=leader, imposter=ids[1], seed=0, **common
        )
        devices = [prober] + [
            Device(i.fl_id, cluster.urls, identity=i, seed=n, **common) for n, i in enumerate(ids[1:], 1)
        ]
        reports = await run_devices(devices, trainers, sizes, {})
        assert all(r.outcome is IterationOutcome.COMPLETED for r in reports.values()), [
            r.reason for r in reports.values()
        ]
        assert_probes_refused(prober)
        assert leader.machine.completed == (1,)
        model = await published(cluster.urls, client, 1)
        u3 = sorted(uploads.seen)
        assert u3 == sorted(i.fl_id for i in ids)
        index = {i.fl_id: n for n, i in enumerate(ids)}
        assert_within_bound(model, [trainers.clear[f] for f in u3], [sizes[index[f]] for f in u3], m=4)


async def test_signed_devices_train_stable_pw_encrypt_and_the_keys_signatures_are_relayed(
    tmp_path: Path,
) -> None:
    """STABLE_PW_ENCRYPT under pki_verify (§R8.1, §R8.7): signed keys, relayed and checked by the peers."""
    job = signed_stable_pw_job(tmp_path, 4, cipher_time_window=60_000)
    uploads, trainers, got = (
        Uploads(),
        Trainers(),
        RoundAnswers("/getKeys", decode_get_keys_response, lambda answer: answer.keys),
    )
    ids = identities(4)
    sizes = [2, 7, 11, 19]
    async with (
        open_cluster(2, job) as cluster,
        httpx.AsyncClient(timeout=60, event_hooks={"response": [uploads.hook, got.hook]}) as client,
    ):
        leader = leader_of(cluster)
        assert leader.verifier is not None
        cipher = leader.machine.config.cipher
        assert cipher is not None and not cipher.list_sign
        # A device without an identity is refused at startFLJob (RequestError: it stops), before any cipher
        # round, and nothing is counted (spec/device-protocol.md "Client verification", §R8.7).
        stranger = Device("unsigned", cluster.urls, fl_name=FL_NAME, client=client, policy=POLICY, seed=9)
        report = await stranger.run_iteration(trainers.of(9, "unsigned"), data_size=5)
        assert report.outcome is IterationOutcome.STOPPED, report
        assert report.reason.startswith("startFLJob answered RequestError: "), report
        assert f"{REASON_START_FL_JOB_VERIFY}: " in report.reason, report
        before = leader.machine.cipher_state()
        assert before is None or not before.u1
        devices = signed_devices(ids, cluster, client)
        reports = await run_devices(devices, trainers, sizes, {})
        assert all(r.outcome is IterationOutcome.COMPLETED for r in reports.values()), [
            r.reason for r in reports.values()
        ]
        assert leader.machine.completed == (1,)
        model = await published(cluster.urls, client, 1)
        assert sorted(uploads.seen) == sorted(i.fl_id for i in ids)
        assert_within_bound(model, [trainers.clear[i.fl_id] for i in ids], sizes, m=4)
        # Every getKeys answer relayed each device's keys with the signature the leader checked and the
        # device's [key_attestation, equip_cert].
        assert got.seen
        by_id = {i.fl_id: i for i in ids}
        for answer in got.seen:
            assert sorted(k.fl_id for k in answer.keys) == sorted(by_id)
            for k in answer.keys:
                i = by_id[k.fl_id]
                assert k.certificate_chain == (i.key_attestation, i.equip_cert)
                signed = exchange_keys_signed_data(k.c_pk, k.s_pk, k.timestamp, 1)
                assert verifies(i, signed, k.signature)


def verifies(identity: DeviceIdentity, data: bytes, signature: bytes) -> bool:
    from flcluster.verify import VerificationFailed, verify_request_signature

    try:
        verify_request_signature(identity.private_key.public_key(), data, signature)
    except VerificationFailed:
        return False
    return True


async def test_wrongly_signed_stable_pw_exchange_keys_and_get_keys_are_refused_and_change_nothing(
    tmp_path: Path,
) -> None:
    """STABLE_PW_ENCRYPT under pki_verify checks exchangeKeys (§R8.1) and getKeys (§R8.6) as PW does."""
    job = signed_stable_pw_job(tmp_path, 4, cipher_time_window=60_000)
    uploads, trainers = Uploads(), Trainers()
    ids = identities(4)
    sizes = [4, 6, 9, 11]
    async with (
        open_cluster(2, job) as cluster,
        httpx.AsyncClient(timeout=60, event_hooks={"response": [uploads.hook]}) as client,
    ):
        leader = leader_of(cluster)
        common = {"fl_name": FL_NAME, "client": client, "policy": POLICY, "use_elb": True}
        prober = RequestProber(
            ids[0].fl_id,
            cluster.urls,
            identity=ids[0],
            leader=leader,
            imposter=ids[1],
            probed=PROBED_STABLE,
            seed=0,
            **common,
        )
        devices = [prober] + [
            Device(i.fl_id, cluster.urls, identity=i, seed=n, **common) for n, i in enumerate(ids[1:], 1)
        ]
        reports = await run_devices(devices, trainers, sizes, {})
        assert all(r.outcome is IterationOutcome.COMPLETED for r in reports.values()), [
            r.reason for r in reports.values()
        ]
        assert_probes_refused(prober)
        assert leader.machine.completed == (1,)
        model = await published(cluster.urls, client, 1)
        assert sorted(uploads.seen) == sorted(i.fl_id for i in ids)
        assert_within_bound(model, [trainers.clear[i.fl_id] for i in ids], sizes, m=4)


async def test_a_device_that_drops_before_push_list_sign_is_left_out_of_p(tmp_path: Path) -> None:
    # 6 devices; u = ceil(6 × 0.8) = 5, r = 0.8, t = 2: getClientList 4, pushListSign Q = 4, getListSign 4.
    # Device 0 drops after shareSecrets (so exactly five upload), device 1 after getClientList: it is in U3
    # and L but never pushes, so P cannot hold all of U3 and closes with four when the pushListSign window
    # ends; device 1's update stays in the sum and is unmasked with the others' b-shares (§R8.5).
    window = 8_000
    job = signed_pw_job(
        tmp_path, 6, update_model_ratio=0.8, share_secrets_ratio=0.8, reconstruct_secrets_threshold=2,
        cipher_time_window=window,
    )  # fmt: skip
    uploads, trainers, signs = Uploads(), Trainers(), RoundAnswers("/getListSign", decode_list_signs_response)
    ids = identities(6)
    sizes = [3, 5, 8, 13, 21, 34]
    drops = {ids[0].fl_id: "shareSecrets", ids[1].fl_id: "getClientList"}
    hooks = {"response": [uploads.hook, signs.hook]}
    async with (
        open_cluster(2, job) as cluster,
        httpx.AsyncClient(timeout=60, event_hooks=hooks) as client,
    ):
        devices = signed_devices(ids, cluster, client)
        reports = await run_devices(devices, trainers, sizes, drops)
        assert {f for f, r in reports.items() if r.outcome is IterationOutcome.FAILED} == set(drops)
        assert all(r.outcome is IterationOutcome.COMPLETED for f, r in reports.items() if f not in drops), [
            r.reason for r in reports.values()
        ]
        assert leader_of(cluster).machine.completed == (1,)
        u3 = sorted(uploads.seen)
        assert u3 == sorted(i.fl_id for i in ids[1:])  # device 1 uploaded: it is in U3
        signers = sorted(i.fl_id for i in ids[2:])
        ok = [a for a in signs.seen if a.retcode == ResponseCode.SUCCEED]
        assert ok and all([s.fl_id for s in a.signatures] == signers for a in ok)
        model = await published(cluster.urls, client, 1)
        index = {i.fl_id: n for n, i in enumerate(ids)}
        assert_within_bound(model, [trainers.clear[f] for f in u3], [sizes[index[f]] for f in u3], m=6)
        assert np.isfinite(np.concatenate([v.ravel() for v in model.values()])).all()


async def test_the_simulator_runs_pw_encrypt_with_list_signatures(tmp_path: Path) -> None:
    from flcluster.client.simulator import SimulatorConfig, simulate
    from tests.unit.test_cipher_cluster import _synthetic

    ids = identities(4)
    job = signed_pw_job(tmp_path, 4, reconstruct_secrets_threshold=2, cipher_time_window=60_000)
    async with open_cluster(2, job) as cluster, httpx.AsyncClient(timeout=60) as client:
        config = SimulatorConfig(
            servers=tuple(cluster.urls), num_devices=4, mode="synthetic", iterations=1, seed=7,
            progress=False, policy=POLICY, fl_name=FL_NAME, use_elb=True, identities=tuple(ids),
        )  # fmt: skip
        with trio.fail_after(STEP_TIMEOUT):
            report = await simulate(config)
        assert report.iterations[0].completed == 4
        model = await published(cluster.urls, client, 1)
        # Each device's signed requests the leader admitted: startFLJob, exchangeKeys, updateModel, and at
        # least one pushListSign and one getListSign (spec §R8.3): the list signatures ran.
        verifier = leader_of(cluster).verifier
        assert verifier is not None and verifier.statistics()[1] >= 5 * 4
    assert_within_bound(model, _synthetic(model, [0, 1, 2, 3]), [32] * 4, m=4)


def test_the_ack_decoder_reads_a_push_list_sign_answer() -> None:
    """(The answers above are decoded with the SDK's decoder: ResponseClientListSign, slot for slot.)"""
    from flcluster.wire.cipher_server_codec import encode_cipher_error

    body = encode_cipher_error(
        CipherRound.PUSH_LIST_SIGN, retcode=400, reason="why", iteration=3, next_req_time="9"
    )
    assert decode_ack(CipherRound.PUSH_LIST_SIGN, body) == CipherAck(400, "why", 3, "9")
