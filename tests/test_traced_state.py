"""The traced chain (``mode.traceable``) with module state, tied weights, one tensor in two
places and coefficients that change between calls. Ground truth: the same model with
``reversible=False``, eager, float64. ``aot_eager`` runs AOTAutograd's partitioner, which
decides what the compiled backward saves and what it recomputes."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import Counting, assert_same_grads
from torch import nn

import mode

dynamo = pytest.importorskip("torch._dynamo")

D, DT = 6, torch.float64


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def _x(i=0, n=5):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(i), dtype=DT)


def _grads(model, *xs):
    model.zero_grad()
    sum(model(x).pow(2).sum() for x in xs).backward()
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _assert_close(got, want, tol=1e-11):
    assert_same_grads(got, want, tol)


def _pair(make, **options):
    torch.manual_seed(0)
    ref = make(reversible=False, **options).to(DT)
    model = copy.deepcopy(ref)
    for m in model.modules():
        if isinstance(m, mode.ReversibleNet):
            m.reversible = True
    mode.traceable(model)
    return ref, model


class RunningCenter(nn.Module):
    """Subtracts a running mean that its forward reads, then updates (an EMA normalizer)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.register_buffer("mean", torch.zeros(D))

    def forward(self, x):
        y = torch.tanh(self.lin(x) - self.mean)
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.5).add_(0.5 * y.mean(0))
        return y


def test_a_buffer_read_then_updated_in_training_is_not_traced():
    """AOTAutograd rebuilt the saved copy of such a buffer from its updated value, so the
    traced recomputation read the new mean (gradients off by 1.4). Such a function is refused
    with the reason; without fullgraph the opaque engine gives autograd's gradients and
    buffers."""
    make = lambda **o: mode.MomentumResNet([RunningCenter() for _ in range(3)], 0.9, **o)  # noqa: E731
    ref, model = _pair(make)
    with pytest.raises(Exception, match="holds buffers, which its forward may read and update"):
        torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True)(_x())
    dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    for i in range(2):
        _assert_close(_grads(compiled, _x(i)), _grads(ref, _x(i)))
    _assert_close(list(model.buffers()), list(ref.buffers()))


def test_batchnorm_two_forwards_before_one_backward_under_aot():
    """The graph saved the running statistics themselves, which the second forward updated:
    'modified by an inplace operation'. The recomputation writes them into fresh tensors now
    (a BatchNorm in training never reads them), and nothing of them is saved."""
    def make(**o):
        fs = [nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, D))
              for _ in range(3)]
        return mode.MomentumResNet(fs, 0.9, **o)

    ref, model = _pair(make)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for i in range(2):
        _assert_close(_grads(compiled, _x(i), _x(i + 5)), _grads(ref, _x(i), _x(i + 5)))
    _assert_close(list(model.buffers()), list(ref.buffers()))


def test_a_weight_tied_inside_one_function():
    """``f[2].weight = f[0].weight``: its second name was dropped, so that use read the real
    parameter instead of the VJP's input, and lost its gradient (off by 1.5)."""
    def make(**o):
        fs = []
        for _ in range(3):
            f = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D))
            f[2].weight = f[0].weight
            fs.append(f)
        return mode.MomentumResNet(fs, 0.9, **o)

    ref, model = _pair(make)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for i in range(2):
        _assert_close(_grads(compiled, _x(i)), _grads(ref, _x(i)))


@pytest.mark.parametrize("case", ["midpoint_default_pair", "v0_is_x"])
def test_one_tensor_in_two_places_is_one_graph(case):
    """MidpointNet's default pair is (x, x); dynamo refused the duplicate input of
    autograd.Function.apply under fullgraph."""
    torch.manual_seed(0)
    fs = [nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(3)]
    if case == "midpoint_default_pair":
        ref = mode.MidpointNet(copy.deepcopy(fs), 0.3, reversible=False).to(DT)
        net = mode.MidpointNet(copy.deepcopy(fs), 0.3).to(DT)
        call = lambda m, x: m(x)  # noqa: E731
    else:
        ref = mode.MomentumResNet(copy.deepcopy(fs), 0.9, reversible=False).to(DT)
        net = mode.MomentumResNet(copy.deepcopy(fs), 0.9).to(DT)
        call = lambda m, x: m(x, v0=x)  # noqa: E731
    mode.traceable(net)
    backend = Counting()
    compiled = torch.compile(lambda x: call(net, x), backend=backend, fullgraph=True)
    for i in range(2):
        got, want = [], []
        for m, out in ((compiled, got), (lambda x: call(ref, x), want)):
            x = _x(i).requires_grad_(True)
            m(x).pow(2).sum().backward()
            out.append(x.grad)
        _assert_close(got, want)
    assert backend.graphs == 1


@pytest.mark.parametrize("what", ["gamma", "h"])
def test_a_float_coefficient_changed_between_calls_is_followed_under_fullgraph(what):
    """dynamo makes a changed float symbolic at the recompilation: the identity check of the
    steps' key failed and they were rebuilt inside the trace ('pending mutation'; for h an
    untraceable math.isfinite). The steps follow the assignment now, outside the trace."""
    torch.manual_seed(0)
    if what == "gamma":
        fs = [nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(3)]
        ref = mode.MomentumResNet(fs, 0.9, reversible=False).to(DT)
        new = 0.5
    else:
        fs = [nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(3)]
        ref = mode.MidpointNet(fs, 0.3, reversible=False).to(DT)
        new = 0.2
    net = copy.deepcopy(ref)
    net.reversible = True
    mode.traceable(net)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    for value in (getattr(ref, what), new, new):
        setattr(ref, what, value)
        setattr(net, what, value)
        _assert_close(_grads(compiled, _x()), _grads(ref, _x()))


def test_an_invalid_step_size_is_refused_on_assignment():
    net = mode.HamiltonianNet.dense(D, 2, 0.3)
    with pytest.raises(ValueError):
        net.h = -1.0


@pytest.mark.parametrize("learned", [False, True])
def test_dynamic_shapes_with_a_traceable_network(learned):
    """``dynamic=True``: the in-graph check's message formatted a symbolic float ('Unknown
    format code g'), so a learned gamma could not compile at all."""
    torch.manual_seed(0)
    fs = [nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(3)]
    gamma = nn.Parameter(torch.tensor([0.9], dtype=DT)) if learned else 0.9
    ref = mode.MomentumResNet(fs, gamma, reversible=False).to(DT)
    net = copy.deepcopy(ref)
    net.reversible = True
    mode.traceable(net)
    compiled = torch.compile(net, backend="aot_eager", dynamic=True)
    for n in (5, 7, 3):
        _assert_close(_grads(compiled, _x(n, n)), _grads(ref, _x(n, n)))


def test_the_fullgraph_refusal_says_why_in_its_message():
    """dynamo reads only graph_break(msg=...): the reason sat in the debug context, and the
    message said 'None'."""
    fs = [nn.Sequential(nn.Linear(D, D), nn.Dropout(0.5)) for _ in range(2)]
    net = mode.MomentumResNet(fs, 0.9).to(DT)
    mode.traceable(net)
    with pytest.raises(Exception) as info:
        torch.compile(net, backend="aot_eager", fullgraph=True)(_x())
    assert "Message: mode.traceable: this chain runs through the opaque engine" in str(info.value)
