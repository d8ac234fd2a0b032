"""MomentumResNet: gradients, inversion, exact mode, memory, dropout/BatchNorm, bad input.

Ground truth is plain autograd on the same forward (float64), float64 gradcheck, and the
fixed-point representation itself for bit-exactness.
"""

import functools
import warnings

import pytest
import torch
from helpers import saved_bytes
from torch import nn

import mode
from mode.reversible import ReconstructionWarning, fixed_points
from mode.steps import Coupling, MomentumStep

D = 6


def mlp(d=D, hidden=12, scale=1.0, dtype=torch.float64):
    net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d)).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


class WithArg(nn.Module):
    """f(x, c) = W2 tanh(W1 x + c): an extra argument that receives gradients."""

    def __init__(self, d=D, hidden=10):
        super().__init__()
        self.lin1 = nn.Linear(d, hidden).double()
        self.lin2 = nn.Linear(hidden, d).double()

    def forward(self, x, c):
        return self.lin2(torch.tanh(self.lin1(x) + c))


def grads_of(net, x, *args, v0=None, loss_fn=None):
    x = x.detach().clone().requires_grad_(True)
    tensors = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]
    out, v = net(x, *args, v0=v0, return_velocity=True)
    loss = (out.sin() * torch.arange(out.numel()).reshape(out.shape)).sum() + (v**2).sum()
    params = [p for p in net.parameters() if p.requires_grad]
    g = torch.autograd.grad(loss, [x, *tensors, *params])
    return out.detach(), g


