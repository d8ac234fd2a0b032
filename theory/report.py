"""Claim-by-claim numerical verification of the linear representability results.

:func:`verify_claims` returns one dict per claim with the keys ``id``, ``statement``,
``source`` ("paper abstract", "design notes" or "derived here"), ``cases`` (how many were
tried), ``worst_error``, ``tolerance``, ``verdict`` ("holds" or "fails"), ``criterion`` (what
the verdict means), ``details``, ``notes`` (caveats worth reading, empty if none) and
``seconds``.  ``python -m theory`` prints them as a table.  A verdict is computed from the
numbers, never forced: a claim that fails numerically is reported as failing.
"""

from __future__ import annotations

import math
import time

import numpy as np
import scipy.linalg
import scipy.optimize

from ._checks import NotRepresentable
from .certify import CERTIFICATE_TOL, certify
from .psi import psi, psi_matrix
from .range import min_gain, min_gain_point
from .representability import construct, is_representable, representable_scale
from .samples import FAMILIES, reflection, sample_family

__all__ = ["verify_claims", "format_table"]


def _fit_order(hs: list[float], errs: list[float]) -> float:
    """Least-squares slope of log(err) against log(h) (includes pre-asymptotic points)."""
    x, y = np.log(hs), np.log(np.maximum(errs, 1e-300))
    return float(np.polyfit(x, y, 1)[0])


def _local_order(hs: list[float], errs: list[float]) -> float:
    """Observed order between the two finest levels: the asymptotic rate of convergence."""
    return float(math.log(max(errs[-2], 1e-300) / max(errs[-1], 1e-300))
                 / math.log(hs[-2] / hs[-1]))


def _claim(cid, statement, source, cases, worst, tol, holds, criterion, details, notes=""):
    return {
        "id": cid,
        "statement": statement,
        "source": source,
        "cases": int(cases),
        "worst_error": float(worst),
        "tolerance": float(tol),
        "verdict": "holds" if holds else "fails",
        "criterion": criterion,
        "details": details,
        "notes": notes,
    }


def claim_expm_limit(rng: np.random.Generator, quick: bool) -> dict:
    """Claim 1: Psi_eps(theta) -> expm(theta) as eps -> 0, at rate O(eps)."""
    epss = [1e-1, 1e-2, 1e-3, 1e-4] if quick else [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4]
    n_mat = 6 if quick else 20
    orders, local, finals, monotone = [], [], [], True
    for _ in range(n_mat):
        d = int(rng.integers(2, 6))
        theta = rng.standard_normal((d, d))
        ref = scipy.linalg.expm(theta)
        errs = [float(np.linalg.norm(psi_matrix(theta, e) - ref) / np.linalg.norm(ref))
                for e in epss]
        monotone &= all(b < a for a, b in zip(errs, errs[1:]))
        orders.append(_fit_order(epss, errs))
        local.append(_local_order(epss, errs))
        finals.append(errs[-1])
    worst = max(finals)
    tol = 100 * epss[-1]  # O(eps) with a constant <= 100 at the smallest eps
    holds = monotone and min(local) > 0.9 and worst <= tol
    return _claim(
        1, "Psi_eps(theta) -> expm(theta) as eps -> 0", "design notes",
        n_mat * len(epss), worst, tol, holds,
        "||Psi_eps - expm|| / ||expm|| decreases as eps decreases, observed order between the "
        "two smallest eps > 0.9, error at the smallest eps <= 100 eps",
        {"eps": epss, "observed_orders": local, "fitted_orders_all_eps": orders,
         "error_at_smallest_eps": finals},
    )


def claim_discrete_limit(rng: np.random.Generator, quick: bool) -> dict:
    """Claim 2: the Momentum ResNet with f_n(x) = x theta^T / N converges to Psi_eps(theta)."""
    import torch

    import mode

    depths = [50, 100, 200, 400, 800] if quick else [50, 100, 200, 400, 800, 1600, 3200]
    epss = [0.1, 0.5, 2.0]
    finals, orders, local, monotone = [], [], [], True
    for eps in epss:
        d = 3
        theta = rng.standard_normal((d, d))
        target = psi_matrix(theta, eps)
        th = torch.tensor(theta, dtype=torch.float64)
        errs = []
        for N in depths:
            gamma = mode.eps_to_gamma(eps, N)
            fns = [(lambda x, _n=N, _t=th: x @ _t.T / _n) for _ in range(N)]
            net = mode.MomentumResNet(fns, gamma, reversible=False)
            with torch.no_grad():
                X = net(torch.eye(d, dtype=torch.float64))  # rows e_i -> rows (Psi e_i)^T
            out = X.numpy().T
            errs.append(float(np.linalg.norm(out - target) / np.linalg.norm(target)))
        monotone &= all(b < a for a, b in zip(errs, errs[1:]))
        orders.append(_fit_order([1.0 / n for n in depths], errs))
        local.append(_local_order([1.0 / n for n in depths], errs))
        finals.append(errs[-1])
    worst = max(finals)
    tol = 10.0 / depths[-1]
    holds = monotone and min(local) > 0.9 and worst <= tol
    return _claim(
        2, "discrete Momentum ResNet (f_n = theta x / N, gamma = 1 - 1/(N eps)) -> Psi_eps(theta)",
        "design notes", len(epss) * len(depths), worst, tol, holds,
        "error decreases with depth N, observed order in 1/N between the two largest N > 0.9, "
        "error at the largest N <= 10/N",
        {"eps": epss, "depths": depths, "observed_orders": local,
         "fitted_orders_all_depths": orders, "error_at_largest_depth": finals,
         "network": "mode.MomentumResNet(reversible=False), float64"},
    )


