"""Mutation tests of the theory report: a deliberately wrong implementation of what a claim
checks must make that claim fail, quickly, and never hang.

(a) the criterion says True for every eps > 0; (b) Psi has a sign error; (c) the preimage
finder returns a wrong theta; (d) the gamma mapping eps_to_gamma is wrong.  Each test runs
the affected claims in quick mode under an alarm, and checks the specific safeguard in the
claim's details, so that removing one safeguard makes its assertion fail.
"""

import importlib
import signal
import time
from contextlib import contextmanager

import numpy as np
import pytest

import mode
import theory.inverse
import theory.range
import theory.representability
from theory import report

psi_module = importlib.import_module("theory.psi")  # theory.psi is also the function psi

LIMIT_S = 60  # a hang becomes a failure; each test takes a few seconds


@contextmanager
def deadline(seconds=LIMIT_S):
    def stop(signum, frame):
        raise TimeoutError(f"the claim ran longer than {seconds} s (a hang?)")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert time.perf_counter() - t0 < seconds


def rng():
    return np.random.default_rng(0)


def test_unmutated_small_claims_hold():
    """The baseline: the same small runs hold without a mutation."""
    with deadline():
        assert report.claim_growth(rng(), True, n=6)["verdict"] == "holds"
        assert report.claim_up_to_factor(rng(), True, per=1)["verdict"] == "holds"


def test_criterion_saying_true_for_every_positive_eps_fails(monkeypatch):
    real = report.is_representable

    def lenient(D, eps, **kw):
        return True if eps > 0 else real(D, eps, **kw)

    monkeypatch.setattr(report, "is_representable", lenient)
    with deadline():
        growth = report.claim_growth(rng(), True, n=6)
        scale = report.claim_up_to_factor(rng(), True, per=1)
    assert growth["verdict"] == "fails"
    assert growth["details"]["unbacked"], "positive decisions without a preimage went unseen"
    assert growth["details"]["disagreements"], "the eigenvalue route did not object"
    assert scale["verdict"] == "fails"
    assert any("lambda=" in f and "< 1" in f for f in scale["details"]["failures"])


def _negated(fn):
    return lambda *a, **k: -fn(*a, **k)


def test_psi_with_a_sign_error_fails_and_does_not_hang(monkeypatch):
    # theory.psi.psi dispatches to these two through its module globals; the other modules
    # hold their own references, patched one by one
    for mod in (psi_module, theory.inverse, theory.range, theory.representability, report):
        for name in ("psi_scalar", "psi_matrix"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, _negated(getattr(mod, name)))
    monkeypatch.setattr(report, "psi", psi_module.psi)
    with deadline():
        expm = report.claim_expm_limit(rng(), True)
        rng_claim = report.claim_range(True)
        growth = report.claim_growth(rng(), True, n=6)
    assert expm["verdict"] == "fails"
    assert rng_claim["verdict"] == "fails"
    assert growth["verdict"] == "fails" and growth["details"]["unbacked"]


def test_wrong_preimage_fails(monkeypatch):
    real_construct, real_find = report.construct, theory.representability.find_theta

    def bad_construct(D, eps, **kw):
        con = real_construct(D, eps, **kw)
        con.theta = con.theta + 1e-3  # its reported residual is left as it was
        return con

    def bad_find(D, eps, **kw):
        return real_find(D, eps, **kw) + 1e-3

    monkeypatch.setattr(report, "construct", bad_construct)
    monkeypatch.setattr(theory.representability, "find_theta", bad_find)
    with deadline():
        growth = report.claim_growth(rng(), True, n=6)
        scale = report.claim_up_to_factor(rng(), True, per=1)
    assert growth["verdict"] == "fails"
    assert all("certificate error" in u["why"] for u in growth["details"]["unbacked"])
    assert growth["details"]["backed_by_certified_preimage"] == 0
    assert scale["verdict"] == "fails"
    assert any("certificate error" in f for f in scale["details"]["failures"])


def test_wrong_gamma_mapping_fails(monkeypatch):
    real = mode.eps_to_gamma

    def wrong(eps, depth, horizon=1.0):
        return real(2 * eps, depth, horizon)  # 1 - 1/(2 N eps) instead of 1 - 1/(N eps)

    monkeypatch.setattr(mode, "eps_to_gamma", wrong)
    with deadline():
        limit = report.claim_discrete_limit(rng(), True)
        depth = report.claim_finite_depth(True)
    assert limit["verdict"] == "fails"
    assert depth["verdict"] == "fails"
    assert depth["details"]["errors"]["discrete_psi_vs_MomentumResNet"] > 1e-3
    assert depth["details"]["errors"]["N=2_closed_form"] > 1e-3


def test_a_crashing_check_is_a_failure_not_an_exception(monkeypatch):
    def broken(*a, **k):
        raise np.linalg.LinAlgError("broken on purpose")

    monkeypatch.setattr(report, "construct", broken)
    monkeypatch.setattr(theory.representability, "find_theta", broken)
    with deadline():
        growth = report.claim_growth(rng(), True, n=6)
        scale = report.claim_up_to_factor(rng(), True, per=1)
    assert growth["verdict"] == "fails" and "LinAlgError" in growth["details"]["unbacked"][0]["why"]
    assert scale["verdict"] == "fails"


@pytest.mark.parametrize("claim", ["claim_tied_resnet", "claim_proofs"])
def test_derived_claims_fail_under_a_wrong_discrete_or_energy_rule(monkeypatch, claim):
    """Claims 9 and 10 against a broken tied-ResNet floor / a broken m_eps."""
    if claim == "claim_tied_resnet":
        import theory.discrete
        real = theory.discrete.discrete_min_gain
        monkeypatch.setattr(theory.discrete, "discrete_min_gain",
                            lambda eps, N: -1.0 if eps == 0 and N % 2 == 0 else real(eps, N))
        run = lambda: report.claim_tied_resnet(rng(), True)  # noqa: E731
    else:
        real = report.min_gain
        monkeypatch.setattr(report, "min_gain", lambda e: real(e) - 1.0)
        run = lambda: report.claim_proofs(True)  # noqa: E731
    with deadline():
        assert run()["verdict"] == "fails"
