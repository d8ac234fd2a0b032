"""odeint's methods are the installed torchdiffeq's, read at call time; METHODS is metadata."""

from __future__ import annotations

import importlib
import re

import pytest
import torch
from torch import nn
from torchdiffeq._impl.solvers import FixedGridODESolver

import mode
from mode.solve import METHODS, TORCHDIFFEQ_METHODS, _check_method, known_methods

# the module (``import torchdiffeq._impl.odeint as m`` gives the function of that name)
tdq_odeint = importlib.import_module("torchdiffeq._impl.odeint")
X0 = torch.tensor([1.0], dtype=torch.float64)


class _CountingEuler(FixedGridODESolver):
    """A solver torchdiffeq does not ship: forward Euler that counts its steps."""

    order = 1
    steps = 0

    def _step_func(self, func, t0, dt, t1, y0):
        type(self).steps += 1
        f0 = func(t0, y0)
        return dt * f0, f0


@pytest.fixture
def fake_solver(monkeypatch):
    """Register ``counting_euler`` in torchdiffeq's own registry for one test."""
    monkeypatch.setitem(tdq_odeint.SOLVERS, "counting_euler", _CountingEuler)
    monkeypatch.setattr(_CountingEuler, "steps", 0)
    return "counting_euler"


def test_a_method_registered_in_torchdiffeq_is_accepted(fake_solver):
    """x' = -x by forward Euler with step h: x(1) = (1 - h)^(1/h) exactly (a matrix power)."""
    assert fake_solver in known_methods() and known_methods()[-1] == "momentum"
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    xs = mode.odeint(lambda t, x: -x, X0, t, eps=0, method=fake_solver,
                     options={"step_size": 0.1})
    assert _CountingEuler.steps == 10  # the registered solver ran, not another one
    assert xs[-1].item() == pytest.approx(0.9**10, rel=1e-12)


def test_a_registered_method_serves_the_second_order_ode_and_the_adjoint(fake_solver):
    """eps x'' + x' = -x as (x, u)' = (u, (-x - u) / eps): Euler's step is the matrix
    [[1, h], [-h/eps, 1 - h/eps]], so 10 steps of 0.1 give its 10th power on (x0, u0)."""
    eps, h = 0.5, 0.1

    class Decay(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

        def forward(self, t, x):
            return -self.k * x

    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    step = torch.tensor([[1.0, h], [-h / eps, 1.0 - h / eps]], dtype=torch.float64)
    x_ref = (torch.linalg.matrix_power(step, 10) @ torch.tensor([1.0, 0.0],
                                                                 dtype=torch.float64))[0]
    for adjoint in (False, True):
        _CountingEuler.steps = 0
        field = Decay()
        xs = mode.odeint(field, X0, t, eps=eps, method=fake_solver, adjoint=adjoint,
                         options={"step_size": h})
        assert xs[-1].item() == pytest.approx(x_ref.item(), rel=1e-12)
        xs[-1].sum().backward()
        assert field.k.grad is not None and torch.isfinite(field.k.grad).all()
        assert _CountingEuler.steps == (20 if adjoint else 10)  # adjoint: forward + backward


def test_a_registered_method_gets_generic_metadata(fake_solver):
    info = _check_method(fake_solver)
    assert (info.name, info.family, info.order, info.reversible) == (
        fake_solver, "torchdiffeq", None, False)
    assert fake_solver not in METHODS  # the metadata table itself is not modified
    with pytest.raises(ValueError, match="adjoint='reversible' needs a method"):
        mode.odeint(lambda t, x: -x, X0, torch.tensor([0.0, 1.0], dtype=torch.float64),
                    eps=0.5, method=fake_solver, adjoint="reversible")


def test_known_methods_follow_the_registry_at_call_time(monkeypatch):
    before = known_methods()
    monkeypatch.setitem(tdq_odeint.SOLVERS, "later_method", _CountingEuler)
    assert known_methods() == (*before[:-1], "later_method", "momentum")
    monkeypatch.delitem(tdq_odeint.SOLVERS, "later_method")
    assert known_methods() == before


def test_unknown_method_lists_the_accepted_ones(fake_solver):
    with pytest.raises(ValueError) as info:
        mode.odeint(lambda t, x: -x, X0, torch.tensor([0.0, 1.0], dtype=torch.float64),
                    eps=0, method="rk45")
    message = str(info.value)
    assert message.startswith("method='rk45' is unknown; known methods")
    listed = message.split(": ", 1)[1].split(", ")
    assert listed == list(known_methods())
    assert set(listed) == set(tdq_odeint.SOLVERS) | {"momentum"}
    with pytest.raises(ValueError, match=re.escape("got NoneType None; known methods: dopri8")):
        _check_method(None)


def test_registry_out_of_reach_falls_back_to_the_known_names(monkeypatch, fake_solver):
    """The registry is private to torchdiffeq: if it moves, mode accepts the names it knows
    (and no longer sees the registered fake)."""
    expected = (*TORCHDIFFEQ_METHODS, "momentum")
    assert fake_solver in known_methods()
    for break_it in (
        lambda: monkeypatch.setattr("mode.solve._TORCHDIFFEQ_REGISTRY",
                                    ("torchdiffeq._gone", "SOLVERS")),  # module moved
        lambda: monkeypatch.setattr("mode.solve._TORCHDIFFEQ_REGISTRY",
                                    ("torchdiffeq._impl.odeint", "REGISTRY")),  # renamed
        lambda: monkeypatch.setattr(tdq_odeint, "SOLVERS", ("dopri5",)),  # not a mapping
    ):
        break_it()
        assert known_methods() == expected
        with pytest.raises(ValueError, match="method='counting_euler' is unknown"):
            _check_method(fake_solver)
        assert _check_method("rk4") is METHODS["rk4"]
        monkeypatch.undo()
        assert fake_solver not in known_methods()  # undo() also removed the fake
        monkeypatch.setitem(tdq_odeint.SOLVERS, fake_solver, _CountingEuler)


def test_metadata_describes_installed_methods_only():
    """Every torchdiffeq entry of METHODS is registered by the installed torchdiffeq (a stale
    entry fails here), and the installed one's methods are all accepted."""
    registered = set(tdq_odeint.SOLVERS)
    assert set(TORCHDIFFEQ_METHODS) <= registered
    assert set(known_methods()) == registered | {"momentum"}
    for name in known_methods():
        info = _check_method(name)
        assert info.name == name
        assert info is METHODS[name] if name in METHODS else info.family == "torchdiffeq"


def test_explicit_adams_misbehaves_as_documented():
    """torchdiffeq 0.2.5's explicit_adams on x' = -x with step 0.01 (documented in METHODS,
    odeint's docstring and the README). If this fails, upstream has fixed it: remove the
    three notes. implicit_adams and rk4 on the same grid are the control."""
    t = torch.tensor([0.0, 1.0, 5.0], dtype=torch.float64)
    exact = torch.exp(-t)

    def solve(method):
        return mode.odeint(lambda t, x: -x, X0, t, eps=0, method=method,
                           options={"step_size": 0.01})[:, 0]

    bad = solve("explicit_adams")
    assert abs(bad[1].item() - 0.74) < 0.01  # exp(-1) = 0.37
    assert bad[2].item() > 1e39  # exp(-5) = 0.0067
    for control in ("implicit_adams", "rk4"):
        torch.testing.assert_close(solve(control), exact, rtol=0, atol=1e-9)
    note = METHODS["explicit_adams"].description
    assert "0.74" in note and "1e39" in note
    assert "explicit_adams" in mode.odeint.__doc__ and "0.74" in mode.odeint.__doc__
