"""The masks: the original's sign, salt and IV rules (spec/secure-aggregation.md §2.1)."""

from __future__ import annotations

import numpy as np
import pytest

from flcluster.errors import CipherInputError
from flcluster.secure import keys, masks
from flcluster.secure.prg import prg
from flcluster.secure.protocol import new_client_secrets, public_keys
from flcluster.secure.records import ClientSecrets, PublicKeys


def _client(fl_id: str) -> tuple[ClientSecrets, PublicKeys]:
    me = new_client_secrets()
    return me, public_keys(me, fl_id)


def test_sign_rule() -> None:
    assert masks.pairwise_sign("b", "a") == 1
    assert masks.pairwise_sign("a", "b") == -1
    assert masks.pairwise_sign("f_10", "f_9") == -1  # string order, not numeric
    assert masks.pairwise_sign("é", "z") == 1  # code points


def test_the_smaller_fl_id_gives_iv_and_salt_and_both_sides_cancel_exactly() -> None:
    (su, u), (sv, v) = _client("alpha"), _client("beta")
    assert masks.pair_iv_salt(u, v) == masks.pair_iv_salt(v, u) == (u.pw_iv, u.pw_salt)
    m_uv = masks.pairwise_mask(su.s_sk, u, v, 257)
    m_vu = masks.pairwise_mask(sv.s_sk, v, u, 257)
    assert np.array_equal(m_uv, -m_vu)  # bit-exact: same key, same IV, opposite sign
    key = keys.agree(sv.s_sk, u.s_pk, u.pw_salt)
    assert np.array_equal(m_vu, prg(key, u.pw_iv, 257))  # "beta" > "alpha": +
    assert np.abs(m_uv).max() > 0.5


def test_total_mask_is_pairwise_plus_individual_and_skips_itself() -> None:
    (su, u), (_, v), (_, w) = _client("u"), _client("v"), _client("w")
    total = masks.total_mask(su.s_sk, su.b_u, u, [u, v, w], 64)
    expected = (
        masks.pairwise_mask(su.s_sk, u, v, 64).astype(np.float64)
        + masks.pairwise_mask(su.s_sk, u, w, 64)
        + prg(su.b_u, su.ind_iv, 64)
    )
    assert total.dtype == np.float64 and np.array_equal(total, expected)
    stable = masks.total_mask(su.s_sk, None, u, [v, w], 64)  # STABLE_PW_ENCRYPT
    assert np.array_equal(stable, expected - prg(su.b_u, su.ind_iv, 64))


def test_no_mask_with_itself_and_a_bad_peer_key_is_refused() -> None:
    su, u = _client("u")
    with pytest.raises(ValueError, match="itself"):
        masks.pairwise_mask(su.s_sk, u, u, 4)
    bad = PublicKeys("v", u.c_pk, bytes(32), b"", u.pw_iv, u.pw_salt)
    with pytest.raises(CipherInputError, match="no shared secret"):
        masks.pairwise_mask(su.s_sk, u, bad, 4)
