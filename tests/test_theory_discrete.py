"""Finite depth: P_N against the momentum rule itself, mode.MomentumResNet and mpmath."""

import math

import mpmath
import numpy as np
import pytest
import torch

import mode
import theory
from theory.discrete import discrete_min_gain_point


def momentum_rule(theta: float, eps: float, depth: int) -> float:
    """x_N of the design's rule, literally: gamma = 1 - 1/(N eps) written out here (not
    mode.eps_to_gamma), v_0 = 0, f_n(x) = theta x / N."""
    gamma = 0.0 if eps == 0 else 1.0 - 1.0 / (depth * eps)
    x, v = 1.0, 0.0
    for _ in range(depth):
        v = gamma * v + (1.0 - gamma) * theta * x / depth
        x = x + v
    return x


def mp_gain_polynomial(eps, depth):
    """Coefficients (constant first) of x_N(theta) by the momentum rule in mpmath (50 digits)."""
    mpmath.mp.dps = 50
    gamma = 1 - 1 / (depth * mpmath.mpf(eps))
    x, v = [mpmath.mpf(1)], [mpmath.mpf(0)]
    for _ in range(depth):
        fx = [mpmath.mpf(0)] + [c * (1 - gamma) / depth for c in x]  # (1-gamma) theta x / N
        v = [gamma * a for a in v] + [mpmath.mpf(0)] * (len(fx) - len(v))
        v = [a + b for a, b in zip(v, fx)]
        x = [a + b for a, b in zip(x + [mpmath.mpf(0)] * (len(v) - len(x)), v)]
    return x


def mp_min_gain(eps, depth):
    coeffs = mp_gain_polynomial(eps, depth)
    deriv = [k * c for k, c in enumerate(coeffs)][1:]
    roots = mpmath.polyroots(list(reversed(deriv)), maxsteps=200, extraprec=200)
    values = [mpmath.polyval(list(reversed(coeffs)), r.real) for r in roots
              if abs(mpmath.im(r)) < mpmath.mpf(10) ** -30]
    return min(values), len(values)


@pytest.mark.parametrize("eps,depth", [(0.5, 8), (2.0, 3), (1.0, 40), (0.0, 5), (0.25, 4)])
def test_scalar_gain_is_the_momentum_rule(eps, depth):
    thetas = np.array([-300.0, -30.0, -3.0, 0.0, 0.5, 4.0])
    out = theory.discrete_psi(thetas, eps, depth)
    ref = np.array([momentum_rule(t, eps, depth) for t in thetas])
    np.testing.assert_allclose(out, ref, rtol=1e-11, atol=1e-12)
    assert theory.discrete_psi(-3.0, eps, depth) == pytest.approx(ref[2], rel=1e-12)


@pytest.mark.parametrize("eps,depth", [(0.5, 8), (3.0, 5), (0.0, 6)])
def test_matrix_gain_is_the_network(eps, depth):
    rng = np.random.default_rng(0)
    theta = 2.0 * rng.standard_normal((3, 3))
    th = torch.tensor(theta)
    gamma = 0.0 if eps == 0 else mode.eps_to_gamma(eps, depth)
    net = mode.MomentumResNet([lambda x, t=th: x @ t.T / depth] * depth, gamma,
                              reversible=False)
    with torch.no_grad():
        X = net(torch.eye(3, dtype=torch.float64)).numpy().T
    np.testing.assert_allclose(theory.discrete_psi(theta, eps, depth), X, rtol=1e-12,
                               atol=1e-12)


def test_resnet_is_the_power_of_the_euler_step():
    theta = np.array([[0.3, -1.0], [2.0, 0.1]])
    np.testing.assert_allclose(theory.discrete_psi(theta, 0.0, 7),
                               np.linalg.matrix_power(np.eye(2) + theta / 7, 7), rtol=1e-13)
    # odd depth reaches diag(-1, 1) exactly: I + theta / N = diag(-1, 1)
    for depth in (1, 3, 9):
        D = theory.discrete_psi(np.diag([-2.0 * depth, 0.0]), 0.0, depth)
        np.testing.assert_allclose(D, np.diag([-1.0, 1.0]), atol=1e-12)
    # even depth: (1 + z/N)^N >= 0 with minimum 0 at z = -N
    assert discrete_min_gain_point(0.0, 6) == (0.0, -6.0)
    assert theory.discrete_min_gain(0.0, 5) == -math.inf


@pytest.mark.parametrize("eps", [0.5, 0.6, 1.0, 3.0, 100.0])
def test_depth_two_closed_form(eps):
    # x_2 = 1 + (2 + gamma) u + u^2, u = b theta: minimum 1 - (2 + gamma)^2 / 4
    gamma = 1.0 - 1.0 / (2.0 * eps)
    m, theta_star = discrete_min_gain_point(eps, 2)
    assert m == pytest.approx(1.0 - (2.0 + gamma) ** 2 / 4.0, rel=1e-13, abs=1e-15)
    assert momentum_rule(theta_star, eps, 2) == pytest.approx(m, rel=1e-12, abs=1e-15)
    # below -1 exactly when gamma > 2 sqrt 2 - 2
    assert (m < -1) == (gamma > 2 * math.sqrt(2) - 2)


@pytest.mark.parametrize("eps,depth", [(0.5, 4), (2.0, 6), (0.3, 10), (10.0, 8)])
def test_even_depth_minimum_against_mpmath(eps, depth):
    ref, n_real = mp_min_gain(eps, depth)
    assert n_real == depth - 1  # every critical point is real (fact 2)
    assert theory.discrete_min_gain(eps, depth) == pytest.approx(float(ref), rel=1e-10)


def test_odd_depth_is_unbounded_below():
    for eps, depth in [(0.5, 3), (2.0, 7), (1.0, 1)]:
        assert theory.discrete_min_gain(eps, depth) == -math.inf
        assert momentum_rule(-1e4 * depth**2, eps, depth) < -1e3


def test_finite_depth_range_passes_the_ode_bound():
    # the ODE has m_eps > -1; the depth-N network does not (here N = 64 at eps = 0.5)
    assert theory.min_gain(0.5) > -1
    m, theta_star = discrete_min_gain_point(0.5, 64)
    assert m < -1
    assert momentum_rule(theta_star, 0.5, 64) == pytest.approx(m, rel=1e-9)


@pytest.mark.parametrize("eps", [0.2, 1.0])
def test_fixed_theta_converges_to_psi(eps):
    errs = [abs(theory.discrete_psi(-3.0, eps, n) - theory.psi(-3.0, eps)) for n in (100, 200)]
    assert errs[1] < errs[0] and math.log2(errs[0] / errs[1]) > 0.9


def test_bad_arguments():
    with pytest.raises(ValueError, match="eps"):
        theory.discrete_psi(1.0, 0.01, 10)  # eps < 1/N needs gamma < 0
    with pytest.raises(ValueError, match="depth"):
        theory.discrete_min_gain(0.5, 0)
    with pytest.raises(TypeError, match="depth"):
        theory.discrete_psi(1.0, 0.5, 2.0)
    with pytest.raises(TypeError, match="depth"):
        theory.discrete_psi(1.0, 0.5, True)
    with pytest.raises(ValueError, match="square"):
        theory.discrete_psi(np.ones((2, 3)), 0.5, 4)
