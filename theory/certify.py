r"""Certificates: an independent integration of ``eps x'' + x' = theta x`` checks a preimage.

For each basis vector ``e_i`` the ODE is integrated on ``[0, 1]`` from ``x(0) = e_i``,
``x'(0) = 0`` with :func:`scipy.integrate.solve_ivp` (all columns at once, as the first-order
system ``X' = U``, ``U' = (theta X - U) / eps``; ``X' = theta X`` at ``eps = 0``).  The matrix
``X(1)`` must equal ``D``; the certificate holds the relative Frobenius error.  No closed form
and no ``expm`` is used, so the check is independent of :func:`theory.psi`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.integrate

from ._checks import check_eps, check_square_real

__all__ = ["Certificate", "certify", "flow_matrix"]

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


def flow_matrix(theta, eps: float, *, rtol: float = 1e-12, atol: float = 1e-13,
                method: str | None = None) -> tuple[np.ndarray, str, int, float]:
    """``X(1)`` for ``eps X'' + X' = theta X``, ``X(0) = I``, ``X'(0) = 0`` by ``solve_ivp``.

    ``method`` defaults to ``"DOP853"`` for ``eps >= 1e-4`` or ``eps = 0`` (the fast mode
    ``-1/eps`` is within its stability region at the step sizes that ``rtol`` needs anyway) and
    to ``"Radau"`` (stiff, with the constant Jacobian) for smaller ``eps``.  Returns
    ``(X1, method, nfev, peak)`` with ``peak = max_t ||X(t)||_F`` over the solver's steps.
    """
    theta = check_square_real(theta, "theta")
    eps = check_eps(eps)
    d = theta.shape[0]
    if eps == 0.0:
        A = np.kron(theta, np.eye(d))  # vec (row-major) of theta X

        def rhs0(t, y):
            return (theta @ y.reshape(d, d)).ravel()

        m = method or "DOP853"
        sol = scipy.integrate.solve_ivp(rhs0, (0.0, 1.0), np.eye(d).ravel(), method=m,
                                        rtol=rtol, atol=atol,
                                        **({"jac": A} if m in ("Radau", "BDF", "LSODA") else {}))
        if not sol.success:
            raise RuntimeError(f"solve_ivp failed: {sol.message}")
        peak = float(np.max(np.linalg.norm(sol.y, axis=0)))
        return sol.y[:, -1].reshape(d, d), m, int(sol.nfev), peak

    def rhs(t, y):
        X = y[: d * d].reshape(d, d)
        U = y[d * d:].reshape(d, d)
        return np.concatenate([U.ravel(), ((theta @ X - U) / eps).ravel()])

    m = method or ("DOP853" if eps >= 1e-4 else "Radau")
    extra = {}
    if m in ("Radau", "BDF", "LSODA"):
        n = d * d
        J = np.zeros((2 * n, 2 * n))
        J[:n, n:] = np.eye(n)
        J[n:, :n] = np.kron(theta, np.eye(d)) / eps
        J[n:, n:] = -np.eye(n) / eps
        extra["jac"] = J
    y0 = np.concatenate([np.eye(d).ravel(), np.zeros(d * d)])
    sol = scipy.integrate.solve_ivp(rhs, (0.0, 1.0), y0, method=m, rtol=rtol, atol=atol, **extra)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed: {sol.message}")
    peak = float(np.max(np.linalg.norm(sol.y[: d * d], axis=0)))
    return sol.y[: d * d, -1].reshape(d, d), m, int(sol.nfev), peak


def certify(theta, D, eps: float, *, tolerance: float = CERTIFICATE_TOL, rtol: float = 1e-12,
            atol: float | None = None, method: str | None = None) -> Certificate:
    """Certify ``Psi_eps(theta) = D`` by integrating the ODE for every basis vector.

    Parameters
    ----------
    theta, D : (d, d) real arrays
    eps : float >= 0
    tolerance : relative Frobenius error accepted
    rtol, atol : ``solve_ivp`` tolerances; ``atol`` defaults to ``1e-3 rtol min(1, max|D|)``
        so that a tiny ``D`` (small ``eps`` gives ``Psi`` values near ``exp(-1/(2 eps))``) is
        still resolved to relative accuracy

    Returns
    -------
    Certificate
    """
    D = check_square_real(D)
    theta = check_square_real(theta, "theta")
    if theta.shape != D.shape:
        raise ValueError(f"theta and D must have the same shape, got {theta.shape} and {D.shape}")
    if atol is None:
        atol = 1e-3 * rtol * min(1.0, float(np.max(np.abs(D))) or 1.0)
    X1, m, nfev, peak = flow_matrix(theta, eps, rtol=rtol, atol=atol, method=method)
    dn = float(np.linalg.norm(D)) or 1.0
    err = float(np.linalg.norm(X1 - D)) / dn
    return Certificate(err, tolerance, bool(err <= tolerance), m, rtol, atol, nfev, peak / dn)
