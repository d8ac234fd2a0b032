"""mode.fused: the compiled exact coupling gives the eager arithmetic's bits.

The eager arithmetic of mode.exact (itself tested against integer ground truth in
test_exact_division.py) is the reference: the fused functions, run eagerly for many multipliers
(every form and division of mode.exact._Plan) and compiled by inductor for two, must give the
same states and the same buffer words, and an exact network whose states are large enough to
run fused must give the gradients and the reconstruction of the eager path, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import mode
from mode import fused
from mode.exact import FixedPoint, InformationBuffer, _plan, rational

# (sign, n, d) covering every path of the plan: form m with a rounded reciprocal (9/10), with
# a power-of-two divisor (3/4), with a division (50/61); form n with a reciprocal (2/5, whose
# fibre position is a division since d >= 2n) and with a division (9/31); a negative sign
MULTIPLIERS = [(1, 9, 10), (1, 3, 4), (1, 50, 61), (1, 2, 5), (1, 9, 31), (-1, 7, 8)]
FRAC = 32


def _forms():
    seen = {(_plan(n, d).form, _plan(n, d).fast, n & (n - 1) == 0 or d & (d - 1) == 0)
            for _, n, d in MULTIPLIERS}
    return seen


def test_multipliers_cover_every_form_and_division():
    forms = _forms()
    assert {f for f, _, _ in forms} == {"m", "n"}
    assert {fast for _, fast, _ in forms} == {True, False}


def _case(seed: int, shape=(4, 3, 5, 7)):
    """Fixed-point states near the range limit and small ones, a residual, buffer words."""
    g = torch.Generator().manual_seed(seed)
    fp = FixedPoint(FRAC)
    limit = fp.limit
    q = torch.randint(-limit // 4, limit // 4, shape, generator=g, dtype=torch.int64)
    q.view(-1)[:8] = torch.tensor([0, 1, -1, 2, -2, 5, -5, limit // 4 - 1])
    other = torch.randint(-2**40, 2**40, shape, generator=g, dtype=torch.int64).double()
    p = torch.randn(shape, generator=g) * 3
    buf = InformationBuffer(torch.Size(shape))
    # open words of every size up to 2^51: the first pushes spill the largest to a level
    buf.word = torch.randint(1, 2**51, shape, generator=g, dtype=torch.int64).double()
    buf._bound = int(buf.word.max())
    return fp, q.double(), other, p, buf


def _eager_forward(fp, q, buf, mult, p, other, shift):
    new = buf.scale(q.clone(), *mult)
    if shift:
        new.add_(other, alpha=shift)
    return new.add_(fp.quantize(p).to(torch.float64))


def _copy(buf: InformationBuffer) -> InformationBuffer:
    meta, tensors = buf.state()
    other = InformationBuffer.cursor(meta, [t.clone() for t in tensors])
    other._owned = True
    return other


@pytest.mark.parametrize("mult", MULTIPLIERS)
@pytest.mark.parametrize("shift", [0, 3])
def test_functions_equal_eager_arithmetic(mult, shift):
    """The fused formulas (not compiled) against the in-place eager arithmetic: the new state,
    the new words, then the undo back to the original state and words."""
    fp, q, other, p, buf = _case(sum(mult) + shift)
    reference = _copy(buf)
    expected = _eager_forward(fp, q, reference, mult, p, other, shift)
    plan = _plan(mult[1], mult[2])
    m = plan.m if plan.form == "m" else 0
    got, max_base = q.clone(), -(-mult[2] // mult[1])
    buf.prepare_push(max_base)  # the bookkeeping of scale_push_add, around the bare function
    fused._forward(got, buf.word, p, other, *mult, m, plan.fast, shift, fp.scale)
    buf.pushed(max_base)
    assert torch.equal(got, expected)
    assert torch.equal(buf.word, reference.word) and len(buf.levels) == len(reference.levels)
    buf.prepare_pop()
    fused._backward(got, buf.word, p, other, *mult, m, plan.fast, shift, fp.scale)
    buf.popped()
    assert torch.equal(got, q)
    assert torch.equal(buf.word, _case(sum(mult) + shift)[4].word)


@pytest.mark.parametrize("mult,shift", [((1, 9, 10), 0), ((-1, 9, 31), 2)])
def test_compiled_equals_eager(mult, shift, monkeypatch):
    """Compiled by inductor (one rounded-reciprocal form, one division form with a sign and a
    shift): the same bits as the eager arithmetic, forward and undo, through the buffer's
    bookkeeping (pushes counted, spilled full words restored)."""
    monkeypatch.setattr(fused, "MIN_NUMEL", 1)
    fp, q, other, p, buf = _case(7)
    reference, initial = _copy(buf), buf.word.clone()
    states, got = [q], q.clone()
    for _ in range(12):  # enough pushes to spill full words to a level
        p = p.roll(1, 0)
        expected = _eager_forward(fp, states[-1], reference, mult, p, other, shift)
        assert fused.usable(got, mult, torch.float64)
        bounds = fused.scale_push_add(got, buf, mult, p, other if shift else None, shift,
                                      fp.scale)
        assert bounds is not None and torch.equal(got, expected)
        assert torch.equal(torch.stack(bounds), torch.stack(torch.aminmax(expected)))
        assert torch.equal(buf.word, reference.word) and buf.pushes == reference.pushes
        states.append(expected)
    assert buf.levels, "no word was spilled: the test does not reach the levels"
    for step in range(12):
        assert fused.subtract_unscale_pop(got, buf, mult, p, other if shift else None, shift,
                                          fp.scale)
        p = p.roll(-1, 0)
        assert torch.equal(got, states[-2 - step])
    assert buf.pushes == 0 and not buf.levels and torch.equal(buf.word, initial)


def _exact_net(width: int, depth: int):
    torch.manual_seed(0)
    return mode.MomentumResNet(
        [torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh())
         for _ in range(depth)], gamma=0.9, exact=True)


def _step(net, x):
    net.zero_grad()
    y = net(x)
    (y.square().sum()).backward()
    return y.detach(), [p.grad.clone() for p in net.parameters()]


def test_network_fused_equals_eager(monkeypatch):
    """An exact Momentum network run fused (the threshold lowered) gives the eager path's
    output and gradients bit for bit, and its inverse returns the input bit for bit."""
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    x = torch.round(x * 2**20) / 2**20  # on the fixed-point grid: encoded without rounding
    monkeypatch.setattr(fused, "ENABLED", False)
    y0, g0 = _step(_exact_net(48, 6), x)
    monkeypatch.setattr(fused, "ENABLED", True)
    monkeypatch.setattr(fused, "MIN_NUMEL", 1)
    calls, words = [], []
    run = fused._run
    monkeypatch.setattr(fused, "_run", lambda *a: calls.append(a[0]) or
                        words.append(a[3].dtype) or run(*a))
    net = _exact_net(48, 6)
    y1, g1 = _step(net, x)
    assert calls.count(fused._forward) == 6 and calls.count(fused._backward) == 6
    # the backward pops the compactly stored words in their own format (one byte per scalar)
    assert words[6:] == [torch.uint8] * 6
    assert torch.equal(y0, y1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    with torch.no_grad():
        out = net(x, return_velocity=True)
        x0, v0 = net.inverse(*out)
        x1, _ = net.inverse(*out)  # the first inversion popped a copy: the record is intact
    assert torch.equal(x0, x) and not v0.any() and torch.equal(x1, x)
    assert calls.count(fused._backward) == 18  # the inversions ran fused too


def test_compile_failure_falls_back_to_eager(monkeypatch):
    """Where the kernel cannot be compiled, a warning says so once and the eager arithmetic
    gives the same bits."""
    monkeypatch.setattr(fused, "MIN_NUMEL", 1)
    monkeypatch.setattr(fused, "_failed", [])

    def broken(fn, key):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(fused, "_kernel", broken)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    with pytest.warns(RuntimeWarning, match="could not be compiled"):
        y1, g1 = _step(_exact_net(8, 3), x)
    assert fused._failed and not fused.usable(x, rational(0.9), torch.float64)
    monkeypatch.setattr(fused, "ENABLED", False)
    y0, g0 = _step(_exact_net(8, 3), x)
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


@pytest.mark.parametrize("storage", [torch.float64, torch.int64])
def test_compiled_checksum_equals_eager(storage, monkeypatch):
    """The compiled checksum gives the eager wrapping int64 sums (the squares of states near
    2^46 or 2^60 overflow int64: both wrap alike), and it detects a change of one unit."""
    from mode.reversible import _checksum

    monkeypatch.setattr(fused, "MIN_NUMEL", 1)
    bits = 46 if storage == torch.float64 else 60
    g = torch.Generator().manual_seed(4)
    q = [torch.randint(-2**bits + 1, 2**bits, (6, 7, 9), generator=g).to(storage)
         for _ in range(2)]
    assert fused.checksum(q[0]) is not None  # the compiled path ran
    fast = _checksum(q)
    monkeypatch.setattr(fused, "ENABLED", False)
    assert fast == _checksum(q)
    monkeypatch.setattr(fused, "ENABLED", True)
    q[1].view(-1)[17] += 1
    assert _checksum(q) != fast
