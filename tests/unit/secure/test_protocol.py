"""PW_ENCRYPT end to end with real keys, masks and shares (spec/secure-aggregation.md §2, §3).

A scenario plays the device steps and the Servers' unmasking with the functions of
``flcluster.secure.protocol``, the Servers' FedAvg sum as float32 folds in arrival order over several
Servers (spec/aggregation.md §3), and checks the unmasked sum against the exact one within the bound of
``flcluster.secure.bound``.
"""

from __future__ import annotations

import random

import attrs
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flcluster.errors import CipherInputError, UnmaskError
from flcluster.secure import protocol as pw
from flcluster.secure.bound import model_error_bound, sum_error_bound
from flcluster.secure.records import ClientShare, PublicKeys
from flcluster.secure.shamir import to_share_bytes
from tests.unit.secure.values import PRIME

F32 = npt.NDArray[np.float32]


@attrs.define
class Scenario:
    """One iteration's cipher state, as the devices and the Servers would hold it."""

    t: int
    ids: list[str]
    u2: list[str]
    u3: list[str]
    secrets: dict[str, pw.ClientSecrets]
    keys: dict[str, PublicKeys]  # as sent at exchangeKeys (with ind_iv): the Servers' view
    peer_view: dict[str, PublicKeys]  # as getKeys returns them (no ind_iv)
    opened: dict[str, dict[str, pw.OpenedShare]]
    submitted: dict[str, list[ClientShare]]


def play(n: int, t: int, m: int, k: int, senders: int, rng: random.Random) -> Scenario:
    ids = [f"f{rng.randrange(10**6):06d}_{i}" for i in range(n)]  # getKeys order is not sorted order
    secrets = {i: pw.new_client_secrets() for i in ids}
    keys = {i: pw.public_keys(secrets[i], i) for i in ids}
    peer_view = {i: attrs.evolve(keys[i], ind_iv=b"") for i in ids}
    u2 = rng.sample(ids, m)  # shareSecrets; the others dropped after getKeys
    uploads = {i: pw.encrypt_shares(secrets[i], i, peer_view, t, PRIME) for i in u2}
    opened = {}
    for v in u2:  # getSecrets: the shares addressed to v, labelled with their sender
        relayed = {u: ClientShare(u, uploads[u][v].share) for u in u2 if u != v}
        opened[v] = pw.open_shares(secrets[v], v, relayed, peer_view)
    u3 = rng.sample(u2, k)  # updateModel accepted; the others dropped after shareSecrets
    submitted = {u: pw.reconstruction_shares(opened[u], u3, t=t) for u in rng.sample(u3, senders)}
    return Scenario(t, ids, u2, u3, secrets, keys, peer_view, opened, submitted)


def fold(vectors: list[F32], servers: int, rng: random.Random) -> F32:
    """The Servers' FedAvg sum: float32 adds in arrival order per Server, then partials in rank order."""
    order = list(range(len(vectors)))
    rng.shuffle(order)
    partials = [np.zeros_like(vectors[0]) for _ in range(servers)]
    for j in order:
        partials[rng.randrange(servers)] += vectors[j]
    total = np.zeros_like(vectors[0])
    for p in partials:
        total += p
    return total


