"""The representability criterion on hand-built cases, certified preimages, bad input."""

import numpy as np
import pytest
import scipy.linalg

import theory
from theory.samples import FAMILIES, jordan_block, reflection, rotation, sample_family, similar


def _certified(theta, D, eps, tol=1e-7):
    cert = theory.certify(theta, D, eps)
    assert cert.passed and cert.error <= tol, cert
    return cert


# --- first order (eps = 0): the real-logarithm criterion ---------------------------------

def test_minus_identity_is_a_rotation_by_pi():
    D = -np.eye(2)
    assert theory.is_representable(D, 0.0)
    theta = theory.find_theta(D, 0.0)
    np.testing.assert_allclose(scipy.linalg.expm(theta), D, atol=1e-13)
    np.testing.assert_allclose(np.abs(np.linalg.eigvals(theta).imag), [np.pi, np.pi], rtol=1e-12)
    _certified(theta, D, 0.0)


@pytest.mark.parametrize("D", [np.diag([-1.0, 1.0]), np.diag([-2.0, -3.0])])
def test_first_order_rejects(D):
    assert not theory.is_representable(D, 0.0)
    with pytest.raises(theory.NotRepresentable, match="pairs"):
        theory.find_theta(D, 0.0)
    with pytest.raises(theory.NotRepresentable, match="no scale helps"):
        theory.representable_scale(D, 0.0)


def test_first_order_singular_and_det_negative_at_every_scale():
    assert not theory.is_representable(np.diag([0.0, 1.0]), 0.0)
    rng = np.random.default_rng(3)
    for _ in range(20):
        D = reflection(3, rng) @ rotation(3, rng)  # det -1
        for s in (1e-3, 1.0, 1e3):
            assert not theory.is_representable(s * D, 0.0)


def test_first_order_preimage_is_the_principal_log_without_negative_eigenvalues():
    rng = np.random.default_rng(4)
    theta0 = 0.5 * rng.standard_normal((4, 4))
    D = scipy.linalg.expm(theta0)
    theta = theory.find_theta(D, 0.0)
    np.testing.assert_allclose(theta, scipy.linalg.logm(D).real, atol=1e-10)
    _certified(theta, D, 0.0)


def test_first_order_paired_jordan_blocks():
    rng = np.random.default_rng(5)
    J = scipy.linalg.block_diag(jordan_block(-2.0, 2), jordan_block(-2.0, 2))
    D = similar(J, rng)
    assert theory.is_representable(D, 0.0)
    _certified(theory.find_theta(D, 0.0), D, 0.0)
    D_bad = similar(scipy.linalg.block_diag(jordan_block(-2.0, 2), [[-2.0]], [[-2.0]]), rng)
    assert not theory.is_representable(D_bad, 0.0)  # blocks 2, 1, 1: the 2 is unpaired


# --- momentum (eps > 0) -----------------------------------------------------------------

def test_momentum_threshold_on_negative_eigenvalues():
    eps = 0.5
    m = theory.min_gain(eps)
    assert theory.is_representable(np.diag([0.9 * m, 2.0]), eps)
    assert not theory.is_representable(np.diag([1.1 * m, 2.0]), eps)
    assert not theory.is_representable(np.diag([-2.0, -3.0]), eps)
    # a pair below m_eps is represented by a complex-conjugate pair of theta eigenvalues
    D = np.diag([-2.0, -2.0, 1.0])
    theta = theory.find_theta(D, eps)
    ev = np.linalg.eigvals(theta)
    assert np.sum(np.abs(ev.imag) > 1e-6) == 2
    _certified(theta, D, eps)


def test_representable_sets_nest_in_eps():
    D = np.diag([-0.3, 1.2])
    ladder = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 5.0]
    flags = [theory.is_representable(D, e) for e in ladder]
    first = flags.index(True)
    assert all(flags[first:]) and not any(flags[:first])
    # the switch happens where m_eps crosses -0.3
    assert theory.min_gain(ladder[first]) <= -0.3 < theory.min_gain(ladder[first - 1])


@pytest.mark.parametrize("eps", [0.05, 0.3, 2.0])
def test_singular_maps_are_representable_with_momentum(eps):
    D = np.zeros((2, 2))
    theta = theory.find_theta(D, eps)
    np.testing.assert_allclose(theory.psi(theta, eps), D, atol=1e-12)
    rng = np.random.default_rng(6)
    S = rng.standard_normal((3, 2)) @ rng.standard_normal((2, 3))
    lam, theta = theory.representable_scale(S, eps)
    _certified(theta, lam * S, eps)


@pytest.mark.parametrize("eps", [0.1, 0.7])
def test_defective_and_complex_cases_are_certified(eps):
    rng = np.random.default_rng(7)
    cases = [
        similar(jordan_block(2.0, 3), rng),
        similar(scipy.linalg.block_diag(jordan_block(-3.0, 2), jordan_block(-3.0, 2)), rng),
        similar(np.kron(np.eye(2), [[0.5, -1.0], [1.0, 0.5]]) + np.kron(np.eye(2, k=1),
                                                                        np.eye(2)), rng),
        rotation(3, rng),
        -np.eye(2),
    ]
    for D in cases:
        assert theory.is_representable(D, eps)
        _certified(theory.find_theta(D, eps), D, eps)


