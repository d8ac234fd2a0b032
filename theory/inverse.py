r"""Local inverses of ``Psi_eps``: scalar preimages and primary inverse functions of a cluster.

*Scalar preimages.* For real ``lam >= m_eps`` the real preimage on the increasing branch
(:func:`theory.range.real_preimage`).  Otherwise ``z`` with ``Psi_eps(z) = lam`` is found by
continuation along the arc ``lam(t) = |lam| exp(i t arg lam)``, ``t: 0 -> 1``, starting from the
real preimage of ``|lam|`` (Euler predictor, Newton corrector, adaptive step; a failed step is
halved; a continuation that stalls, or takes more than ``MAX_CONTINUATION_STEPS`` steps,
raises :class:`theory.NotRepresentable`, so a wrong ``Psi`` never makes it hang).  The
critical points of ``Psi_eps`` are all real (:mod:`theory.proofs`: ``Psi_eps`` is real entire
of order 1/2 with only real zeros, so ``Psi_eps'`` has only real zeros), hence every non-real
preimage is non-critical; the returned root is still checked (residual at rounding level).
A real ``lam < m_eps`` is reached from the upper half plane.
At ``eps = 0`` this is the principal ``log`` (``log|lam| + i pi`` for ``lam < 0``).

*Primary inverse on a cluster.* For a square ``B`` whose eigenvalues cluster at ``lam`` and a
preimage ``z`` with ``Psi'(z) != 0``, the analytic local inverse ``g`` (``g(lam) = z``) has a
Taylor series ``g(lam + t) = z + sum_j c_j t^j`` obtained by series reversion from the Taylor
coefficients ``a_j`` of ``Psi_eps`` at ``z`` (the first row of ``Psi_eps(z I + N)``, ``N`` the
nilpotent shift, by the block ``expm``); then ``g(B) = z I + sum_j c_j (B - lam I)^j``, which is
exact for a single Jordan block and converges for a tight cluster.  The reversion runs in the
scaled variable ``t / |a_1|`` so that nothing overflows when ``Psi_eps`` varies on a tiny scale.
"""

from __future__ import annotations

import cmath
import math

import numpy as np

from ._checks import NotRepresentable, check_eps
from .psi import dpsi_scalar, psi_matrix, psi_scalar
from .range import min_gain, real_preimage

__all__ = ["preimage", "taylor_coefficients", "reversion", "primary_inverse"]

MAX_CONTINUATION_STEPS = 4000  # accepted plus rejected steps along the arc; then it gives up


def _f(z: complex, eps: float) -> complex:
    return complex(psi_scalar(np.complex128(z), eps))


def _df(z: complex, eps: float) -> complex:
    return complex(dpsi_scalar(np.complex128(z), eps))


def _newton(z: complex, lam: complex, eps: float, tol: float, maxit: int = 40):
    for _ in range(maxit):
        r = _f(z, eps) - lam
        if abs(r) <= tol:
            return z, True
        d = _df(z, eps)
        if d == 0 or not cmath.isfinite(d):
            return z, False
        step = r / d
        z = z - step
        if not cmath.isfinite(z):
            return z, False
        if abs(step) <= 1e-14 * (1.0 + abs(z)):  # converged to rounding level
            return z, True
    return z, abs(_f(z, eps) - lam) <= tol


def preimage(lam: complex, eps: float) -> complex:
    """A ``z`` with ``Psi_eps(z) = lam`` and ``Psi_eps'(z) != 0`` (real when ``lam >= m_eps``).

    Raises :class:`theory.NotRepresentable` when ``lam`` has no preimage (``lam = 0`` at
    ``eps = 0``) or the continuation fails.
    """
    eps = check_eps(eps)
    lam = complex(lam)
    if not cmath.isfinite(lam):
        raise ValueError(f"lam must be finite, got {lam}")
    if eps == 0.0:
        if lam == 0:
            raise NotRepresentable("0 is not a value of exp: a singular map has no logarithm")
        if lam.imag == 0 and lam.real > 0:
            return complex(math.log(lam.real))
        return complex(math.log(abs(lam)), cmath.phase(lam) if lam.imag != 0 else math.pi)
    if lam.imag == 0 and lam.real >= min_gain(eps):
        return complex(real_preimage(lam.real, eps))
    r = abs(lam)
    phi_end = cmath.phase(lam) if lam.imag != 0 else math.pi
    z = complex(real_preimage(r, eps))
    tol = 1e-14 * max(r, 1e-300)
    t, dt = 0.0, 1.0 / 32
    for _ in range(MAX_CONTINUATION_STEPS):
        if t >= 1.0:
            break
        dt = min(dt, 1.0 - t)
        lam_t = r * cmath.exp(1j * phi_end * (t + dt))
        # Euler predictor: dz = dlam / Psi'(z)
        pred = z + (lam_t - r * cmath.exp(1j * phi_end * t)) / _df(z, eps)
        z_new, ok = _newton(pred, lam_t, eps, tol, maxit=12)
        if ok and abs(z_new - z) < 0.5 * (1 + abs(z)):
            z, t = z_new, t + dt
            dt = min(2 * dt, 1.0 / 8)
        else:
            dt /= 2
            if dt < 1e-9:
                raise NotRepresentable(
                    f"continuation to a preimage of {lam} under Psi_eps (eps={eps}) failed"
                )
    else:
        raise NotRepresentable(
            f"continuation to a preimage of {lam} under Psi_eps (eps={eps}) did not reach the "
            f"end of the arc in {MAX_CONTINUATION_STEPS} steps (stopped at t = {t:.3g})"
        )
    z, ok = _newton(z, lam, eps, 4 * tol)
    if not ok or abs(_df(z, eps)) == 0:
        raise NotRepresentable(f"no non-critical preimage of {lam} found (eps={eps})")
    return z