def claim_range(quick: bool) -> dict:
    """Claim 3: the 1-D range is [m_eps, inf), m_eps < 0, decreasing in eps, tending to -1."""
    epss = list(np.logspace(-3, 6, 19 if quick else 46))
    ms = [min_gain(e) for e in epss]
    negative = all(m < 0 for m in ms)
    decreasing = all(b < a for a, b in zip(ms, ms[1:]))
    # independent brute force: the closed form on a dense z-grid over the first lobes and the
    # non-oscillating branch, refined by bounded Brent; also no sample may fall below m_eps
    rel_errs, below = [], 0.0
    for e, m in zip(epss[:: 2 if quick else 1], ms[:: 2 if quick else 1]):
        a = np.linspace(1e-3, 30.0, 40001)
        z_osc = -(1.0 + 4.0 * e * e * a * a) / (4.0 * e)
        z_pos = -1.0 / (4.0 * e) + np.linspace(0.0, 50.0, 2001)
        z = np.concatenate([z_osc, z_pos])
        v = psi(z, e)
        i = int(np.argmin(v))
        lo, hi = z[max(i - 1, 0)], z[min(i + 1, len(z) - 1)]
        lo, hi = min(lo, hi), max(lo, hi)
        res = scipy.optimize.minimize_scalar(lambda t, e=e: float(psi(t, e)), bounds=(lo, hi),
                                             method="bounded", options={"xatol": 1e-12})
        brute = min(float(res.fun), float(v[i]))
        rel_errs.append(abs(brute - m) / abs(m))
        below = max(below, (m - float(np.min(v))) / abs(m))
    # the limit -1: |m_eps + 1| must shrink along the eps >= 1 part of the grid, like 1/eps
    big = [(e, abs(m + 1.0)) for e, m in zip(epss, ms) if e >= 1.0]
    gaps = [g for _, g in big]
    tail_shrinks = all(b < a for a, b in zip(gaps, gaps[1:]))
    tail_order = _local_order([1.0 / e for e, _ in big], gaps)
    worst = max(rel_errs)
    tol = 1e-6
    holds = (negative and decreasing and worst <= tol and below <= 1e-9 and tail_shrinks
             and tail_order > 0.9)
    z_star = [min_gain_point(e)[1] for e in epss]
    return _claim(
        3, "1-D range of Psi_eps is [m_eps, inf); m_eps < 0, decreasing in eps, -> -1",
        "derived here", len(epss), worst, tol, holds,
        "m_eps < 0 and strictly decreasing on the eps grid, brute-force minimum matches "
        "(error = relative gap, <= tol), no sample below m_eps, |m_eps + 1| strictly "
        "decreasing for eps >= 1, observed order in 1/eps at the largest eps > 0.9",
        {"eps": epss, "m_eps": ms, "z_star": z_star, "brute_force_rel_error": rel_errs,
         "max_rel_sample_below_m": below, "abs_m_plus_1": gaps,
         "abs_m_plus_1_order_in_1_over_eps": tail_order,
         "note": "m_eps underflows to -0.0 in float64 for eps below about 6.6e-4"},
    )


