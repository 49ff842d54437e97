"""The cipher rounds in the leader's iteration machine (spec/secure-aggregation.md "Rounds"; core/cipher.py).

Scripted flows first (PW and STABLE_PW from startFLJob to AggregationDone, drop-outs, windows, every answer of
§R5, a restart that loses the lists), then a stateful property test: random devices doing random cipher
requests (well-formed and not, in and out of order), windows firing and time passing, with the invariants of
§R1 checked after every step and every refusal or repeat checked to change nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from flcluster.config import FLContext
from flcluster.core.cipher import (
    CipherAnswer,
    CipherConfig,
    CipherDevice,
    CipherMode,
    CipherThresholds,
    DeviceKeys,
    ExchangeKeysReceived,
    GetClientListReceived,
    GetKeysReceived,
    GetListSignReceived,
    GetSecretsReceived,
    ListSignature,
    PushListSignReceived,
    ReconstructSecretsReceived,
    Share,
    ShareSecretsReceived,
)
from flcluster.core.iteration import (
    JOB_NOT_AVAILABLE_TEXT,
    SAFEMODE_TEXT,
    Accepted,
    AggregateIteration,
    AggregationDone,
    ArmWindow,
    DisableRequested,
    Event,
    IterationCompleted,
    IterationConfig,
    IterationFailed,
    IterationMachine,
    Phase,
    PlainText,
    Rejected,
    ResponseCode,
    Resumed,
    StartFLJobReceived,
    UpdateModelReceived,
    UpdatesConfirmed,
    WindowClosed,
    WindowKind,
    snapshot_from_json,
    snapshot_to_json,
)
from flcluster.errors import ConfigError, IllegalEvent
from flcluster.settings import iteration_config
from tests.unit.stored_machine import StoredMachine

T0 = 1_700_000_000_000
CW = 5_000  # cipher_time_window (ms)


def config(mode: str = "PW_ENCRYPT", **overrides: object) -> IterationConfig:
    values: dict[str, object] = {
        "start_fl_job_threshold": 6,
        "update_model_ratio": 0.5,
        "share_secrets_ratio": 1.0,
        "reconstruct_secrets_threshold": 2,
        "cipher_time_window": CW,
        "start_fl_job_time_window": 10_000,
        "update_model_time_window": 20_000,
        "global_iteration_time_window": 1_000_000,
        "fl_iteration_num": 5,
        "encrypt_type": mode,
    }
    values.update(overrides)
    return iteration_config(FLContext.from_kwargs(**values))


def signed_config(**overrides: object) -> IterationConfig:
    """PW_ENCRYPT with pki_verify: the list signatures run (spec §R8; the root files are not read here)."""
    return config(pki_verify=True, root_first_ca_path="a.pem", root_second_ca_path="b.pem", **overrides)


def keys(fl_id: str, *, stable: bool = False) -> DeviceKeys:
    return DeviceKeys(fl_id, b"" if stable else b"c" * 32, b"s" * 32, b"i" * 16, b"p" * 16, b"t" * 32)


class Run:
    """Plays the driver for one machine: feeds events at a clock, collects armed windows."""

    def __init__(self, cfg: IterationConfig) -> None:
        self.m = IterationMachine(cfg)
        self.now = T0
        self.n = 0
        self.armed: dict[WindowKind, int] = {}
        self.instructions: list[object] = []

    def feed(self, event: Event) -> object:
        out = self.m.handle(event)
        for ins in out.instructions:
            self.instructions.append(ins)
            if isinstance(ins, ArmWindow):
                self.armed[ins.kind] = ins.deadline_ms
        return out.reply

    def cause(self) -> str:
        self.n += 1
        return f"c{self.n}"

    def it(self) -> int:
        return self.m.current_iteration

    def start(self, fl_id: str, size: int = 10) -> object:
        return self.feed(StartFLJobReceived(self.cause(), fl_id, size, self.now))

    def exchange(self, fl_id: str, k: DeviceKeys | None = None) -> object:
        return self.feed(ExchangeKeysReceived(self.cause(), k or keys(fl_id), self.it(), self.now))

    def get_keys(self, fl_id: str) -> object:
        return self.feed(GetKeysReceived(self.cause(), fl_id, self.it(), self.now))

    def share(self, fl_id: str, to: Iterable[str] | None = None) -> object:
        peers = sorted(to) if to is not None else [f for f in self.m.cipher_state().u1 if f != fl_id]  # type: ignore[union-attr]
        shares = [Share(p, f"{fl_id}->{p}".encode(), i) for i, p in enumerate(peers)]
        return self.feed(ShareSecretsReceived(self.cause(), fl_id, self.it(), shares, self.now))

    def get_secrets(self, fl_id: str) -> object:
        return self.feed(GetSecretsReceived(self.cause(), fl_id, self.it(), self.now))

    def update(self, fl_id: str) -> object:
        return self.feed(UpdateModelReceived(self.cause(), fl_id, self.it(), self.now))

    def client_list(self, fl_id: str) -> object:
        return self.feed(GetClientListReceived(self.cause(), fl_id, self.it(), self.now))

    def push(self, fl_id: str, *, good: bool = True, signature: bytes | None = None) -> object:
        sig = signature if signature is not None else f"sig:{fl_id}".encode()
        return self.feed(PushListSignReceived(self.cause(), fl_id, self.it(), sig, good, self.now))

    def get_signs(self, fl_id: str) -> object:
        return self.feed(GetListSignReceived(self.cause(), fl_id, self.it(), self.now))

    def reconstruct(self, fl_id: str, of: Iterable[str] | None = None) -> object:
        owners = sorted(of) if of is not None else [f for f in self.m.cipher_state().u2 if f != fl_id]  # type: ignore[union-attr]
        shares = [Share(o, f"{o}@{fl_id}".encode()) for o in owners]
        return self.feed(ReconstructSecretsReceived(self.cause(), fl_id, self.it(), shares, self.now))

    def close(self, kind: WindowKind) -> None:
        self.now = max(self.now, self.armed[kind])
        self.feed(WindowClosed(self.cause(), kind, self.it(), self.now))


def answer(reply: object) -> CipherAnswer:
    assert isinstance(reply, CipherAnswer), reply
    return reply


def ok(reply: object) -> CipherAnswer:
    a = answer(reply)
    assert a.retcode is ResponseCode.SUCCEED, a
    return a


DEVICES = [f"d{i}" for i in range(6)]


def through_secrets(run: Run, devices: list[str] = DEVICES) -> None:
    for d in devices:
        assert isinstance(run.start(d), Accepted)
    for d in devices:
        ok(run.exchange(d))
    for d in devices:
        ok(run.get_keys(d))
    for d in devices:
        ok(run.share(d))
    for d in devices:
        ok(run.get_secrets(d))


# ------------------------------------------------------------------------------------------------ config


def test_thresholds_follow_the_original_formulas() -> None:
    cfg = CipherConfig(
        mode="PW_ENCRYPT", share_secrets_ratio=0.85, cipher_time_window=1, reconstruct_secrets_threshold=10
    )
    assert CipherThresholds.of(cfg, 20, 15) == CipherThresholds(17, 15, 15, 15, 13, 12, 11, 11)
    cfg = CipherConfig(
        mode="PW_ENCRYPT", share_secrets_ratio=1.0, cipher_time_window=1, reconstruct_secrets_threshold=3
    )
    assert CipherThresholds.of(cfg, 8, 4) == CipherThresholds(8, 8, 8, 8, 4, 4, 4, 4)
    # The ratio's decimal value: 10 x 0.7 is 7, not 8.
    cfg = CipherConfig(
        mode="PW_ENCRYPT", share_secrets_ratio=0.7, cipher_time_window=1, reconstruct_secrets_threshold=1
    )
    assert CipherThresholds.of(cfg, 10, 1).exchange_keys == 7


def test_the_share_threshold_always_holds_t_plus_1() -> None:
    """The original's CipherInit check (H >= t + 1) follows from t < u, which FLContext refuses otherwise."""
    with pytest.raises(ConfigError, match="reconstruct_secrets_threshold < update_model_threshold"):
        FLContext(encrypt_type="PW_ENCRYPT", start_fl_job_threshold=10, update_model_ratio=0.5,
                  reconstruct_secrets_threshold=5)  # fmt: skip
    for n in range(1, 30):
        cfg = config(start_fl_job_threshold=n + 1, update_model_ratio=1.0, share_secrets_ratio=0.1,
                     reconstruct_secrets_threshold=n)  # fmt: skip
        t = cfg.cipher_thresholds
        assert t is not None and t.share_secrets >= n + 1


