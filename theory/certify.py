r"""Certificates: an independent integration of ``eps x'' + x' = theta x`` checks a preimage.

For each basis vector ``e_i`` the ODE is integrated on ``[0, 1]`` from ``x(0) = e_i``,
``x'(0) = 0`` with :func:`scipy.integrate.solve_ivp` (all columns at once, as the first-order
system ``X' = U``, ``U' = (theta X - U) / eps``; ``X' = theta X`` at ``eps = 0``).  The matrix
``X(1)`` must equal ``D``; the certificate holds the relative Frobenius error.  No closed form
and no ``expm`` is used, so the check is independent of :func:`theory.psi`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.integrate

from ._checks import check_eps, check_square_real

__all__ = ["Certificate", "certify", "flow_matrix", "flow_shift", "rel_frobenius"]

CERTIFICATE_TOL = 1e-6


@dataclass
class Certificate:
    """``error = ||X(1) - D||_F / ||D||_F`` with ``X(1)`` from ``solve_ivp``; ``passed`` if
    ``error <= tolerance``.  ``amplification = max_t ||X(t)||_F / ||D||_F`` is the conditioning:
    the solver's relative accuracy ``rtol`` holds along the trajectory, so ``error`` can only be
    expected near ``rtol * amplification`` (large when ``D`` sits near a zero of ``Psi``)."""

    error: float
    tolerance: float
    passed: bool
    method: str
    rtol: float
    atol: float
    nfev: int
    amplification: float


def rel_frobenius(A: np.ndarray, B: np.ndarray) -> float:
    """``||A - B||_F / ||B||_F`` computed after dividing both by ``max |B|`` (no underflow of
    the squares when ``B`` is tiny, e.g. ``1e-217``); ``inf`` if not finite; the absolute
    ``||A||_F`` when ``B = 0``."""
    s = float(np.max(np.abs(B))) if B.size else 0.0
    if s == 0.0:
        top = float(np.max(np.abs(A))) if A.size else 0.0
        if not np.isfinite(top):
            return float("inf")
        return top * float(np.linalg.norm(A / top)) if top > 0 else 0.0
    with np.errstate(all="ignore"):
        err = float(np.linalg.norm((A - B) / s)) / float(np.linalg.norm(B / s))
    return err if np.isfinite(err) else float("inf")


def flow_shift(D: np.ndarray, eps: float) -> float:
    """The exponent ``alpha`` of the rescaling ``X(t) = exp(alpha t) Y(t)`` used to certify ``D``.

    ``alpha = log max|D|`` clipped to ``[-1/(2 eps), 0]``: a tiny ``D`` (small ``eps`` gives
    values of order ``exp(-1/(2 eps))``) becomes ``exp(-alpha) D = O(1)``, so no norm or
    solver tolerance underflows; ``alpha = 0`` (no change) when ``max|D| >= 1``."""
    top = float(np.max(np.abs(D)))
    if top == 0.0 or top >= 1.0:
        return 0.0
    floor = -1.0 / (2.0 * eps) if eps > 0 else -np.inf
    return float(max(floor, math.log(top)))


def flow_matrix(theta, eps: float, *, rtol: float = 1e-12, atol: float = 1e-13,
                method: str | None = None, shift: float = 0.0
                ) -> tuple[np.ndarray, str, int, float]:
    """``Y(1)`` for ``X(t) = exp(shift t) Y(t)``, ``eps X'' + X' = theta X``, ``X(0) = I``,
    ``X'(0) = 0``, by ``solve_ivp`` (``shift = 0``: ``Y = X``).

    ``Y`` solves ``eps Y'' + (1 + 2 eps a) Y' = (theta - a - eps a^2) Y``, ``Y(0) = I``,
    ``Y'(0) = -a I`` (``a = shift``; at ``eps = 0``: ``Y' = (theta - a) Y``), so
    ``X(1) = exp(a) Y(1)``.  ``method`` defaults to ``"DOP853"`` for ``eps >= 1e-4`` or
    ``eps = 0`` and to ``"Radau"`` (stiff, with the constant Jacobian) for smaller ``eps``.
    Returns ``(Y1, method, nfev, peak)`` with ``peak = max_t ||Y(t)||_F`` over the solver's
    steps.  Raises ``RuntimeError`` if the solver fails.
    """
    theta = check_square_real(theta, "theta")
    eps = check_eps(eps)
    d = theta.shape[0]
    a = float(shift)
    if eps == 0.0:
        T0 = theta - a * np.eye(d)
        A = np.kron(T0, np.eye(d))  # vec (row-major) of T0 Y

        def rhs0(t, y):
            return (T0 @ y.reshape(d, d)).ravel()

        m = method or "DOP853"
        sol = scipy.integrate.solve_ivp(rhs0, (0.0, 1.0), np.eye(d).ravel(), method=m,
                                        rtol=rtol, atol=atol,
                                        **({"jac": A} if m in ("Radau", "BDF", "LSODA") else {}))
        if not sol.success:
            raise RuntimeError(f"solve_ivp failed: {sol.message}")
        peak = float(np.max(np.linalg.norm(sol.y, axis=0)))
        return sol.y[:, -1].reshape(d, d), m, int(sol.nfev), peak

    K = theta - (a + eps * a * a) * np.eye(d)
    damping = 1.0 + 2.0 * eps * a

    def rhs(t, y):
        X = y[: d * d].reshape(d, d)
        U = y[d * d:].reshape(d, d)
        return np.concatenate([U.ravel(), ((K @ X - damping * U) / eps).ravel()])

    m = method or ("DOP853" if eps >= 1e-4 else "Radau")
    extra = {}
    if m in ("Radau", "BDF", "LSODA"):
        n = d * d
        J = np.zeros((2 * n, 2 * n))
        J[:n, n:] = np.eye(n)
        J[n:, :n] = np.kron(K, np.eye(d)) / eps
        J[n:, n:] = -damping * np.eye(n) / eps
        extra["jac"] = J
    y0 = np.concatenate([np.eye(d).ravel(), -a * np.eye(d).ravel()])
    sol = scipy.integrate.solve_ivp(rhs, (0.0, 1.0), y0, method=m, rtol=rtol, atol=atol, **extra)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed: {sol.message}")
    peak = float(np.max(np.linalg.norm(sol.y[: d * d], axis=0)))
    return sol.y[: d * d, -1].reshape(d, d), m, int(sol.nfev), peak


def certify(theta, D, eps: float, *, tolerance: float = CERTIFICATE_TOL, rtol: float = 1e-12,
            atol: float | None = None, method: str | None = None) -> Certificate:
    """Certify ``Psi_eps(theta) = D`` by integrating the ODE for every basis vector.

    A tiny ``D`` is certified on the rescaled problem ``Y = exp(-alpha t) X``
    (:func:`flow_shift`), so that ``exp(-alpha) D = O(1)``: relative errors, norms and the
    solver's ``atol`` never underflow.  A solver failure is a failed certificate
    (``error = inf``, the message in ``method``), not an exception.

    Parameters
    ----------
    theta, D : (d, d) real arrays
    eps : float >= 0
    tolerance : relative Frobenius error accepted
    rtol, atol : ``solve_ivp`` tolerances; ``atol`` defaults to
        ``1e-3 rtol min(1, max|exp(-alpha) D|)``

    Returns
    -------
    Certificate
    """
    D = check_square_real(D)
    theta = check_square_real(theta, "theta")
    eps = check_eps(eps)
    if theta.shape != D.shape:
        raise ValueError(f"theta and D must have the same shape, got {theta.shape} and {D.shape}")
    alpha = flow_shift(D, eps)
    target = D * math.exp(-alpha)
    if atol is None:
        atol = 1e-3 * rtol * min(1.0, float(np.max(np.abs(target))) or 1.0)
    try:
        Y1, m, nfev, peak = flow_matrix(theta, eps, rtol=rtol, atol=atol, method=method,
                                        shift=alpha)
    except RuntimeError as exc:
        return Certificate(math.inf, tolerance, False, f"failed: {exc}", rtol, atol, 0, math.inf)
    err = rel_frobenius(Y1, target)
    s = float(np.max(np.abs(target))) or 1.0
    amp = peak / s / (float(np.linalg.norm(target / s)) or 1.0)
    return Certificate(err, tolerance, bool(err <= tolerance), m, rtol, atol, nfev, amp)
