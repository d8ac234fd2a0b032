"""mode.odeint against independent ground truth: expm, solve_ivp, MomentumResNet, eps -> 0."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sla
import torch
from scipy.integrate import solve_ivp

import mode
from mode.solve import METHODS, TORCHDIFFEQ_METHODS, known_methods, odeint

D = 3
X0 = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
U0 = torch.tensor([0.2, 0.1, -0.4], dtype=torch.float64)
T_OUT = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)


def _theta(stiff: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(D, D, generator=g, dtype=torch.float64)
    return theta - 30.0 * torch.eye(D, dtype=torch.float64) if stiff else theta


def _expm_solution(theta: torch.Tensor, eps: float, times) -> tuple[np.ndarray, np.ndarray]:
    """x(t) and x'(t) from expm: first order expm(t theta), second order the block matrix."""
    th = theta.numpy()
    if eps == 0:
        xs = np.stack([sla.expm(t * th) @ X0.numpy() for t in times])
        return xs, xs @ th.T
    m = np.block([[np.zeros((D, D)), np.eye(D)], [th / eps, -np.eye(D) / eps]])
    ys = np.stack([sla.expm(t * m) @ np.concatenate([X0.numpy(), U0.numpy()]) for t in times])
    return ys[:, :D], ys[:, D:]


def _block(theta: torch.Tensor, eps: float) -> np.ndarray:
    th = theta.numpy()
    if eps == 0:
        return th
    return np.block([[np.zeros((D, D)), np.eye(D)], [th / eps, -np.eye(D) / eps]])


def _runge_kutta_closed_form(m: np.ndarray, order: int, h: float, n: int, y0) -> np.ndarray:
    """An explicit s-stage RK method of order s applied to y' = M y is y_n = R(hM)^n y0,
    R the degree-s Taylor polynomial of exp (euler 1, midpoint/heun2 2, heun3 3, rk4 4)."""
    z = h * m
    r, term = np.eye(len(m)), np.eye(len(m))
    for k in range(1, order + 1):
        term = term @ z / k
        r = r + term
    return np.linalg.matrix_power(r, n) @ y0


def _momentum_closed_form(theta, eps: float, h: float, n: int) -> np.ndarray:
    """n momentum steps on (x, v): v' = g v + (1-g) h theta x, x' = x + v' as one matrix."""
    th, eye = theta.numpy(), np.eye(D)
    g = 0.0 if eps == 0 else 1.0 - h / eps
    s = np.block([[eye + (1 - g) * h * th, g * eye], [(1 - g) * h * th, g * eye]])
    u0 = U0.numpy() if eps else np.zeros(D)
    return (np.linalg.matrix_power(s, n) @ np.concatenate([X0.numpy(), h * u0]))[:D]


# Adaptive methods get tolerances they reach in well under a second and are checked to
# 100 rtol; fixed-grid methods of order p with step h to twice the leading global error
# T rho^(p+1) h^p / (p+1)!, rho the spectral radius of the system matrix.
ADAPTIVE_RTOL = {"dopri8": 1e-10, "dopri5": 1e-10, "bosh3": 1e-8, "fehlberg2": 1e-7,
                 "adaptive_heun": 1e-6, "scipy_solver": 1e-10}
LINEAR_CASES = [(0.0, False), (0.0, True), (1.0, False), (0.1, False), (0.01, True)]


def _linear_params():
    for eps, stiff in LINEAR_CASES:
        for method in METHODS:
            rho_large = stiff or eps == 0.1
            if method == "explicit_adams" and rho_large:
                # torchdiffeq's explicit_adams diverges once the spectral radius is ~10 (at
                # steps 1e-2 and 1e-3); it is checked on the two cases with radius <= 2
                continue
            slow = rho_large and method in ("adaptive_heun", "fehlberg2", "bosh3")
            marks = [pytest.mark.slow] if slow else []  # low order, fast modes: many steps
            yield pytest.param(eps, stiff, method, marks=marks, id=f"{method}-eps{eps}-{stiff}")


