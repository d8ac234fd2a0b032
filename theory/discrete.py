r"""Finite depth: the linear Momentum ResNet of depth ``N`` and the range of its scalar gain.

The network (layers ``n = 0..N-1``, ``f_n(x) = theta x / N``, ``gamma = eps_to_gamma(eps, N)``,
``v_0 = 0``; ``eps = 0`` is the tied linear ResNet, ``gamma = 0``)

    v_{n+1} = gamma v_n + (1 - gamma) theta x_n / N,      x_{n+1} = x_n + v_{n+1}

maps ``x_0`` to ``x_N = P_N(theta) x_0``.  With ``b = (1 - gamma) / N`` the pair ``(x, v)`` is
multiplied by ``A = [[1 + b theta, gamma], [b theta, gamma]]`` (``det A = gamma``,
``tr A = 1 + gamma + b theta``), so ``x_{n+2} = (1 + gamma + b theta) x_{n+1} - gamma x_n``,
``x_0 = 1``, ``x_1 = 1 + b theta``.  For ``gamma > 0``, ``r = sqrt(gamma)`` and
``t = (1 + gamma + b theta) / (2 r)`` this is a Chebyshev recurrence:

    P_N(theta) = r^N (U_N(t) - r U_{N-1}(t))          (U_n: Chebyshev of the second kind),

and ``P_N(theta) = (1 + theta / N)^N`` for ``gamma = 0``.

*Facts* (proved; the report checks each numerically).

1. ``P_N`` is a real polynomial of degree ``N`` in ``theta`` with leading coefficient
   ``b^N > 0``.  So for **odd** ``N`` its range over real ``theta`` is all of ``R``: the depth-N
   network has no lower bound on its gain (the ODE's ``m_eps > -1`` does not survive).
2. For **even** ``N`` the range is ``[m_{eps,N}, inf)``, ``m_{eps,N} = min`` over the ``N - 1``
   critical points.  With ``g = U_N - r U_{N-1}`` (``0 <= r < 1``), ``g > 0`` on ``[1, inf)``
   (``U_N >= U_{N-1} > 0`` there) and ``(-1)^N g > 0`` on ``(-inf, -1]``; ``g`` is a
   quasi-orthogonal polynomial, so its ``N`` roots are real and simple, hence in ``(-1, 1)``,
   and by Rolle the ``N - 1`` roots of ``g'`` are real and interlace them.  They are computed
   as the roots of the derivative polynomial (Chebyshev basis, colleague matrix), not on a
   grid, and polished by Newton.
3. ``N = 2``: ``P_2 = 1 + (2 + gamma) u + u^2`` (``u = b theta``), so
   ``m_{eps,2} = 1 - (2 + gamma)^2 / 4``, which is ``< -1`` once ``gamma > 2 sqrt 2 - 2``
   (``eps > 1 / (2 (3 - 2 sqrt 2)) ~ 2.91``).  So ``m_eps > -1`` is a property of the ODE
   only.  (Measured, report claim 8: ``m_{eps,N}`` does *not* tend to ``m_eps``; it decreases
   like ``-N`` as even ``N`` grows, its minimiser ``theta ~ -N^2`` lying where the scheme is
   unstable, while the minimum of ``P_N`` on a fixed window around ``z*`` tends to ``m_eps``.)
4. Tied ResNet (``gamma = 0``): ``(1 + theta / N)^N`` has range ``[0, inf)`` for even ``N``
   (``det >= 0`` for matrices: ``diag(-1, 1)`` is out of reach, the floor ``sqrt(1/2)``) and
   ``R`` for odd ``N``: ``theta = diag(-2N, 0)`` gives ``(I + theta/N)^N = diag(-1, 1)``.
"""

from __future__ import annotations

import math
from numbers import Integral

import numpy as np
from numpy.polynomial import chebyshev as C

import mode

from ._checks import check_eps

__all__ = ["discrete_gamma", "discrete_psi", "discrete_min_gain", "discrete_min_gain_point",
           "gain_chebyshev_coefficients"]


