"""Exact decisions: per-eigenvalue bounds, exact singularity, "undecided", the critical rule,
tiny scales, overflow-free thresholds and psi near DBL_MAX."""

import importlib
import math

import mpmath
import numpy as np
import pytest
import scipy.linalg

import theory
from theory.representability import exact_det_sign, pairs_within_one
from theory.samples import jordan_block, similar


def _certified(theta, D, eps, tol=1e-7):
    cert = theory.certify(theta, D, eps)
    assert cert.passed and cert.error <= tol, cert
    return cert


def test_tiny_positive_eigenvalue_is_not_singular_at_eps_0():
    D = np.diag([1.0, 1e-9])
    assert theory.decide(D, 0.0).verdict == "representable"
    theta = theory.find_theta(D, 0.0)
    np.testing.assert_allclose(theta, np.diag([0.0, math.log(1e-9)]), atol=1e-12)
    # below every rounding bound, the sign comes from the exact determinant
    assert theory.is_representable(np.diag([1.0, 1e-17]), 0.0)
    assert not theory.is_representable(np.diag([1.0, -1e-17]), 0.0)


@pytest.mark.parametrize("D", [np.diag([1.0, 0.0]), np.array([[1.0, 2.0], [2.0, 4.0]]),
                               np.array([[3.0, 1.0, 2.0], [6.0, 2.0, 4.0], [1.0, 5.0, -1.0]])])
def test_exactly_singular_maps_are_decided_at_eps_0(D):
    dec = theory.decide(D, 0.0)
    assert dec.verdict == "not representable" and "singular" in dec.reason


def test_exact_determinant_sign_against_fractions():
    from fractions import Fraction

    rng = np.random.default_rng(0)
    for d in (1, 2, 3, 5):
        A = rng.standard_normal((d, d))
        # independent exact determinant: Leibniz/Laplace in Fractions
        def det(M):
            if len(M) == 1:
                return M[0][0]
            return sum((-1) ** j * M[0][j] * det([r[:j] + r[j + 1:] for r in M[1:]])
                       for j in range(len(M)))
        ref = det([[Fraction(float(x)) for x in row] for row in A])
        assert exact_det_sign(A) == (ref > 0) - (ref < 0)
    assert exact_det_sign(np.array([[1.0, 2.0], [0.5, 1.0]])) == 0


def test_unpaired_eigenvalue_just_below_a_tiny_m_eps():
    # m_0.01 ~ -2.1e-21; -1e-10 is far below it at its own error bound (~1e-14)
    assert theory.min_gain(0.01) > -1e-20
    dec = theory.decide(np.diag([1.0, -1e-10]), 0.01)
    assert dec.verdict == "not representable" and "-1e-10" in dec.reason


def test_undecided_cases_say_so():
    rng = np.random.default_rng(1)
    D = similar(jordan_block(0.0, 3), rng, cond_max=20)
    dec = theory.decide(D, 0.01)
    assert dec.verdict == "undecided" and "error bound" in dec.reason
    with pytest.raises(theory.Undecided, match="undecided"):
        theory.is_representable(D, 0.01)
    # ... and a smaller scale resolves it (0 is then clearly above m_eps)
    lam, theta = theory.representable_scale(D, 0.01)
    _certified(theta, lam * D, 0.01)


def test_critical_pairing_rule():
    assert pairs_within_one({2: 1, 1: 1}) and pairs_within_one({3: 1, 2: 1})
    assert pairs_within_one({1: 3}) and pairs_within_one({4: 2, 1: 1})
    assert pairs_within_one({3: 1, 2: 1, 1: 2})
    assert not pairs_within_one({2: 1}) and not pairs_within_one({3: 1, 1: 1})
    assert not pairs_within_one({4: 1, 2: 1})


@pytest.mark.parametrize("sizes,ok", [((2, 1), True), ((3, 2), True), ((2,), False),
                                      ((3, 1), False), ((2, 2), True)])
