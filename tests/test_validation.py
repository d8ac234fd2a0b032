"""Bad input gets a clear error naming the argument (DESIGN.md 4), and repr never raises.

Each refused value here was accepted before and silently meant something else: ``h`` that
requires grad was frozen to a float, ``learn_eps="no"`` learned eps, ``eps=True`` read as 1,
``eps_to_gamma`` of a complex tensor returned a complex gamma, and ``repr(net)`` raised once a
learned gamma left [0, 1].
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

import mode
from mode.conventions import check_gamma, check_real, eps_to_gamma, gamma_to_eps
from mode.convert import MomentumStage
from mode.networks.coupled import (
    HamiltonianNet,
    HamiltonianStep,
    LeapfrogNet,
    LeapfrogStep,
    MidpointNet,
    MidpointStep,
    MRevNet,
    RevNet,
    TransposedActivatedLayer,
)
from mode.networks.ode import MomentumNeuralODE

D = 2


def _layers(n: int = 3) -> list[nn.Module]:
    torch.manual_seed(0)
    return [TransposedActivatedLayer(D).double() for _ in range(n)]


# ------------------------------------------------------------------- h of the coupled nets


def _step_size_users(h):
    f = _layers()
    return {
        "HamiltonianNet": lambda: HamiltonianNet(f, f, h),
        "MidpointNet": lambda: MidpointNet(f, h),
        "LeapfrogNet": lambda: LeapfrogNet(f, h),
        "HamiltonianNet.dense": lambda: HamiltonianNet.dense(D, 2, h),
        "MidpointNet.dense": lambda: MidpointNet.dense(D, 2, h),
        "LeapfrogNet.conv": lambda: LeapfrogNet.conv(D, 2, h),
        "HamiltonianStep": lambda: HamiltonianStep(f[0], f[1], h),
        "MidpointStep": lambda: MidpointStep(f[0], h),
        "LeapfrogStep": lambda: LeapfrogStep(f[0], h),
    }


@pytest.mark.parametrize("which", list(_step_size_users(0.1)))
def test_h_that_requires_grad_is_refused_not_frozen(which):
    h = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match="h must be a number") as info:
        _step_size_users(h)[which]()
    message = str(info.value)
    assert "requires grad" in message and "not supported" in message
    assert "h.detach()" in message  # says what to pass instead


@pytest.mark.parametrize("net_name", ["HamiltonianNet", "MidpointNet", "LeapfrogNet"])
@pytest.mark.parametrize(
    "h", [torch.tensor(0.25, dtype=torch.float64), torch.tensor([0.25]), np.float64(0.25)]
)
def test_h_as_a_tensor_without_grad_is_its_number(net_name, h):
    """A one-element tensor without grad (or a numpy float) gives the very float network."""
    net = _step_size_users(h)[net_name]()
    ref = _step_size_users(0.25)[net_name]()
    ref.load_state_dict(net.state_dict())
    assert type(net.h) is float and net.h == 0.25
    x = torch.randn(4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(net(x), ref(x))


@pytest.mark.parametrize(
    "h,exc,words",
    [
        (torch.tensor(True), TypeError, "dtype torch.bool"),
        (torch.tensor(0.1 + 0j), TypeError, "complex"),
        (0.1 + 0j, TypeError, "complex"),
        (True, TypeError, "h must be a real number"),
        ("0.1", TypeError, "h must be a real number"),
        (torch.tensor([0.1, 0.2]), ValueError, "shape (2,)"),
    ],
)
def test_h_other_bad_values(h, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        MidpointNet(_layers(), h)


# ------------------------------------------------------------------- MomentumNeuralODE


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D).double()

    def forward(self, t, x):
        return torch.tanh(self.lin(x))


@pytest.mark.parametrize("learn_eps", ["no", "False", 0, 1, None, np.bool_(True)])
def test_learn_eps_must_be_a_bool(learn_eps):
    with pytest.raises(TypeError, match=re.escape(f"learn_eps must be a bool (True or False), "
                                                  f"got {learn_eps!r}")):
        MomentumNeuralODE(Field(), 0.5, learn_eps=learn_eps)


def test_learn_eps_false_and_true_do_what_they_say():
    fixed = MomentumNeuralODE(Field(), 0.5, learn_eps=False)
    assert not hasattr(fixed, "eps_raw") and fixed.eps == 0.5
    learned = MomentumNeuralODE(Field(), 0.5, learn_eps=True, eps_min=0.1)
    assert isinstance(learned.eps_raw, nn.Parameter)
    assert learned.eps.item() == pytest.approx(0.5, rel=1e-6)  # eps_min + softplus(r) = eps


@pytest.mark.parametrize("name", ["eps", "eps_min"])
@pytest.mark.parametrize(
    "value,exc,words",
    [
        ("0.05", TypeError, "got str '0.05'"),
        (True, TypeError, "got bool True"),
        (0.05 + 0j, TypeError, "got complex number"),
        (torch.tensor(0.05 + 0j), TypeError, "complex tensor"),
        (torch.tensor(True), TypeError, "dtype torch.bool"),
        (torch.tensor(0.05, requires_grad=True), TypeError, "learn_eps=True"),
        (torch.tensor([0.05, 0.06]), ValueError, "shape (2,)"),
        (None, TypeError, "got NoneType"),
    ],
)
def test_eps_and_eps_min_must_be_real_numbers(name, value, exc, words):
    kwargs = dict(eps=0.5, eps_min=0.0)
    kwargs[name] = value
    with pytest.raises(exc, match=re.escape(words)) as info:
        MomentumNeuralODE(Field(), kwargs.pop("eps"), **kwargs)
    assert str(info.value).startswith(f"{name} must be")


@pytest.mark.parametrize("eps", [1, np.float64(0.5), torch.tensor(0.5, dtype=torch.float64),
                                 torch.tensor([0.5])])
def test_eps_real_numbers_and_plain_tensors_are_accepted_as_floats(eps):
    model = MomentumNeuralODE(Field(), eps)
    assert type(model.eps) is float and model.eps == float(eps)


# ------------------------------------------------------------------- odeint's eps


def _odeint(eps):
    x0 = torch.tensor([0.3, -0.2], dtype=torch.float64)
    t = torch.tensor([0.0, 0.5], dtype=torch.float64)
    return mode.odeint(lambda t, x: -x, x0, t, eps=eps, method="rk4",
                       options={"step_size": 0.05})


@pytest.mark.parametrize(
    "eps,words",
    [
        (True, "got bool True"),
        (False, "got bool False"),
        ("0.1", "got str '0.1'"),
        (0.1j, "got complex number"),
        (np.complex128(0.1), "got complex number"),
        (torch.tensor(0.1 + 0j), "complex tensor (dtype torch.complex64)"),
        (torch.tensor(1), "dtype torch.int64"),
        (torch.tensor(True), "dtype torch.bool"),
    ],
)
def test_odeint_eps_must_be_a_real_number(eps, words):
    with pytest.raises(TypeError, match=re.escape(words)) as info:
        _odeint(eps)
    assert str(info.value).startswith("eps must be")
    assert "a real number or a one-element floating tensor" in str(info.value)


def test_odeint_eps_numbers_of_every_real_kind_give_one_result():
    ref = _odeint(0.25)
    for eps in (np.float64(0.25), np.float32(0.25), torch.tensor(0.25, dtype=torch.float64),
                torch.tensor([0.25])):
        assert torch.equal(_odeint(eps), ref)
    assert torch.equal(_odeint(0), _odeint(0.0))  # an int 0 is the first-order ODE


# ------------------------------------------------------------------- conventions


@pytest.mark.parametrize(
    "value,exc,words",
    [
        (torch.tensor(0.5 + 0j), TypeError, "complex tensor"),
        (torch.tensor(0.5 + 0j, dtype=torch.complex128), TypeError, "complex tensor"),
        (0.5 + 0j, TypeError, "complex number"),
        (torch.tensor(1), TypeError, "dtype torch.int64"),
        (torch.tensor(True), TypeError, "dtype torch.bool"),
        (True, TypeError, "got bool"),
        ("0.5", TypeError, "got str"),
        (torch.ones(2), ValueError, "shape (2,)"),
    ],
)
def test_conventions_refuse_non_real_scalars(value, exc, words):
    with pytest.raises(exc, match=re.escape(words)) as info:
        eps_to_gamma(value, 4)
    assert str(info.value).startswith("eps must be")
    with pytest.raises(exc, match=re.escape(words)) as info:
        gamma_to_eps(value, 4)
    assert str(info.value).startswith("gamma must be")
    with pytest.raises(exc, match=re.escape(words)) as info:
        check_gamma(value, name="momentum")
    assert str(info.value).startswith("momentum must be")
    with pytest.raises(exc, match=re.escape(words)):
        gamma_to_eps(0.5, 4, horizon=value)


def test_conventions_on_valid_scalars_match_the_closed_form():
    # eps = T / (N (1 - gamma)): N = 4, T = 1, gamma = 0.5 <-> eps = 0.5, for every real kind
    for eps in (0.5, np.float64(0.5), torch.tensor(0.5, dtype=torch.float64)):
        gamma = eps_to_gamma(eps, 4)
        assert float(gamma) == 0.5
    g = eps_to_gamma(torch.tensor(0.5, dtype=torch.float64), 4)
    assert g.dtype == torch.float64 and not g.is_complex()
    assert eps_to_gamma(1, 4) == 0.75  # a Python int is a real number
    assert float(gamma_to_eps(torch.tensor(0.5, dtype=torch.float32), 4)) == 0.5
    assert gamma_to_eps(1, 4) == math.inf


def test_check_real_is_the_one_rule():
    assert check_real(3, "x") == 3.0 and check_real(np.float32(0.5), "x") == 0.5
    assert check_real(torch.tensor([[2.0]]), "x") == 2.0
    assert check_real(torch.tensor(3), "x", integer_tensors=True) == 3.0
    with pytest.raises(TypeError, match="x must be"):
        check_real(torch.tensor(3), "x")
    with pytest.raises(TypeError, match="x must be"):
        check_real(torch.tensor(True), "x", integer_tensors=True)


# ------------------------------------------------------------------- repr never raises


def _learned(value: float) -> nn.Parameter:
    return nn.Parameter(torch.tensor(value, dtype=torch.float64))


@pytest.mark.parametrize("value", [1.5, -0.25, float("nan")])
def test_repr_of_a_learned_gamma_outside_0_1(value):
    """An optimizer step can push a learned gamma out of [0, 1]: repr still prints it."""
    net = mode.MomentumResNet([nn.Linear(D, D) for _ in range(4)], _learned(0.5))
    mrev = MRevNet([nn.Linear(D, D) for _ in range(4)], _learned(0.5))
    stage = MomentumStage([nn.Linear(D, D) for _ in range(3)], _learned(0.5))
    with torch.no_grad():
        for g in (net.gamma, mrev.gamma, stage.momentum.gamma):
            g.fill_(value)
    shown = f"gamma={value:g}"
    text = repr(net)
    assert f"{shown} (learned), outside [0, 1]: eps undefined" in text
    assert f"{shown} (outside [0, 1]), depth=4, reversible=True (float)" in repr(mrev)
    assert "outside [0, 1]: eps undefined" in repr(stage)
    with pytest.raises(ValueError, match="gamma must lie in"):  # while forward still refuses
        net(torch.zeros(1, D))


def test_repr_of_a_valid_gamma_shows_eps_from_the_convention():
    # depth 4, gamma 0.75: eps = 1 / (4 * 0.25) = 1; gamma = 1: eps = inf
    net = mode.MomentumResNet([nn.Linear(D, D) for _ in range(4)], _learned(0.75))
    assert "gamma=0.75 (learned), eps=1 (horizon 1), reversible=True (float)" in repr(net)
    net = mode.MomentumResNet([nn.Linear(D, D) for _ in range(4)], 1.0)
    assert "gamma=1, eps=inf (horizon 1)" in repr(net)
    mrev = MRevNet([nn.Linear(D, D) for _ in range(2)], 0.5, exact=True)
    assert "gamma=0.5, depth=2, reversible=True (exact)" in repr(mrev)


def test_repr_of_the_other_networks():
    f = _layers(3)
    assert "h=0.25, depth=3, reversible=True (float)" in repr(HamiltonianNet(f, f, 0.25))
    assert "h=0.5, depth=3, reversible=False (off)" in repr(
        MidpointNet(f, 0.5, reversible=False))
    assert "h=0.1, depth=3, reversible=True (exact)" in repr(LeapfrogNet(f, 0.1, exact=True))
    assert "depth=3, reversible=True (float)" in repr(RevNet(f, f, split_dim=-1))
    model = MomentumNeuralODE(Field(), 0.3, learn_eps=True, method="rk4")
    assert "eps=0.3 (learned), method='rk4'" in repr(model)
    assert "eps=0.3, method='rk4'" in repr(MomentumNeuralODE(Field(), 0.3, method="rk4"))


def test_a_coupling_alpha_of_several_elements_is_refused_by_name():
    """alpha multiplies the whole state: a per-channel tensor is refused with its shape, in the
    eager engine and (falling back to it) under mode.traceable."""
    from mode.steps import Coupling, ReversibleStep

    class PerChannel(ReversibleStep):
        def __init__(self):
            super().__init__()
            self.f, self.a = nn.Linear(4, 4), nn.Parameter(torch.full((4,), 0.9))

        def couplings(self):
            return (Coupling(1, self.a, 0, self.f), Coupling(0, 1.0, 1))

    x, steps = torch.randn(2, 4), [PerChannel()]
    with pytest.raises(ValueError, match=r"one-element tensor .* shape \(4,\)"):
        mode.reversible.integrate(steps, (x, x.clone()))
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=r"one-element tensor .* shape \(4,\)"):
        torch.compile(lambda s0, s1: mode.reversible.integrate(steps, (s0, s1), traceable=True),
                      backend="aot_eager")(x, x.clone())
    torch._dynamo.reset()


def test_a_non_integer_shift_in_exact_mode_and_a_non_bool_swap_are_refused():
    """shift = 0.5: float mode gave 0.6, exact mode 0.4, silently; swap = "False" swapped."""
    from mode.steps import Coupling, ReversibleStep

    class Half(ReversibleStep):
        def couplings(self):
            return (Coupling(0, shift=0.5, phi=torch.tanh),)

    class Stringly(ReversibleStep):
        swap = "False"

        def couplings(self):
            return (Coupling(0, phi=torch.tanh),)

    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="integer coupling shift"):
        mode.reversible.integrate([Half()], (x, x.clone()), exact=True)
    with pytest.raises(TypeError, match="swap must be a bool"):
        mode.reversible.integrate([Stringly()], (x, x.clone()))