@pytest.mark.parametrize("eps,stiff,method", list(_linear_params()))
def test_linear_field_matches_expm(eps, stiff, method):
    theta = _theta(stiff)
    m = _block(theta, eps)
    rho = max(1.0, np.abs(np.linalg.eigvals(m)).max())
    info = METHODS[method]
    if info.family == "adaptive":
        rtol = ADAPTIVE_RTOL[method]
        kwargs = dict(rtol=rtol, atol=rtol * 1e-2)
        # torchdiffeq's dopri8 and bosh3 end on their dense output, whose error is ~500 rtol
        tol = 1e-5 if method in ("dopri8", "bosh3") else 100 * rtol
    elif info.order is None:  # Adams multistep methods
        kwargs, tol = dict(options={"step_size": 1e-3}), 1e-6
    else:
        h = 1e-3 if info.order == 1 else 1e-2
        kwargs = dict(options={"step_size": h})
        tol = 2 * rho ** (info.order + 1) * h**info.order / np.prod(range(1, info.order + 2))
    xs, us = odeint(lambda t, x: x @ theta.T, X0, T_OUT, eps=eps, u0=U0 if eps else None,
                    method=method, return_velocity=True, **kwargs)
    x_ref, u_ref = _expm_solution(theta, eps, T_OUT.tolist())
    assert xs.shape == (3, D) and xs.dtype == torch.float64
    np.testing.assert_allclose(xs.numpy(), x_ref, rtol=0, atol=tol)
    if eps > 0 and method != "momentum":
        np.testing.assert_allclose(us.numpy(), u_ref, rtol=0, atol=tol / eps)
    # fixed-grid one-step methods are exactly a matrix power on a linear field
    if info.family == "discrete":
        n = round(1.0 / h)
        np.testing.assert_allclose(xs[-1].numpy(), _momentum_closed_form(theta, eps, h, n),
                                   rtol=1e-11, atol=1e-13)
    elif info.family == "fixed" and info.order is not None:
        y0 = X0.numpy() if eps == 0 else np.concatenate([X0.numpy(), U0.numpy()])
        y1 = _runge_kutta_closed_form(m, info.order, h, round(1.0 / h), y0)
        np.testing.assert_allclose(xs[-1].numpy(), y1[:D], rtol=1e-11, atol=1e-13)


def test_method_registry_covers_torchdiffeq():
    from torchdiffeq._impl.odeint import SOLVERS

    # odeint accepts exactly the installed torchdiffeq's methods and momentum (read at call
    # time: a method a newer torchdiffeq adds is accepted without a METHODS entry), and
    # METHODS describes no method the installed torchdiffeq lacks
    assert set(known_methods()) == set(SOLVERS) | {"momentum"}
    assert set(TORCHDIFFEQ_METHODS) <= set(SOLVERS)
    assert "momentum" in METHODS and METHODS["momentum"].reversible


# ------------------------------------------------------------------- convergence orders


EPS_NL = 0.5
A = torch.tensor([[0.5, -1.2], [0.9, 0.3]], dtype=torch.float64)
B = torch.tensor([0.4, -0.2], dtype=torch.float64)
X0_NL = torch.tensor([0.7, -0.4], dtype=torch.float64)
U0_NL = torch.tensor([0.3, 0.5], dtype=torch.float64)


def _field(t, x):
    return torch.tanh(x @ A.to(x.dtype).T) + torch.sin(3 * t) * B.to(x.dtype)


def _field_np(t, x):
    return np.tanh(A.numpy() @ x) + np.sin(3 * t) * B.numpy()


def _reference(eps: float, t_end: float = 1.0) -> np.ndarray:
    def rhs(t, y):
        x, u = y[:2], y[2:]
        if eps == 0:
            return np.concatenate([_field_np(t, x), np.zeros(2)])
        return np.concatenate([u, (_field_np(t, x) - u) / eps])

    y0 = np.concatenate([X0_NL.numpy(), U0_NL.numpy() if eps else np.zeros(2)])
    sol = solve_ivp(rhs, (0.0, t_end), y0, method="DOP853", rtol=1e-12, atol=1e-12)
    return sol.y[:2, -1]


def _layer(func, t_n: float, h: float):
    """The residual function f_n(x) = h F(t_n, x) of one momentum layer."""
    tn = torch.tensor(t_n, dtype=torch.float64)
    return lambda x: h * func(tn, x)


ORDERS = {"momentum": (1, [16, 32, 64, 128]), "euler": (1, [16, 32, 64, 128]),
          "midpoint": (2, [16, 32, 64, 128]), "rk4": (4, [4, 8, 16, 32])}