def test_next_req_time_adds_the_cipher_windows() -> None:
    assert config().iteration_time_window == 10_000 + 20_000 + 6 * CW
    assert config("STABLE_PW_ENCRYPT").iteration_time_window == 10_000 + 20_000 + 2 * CW
    assert config("NOT_ENCRYPT").cipher is None


# --------------------------------------------------------------------------------------------- PW flows


def test_a_pw_iteration_from_start_to_unmasked_aggregation() -> None:
    run = Run(config())
    for d in DEVICES[:5]:
        run.start(d)
    ok(run.exchange("d0"))
    assert WindowKind.EXCHANGE_KEYS not in run.armed  # armed when startFLJob closes
    assert answer(run.get_keys("d0")).retcode is ResponseCode.SucNotReady
    run.start("d5")
    assert WindowKind.EXCHANGE_KEYS in run.armed and WindowKind.UPDATE_MODEL not in run.armed
    for d in DEVICES[1:]:
        ok(run.exchange(d))
    assert run.m.cipher_state().u1_closed  # type: ignore[union-attr]
    keys_answer = ok(run.get_keys("d3"))
    assert [k.fl_id for k in keys_answer.keys] == DEVICES
    for d in DEVICES:
        run.get_keys(d)
    for d in DEVICES:
        assert ok(run.share(d)).reason == "OK"
    mine = ok(run.get_secrets("d2"))
    assert [(s.fl_id, s.share) for s in mine.shares] == [
        (s, f"{s}->d2".encode()) for s in DEVICES if s != "d2"
    ]
    for d in DEVICES:
        run.get_secrets(d)
    assert WindowKind.UPDATE_MODEL in run.armed
    assert answer(run.client_list("d0")).retcode is ResponseCode.SucNotReady
    for d in DEVICES[:3]:
        assert isinstance(run.update(d), Accepted)
    assert run.m.phase is Phase.UNMASKING
    assert isinstance(run.update("d3"), Rejected)  # the updateModel round is over
    assert isinstance(run.start("late"), Rejected)
    listed = ok(run.client_list("d1"))
    assert listed.clients == ("d0", "d1", "d2")
    assert answer(run.client_list("d4")).retcode is ResponseCode.RequestError
    for d in ("d0", "d2"):
        ok(run.client_list(d))
    ok(run.reconstruct("d0"))
    ok(run.reconstruct("d1"))
    assert run.m.phase is Phase.UNMASKING
    done = ok(run.reconstruct("d2"))
    assert done.reason == "Success,the secret is reconstructing."
    assert run.m.phase is Phase.AGGREGATING
    aggregate = [i for i in run.instructions if isinstance(i, AggregateIteration)]
    assert len(aggregate) == 1 and aggregate[0].unmask is not None
    unmask = aggregate[0].unmask
    assert unmask.u2 == tuple(DEVICES) and unmask.u3 == ("d0", "d1", "d2") and unmask.t == 2
    assert [s.fl_id for s in unmask.shares] == ["d0", "d1", "d2"]
    assert [k.fl_id for k in unmask.keys] == DEVICES and unmask.keys[0].ind_iv == b"i" * 16
    assert [d.fl_id for d in aggregate[0].updates] == ["d0", "d1", "d2"]
    # Late requests while aggregating.
    assert ok(run.reconstruct("d0")).reason == "Current amount for ReconstructSecretsKernel is enough."
    assert answer(run.reconstruct("d5")).retcode is ResponseCode.OutOfTime
    assert run.get_keys("d0") == PlainText(SAFEMODE_TEXT)
    run.feed(AggregationDone(run.cause(), 1, run.now))
    assert any(isinstance(i, IterationCompleted) for i in run.instructions)
    assert run.it() == 2 and run.m.cipher_state().u1 == ()  # type: ignore[union-attr]