@st.composite
def shapes(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    n = draw(st.integers(3, 20))
    t = draw(st.integers(1, n - 1))
    k = draw(st.integers(t + 1, n))  # |U3| ≥ t + 1, or reconstructSecrets never fills
    m = draw(st.integers(k, n))
    senders = draw(st.integers(t + 1, k))
    return n, t, m, k, senders


@settings(max_examples=12, deadline=None)
@given(shapes(), st.integers(0, 2**32), st.sampled_from([1e-4, 1.0, 300.0]), st.integers(1, 200))
def test_unmasked_sum_equals_the_exact_sum_within_the_bound(
    shape: tuple[int, int, int, int, int], seed: int, scale: float, length: int
) -> None:
    n, t, m, k, senders = shape
    rng = random.Random(seed)
    s = play(n, t, m, k, senders, rng)
    gen = np.random.default_rng(seed)
    sizes = {u: int(gen.integers(1, 65536)) if gen.random() < 0.5 else int(gen.integers(1, 10)) for u in s.u3}
    x = {u: (gen.standard_normal(length) * scale).astype(np.float32) for u in s.u3}
    a = {u: x[u] * np.float32(sizes[u]) for u in s.u3}  # float32, as the device multiplies
    u2_keys = {v: s.peer_view[v] for v in s.u2}
    masked = [pw.mask_update(a[u], s.secrets[u], u, u2_keys) for u in s.u3]
    for u, y in zip(s.u3, masked, strict=True):
        assert y.dtype == np.float32 and y.shape == (length,)
        small = np.abs(a[u]) < 1e3  # larger values keep only their low digits hidden (spec §2.4)
        # the mask is random: an element may round back to its value, rarely (at most ~1 in 10^4)
        assert np.count_nonzero(y[small] == a[u][small]) <= 1 + small.sum() // 10_000

    noise = pw.unmask_noise(s.submitted, s.keys, s.u2, s.u3, t, PRIME, length)
    unmasked = fold(masked, 1 + rng.randrange(4), rng).astype(np.float64) + noise
    exact = np.sum([a[u].astype(np.float64) for u in s.u3], axis=0)
    abs_sum = np.sum([np.abs(a[u]).astype(np.float64) for u in s.u3], axis=0)
    bound = sum_error_bound(abs_sum, k, m)
    assert np.all(np.abs(unmasked - exact) <= bound)

    # the published model against plain FedAvg of the same updates
    total = sum(sizes.values())
    published = (unmasked / total).astype(np.float32)
    plain = (fold([a[u] for u in s.u3], 2, rng).astype(np.float64) / total).astype(np.float32)
    diff = np.abs(published.astype(np.float64) - plain)
    assert np.all(diff <= model_error_bound(abs_sum, np.abs(plain).astype(np.float64), total, k, m))


def test_twenty_devices_three_drop_after_share_secrets_two_after_update_model() -> None:
    rng = random.Random(2017)
    s = play(20, 9, 17, 15, 10, rng)  # t = 9: 10 reconstructSecrets senders fill the round
    assert (len(s.u2), len(s.u3)) == (17, 15)
    gen = np.random.default_rng(1)
    length = 66404  # LeNet5(62)
    sizes = {u: int(gen.integers(1, 65)) for u in s.u3}
    a = {u: (gen.standard_normal(length) * 0.05).astype(np.float32) * np.float32(sizes[u]) for u in s.u3}
    u2_keys = {v: s.peer_view[v] for v in s.u2}
    masked = [pw.mask_update(a[u], s.secrets[u], u, u2_keys) for u in s.u3]
    noise = pw.unmask_noise(s.submitted, s.keys, s.u2, s.u3, s.t, PRIME, length)
    unmasked = fold(masked, 4, rng).astype(np.float64) + noise
    exact = np.sum([a[u].astype(np.float64) for u in s.u3], axis=0)
    abs_sum = np.sum([np.abs(a[u]).astype(np.float64) for u in s.u3], axis=0)
    error = np.abs(unmasked - exact)
    bound = np.asarray(sum_error_bound(abs_sum, 15, 17))
    assert np.all(error <= bound)
    assert error.max() < bound.min()  # the measured error is far below the guarantee
    without = fold(masked, 4, rng).astype(np.float64)  # no unmasking: off by the masks
    assert np.abs(without - exact).max() > 1000 * bound.max()  # a missing or wrong mask would show
    for u, y in zip(s.u3, masked, strict=True):  # no Server holds an update: each value is masked
        assert np.count_nonzero(y == a[u]) <= 1 + y.size // 10_000 and np.std(y - a[u]) > 1


def test_stable_pw_encrypt_masks_cancel_without_noise() -> None:
    ids = ["c", "a", "d", "b"]
    secrets = {i: pw.new_client_secrets() for i in ids}
    peer_view = {i: attrs.evolve(pw.public_keys(secrets[i], i), ind_iv=b"") for i in ids}
    gen = np.random.default_rng(3)
    a = {i: gen.standard_normal(1000).astype(np.float32) for i in ids}
    masked = [pw.mask_update(a[i], secrets[i], i, peer_view, individual=False) for i in ids]
    total = np.sum([y.astype(np.float64) for y in masked], axis=0)
    exact = np.sum([a[i].astype(np.float64) for i in ids], axis=0)
    abs_sum = np.sum([np.abs(a[i]).astype(np.float64) for i in ids], axis=0)
    assert np.all(np.abs(total - exact) <= sum_error_bound(abs_sum, 4, 4))
    assert np.abs(masked[0] - a["c"]).max() > 0.1


# --------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def small() -> Scenario:
    return play(7, 3, 6, 5, 4, random.Random(11))  # one drops after getKeys, one after shareSecrets


def test_each_sender_reveals_b_of_survivors_and_s_of_the_dropped_never_both(small: Scenario) -> None:
    for sender, shares in small.submitted.items():
        held = small.opened[sender]
        assert [sh.fl_id for sh in shares] == list(held)
        for sh in shares:
            expected = held[sh.fl_id].b_share if sh.fl_id in small.u3 else held[sh.fl_id].s_share
            assert (sh.share, sh.index) == (to_share_bytes(expected.value), expected.index)


def test_shamir_indices_follow_the_getkeys_order(small: Scenario) -> None:
    u = small.u2[0]
    order = [v for v in small.ids if v != u]
    for v in small.u2:
        if v != u:
            held = small.opened[v][u]
            assert held.s_share.index == held.b_share.index == order.index(v) + 1


def _limit(submitted: dict[str, list[ClientShare]], owner: str, count: int) -> dict[str, list[ClientShare]]:
    """The submissions with only the first ``count`` shares of ``owner`` kept (other owners untouched)."""
    out: dict[str, list[ClientShare]] = {}
    kept = 0
    for sender, shares in submitted.items():
        out[sender] = []
        for sh in shares:
            if sh.fl_id == owner:
                if kept == count:
                    continue
                kept += 1
            out[sender].append(sh)
    assert kept == count
    return out


def _bump(submitted: dict[str, list[ClientShare]], owner: str) -> dict[str, list[ClientShare]]:
    """The submissions with the first share of ``owner`` changed (a wrong value)."""
    out: dict[str, list[ClientShare]] = {}
    done = False
    for sender, shares in submitted.items():
        out[sender] = []
        for sh in shares:
            if sh.fl_id == owner and not done:
                value = (int.from_bytes(sh.share, "big") + 5) % PRIME
                sh, done = attrs.evolve(sh, share=to_share_bytes(value)), True
            out[sender].append(sh)
    return out


def test_the_small_scenario_unmasks(small: Scenario) -> None:
    noise = pw.unmask_noise(small.submitted, small.keys, small.u2, small.u3, small.t, PRIME, 8)
    assert noise.dtype == np.float64 and noise.shape == (8,)


def test_too_few_shares_of_one_client_fail_the_unmasking(small: Scenario) -> None:
    for owner, what in ((small.u3[0], "b_u"), (next(v for v in small.u2 if v not in small.u3), "s_sk")):
        trimmed = _limit(small.submitted, owner, small.t - 1)
        with pytest.raises(UnmaskError, match=f"{what} of {owner!r}.*needs {small.t} shares"):
            pw.unmask_noise(trimmed, small.keys, small.u2, small.u3, small.t, PRIME, 8)
        enough = _limit(small.submitted, owner, small.t)
        pw.unmask_noise(enough, small.keys, small.u2, small.u3, small.t, PRIME, 8)


def test_disagreeing_shares_fail_the_unmasking(small: Scenario) -> None:
    survivor = next(u for u in small.u3 if u not in small.submitted)  # it holds shares from every sender
    assert sum(sh.fl_id == survivor for shs in small.submitted.values() for sh in shs) > small.t
    with pytest.raises(UnmaskError, match=f"b_u of {survivor!r}.*do not agree"):
        pw.unmask_noise(_bump(small.submitted, survivor), small.keys, small.u2, small.u3, small.t, PRIME, 8)


def test_a_wrong_s_share_is_caught_by_the_public_key(small: Scenario) -> None:
    # With exactly t shares interpolation cannot see a wrong one; the rebuilt key must give s_pk.
    dropped = next(v for v in small.u2 if v not in small.u3)
    bad = _bump(_limit(small.submitted, dropped, small.t), dropped)
    with pytest.raises(UnmaskError, match=f"s_sk .*{dropped!r}.*(does not match its s_pk|does not fit)"):
        pw.unmask_noise(bad, small.keys, small.u2, small.u3, small.t, PRIME, 8)


def test_the_sets_must_nest_and_senders_be_in_u3(small: Scenario) -> None:
    dropped = next(v for v in small.u2 if v not in small.u3)
    with pytest.raises(UnmaskError, match="do not nest"):
        pw.unmask_noise(small.submitted, small.keys, small.u2, [*small.u3, "stranger"], small.t, PRIME, 8)
    with pytest.raises(UnmaskError, match="not in U3"):
        pw.unmask_noise({**small.submitted, dropped: []}, small.keys, small.u2, small.u3, small.t, PRIME, 8)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda shs, me, u2: [*shs, ClientShare(me, b"\x01", 1)], "its own secret"),
        (lambda shs, me, u2: [*shs, ClientShare("stranger", b"\x01", 1)], "did not share secrets"),
        (lambda shs, me, u2: [*shs, shs[0]], "two shares of"),
        (lambda shs, me, u2: [attrs.evolve(shs[0], index=0), *shs[1:]], "outside"),
        (lambda shs, me, u2: [attrs.evolve(shs[0], share=PRIME.to_bytes(33, "big")), *shs[1:]], "below the"),
        (lambda shs, me, u2: [attrs.evolve(shs[0], share=bytes(34)), *shs[1:]], "at most 33 bytes"),
    ],
)
def test_malformed_reconstruction_requests_are_refused(small: Scenario, mutate: object, match: str) -> None:
    sender, shares = next(iter(small.submitted.items()))
    bad = mutate(shares, sender, small.u2)  # type: ignore[operator]
    with pytest.raises(CipherInputError, match=match):
        pw.check_reconstruction_shares(sender, bad, small.u2, PRIME)
    pw.check_reconstruction_shares(sender, shares, small.u2, PRIME)  # the real one passes


