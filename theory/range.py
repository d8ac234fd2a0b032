r"""The real range of ``Psi_eps``: ``{Psi_eps(z) : z real} = [m_eps, inf)``, and its inverse.

For ``z >= -1/(4 eps)`` (``s = sqrt(1 + 4 eps z) >= 0`` real) ``Psi_eps(z) > 0`` and it is
increasing in ``z``.  Below, ``z = -(1 + w^2) / (4 eps)`` with ``w = 2 eps a``, ``a > 0``:

    Psi_eps(z) = exp(-c) h(a),      h(a) = cos a + c sin(a) / a,      c = 1 / (2 eps).

*Bracket.* The global minimum of ``h`` over ``a > 0`` lies in ``[pi, 2 pi]``: on
``[2k pi, (2k+1) pi]`` ``sin a >= 0`` so ``h >= cos a >= -1 = h(pi)``; on
``((2k+1) pi, (2k+2) pi)`` with ``k >= 1`` ``sin a < 0`` and ``h(a) > h(a - 2k pi)``.
On ``(pi, 2 pi)`` the sign of ``h'`` is that of ``k(a) = a^2 + c (1 - a cot a)``, strictly
increasing from ``-inf`` to ``+inf``: exactly one critical point, a minimum, the unique root of

    q(a) = a^2 sin a + c (sin a - a cos a),      q(pi) = c pi > 0,   q(2 pi) = -2 pi c < 0,

found by Brent's method.  So ``m_eps = exp(-c) h(a*) < 0``, attained only at
``z* = -(1 + 4 eps^2 a*^2) / (4 eps)``, and ``Psi_eps`` is a strictly increasing bijection from
``[z*, inf)`` onto ``[m_eps, inf)`` (``h`` decreases on ``(0, a*]``; ``cosh a + c sinh(a)/a``
increases).  ``m_0 = 0`` (``exp``; not attained).

*Energy bound* ``m_eps > -1`` (every ``eps > 0``).  For real ``z < 0`` let
``E(t) = eps x'(t)^2 / 2 + |z| x(t)^2 / 2``; along ``eps x'' + x' = z x``,
``E' = x' (eps x'' - z x) = -x'^2 <= 0``, and ``x'`` is not identically 0 (``x'' (0) = z / eps``),
so ``|z| x(1)^2 / 2 <= E(1) < E(0) = |z| / 2``: ``|Psi_eps(z)| < 1``.  For ``z >= 0``,
``Psi_eps(z) >= 1 > 0``.  As ``m_eps`` is attained (at ``z*``), ``m_eps > -1``; the bound is
sharp as ``eps -> inf`` (``m_eps = -1 + 1/(2 eps) + O(eps^-2)``).  It is a property of the ODE:
the depth-N network has no such bound (:mod:`theory.discrete`).

*Floating point.*  ``m_eps = -exp(-c + log(-h(a*)))`` is accurate to a few ulps while it is a
normal float (``|m_eps| >= 2.2e-308``, i.e. ``eps >= ~7.1e-4``); below that it is subnormal and
only accurate to ``5e-324`` absolutely (e.g. 7 % relative error at ``eps = 6.68e-4``), and it
underflows to ``-0.0`` for ``eps`` below about ``6.6e-4``.  :func:`log_neg_min_gain` gives
``log(-m_eps)`` to full relative accuracy for every ``eps > 0``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import scipy.optimize

from ._checks import check_eps
from .psi import dpsi_scalar, psi_scalar

__all__ = ["min_gain", "min_gain_point", "log_neg_min_gain", "real_preimage"]


@lru_cache(maxsize=256)
def _min_point_log(eps: float) -> tuple[float, float]:
    """``(log(-m_eps), z*)``: ``a*`` the root of ``q`` in ``[pi, 2 pi]`` (Brent, bounded)."""
    c = 1.0 / (2.0 * eps)

    def q(a: float) -> float:
        return a * a * math.sin(a) + c * (math.sin(a) - a * math.cos(a))

    a_star = scipy.optimize.brentq(q, math.pi, 2 * math.pi, xtol=1e-15, rtol=8.9e-16, maxiter=200)
    h = math.cos(a_star) + c * math.sin(a_star) / a_star
    z_star = -(1.0 + 4.0 * eps * eps * a_star * a_star) / (4.0 * eps)
    return -c + math.log(-h), z_star


def _min_point(eps: float) -> tuple[float, float]:
    log_neg_m, z_star = _min_point_log(eps)
    return -math.exp(log_neg_m), z_star


def log_neg_min_gain(eps: float) -> float:
    """``log(-m_eps) = -1/(2 eps) + log(-h(a*))`` (``eps > 0``), accurate where ``m_eps``
    itself is subnormal or underflows (``eps < ~7.1e-4``)."""
    eps = check_eps(eps)
    if eps == 0.0:
        raise ValueError("eps must be > 0 for log_neg_min_gain: m_0 = 0")
    return _min_point_log(eps)[0]


def min_gain_point(eps: float) -> tuple[float, float]:
    """``(m_eps, z*)`` with ``m_eps = min_z Psi_eps(z) = Psi_eps(z*)`` (``eps > 0``)."""
    eps = check_eps(eps)
    if eps == 0.0:
        raise ValueError("eps must be > 0 for min_gain_point: at eps = 0 the infimum 0 of exp "
                         "is not attained")
    return _min_point(eps)


def min_gain(eps: float) -> float:
    """``m_eps = inf over real z of Psi_eps(z)``; the 1-D range of ``Psi_eps`` is ``[m_eps, inf)``.

    ``m_0 = 0`` (not attained); for ``eps > 0``, ``m_eps = exp(-c) (cos a* + c sin(a*)/a*)``,
    ``c = 1/(2 eps)``, ``a*`` the unique root in ``[pi, 2 pi]`` of
    ``a^2 sin a + c (sin a - a cos a)`` (see the module docstring for the bracket).
    """
    eps = check_eps(eps)
    if eps == 0.0:
        return 0.0
    return _min_point(eps)[0]


def real_preimage(lam: float, eps: float) -> float:
    """The real ``z`` on the increasing branch ``[z*, inf)`` with ``Psi_eps(z) = lam``.

    Needs ``lam >= m_eps`` (``lam > 0`` at ``eps = 0``, where it is ``log lam``); at
    ``lam = m_eps`` it returns the critical point ``z*``.  Brent's method on a bracket that is
    doubled until it holds ``lam``, then Newton polishing.
    """
    eps = check_eps(eps)
    lam = float(lam)
    if not math.isfinite(lam):
        raise ValueError(f"lam must be finite, got {lam}")
    if eps == 0.0:
        if lam <= 0:
            raise ValueError(f"exp has no real preimage of lam={lam} <= 0")
        return math.log(lam)
    m, z_star = _min_point(eps)
    if lam < m:
        raise ValueError(f"lam={lam} is below m_eps={m} (eps={eps}): no real preimage")
    if lam == m:
        return z_star

    def f(z: float) -> float:
        return float(psi_scalar(z, eps)) - lam

    hi = max(1.0, abs(z_star))
    while not f(hi) > 0:  # at most ~1000 doublings
        hi *= 2.0
        if hi > 1e300:
            raise ValueError(f"lam={lam} too large: Psi_eps overflows before reaching it")
    if not f(z_star) <= 0 < f(hi):
        raise ArithmeticError(
            f"Psi_eps(z*) - lam = {f(z_star):.3g} and Psi_eps({hi:.3g}) - lam = {f(hi):.3g} do "
            f"not bracket lam={lam} on the increasing branch (eps={eps}): Psi_eps is inconsistent "
            "with m_eps"
        )
    z = scipy.optimize.brentq(f, z_star, hi, xtol=1e-300, rtol=8.9e-16, maxiter=500)
    for _ in range(2):
        d = float(dpsi_scalar(z, eps).real)
        if d > 0:
            step = f(z) / d
            if abs(step) < 1e-8 * (1 + abs(z)):
                z -= step
    return float(z)