def test_drop_outs_after_share_secrets_and_after_update_model() -> None:
    """Eight devices, r = 0.75: two drop after shareSecrets, one after updateModel; the iteration goes on."""
    devices = [f"d{i}" for i in range(8)]
    run = Run(config(start_fl_job_threshold=8, update_model_ratio=0.5, share_secrets_ratio=0.75,
                     reconstruct_secrets_threshold=2))  # fmt: skip
    t = run.m.config.cipher_thresholds
    assert t == CipherThresholds(6, 5, 4, 4, 3, 3, 3, 3)
    for d in devices:
        run.start(d)
    for d in devices:
        run.exchange(d)
    for d in devices:
        run.get_keys(d)
    for d in devices:
        run.share(d)
    for d in devices[:6]:  # d6 and d7 drop
        ok(run.get_secrets(d))
    for d in devices[:4]:
        assert isinstance(run.update(d), Accepted)
    assert run.m.phase is Phase.UNMASKING
    for d in devices[:3]:  # d3 drops after its upload
        ok(run.client_list(d))
    for d in devices[:3]:
        ok(run.reconstruct(d))
    assert run.m.phase is Phase.AGGREGATING
    (agg,) = [i for i in run.instructions if isinstance(i, AggregateIteration)]
    assert agg.unmask is not None and agg.unmask.u3 == ("d0", "d1", "d2", "d3")
    assert agg.unmask.u2 == tuple(devices)


def test_a_submit_round_closes_on_its_quorum_when_its_window_ends() -> None:
    run = Run(config(share_secrets_ratio=0.5))  # E = max(3, 3) = 3
    for d in DEVICES:
        run.start(d)
    for d in DEVICES[:4]:
        ok(run.exchange(d))
    assert answer(run.get_keys("d0")).retcode is ResponseCode.SucNotReady
    run.close(WindowKind.EXCHANGE_KEYS)
    state = run.m.cipher_state()
    assert state is not None and state.u1_closed and state.u1 == ("d0", "d1", "d2", "d3")
    assert (
        answer(run.exchange("d5")).reason == "Current amount for exchangeKey is enough. Please retry later."
    )
    assert [k.fl_id for k in ok(run.get_keys("d1")).keys] == ["d0", "d1", "d2", "d3"]
    assert run.m.phase is Phase.RUNNING


@pytest.mark.parametrize("kind", [WindowKind.EXCHANGE_KEYS, WindowKind.GET_KEYS, WindowKind.SHARE_SECRETS,
                                  WindowKind.GET_SECRETS, WindowKind.GET_CLIENT_LIST,
                                  WindowKind.RECONSTRUCT_SECRETS])  # fmt: skip
def test_a_round_that_misses_its_threshold_fails_the_iteration(kind: WindowKind) -> None:
    run = Run(config())
    order = [WindowKind.EXCHANGE_KEYS, WindowKind.GET_KEYS, WindowKind.SHARE_SECRETS, WindowKind.GET_SECRETS,
             WindowKind.UPDATE_MODEL, WindowKind.GET_CLIENT_LIST, WindowKind.RECONSTRUCT_SECRETS]  # fmt: skip
    steps = [
        lambda d: run.exchange(d), lambda d: run.get_keys(d), lambda d: run.share(d),
        lambda d: run.get_secrets(d), lambda d: run.update(d), lambda d: run.client_list(d),
        lambda d: run.reconstruct(d),
    ]  # fmt: skip
    for d in DEVICES:
        run.start(d)
    for window, step in zip(order, steps, strict=True):
        if window is kind:
            step("d0")  # one device only: below every threshold
            break
        for d in DEVICES if window is not WindowKind.UPDATE_MODEL else DEVICES[:3]:
            step(d)
    run.close(kind)
    (failed,) = [i for i in run.instructions if isinstance(i, IterationFailed)]
    assert (
        failed.reason == f"Round {kind.value} timeout! This iteration is invalid. Proceed to next iteration."
    )
    assert run.it() == 2 and run.m.phase is Phase.WAITING
    assert run.m.cipher_state() == run.m.cipher_state().__class__(False, (), False, (), (), False, (), (), ())  # type: ignore[union-attr]


def test_each_window_is_armed_when_the_round_before_it_is_done() -> None:
    run = Run(config())
    for d in DEVICES:
        run.start(d)
    assert set(run.armed) == {WindowKind.GLOBAL, WindowKind.START_FL_JOB, WindowKind.EXCHANGE_KEYS}
    for d in DEVICES:
        run.exchange(d)
    assert WindowKind.GET_KEYS in run.armed and WindowKind.SHARE_SECRETS not in run.armed
    for d in DEVICES:
        run.get_keys(d)
    assert WindowKind.SHARE_SECRETS in run.armed
    for d in DEVICES:
        run.share(d)
    assert WindowKind.GET_SECRETS in run.armed and WindowKind.UPDATE_MODEL not in run.armed
    for d in DEVICES:
        run.get_secrets(d)
    assert WindowKind.UPDATE_MODEL in run.armed
    assert {w.kind for w in run.m.armed_windows()} == {WindowKind.GLOBAL, WindowKind.UPDATE_MODEL}
    for d in DEVICES[:3]:
        run.update(d)
    assert {w.kind for w in run.m.armed_windows()} == {WindowKind.GLOBAL, WindowKind.GET_CLIENT_LIST}
    for d in DEVICES[:3]:
        run.client_list(d)
    assert {w.kind for w in run.m.armed_windows()} == {WindowKind.GLOBAL, WindowKind.RECONSTRUCT_SECRETS}
    # next_req_time is the start plus every window, a true upper bound.
    assert run.m.next_req_time_ms(run.now) == T0 + 10_000 + 20_000 + 6 * CW


# -------------------------------------------------------------------------------------------- the answers


def test_every_answer_of_the_exchange_and_share_rounds() -> None:
    run = Run(config())
    assert (
        answer(run.exchange("stranger")).reason == "devices_meta for stranger is not set. Please retry later."
    )
    for d in DEVICES:
        run.start(d)
    bad = DeviceKeys("d0", b"c" * 31, b"s" * 32, b"i" * 15, b"p" * 16, b"")
    refused = answer(run.exchange("d0", bad))
    assert refused.retcode is ResponseCode.RequestError
    assert "c_pk has 31 bytes" in refused.reason and "ind_iv has 15 bytes" in refused.reason
    assert "pw_salt has 0 bytes" in refused.reason
    ok(run.exchange("d0"))
    again = ok(run.exchange("d0", keys("d0")))
    assert again.reason == "The server has received the request, please do not request again."
    wrong = run.feed(ExchangeKeysReceived("x", keys("d1"), 7, run.now))
    assert answer(wrong).retcode is ResponseCode.OutOfTime and answer(wrong).reason == "iter num is error."
    assert answer(wrong).next_req_time_ms > run.now
    for d in DEVICES[1:]:
        run.exchange(d)
    assert (
        answer(run.share("d0")).reason == "client share secret is not in getkeys list. && client is illegal"
    )
    for d in DEVICES:
        run.get_keys(d)
    assert answer(run.get_keys("stranger")).retcode is ResponseCode.RequestError
    missing = answer(run.share("d0", to=["d1"]))
    assert missing.retcode is ResponseCode.RequestError and "no share for 4 device(s)" in missing.reason
    to_self = answer(run.share("d0", to=DEVICES))
    assert "not allowed here" in to_self.reason
    assert answer(run.get_secrets("d0")).retcode is ResponseCode.SucNotReady
    for d in DEVICES:
        ok(run.share(d))
    assert ok(run.share("d0")).reason == "client sharesecret already exists."
    assert answer(run.get_secrets("stranger")).retcode is ResponseCode.RequestError