def taylor_coefficients(z: complex, eps: float, order: int) -> np.ndarray:
    """``a_j = Psi_eps^(j)(z) / j!`` for ``j = 0..order``: first row of ``Psi_eps(z I + N)``."""
    n = order + 1
    if eps == 0.0:
        return np.array([cmath.exp(z) / math.factorial(j) for j in range(n)], dtype=complex)
    Z = z * np.eye(n, dtype=complex) + np.eye(n, k=1)
    return psi_matrix(Z, eps)[0].astype(complex)


def reversion(a: np.ndarray) -> np.ndarray:
    """Coefficients ``c_0 = 0, c_1..c_K`` of ``h`` with ``sum_{i>=1} a_i h^i = t  (mod t^(K+1))``.

    ``a`` holds ``a_0..a_K`` (``a_0`` ignored); needs ``a_1 != 0``.  Solved order by order:
    ``c_n = (delta_{n1} - [t^n] sum_i a_i h_{<n}^i) / a_1``.
    """
    K = len(a) - 1
    if a[1] == 0:
        raise ZeroDivisionError("a_1 = 0: the map is critical here, no analytic local inverse")
    c = np.zeros(K + 1, dtype=complex)
    for n in range(1, K + 1):
        # [t^n] of sum_{i>=2} a_i h^i with h = sum_{j<n} c_j t^j (i = 1 contributes a_1 c_n)
        acc = 0.0 + 0.0j
        power = c.copy()  # h^1 truncated
        for i in range(2, n + 1):
            power = np.convolve(power, c)[: K + 1]
            acc += a[i] * power[n]
        c[n] = ((1.0 if n == 1 else 0.0) - acc) / a[1]
    return c


def primary_inverse(B: np.ndarray, lam: complex, z: complex, eps: float,
                    max_order: int | None = None) -> np.ndarray:
    """``g(B)`` for the local inverse ``g`` of ``Psi_eps`` with ``g(lam) = z``.

    Parameters
    ----------
    B : (n, n) array whose eigenvalues cluster at ``lam``
    lam, z : complex, ``Psi_eps(z) = lam`` and ``Psi_eps'(z) != 0``
    eps : float >= 0

    Returns
    -------
    (n, n) complex array ``z I + sum_{j>=1} c_j (B - lam I)^j`` (the series is cut when the
    terms fall below 1e-17 of the sum, or at ``max_order``, default ``n + 12``).  Pass the
    largest Jordan block size minus one as ``max_order`` when the structure is known: beyond
    the nilpotency index the powers of ``B - lam I`` are rounding noise, which the growing
    coefficients of ``g`` (radius of convergence ~ the distance to a critical value) amplify.
    """
    n = B.shape[0]
    N = B - lam * np.eye(n)
    order = max_order if max_order is not None else n + 12
    out = z * np.eye(n, dtype=complex)
    if np.linalg.norm(N) <= 1e-300 or order < 1:
        return out
    a = taylor_coefficients(z, eps, order)
    if abs(a[1]) <= 1e-8 * float(np.max(np.abs(a[1:]))):
        # critical point (Psi' = 0 relative to the other Taylor coefficients; an absolute test
        # would misread the tiny but regular derivative near a zero of Psi at small eps):
        # only a semisimple cluster (N = 0 up to rounding) can be mapped
        if np.linalg.norm(N) <= 1e-12 * max(abs(lam), float(np.linalg.norm(B))):
            return out
        raise NotRepresentable(f"Psi_eps'(z) = 0 at the preimage z={z} of {lam}: the critical "
                               "value has no analytic inverse on a non-trivial Jordan block")
    # reversion in the scaled variable tau = t / |a_1|: coefficients and powers stay O(1)
    # even when Psi varies on a tiny scale (small eps gives Psi' ~ exp(-1/(2 eps)))
    sigma = abs(a[1])
    c = reversion(a / sigma)
    Ns = N / sigma
    P = np.eye(n, dtype=complex)
    for j in range(1, order + 1):
        P = P @ Ns
        term = c[j] * P
        out = out + term
        if np.linalg.norm(term) <= 1e-17 * np.linalg.norm(out):
            break
    return out