@pytest.mark.parametrize("eps", [0.05, 0.5, 3.0])
def test_every_family_is_representable_up_to_a_factor(eps):
    rng = np.random.default_rng(8)
    for name in FAMILIES:
        D = sample_family(name, rng)
        lam, theta = theory.representable_scale(D, eps)
        assert lam > 0
        if theory.is_representable(D, eps):
            assert lam == 1.0
        else:
            assert lam < 1.0
        _certified(theta, lam * D, eps)


def test_reason_names_the_eigenvalue():
    with pytest.raises(theory.NotRepresentable) as info:
        theory.find_theta(np.diag([-5.0, 1.0, 2.0]), 1.0)
    assert "-5" in info.value.reason and "m_eps" in info.value.reason


# --- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [theory.is_representable, theory.find_theta,
                                theory.representable_scale])
def test_bad_input(fn):
    with pytest.raises(ValueError, match="square"):
        fn(np.ones((2, 3)), 0.1)
    with pytest.raises(ValueError, match="finite"):
        fn(np.array([[1.0, np.inf], [0.0, 1.0]]), 0.1)
    with pytest.raises(ValueError, match="eps"):
        fn(np.eye(2), -0.1)
    with pytest.raises(TypeError, match="real matrix"):
        fn(np.eye(2) * 1j, 0.1)


def test_certificate_detects_a_wrong_preimage():
    theta = np.array([[0.1, 0.0], [0.0, -0.2]])
    cert = theory.certify(theta, theory.psi(theta, 0.4) + 1e-3, 0.4)
    assert not cert.passed and cert.error > 1e-4
    with pytest.raises(ValueError, match="same shape"):
        theory.certify(np.eye(2), np.eye(3), 0.4)


# --- tolerances and conditioning ----------------------------------------------------------

def test_near_degenerate_spectra_follow_the_documented_tolerances():
    eps = 0.5
    # a complex pair 1e-7 off the real axis below m_eps: representable (conjugate preimages)
    D = np.array([[-2.0, -1e-7], [1e-7, -2.0]])
    assert theory.is_representable(D, eps)
    _certified(theory.find_theta(D, eps), D, eps)
    # two distinct real eigenvalues 1e-7 apart below m_eps: two unpaired 1x1 blocks
    assert not theory.is_representable(np.diag([-2.0, -2.0 - 1e-7]), eps)


def test_scale_of_d_does_not_blur_the_critical_value():
    # cluster radius scales with ||D||; an eigenvalue 3 of a matrix of norm ~1e6 must still be
    # handled on the regular branch (not at the critical value m_eps ~ -0.38)
    rng = np.random.default_rng(9)
    D = similar(np.diag([-1e6, -1e6, 3.0]), rng, cond_max=10)
    an = theory.analyze(D, 0.5)
    assert [c.treatment for c in an.clusters] == ["paired", "primary"]
    _certified(theory.find_theta(D, 0.5), D, 0.5)


def test_certificate_reports_amplification_near_a_zero_of_psi():
    D = 1e-8 * np.eye(2)  # Psi_eps(theta) = 1e-8: x(t) is O(1) and crosses zero near t = 1
    con = theory.construct(D, 0.3)
    cert = theory.certify(con.theta, D, 0.3)
    assert cert.amplification > 1e7
    assert cert.error <= 100 * cert.rtol * cert.amplification


def test_find_theta_refuses_what_its_certificate_cannot_confirm():
    D = 1e-8 * np.eye(2)
    assert theory.is_representable(D, 0.3)
    with pytest.raises(theory.NotRepresentable, match="certificate failed.*amplification"):
        theory.find_theta(D, 0.3)
    theta = theory.find_theta(D, 0.3, certified=False)  # closed-form residual check only
    np.testing.assert_allclose(theory.psi(theta, 0.3), D, rtol=1e-6)


@pytest.mark.parametrize("eps,k", [(0.05, 3), (0.01, 2)])
def test_nilpotent_blocks_need_the_small_scale(eps, k):
    # a Jordan chain at 0 much longer than |m_eps| makes theta = g(D) huge (0 is |m_eps| from
    # the critical value), and at eps = 0.01 |m_eps| ~ 2e-21 is below D's rank threshold; the
    # scale fraction |m_eps| / ||D|| resolves both
    rng = np.random.default_rng(10)
    D = similar(scipy.linalg.block_diag(jordan_block(0.0, k), [[1.0]]), rng, cond_max=50)
    lam, theta = theory.representable_scale(D, eps)
    assert 0 < lam <= 0.5 * abs(theory.min_gain(eps)) / np.linalg.norm(D, 2) * (1 + 1e-12)
    _certified(theta, lam * D, eps)


def test_at_the_critical_value():
    eps = 0.5
    m = theory.min_gain(eps)
    # semisimple at m_eps: theta = z* I, the minimiser of Psi_eps on the real line
    theta = theory.find_theta(m * np.eye(2), eps)
    np.testing.assert_allclose(theory.psi(np.diag(theta), eps), [m, m], rtol=1e-12)
    # one Jordan block J_2(m_eps): Psi' = 0 at z*, so no real preimage keeps the block; the
    # critical splitting is not implemented, and the answer says so instead of guessing
    an = theory.analyze(jordan_block(m, 2), eps)
    assert not an.representable and "critical value" in an.reason
    # a pair of J_2(m_eps) blocks: a conjugate pair of non-real preimages
    D = scipy.linalg.block_diag(jordan_block(m, 2), jordan_block(m, 2))
    _certified(theory.find_theta(D, eps), D, eps)