def test_a_client_refuses_a_client_list_shorter_than_t_plus_one(small: Scenario) -> None:
    u = small.u3[0]
    with pytest.raises(CipherInputError, match="at least 4"):
        pw.reconstruction_shares(small.opened[u], small.u3[:3], t=3)


def test_open_shares_refuses_bad_relays(small: Scenario) -> None:
    v, u = small.u2[0], small.u2[1]
    me = small.secrets[v]
    good = pw.encrypt_shares(small.secrets[u], u, small.peer_view, small.t, PRIME)[v]
    relayed = ClientShare(u, good.share)
    assert set(pw.open_shares(me, v, {u: relayed}, small.peer_view)) == {u}
    with pytest.raises(CipherInputError, match="says it is from"):
        pw.open_shares(me, v, {u: ClientShare(small.u2[2], good.share)}, small.peer_view)
    with pytest.raises(CipherInputError, match="this client itself"):
        pw.open_shares(me, v, {v: ClientShare(v, good.share)}, small.peer_view)
    with pytest.raises(CipherInputError, match="not in the getKeys list"):
        pw.open_shares(me, v, {"stranger": ClientShare("stranger", good.share)}, small.peer_view)
    altered = ClientShare(u, good.share[:-1] + bytes([good.share[-1] ^ 0x40]))
    with pytest.raises(CipherInputError):
        pw.open_shares(me, v, {u: altered}, small.peer_view)


