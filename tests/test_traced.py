"""The reversible float backward traced into a torch.compile graph (``mode.traceable``).

Ground truth is the same model with ``reversible=False`` (plain autograd), run eagerly. Graphs
are counted with a backend that runs them as traced (``Counting``); one test compiles with
inductor. Every test starts from empty dynamo caches.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import Counting
from torch import nn

import mode
import mode.traced
from mode.reversible import ReconstructionWarning

dynamo = pytest.importorskip("torch._dynamo")

D, BATCH, GAMMA = 8, 4, 0.9
DT = torch.float64


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


class Conditioned(nn.Module):
    """``f(x, c) = c * tanh(W x + b)``: a residual function with a tensor argument."""

    def __init__(self, width: int = D):
        super().__init__()
        self.layer = nn.Linear(width, width)

    def forward(self, x, c):
        return c * torch.tanh(self.layer(x))


def _mlp(norm: bool = False, dropout: float = 0.0) -> nn.Module:
    layers = [nn.Linear(D, 2 * D)]
    if norm:
        layers.append(nn.BatchNorm1d(2 * D))
    layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(2 * D, D)]
    return nn.Sequential(*layers)


def _momentum(depth: int, reversible: bool, *, norm=False, dropout=0.0, tied=False, gamma=GAMMA,
              exact=False, device="cpu") -> nn.Module:
    torch.manual_seed(0)
    fs = [_mlp(norm, dropout)] * depth if tied else [_mlp(norm, dropout) for _ in range(depth)]
    net = mode.MomentumResNet(fs, gamma, reversible=reversible, exact=exact)
    model = nn.Sequential(nn.Linear(D, D), net, nn.Linear(D, 1)).to(device, DT)
    mode.traceable(model)
    return model


def _x(i: int = 0, device="cpu") -> torch.Tensor:
    return torch.randn(BATCH, D, generator=torch.Generator().manual_seed(i), dtype=DT).to(device)


def _grads(model, x) -> list[torch.Tensor]:
    model.zero_grad()
    model(x).pow(2).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def _close(got, want, tol=1e-12) -> bool:
    return all(torch.allclose(a, b, rtol=tol, atol=tol) for a, b in zip(got, want))


def test_fullgraph_reversible_backward_is_autograd_and_never_recompiles(device):
    """One graph for forward and reversible backward (fullgraph=True), float64 gradients equal
    autograd's to round-off at depth 24, and iterations 2 and 3 add no graph."""
    ref, model = _momentum(24, False, device=device), _momentum(24, True, device=device)
    backend = Counting()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for i in range(3):
        x = _x(i, device)
        assert _close(_grads(compiled, x), _grads(ref, x), 1e-10)
    assert backend.graphs == 1


def test_traced_forward_saves_one_state_whatever_the_depth():
    """The compiled graph saves the output pair, not the activations: what it saves besides
    the parameters does not grow with depth (autograd's does)."""
    def saved(depth, reversible):
        model = _momentum(depth, reversible)
        compiled = torch.compile(model, backend=Counting(), fullgraph=reversible)
        compiled(_x()).sum().backward()  # compile first
        params = {p.data_ptr() for p in model.parameters()}
        total = 0

        def pack(t):
            nonlocal total
            if t.data_ptr() not in params:
                total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = compiled(_x())
        out.sum().backward()
        return total

    assert saved(4, True) == saved(16, True) > 0
    assert saved(16, False) > saved(4, False) > saved(4, True)


def test_batchnorm_running_statistics_count_each_batch_once():
    """BatchNorm in training mode inside f: gradients are autograd's and the running
    statistics end as autograd leaves them (the recomputation runs on copies)."""
    ref, model = _momentum(6, False, norm=True), _momentum(6, True, norm=True)
    compiled = torch.compile(model, backend=Counting(), fullgraph=True)
    for i in range(2):
        x = _x(i)
        assert _close(_grads(compiled, x), _grads(ref, x))
    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_changing_batch_size_recompiles_once_then_never():
    """Batches of changing size with BatchNorm in f: the first new size recompiles the one
    graph with a symbolic batch dimension (dynamo's automatic dynamic shapes), later sizes add
    none; gradients and running statistics stay autograd's."""
    ref, model = _momentum(6, False, norm=True), _momentum(6, True, norm=True)
    backend = Counting()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    graphs = []
    for b in [BATCH, BATCH, 6, 8, 3, 5, 16]:
        x = torch.randn(b, D, generator=torch.Generator().manual_seed(b), dtype=DT)
        assert _close(_grads(compiled, x), _grads(ref, x))
        graphs.append(backend.graphs)
    assert graphs == [1, 1, 2, 2, 2, 2, 2]
    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_tied_functions_and_two_forwards_before_one_backward():
    """One function at every step gets the sum of its steps' gradients; two forwards before
    one backward keep separate saved states."""
    ref, model = _momentum(5, False, tied=True), _momentum(5, True, tied=True)
    compiled = torch.compile(model, backend=Counting(), fullgraph=True)
    for m in (ref, compiled):
        (m(_x(1)).pow(2).sum() + m(_x(2)).pow(3).sum()).backward()
    assert _close([p.grad for p in model.parameters()], [p.grad for p in ref.parameters()])