def test_update_model_is_only_for_devices_that_got_their_secrets() -> None:
    run = Run(config())
    for d in DEVICES:
        run.start(d)
    refused = run.update("d0")
    assert isinstance(refused, Rejected) and refused.retcode is ResponseCode.OutOfTime
    assert refused.reason == "The fl_id d0 did not get the secrets of this iteration; it cannot upload."
    assert run.m.counts().update_model == 0


def test_reconstruct_answers() -> None:
    run = Run(config())
    through_secrets(run)
    assert answer(run.reconstruct("d0")).retcode is ResponseCode.SucNotReady
    for d in DEVICES[:3]:
        run.update(d)
    assert answer(run.reconstruct("d4")).reason == "The client is not in update model client list."
    not_listed = ok(run.reconstruct("d0"))
    assert not_listed.reason == "The client d0 is not in get clients list, but in update model client list."
    assert run.m.cipher_state().r == ()  # type: ignore[union-attr]
    run.client_list("d0")
    strangers = answer(run.reconstruct("d0", of=["d0", "d1"]))
    assert strangers.retcode is ResponseCode.RequestError
    ok(run.reconstruct("d0"))
    assert ok(run.reconstruct("d0")).reason == "Client has sended messages."
    assert run.m.cipher_state().r == ("d0",)  # type: ignore[union-attr]


def test_client_list_waits_for_uploads_still_being_folded() -> None:
    run = Run(config())
    through_secrets(run)
    for d in DEVICES[:3]:
        reply = run.feed(UpdateModelReceived(run.cause(), d, 1, run.now, server="s1"))
        assert isinstance(reply, Accepted)
    run.feed(UpdatesConfirmed(run.cause(), "s1", 1, ("d0", "d1"), run.now))
    reply = run.feed(UpdateModelReceived(run.cause(), "d3", 1, run.now, server="s2"))
    run.feed(UpdatesConfirmed(run.cause(), "s1", 1, ("d2",), run.now))
    assert run.m.phase is Phase.UNMASKING
    assert answer(run.client_list("d0")).retcode is ResponseCode.SucNotReady  # d3 is still being folded
    run.feed(UpdatesConfirmed(run.cause(), "s2", 1, ("d3",), run.now))
    assert ok(run.client_list("d0")).clients == ("d0", "d1", "d2", "d3")


def test_plain_texts_and_illegal_rounds() -> None:
    run = Run(config())
    with pytest.raises(IllegalEvent, match="not a round of this job"):
        Run(config("NOT_ENCRYPT")).exchange("d0")
    with pytest.raises(IllegalEvent, match="not a round of STABLE_PW_ENCRYPT"):
        Run(config("STABLE_PW_ENCRYPT")).share("d0", to=[])
    for d in DEVICES:
        run.start(d)
    run.feed(DisableRequested(run.cause(), run.now))
    assert run.exchange("d0") == PlainText(JOB_NOT_AVAILABLE_TEXT)


def test_disabling_while_unmasking_fails_the_iteration() -> None:
    run = Run(config())
    through_secrets(run)
    for d in DEVICES[:3]:
        run.update(d)
    assert run.m.phase is Phase.UNMASKING
    run.feed(DisableRequested(run.cause(), run.now))
    assert any(isinstance(i, IterationFailed) for i in run.instructions)


def test_a_leader_restarted_from_its_store_keeps_the_lists_and_finishes_the_iteration() -> None:
    run = Run(config())
    stored = StoredMachine()
    for d in DEVICES:
        run.start(d)
        stored.commit(run.m)
    for step in (run.exchange, run.get_keys, run.share, run.get_secrets):
        for d in DEVICES:
            ok(step(d))
            stored.commit(run.m)
    rebuilt = stored.restored()
    assert rebuilt == run.m and rebuilt.cipher_state() == run.m.cipher_state()
    resumed = rebuilt.handle(Resumed("r", run.now)).instructions
    assert resumed and not any(isinstance(i, IterationFailed) for i in resumed)
    run.m = rebuilt
    for d in DEVICES[:3]:
        assert isinstance(run.update(d), Accepted)
    for d in DEVICES[:3]:
        ok(run.client_list(d))
        stored.commit(run.m)
    run.m = stored.restored()
    assert ok(run.reconstruct(DEVICES[0])).reason.startswith("Success, but")
    stored.commit(run.m)
    run.m = stored.restored()
    for d in DEVICES[1:3]:
        ok(run.reconstruct(d))
    (aggregate,) = [i for i in run.instructions if isinstance(i, AggregateIteration)]
    unmask = aggregate.unmask
    assert unmask is not None and unmask.u3 == tuple(DEVICES[:3]) and len(unmask.keys) == len(DEVICES)
    assert unmask.shares[0].shares[0].share == f"d1@{DEVICES[0]}".encode()


def test_a_store_without_the_lists_fails_the_iteration_they_were_lost_from() -> None:
    run = Run(config())
    through_secrets(run)
    # A snapshot written before the cipher lists were kept has none.
    snapshot = attrs.evolve(snapshot_from_json(snapshot_to_json(run.m.snapshot())), cipher=None)
    rebuilt = IterationMachine.from_snapshot(snapshot)
    assert rebuilt.cipher_state().lost  # type: ignore[union-attr]
    out = rebuilt.handle(Resumed("r", run.now))
    (failed,) = [i for i in out.instructions if isinstance(i, IterationFailed)]
    assert "keys and shares are not kept" in failed.reason
    assert rebuilt.current_iteration == 2 and not rebuilt.cipher_state().lost  # type: ignore[union-attr]
    # A waiting iteration has nothing to lose.
    idle = IterationMachine.from_snapshot(rebuilt.snapshot())
    assert not idle.handle(Resumed("r", run.now)).instructions


