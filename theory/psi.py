r"""The map ``theta -> Psi_eps(theta)``: the time-1 flow of ``eps x'' + x' = theta x`` from rest.

With ``x(0) = x0`` and ``x'(0) = 0`` the solution at ``t = 1`` is ``x(1) = Psi_eps(theta) x0``:

    Psi_eps(theta) = top-left (d, d) block of expm([[0, I], [theta / eps, -I / eps]]),
    Psi_0(theta)   = expm(theta)                      (first order, the ResNet limit).

For a scalar ``z``, with ``s = sqrt(1 + 4 eps z)`` and ``c = 1 / (2 eps)``,

    Psi_eps(z) = exp(-c) (cosh(c s) + sinh(c s) / s),

an entire function of ``z`` (even in ``s``).  It is evaluated here in the overflow-free form

    Psi_eps(z) = exp(2 z / (1 + s)) (1 + exp(-2 c s) + 2 c phi1(2 c s)) / 2,
    phi1(x)    = (1 - exp(-x)) / x,

with the principal square root (``Re s >= 0``, so ``|exp(-2 c s)| <= 1``), ``exp(c (s - 1))``
rewritten as ``exp(2 z / (1 + s))`` (no cancellation as ``eps -> 0``) and a power series for
``phi1`` near 0 (no cancellation as ``1 + 4 eps z -> 0``).  For real ``z < -1 / (4 eps)`` this
is the oscillating continuation ``exp(-c) (cos(c w) + sin(c w) / w)``, ``w = sqrt(-1 - 4 eps z)``.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

from ._checks import check_eps

__all__ = ["psi", "psi_scalar", "dpsi_scalar", "psi_matrix"]

_SERIES_RADIUS = 0.5


def _phi1(x: np.ndarray) -> np.ndarray:
    """``(1 - exp(-x)) / x`` for complex ``x``, with ``phi1(0) = 1``."""
    x = np.asarray(x, dtype=np.complex128)
    out = np.empty_like(x)
    small = np.abs(x) < _SERIES_RADIUS
    xs = x[small]
    term = np.ones_like(xs)
    acc = np.ones_like(xs)
    for k in range(1, 25):  # sum_k (-x)^k / (k+1)!
        term = term * (-xs) / (k + 1)
        acc = acc + term
    out[small] = acc
    xl = x[~small]
    out[~small] = (1.0 - np.exp(-xl)) / xl
    return out


def _exp_complex(w: np.ndarray) -> np.ndarray:
    """``exp(w)`` for complex ``w`` without ``inf * 0 = nan``.

    ``e^Re(w) (cos Im w + i sin Im w)``, each part set to 0 where its trigonometric factor is
    0 (so a real overflow is ``inf + 0j``)."""
    w = np.asarray(w, dtype=np.complex128)
    with np.errstate(over="ignore", invalid="ignore"):
        r = np.exp(w.real)
        co, si = np.cos(w.imag), np.sin(w.imag)
        out = np.empty(w.shape, dtype=np.complex128)
        out.real = np.where(co == 0, 0.0, r * co)  # assigned, not re + 1j * im: 1j * inf is
        out.imag = np.where(si == 0, 0.0, r * si)  # nan + inf j
    return out


def _psi_closed_form(zc: np.ndarray, eps: float) -> np.ndarray:
    """``Psi_eps(z)`` for complex ``zc`` and ``eps > 0``: ``exp(2 z / (1 + s) + log(bracket / 2))``.

    The factor 1/2 goes inside the exponential, so the result overflows only when it exceeds
    ``DBL_MAX`` (``psi(1213.4333, 1e-3) = 1.198e308`` is finite)."""
    c = 1.0 / (2.0 * eps)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        s = np.sqrt(1.0 + 4.0 * eps * zc)
        bracket = 1.0 + np.exp(-2.0 * c * s) + 2.0 * c * _phi1(2.0 * c * s)
        return _exp_complex(2.0 * zc / (1.0 + s) + np.log(0.5 * bracket))


def psi_scalar(z, eps: float) -> np.ndarray:
    """Elementwise ``Psi_eps(z)`` (closed form); real input gives real output.

    Parameters
    ----------
    z : scalar or array, real or complex
    eps : float >= 0

    Returns
    -------
    ndarray of ``z``'s shape (float64 for real ``z``, complex128 otherwise).
    """
    eps = check_eps(eps)
    z = np.asarray(z)
    real = not np.iscomplexobj(z)
    zc = z.astype(np.complex128)
    out = _exp_complex(zc) if eps == 0.0 else _psi_closed_form(zc, eps)
    return out.real if real else out


def dpsi_scalar(z, eps: float) -> np.ndarray:
    """Elementwise derivative ``d Psi_eps / dz`` (closed form, complex128 output).

    With ``u = 1 + 4 eps z``, ``C = cosh(c s)``, ``S = sinh(c s) / s``:
    ``Psi' = 2 eps exp(-c) (c S + (c C - S) / u)``, where ``(c C - S) / u`` is summed as
    ``sum_{k>=1} 2k c^(2k+1) u^(k-1) / (2k+1)!`` when ``|c s|`` is small.
    """
    eps = check_eps(eps)
    zc = np.asarray(z, dtype=np.complex128)
    if eps == 0.0:
        return np.exp(zc)
    c = 1.0 / (2.0 * eps)
    with np.errstate(over="ignore", invalid="ignore"):
        u = 1.0 + 4.0 * eps * zc
        s = np.sqrt(u)
        E = np.exp(2.0 * zc / (1.0 + s))  # exp(c (s - 1))
        eC = 0.5 * E * (1.0 + np.exp(-2.0 * c * s))  # exp(-c) cosh(c s)
        eS = E * c * _phi1(2.0 * c * s)  # exp(-c) sinh(c s) / s
        out = np.empty_like(zc)
        small = np.abs(c * s) < _SERIES_RADIUS
        big = ~small
        out[big] = 2.0 * eps * (c * eS[big] + (c * eC[big] - eS[big]) / u[big])
        if np.any(small):
            us = u[small]
            acc = np.zeros_like(us)
            for k in range(1, 20):
                acc = acc + 2 * k * c ** (2 * k + 1) * us ** (k - 1) / math.factorial(2 * k + 1)
            out[small] = 2.0 * eps * (c * eS[small] + math.exp(-c) * acc)
    return out


def psi_matrix(theta: np.ndarray, eps: float) -> np.ndarray:
    """``Psi_eps(theta)`` for a square matrix: the block ``expm`` (``expm(theta)`` at ``eps = 0``).

    Parameters
    ----------
    theta : (d, d) array, real or complex
    eps : float >= 0

    Returns
    -------
    (d, d) array of ``theta``'s kind (real in, real out).
    """
    eps = check_eps(eps)
    theta = np.asarray(theta)
    if theta.ndim != 2 or theta.shape[0] != theta.shape[1]:
        raise ValueError(f"theta must be a square (d, d) matrix, got shape {theta.shape}")
    if eps == 0.0:
        return scipy.linalg.expm(theta)
    d = theta.shape[0]
    dtype = np.result_type(theta.dtype, np.float64)
    M = np.zeros((2 * d, 2 * d), dtype=dtype)
    M[:d, d:] = np.eye(d)
    M[d:, :d] = theta / eps
    M[d:, d:] = -np.eye(d) / eps
    return scipy.linalg.expm(M)[:d, :d]


def psi(theta, eps: float):
    """``Psi_eps(theta)``: the map ``x(0) -> x(1)`` of ``eps x'' + x' = theta x``, ``x'(0) = 0``.

    A scalar or a 1-D array is taken elementwise (closed form); a 2-D square array is a
    matrix and gets the matrix function (block ``expm``).  ``eps = 0`` gives ``exp``/``expm``.

    Parameters
    ----------
    theta : scalar, (n,) or (d, d) array, real or complex, finite
    eps : float >= 0

    Returns
    -------
    float/complex for a scalar, else an array of ``theta``'s shape.
    """
    eps = check_eps(eps)
    arr = np.asarray(theta)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) and not np.issubdtype(arr.dtype, np.timedelta64)
    ):
        raise TypeError(f"theta must be numeric, got dtype {arr.dtype}")
    if arr.dtype == bool:
        raise TypeError("theta must be numeric, got dtype bool")
    if not np.all(np.isfinite(arr)):
        raise ValueError("theta must have finite entries, got NaN or inf")
    if arr.ndim <= 1:
        out = psi_scalar(arr, eps)
        return out[()] if arr.ndim == 0 else out
    if arr.ndim == 2:
        if arr.shape[0] != arr.shape[1]:
            raise ValueError(
                f"theta: a 2-D array is a matrix and must be square, got shape {arr.shape}"
            )
        return psi_matrix(arr, eps)
    raise ValueError(f"theta must be a scalar, a 1-D array or a square matrix, got ndim={arr.ndim}")