@pytest.mark.parametrize("arch", ["revnet", "hamiltonian", "midpoint", "leapfrog", "mrevnet"])
def test_every_architecture_with_a_tensor_argument(arch):
    """The other architectures (methods of the step as residual functions, alpha = -1 with a
    shift, swaps) with a conditioning argument ``c`` that receives a gradient."""
    def build(reversible):
        torch.manual_seed(0)
        fs = [Conditioned() for _ in range(4)]
        gs = [Conditioned() for _ in range(4)]
        opts = dict(reversible=reversible)
        net = {"revnet": lambda: mode.RevNet(fs, gs, **opts),
               "hamiltonian": lambda: mode.HamiltonianNet(fs, gs, 0.3, **opts),
               "midpoint": lambda: mode.MidpointNet(fs, 0.3, **opts),
               "leapfrog": lambda: mode.LeapfrogNet(fs, 0.3, **opts),
               "mrevnet": lambda: mode.MRevNet(fs, 0.7, **opts)}[arch]().to(DT)
        mode.traceable(net)
        return net

    def run(net, x, c):
        if arch == "revnet":
            return net(torch.cat([x, x.flip(0)], dim=1), c)
        if arch == "hamiltonian":
            return torch.cat(net(x, c, z0=x.flip(0), return_pair=True))
        if arch in ("midpoint", "leapfrog"):
            return torch.cat(net(x, c, y_prev=x.flip(0), return_pair=True))
        return torch.cat(net(x, c, v0=x.flip(0), return_velocity=True))

    grads = []
    for reversible in (False, True):
        net = build(reversible)
        backend = Counting()
        if reversible:
            net = torch.compile(net, backend=backend, fullgraph=True)
        x = _x().requires_grad_(True)
        c = torch.full((BATCH, D), 0.7, dtype=DT, requires_grad=True)
        out = run(net, x, c)
        grads.append(torch.autograd.grad(out.pow(2).sum(), [x, c, *net.parameters()]))
        if reversible:
            assert backend.graphs == 1
    assert _close(grads[1], grads[0])


@pytest.mark.parametrize("arch", [mode.MomentumResNet, mode.MRevNet])
def test_a_learned_gamma_is_traced_and_checked_in_the_graph(arch, device):
    """A learned gamma (an nn.Parameter, the couplings' tensor alpha, and in a Momentum ResNet
    also its scale 1 - gamma): one graph over three iterations for the reversible model and for
    the same model with reversible=False, whose gradients, gamma's included, it gives; the
    range check and the bound on float reversal's error run in the graph and raise there (on
    CUDA too: the flag is checked on the CPU, so the process's CUDA context survives)."""
    def build(reversible):
        torch.manual_seed(0)
        fs = [_mlp(norm=True) for _ in range(12)]
        net = arch(fs, 0.8, reversible=reversible)
        net.gamma = nn.Parameter(torch.tensor(0.8))  # assigned: the steps follow at once
        model = nn.Sequential(nn.Linear(D, D), net, nn.Linear(D, 1)).to(device, DT)
        mode.traceable(model)
        return model, Counting()

    (ref, ref_backend), (model, backend) = build(False), build(True)
    ref_compiled = torch.compile(ref, backend=ref_backend, fullgraph=True)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for i in range(3):
        x = _x(i, device)
        got, want = _grads(compiled, x), _grads(ref_compiled, x)
        assert _close(got, want, 1e-10) and model[1].gamma.grad.abs() > 1e-3
    assert backend.graphs == ref_backend.graphs == 1
    gamma = model[1].gamma
    with torch.no_grad():
        gamma.fill_(1.5)
    with pytest.raises(RuntimeError, match=r"gamma must lie in"):
        compiled(_x(0, device))
    with torch.no_grad():  # 20^12 eps(float64) = 0.9 > AMPLIFICATION_WARN
        gamma.fill_(0.05)
    with pytest.raises(RuntimeError, match="amplifies torch.float64 rounding"):
        compiled(_x(0, device))
    with torch.no_grad():  # 0.1^-12 eps(float64) = 2e-4: traced, no recompilation
        gamma.fill_(0.1)
    compiled(_x(0, device)).sum().backward()
    assert backend.graphs == 1