def test_unmasking_snapshot_is_consistent() -> None:
    run = Run(config())
    through_secrets(run)
    for d in DEVICES[:3]:
        run.update(d)
    snapshot = run.m.snapshot()
    assert snapshot.phase is Phase.UNMASKING
    assert snapshot_from_json(snapshot_to_json(snapshot)) == snapshot
    assert snapshot.cipher is not None and len(snapshot.cipher.devices) == len(DEVICES)


# ----------------------------------------------------------------------------------------------- STABLE_PW


def test_a_stable_pw_iteration_needs_every_device_of_u1() -> None:
    run = Run(config("STABLE_PW_ENCRYPT", update_model_ratio=0.5))
    for d in DEVICES:
        run.start(d)
    for d in DEVICES:
        ok(run.exchange(d, keys(d, stable=True)))
    refused = run.update("d0")
    assert isinstance(refused, Rejected) and "did not get the keys" in refused.reason
    for d in DEVICES:
        assert all(k.c_pk == b"" for k in ok(run.get_keys(d)).keys)
    assert WindowKind.UPDATE_MODEL in run.armed
    for d in DEVICES[:5]:
        assert isinstance(run.update(d), Accepted)
    assert run.m.phase is Phase.RUNNING  # u = 3 is not enough: all of U1 must upload
    run.update("d5")
    assert run.m.phase is Phase.AGGREGATING
    (agg,) = [i for i in run.instructions if isinstance(i, AggregateIteration)]
    assert agg.unmask is None and len(agg.updates) == 6
    with pytest.raises(IllegalEvent):
        run.client_list("d0")


def test_stable_pw_fails_when_a_device_of_u1_does_not_upload() -> None:
    run = Run(config("STABLE_PW_ENCRYPT"))
    for d in DEVICES:
        run.start(d)
    for d in DEVICES:
        run.exchange(d, keys(d, stable=True))
    for d in DEVICES:
        run.get_keys(d)
    for d in DEVICES[:5]:
        run.update(d)
    run.close(WindowKind.UPDATE_MODEL)
    assert any(isinstance(i, IterationFailed) for i in run.instructions)


def test_stable_pw_aggregation_survives_a_leader_restart() -> None:
    run = Run(config("STABLE_PW_ENCRYPT"))
    for d in DEVICES:
        run.start(d)
    for d in DEVICES:
        run.exchange(d, keys(d, stable=True))
    for d in DEVICES:
        run.get_keys(d)
    for d in DEVICES:
        run.update(d)
    rebuilt = IterationMachine.from_snapshot(run.m.snapshot())
    out = rebuilt.handle(Resumed("r", run.now))
    assert [type(i) for i in out.instructions] == [AggregateIteration]


# ---------------------------------------------------------------------------------------- property test


FLEET = [f"f{i}" for i in range(5)]


