"""The reversible engine against autograd under the PyTorch features users combine it with
(DESIGN.md section 5). Ground truth: the same model with ``reversible=False``, float64."""

import copy
import random

import pytest
import torch
from torch import nn

import mode
from mode.exact import FixedPoint
from mode.reversible import ReconstructionWarning
from mode.steps import Coupling, ReversibleStep

D = 5
STRATEGIES = [dict(reversible=False), dict(reversible=True), dict(reversible=True, exact=True)]
IDS = ["autograd", "float", "exact"]


def mlp(d=D, hidden=8):
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d)).double()


def x_of(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64, requires_grad=True)


def grads(net, xs, params):
    loss = sum((net(x) ** 2).sum() for x in xs)
    return torch.autograd.grad(loss, [*xs, *params])


def assert_lists_close(a, b, rtol=1e-9, atol=1e-11):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=rtol, atol=atol)


@pytest.mark.parametrize("how", STRATEGIES, ids=IDS)
def test_two_forwards_then_one_backward_equal_autograd(how):
    torch.manual_seed(0)
    fs = [mlp() for _ in range(4)]
    gamma = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
    ref = mode.MomentumResNet(fs, gamma, reversible=False)
    net = mode.MomentumResNet(fs, gamma, **how)
    xs = [x_of(seed=1), x_of(seed=2)]
    params = list(ref.parameters())
    assert_lists_close(grads(net, xs, params), grads(ref, xs, params), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("adjoint", [False, True, "reversible"])
def test_learned_eps_two_forwards_then_one_backward(adjoint):
    """Item 1 of the issue: the grids of two calls are separate values."""

    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D).double()

        def forward(self, t, x):
            return torch.tanh(self.lin(x)) * (1 + t)

    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    torch.manual_seed(0)
    net = mode.MomentumNeuralODE(F(), 0.5, learn_eps=True, method="momentum",
                                 options={"step_size": 0.05}, adjoint=adjoint, t=t)
    x1, x2 = x_of(seed=1).detach(), x_of(seed=2).detach()
    params = list(net.parameters())
    together = torch.autograd.grad(net(x1).pow(2).sum() + net(x2).pow(2).sum(), params)
    one = torch.autograd.grad(net(x1).pow(2).sum(), params)
    two = torch.autograd.grad(net(x2).pow(2).sum(), params)
    assert_lists_close(together, [a + b for a, b in zip(one, two)], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("how", STRATEGIES, ids=IDS)
def test_gamma_changed_between_forward_and_backward(how):
    torch.manual_seed(0)
    fs = [mlp() for _ in range(4)]
    x = x_of()
    net = mode.MomentumResNet(fs, 0.6, **how)
    out = net(x)
    net.gamma = 0.9  # a later configuration must not leak into this forward's backward
    g = torch.autograd.grad(out.pow(2).sum(), [x, *net.parameters()])
    ref = mode.MomentumResNet(fs, 0.6, reversible=False)
    assert_lists_close(g, grads(ref, [x], list(ref.parameters())), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("arch", [mode.MomentumResNet, mode.MRevNet])
@pytest.mark.parametrize("how", STRATEGIES, ids=IDS)
def test_gamma_tensor_swapped_between_two_forwards_before_one_backward(arch, how):
    """What FSDP2 does at each forward: the learned gamma's Parameter is replaced by another
    tensor. The steps are pointed at the new one (not rebuilt, which inside a torch.compile
    trace breaks the graph), and a backward pending from the earlier forward still uses the
    gamma it ran with: gradients are those of the two autograd models, gammas included."""
    torch.manual_seed(0)
    fs = [mlp() for _ in range(4)]
    a, b = (nn.Parameter(torch.tensor(g, dtype=torch.float64)) for g in (0.6, 0.8))
    x1, x2 = x_of(seed=1), x_of(seed=2)
    net = arch(fs, a, **how)
    steps = list(net.chain())
    out = net(x1).pow(2).sum()
    net.gamma = b
    out = out + net(x2).pow(2).sum()
    assert all(s is t for s, t in zip(net.chain(), steps)) and steps[0].gamma is b
    params = [a, b, *net.functions.parameters()]
    got = torch.autograd.grad(out, [x1, x2, *params])
    one, two = arch(fs, a, reversible=False), arch(fs, b, reversible=False)
    want = torch.autograd.grad(one(x1).pow(2).sum() + two(x2).pow(2).sum(), [x1, x2, *params])
    assert_lists_close(got, want, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("how", STRATEGIES, ids=IDS)
def test_parameter_hook_fires_once_on_the_total_gradient(how):
    torch.manual_seed(0)
    f = mlp()
    x = x_of()
    ref = mode.MomentumResNet([f] * 4, 0.8, reversible=False)  # weight-tied
    (expected,) = torch.autograd.grad(ref(x).pow(2).sum(), [f[0].weight])
    calls = []
    handle = f[0].weight.register_hook(lambda g: (calls.append(1), 2 * g)[1])
    f[0].weight.grad = None
    mode.MomentumResNet([f] * 4, 0.8, **how)(x).pow(2).sum().backward()
    handle.remove()
    assert len(calls) == 1
    torch.testing.assert_close(f[0].weight.grad, 2 * expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("how", STRATEGIES, ids=IDS)
@pytest.mark.parametrize("learned", [False, True])
def test_functional_call_fast_weights_after_an_earlier_backward(how, learned):
    """Fast weights through functional_call (a learned gamma among them: functional_call swaps a
    plain tensor in for the Parameter, and the steps follow it, then the Parameter again)."""
    def gamma():
        return nn.Parameter(torch.tensor(0.8, dtype=torch.float64)) if learned else 0.8

    torch.manual_seed(1)
    fs = [mlp() for _ in range(3)]
    net = mode.MomentumResNet(fs, gamma(), **how)
    ref = mode.MomentumResNet(copy.deepcopy(fs), gamma(), reversible=False)
    x = x_of()
    net(x).sum().backward()  # an earlier step, as in a meta-learning loop
    out = {}
    for name, model in (("net", net), ("ref", ref)):
        fast = {n: p * 1.1 for n, p in model.named_parameters()}
        y = torch.func.functional_call(model, fast, (x,))
        out[name] = torch.autograd.grad(y.pow(2).sum(), [x, *fast.values(), *model.parameters()])
    assert_lists_close(out["net"], out["ref"], rtol=1e-8, atol=1e-10)
    assert all(step.gamma is net.gamma for step in net.chain())


@pytest.mark.parametrize("exact", [False, True])
def test_in_place_modification_is_refused_with_the_cause(exact):
    net = mode.MomentumResNet([mlp() for _ in range(3)], 0.8, exact=exact)
    loss = net(x_of()).sum()
    with torch.no_grad():
        net.functions[1][0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="parameter 'weight' of Linear.*modified in place"):
        loss.backward()


class _Block(nn.Module):
    def __init__(self, kind):
        super().__init__()
        conv = nn.Conv1d(2, 2, 3, padding=1)
        self.norm = nn.Identity()
        if kind == "instancenorm":
            self.norm = nn.InstanceNorm1d(2, track_running_stats=True, affine=True)
        elif kind == "batchnorm":
            self.norm = nn.BatchNorm1d(2)
        elif kind == "spectral_norm":
            conv = nn.utils.spectral_norm(conv)
        elif kind == "spectral_norm_parametrization":
            conv = nn.utils.parametrizations.spectral_norm(conv)
        self.conv = conv
        self.double()

    def forward(self, x):
        return torch.tanh(self.norm(self.conv(x)))


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize(
    "kind", ["instancenorm", "batchnorm", "spectral_norm", "spectral_norm_parametrization"])
def test_stateful_modules_end_as_under_autograd(kind, exact):
    torch.manual_seed(1)
    fs = [_Block(kind) for _ in range(3)]
    x = torch.randn(4, 2, 6, dtype=torch.float64)
    runs = []
    for reversible in (False, True):
        net = mode.MomentumResNet(copy.deepcopy(fs), 0.8, reversible=reversible,
                                  exact=exact and reversible).train()
        xx = x.clone().requires_grad_(True)
        for _ in range(2):  # two training steps: statistics and power iterations advance
            g = torch.autograd.grad(net(xx).pow(2).sum(), [xx, *net.parameters()])
        runs.append((g, [b.clone() for b in net.buffers()]))
    tol = dict(rtol=1e-8, atol=1e-9) if exact else dict(rtol=1e-10, atol=1e-12)
    assert_lists_close(runs[1][0], runs[0][0], **tol)
    assert_lists_close([b.double() for b in runs[1][1]], [b.double() for b in runs[0][1]], **tol)


@pytest.mark.parametrize("exact", [False, True])
def test_train_mode_dropout_inverse_replays_the_forward(exact):
    torch.manual_seed(3)
    fs = [nn.Sequential(nn.Linear(D, 8), nn.Dropout(0.5), nn.Linear(8, D)).double()
          for _ in range(3)]
    net = mode.MomentumResNet(fs, 0.8, exact=exact).train()
    x = x_of().detach()
    xN, vN = net(x, return_velocity=True)
    x0, _ = net.inverse(xN, vN)
    if exact:
        fp = mode.reversible.fixed_points(None, x.dtype)[0]
        assert torch.equal(x0, fp.decode(fp.encode(x), x.dtype))
    else:
        torch.testing.assert_close(x0, x, rtol=1e-12, atol=1e-12)
    with pytest.raises((RuntimeError, ValueError), match="random numbers|information buffer"):
        net.inverse(xN.clone(), vN.clone())  # copies: no record of the forward's draws


@pytest.mark.parametrize("how", STRATEGIES, ids=IDS)
def test_batch_of_size_zero(how):
    net = mode.MomentumResNet([mlp() for _ in range(3)], 0.8, **how)
    x = torch.zeros(0, D, dtype=torch.float64, requires_grad=True)
    net(x).sum().backward()
    assert x.grad.shape == (0, D)


def test_odeint_reversible_batch_of_size_zero():
    f = nn.Linear(D, D).double()
    x0 = torch.zeros(0, D, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    xs = mode.odeint(lambda t, x: f(x), x0, t, eps=0.5, method="momentum",
                     options={"step_size": 0.05}, adjoint=False)
    assert xs.shape == (3, 0, D)
    xs = mode.odeint(_FieldModule(f), x0, t, eps=0.5, method="momentum",
                     options={"step_size": 0.05}, adjoint="reversible")
    xs.sum().backward()
    assert x0.grad.shape == (0, D)


class _FieldModule(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, t, x):
        return torch.tanh(self.f(x))


@pytest.mark.parametrize("how", STRATEGIES[1:], ids=IDS[1:])
def test_inference_mode(how):
    net = mode.MomentumResNet([mlp() for _ in range(3)], 0.8, **how)
    x = x_of().detach()
    with torch.inference_mode():
        out = net(x)
    with torch.no_grad():
        torch.testing.assert_close(out, mode.MomentumResNet(net.functions, 0.8,
                                                            reversible=False)(x), rtol=1e-9,
                                   atol=1e-11)


@pytest.mark.parametrize("how", STRATEGIES[1:], ids=IDS[1:])
def test_double_backward_and_torch_func_are_refused_clearly(how):
    net = mode.MomentumResNet([mlp() for _ in range(3)], 0.8, **how)
    x = x_of()
    with pytest.raises(RuntimeError, match="first-order gradients only.*reversible=False"):
        torch.autograd.grad(net(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="torch.func.*reversible=False"):
        torch.func.grad(lambda z: net(z).sum())(x.detach())


def test_autograd_double_backward_works_without_the_engine():
    net = mode.MomentumResNet([mlp() for _ in range(3)], 0.8, reversible=False)
    x = x_of()
    (g,) = torch.autograd.grad(net(x).pow(2).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    assert h.abs().sum() > 0


def test_no_process_wide_registration_hooks():
    from torch.nn.modules import module as m

    assert not m._global_parameter_registration_hooks
    assert not m._global_module_registration_hooks


def test_conversion_with_overwritten_parameters_keeps_gradients():
    """``.double()`` under overwrite_module_params_on_conversion replaces every parameter."""
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        net = mode.MomentumResNet([nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(3)],
                                  0.8)
        net(torch.randn(2, D)).sum().backward()
        net.double()
        net(torch.randn(2, D, dtype=torch.float64)).sum().backward()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in net.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_exact_mode(dtype):
    net = mode.MomentumResNet([mlp().to(dtype) for _ in range(3)], 0.5, exact=True)
    x = torch.ones(2, D, dtype=dtype)
    with torch.no_grad():
        xN, vN = net(x, return_velocity=True)
        x0, v0 = net.inverse(xN, vN)
    assert torch.equal(x0, x) and torch.equal(v0, torch.zeros_like(x))


def test_autocast_is_replayed_by_the_recomputation(monkeypatch):
    """bf16 autocast at depth 50: reversible float gradients follow autograd's under the same
    autocast; without the replay (the old engine) they are far off."""
    torch.manual_seed(2)
    fs = [nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16)) for _ in range(50)]
    x = torch.randn(8, 16)

    def run(reversible):
        net = mode.MomentumResNet(fs, 0.9, reversible=reversible)
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cpu", torch.bfloat16):
            out = net(xx)
        return torch.autograd.grad(out.float().pow(2).sum(), [xx, *net.parameters()])

    def error(g):
        return max(float((a - b).norm() / b.norm()) for a, b in zip(g, ref))

    ref = run(False)
    replayed = error(run(True))
    import contextlib

    import mode.reversible as engine

    monkeypatch.setattr(engine, "_replay_autocast", lambda state: contextlib.nullcontext())
    not_replayed = error(run(True))
    assert replayed < 1e-2 and not_replayed > 10 * replayed, (replayed, not_replayed)


def test_exact_round_trip_under_autocast_is_bit_exact():
    torch.manual_seed(2)
    fs = [nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16)) for _ in range(50)]
    net = mode.MomentumResNet(fs, 0.9, exact=True)
    x = torch.randn(8, 16)
    with torch.autocast("cpu", torch.bfloat16):
        xN, vN = net(x, return_velocity=True)
        x0, _ = net.inverse(xN, vN)
    fp = FixedPoint(32)
    assert torch.equal(x0, fp.decode(fp.encode(x), x.dtype))


class _Additive(ReversibleStep):
    """A user's own step: ``x1 <- x1 / 2 + F(x2)``, ``x2 <- x2 + x1 + G(x1)``."""

    def __init__(self, broken=False):
        super().__init__()
        self.F = nn.Sequential(nn.Linear(D, D), nn.BatchNorm1d(D), nn.Tanh()).double()
        self.G = nn.Linear(D, D).double()
        self.broken = broken

    def couplings(self):
        phi = self.F
        if self.broken:  # randomness the engine cannot replay (Python's, not torch's)

            def phi(x):
                return self.F(x) * (1 + 1e-3 * random.random())
        return (Coupling(0, alpha=0.5, phi=phi), Coupling(1, shift=1, phi=self.G))


def test_check_reversible_passes_a_good_step_and_fails_a_broken_one():
    x = torch.randn(8, D, dtype=torch.float64)
    report = mode.check_reversible([_Additive() for _ in range(3)], (x, 0.5 * x))
    assert report.ok, report
    assert report.errors["exact round trip"] == 0.0
    broken = mode.check_reversible([_Additive(broken=True) for _ in range(3)], (x, 0.5 * x))
    assert not broken.ok


class _DropoutStep(ReversibleStep):
    """RevNet-like: two couplings that each draw their own dropout mask."""

    def __init__(self):
        super().__init__()
        self.F = nn.Sequential(nn.Linear(D, D), nn.Dropout(0.3)).double()
        self.G = nn.Sequential(nn.Linear(D, D), nn.Dropout(0.3)).double()

    def couplings(self):
        return (Coupling(0, phi=self.F), Coupling(1, phi=self.G))


class _NoSlot(ReversibleStep):
    def couplings(self):
        return (Coupling(2, phi=torch.tanh),)


def test_check_reversible_is_fair_to_dropout_and_strict_on_nan():
    """Its runs drew different dropout masks (a false fail of a correct step); max() dropped
    a NaN gradient (a false pass); a step that cannot run raised instead of being reported."""
    x = torch.randn(8, D, dtype=torch.float64)
    steps = [_DropoutStep() for _ in range(3)]
    state = torch.get_rng_state()
    report = mode.check_reversible(steps, (x, 0.5 * x))
    assert report.ok, report
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was
    with pytest.warns(ReconstructionWarning):  # gamma = 0.01, 200 steps: NaN in float reversal
        nan = mode.check_reversible(
            [mode.MomentumStep(lambda z: 0.01 * torch.log(z + 10), 0.01) for _ in range(200)],
            (x, torch.zeros_like(x)))
    assert not nan.ok and nan.errors["float gradients"] == float("inf")
    broken = mode.check_reversible([_NoSlot()], (x, x))
    assert not broken.ok and "autograd" in broken.failures[0]


def test_saved_memory_helper_sees_the_information_buffer():
    from helpers import saved_bytes

    net = mode.MomentumResNet([mlp() for _ in range(3)], 0.9, exact=True)
    x = x_of(64)
    nbytes, (xN, vN) = saved_bytes(lambda: net(x, return_velocity=True))
    record = mode.reversible.information_buffer(xN, vN)
    assert nbytes >= 2 * 8 * x.numel() + record.buffer.nbytes


def test_in_place_modification_of_the_input_is_refused():
    net = mode.MomentumResNet([mlp() for _ in range(3)], 0.8)
    x = x_of()
    z = x * 1.0
    loss = net(z).sum()
    with torch.no_grad():
        z.add_(1.0)
    with pytest.raises(RuntimeError, match="an input state.*modified in place"):
        loss.backward()


def test_exact_record_is_freed_by_the_backward_and_kept_without_a_graph():
    """The fixed-point outputs and the information buffer live as long as autograd keeps what
    it saved: an inverse before the backward works, after it the error says why; a forward
    under no_grad keeps them for the inverse."""
    import gc
    import weakref

    net = mode.MomentumResNet([mlp() for _ in range(3)], 0.8, exact=True)
    x = x_of()
    xN, vN = net(x, return_velocity=True)
    plan = mode.reversible.information_buffer(xN, vN)
    word = weakref.ref(plan.exact_record()[1].word)
    with torch.no_grad():
        x0, _ = net.inverse(xN, vN)
    torch.testing.assert_close(x0, x.detach(), rtol=0, atol=2.0**-40)
    (xN.sum() + vN.sum()).backward()
    gc.collect()
    assert word() is None  # freed with the saved tensors, although the plan still exists
    with pytest.raises(ValueError, match="freed by its backward"):
        net.inverse(xN, vN)
    with torch.no_grad():
        xN, vN = net(x, return_velocity=True)
    gc.collect()
    torch.testing.assert_close(net.inverse(xN, vN)[0], x.detach(), rtol=0, atol=2.0**-40)


class _ReadsItsTarget(ReversibleStep):
    """phi of slot 0 reads slot 0 itself, through what the coupling before it stashed."""

    def __init__(self):
        super().__init__()
        self.F = nn.Sequential(nn.Linear(D, D), nn.Tanh()).double()
        self.last = None

    def couplings(self):
        def g(o):
            self.last = o.detach()
            return torch.tanh(o)

        def f(o):
            return self.F(o) + 0.3 * torch.sin(self.last)
        return (Coupling(1, phi=g), Coupling(0, phi=f))


class _Changing(ReversibleStep):
    def __init__(self):
        super().__init__()
        self.F, self.G = nn.Linear(D, D).double(), nn.Linear(D, D).double()
        self.calls = 0

    def couplings(self):
        self.calls += 1
        return (Coupling(0, phi=self.F if self.calls % 2 else self.G), Coupling(1, phi=self.F))


def test_check_reversible_runs_two_forwards_and_asks_for_the_couplings_twice():
    """Two false passes: a phi reading its target slot through hidden state passed (its
    gradients are off by 0.88 with two forwards before one backward), and so did couplings()
    that change at every call (the step's own inverse then misses by 1.5). A learned gamma,
    whose couplings make 1 - gamma anew at each call, still passes."""
    x = torch.randn(6, D, dtype=torch.float64)
    hidden = mode.check_reversible([_ReadsItsTarget() for _ in range(2)], (x, 0.5 * x))
    assert not hidden.ok and any("two forwards" in f for f in hidden.failures), hidden
    changing = mode.check_reversible([_Changing()], (x, 0.5 * x))
    assert not changing.ok and "second call" in changing.failures[0]
    gamma = nn.Parameter(torch.tensor(0.8, dtype=torch.float64))
    learned = mode.check_reversible([mode.MomentumStep(mlp(), gamma) for _ in range(3)],
                                    (x, torch.zeros_like(x)))
    assert learned.ok, learned
