"""Timestep schedules pinned to method.md §4."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffutext.samplers import ADS_SHARES, adaptive_decay, every_kth, full, uniform

ADS_ROWS = {
    4: [0, 667, 1334, 1999],
    5: [0, 667, 1000, 1334, 1999],
    10: [0, 667, 833, 1000, 1167, 1334, 1500, 1666, 1833, 1999],
    20: [0, 333, 667, 762, 857, 952, 1048, 1143, 1238, 1334, 1400, 1467, 1534, 1600, 1666, 1733, 1800, 1866, 1932, 1999],
}


@pytest.mark.parametrize("n", sorted(ADS_ROWS))
def test_ads_rows_match_the_paper(n):
    assert adaptive_decay(2000, n).flip(0).tolist() == ADS_ROWS[n]


def test_ads_shares_are_the_reference_constants_and_shape_the_pinned_rows():
    """The shares sum to 1, and each pinned row spends round(share · n) of its steps in each third of [0, T)."""
    assert sum(ADS_SHARES) == pytest.approx(1.0, abs=1e-12)
    for n, row in ADS_ROWS.items():
        thirds = [sum(lo <= t < hi for t in row) for lo, hi in ((0, 667), (667, 1334), (1334, 2000))]
        if n >= 10:  # short rows put at least one step in each third before sharing the rest
            assert thirds == [round(p * n) for p in ADS_SHARES], (n, thirds)


def test_ads_shares_can_be_overridden():
    even = adaptive_decay(2000, 9, shares=(1 / 3, 1 / 3, 1 / 3)).flip(0).tolist()
    assert even == [0, 222, 444, 667, 889, 1111, 1334, 1666, 1999]
    assert even != adaptive_decay(2000, 9).flip(0).tolist()


def test_ads_puts_most_steps_at_high_noise():
    ts = adaptive_decay(2000, 20)
    assert (ts >= 1334).sum() > (ts >= 667).sum() - (ts >= 1334).sum() > (ts < 667).sum()


def test_uniform_row_matches_the_paper():
    row = uniform(2000, 20).flip(0).tolist()
    assert row[:3] == [0, 105, 210] and row[-2:] == [1894, 1999] and len(row) == 20


def test_skip_is_diffuseq_shortcut():
    assert every_kth(2000, 20).tolist() == list(range(1999, 0, -100))
    assert every_kth(2000, 2000).tolist() == list(range(1999, -1, -1))


def test_full_visits_every_timestep():
    assert full(2000).tolist() == list(range(1999, -1, -1))


@pytest.mark.parametrize("bad", [(2000, 1), (10, 11)])
def test_uniform_rejects_impossible_counts(bad):
    with pytest.raises(ValueError):
        uniform(*bad)


def test_ads_rejects_too_few_steps():
    with pytest.raises(ValueError, match="more steps"):
        adaptive_decay(2000, 2)


@settings(deadline=None, max_examples=100)
@given(T=st.integers(2, 4000), n=st.integers(1, 60))
def test_schedules_are_strictly_descending_from_T_minus_1_to_0_or_refuse(T, n):
    for sched in (uniform, adaptive_decay):
        try:
            ts = sched(T, n).tolist()
        except ValueError:
            assert n < 4 or T < 4 * n  # only impossible requests are refused
            continue
        assert len(ts) == n
        assert ts[0] == T - 1 and ts[-1] == 0
        assert all(a > b for a, b in zip(ts, ts[1:]))
