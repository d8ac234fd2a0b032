"""torch.compile around and inside the reversible engine.

Graphs are counted with a backend that counts its calls (each call is one new graph: a first
compilation or a recompilation); it runs the graph as traced (eager), so gradients must equal
eager's bit for bit. One test compiles with inductor (C++ code generation, the slow part on 2
cores) on a tiny model; the rest use the counting backend.
"""

from __future__ import annotations

import pytest
import torch
from helpers import Counting
from torch import nn

import mode

D, DEPTH, BATCH = 8, 6, 4
MODES = {"autograd": dict(reversible=False), "float": dict(reversible=True),
         "exact": dict(exact=True)}

dynamo = pytest.importorskip("torch._dynamo")

#: Graphs of the compiled residual functions of one structure, whatever the depth (dynamo
#: guards on grad mode and on the input's requires_grad): float mode's forward has two, for the
#: first function (its input requires grad) and the later ones; exact mode's one (decoded
#: inputs); the backward's recomputation one.
FUNCTION_GRAPHS = {"float": 3, "exact": 2}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test starts from empty dynamo caches and leaves none behind."""
    dynamo.reset()
    mode.reversible._compiled_calls.clear()
    yield
    dynamo.reset()
    mode.reversible._compiled_calls.clear()


def _model(how: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    fs = [nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(DEPTH)]
    return nn.Sequential(nn.Linear(D, D), mode.MomentumResNet(fs, 0.9, **MODES[how]),
                         nn.Linear(D, 1))


def _x(i: int = 0) -> torch.Tensor:
    return torch.randn(BATCH, D, generator=torch.Generator().manual_seed(i))


def _step(model, x) -> list[torch.Tensor]:
    model.zero_grad()
    model(x).pow(2).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def _eager(how: str, xs) -> list[list[torch.Tensor]]:
    model = _model(how)
    return [_step(model, x) for x in xs]


@pytest.mark.parametrize("how", list(MODES))
def test_compiled_model_gives_eager_gradients_without_recompiling(how):
    """``torch.compile(model)`` of a model holding a MomentumResNet: the residual functions run
    compiled inside the engine (forward and recomputation), gradients are eager's exactly, and
    iterations 2 and 3 (new inputs) add no graph."""
    xs = [_x(i) for i in range(3)]
    want = _eager(how, xs)
    model = _model(how)
    backend = Counting()
    mode.compile_functions(model, backend=backend)
    compiled = torch.compile(model, backend=backend)
    graphs = []
    for x, w in zip(xs, want):
        got = _step(compiled, x)
        assert all(torch.equal(a, b) for a, b in zip(got, w))
        graphs.append(backend.graphs)
    assert graphs[0] >= 1 and graphs[1] == graphs[0] and graphs[2] == graphs[0], graphs
    if how != "autograd":  # the residual functions' own graphs, not one per function
        inner = Counting()
        model = _model(how)
        mode.compile_functions(model, backend=inner)
        _step(model, xs[0])
        assert inner.graphs == FUNCTION_GRAPHS[how]
        _step(model, xs[1])
        assert inner.graphs == FUNCTION_GRAPHS[how]


@pytest.mark.parametrize("how", ["float", "exact"])
def test_a_changing_batch_size_recompiles_once_then_never(how):
    """Batches of changing size (an epoch's last batch is smaller): the first new size
    recompiles each graph once with a symbolic batch dimension (dynamo's automatic dynamic
    shapes), later sizes add no graph, and the gradients stay eager's bit for bit."""
    sizes = [BATCH, BATCH, 6, 8, 3, 5, 16]
    xs = [torch.randn(b, D, generator=torch.Generator().manual_seed(b)) for b in sizes]
    want = _eager(how, xs)
    model = _model(how)
    outer, inner = Counting(), Counting()
    mode.compile_functions(model, backend=inner)
    compiled = torch.compile(model, backend=outer)
    graphs = []
    for x, w in zip(xs, want):
        assert all(torch.equal(a, b) for a, b in zip(_step(compiled, x), w))
        graphs.append((outer.graphs, inner.graphs))
    assert graphs[1] == graphs[0] and inner.graphs <= 2 * FUNCTION_GRAPHS[how], graphs
    assert graphs[2:] == [graphs[2]] * (len(sizes) - 2), graphs


@pytest.mark.parametrize("how", ["float", "exact"])
def test_hooked_functions_run_eagerly_inside_the_compiled_engine(how):
    """Functions of one structure share compiled graphs and dynamo does not guard on module
    hooks: a function with hooks runs eagerly inside the engine (before, a forward hook that
    doubles f's output was skipped in the recomputation: gradients off by 0.3, and a full
    backward hook never fired). Gradients and hook calls are the eager engine's, bit for bit,
    while the other functions still run compiled; a process-wide module hook keeps every
    function eager."""
    def run(compiled: bool, inner=None):
        model = _model(how)
        fs = model[1].functions
        calls = []
        fs[1].register_forward_hook(lambda m, i, out: 2 * out)
        fs[1].register_full_backward_hook(lambda m, gi, go: calls.append("backward"))
        fs[2][0].register_forward_pre_hook(lambda m, i: calls.append("pre"))
        if compiled:
            mode.compile_functions(model, backend=inner)
            model = torch.compile(model, backend=Counting())
        return _step(model, _x()), calls

    want, want_calls = run(False)
    inner = Counting()
    got, calls = run(True, inner)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert calls == want_calls and "backward" in calls and "pre" in calls
    assert inner.graphs == FUNCTION_GRAPHS[how]  # the unhooked functions, compiled
    dynamo.reset()
    handle = nn.modules.module.register_module_forward_pre_hook(lambda m, i: None)
    try:
        inner = Counting()
        model = _model(how)
        mode.compile_functions(model, backend=inner)
        assert all(torch.equal(a, b) for a, b in zip(_step(model, _x()), _eager(how, [_x()])[0]))
        assert inner.graphs == 0
    finally:
        handle.remove()


def test_functions_share_graphs_and_can_be_switched_off():
    """One graph per grad mode for all functions of one structure (not one per function);
    ``compile_functions(model, False)`` compiles nothing, even inside a compiled model."""
    model = _model("float")
    backend = Counting()
    assert mode.compile_functions(model, backend=backend) == 1
    _step(model, _x())
    assert backend.graphs == FUNCTION_GRAPHS["float"] < DEPTH
    dynamo.reset()
    mode.reversible._compiled_calls.clear()
    mode.compile_functions(model, False)
    outer = Counting()
    _step(torch.compile(model, backend=outer), _x())
    assert backend.graphs == FUNCTION_GRAPHS["float"]  # none added
    assert 1 <= outer.graphs <= 2  # the model's own, around the engine
    with pytest.raises(TypeError, match="enabled must be a bool"):
        mode.compile_functions(model, "yes")


def test_inverse_runs_the_compiled_functions_exactly():
    model = _model("exact")
    net = model[1]
    backend = Counting()
    mode.compile_functions(model, backend=backend)
    x = _x()
    with torch.no_grad():
        xN, vN = net(x, return_velocity=True)
        x0, v0 = net.inverse(xN, vN)
    fp = mode.exact.FixedPoint(32)
    assert torch.equal(x0, fp.decode(fp.encode(x), x.dtype)) and not v0.any()
    # no grad: one graph for the forward, one for the inverse (which installs the forward's
    # parameters detached: plain tensors, not nn.Parameters), not one per function
    assert backend.graphs == 2


@pytest.mark.parametrize("how", ["float", "exact"])
def test_fullgraph_is_refused_with_the_reason(how):
    model = _model(how)
    with pytest.raises(Exception, match="reversible engine is opaque to torch.compile"):
        torch.compile(model, backend=Counting(), fullgraph=True)(_x())


def test_fullgraph_works_without_the_reversible_engine():
    xs = [_x(i) for i in range(2)]
    want = _eager("autograd", xs)
    backend = Counting()
    compiled = torch.compile(_model("autograd"), backend=backend, fullgraph=True)
    for x, w in zip(xs, want):
        assert all(torch.equal(a, b) for a, b in zip(_step(compiled, x), w))
    assert backend.graphs == 1


def test_inductor_compiled_reversible_model_matches_eager():
    """Inductor (C++ kernels on the CPU) around and inside the engine, float and exact mode:
    gradients equal eager's to float32 round-off (fused kernels round differently); in exact
    mode the reconstruction is verified bit-exact by the engine (it raises otherwise)."""
    x = _x()
    for how in ("float", "exact"):
        want = _eager(how, [x])[0]
        model = _model(how)
        if how == "exact":  # on request (float mode: by default under torch.compile)
            mode.compile_functions(model)  # inductor, torch.compile's default
        got = _step(torch.compile(model), x)
        assert list(mode.reversible._compiled_calls) == [()]  # the functions ran compiled
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_exact_mode_compiles_functions_on_request_only():
    """Under torch.compile, exact mode leaves the residual functions eager unless asked (a
    compiled forward and recomputation may round differently, which exact mode refuses)."""
    model = _model("exact")
    _step(torch.compile(model, backend=Counting()), _x())
    assert not mode.reversible._compiled_calls