@pytest.mark.parametrize("method", list(ORDERS))
def test_empirical_convergence_order(method):
    """Slope of log(error) against log(h); +-0.25 leaves room for the pre-asymptotic range
    (a wrong order would be off by >= 1)."""
    order, ns = ORDERS[method]
    ref = _reference(EPS_NL)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    errs = []
    for n in ns:
        xs = odeint(_field, X0_NL, t, eps=EPS_NL, u0=U0_NL, method=method,
                    options={"step_size": 1.0 / n})
        errs.append(np.abs(xs[-1].numpy() - ref).max())
    slope = np.polyfit(np.log(1.0 / np.array(ns)), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.25, (slope, errs)


def test_discrete_momentum_resnet_converges_to_ode_at_rate_one_over_n():
    """MomentumResNet with f_n = F(t_n, .)/N and gamma = eps_to_gamma(eps, N): x_N -> x(1)."""
    ref = _reference(EPS_NL)
    ns = [8, 16, 32, 64, 128]
    errs = []
    for n in ns:
        fs = [_layer(_field, k / n, 1.0 / n) for k in range(n)]
        net = mode.MomentumResNet(fs, mode.eps_to_gamma(EPS_NL, n), reversible=False)
        x_n = net(X0_NL, v0=U0_NL / n)
        errs.append(np.abs(x_n.detach().numpy() - ref).max())
    slope = np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(slope + 1) < 0.25, (slope, errs)


def test_momentum_method_is_the_momentum_resnet():
    """method='momentum' == MomentumResNet(f_n = h F(t_n, .), gamma = eps_to_gamma(eps, 1, h))."""
    torch.manual_seed(0)
    field = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    field = field.double()
    x0 = torch.randn(5, 4, dtype=torch.float64)
    u0 = torch.randn(5, 4, dtype=torch.float64)
    eps, n, t_end = 0.3, 40, 2.0
    h = t_end / n
    func = lambda t, x: field(x) * torch.cos(t)  # noqa: E731
    t = torch.tensor([0.0, t_end], dtype=torch.float64)
    xs, us = odeint(func, x0, t, eps=eps, u0=u0, method="momentum", options={"step_size": h},
                    return_velocity=True)
    fs = [_layer(func, k * h, h) for k in range(n)]
    for reversible in (False, True):
        net = mode.MomentumResNet(fs, mode.eps_to_gamma(eps, 1, h), reversible=reversible)
        x_n, v_n = net(x0, v0=h * u0, return_velocity=True)
        torch.testing.assert_close(xs[-1], x_n, rtol=0, atol=1e-14)
        torch.testing.assert_close(us[-1], v_n / h, rtol=0, atol=1e-12)


def test_momentum_grid_splits_each_interval():
    """t = [0, .25, 1] with h = 0.1: 3 steps of 1/12 then 8 steps of 3/32 (v = h u rescaled)."""
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    xs, us = odeint(_field, X0_NL, t, eps=EPS_NL, u0=U0_NL, method="momentum",
                    options={"step_size": 0.1}, return_velocity=True)
    x, v = X0_NL.clone(), U0_NL / 12
    for a, h, m in ((0.0, 0.25 / 3, 3), (0.25, 0.75 / 8, 8)):
        v = v * (h / (0.25 / 3))  # v = h u: rescale when the step changes
        g = 1 - h / EPS_NL
        for j in range(m):
            v = g * v + (1 - g) * h * _field(torch.tensor(a + j * h, dtype=torch.float64), x)
            x = x + v
        if a == 0.0:
            torch.testing.assert_close(xs[1], x, rtol=0, atol=1e-14)
            torch.testing.assert_close(us[1], v / (0.25 / 3), rtol=0, atol=1e-13)
    torch.testing.assert_close(xs[2], x, rtol=0, atol=1e-14)
    torch.testing.assert_close(us[2], v / (0.75 / 8), rtol=0, atol=1e-13)


@pytest.mark.parametrize("method", ["dopri5", "rk4", "momentum"])
def test_eps_to_zero_converges_to_first_order(method):
    """||x_eps(1) - x_0(1)|| = O(eps) (u0 = 0, so there is an initial layer of width eps)."""
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    opts = None if method == "dopri5" else {"step_size": 2.5e-3}
    x_first = odeint(_field, X0_NL, t, eps=0.0, method="dopri5", rtol=1e-10, atol=1e-12)[-1]
    epss = [0.04, 0.02, 0.01, 0.005]
    errs = []
    for eps in epss:
        x_eps = odeint(_field, X0_NL, t, eps=eps, method=method, options=opts, rtol=1e-8,
                       atol=1e-10)[-1]
        errs.append((x_eps - x_first).abs().max().item())
    slope = np.polyfit(np.log(epss), np.log(errs), 1)[0]
    assert abs(slope - 1) < 0.25, (slope, errs)
    assert errs[-1] < 0.01


# ------------------------------------------------------------------- structure, dtype


def test_tuple_and_batched_states():
    """A tuple state (x, y) solves the same ODE as the stacked single tensor, per method."""
    torch.manual_seed(0)
    x0 = torch.randn(6, 2, dtype=torch.float64)
    u0 = torch.randn(6, 2, dtype=torch.float64)
    t = torch.linspace(0, 1, 4, dtype=torch.float64)

    def single(t, z):
        return _field(t, z)

    def tupled(t, xy):
        z = torch.stack(xy, dim=-1)
        f = _field(t, z)
        return f[..., 0], f[..., 1]

    for method, opts in (("dopri5", None), ("rk4", {"step_size": 0.05}),
                         ("momentum", {"step_size": 0.05})):
        for eps, u in ((0.0, None), (0.2, u0)):
            # (dopri5 picks its steps with a different norm for a tuple: tight tolerances)
            ref, vref = odeint(single, x0, t, eps=eps, u0=u, method=method, options=opts,
                               return_velocity=True, rtol=1e-11, atol=1e-12)
            uu = None if u is None else (u[:, 0], u[:, 1])
            (a, b), (va, vb) = odeint(tupled, (x0[:, 0], x0[:, 1]), t, eps=eps, u0=uu,
                                      method=method, options=opts, return_velocity=True,
                                      rtol=1e-11, atol=1e-12)
            assert a.shape == (4, 6)
            tol = 1e-7 if method == "dopri5" else 1e-13
            torch.testing.assert_close(torch.stack([a, b], -1), ref, rtol=0, atol=tol)
            torch.testing.assert_close(torch.stack([va, vb], -1), vref, rtol=0, atol=tol * 10)


@pytest.mark.parametrize("method", ["dopri5", "rk4", "momentum"])
def test_float32_follows_input_dtype(method):
    t = torch.tensor([0.0, 0.5, 1.0])
    opts = None if method == "dopri5" else {"step_size": 0.05}
    xs32 = odeint(_field, X0_NL.float(), t, eps=0.2, u0=U0_NL.float(), method=method,
                  options=opts, rtol=1e-6, atol=1e-7)
    xs64 = odeint(_field, X0_NL, t.double(), eps=0.2, u0=U0_NL, method=method, options=opts)
    assert xs32.dtype == torch.float32 and xs32.device == X0_NL.device
    torch.testing.assert_close(xs32.double(), xs64, rtol=0, atol=1e-5)


def test_single_time_returns_initial_state():
    t = torch.tensor([0.0], dtype=torch.float64)
    for method in ("dopri5", "momentum"):
        xs = odeint(_field, X0_NL, t, eps=0.2, method=method)
        assert xs.shape == (1, 2) and torch.equal(xs[0], X0_NL)


# ------------------------------------------------------------------- bad input


def _call(**kw):
    args = dict(func=_field, x0=X0_NL, t=torch.tensor([0.0, 1.0], dtype=torch.float64), eps=0.2)
    args.update(kw)
    func, x0, t = args.pop("func"), args.pop("x0"), args.pop("t")
    return odeint(func, x0, t, **args)


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(eps=-0.1), ValueError, "eps"),
        (dict(eps=float("nan")), ValueError, "eps"),
        (dict(eps="0.1"), TypeError, "eps"),
        (dict(t=torch.tensor([0.0, 1.0, 0.5])), ValueError, "increasing"),
        (dict(t=torch.tensor([0.0, 0.0])), ValueError, "increasing"),
        (dict(t=torch.zeros(2, 2)), ValueError, "1-D"),
        (dict(method="rk45"), ValueError, "dopri5"),
        (dict(method="rk45"), ValueError, "momentum"),
        (dict(adjoint="reversible", method="rk4"), ValueError, "adjoint='reversible'"),
        (dict(adjoint="reversible", method="momentum", eps=0.0), ValueError, "eps=0"),
        (dict(adjoint="yes"), ValueError, "adjoint"),
        (dict(u0=torch.zeros(3, dtype=torch.float64)), ValueError, "u0"),
        (dict(u0=torch.zeros(2, dtype=torch.float64), eps=0.0), ValueError, "u0"),
        (dict(func=lambda t, x: x[:1]), ValueError, "shape"),
        (dict(func=lambda t, x: x[:1], method="momentum", options={"step_size": 0.1}),
         ValueError, "shape"),
        (dict(func=lambda t, x: x.sum()), ValueError, "shape"),
        (dict(func=lambda t, x: 1.0), TypeError, "tensor"),
        (dict(func=3), TypeError, "func"),
        (dict(x0=[1.0, 2.0]), TypeError, "x0"),
        (dict(x0=torch.tensor([1, 2])), TypeError, "x0"),
        (dict(method="momentum", options={"step_size": 0.5}), ValueError, "step size h <= eps"),
        (dict(method="momentum", options={"step_size": -1.0}), ValueError, "step_size"),
        (dict(method="momentum", options={"rtol": 1.0}), ValueError, "rtol"),
        (dict(method="momentum", options={"frac_bits": 40}), ValueError, "frac_bits"),
        (dict(adjoint=True), TypeError, "nn.Module"),
        (dict(method="momentum", options={"step_size": 0.1},
              t=torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)),
         ValueError, "requires grad"),
        (dict(return_velocity=1), TypeError, "return_velocity"),
    ],
)
def test_bad_input_names_the_argument(kwargs, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")) as info:
        _call(**kwargs)
    assert str(info.value)