def test_blocks_at_the_critical_value(sizes, ok):
    eps = 1.0
    m = theory.min_gain(eps)
    rng = np.random.default_rng(2)
    D = similar(scipy.linalg.block_diag(*[jordan_block(m, k) for k in sizes], [[1.5]]), rng,
                cond_max=20)
    plain = theory.decide(D, eps)
    equal_pairs = all(sizes.count(k) % 2 == 0 for k in sizes)  # representable on both sides
    assert plain.verdict == ("representable" if equal_pairs else "undecided")
    exact = theory.decide(D, eps, assume_critical=True)
    assert exact.verdict == ("representable" if ok else "not representable")
    if ok:
        theta = theory.find_theta(D, eps, assume_critical=True)
        _certified(theta, D, eps)


def test_critical_block_image_structure_independently():
    # J_3(z*) maps to J_2(m) + J_1(m): rank of Psi(J_3(z*)) - m is 1, its square is 0
    eps = 1.0
    m, z = theory.range.min_gain_point(eps)
    Q = theory.psi(z * np.eye(3) + np.eye(3, k=1), eps) - m * np.eye(3)
    sv = np.linalg.svd(Q, compute_uv=False)
    assert sv[0] > 1e-3 and sv[1] < 1e-12
    assert np.linalg.norm(Q @ Q) < 1e-12


def test_tiny_scales_are_certified_on_a_rescaled_problem():
    D = np.diag([-1.0, 1.0])
    for eps in (1e-3, 1.2e-3):
        lam, theta = theory.representable_scale(D, eps)
        assert 0 < lam < 1e-150
        _certified(theta, lam * D, eps)
        wrong = theta + 1e-3 * np.eye(2)  # a deliberately wrong theta must not pass
        assert not theory.certify(wrong, lam * D, eps).passed


@pytest.mark.parametrize("D,eps", [(100 * np.eye(200), 0.0), (1e5 * np.eye(64), 0.0),
                                   (10 * np.eye(400), 1.0)])
def test_large_scaled_identities_do_not_overflow(D, eps):
    assert theory.is_representable(D, eps)


def test_psi_near_dbl_max_against_mpmath():
    mpmath.mp.dps = 50
    z, eps = mpmath.mpf("1213.4333"), mpmath.mpf("1e-3")
    c, s = 1 / (2 * eps), mpmath.sqrt(1 + 4 * eps * z)
    ref = float(mpmath.e ** (-c) * (mpmath.cosh(c * s) + mpmath.sinh(c * s) / s))
    assert ref > 1e308
    assert theory.psi(1213.4333, 1e-3) == pytest.approx(ref, rel=1e-12)
    out = theory.psi(np.array([1213.4333 + 0j, 2000.0 + 0j]), 1e-3)
    assert out[0].real == pytest.approx(ref, rel=1e-12) and out[0].imag == 0
    assert out[1] == complex(math.inf, 0)  # overflow is inf + 0j, not inf + nan j
    assert not np.isnan(theory.psi(np.array([1500.0 + 1.0j]), 1e-3)).any()


def test_log_of_the_subnormal_min_gain_against_mpmath():
    mpmath.mp.dps = 50
    eps = mpmath.mpf("6.68e-4")
    c = 1 / (2 * eps)
    a = mpmath.findroot(lambda a: a * a * mpmath.sin(a) + c * (mpmath.sin(a) - a * mpmath.cos(a)),
                        4.4)
    log_neg_m = -c + mpmath.log(-(mpmath.cos(a) + c * mpmath.sin(a) / a))
    assert theory.range.log_neg_min_gain(6.68e-4) == pytest.approx(float(log_neg_m), rel=1e-14)


def test_a_wrong_psi_cannot_hang_the_continuation(monkeypatch):
    psi_mod = importlib.import_module("theory.psi")  # the module (theory.psi is the function)
    real = psi_mod._psi_closed_form
    monkeypatch.setattr(psi_mod, "_psi_closed_form", lambda z, e: -real(z, e))
    with pytest.raises((theory.NotRepresentable, ArithmeticError, ValueError)):
        theory.inverse.preimage(-0.9 + 0.1j, 0.5)
