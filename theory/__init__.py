"""theory: linear representability of Momentum ResNets, checked numerically with certificates.

With linear residual functions ``F(x) = theta x`` on ``[0, 1]`` from rest, the second-order
model ``eps x'' + x' = theta x`` maps ``x(0)`` to ``Psi_eps(theta) x(0)`` (``Psi_0 = expm``):

- :func:`psi` -- ``Psi_eps`` (closed form elementwise, block ``expm`` for matrices);
- :func:`min_gain` -- ``m_eps``, the bottom of the real range ``[m_eps, inf)``;
- :func:`is_representable`, :func:`decide`, :func:`find_theta` -- the exact criterion (a bool,
  or the three-valued :class:`Decision` with "undecided" and its reason) and a preimage;
- :func:`representable_scale` -- ``(lam, theta)`` with ``Psi_eps(theta) = lam D``;
- :func:`certify` -- an independent ``solve_ivp`` check of a preimage;
- :func:`discrete_psi`, :func:`discrete_min_gain` -- the depth-N network ``P_N(theta)`` and
  the bottom of its real range (exact; ``-inf`` at odd depth);
- :func:`verify_claims` -- the claim-by-claim report (``python -m theory``).
"""

from ._checks import NotRepresentable, Undecided
from .certify import Certificate, certify
from .discrete import discrete_min_gain, discrete_psi
from .psi import psi
from .range import min_gain
from .report import verify_claims
from .representability import (
    Decision,
    analyze,
    construct,
    decide,
    find_theta,
    is_representable,
    representable_scale,
)

__all__ = [
    "NotRepresentable",
    "Undecided",
    "Decision",
    "decide",
    "psi",
    "min_gain",
    "find_theta",
    "is_representable",
    "representable_scale",
    "analyze",
    "construct",
    "certify",
    "Certificate",
    "verify_claims",
    "discrete_psi",
    "discrete_min_gain",
]
