"""The gamma/eps convention and the exact arithmetic, against closed forms and brute force."""

import math
from fractions import Fraction

import pytest
import torch

import mode
from mode import reversible
from mode.exact import (
    INT64_STATE_BITS,
    SPILL_MARGIN_BITS,
    STATE_BITS,
    FixedPoint,
    FixedPointOverflow,
    InformationBuffer,
    rational,
    shift_limit,
)
from mode.reversible import information_buffer
from mode.steps import Coupling, MomentumStep, ReversibleStep

# The two formats that hold fixed-point integers: float64 (float32 models) and int64 (float64).
STORAGES = [torch.float64, torch.int64]


@pytest.mark.parametrize("depth,horizon", [(1, 1.0), (10, 1.0), (64, 3.0)])
def test_gamma_eps_round_trip(depth, horizon):
    for gamma in (0.0, 0.1, 0.5, 0.9, 0.999):
        eps = mode.gamma_to_eps(gamma, depth, horizon)
        assert eps == pytest.approx(horizon / (depth * (1 - gamma)), rel=1e-15)
        assert mode.eps_to_gamma(eps, depth, horizon) == pytest.approx(gamma, abs=1e-14)
    assert mode.gamma_to_eps(1.0, depth) == math.inf
    assert mode.eps_to_gamma(math.inf, depth) == 1.0


def test_conventions_are_differentiable():
    eps = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    gamma = mode.eps_to_gamma(eps, 10)  # 1 - 0.1 / eps
    (g,) = torch.autograd.grad(gamma, eps)
    assert g.item() == pytest.approx(0.1 / 0.25)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("gamma", [0.1, 0.5, 0.9, 0.99, 0.37, 1 / 3, 0.7071, 0.999, 0.25, 3 / 4])