def _check_depth(depth) -> int:
    if isinstance(depth, bool) or not isinstance(depth, (Integral, np.integer)):
        raise TypeError(f"depth must be an int, got {type(depth).__name__}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return int(depth)


def discrete_gamma(eps: float, depth: int) -> float:
    """``gamma`` of the depth-N network: ``mode.eps_to_gamma(eps, depth)``; 0 at ``eps = 0``
    (the tied linear ResNet).  ``0 < eps < 1 / depth`` raises ``ValueError`` (``gamma < 0``)."""
    eps = check_eps(eps)
    depth = _check_depth(depth)
    if eps == 0.0:
        return 0.0
    return float(mode.eps_to_gamma(eps, depth))


def _transfer(theta: np.ndarray, gamma: float, depth: int) -> np.ndarray:
    """Top-left block of ``A^N``, ``A = [[I + b theta, gamma I], [b theta, gamma I]]``."""
    d = theta.shape[0]
    b = (1.0 - gamma) / depth
    eye = np.eye(d, dtype=theta.dtype)
    A = np.block([[eye + b * theta, gamma * eye], [b * theta, gamma * eye]])
    return np.linalg.matrix_power(A, depth)[:d, :d]


def _recurrence(z: np.ndarray, gamma: float, depth: int) -> np.ndarray:
    """``x_N`` by ``x_{n+2} = (1 + gamma + b z) x_{n+1} - gamma x_n`` elementwise."""
    b = (1.0 - gamma) / depth
    trace = 1.0 + gamma + b * z
    x_prev, x = np.ones_like(z), 1.0 + b * z
    for _ in range(depth - 1):
        x_prev, x = x, trace * x - gamma * x_prev
    return x


def discrete_psi(theta, eps: float, depth: int):
    """``P_N(theta)``: the map ``x_0 -> x_N`` of the depth-N linear Momentum ResNet.

    ``f_n(x) = theta x / N``, ``gamma = eps_to_gamma(eps, N)`` (``eps = 0``: the ResNet,
    ``(I + theta / N)^N``), ``v_0 = 0``.  Like :func:`theory.psi`: a scalar or 1-D array is
    taken elementwise, a square 2-D array is a matrix (the transfer matrix to the power N).

    Parameters
    ----------
    theta : scalar, (n,) or (d, d) array, real or complex, finite
    eps : float, 0 or ``>= 1 / depth``
    depth : int >= 1

    Returns
    -------
    float/complex for a scalar, else an array of ``theta``'s shape (real in, real out).
    """
    gamma = discrete_gamma(eps, depth)
    arr = np.asarray(theta)
    if arr.dtype == object or arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"theta must be numeric, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("theta must have finite entries, got NaN or inf")
    dtype = np.result_type(arr.dtype, np.float64)
    arr = arr.astype(dtype)
    if arr.ndim <= 1:
        with np.errstate(over="ignore", invalid="ignore"):
            out = _recurrence(arr, gamma, depth)
        return out[()] if arr.ndim == 0 else out
    if arr.ndim == 2:
        if arr.shape[0] != arr.shape[1]:
            raise ValueError(
                f"theta: a 2-D array is a matrix and must be square, got shape {arr.shape}")
        return _transfer(arr, gamma, depth)
    raise ValueError(f"theta must be a scalar, a 1-D array or a square matrix, got ndim={arr.ndim}")


def gain_chebyshev_coefficients(gamma: float, depth: int) -> np.ndarray:
    """Chebyshev-T coefficients of ``g = U_N - sqrt(gamma) U_{N-1}`` (``0 < gamma < 1``).

    ``U_n = sum_{k = n, n-2, ...} w_k T_k`` with ``w_k = 2`` (``k > 0``), ``w_0 = 1``."""
    def u_in_t(n: int) -> np.ndarray:
        c = np.zeros(depth + 1)
        if n >= 0:
            c[n % 2: n + 1: 2] = 2.0
            if n % 2 == 0:
                c[0] = 1.0
        return c

    return u_in_t(depth) - math.sqrt(gamma) * u_in_t(depth - 1)


def _critical_points(gamma: float, depth: int) -> np.ndarray:
    """The ``N - 1`` real roots ``t`` of ``g'`` (all in ``(-1, 1)``, fact 2), Newton-polished."""
    g = gain_chebyshev_coefficients(gamma, depth)
    dg, ddg = C.chebder(g), C.chebder(g, 2)
    roots = C.chebroots(dg)
    real = roots[np.abs(roots.imag) <= 1e-6].real
    if len(real) != depth - 1 or np.any(np.abs(real) >= 1 + 1e-9):
        raise ArithmeticError(
            f"expected {depth - 1} real critical points in (-1, 1) for depth {depth}, gamma "
            f"{gamma}; the colleague matrix gave {len(real)} (degree too high for float64?)")
    t = np.clip(real, -1.0, 1.0)
    for _ in range(3):
        curv = C.chebval(t, ddg)
        step = np.where(curv != 0, C.chebval(t, dg) / np.where(curv != 0, curv, 1.0), 0.0)
        t = np.clip(t - step, -1.0, 1.0)
    return t


def discrete_min_gain_point(eps: float, depth: int) -> tuple[float, float]:
    """``(m_{eps,N}, theta*)``: the minimum over real ``theta`` of the scalar ``P_N(theta)`` and
    a minimiser; ``(-inf, -inf)`` for odd ``depth`` (fact 1: the range is ``R``)."""
    gamma = discrete_gamma(eps, depth)
    depth = int(depth)
    if depth % 2 == 1:
        return -math.inf, -math.inf
    if gamma == 0.0:  # (1 + theta / N)^N, N even: minimum 0 at theta = -N
        return 0.0, -float(depth)
    r = math.sqrt(gamma)
    b = (1.0 - gamma) / depth
    t = _critical_points(gamma, depth)
    values = C.chebval(t, gain_chebyshev_coefficients(gamma, depth))
    k = int(np.argmin(values))
    m = float(math.exp(depth * math.log(r)) * values[k])
    return m, float((2.0 * r * t[k] - 1.0 - gamma) / b)


def discrete_min_gain(eps: float, depth: int) -> float:
    """``m_{eps,N} = inf over real theta of P_N(theta)`` (exact: roots of the derivative).

    ``-inf`` for odd ``depth``; ``0`` for the even-depth ResNet (``eps = 0``); for even
    ``depth`` and ``gamma > 0`` the smallest value of ``P_N`` at its ``N - 1`` critical points.
    Cost ``O(N^3)`` (eigenvalues of the ``(N-1)``-colleague matrix).
    """
    return discrete_min_gain_point(eps, depth)[0]