@pytest.mark.parametrize("case, match", [
    ("exact", "exact mode"),
    ("dropout", "Dropout in training mode"),
    ("amplified", "amplifies rounding"),
])
def test_what_cannot_be_traced_is_named_and_still_exact_without_fullgraph(case, match):
    """Exact mode, Dropout in training and a chain whose float reversal the engine warns about
    keep the opaque engine: fullgraph=True raises with the reason; without it the gradients are
    those of the same compiled model with reversible=False (dropout: the same random numbers,
    with the residual functions run eagerly inside the engine as they are inside autograd's
    graph; compiled apart they draw in another order), and the amplified chain gets the
    engine's warning."""
    opts = {"exact": dict(exact=True), "dropout": dict(dropout=0.5),
            "amplified": dict(gamma=0.5)}[case]
    depth = 48 if case == "amplified" else 4  # 2^48 eps(float64) = 0.06 > AMPLIFICATION_WARN
    model = _momentum(depth, True, **opts)
    with pytest.raises(Exception, match=match):
        torch.compile(model, backend=Counting(), fullgraph=True)(_x())
    dynamo.reset()
    ref = _momentum(depth, False, **{k: v for k, v in opts.items() if k != "exact"})
    model = _momentum(depth, True, **opts)
    if case == "dropout":
        mode.compile_functions(model, False)
    if case == "amplified":
        mode.compile_functions(model, False)
        with pytest.warns(ReconstructionWarning, match="exact=True"):
            _grads(torch.compile(model, backend=Counting()), _x())
        return
    got, want = [], []
    for m, out in ((model, got), (ref, want)):
        torch.manual_seed(5)
        out.extend(_grads(torch.compile(m, backend=Counting()), _x()))
    assert _close(got, want, 1e-9 if case == "exact" else 1e-12)


def test_a_module_backward_hook_is_named_and_still_autograd_without_fullgraph():
    """A full backward hook on a residual function cannot run inside torch.func.vjp: the chain
    keeps the opaque engine (fullgraph=True raises with the reason), which runs that function
    eagerly: autograd's gradients, and the hook fires as under the eager engine."""
    def hooked(reversible):
        model = _momentum(4, reversible)
        calls = []
        model[1].functions[1].register_full_backward_hook(lambda m, gi, go: calls.append(1))
        return model, calls

    with pytest.raises(Exception, match="module backward hook"):
        torch.compile(hooked(True)[0], backend=Counting(), fullgraph=True)(_x())
    dynamo.reset()
    (ref, ref_calls), (model, calls) = hooked(False), hooked(True)
    assert _close(_grads(torch.compile(model, backend=Counting()), _x()), _grads(ref, _x()))
    assert calls == ref_calls == [1]
    dynamo.reset()
    seen = []  # a process-wide backward hook: dynamo itself refuses fullgraph; without it
    handle = nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: seen.append(m))
    try:  # the chain keeps the opaque engine (traced, it would fail inside torch.func.vjp)
        model = _momentum(4, True)
        got = _grads(torch.compile(model, backend=Counting()), _x())
        assert _close(got, _grads(_momentum(4, False), _x()))
        assert any(m is f for m in seen for f in model[1].functions)
    finally:
        handle.remove()


