"""Psi_eps and m_eps against independent routes: block expm, solve_ivp, brute force."""

import math

import numpy as np
import pytest
import scipy.linalg

import theory
from theory.certify import flow_matrix
from theory.psi import dpsi_scalar, psi_matrix, psi_scalar
from theory.range import min_gain_point, real_preimage

EPSS = [1e-3, 0.05, 0.25, 1.0, 10.0]


def _block_expm_1x1(z, eps):
    M = np.array([[0.0, 1.0], [z / eps, -1.0 / eps]], dtype=complex)
    return scipy.linalg.expm(M)[0, 0]


@pytest.mark.parametrize("eps", EPSS)
def test_scalar_closed_form_matches_block_expm(eps):
    zc = -1.0 / (4.0 * eps)
    zs = [-40.0, -3.0, zc - 1e-7, zc, zc + 1e-9, 0.0, 0.3, 4.0, 25.0,
          1.5 + 2.0j, -6.0 - 1.0j, zc + 1e-8j]
    for z in zs:
        ref = _block_expm_1x1(z, eps)
        val = theory.psi(z, eps)
        assert abs(val - ref) <= 1e-9 * max(abs(ref), 1e-300) + 1e-300, (eps, z, val, ref)


def test_scalar_form_large_arguments_do_not_overflow_to_nan():
    z = np.array([-1e4, -1e3, 1e3])
    for eps in (1e-3, 0.1, 5.0):
        v = psi_scalar(z, eps)
        assert not np.any(np.isnan(v))
    # where it is representable the value stays accurate: eps small, z large -> ~ exp(z)-like
    assert psi_scalar(300.0, 1e-4) == pytest.approx(
        float(np.real(_block_expm_1x1(300.0, 1e-4))), rel=1e-6)


def test_scalar_oscillating_continuation():
    # 1 + 4 eps z < 0: exp(-c) (cos(c w) + sin(c w) / w), w = sqrt(-1 - 4 eps z)
    eps, z = 0.2, -7.0
    c, w = 1 / (2 * eps), math.sqrt(-1 - 4 * eps * z)
    expected = math.exp(-c) * (math.cos(c * w) + math.sin(c * w) / w)
    assert theory.psi(z, eps) == pytest.approx(expected, rel=1e-13)


def test_eps_zero_is_exp_and_expm():
    rng = np.random.default_rng(0)
    theta = rng.standard_normal((4, 4))
    np.testing.assert_allclose(theory.psi(theta, 0.0), scipy.linalg.expm(theta), rtol=1e-14)
    z = rng.standard_normal(5)
    np.testing.assert_allclose(theory.psi(z, 0.0), np.exp(z), rtol=1e-15)