def test_encrypt_shares_refuses_a_threshold_above_the_peers(small: Scenario) -> None:
    u = small.ids[0]
    with pytest.raises(CipherInputError, match="t=7"):
        pw.encrypt_shares(small.secrets[u], u, small.peer_view, 7, PRIME)
    with pytest.raises(CipherInputError, match="are those of"):
        pw.encrypt_shares(small.secrets[u], u, {"x": small.peer_view[small.ids[1]]}, 1, PRIME)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("c_pk", bytes(31), "c_pk must be 32 bytes"),
        ("s_pk", b"", "s_pk must be 32 bytes"),
        ("ind_iv", bytes(8), r"ind_iv must be 16 \(or 0\) bytes"),
        ("pw_iv", bytes(17), "pw_iv must be 16 bytes"),
        ("pw_salt", bytes(16), "pw_salt must be 32 bytes"),
        ("fl_id", "", "fl_id must be a non-empty string"),
        ("c_pk", "not bytes", "c_pk must be bytes"),
    ],
)
def test_public_keys_of_the_wrong_size_are_refused(
    small: Scenario, field: str, value: object, match: str
) -> None:
    with pytest.raises(CipherInputError, match=match):
        attrs.evolve(small.keys[small.ids[0]], **{field: value})  # type: ignore[arg-type]


def test_secrets_never_show_in_a_repr(small: Scenario) -> None:
    me = small.secrets[small.ids[0]]
    text = repr(me) + repr(small.opened[small.u2[0]])
    for secret in (me.c_sk, me.s_sk, me.b_u):
        assert secret.hex() not in text and repr(secret) not in text