class Checkpointed(nn.Module):
    """``f(x) = tanh(W x + b)`` under non-reentrant ``torch.utils.checkpoint``."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(D, D)

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(lambda y: torch.tanh(self.layer(y)), x,
                                                 use_reentrant=False)


def test_checkpoint_inside_f_is_refused_with_the_reason():
    """torch.utils.checkpoint inside a residual function installs saved-tensor hooks, which
    torch.func.vjp in the traced backward cannot run: mode names the cause and the way out
    (torch's own message names neither); without traceable the opaque engine runs it and gives
    autograd's gradients."""
    def build(reversible, trace):
        torch.manual_seed(0)
        net = mode.MomentumResNet([Checkpointed() for _ in range(3)], GAMMA,
                                  reversible=reversible).to(DT)
        mode.traceable(net, trace)
        return net

    with pytest.raises(RuntimeError, match="installs saved-tensor hooks"):
        torch.compile(build(True, True), backend=Counting())(_x()).sum().backward()
    dynamo.reset()
    model = build(True, False)
    assert _close(_grads(torch.compile(model, backend=Counting()), _x()),
                  _grads(build(False, False), _x()))


_NORMS = {
    "orthogonal": nn.utils.parametrizations.orthogonal,
    "weight_norm": nn.utils.parametrizations.weight_norm,
    "spectral_norm": nn.utils.parametrizations.spectral_norm,
    "hooked_spectral_norm": nn.utils.spectral_norm,  # the older API: a forward pre-hook
    "hooked_weight_norm": nn.utils.weight_norm,  # (deprecated in torch)
}


def _normed(depth: int, reversible: bool, kind: str) -> nn.Module:
    """``_momentum`` with the first Linear of every residual function under ``_NORMS[kind]``
    (spectral norm draws its power-iteration vectors: seeded, the same for every model)."""
    model = _momentum(depth, reversible)
    torch.manual_seed(1)
    for f in model[1].functions:
        _NORMS[kind](f[0])
    return model


@pytest.mark.parametrize("kind", ["orthogonal", "weight_norm", "spectral_norm"])
def test_parametrized_weights_are_traced(kind):
    """Parametrizations recompute the weight from its original at each use: traced in one
    graph, gradients on the originals as autograd gives them, for three iterations (spectral
    norm in eval mode: its vectors are read, not updated)."""
    ref, model = _normed(4, False, kind), _normed(4, True, kind)
    if kind == "spectral_norm":
        ref.eval(), model.eval()
    backend = Counting()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for i in range(3):
        assert _close(_grads(compiled, _x(i)), _grads(ref, _x(i)))
    assert backend.graphs == 1


@pytest.mark.filterwarnings("ignore:.*weight_norm is deprecated")
@pytest.mark.parametrize("kind", ["spectral_norm", "hooked_spectral_norm", "hooked_weight_norm"])
def test_spectral_norm_in_training_is_named_and_still_autograd_without_fullgraph(kind):
    """Spectral norm's power iteration assigns its vectors (and the older hook-based API of
    spectral and weight norm the weight) as attributes, a side effect dynamo refuses inside
    the chain's autograd.Function: with
    fullgraph=True mode's reason is raised; without it the opaque engine gives autograd's
    gradients, and the vectors end as autograd leaves them (one power iteration per forward,
    none in the backward)."""
    with pytest.raises(Exception, match="assigns module attributes"):
        torch.compile(_normed(4, True, kind), backend=Counting(), fullgraph=True)(_x())
    dynamo.reset()
    ref, model = _normed(4, False, kind), _normed(4, True, kind)
    compiled = torch.compile(model, backend=Counting())
    for i in range(2):
        assert _close(_grads(compiled, _x(i)), _grads(ref, _x(i)))
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), k


def test_forward_hooks_run_in_the_traced_backward_as_in_the_engine():
    """A forward hook that changes f's output is part of f: traced in one graph, with
    autograd's gradients. A hook that counts calls (a Python side effect dynamo refuses inside
    the chain, so the chain runs eagerly) fires twice per forward and backward, as in the
    eager reversible engine: once in the forward and once where the backward evaluates f, not
    a third time for the reconstruction (the VJP's evaluation gives it)."""
    def doubled(reversible):
        model = _momentum(4, reversible)
        for f in model[1].functions:
            f.register_forward_hook(lambda m, i, out: 2 * out)
        return model

    backend = Counting()
    compiled = torch.compile(doubled(True), backend=backend, fullgraph=True)
    for i in range(2):
        assert _close(_grads(compiled, _x(i)), _grads(doubled(False), _x(i)))
    assert backend.graphs == 1

    def calls(model, compile):
        count = []
        model[1].functions[0].register_forward_hook(lambda *a: count.append(1))
        run = torch.compile(model, backend=Counting()) if compile else model
        per = []
        for i in range(2):
            before = len(count)
            _grads(run, _x(i))
            per.append(len(count) - before)
        return per

    dynamo.reset()
    assert calls(_momentum(4, False), False) == [1, 1]
    assert calls(_momentum(4, True), False) == [2, 2]
    dynamo.reset()
    assert calls(_momentum(4, True), True) == [2, 2]


