"""The continuous model's gradient strategies against autograd under the PyTorch features users
combine them with (DESIGN.md section 5), as tests/test_faithfulness.py does for the networks.

``mode.MomentumNeuralODE(..., method="momentum")`` with ``adjoint`` False (autograd through the
grid: the ground truth), True (torchdiffeq's adjoint, continuous: compared with a tolerance
that its own discretization error allows) and "reversible" (the engine on the same grid, float64
fixed point: compared at round-off)."""

import copy

import pytest
import torch
from torch import nn

import mode

D = 4
T = torch.linspace(0, 1, 3, dtype=torch.float64)
ADJOINTS = [False, True, "reversible"]
# adjoint=True solves a continuous adjoint ODE: its gradients differ from the grid's by the
# solver's error, not by round-off.
TOL = {False: dict(rtol=1e-12, atol=1e-14), True: dict(rtol=2e-3, atol=1e-5),
       "reversible": dict(rtol=1e-9, atol=1e-11)}


class Field(nn.Module):
    def __init__(self, norm: str | None = None):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.norm = nn.InstanceNorm1d(1, track_running_stats=True) if norm else nn.Identity()
        self.double()

    def forward(self, t, x):
        y = self.lin(x)
        if not isinstance(self.norm, nn.Identity):
            y = self.norm(y.unsqueeze(1)).squeeze(1)
        return torch.tanh(y) * (1 + t)


def net_of(field, adjoint, eps=0.5, **kw):
    return mode.MomentumNeuralODE(field, eps, method="momentum", options={"step_size": 0.05},
                                  adjoint=adjoint, t=T, **kw)


def x_of(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64, requires_grad=True)


def assert_lists_close(a, b, tol):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **tol)


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_two_forwards_then_one_backward_equal_autograd(adjoint):
    torch.manual_seed(0)
    field = Field()
    net, ref = net_of(field, adjoint), net_of(field, False)
    xs = [x_of(1), x_of(2)]
    got = torch.autograd.grad(sum(net(x).pow(2).sum() for x in xs), [*xs, *field.parameters()])
    want = torch.autograd.grad(sum(ref(x).pow(2).sum() for x in xs), [*xs, *field.parameters()])
    assert_lists_close(got, want, TOL[adjoint])


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_eps_changed_between_forward_and_backward(adjoint):
    torch.manual_seed(0)
    field = Field()
    net = net_of(field, adjoint, eps=0.5)
    assert net.eps == 0.5
    x = x_of()
    out = net(x)
    net._eps = 2.0  # a later configuration must not leak into this forward's backward
    got = torch.autograd.grad(out.pow(2).sum(), [x, *field.parameters()])
    ref = net_of(field, False, eps=0.5)
    want = torch.autograd.grad(ref(x).pow(2).sum(), [x, *field.parameters()])
    assert_lists_close(got, want, TOL[adjoint])


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_parameter_hook_fires_once_on_the_total_gradient(adjoint):
    torch.manual_seed(0)
    field = Field()
    x = x_of()
    (expected,) = torch.autograd.grad(net_of(field, False)(x).pow(2).sum(), [field.lin.weight])
    calls = []
    handle = field.lin.weight.register_hook(lambda g: (calls.append(1), 2 * g)[1])
    field.lin.weight.grad = None
    net_of(field, adjoint)(x).pow(2).sum().backward()
    handle.remove()
    assert len(calls) == 1
    torch.testing.assert_close(field.lin.weight.grad, 2 * expected, **TOL[adjoint])


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_functional_call_fast_weights_after_an_earlier_backward(adjoint):
    torch.manual_seed(1)
    field = Field()
    net, ref = net_of(field, adjoint), net_of(copy.deepcopy(field), False)
    x = x_of()
    net(x).sum().backward()  # an earlier step, as in a meta-learning loop
    out = {}
    for name, model in (("net", net), ("ref", ref)):
        fast = {n: p * 1.1 for n, p in model.named_parameters()}
        y = torch.func.functional_call(model, fast, (x,))
        out[name] = torch.autograd.grad(y.pow(2).sum(), [x, *model.parameters()],
                                        allow_unused=True)
    for a, b in zip(out["net"], out["ref"]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **TOL[adjoint])


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_in_place_modification_of_a_parameter_is_refused(adjoint):
    field = Field()
    loss = net_of(field, adjoint)(x_of()).pow(2).sum()
    with torch.no_grad():
        field.lin.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation|modified in place"):
        loss.backward()


@pytest.mark.parametrize("adjoint", [False, "reversible"])
def test_instance_norm_running_stats_end_as_under_autograd(adjoint):
    """Running statistics advance once per evaluation of the field, as under autograd (the
    reversible backward replays each step's recorded statistics instead of updating them)."""
    torch.manual_seed(2)
    field = Field(norm="instance").train()
    runs = []
    for a in (False, adjoint):
        f = copy.deepcopy(field)
        x = x_of()
        g = torch.autograd.grad(net_of(f, a)(x).pow(2).sum(), [x, *f.parameters()])
        runs.append((g, [b.clone() for b in f.buffers()]))
    assert_lists_close(runs[1][0], runs[0][0], TOL[adjoint])
    assert_lists_close(runs[1][1], runs[0][1], TOL[adjoint])


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_inference_mode_and_batch_of_size_zero(adjoint):
    field = Field()
    x = x_of().detach()
    with torch.inference_mode():
        out = net_of(field, adjoint)(x)
    with torch.no_grad():
        torch.testing.assert_close(out, net_of(field, False)(x), **TOL["reversible"])
    empty = torch.zeros(0, D, dtype=torch.float64, requires_grad=True)
    net_of(field, adjoint)(empty).sum().backward()
    assert empty.grad.shape == (0, D)


def test_double_backward_of_the_reversible_adjoint_is_refused_clearly():
    x = x_of()
    with pytest.raises(RuntimeError, match="first-order gradients only.*reversible=False"):
        torch.autograd.grad(net_of(Field(), "reversible")(x).pow(2).sum(), x, create_graph=True)