def claim_growth(rng: np.random.Generator, quick: bool) -> dict:
    """Claim 4: the representable sets grow with eps (nested), over sampled matrices."""
    ladder = [0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0]
    n = 60 if quick else 300
    names = list(FAMILIES)
    mats = [sample_family(names[i % len(names)], rng) for i in range(n)]
    counts = [0] * len(ladder)
    violations = 0
    worst = 0.0
    constructed = 0
    ill = []
    for D in mats:
        flags = [is_representable(D, e) for e in ladder]
        for j, f in enumerate(flags):
            counts[j] += int(f)
        first = next((j for j, f in enumerate(flags) if f), None)
        if first is not None:
            violations += sum(1 for f in flags[first:] if not f)
            # a positive decision is backed by a preimage of D itself (scale 1), at every third
            # eps from the first positive one; a numerically unreliable one is listed, not hidden
            for e in ladder[first::3]:
                try:
                    con = construct(D, e)
                    residual, norm = con.residual, float(np.linalg.norm(con.theta))
                except NotRepresentable:
                    residual, norm = math.inf, math.nan
                if residual <= 1e-6:
                    worst = max(worst, residual)
                    constructed += 1
                else:
                    ill.append({"eps": e, "residual": residual, "theta_norm": norm,
                                "eigenvalues_re_im": [[float(x.real), float(x.imag)]
                                                      for x in np.linalg.eigvals(D)]})
    tol = 1e-6
    nondecreasing = all(b >= a for a, b in zip(counts, counts[1:]))
    holds = violations == 0 and nondecreasing and counts[-1] > counts[0] and worst <= tol
    notes = ""
    if ill:
        norms = [x["theta_norm"] for x in ill if not math.isnan(x["theta_norm"])]
        biggest = max(norms, default=math.nan)
        notes = (f"{len(ill)} of {constructed + len(ill)} positive decisions have no numerically "
                 "reliable preimage at scale 1 (residual > 1e-6; largest ||theta|| "
                 f"{biggest:.1e}): Jordan chains at an eigenvalue within ~|m_eps| of the "
                 "critical value; they are listed in details and not counted as backed")
    return _claim(
        4, "representable sets grow with eps (nested), over sampled matrices",
        "paper abstract", n * len(ladder), worst, tol, holds,
        "no matrix representable at eps loses it at a larger eps; counts grow strictly from "
        "eps=0 to the largest eps; preimages of positive decisions at scale 1 have residual "
        "<= tol (ill-conditioned ones are listed in the notes and details)",
        {"eps": ladder, "representable_counts": counts, "matrices": n,
         "nesting_violations": violations, "preimages_built": constructed,
         "ill_conditioned": ill, "families": names},
        notes,
    )


def claim_first_order_det(rng: np.random.Generator, quick: bool) -> dict:
    """Claim 5: first-order models cannot represent det < 0 maps, at any scale."""
    n = 30 if quick else 150
    scales = [1e-3, 1e-1, 1.0, 10.0, 1e3]
    mats = []
    while len(mats) < n:
        D = (reflection(int(rng.integers(2, 5)), rng) if len(mats) % 3 == 0
             else rng.standard_normal((int(rng.integers(2, 6)),) * 2))
        if np.linalg.det(D) < 0:
            mats.append(D)
    declared = sum(is_representable(s * D, 0.0) for D in mats for s in scales)
    # the reason, independently: det expm(theta) = exp(tr theta) > 0 for every real theta
    det_err, det_positive = 0.0, True
    for _ in range(n):
        d = int(rng.integers(2, 6))
        theta = 3.0 * rng.standard_normal((d, d))
        det = np.linalg.det(scipy.linalg.expm(theta))
        det_positive &= det > 0
        det_err = max(det_err, abs(det - math.exp(np.trace(theta))) / math.exp(np.trace(theta)))
    tol = 1e-8
    holds = declared == 0 and det_positive and det_err <= tol
    return _claim(
        5, "first-order (eps=0) models cannot represent det < 0 maps, at any positive scale",
        "paper abstract", n * len(scales) + n, det_err, tol, holds,
        "no det < 0 matrix (any scale) passes the real-logarithm criterion; det expm = e^tr > 0",
        {"scales": scales, "declared_representable": int(declared),
         "det_expm_rel_error_vs_exp_trace": det_err},
    )


def claim_up_to_factor(rng: np.random.Generator, quick: bool) -> dict:
    """Claim 6: momentum represents every sampled real matrix up to a positive factor."""
    epss = [0.05, 0.2, 1.0, 5.0] if quick else [0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0]
    per = 2 if quick else 6
    worst, failures, tried, amplification = 0.0, [], 0, 0.0
    factors = {name: [] for name in FAMILIES}
    for eps in epss:
        for name in FAMILIES:
            for _ in range(per):
                D = sample_family(name, rng)
                tried += 1
                try:
                    lam, theta = representable_scale(D, eps, certified=False)  # certified below
                except NotRepresentable as exc:
                    failures.append(f"eps={eps} {name}: {exc.reason}")
                    continue
                cert = certify(theta, lam * D, eps)
                worst = max(worst, cert.error)
                amplification = max(amplification, cert.amplification)
                factors[name].append(lam)
                if not cert.passed:
                    failures.append(f"eps={eps} {name}: certificate error {cert.error:.2e}")
    tol = CERTIFICATE_TOL
    holds = not failures and worst <= tol
    return _claim(
        6, "every sampled real matrix is Psi_eps(theta) up to a positive factor (eps > 0)",
        "paper abstract", tried, worst, tol, holds,
        "representable_scale succeeds on every sample and each (lambda, theta) is certified by "
        "solve_ivp: ||X(1) - lambda D|| / ||lambda D|| <= tol",
        {"eps": epss, "families": list(FAMILIES), "failures": failures,
         "max_certificate_amplification": amplification,
         "factor_range": {k: [min(v), max(v)] if v else None for k, v in factors.items()}},
    )