def test_scale_is_floor_and_unscale_inverts_it(gamma, storage):
    sign, n, d = rational(gamma)
    assert abs(n / d - gamma) < 1 / (d * 2**16) + 1e-15
    q = torch.arange(-4000, 4000).to(storage)
    buf = InformationBuffer(q.shape)
    out = buf.scale(q, sign, n, d)
    assert out.dtype == storage
    assert out.tolist() == [(int(v) * n + d // 2) // d for v in q]  # nearest, by floor division
    assert torch.equal(buf.reader().unscale(out, sign, n, d), q)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("gamma", [0.1, 0.5, 0.9, 0.99])
def test_buffer_round_trip_through_many_layers_and_spills(gamma, storage):
    g = torch.Generator().manual_seed(0)
    sign, n, d = rational(gamma)
    top = 45 if storage == torch.float64 else 59
    q0 = torch.randint(-(2**top), 2**top, (300,), generator=g).to(storage)
    shifts = [torch.randint(-(2**(top - 5)), 2**(top - 5), (300,), generator=g).to(storage)
              for _ in range(1500)]
    buf, q = InformationBuffer(q0.shape), q0.clone()
    for s in shifts:
        q = buf.scale(q, sign, n, d) + s
    reader = buf.reader()
    for s in reversed(shifts):
        q = reader.unscale(q - s, sign, n, d)
    assert torch.equal(q, q0)
    assert reader.pushes == 0 and not reader.levels and bool((reader.word == 1).all())
    # a second reader sees the same digits: reading does not consume the buffer
    assert torch.equal(buf.reader().word, buf.word)
    # The information kept is what floor forgets: the mean of log2(fibre size), computed here
    # by brute force.
    image = [(v * n + d // 2) // d for v in range(-50 * d, 50 * d)]
    count = {}
    for w in image:
        count[w] = count.get(w, 0) + 1
    whole = [w for w in image if min(image) < w < max(image)]  # fibres not cut by the range
    entropy = sum(math.log2(count[w]) for w in whole) / len(whole)
    per_layer = buf.bits / (300 * 1500)
    assert 0.9 * entropy <= per_layer <= 1.1 * entropy
    # Its memory: stored words hold at least 52 - SPILL_MARGIN_BITS - log2(max base) bits and
    # cost 8 bytes plus a 4-byte index; the open words 8 bytes each.
    fill = 52 - SPILL_MARGIN_BITS - math.log2(-(-d // n))
    stored = buf.nbytes - 8 * 300
    assert stored <= 12 * buf.bits / fill + 12 * 300
    assert buf.nbytes / (300 * 1500) < 32 / 8 / 4  # far below storing a float32 activation


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("gamma", [5 / 7, 0.9, 0.99, 7261 / 58814, 0.001, 3 / 40000, 0.5, 3 / 4])
def test_scale_is_exact_at_the_edge_of_the_state_range(gamma, storage):
    """Near |q| = 2^46 in float64 storage (its forms for n <= 64 and for larger n) and near
    2^60 in int64 storage (the direct product for n <= 4, the split otherwise)."""
    sign, n, d = rational(gamma)
    edge = 2 ** (STATE_BITS if storage == torch.float64 else INT64_STATE_BITS) - 1
    q = torch.tensor([edge, -edge, edge - 12345, -(edge - 777), 2**40 + 3, -(2**33) - 1])
    q = q.to(storage)
    buf = InformationBuffer(q.shape)
    out = buf.scale(q, sign, n, d)
    assert out.tolist() == [(int(v) * n + d // 2) // d for v in q.tolist()]
    assert torch.equal(buf.reader().unscale(out, sign, n, d), q)


def test_rational_and_fixed_point_errors():
    assert rational(0.9) == (1, 9, 10)
    assert rational(-1.0) == (-1, 1, 1)
    assert Fraction(*rational(0.99)[1:]) == Fraction(99, 100)
    with pytest.raises(ValueError):
        rational(0.0)
    with pytest.raises(ValueError):
        rational(1.5)
    fp = FixedPoint(32)
    with pytest.raises(ValueError, match="NaN"):
        fp.encode(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="range"):
        fp.encode(torch.tensor([1e9]))
    with pytest.raises(ValueError):
        FixedPoint(2)
    x = torch.randn(100, dtype=torch.float64)
    assert (fp.decode(fp.encode(x), torch.float64) - x).abs().max() <= 2.0**-33


def test_int64_fixed_point_reaches_float64_resolution():
    """int64 storage: 56 fractional bits are allowed (float64 storage stops at 52), encode and
    decode are exact for float64 values on the grid, and NaN / infinity / huge terms added by
    quantize make the state fail its range check instead of wrapping."""
    with pytest.raises(ValueError, match="int64 storage"):
        FixedPoint(54)
    fp = FixedPoint(48, torch.int64)
    assert fp.max_abs == 2.0 ** (INT64_STATE_BITS - 48)
    x = torch.randn(1000, dtype=torch.float64) * 100
    q = fp.encode(x)
    assert q.dtype == torch.int64
    assert (fp.decode(q, torch.float64) - x).abs().max() <= 2.0**-49
    assert torch.equal(fp.decode(q, torch.float64) * 2.0**48, torch.round(x * 2.0**48))
    for bad in (float("nan"), float("inf"), -float("inf"), 1e300):
        with pytest.raises(FixedPointOverflow):
            fp.check(q[:1] + fp.quantize(torch.tensor([bad], dtype=torch.float64)))
    with pytest.raises(ValueError, match="NaN"):
        fp.encode(torch.tensor([float("nan")], dtype=torch.float64))
    with pytest.raises(FixedPointOverflow):
        fp.encode(torch.tensor([5000.0], dtype=torch.float64))


@pytest.mark.parametrize("bits", [1, 3, 10])
def test_round_shift_is_round_half_even_in_both_storages(bits):
    """round(q shift 2^-bits) as torch.round computes it in float64 (ties to even), ties
    included, for int64 storage too."""
    q = torch.arange(-5000, 5000, dtype=torch.int64)
    for shift in (1, -1, 3):
        want = torch.round(q.to(torch.float64) * shift * 2.0**-bits)
        got_int = FixedPoint(40, torch.int64).round_shift(q, shift, bits)
        got_float = FixedPoint(40).round_shift(q.to(torch.float64), shift, bits)
        assert torch.equal(got_int.to(torch.float64), want)
        assert torch.equal(got_float, want)


class _Shift(ReversibleStep):
    """``s0 <- s0 + shift s1 + phi(s1)``: one coupling whose shift crosses the two slots'
    grids (frac_bits far apart)."""

    def __init__(self, shift=1, phi=None):
        super().__init__()
        self.shift, self.phi = shift, phi

    def couplings(self):
        return (Coupling(target=0, shift=self.shift, phi=self.phi),)


def _exact_output(step, x, v, frac_bits):
    """The output pair of one exact step, in fixed point."""
    out = reversible.integrate([step], (x, v), exact=True, frac_bits=frac_bits)
    return information_buffer(*out).final


def test_shift_limits_in_closed_form():
    """int64: a shift term below 2^61 (a rounded shift's product below 2^62); float64: below
    2^52; None where every state of the source slot qualifies."""
    i56, i8 = FixedPoint(56, torch.int64), FixedPoint(8, torch.int64)
    f52, f8 = FixedPoint(52), FixedPoint(8)
    assert shift_limit(i56, i8, 2**48) == 2**13
    assert shift_limit(i8, i8, 1) is None and shift_limit(i8, i8, 2) is None
    assert shift_limit(i8, i8, 4) == 2**59  # 4 * 2^60 could exceed 2^61
    assert shift_limit(i8, i56, 16, bits=48) == 2**58
    assert shift_limit(i8, i56, 4, bits=48) is None
    assert shift_limit(f52, f8, 2**44) == 2**8
    assert shift_limit(f8, f8, 64) is None and shift_limit(f8, f8, 65) == 2**52 // 65
    assert shift_limit(f8, f52, 1, bits=44) is None


def test_int64_shift_that_would_wrap_is_refused():
    """float64 model, frac_bits=(56, 8): x <- x + v multiplies q_v by 2^48, and v = 256 makes
    that 2^64, which wraps to 0 and leaves x in range: refused, naming frac_bits."""
    x = torch.full((3,), 0.25, dtype=torch.float64)
    v = torch.full((3,), 256.0, dtype=torch.float64)
    step = MomentumStep(lambda z: torch.zeros_like(z), 0.5)  # v <- v / 2; x <- x + v
    with pytest.raises(FixedPointOverflow, match=r"2\^48.*frac_bits=56 for s0, 8 for s1"):
        _exact_output(step, x, 2 * v, (56, 8))
    with pytest.raises(FixedPointOverflow, match="frac_bits"):  # a rounded shift (k < 0)
        _exact_output(_Shift(shift=16), x, torch.full((3,), 15.0, dtype=torch.float64),
                      (8, 56))
    # within the limit the same steps are exact: x + v on the grid of x
    q = _exact_output(step, x, torch.full((3,), 4.0, dtype=torch.float64), (56, 8))
    assert torch.equal(q[0], torch.full((3,), int(2.25 * 2**56), dtype=torch.int64))


def test_int64_wrap_is_real_without_the_guard(monkeypatch):
    """The premise of the test above: with the guard off, the wrapped sum lands in range and
    the forward returns x unchanged, silently (x + 256 is far outside |x| < 16)."""
    monkeypatch.setattr(reversible, "_guard_shift", lambda *a: None)
    x = torch.full((3,), 0.25, dtype=torch.float64)
    step = MomentumStep(lambda z: torch.zeros_like(z), 0.5)
    q = _exact_output(step, x, torch.full((3,), 512.0, dtype=torch.float64), (56, 8))
    assert torch.equal(q[0], torch.full((3,), 2**54, dtype=torch.int64))  # 0.25: unchanged


def test_float64_storage_shift_that_would_round_is_refused(monkeypatch):
    """float64 storage cannot wrap, but above 2^53 it rounds, and a phi that cancels the
    shift brings a rounded sum back into range: s0 <- s0 + 2^44 q_v - Q(v) is s0 itself in
    exact arithmetic, but 2^44 q_v = 2^82 for v = 2^30 rounds q_x away (float64 ulp 2^30 there).
    Refused (naming frac_bits); with the guard off the state is wrong."""
    x = torch.tensor([1e-3, -3e-3, 7e-3], dtype=torch.float32)
    v = torch.full((3,), 2.0**30, dtype=torch.float32)
    step = _Shift(shift=1, phi=lambda z: -z)
    with pytest.raises(FixedPointOverflow, match="frac_bits=52 for s0, 8 for s1"):
        _exact_output(step, x, v, (52, 8))
    assert torch.equal(_exact_output(step, x, v / 2**30, (52, 8))[0], FixedPoint(52).encode(x))
    monkeypatch.setattr(reversible, "_guard_shift", lambda *a: None)
    assert not torch.equal(_exact_output(step, x, v, (52, 8))[0], FixedPoint(52).encode(x))


def test_unequal_frac_bits_within_range_round_trip():
    """An ordinary pair of frac_bits passes the guard: bit-exact inversion, float32 model."""
    torch.manual_seed(0)
    net = mode.MomentumResNet([torch.nn.Linear(4, 4) for _ in range(6)], 0.9, exact=True,
                              frac_bits=(40, 32))
    x = torch.randn(5, 4)
    with torch.no_grad():
        out = net(x, return_velocity=True)
        back = net.inverse(*out)
    assert torch.equal(FixedPoint(40).encode(back[0]), FixedPoint(40).encode(x))


def test_cursor_on_compact_words_pops_then_pushes_and_round_trips():
    """A cursor on compactly stored words (uint8) that pops and then pushes again writes into
    float64 words of its own: the digits pushed last pop first, and the compact record it was
    made from is unchanged."""
    g = torch.Generator().manual_seed(3)
    buf = InformationBuffer(torch.Size([50]))
    digits = [torch.randint(0, 3, (50,), generator=g).double() for _ in range(3)]
    for k in digits:
        buf.push(k, 3, 3)
    meta, tensors = buf.state(compact=True)
    assert tensors[0].dtype == torch.uint8
    record = [t.clone() for t in tensors]
    cursor = InformationBuffer.cursor(meta, tensors)
    assert torch.equal(cursor.pop(3), digits[2])
    new = torch.randint(0, 5, (50,), generator=g).double()
    cursor.push(new, 5, 5)
    assert torch.equal(cursor.pop(5), new)
    assert torch.equal(cursor.pop(3), digits[1]) and torch.equal(cursor.pop(3), digits[0])
    assert all(torch.equal(a, b) for a, b in zip(tensors, record))