def assert_close_lists(a, b, rtol, atol):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "depth,gamma", [(1, 0.3), (7, 0.3), (7, 0.9), (40, 0.9), (40, 1.0), (100, 0.97)]
)
def test_reversible_gradients_equal_autograd(depth, gamma):
    """Float reversal in a regime where prod(1/gamma) * 2^-52 is small (no warning)."""
    torch.manual_seed(depth)
    functions = nn.ModuleList(mlp() for _ in range(depth))
    phi = nn.Linear(D, D).double()
    x = torch.randn(5, D, dtype=torch.float64)
    ref = mode.MomentumResNet(functions, gamma, init_velocity=phi, reversible=False)
    rev = mode.MomentumResNet(functions, gamma, init_velocity=phi, reversible=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReconstructionWarning)
        out_r, g_r = grads_of(rev, x)
    out_a, g_a = grads_of(ref, x)
    torch.testing.assert_close(out_r, out_a, rtol=0, atol=0)
    assert_close_lists(g_r, g_a, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("exact", [False, True])
def test_gradients_without_the_engine_fast_path(monkeypatch, exact):
    """The per-layer VJP calls torch's engine directly where it can; the public
    torch.autograd.grad fallback (other torch versions) gives the same gradients."""
    import mode.reversible as engine

    torch.manual_seed(3)
    functions = nn.ModuleList(mlp() for _ in range(12))
    x = torch.randn(5, D, dtype=torch.float64)
    rev = mode.MomentumResNet(functions, 0.8, exact=exact)
    _, fast = grads_of(rev, x)
    monkeypatch.setattr(engine, "_engine_run_backward", None)
    _, slow = grads_of(rev, x)
    _, ref = grads_of(mode.MomentumResNet(functions, 0.8, reversible=False), x)
    assert_close_lists(fast, slow, rtol=0, atol=0)
    tol = 1e-6 if exact else 1e-10  # exact mode runs on a 2^-32 fixed-point grid
    assert_close_lists(slow, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("exact", [False, True])
def test_extra_args_receive_gradients(exact):
    torch.manual_seed(0)
    functions = [WithArg() for _ in range(6)]
    x = torch.randn(4, D, dtype=torch.float64)
    c = torch.randn(10, dtype=torch.float64, requires_grad=True)
    ref = mode.MomentumResNet(functions, 0.8, reversible=False)
    rev = mode.MomentumResNet(functions, 0.8, reversible=True, exact=exact)
    _, g_a = grads_of(ref, x, c)
    _, g_r = grads_of(rev, x, c)
    tol = 1e-6 if exact else 1e-10  # exact mode runs on a 2^-32 fixed-point grid
    assert_close_lists(g_r, g_a, rtol=tol, atol=tol)
    assert g_r[1].abs().sum() > 0


def test_explicit_v0_and_non_leaf_arg():
    torch.manual_seed(1)
    functions = [WithArg() for _ in range(5)]
    x = torch.randn(3, D, dtype=torch.float64)
    v0 = torch.randn(3, D, dtype=torch.float64)
    raw = torch.randn(10, dtype=torch.float64, requires_grad=True)

    def run(net):
        c = raw * 2  # non-leaf argument: the gradient must flow through it to raw
        out = net(x, c, v0=v0)
        return torch.autograd.grad(out.pow(2).sum(), [raw, *net.parameters()])

    g_a = run(mode.MomentumResNet(functions, 0.7, reversible=False))
    g_r = run(mode.MomentumResNet(functions, 0.7, reversible=True))
    assert_close_lists(g_r, g_a, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64_with_learned_gamma():
    torch.manual_seed(2)
    functions = nn.ModuleList(mlp(d=3, hidden=4) for _ in range(4))
    gamma = nn.Parameter(torch.tensor(0.8, dtype=torch.float64))
    net = mode.MomentumResNet(functions, gamma, reversible=True)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def f(x, c, g):
        net.gamma = g
        return net(x, v0=c, return_velocity=True)

    assert torch.autograd.gradcheck(f, (x, c, gamma))


@pytest.mark.parametrize("exact", [False, True])
def test_learned_gamma_gradient(exact):
    torch.manual_seed(3)
    functions = [mlp() for _ in range(12)]
    x = torch.randn(4, D, dtype=torch.float64)
    out = {}
    for reversible in (False, True):
        gamma = nn.Parameter(torch.tensor(0.75, dtype=torch.float64))
        net = mode.MomentumResNet(
            functions, gamma, reversible=reversible, exact=exact and reversible
        )
        y = net(x)
        (g,) = torch.autograd.grad(y.pow(2).sum(), [gamma])
        out[reversible] = g
    torch.testing.assert_close(out[True], out[False], rtol=1e-6 if exact else 1e-10, atol=0)


def test_gamma_computed_from_a_parameter():
    """A non-leaf gamma (e.g. a sigmoid of a parameter) gets its gradient through the chain."""
    torch.manual_seed(4)
    functions = [mlp() for _ in range(6)]
    x = torch.randn(3, D, dtype=torch.float64)
    res = []
    for reversible in (False, True):
        raw = nn.Parameter(torch.tensor(1.2, dtype=torch.float64))
        net = mode.MomentumResNet(functions, torch.sigmoid(raw), reversible=reversible)
        (g,) = torch.autograd.grad(net(x).pow(2).sum(), [raw])
        res.append(g)
    torch.testing.assert_close(res[0], res[1], rtol=1e-10, atol=0)


def test_unbatched_input():
    torch.manual_seed(5)
    functions = [mlp() for _ in range(5)]
    x = torch.randn(D, dtype=torch.float64)
    ref = mode.MomentumResNet(functions, 0.9, reversible=False)
    rev = mode.MomentumResNet(functions, 0.9)
    _, g_a = grads_of(ref, x)
    out, g_r = grads_of(rev, x)
    assert out.shape == (D,)
    assert_close_lists(g_r, g_a, rtol=1e-10, atol=1e-12)


def test_matches_the_recursion_written_out():
    """The forward rule, checked against the two-line recursion of DESIGN.md."""
    torch.manual_seed(6)
    functions = [mlp() for _ in range(9)]
    x = torch.randn(4, D, dtype=torch.float64)
    gamma = 0.6
    xs, v = [x], torch.zeros_like(x)
    for f in functions:
        v = gamma * v + (1 - gamma) * f(xs[-1])
        xs.append(xs[-1] + v)
    net = mode.MomentumResNet(functions, gamma)
    with torch.no_grad():
        torch.testing.assert_close(net(x), xs[-1], rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(net.trajectory(x), torch.stack(xs), rtol=1e-14, atol=1e-14)


# ------------------------------------------------------------------------------------ inverse


@pytest.mark.parametrize("gamma", [0.5, 0.9, 1.0])
def test_inverse_round_trip_float(gamma):
    torch.manual_seed(7)
    net = mode.MomentumResNet([mlp() for _ in range(10)], gamma)
    x0 = torch.randn(5, D, dtype=torch.float64)
    v0 = torch.randn(5, D, dtype=torch.float64)
    with torch.no_grad():
        xN, vN = net(x0, v0=v0, return_velocity=True)
        x, v = net.inverse(xN, vN)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-11)
    torch.testing.assert_close(v, v0, rtol=0, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [0.1, 0.9, 0.99])
def test_exact_round_trip_is_bit_identical_at_depth_2000(gamma, dtype):
    """Depth 2000 at gamma = 0.1: float reversal amplifies errors by 10^2000; exact does not."""
    torch.manual_seed(8)
    depth = 2000
    f = mlp(d=4, hidden=8, scale=0.05, dtype=dtype)  # weight-tied: cheap, still a real test
    net = mode.MomentumResNet([f] * depth, gamma, exact=True)
    x0 = torch.randn(16, 4, dtype=dtype)
    v0 = torch.randn(16, 4, dtype=dtype) * 0.1
    fp = fixed_points(None, dtype)[0]
    with torch.no_grad():
        xN, vN = net(x0, v0=v0, return_velocity=True)
        x, v = net.inverse(xN, vN)
    # Bit-identical to the fixed-point input (x0 is first rounded to the grid of its fixed point).
    assert torch.equal(x, fp.decode(fp.encode(x0), dtype))
    assert torch.equal(v, fp.decode(fp.encode(v0), dtype))
    # The same chain in float arithmetic cannot be reversed when gamma is small.
    if gamma == 0.1:
        float_net = mode.MomentumResNet([f] * depth, gamma)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", ReconstructionWarning)
            xN, vN = float_net(x0, v0=v0, return_velocity=True)
            x, _ = float_net.inverse(xN, vN)
        assert not torch.allclose(x, x0, atol=1e-2)


def test_exact_backward_reconstructs_the_forward_states_bit_exactly():
    """Exact-mode gradients equal the gradients of autograd run on the exact forward states."""
    torch.manual_seed(9)
    depth, gamma = 300, 0.2
    functions = [mlp(d=4, hidden=8, scale=0.3) for _ in range(depth)]
    net = mode.MomentumResNet(functions, gamma, exact=True)
    fp = fixed_points(None, torch.float64)[0]
    x0 = fp.decode(fp.encode(torch.randn(8, 4, dtype=torch.float64)), torch.float64)
    x0.requires_grad_(True)
    xN = net(x0)
    g = torch.autograd.grad(xN.pow(2).sum(), [x0, *net.parameters()])
    # Ground truth: replay the forward in fixed point and differentiate each layer at the
    # recorded states, accumulating the adjoint by hand (no reconstruction involved).
    with torch.no_grad():
        q = [fp.encode(x0), torch.zeros_like(fp.encode(x0))]
        states = []
        from mode.exact import InformationBuffer, rational

        buf = InformationBuffer(x0.shape)
        for f in functions:
            states.append(fp.decode(q[0], torch.float64))
            q[1] = buf.scale(q[1], *rational(gamma)) + fp.encode((1 - gamma) * f(states[-1]))
            q[0] = q[0] + q[1]
        assert torch.equal(fp.decode(q[0], torch.float64), xN.detach())
    gx, gv = 2 * xN.detach(), torch.zeros_like(x0)
    pgrads = []
    for f, xs in zip(reversed(functions), reversed(states)):
        gv = gv + gx
        xs = xs.clone().requires_grad_(True)
        out = (1 - gamma) * f(xs)
        gxs, *gp = torch.autograd.grad(out, [xs, *f.parameters()], gv)
        gx = gx + gxs
        gv = gamma * gv
        pgrads = gp + pgrads
    assert_close_lists(list(g), [gx, *pgrads], rtol=1e-12, atol=1e-14)


def test_exact_slots_with_different_fractional_bits():
    """frac_bits=(Fx, Fv): v holds 10 more bits than x, so the shift x <- x + v is rounded
    onto the grid of x. The forward equals that rule replayed by hand, the inverse is
    bit-exact, and gradients equal autograd on the replayed forward states."""
    from mode.exact import InformationBuffer, rational
    from mode.reversible import integrate, reverse
    from mode.steps import MomentumStep

    torch.manual_seed(10)
    depth, gamma, bits = 200, 0.75, (30, 40)
    functions = [mlp(d=4, hidden=8, scale=0.02) for _ in range(depth)]
    steps = [MomentumStep(f, gamma) for f in functions]
    fx, fv = fixed_points(bits, torch.float64)
    x0 = fx.decode(fx.encode(torch.randn(8, 4, dtype=torch.float64)), torch.float64)
    v0 = fv.decode(fv.encode(0.01 * torch.randn(8, 4, dtype=torch.float64)), torch.float64)
    x0.requires_grad_(True)
    xN, vN = integrate(steps, (x0, v0), exact=True, frac_bits=bits)
    with torch.no_grad():
        qx, qv, buf, states = fx.encode(x0), fv.encode(v0), InformationBuffer(x0.shape), []
        for f in functions:
            states.append(fx.decode(qx, torch.float64))
            qv = buf.scale(qv, *rational(gamma)) + fv.encode((1 - gamma) * f(states[-1]))
            qx = qx + torch.round(qv.to(torch.float64) * 2.0**-10).to(qx.dtype)  # to nearest, even
        assert torch.equal(fx.decode(qx, torch.float64), xN.detach())
        assert torch.equal(fv.decode(qv, torch.float64), vN.detach())
        x_back, v_back = reverse(steps, (xN, vN), exact=True)
    assert torch.equal(x_back, x0.detach()) and torch.equal(v_back, v0)
    g = torch.autograd.grad(xN.pow(2).sum(), [x0, *(p for f in functions for p in f.parameters())])
    gx, gv, pgrads = 2 * xN.detach(), torch.zeros_like(x0), []
    for f, xs in zip(reversed(functions), reversed(states)):
        gv = gv + gx
        xs = xs.clone().requires_grad_(True)
        gxs, *gp = torch.autograd.grad((1 - gamma) * f(xs), [xs, *f.parameters()], gv)
        gx, gv, pgrads = gx + gxs, gamma * gv, gp + pgrads
    assert_close_lists(list(g), [gx, *pgrads], rtol=1e-12, atol=1e-14)


def test_exact_inverse_needs_the_forward_outputs():
    net = mode.MomentumResNet([mlp()], 0.9, exact=True)
    x = torch.randn(2, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="information buffer"):
        net.inverse(x, torch.zeros_like(x))


# ------------------------------------------------------------------------------ exact gradients


def test_exact_gradients_float32_close_to_autograd():
    torch.manual_seed(10)
    functions = [mlp(d=8, hidden=16, scale=0.5, dtype=torch.float32) for _ in range(64)]
    x = torch.randn(32, 8)
    ref = mode.MomentumResNet(functions, 0.5, reversible=False)
    ex = mode.MomentumResNet(functions, 0.5, exact=True)
    g_a = torch.autograd.grad(ref(x).pow(2).sum(), list(ref.parameters()))
    g_e = torch.autograd.grad(ex(x).pow(2).sum(), list(ex.parameters()))
    num = sum((a - b).pow(2).sum() for a, b in zip(g_a, g_e)).sqrt()
    den = sum(a.pow(2).sum() for a in g_a).sqrt()
    assert num / den < 1e-4


def test_float_mode_warns_when_reversal_is_untrustworthy():
    functions = [mlp(dtype=torch.float32) for _ in range(100)]
    x = torch.randn(2, D)
    with pytest.warns(ReconstructionWarning, match="exact=True"):
        mode.MomentumResNet(functions, 0.5)(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReconstructionWarning)
        mode.MomentumResNet(functions[:8], 0.9)(x)  # 0.9^-8 * 1.2e-7: fine
        mode.MomentumResNet(functions, 0.5, exact=True)(x)  # exact: nothing to warn about


def test_exact_mode_detects_a_non_deterministic_function():
    """A function that answers differently in backward cannot give exact gradients: say so."""

    class Drifting(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D).double()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.lin(x) * (1 + 1e-6 * self.calls)  # hidden state: not a function of x

    net = mode.MomentumResNet([Drifting() for _ in range(3)], 0.9, exact=True)
    x = torch.randn(4, D, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="hidden state.*'calls' of Drifting"):
        net(x).sum().backward()
    with torch.no_grad():
        out = net(x, return_velocity=True)
    with pytest.raises(RuntimeError, match="hidden state.*'calls' of Drifting"):
        net.inverse(*out)


def test_exact_overflow_raises():
    class Huge(nn.Module):
        def forward(self, x):
            return x * 1e6

    net = mode.MomentumResNet([Huge()] * 3, 0.9, exact=True)
    with pytest.raises(ValueError, match="range"):
        net(torch.ones(3, dtype=torch.float64))


# ------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("exact", [False, True])
def test_activation_memory_does_not_grow_with_depth(exact):
    torch.manual_seed(11)
    f = mlp(d=16, hidden=32, dtype=torch.float32)
    x = torch.randn(64, 16, requires_grad=True)
    held = {}
    for depth in (8, 128):
        for reversible in (False, True):
            net = mode.MomentumResNet(
                [f] * depth, 0.9, reversible=reversible, exact=exact and reversible
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ReconstructionWarning)
                held[depth, reversible], _ = saved_bytes(lambda net=net: net(x))
    n = x.numel()
    if exact:
        # The open buffer words are stored in the narrowest exact format of their bound: one
        # push (base <= 2) per layer bounds them by 2^(depth + 1) - 1, so float32 at depth 8 and
        # float64 at depth 128 (no level spilled: a constant per scalar beyond that).
        assert held[8, True] == 2 * 8 * n + 4 * n
        assert held[128, True] == 2 * 8 * n + 8 * n
    else:
        assert held[8, True] == held[128, True] == 2 * 4 * n
    # the output pair (float64 fixed point in exact mode, plus one open buffer word per scalar:
    # 128 layers at gamma = 0.9 push about 20 bits per scalar, below the 52 of one word)
    assert held[128, True] <= (3 if exact else 2) * x.numel() * 8
    assert held[128, False] > 10 * held[8, False] / 2  # autograd grows linearly


# --------------------------------------------------------------------- dropout and batch norm


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = mlp()
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.drop(self.f(x))


@pytest.mark.parametrize("exact", [False, True])
def test_dropout_sees_the_same_randomness_in_backward(exact):
    torch.manual_seed(12)
    functions = [Noisy() for _ in range(8)]
    x = torch.randn(10, D, dtype=torch.float64)
    res = []
    for reversible in (False, True):
        torch.manual_seed(123)
        net = mode.MomentumResNet(functions, 0.9, reversible=reversible, exact=exact and reversible)
        out, g = grads_of(net, x)
        res.append((out, g, torch.get_rng_state()))
    tol = 1e-6 if exact else 1e-10
    torch.testing.assert_close(res[1][0], res[0][0], rtol=tol, atol=tol)
    assert_close_lists(res[1][1], res[0][1], rtol=tol, atol=tol)
    # backward replays the forward's RNG state without consuming the caller's
    assert torch.equal(res[0][2], res[1][2])


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = mlp()
        self.bn = nn.BatchNorm1d(D).double()

    def forward(self, x):
        return self.bn(self.f(x))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_statistics_updated_once(momentum):
    torch.manual_seed(13)
    x = torch.randn(16, D, dtype=torch.float64)
    stats, grads = [], []
    for reversible in (False, True):
        torch.manual_seed(0)
        functions = [Normed() for _ in range(5)]
        for fn in functions:
            fn.bn.momentum = momentum
        net = mode.MomentumResNet(functions, 0.9, reversible=reversible)
        _, g = grads_of(net, x)
        net.inverse(*net(x, return_velocity=True))  # inversion must not touch statistics
        grads.append(g)
        stats.append([(fn.bn.running_mean, fn.bn.running_var, fn.bn.num_batches_tracked)
                      for fn in functions])
    assert_close_lists(grads[1], grads[0], rtol=1e-10, atol=1e-12)
    for (m0, v0, n0), (m1, v1, n1) in zip(*stats):
        # autograd: one training forward and one more in the inverse-call line = 2 updates
        torch.testing.assert_close(m1, m0)
        torch.testing.assert_close(v1, v0)
        assert int(n0) == int(n1) == 2


# ---------------------------------------------------------------------------------- bad input


def test_bad_gamma():
    f = [mlp()]
    for g in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="gamma"):
            mode.MomentumResNet(f, g)
    with pytest.raises(TypeError, match="gamma"):
        mode.MomentumResNet(f, "0.9")
    with pytest.raises(ValueError, match="gamma = 0"):
        mode.MomentumResNet(f, 0.0)  # reversible=True is the default
    net = mode.MomentumResNet(f, 0.0, reversible=False)
    x = torch.randn(2, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="no inverse"):
        net.inverse(x, x)


def test_bad_functions_and_flags():
    with pytest.raises(ValueError, match="at least one"):
        mode.MomentumResNet([], 0.9)
    with pytest.raises(ValueError, match="at least one"):
        mode.MomentumResNet(nn.ModuleList(), 0.9)
    with pytest.raises(TypeError, match="callable"):
        mode.MomentumResNet([3], 0.9)
    with pytest.raises(ValueError, match="exact=True needs reversible=True"):
        mode.MomentumResNet([mlp()], 0.9, reversible=False, exact=True)


def test_bad_inputs_at_call_time():
    net = mode.MomentumResNet([mlp()], 0.9)
    x = torch.randn(3, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="v0 must have the shape"):
        net(x, v0=torch.zeros(3, D + 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        net(torch.ones(3, D, dtype=torch.int64))
    for exact in (False, True):
        shrink = mode.MomentumResNet([nn.Linear(D, D - 1).double()], 0.9, exact=exact)
        with pytest.raises(ValueError, match="changed the shape"):
            shrink(x)
    broadcast = mode.MomentumResNet([lambda x: x.sum(0)], 0.9, exact=True)
    with pytest.raises(ValueError, match="changed the shape"):
        broadcast(x)


def test_conversion_errors():
    for eps in (0.0, -1.0):
        with pytest.raises(ValueError, match="eps"):
            mode.eps_to_gamma(eps, 10)
    with pytest.raises(ValueError, match="depth"):
        mode.gamma_to_eps(0.5, 0)
    with pytest.raises(ValueError, match="depth"):
        mode.eps_to_gamma(0.5, 0)
    with pytest.raises(ValueError, match="smaller than the step"):
        mode.eps_to_gamma(0.01, 10)  # eta = 0.1 > eps
    with pytest.raises(ValueError, match="gamma"):
        mode.gamma_to_eps(1.2, 10)


def test_unregistered_parameter_is_detected():
    w = nn.Parameter(torch.randn(D, D, dtype=torch.float64))
    net = mode.MomentumResNet([lambda x: torch.tanh(x @ w)] * 3, 0.9)
    x = torch.randn(2, D, dtype=torch.float64, requires_grad=True)
    y = net(x)
    with pytest.raises(ValueError, match="would receive no gradient"):
        y.sum().backward()


@pytest.mark.parametrize("exact", [False, True])
def test_parameters_replaced_between_calls_receive_gradients(exact):
    """The engine caches each step's parameter list; registering a new one must invalidate it."""
    functions = [mlp() for _ in range(3)]
    net = mode.MomentumResNet(functions, 0.5, exact=exact)
    ref = mode.MomentumResNet(functions, 0.5, reversible=False)
    x = torch.randn(4, D, dtype=torch.float64)
    net(x).sum().backward()  # fills the caches
    functions[1][0].weight = nn.Parameter(torch.randn(12, D, dtype=torch.float64))
    functions[2].add_module("3", nn.Tanh())
    functions[2][2].register_parameter("extra", nn.Parameter(torch.ones((), dtype=torch.float64)))
    functions[2][2].forward = lambda h, lin=functions[2][2]: lin.extra * nn.functional.linear(
        h, lin.weight, lin.bias
    )
    params = list(net.parameters())
    got = torch.autograd.grad(net(x).pow(2).sum(), params)
    want = torch.autograd.grad(ref(x).pow(2).sum(), params)
    assert_close_lists(list(got), list(want), rtol=1e-6 if exact else 1e-9, atol=1e-8)
    position = {id(p): i for i, p in enumerate(params)}
    assert got[position[id(functions[1][0].weight)]].abs().sum() > 0
    assert got[position[id(functions[2][2].extra)]].abs() > 0


def test_repr_is_informative():
    text = repr(mode.MomentumResNet([mlp() for _ in range(4)], 0.9, exact=True))
    assert "depth=4" in text and "gamma=0.9" in text and "exact" in text and "eps=2.5" in text


class _Clocked(nn.Module):
    """f(x) = tanh(W x) * (1 + t): a residual function that reads a time set from outside."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D).double()
        self.t = None

    def forward(self, x):
        return torch.tanh(self.lin(x)) * (1 + self.t)


def _at(f, t, x):
    f.t = t
    return f(x)


class _ClockedStep(MomentumStep):
    """``f`` read at time ``t``: the couplings bake ``t`` in, as a grid's do."""

    def __init__(self, f, gamma, t=None):
        super().__init__(f, gamma)
        self.__dict__["t"] = t

    def couplings_at(self, t):
        g = self.gamma
        return (Coupling(1, alpha=g, phi=functools.partial(_at, self.function, t), scale=1 - g),
                Coupling(0, alpha=1.0, shift=1))

    def couplings(self):
        return self.couplings_at(self.t)


@pytest.mark.parametrize("exact", [False, True])
def test_step_grid_is_the_list_of_steps_it_stands_for(exact):
    """A StepGrid (one module at many times) gives the outputs and gradients of the explicit
    list of steps, one per time, in forward and backward order; empty grids and slices are
    refused."""
    from mode.reversible import integrate
    from mode.steps import StepGrid

    torch.manual_seed(4)
    f = _Clocked()
    times = torch.linspace(0, 1, 30, dtype=torch.float64)
    grid_step = _ClockedStep(f, 0.7)
    grid = StepGrid(grid_step, times, grid_step.couplings_at)
    steps = [_ClockedStep(f, 0.7, t) for t in times]
    x = torch.randn(4, D, dtype=torch.float64, requires_grad=True)
    outs = []
    for chain in (grid, steps):
        xN, vN = integrate(chain, (x, torch.zeros_like(x)), exact=exact)
        outs.append((xN, torch.autograd.grad((xN**2).sum(), [x, *f.parameters()])))
    assert torch.equal(outs[0][0], outs[1][0])
    assert_close_lists(list(outs[0][1]), list(outs[1][1]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least one time"):
        integrate(StepGrid(grid_step, times[:0], grid_step.couplings_at), (x, x))
    with pytest.raises(TypeError, match="integers"):
        grid[1:3]


@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_float64_exact_gradients_reach_float64_round_off_at_depth_512(gamma):
    """The default fixed point of float64 states (48 bits in int64): every gradient within
    1e-10 of float64 autograd on the same network at depth 512 (32 bits would give about 1e-7,
    the old float64-held 38 bits about 1e-8), with the inverse still bit-exact."""
    torch.manual_seed(11)
    functions = [mlp(d=8, hidden=16, scale=0.5) for _ in range(512)]
    x = torch.randn(4, 8, dtype=torch.float64)
    grads = []
    for kw in ({"reversible": False}, {"exact": True}):
        net = mode.MomentumResNet(functions, gamma, **kw)
        xx = x.clone().requires_grad_(True)
        out = net(xx)
        grads.append([*torch.autograd.grad(out.pow(2).sum(), [xx, *net.parameters()])])
    worst = max(float((g - r).norm() / r.norm()) for g, r in zip(*reversed(grads)))
    assert worst < 1e-10
    with torch.no_grad():
        xN, vN = net(x, return_velocity=True)
        x0, _ = net.inverse(xN, vN)
    fp = fixed_points(None, torch.float64)[0]
    assert fp.storage == torch.int64
    assert torch.equal(x0, fp.decode(fp.encode(x), torch.float64))