def claim_jacobian(rng: np.random.Generator, quick: bool) -> dict:
    """Claim 7: det of a momentum step's Jacobian is gamma^d; RevNet steps preserve volume."""
    import torch
    from torch.autograd.functional import jacobian

    from mode.steps import MomentumStep, apply_step

    from .volume import RevNetStep

    dims = [2, 4, 8] if quick else [2, 4, 8, 16]
    gammas = [0.1, 0.5, 0.9, 0.99]
    worst, cases = 0.0, 0
    dets = []
    for d in dims:
        W = torch.tensor(rng.standard_normal((d, d)), dtype=torch.float64)
        b = torch.tensor(rng.standard_normal(d), dtype=torch.float64)
        x = torch.tensor(rng.standard_normal(d), dtype=torch.float64)
        v = torch.tensor(rng.standard_normal(d), dtype=torch.float64)

        def f(y, W=W, b=b):
            return torch.tanh(y @ W.T + b)

        def g(y, W=W):
            return torch.sin(y @ W)

        for gamma in gammas:
            step = MomentumStep(f, gamma)

            def fm(s, step=step, d=d):
                out = apply_step(step, (s[:d], s[d:]))
                return torch.cat(out)

            J = jacobian(fm, torch.cat([x, v]))
            det = float(torch.linalg.det(J))
            err = abs(det - gamma**d) / gamma**d
            worst = max(worst, err)
            dets.append({"step": "momentum", "d": d, "gamma": gamma, "det": det,
                         "gamma^d": gamma**d})
            cases += 1
        rev = RevNetStep(f, g)

        def fr(s, rev=rev, d=d):
            return torch.cat(apply_step(rev, (s[:d], s[d:])))

        det = float(torch.linalg.det(jacobian(fr, torch.cat([x, v]))))
        worst = max(worst, abs(det - 1.0))
        dets.append({"step": "revnet", "d": d, "det": det})
        cases += 1
    tol = 1e-10
    return _claim(
        7, "momentum step Jacobian has det gamma^d < 1; RevNet-type steps have det 1",
        "design notes", cases, worst, tol, worst <= tol,
        "float64 autograd Jacobian of one step; relative error of det vs gamma^d (momentum) "
        "and |det - 1| (RevNet) <= tol",
        {"dims": dims, "gammas": gammas, "determinants": dets},
    )


def verify_claims(quick: bool = True, seed: int = 0) -> list[dict]:
    """Run every claim; deterministic given ``seed``.  ``quick`` keeps it under a minute.

    Returns
    -------
    list of dicts (keys: id, statement, source, cases, worst_error, tolerance, verdict,
    criterion, details, seconds).
    """
    if not isinstance(quick, bool):
        raise TypeError(f"quick must be a bool, got {type(quick).__name__}")
    rng = np.random.default_rng(seed)
    runs = [
        lambda: claim_expm_limit(rng, quick),
        lambda: claim_discrete_limit(rng, quick),
        lambda: claim_range(quick),
        lambda: claim_growth(rng, quick),
        lambda: claim_first_order_det(rng, quick),
        lambda: claim_up_to_factor(rng, quick),
        lambda: claim_jacobian(rng, quick),
    ]
    out = []
    for run in runs:
        t0 = time.perf_counter()
        claim = run()
        claim["seconds"] = time.perf_counter() - t0
        out.append(claim)
    return out


def format_table(claims: list[dict]) -> str:
    """The claims as a fixed-width text table."""
    head = f"{'#':>2}  {'verdict':7}  {'worst err':>9}  {'tol':>7}  {'cases':>5}  " \
           f"{'source':14}  statement"
    lines = [head, "-" * len(head)]
    for c in claims:
        lines.append(
            f"{c['id']:>2}  {c['verdict']:7}  {c['worst_error']:9.2e}  {c['tolerance']:7.0e}  "
            f"{c['cases']:>5}  {c['source']:14}  {c['statement']}"
        )
    return "\n".join(lines)