def test_eval_mode_dropout_is_traced():
    """Dropout draws nothing in eval mode: the chain is traced (one graph)."""
    ref, model = _momentum(4, False, dropout=0.5).eval(), _momentum(4, True, dropout=0.5).eval()
    backend = Counting()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    assert _close(_grads(compiled, _x()), _grads(ref, _x()))
    assert backend.graphs == 1


@pytest.mark.parametrize("learned", [False, True])
def test_autocast_is_replayed_in_the_traced_backward(learned):
    """Under bf16 autocast the traced backward recomputes f under the same autocast: its
    gradients are the eager reversible engine's (which replays autocast) and within float
    reversal's accuracy of autograd's under the same autocast (depth 50); without the replay
    they are not (the check can fail: the replay is switched off and the error measured, at
    depth 8). With a learned gamma too (its gradient included)."""
    gamma = nn.Parameter(torch.tensor(GAMMA)) if learned else GAMMA
    torch.manual_seed(2)
    fs = [nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16)) for _ in range(50)]
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))

    def grads(net):
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cpu", torch.bfloat16):
            out = net(xx)
        return torch.autograd.grad(out.float().pow(2).sum(), [xx, *net.parameters()])

    def error(got, want):
        return max(float((a - b).norm() / b.norm()) for a, b in zip(got, want))

    want = grads(mode.MomentumResNet(fs, gamma, reversible=False))
    eager = grads(mode.MomentumResNet(fs, gamma))
    net = mode.MomentumResNet(fs, gamma)
    mode.traceable(net)
    traced = grads(torch.compile(net, backend=Counting(), fullgraph=True))
    assert all(torch.equal(a, b) for a, b in zip(traced, eager))
    assert error(traced, want) < 2e-2
    dynamo.reset()
    fs = fs[:8]
    want = grads(mode.MomentumResNet(fs, gamma, reversible=False))
    net = mode.MomentumResNet(fs, gamma)
    mode.traceable(net)
    traced = grads(torch.compile(net, backend=Counting(), fullgraph=True))
    dynamo.reset()
    replay = mode.traced._under
    try:
        mode.traced._under = lambda state, fn, *a: fn(*a)
        unreplayed = grads(torch.compile(net, backend=Counting(), fullgraph=True))
    finally:
        mode.traced._under = replay
    assert error(unreplayed, want) > 10 * error(traced, want)


def test_no_grad_and_outside_compile():
    """Under no_grad the traced chain is the forward alone; outside torch.compile traceable
    changes nothing (the eager engine runs)."""
    ref, model = _momentum(4, False), _momentum(4, True)
    compiled = torch.compile(model, backend=Counting(), fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(_x()), ref(_x()), rtol=1e-13, atol=1e-13)
    assert _close(_grads(model, _x()), _grads(ref, _x()))


def test_a_deep_copy_keeps_its_steps_and_traces():
    """``copy.deepcopy`` maps the steps' references to the copied functions: the copy does not
    rebuild its steps at its first call (inside the trace, where dynamo refuses new modules)."""
    ref, model = _momentum(4, False), copy.deepcopy(_momentum(4, True))
    net = model[1]
    assert all(s.function is f for s, f in zip(net._steps, net.functions))
    backend = Counting()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    assert _close(_grads(compiled, _x()), _grads(ref, _x()))
    assert backend.graphs == 1


def test_traceable_validates_and_counts():
    model = _momentum(3, True)
    assert mode.traceable(model, False) == 1 and not model[1].traceable
    with pytest.raises(TypeError, match="enabled must be a bool"):
        mode.traceable(model, "yes")


@pytest.mark.slow
def test_inductor_traced_backward_matches_autograd():
    """Inductor's C++ kernels for the whole forward and reversible backward (float32): the
    gradients equal autograd's to float32 round-off, one graph."""
    torch.manual_seed(0)
    fs = [nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(4)]
    ref = nn.Sequential(mode.MomentumResNet(fs, GAMMA, reversible=False), nn.Linear(D, 1))
    torch.manual_seed(0)
    fs = [nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(4)]
    model = nn.Sequential(mode.MomentumResNet(fs, GAMMA), nn.Linear(D, 1))
    mode.traceable(model)
    compiled = torch.compile(model, fullgraph=True)
    x = _x().float()
    assert _close(_grads(compiled, x), _grads(ref, x), 1e-5)
