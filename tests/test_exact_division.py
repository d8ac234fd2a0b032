"""The float64 floor divisions of exact mode against Python's integer floor division."""

import pytest
import torch

from mode.exact import _RECIPROCAL_MAX, _plan


def _dividends(k: int, top: int) -> torch.Tensor:
    """Multiples of ``k`` and their neighbours near zero and near ``+-top``: where a rounded
    reciprocal would floor wrongly first."""
    g = torch.Generator().manual_seed(k)
    base = [0, 1, k - 1, k, k + 1, top - 1, -(top - 1)]
    edge = top // k
    for K in (edge, edge - 1, -edge, -edge + 1, 12345, -777):
        base += [K * k - 1, K * k, K * k + 1, K * k + k - 1]
    rand = torch.randint(-top + 1, top, (20000,), generator=g, dtype=torch.int64)
    t = torch.tensor([v for v in base if abs(v) < top], dtype=torch.int64)
    return torch.cat([t, rand, rand - rand % k, rand - rand % k - 1])


@pytest.mark.parametrize("n,d", [(9, 10), (99, 100), (5, 7), (3, 1000), (7261, 58814), (2, 3)])
def test_floor_division_by_reciprocal_is_exact_below_its_bound(n, d):
    plan = _plan(n, d)
    for k, divide in ((d, plan._floor_div_d), (n, plan._floor_div_n)):
        if k & (k - 1) == 0:
            continue
        top = _RECIPROCAL_MAX if plan.fast else 2**52
        t = _dividends(k, top)
        got = divide(t.to(torch.float64))
        want = torch.div(t, k, rounding_mode="floor")  # integer arithmetic: the truth
        assert torch.equal(got.to(torch.int64), want), (k, plan.form, plan.fast)


def test_the_reciprocal_is_used_where_the_bound_holds():
    assert _plan(9, 10).fast  # gamma = 0.9: dividends c - q below 2^47
    assert _plan(7261, 58814).fast  # the split form divides small numbers only
    assert not _plan(63, 127).fast  # form m with m = 64: dividends up to 2^52


@pytest.mark.parametrize("gamma", [0.9, 5 / 7, 0.99, 3 / 1000, 7261 / 58814, 0.5, -0.9, -0.37])
def test_scale_and_unscale_in_their_input_storage_equal_the_fresh_results(gamma):
    """``overwrite=True`` (the engine's own states) computes in the input's storage and the
    temporaries' (forms m, n and split, both signs): the same integers, the same digits."""
    from mode.exact import InformationBuffer, rational

    sign, n, d = rational(gamma)
    g = torch.Generator().manual_seed(n)
    q0 = torch.randint(-(2**45), 2**45, (5000,), generator=g, dtype=torch.int64)
    q0 = q0.to(torch.float64)
    fresh, reuse = InformationBuffer(q0.shape), InformationBuffer(q0.shape)
    q_fresh, q_reuse = q0.clone(), q0.clone()
    for _ in range(3):
        q_fresh = fresh.scale(q_fresh, sign, n, d)
        q_reuse = reuse.scale(q_reuse, sign, n, d, overwrite=True)
        assert torch.equal(q_reuse, q_fresh)
    assert torch.equal(reuse.word, fresh.word)
    want = [int(v) for v in q0.tolist()]
    for _ in range(3):
        want = [sign * ((v * n + d // 2) // d) for v in want]
    assert q_fresh.tolist() == want
    back_fresh, back_reuse = fresh.reader(), reuse.reader()
    for _ in range(3):
        q_fresh = back_fresh.unscale(q_fresh, sign, n, d)
        q_reuse = back_reuse.unscale(q_reuse, sign, n, d, overwrite=True)
        assert torch.equal(q_reuse, q_fresh)
    assert torch.equal(q_reuse, q0)