class CipherRules(RuleBasedStateMachine):
    """Random devices, random cipher requests, windows and time; §R1's invariants after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.run = Run(config())
        self.frozen_u1: tuple[str, ...] | None = None
        self.frozen_u2: tuple[str, ...] | None = None
        self.frozen_u3: tuple[str, ...] | None = None
        self.frozen_p: tuple[str, ...] | None = None
        self.iteration = 1
        self.stored = StoredMachine()

    @initialize(
        mode=st.sampled_from(["PW_ENCRYPT", "STABLE_PW_ENCRYPT"]),
        threshold=st.integers(3, 5),
        ratio=st.sampled_from([0.6, 0.8, 1.0]),
        share_ratio=st.sampled_from([0.5, 0.75, 1.0]),
        signed=st.booleans(),
    )
    def setup(self, mode: str, threshold: int, ratio: float, share_ratio: float, signed: bool) -> None:
        pki: dict[str, object] = {}
        if signed:  # PW: the list signatures run (spec §R8); STABLE_PW: nothing changes
            pki = {"pki_verify": True, "root_first_ca_path": "a", "root_second_ca_path": "b"}
        try:
            cfg = config(mode, start_fl_job_threshold=threshold, update_model_ratio=ratio,
                         share_secrets_ratio=share_ratio, reconstruct_secrets_threshold=1, **pki)  # fmt: skip
        except ConfigError:
            cfg = config(mode, start_fl_job_threshold=threshold, update_model_ratio=1.0,
                         share_secrets_ratio=1.0, reconstruct_secrets_threshold=1, **pki)  # fmt: skip
        self.run = Run(cfg)
        self.stored = StoredMachine()

    @property
    def m(self) -> IterationMachine:
        return self.run.m

    @property
    def signed(self) -> bool:
        cipher = self.m.config.cipher
        return cipher is not None and cipher.list_sign

    def cipher_event(self, what: str, fl_id: str, *, good: bool, wrong_iteration: bool) -> Event:
        it = self.m.current_iteration + (1 if wrong_iteration else 0)
        state = self.m.cipher_state()
        assert state is not None
        cause, now = self.run.cause(), self.run.now
        stable = self.m.config.cipher is not None and self.m.config.cipher.mode is CipherMode.STABLE_PW
        match what:
            case "exchange":
                k = keys(fl_id, stable=stable) if good else DeviceKeys(fl_id, b"x", b"", b"", b"", b"")
                return ExchangeKeysReceived(cause, k, it, now)
            case "get_keys":
                return GetKeysReceived(cause, fl_id, it, now)
            case "share":
                peers = [f for f in state.u1 if f != fl_id] if good else [fl_id]
                return ShareSecretsReceived(cause, fl_id, it, [Share(p, b"s") for p in peers], now)
            case "get_secrets":
                return GetSecretsReceived(cause, fl_id, it, now)
            case "client_list":
                return GetClientListReceived(cause, fl_id, it, now)
            case "push":
                return PushListSignReceived(cause, fl_id, it, f"sig:{fl_id}".encode(), good, now)
            case "get_signs":
                return GetListSignReceived(cause, fl_id, it, now)
            case _:
                owners = [f for f in state.u2 if f != fl_id] if good else ["nobody"]
                return ReconstructSecretsReceived(cause, fl_id, it, [Share(o, b"r") for o in owners], now)

    def feed_checked(self, event: Event) -> None:
        before_snapshot, before_state = self.m.snapshot(), self.m.cipher_state()
        try:
            reply = self.run.feed(event)
        except IllegalEvent:
            assert (self.m.snapshot(), self.m.cipher_state()) == (before_snapshot, before_state)
            return
        if isinstance(reply, CipherAnswer):
            assert reply.next_req_time_ms > event.now_ms  # type: ignore[union-attr]
            changed = (self.m.snapshot(), self.m.cipher_state()) != (before_snapshot, before_state)
            refusal = (
                reply.retcode is not ResponseCode.SUCCEED
                or reply.reason
                in {
                    "The server has received the request, please do not request again.",
                    "client sharesecret already exists.",
                    "Client has sended messages.",
                    "Current amount for ReconstructSecretsKernel is enough.",
                    "Current amount for PushListSignKernel is enough.",
                    "client send signature is not in get update model client list. && client is illegal",
                }
                or reply.reason.endswith("but in update model client list.")
            )
            if refusal:
                assert not changed, f"{reply} changed the machine"
        if isinstance(reply, PlainText) and hasattr(event, "round"):  # a cipher event counts no visit
            assert (self.m.snapshot(), self.m.cipher_state()) == (before_snapshot, before_state)

    @rule(fl_id=st.sampled_from(FLEET))
    def start(self, fl_id: str) -> None:
        self.feed_checked(StartFLJobReceived(self.run.cause(), fl_id, 5, self.run.now))

    @rule(
        what=st.sampled_from(
            [
                "exchange",
                "get_keys",
                "share",
                "get_secrets",
                "client_list",
                "push",
                "get_signs",
                "reconstruct",
            ]
        ),
        fl_id=st.sampled_from([*FLEET, "stranger"]),
        good=st.booleans(),
        wrong_iteration=st.booleans(),
    )
    def cipher(self, what: str, fl_id: str, good: bool, wrong_iteration: bool) -> None:
        self.feed_checked(self.cipher_event(what, fl_id, good=good, wrong_iteration=wrong_iteration))

    @rule(fl_id=st.sampled_from(FLEET), times=st.integers(1, 8))
    def advance(self, fl_id: str, times: int) -> None:
        """The device takes its next step in the protocol (so that random runs get through the rounds)."""
        for _ in range(times):
            s = self.m.cipher_state()
            assert s is not None
            snapshot = self.m.snapshot()
            devices = {d.fl_id for d in snapshot.devices}
            if fl_id not in devices:
                self.start(fl_id)
                continue
            steps = [("exchange", s.u1), ("get_keys", s.k), ("share", s.u2), ("get_secrets", s.s)]
            pending = [what for what, members in steps if fl_id not in members]
            if pending:
                self.cipher(pending[0], fl_id, True, False)
            elif fl_id not in snapshot.updated:
                self.update(fl_id)
            elif fl_id not in s.l:
                self.cipher("client_list", fl_id, True, False)
            elif self.signed and fl_id not in s.p and not s.p_closed:
                self.cipher("push", fl_id, True, False)
            elif self.signed and fl_id in s.p and fl_id not in s.g:
                self.cipher("get_signs", fl_id, True, False)
            else:
                self.cipher("reconstruct", fl_id, True, False)

    @rule(skip=st.sampled_from([*FLEET, None]), times=st.sampled_from([1, 1, 1, 4]))
    def everyone_advances(self, skip: str | None, times: int) -> None:
        """Every device but ``skip`` (a drop-out) takes its next step (``times`` over)."""
        for _ in range(times):
            for fl_id in FLEET:
                if fl_id != skip:
                    self.advance(fl_id, 1)

    @rule(fl_id=st.sampled_from(FLEET))
    def update(self, fl_id: str) -> None:
        self.feed_checked(
            UpdateModelReceived(self.run.cause(), fl_id, self.m.current_iteration, self.run.now)
        )

    @precondition(lambda self: self.m.phase is Phase.AGGREGATING)
    @rule()
    def aggregated(self) -> None:
        self.run.feed(AggregationDone(self.run.cause(), self.m.current_iteration, self.run.now))

    @precondition(lambda self: bool(self.m.armed_windows()))
    @rule(data=st.data())
    def window(self, data: st.DataObject) -> None:
        w = data.draw(st.sampled_from(self.m.armed_windows()))
        self.run.now = max(self.run.now, w.deadline_ms)
        self.run.feed(WindowClosed(self.run.cause(), w.kind, self.m.current_iteration, self.run.now))

    @rule(ms=st.integers(0, 3_000))
    def time_passes(self, ms: int) -> None:
        self.run.now += ms

    @rule()
    def restart(self) -> None:
        rebuilt = self.stored.restored()
        assert rebuilt == self.m and rebuilt.cipher_state() == self.m.cipher_state()
        self.run.m = rebuilt
        self.run.feed(Resumed(self.run.cause(), self.run.now))

    @invariant()
    def lists_nest(self) -> None:
        s = self.m.cipher_state()
        assert s is not None
        if self.m.current_iteration != self.iteration:
            self.iteration = self.m.current_iteration
            self.frozen_u1 = self.frozen_u2 = self.frozen_u3 = self.frozen_p = None
        if s.lost:
            return
        devices = {d.fl_id for d in self.m.snapshot().devices}
        counted = set(self.m.snapshot().updated)
        assert set(s.u1) <= devices
        assert set(s.k) <= set(s.u1) and set(s.u2) <= set(s.k) and set(s.s) <= set(s.u2)
        assert counted <= (set(s.s) if self.m.config.cipher.mode is CipherMode.PW else set(s.k))  # type: ignore[union-attr]
        assert set(s.l) <= counted and set(s.r) <= set(s.l)
        assert set(s.p) <= set(s.l) and set(s.g) <= set(s.p)
        assert self.signed or not (s.p or s.p_closed or s.g)
        assert not s.g or s.p_closed
        if s.p_closed:
            assert self.frozen_p in (None, s.p)
            self.frozen_p = s.p
        assert not s.k or s.u1_closed
        assert not s.s or s.u2_closed
        # A frozen list never changes until the iteration ends.
        if s.u1_closed:
            assert self.frozen_u1 in (None, s.u1)
            self.frozen_u1 = s.u1
        if s.u2_closed:
            assert self.frozen_u2 in (None, s.u2)
            self.frozen_u2 = s.u2
        if s.l:
            assert self.frozen_u3 in (None, tuple(sorted(counted)))
            self.frozen_u3 = tuple(sorted(counted))
        assert len(s.r) <= self.m.config.cipher_thresholds.reconstruct_secrets  # type: ignore[union-attr]

    @invariant()
    def reached(self) -> None:
        s = self.m.cipher_state()
        assert s is not None
        event(f"phase {self.m.phase.value}")
        event(f"U2 closed: {s.u2_closed}")
        event(f"P closed: {s.p_closed}")

    @invariant()
    def snapshot_round_trips(self) -> None:
        snapshot = self.m.snapshot()
        assert IterationMachine.from_snapshot(snapshot).snapshot() == snapshot
        # The store's header and device rows, committed after every step, rebuild the same machine.
        self.stored.commit(self.m)
        assert self.stored.restored() == self.m


TestCipherRules = CipherRules.TestCase
TestCipherRules.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)


# ------------------------------------------------------------------------ list signatures (spec §R8)


def through_client_list(run: Run, uploaders: list[str] = DEVICES[:3]) -> None:
    through_secrets(run)
    for d in uploaders:
        assert isinstance(run.update(d), Accepted)
    for d in uploaders:
        ok(run.client_list(d))


def test_list_signatures_run_only_with_pw_and_pki_verify() -> None:
    cfg = signed_config()
    assert cfg.cipher is not None and cfg.cipher.list_sign
    assert [r.value for r in cfg.cipher.rounds][-3:] == ["pushListSign", "getListSign", "reconstructSecrets"]
    assert cfg.iteration_time_window == 10_000 + 20_000 + 8 * CW  # one window per round (reference §2.5)
    assert config().cipher is not None and not config().cipher.list_sign  # type: ignore[union-attr]
    stable = config("STABLE_PW_ENCRYPT", pki_verify=True, root_first_ca_path="a", root_second_ca_path="b")
    assert stable.cipher is not None and not stable.cipher.list_sign
    with pytest.raises(ValueError, match="list_sign=True with mode='STABLE_PW_ENCRYPT'"):
        CipherConfig(mode="STABLE_PW_ENCRYPT", share_secrets_ratio=1.0, cipher_time_window=1,
                     reconstruct_secrets_threshold=1, list_sign=True)  # fmt: skip
    with pytest.raises(IllegalEvent, match="pushListSign is not a round of PW_ENCRYPT"):
        Run(config()).push("d0")
    with pytest.raises(IllegalEvent, match="getListSign is not a round of PW_ENCRYPT"):
        Run(config()).get_signs("d0")


def test_a_signed_pw_iteration_from_client_list_to_unmasked_aggregation() -> None:
    run = Run(signed_config())
    through_secrets(run)
    for d in DEVICES[:3]:
        run.update(d)
    assert {w.kind for w in run.m.armed_windows()} == {WindowKind.GLOBAL, WindowKind.GET_CLIENT_LIST}
    for d in DEVICES[:3]:
        ok(run.client_list(d))
    # L reached its threshold: the pushListSign window, not reconstructSecrets' (§R3).
    assert {w.kind for w in run.m.armed_windows()} == {WindowKind.GLOBAL, WindowKind.PUSH_LIST_SIGN}
    assert answer(run.get_signs("d0")).retcode is ResponseCode.SucNotReady  # P is not frozen
    assert ok(run.push("d2")).reason == "send update model client list signature success. "
    assert ok(run.push("d0")).reason == "send update model client list signature success. "
    state = run.m.cipher_state()
    assert state is not None and state.p == ("d0", "d2") and not state.p_closed
    ok(run.push("d1"))  # P holds all of U3: it closes
    state = run.m.cipher_state()
    assert state is not None and state.p_closed
    assert {w.kind for w in run.m.armed_windows()} == {WindowKind.GLOBAL, WindowKind.GET_LIST_SIGN}
    signs = ok(run.get_signs("d1"))
    assert signs.reason == "send update model client list signature success. "
    assert signs.signatures == tuple(ListSignature(d, f"sig:{d}".encode()) for d in ("d0", "d1", "d2"))
    ok(run.get_signs("d0"))
    assert WindowKind.RECONSTRUCT_SECRETS not in {w.kind for w in run.m.armed_windows()}
    ok(run.get_signs("d2"))  # G reaches its threshold (3)
    assert {w.kind for w in run.m.armed_windows()} == {WindowKind.GLOBAL, WindowKind.RECONSTRUCT_SECRETS}
    assert run.m.cipher_state().g == ("d0", "d1", "d2")  # type: ignore[union-attr]
    for d in DEVICES[:3]:
        ok(run.reconstruct(d))
    assert run.m.phase is Phase.AGGREGATING and not run.m.armed_windows()
    (agg,) = [i for i in run.instructions if isinstance(i, AggregateIteration)]
    assert agg.unmask is not None and agg.unmask.u3 == ("d0", "d1", "d2")
    assert run.push("d0") == PlainText(SAFEMODE_TEXT) and run.get_signs("d0") == PlainText(SAFEMODE_TEXT)
    run.feed(AggregationDone(run.cause(), 1, run.now))
    assert run.it() == 2 and run.m.cipher_state().p == () and not run.m.cipher_state().p_closed  # type: ignore[union-attr]


def test_every_answer_of_the_list_signature_rounds() -> None:
    run = Run(signed_config())
    through_secrets(run)
    # Before U3 is final.
    assert answer(run.push("d0")).retcode is ResponseCode.SucNotReady
    assert answer(run.get_signs("d0")).reason == "The server is not ready."
    for d in DEVICES[:3]:
        run.update(d)
    ok(run.client_list("d0"))
    ok(run.client_list("d1"))
    # Not in L: in U3 it may go on (SUCCEED), else OutOfTime; nothing kept either way.
    not_listed = "client send signature is not in get update model client list. && client is illegal"
    assert ok(run.push("d2")).reason == not_listed
    stranger = answer(run.push("d4"))
    assert (stranger.retcode, stranger.reason) == (ResponseCode.OutOfTime, not_listed)
    assert stranger.next_req_time_ms > run.now
    wrong = run.feed(PushListSignReceived("x", "d0", 7, b"s", True, run.now))
    assert answer(wrong).retcode is ResponseCode.OutOfTime
    assert answer(wrong).reason == "push list sign iteration number is invalid"
    wrong = run.feed(GetListSignReceived("y", "d0", 7, run.now))
    assert (answer(wrong).retcode, answer(wrong).reason) == (ResponseCode.OutOfTime, "iter num is error.")
    # A signature that does not verify over U3 is refused and changes nothing; a good one then passes.
    before = run.m.snapshot()
    bad = answer(run.push("d0", good=False))
    assert bad.retcode is ResponseCode.RequestError
    assert bad.reason == (
        "verify signature failed: the client list signature does not verify over the update model client list"
    )
    assert run.m.snapshot() == before and run.m.cipher_state().p == ()  # type: ignore[union-attr]
    ok(run.push("d0"))
    repeat = ok(run.push("d0", signature=b"other"))
    assert repeat.reason == "The server has received the request, please do not request again."
    ok(run.client_list("d2"))
    ok(run.push("d2"))
    ok(run.client_list("d1"))
    ok(run.push("d1"))
    state = run.m.cipher_state()
    assert state is not None and state.p_closed
    # P frozen: "enough", SUCCEED in U3, OutOfTime outside; the first signatures stand.
    enough = ok(run.push("d1", signature=b"late"))
    assert enough.reason == "Current amount for PushListSignKernel is enough."
    assert answer(run.push("d5")).retcode is ResponseCode.OutOfTime
    signs = ok(run.get_signs("d0")).signatures
    assert dict((x.fl_id, x.signature) for x in signs)["d0"] == b"sig:d0"
    illegal = answer(run.get_signs("d5"))
    assert (illegal.retcode, illegal.reason) == (
        ResponseCode.OutOfTime,
        "client not send list signature, && client is illegal",
    )
    assert illegal.signatures == ()


def test_a_device_that_drops_before_push_list_sign_is_left_out_at_the_window() -> None:
    """U3 = d0..d3; d3 never pushes: P closes at the window end with Q = 3 and the unmasking goes on."""
    run = Run(signed_config(update_model_ratio=0.6, share_secrets_ratio=0.75))  # u = 4, c = Q = 3
    t = run.m.config.cipher_thresholds
    assert t is not None and (t.get_client_list, t.push_list_sign, t.get_list_sign) == (3, 3, 3)
    through_secrets(run)
    for d in DEVICES[:4]:
        assert isinstance(run.update(d), Accepted)
    for d in DEVICES[:4]:
        ok(run.client_list(d))
    for d in DEVICES[:3]:
        ok(run.push(d))
    state = run.m.cipher_state()
    assert state is not None and not state.p_closed  # P waits for d3
    run.close(WindowKind.PUSH_LIST_SIGN)
    state = run.m.cipher_state()
    assert state is not None and state.p_closed and state.p == ("d0", "d1", "d2")
    assert not any(isinstance(i, IterationFailed) for i in run.instructions)
    late = ok(run.push("d3"))  # too late: it may still go on, but P stays as it is
    assert late.reason == "Current amount for PushListSignKernel is enough."
    unsent = ok(run.get_signs("d3"))
    assert unsent.reason == "client not send list signature, but in update model client list."
    assert [x.fl_id for x in unsent.signatures] == ["d0", "d1", "d2"]
    for d in DEVICES[:3]:
        ok(run.get_signs(d))
    for d in DEVICES[:3]:
        ok(run.reconstruct(d))
    (agg,) = [i for i in run.instructions if isinstance(i, AggregateIteration)]
    assert agg.unmask is not None and agg.unmask.u3 == ("d0", "d1", "d2", "d3")  # d3's update is in the sum


@pytest.mark.parametrize("kind", [WindowKind.PUSH_LIST_SIGN, WindowKind.GET_LIST_SIGN])
def test_a_list_signature_round_below_its_threshold_fails_the_iteration(kind: WindowKind) -> None:
    run = Run(signed_config())
    through_client_list(run)
    pushers = DEVICES[:2] if kind is WindowKind.PUSH_LIST_SIGN else DEVICES[:3]
    for d in pushers:
        ok(run.push(d))
    if kind is WindowKind.GET_LIST_SIGN:
        ok(run.get_signs("d0"))
    run.close(kind)
    (failed,) = [i for i in run.instructions if isinstance(i, IterationFailed)]
    assert (
        failed.reason == f"Round {kind.value} timeout! This iteration is invalid. Proceed to next iteration."
    )
    assert run.it() == 2 and run.m.cipher_state().p == ()  # type: ignore[union-attr]


def test_a_leader_restarted_from_its_store_keeps_the_list_signatures() -> None:
    run = Run(signed_config())
    stored = StoredMachine()
    signed_keys = {
        d: attrs.evolve(keys(d), timestamp="1700000000000", signature=b"k" * 70, certificate_chain=("a", "b"))
        for d in DEVICES
    }
    for d in DEVICES:
        run.start(d)
    for d in DEVICES:
        ok(run.exchange(d, signed_keys[d]))
        stored.commit(run.m)
    for step in (run.get_keys, run.share, run.get_secrets):
        for d in DEVICES:
            ok(step(d))
            stored.commit(run.m)
    relayed = ok(run.get_keys("d0")).keys
    assert relayed[1].signature == b"k" * 70 and relayed[1].certificate_chain == ("a", "b")
    for d in DEVICES[:3]:
        run.update(d)
    for d in DEVICES[:3]:
        ok(run.client_list(d))
        ok(run.push(d))
        stored.commit(run.m)
    ok(run.get_signs("d0"))
    stored.commit(run.m)
    rebuilt = stored.restored()
    assert rebuilt == run.m and rebuilt.cipher_state() == run.m.cipher_state()
    state = rebuilt.cipher_state()
    assert state is not None and state.p_closed and state.g == ("d0",)
    run.m = rebuilt
    assert [x.signature for x in ok(run.get_signs("d1")).signatures] == [
        f"sig:{d}".encode() for d in DEVICES[:3]
    ]
    assert ok(run.get_keys("d0")).keys[2].certificate_chain == ("a", "b")


def test_cipher_records_written_before_the_list_signatures_read_as_they_are() -> None:
    old = [["00" * 32, "11" * 32, "22" * 16, "33" * 16, "44" * 32], True, None, False, False, None]
    record = CipherDevice.from_json_value("d0", old)
    assert record.keys is not None and not record.keys.signed and record.list_signature is None
    assert record.to_json_value() == old  # unchanged text for an unsigned device
    signed = attrs.evolve(
        record,
        keys=attrs.evolve(record.keys, timestamp="12", signature=b"\x01", certificate_chain=("x", "y")),
        got_clients=True,
        list_signature=b"\x02\x03",
        got_signatures=True,
    )
    value = signed.to_json_value()
    assert len(value) == 8 and value[6:] == ["0203", True] and value[0][5:] == ["12", "01", ["x", "y"]]  # type: ignore[index]
    assert CipherDevice.from_json_value("d0", value) == signed
    with pytest.raises(ValueError, match="not the cipher record"):
        CipherDevice.from_json_value("d0", [*old, "zz", True])
    with pytest.raises(ValueError, match="a list of 6 or 8"):
        CipherDevice.from_json_value("d0", [*old, None])