@pytest.mark.parametrize("eps", [0.05, 0.3, 2.0])
def test_matrix_psi_matches_solve_ivp(eps):
    rng = np.random.default_rng(1)
    theta = 1.5 * rng.standard_normal((3, 3))
    X1, *_ = flow_matrix(theta, eps, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(theory.psi(theta, eps), X1, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("eps", [1e-3, 0.02, 0.5, 4.0])
def test_matrix_psi_matches_scalar_form_on_eigenvalues(eps):
    rng = np.random.default_rng(2)
    theta = rng.standard_normal((4, 4))
    w, V = np.linalg.eig(theta)
    ref = (V @ np.diag(psi_scalar(w, eps)) @ np.linalg.inv(V)).real
    np.testing.assert_allclose(psi_matrix(theta, eps), ref, rtol=1e-8, atol=1e-11)


def test_elementwise_for_1d_and_shapes():
    z = np.array([-2.0, 0.0, 1.0])
    out = theory.psi(z, 0.5)
    assert out.shape == (3,) and out.dtype == np.float64
    assert isinstance(theory.psi(0.25, 0.5), float | np.floating)
    assert np.iscomplexobj(theory.psi(np.array([1 + 1j]), 0.5))


def test_derivative_matches_finite_differences():
    for eps in (0.05, 0.5, 3.0):
        for z in (-10.0 + 0j, -1 / (4 * eps) + 1e-9, 0.2 + 0.5j, 3.0 + 0j, -2.0 - 3.0j):
            h = 1e-6 * max(1.0, abs(z))
            fd = (psi_scalar(z + h, eps) - psi_scalar(z - h, eps)) / (2 * h)
            assert abs(dpsi_scalar(z, eps) - fd) <= 1e-6 * max(abs(fd), 1e-12), (eps, z)


@pytest.mark.parametrize("bad", [np.ones((2, 3)), np.ones((2, 2, 2)), np.array([[np.nan]])])
def test_bad_theta(bad):
    with pytest.raises(ValueError, match="theta"):
        theory.psi(bad, 0.3)


@pytest.mark.parametrize("eps", [-0.1, float("nan"), float("inf")])
def test_bad_eps_value(eps):
    with pytest.raises(ValueError, match="eps"):
        theory.psi(1.0, eps)


@pytest.mark.parametrize("eps", ["0.1", None, True])
def test_bad_eps_type(eps):
    with pytest.raises(TypeError, match="eps"):
        theory.psi(1.0, eps)


def test_min_gain_properties():
    assert theory.min_gain(0.0) == 0.0
    epss = np.logspace(-3, 5, 30)
    ms = np.array([theory.min_gain(e) for e in epss])
    assert np.all(ms < 0)
    assert np.all(np.diff(ms) < 0)  # decreasing in eps
    assert np.all(ms > -1)
    # derived asymptotics: m_eps = -1 + 1/(2 eps) + O(eps^-2)
    for e in (1e3, 1e4, 1e5):
        assert theory.min_gain(e) + 1 == pytest.approx(1 / (2 * e), rel=1e-2)


@pytest.mark.parametrize("eps", [0.01, 0.1, 0.25, 1.0, 30.0])
def test_min_gain_is_the_minimum_of_the_closed_form(eps):
    m, z_star = min_gain_point(eps)
    assert theory.psi(z_star, eps) == pytest.approx(m, rel=1e-12)
    # dense grid over many lobes and the monotone branch: nothing below m, and m is reached
    a = np.linspace(1e-4, 60.0, 200001)
    z = np.concatenate([-(1 + 4 * eps**2 * a**2) / (4 * eps),
                        -1 / (4 * eps) + np.linspace(0, 30, 3001)])
    v = psi_scalar(z, eps)
    assert v.min() >= m * (1 + 1e-12)
    assert v.min() == pytest.approx(m, rel=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1, 2.0])
def test_real_preimage_roundtrip(eps):
    lo = theory.min_gain(eps)
    lams = [1e-3, 0.5, 1.0, 40.0] + ([lo * 0.999, lo * 0.5, 0.0] if eps > 0 else [])
    for lam in lams:
        z = real_preimage(lam, eps)
        assert theory.psi(z, eps) == pytest.approx(lam, rel=1e-12, abs=1e-15)
    if eps > 0:
        with pytest.raises(ValueError, match="below m_eps"):
            real_preimage(lo * 1.01, eps)


@pytest.mark.parametrize("eps", [0.1, 2.0])
def test_critical_points_found_by_newton_are_real(eps):
    # evidence for the statement in theory.inverse: Newton on Psi' from a grid of complex
    # starts converges only to real critical points (so the critical values are real)
    found = []
    for x in np.linspace(-40.0, 10.0, 9):
        for y in np.linspace(-20.0, 20.0, 9):
            z = complex(x, y)
            for _ in range(60):
                h = 1e-6 * (1 + abs(z))
                d1 = complex(dpsi_scalar(z, eps))
                d2 = (complex(dpsi_scalar(z + h, eps)) - complex(dpsi_scalar(z - h, eps))) / (2 * h)
                if d2 == 0 or not np.isfinite(abs(d1 / d2)):
                    break
                z -= d1 / d2
                if abs(d1 / d2) < 1e-12 * (1 + abs(z)):
                    break
            scale = abs(complex(psi_scalar(z, eps))) + abs(complex(dpsi_scalar(z.real, eps)))
            if abs(z) < 1e4 and abs(complex(dpsi_scalar(z, eps))) < 1e-9 * max(scale, 1e-300):
                found.append(z)
    assert found  # the search does find critical points (z* at least)
    assert max(abs(z.imag) for z in found) < 1e-6
    m, z_star = min_gain_point(eps)
    assert min(abs(z - z_star) for z in found) < 1e-6 * (1 + abs(z_star))
