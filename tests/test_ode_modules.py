"""NeuralODE and MomentumNeuralODE: same results as odeint, learnable eps, NFE counters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mode.networks.ode import MomentumNeuralODE, NeuralODE
from mode.solve import odeint


class Field(nn.Module):
    def __init__(self, d: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = nn.Linear(d, d).double()
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(d, d, generator=g, dtype=torch.float64))
            self.lin.bias.copy_(torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self, t, x):
        return torch.tanh(self.lin(x)) * (1 + t)


def _x0(batch: int = 4, d: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, d, generator=g, dtype=torch.float64)


def test_neural_ode_is_odeint_with_eps_zero():
    field = Field()
    x0 = _x0()
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    ref = odeint(field, x0, t, eps=0.0, method="rk4", options={"step_size": 0.05})
    node = NeuralODE(field, t=t, method="rk4", options={"step_size": 0.05})
    torch.testing.assert_close(node(x0), ref[-1], rtol=0, atol=0)
    node_traj = NeuralODE(field, t=t, method="rk4", options={"step_size": 0.05}, trajectory=True)
    torch.testing.assert_close(node_traj(x0), ref, rtol=0, atol=0)
    assert {n for n, _ in node.named_parameters()} == {"field.func.lin.weight",
                                                       "field.func.lin.bias"}


def test_momentum_neural_ode_is_odeint_and_uses_init_velocity():
    field = Field()
    x0 = _x0()
    phi = nn.Linear(3, 3).double()
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    model = MomentumNeuralODE(field, 0.2, init_velocity=phi, method="momentum",
                              options={"step_size": 0.05})
    x1, u1 = model(x0, return_velocity=True)
    ref_x, ref_u = odeint(field, x0, t, eps=0.2, u0=phi(x0), method="momentum",
                          options={"step_size": 0.05}, return_velocity=True)
    torch.testing.assert_close(x1, ref_x[-1], rtol=0, atol=0)
    torch.testing.assert_close(u1, ref_u[-1], rtol=0, atol=0)
    u0 = torch.ones_like(x0)  # an explicit u0 wins over init_velocity
    ref = odeint(field, x0, t, eps=0.2, u0=u0, method="momentum", options={"step_size": 0.05})
    torch.testing.assert_close(model(x0, u0=u0), ref[-1], rtol=0, atol=0)


@pytest.mark.parametrize(
    "method,adjoint",
    [("dopri5", False), ("dopri5", True), ("momentum", False), ("momentum", "reversible")],
)
def test_learned_eps_gradient_matches_central_differences(method, adjoint):
    """eps = eps_min + softplus(r): d loss / d r against central differences in r."""
    field = Field()
    x0 = _x0()
    opts = {"step_size": 0.05} if method == "momentum" else None
    if adjoint == "reversible":
        opts = {**opts, "frac_bits": 42}
    model = MomentumNeuralODE(field, 0.3, learn_eps=True, eps_min=0.05, method=method,
                              options=opts, adjoint=adjoint, rtol=1e-10, atol=1e-12).double()
    assert abs(model.eps.item() - 0.3) < 1e-7  # r was created in float32
    weights = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (model(x0) * weights).sum().backward()
    analytic = model.eps_raw.grad.item()
    # The exact mode computes with gamma rounded to a fraction n/d (d <= 2^16), a staircase in
    # eps; its gradient is that of the unrounded discretization, which plain autograd evaluates.
    if adjoint == "reversible":
        model.adjoint, model.options = False, {"step_size": 0.05}
    step = 1e-4
    values = []
    with torch.no_grad():
        for sign in (1, -1):
            model.eps_raw += sign * step
            values.append((model(x0) * weights).sum().item())
            model.eps_raw -= sign * step
    fd = (values[0] - values[1]) / (2 * step)
    assert abs(analytic - fd) < 1e-6 * (1 + abs(fd))
    assert model.eps.item() > 0.05


@pytest.mark.parametrize(
    "method,adjoint,per_step_forward,per_step_backward",
    [
        ("euler", False, 1, 0),  # autograd through the steps: no evaluation in backward
        ("rk4", False, 4, 0),
        ("euler", True, 1, 1),  # odeint_adjoint: one vjp of F per backward Euler step
        ("momentum", False, 1, 0),
        ("momentum", True, 1, 1),  # reversible: F recomputed once per step in backward
        ("momentum", "reversible", 1, 1),
    ],
)
def test_nfe_counters(method, adjoint, per_step_forward, per_step_backward):
    n = 20
    model = MomentumNeuralODE(Field(), 0.2, method=method, options={"step_size": 1 / n},
                              adjoint=adjoint)
    x0 = _x0().requires_grad_()
    out = model(x0)
    assert model.nfe_forward == per_step_forward * n
    out.sum().backward()
    assert model.nfe_backward == per_step_backward * n
    assert model.nfe_forward == per_step_forward * n  # unchanged by the backward pass
    model(x0)  # a forward without backward keeps the last backward's count
    assert model.nfe_backward == per_step_backward * n


def test_nfe_counter_of_first_order_module():
    model = NeuralODE(Field(), method="midpoint", options={"step_size": 0.1})
    model(_x0()).sum().backward()
    assert (model.nfe_forward, model.nfe_backward) == (20, 0)


def test_float32_module_and_default_times():
    field = Field().float()
    model = MomentumNeuralODE(field, 0.2, method="rk4", options={"step_size": 0.1},
                              learn_eps=True)
    x0 = _x0().float()
    out = model(x0)
    assert out.dtype == torch.float32 and out.shape == x0.shape
    out.sum().backward()
    assert model.eps_raw.grad is not None and field.lin.weight.grad is not None


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        (dict(eps=0.0), ValueError, "eps"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(eps=0.2, eps_min=0.3), ValueError, "eps_min"),
        (dict(eps=0.2, init_velocity=3), TypeError, "init_velocity"),
        (dict(eps=0.2, t=[1.0]), ValueError, "t"),
    ],
)
def test_module_bad_input(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        MomentumNeuralODE(Field(), **kwargs)


def test_module_reports_solver_errors():
    model = NeuralODE(Field(), method="momentum", adjoint="reversible")
    with pytest.raises(ValueError, match="eps=0"):
        model(_x0())
    with pytest.raises(ValueError, match="known methods"):
        NeuralODE(Field(), method="rk45")(_x0())
