r"""Which real linear maps ``D`` are ``Psi_eps(theta)`` for a real ``theta``; preimages.

**Criterion** (``theta`` real, ``Psi = Psi_eps``, ``m = m_eps`` the minimum of ``Psi`` on the
real line, ``m_0 = 0``).  The eigenvalues of ``Psi(theta)`` are ``Psi(mu)`` for the eigenvalues
``mu`` of ``theta``; a Jordan block of size ``k`` at ``mu`` with ``Psi'(mu) != 0`` becomes a
block of size ``k`` at ``Psi(mu)``.  A real eigenvalue ``lam`` of ``D`` with no real preimage
(``lam < m``; at ``eps = 0``: ``lam <= 0``) can only come from non-real ``mu``, which come in
conjugate pairs with identical Jordan structure, so its Jordan blocks come in equal pairs.
Conversely every other eigenvalue has a non-critical preimage (real for real ``lam > m``;
``Psi`` is entire of order 1/2 and takes every complex value; for non-real ``lam`` that a
preimage with ``Psi' != 0`` exists rests on the critical values of ``Psi`` being real, which a
numerical search supports, see :mod:`theory.inverse`) and the primary inverse gives ``theta``;
paired blocks get a conjugate pair ``z, conj(z)`` through a complex structure (the non-real
preimage with the largest ``|Psi'|`` found, to keep ``theta`` well-conditioned).  So

    D = Psi_eps(theta) for a real theta  <=>  for every real eigenvalue lam < m_eps (lam <= 0
    at eps = 0), each Jordan block size occurs an even number of times; at eps = 0 also
    D invertible (0 is not a value of exp).

At ``eps = 0`` this is Culver's real-logarithm criterion.  For ``eps > 0`` singular maps *are*
representable (``Psi_eps`` has real zeros).  The critical value ``lam = m_eps`` itself (a
measure-zero case) is decided only for semisimple or paired blocks; an unpaired non-trivial
block there is reported as undecided (a ``NotRepresentable`` whose reason says so).  Note
that "at ``m_eps``" is judged at the tolerances below: for small ``eps`` (``|m_eps|`` below
the rank threshold, e.g. ``eps = 0.01`` where ``m_eps ~ -2e-21``) an eigenvalue 0 with a
non-trivial Jordan block is undecided at scale 1, while ``representable_scale`` resolves it.

**Numerics.** Eigenvalues are grouped by single linkage at ``cluster_tol * ||D||_2``; each
cluster gets an orthonormal basis of its invariant subspace from a sorted Schur form (real
Schur for real clusters), its Jordan structure from the ranks of ``(B - lam I)^j``
(:mod:`theory.jordan`, ``rank_tol``); a cluster whose ranks are not those of one eigenvalue is
split at a 1000 times smaller radius.  The decision is exact for the matrix as resolved at
these tolerances; both are reported with every answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import scipy.linalg

from ._checks import NotRepresentable, Undecided, check_eps, check_square_real
from .certify import certify, rel_frobenius
from .inverse import _newton, preimage, primary_inverse, taylor_coefficients
from .jordan import jordan_block_sizes, jordan_chains
from .psi import dpsi_scalar, psi_matrix
from .range import min_gain, min_gain_point, real_preimage

__all__ = [
    "Cluster",
    "Analysis",
    "Construction",
    "Decision",
    "analyze",
    "decide",
    "construct",
    "find_theta",
    "is_representable",
    "representable_scale",
]

EXACT_DET_MAX = 40  # exact determinants (integer Bareiss) up to this size
CLUSTER_TOL = 1e-5
RANK_TOL = 1e-8
RESIDUAL_TOL = 1e-6


@dataclass
class Cluster:
    """One eigenvalue of ``D`` as resolved numerically (a complex one stands for its pair)."""

    center: complex
    indices: tuple[int, ...]
    kind: str  # "real" or "complex"
    blocks: dict[int, int]  # Jordan block sizes {size: count} as resolved at rank_tol
    treatment: str  # primary|critical|paired|critical-pairs|singular|unpaired|undecided
    radius: float
    at_tol: float = 0.0  # error bound of the center: a smaller |lam - m_eps| is unresolved

    @property
    def size(self) -> int:
        return len(self.indices)


@dataclass
class Analysis:
    """The criterion's verdict on ``D`` with its clusters and the tolerances used."""

    eps: float
    m_eps: float
    clusters: list[Cluster]
    representable: bool
    reason: str
    cluster_radius: float
    rank_threshold: float
    eigenvalues: np.ndarray = field(repr=False)
    verdict: str = ""  # "representable" | "not representable" | "undecided"


@dataclass
class Construction:
    """A preimage ``theta`` and how well it reproduces ``D``."""

    theta: np.ndarray
    residual: float  # ||Psi_eps(theta) - D||_F / ||D||_F (block expm)
    imag_residual: float  # ||Im theta_complex||_F / ||theta||_F before taking the real part
    cond_basis: float  # condition number of the block-diagonalizing basis
    analysis: Analysis


def _single_linkage(w: np.ndarray, idx: list[int], radius: float) -> list[list[int]]:
    parent = {i: i for i in idx}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a in range(len(idx)):
        for b in range(a + 1, len(idx)):
            i, j = idx[a], idx[b]
            if abs(w[i] - w[j]) <= radius:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in idx:
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: (np.mean(w[g]).real, np.mean(w[g]).imag))


def _invariant_basis(D: np.ndarray, w: np.ndarray, members: list[int], real: bool,
                     with_projector: bool = False):
    """Orthonormal basis ``V`` of the invariant subspace of the eigenvalues ``w[members]`` and
    ``B = V^H D V``; with ``with_projector`` also ``||P||_2`` of the spectral projector onto it
    (``sqrt(1 + ||R||^2)``, ``T11 R - R T22 = T12`` in the sorted Schur form ``T``), the
    condition number of the cluster's mean eigenvalue."""
    members_set = set(members)
    norm = float(np.linalg.norm(D, 2)) or 1.0

    def selected(ev: complex) -> bool:
        return int(np.argmin(np.abs(w - ev * norm))) in members_set

    if real:
        T, Z, sdim = scipy.linalg.schur(D / norm, output="real",
                                        sort=lambda re, im: selected(complex(re, im)))
    else:
        T, Z, sdim = scipy.linalg.schur((D / norm).astype(complex), output="complex",
                                        sort=selected)
    if sdim != len(members):
        raise NotRepresentable(
            f"could not separate the eigenvalue cluster at {np.mean(w[members]):.6g} from the "
            f"rest of the spectrum (Schur reordering selected {sdim} of {len(members)})"
        )
    V = Z[:, :sdim]
    B = V.conj().T @ D @ V
    if not with_projector:
        return V, B
    if sdim == T.shape[0]:
        return V, B, 1.0
    try:
        R = scipy.linalg.solve_sylvester(T[:sdim, :sdim], -T[sdim:, sdim:], T[:sdim, sdim:])
        p_norm = math.sqrt(1.0 + float(np.linalg.norm(R, 2)) ** 2)
    except (np.linalg.LinAlgError, ValueError):
        p_norm = math.inf
    return V, B, p_norm if math.isfinite(p_norm) else 1.0 / np.finfo(float).eps


def exact_det_sign(D: np.ndarray) -> int:
    """The exact sign (-1, 0, 1) of ``det D`` for the float64 entries of ``D``.

    Every float is ``k 2^e`` with an integer ``k``: scaled to integers by one power of two,
    the determinant is computed without rounding by fraction-free (Bareiss) elimination.
    """
    D = np.asarray(D, dtype=np.float64)
    n = D.shape[0]
    fr = [[Fraction(float(x)) for x in row] for row in D]
    den = 1
    for row in fr:
        for x in row:
            den = max(den, x.denominator)  # all denominators are powers of two
    M = [[int(x * den) for x in row] for row in fr]
    sign, prev = 1, 1
    for k in range(n - 1):
        if M[k][k] == 0:
            swap = next((i for i in range(k + 1, n) if M[i][k] != 0), None)
            if swap is None:
                return 0
            M[k], M[swap] = M[swap], M[k]
            sign = -sign
        for i in range(k + 1, n):
            for j in range(k + 1, n):
                M[i][j] = (M[i][j] * M[k][k] - M[i][k] * M[k][j]) // prev
        prev = M[k][k]
    det = M[n - 1][n - 1] * sign
    return (det > 0) - (det < 0)


def pairs_within_one(blocks: dict[int, int]) -> bool:
    """Whether the Jordan block sizes split into pairs ``(j, j)``, ``(j + 1, j)`` and single
    blocks of size 1: the structure ``Psi_eps`` can produce at its critical value ``m_eps``.

    At the critical point ``z*``, ``Psi(z* + N) = m_eps + a_2 N^2 (1 + O(N))`` with
    ``a_2 = Psi''(z*)/2 > 0``, so a block ``J_k(z*)`` of ``theta`` becomes
    ``J_{ceil(k/2)}(m) + J_{floor(k/2)}(m)``; non-real preimages give equal pairs.  Greedy from
    the largest size is optimal (the largest block must pair with the next largest).
    """
    sizes = sorted((s for s, c in blocks.items() for _ in range(c)), reverse=True)
    i = 0
    while i < len(sizes):
        if sizes[i] == 1:
            return True  # the rest are size-1 blocks, each the image of a J_1(z*)
        if i + 1 < len(sizes) and sizes[i] - sizes[i + 1] <= 1:
            i += 2
            continue
        return False
    return True


def _equal_pairs(blocks: dict[int, int]) -> bool:
    return all(count % 2 == 0 for count in blocks.values())


def _classify_real(lam: float, blocks: dict[int, int], eps: float, m: float, delta: float,
                   det_sign: int | None, assume_critical: bool) -> str:
    """Treatment of a real eigenvalue ``lam`` (error bound ``delta``) with Jordan ``blocks``.

    ``det_sign``: at ``eps = 0`` the sign of ``lam`` when it is exact (from ``det D``), else
    ``None``.  Returns primary | critical | paired | critical-pairs | singular | unpaired |
    undecided."""
    paired = _equal_pairs(blocks)
    if eps == 0.0:
        if abs(lam) > delta:
            sign = 1 if lam > 0 else -1
        else:
            sign = det_sign
        if sign == 0:
            return "singular"
        if sign is None:  # nonzero, sign not resolved: both answers agree only when paired
            return "paired" if paired else "undecided"
        if sign > 0:
            return "primary"
        return "paired" if paired else "unpaired"
    if lam > m + delta:
        return "primary"
    if lam < m - delta:
        return "paired" if paired else "unpaired"
    # within delta of the critical value: above it anything goes, below only equal pairs,
    # exactly at it the blocks must pair up within one
    if paired:
        return "critical" if set(blocks) == {1} else "paired"
    if assume_critical:
        if set(blocks) == {1}:
            return "critical"
        return "critical-pairs" if pairs_within_one(blocks) else "unpaired"
    return "undecided"


def _eigen_error_bounds(D: np.ndarray, norm: float) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues ``w`` and first-order error bounds ``64 u ||D||_2 kappa_i`` (``kappa_i =
    1/|y_i^H x_i|``, unit left/right eigenvectors), capped at ``||D||_2``.  Computed on
    ``D / ||D||_2`` (LAPACK's ``geev`` with eigenvectors mis-scales matrices of norm ~1e-216)."""
    w, vl, vr = scipy.linalg.eig(D / norm, left=True, right=True)
    w = w * norm
    with np.errstate(divide="ignore"):
        kappa = 1.0 / np.abs(np.sum(vl.conj() * vr, axis=0))
    bound = np.minimum(64.0 * np.finfo(float).eps * norm * kappa, norm)
    return w, np.where(np.isfinite(bound), bound, norm)


def analyze(D, eps: float, *, cluster_tol: float = CLUSTER_TOL, rank_tol: float = RANK_TOL,
            assume_critical: bool = False) -> Analysis:
    """Apply the criterion to ``D`` (``(d, d)`` real) for ``Psi_eps``; no preimage is built.

    ``assume_critical=True`` takes an eigenvalue within its error bound of ``m_eps`` to be
    ``m_eps`` exactly and applies the critical rule (:func:`pairs_within_one`); by default such
    a case is "undecided" unless the answer is the same on both sides.
    """
    D = check_square_real(D)
    eps = check_eps(eps)
    for name, tol in (("cluster_tol", cluster_tol), ("rank_tol", rank_tol)):
        if not (0 < tol < 1):
            raise ValueError(f"{name} must lie in (0, 1), got {tol}")
    scale = float(np.linalg.norm(D, 2)) or 1.0
    m = min_gain(eps)
    w, bound = _eigen_error_bounds(D, scale)
    radius = cluster_tol * scale
    rank_threshold = rank_tol * scale
    clusters: list[Cluster] = []
    zero_zone: list[int] = []  # eps = 0: real clusters whose sign is not resolved numerically

    def distinct(g: list[int]) -> bool:
        """Every two members are farther apart than their error bounds: simple eigenvalues."""
        return len(g) > 1 and all(abs(w[i] - w[j]) > bound[i] + bound[j]
                                  for a, i in enumerate(g) for j in g[a + 1:])

    def visit(members: list[int], rad: float) -> None:
        for g in _single_linkage(w, members, rad):
            if distinct(g):
                for i in g:
                    visit([i], rad)
                continue
            center = complex(np.mean(w[g]))
            spread = float(np.max(np.abs(w[g] - center)))
            if abs(center.imag) > max(rad, spread + float(np.min(bound[g]))) or (
                    len(g) == 1 and center.imag != 0):
                if center.imag > 0:  # the conjugate cluster is built from this one
                    _, B, p_norm = _invariant_basis(D, w, g, real=False, with_projector=True)
                    delta = spread + 64.0 * np.finfo(float).eps * scale * p_norm
                    blocks = jordan_block_sizes(B - center * np.eye(len(g)), scale, rank_tol)
                    if blocks is None:
                        if rad / 1000 > rank_threshold:
                            visit(g, rad / 1000)
                            continue
                        blocks = {1: len(g)}
                    clusters.append(Cluster(center, tuple(g), "complex", blocks, "primary", rad,
                                            delta))
                continue
            lam = center.real
            _, B, p_norm = _invariant_basis(D, w, g, real=True, with_projector=True)
            delta = min(spread + 64.0 * np.finfo(float).eps * scale * p_norm, scale)
            blocks = jordan_block_sizes(B - lam * np.eye(len(g)), scale, rank_tol)
            if blocks is None:
                if rad / 1000 > rank_threshold:
                    visit(g, rad / 1000)
                    continue
                blocks = {1: len(g)}  # unresolvable at rank_tol: count the copies as simple
            clusters.append(Cluster(complex(lam), tuple(g), "real", blocks, "", rad, delta))
            if eps == 0.0 and abs(lam) <= delta:
                zero_zone.append(len(clusters) - 1)

    visit(list(range(len(w))), radius)
    det_signs: dict[int, int | None] = {}
    if zero_zone:
        exact = exact_det_sign(D) if D.shape[0] <= EXACT_DET_MAX else None
        if exact == 0:  # some eigenvalue is exactly 0: D is exactly singular
            det_signs[min(zero_zone, key=lambda k: abs(clusters[k].center))] = 0
        elif exact is not None and len(zero_zone) == 1 and clusters[zero_zone[0]].size % 2:
            # one unresolved real eigenvalue of odd multiplicity: its sign is that of det D
            # divided by the signs of the resolved real eigenvalues (complex pairs are > 0)
            others = [c for k, c in enumerate(clusters) if c.kind == "real" and k != zero_zone[0]]
            rest = int(np.prod([np.sign(c.center.real) ** c.size for c in others]))
            det_signs[zero_zone[0]] = exact * rest
    for k, c in enumerate(clusters):
        if c.kind == "real":
            c.treatment = _classify_real(c.center.real, c.blocks, eps, m, c.at_tol,
                                         det_signs.get(k), assume_critical)
    reasons, undecided = [], []
    for c in clusters:
        sizes = ", ".join(f"{cnt} x size {s}" for s, cnt in sorted(c.blocks.items()))
        if c.treatment == "singular":
            reasons.append("D is singular (its exact determinant is 0): 0 is not a value of "
                           "exp")
        elif c.treatment == "unpaired":
            where = ("<= 0" if eps == 0 else f"< m_eps = {m:.6g}" if not assume_critical
                     or c.center.real < m - c.at_tol else f"= m_eps = {m:.6g}")
            rule = ("that do not pair up within one" if where.startswith("=")
                    else "that do not come in equal pairs")
            reasons.append(f"real eigenvalue {c.center.real:.6g} {where} has Jordan blocks "
                           f"[{sizes}] {rule}")
        elif c.treatment == "undecided":
            what = ("0 (its sign is not resolved)" if eps == 0
                    else f"the critical value m_eps = {m:.6g}")
            undecided.append(f"eigenvalue {c.center.real:.6g} is within its error bound "
                             f"{c.at_tol:.1e} of {what} and has Jordan blocks [{sizes}] that "
                             "are representable on one side and not on the other")
    if reasons:
        verdict, reason = "not representable", "; ".join(reasons)
    elif undecided:
        verdict, reason = "undecided", "undecided: " + "; ".join(undecided)
    else:
        verdict, reason = "representable", "representable"
    return Analysis(eps, m, clusters, verdict == "representable", reason, radius,
                    rank_threshold, w, verdict)


def _realify(G: np.ndarray) -> np.ndarray:
    return np.block([[G.real, -G.imag], [G.imag, G.real]])


def _paired_block(B: np.ndarray, lam: float, blocks: dict[int, int], eps: float,
                  scale: float, rank_tol: float) -> np.ndarray:
    """Real ``X`` with ``Psi_eps(X) = B`` for ``B`` with eigenvalue ``lam`` and paired blocks."""
    n = B.shape[0]
    chains = jordan_chains(B - lam * np.eye(n), blocks, scale, rank_tol)
    first, second = [], []
    by_size: dict[int, list[list[np.ndarray]]] = {}
    for ch in chains:
        by_size.setdefault(len(ch), []).append(ch)
    for j in sorted(by_size, reverse=True):
        group = by_size[j]
        for a in range(0, len(group), 2):
            first.extend(group[a])
            second.extend(group[a + 1])
    P = np.column_stack(first + second)
    M = np.linalg.solve(P, B @ P)
    h = n // 2
    B_complex = 0.5 * (M[:h, :h] + M[h:, h:]) + 0.5j * (M[h:, :h] - M[:h, h:])
    z = preimage(complex(lam, 0.0), eps) if eps == 0 else _nonreal_preimage(lam, eps)
    G = primary_inverse(B_complex, complex(lam), z, eps, max_order=max(blocks) - 1)
    return P @ _realify(G) @ np.linalg.inv(P)


def _critical_groups(sizes: list[int]) -> list[tuple[int, ...]]:
    """The greedy grouping of :func:`pairs_within_one` (sizes sorted decreasingly)."""
    groups, i = [], 0
    while i < len(sizes):
        if sizes[i] > 1:
            groups.append((sizes[i], sizes[i + 1]))
            i += 2
        else:
            groups.append((1,))
            i += 1
    return groups


def _critical_block(B: np.ndarray, lam: float, blocks: dict[int, int], eps: float,
                    scale: float, rank_tol: float) -> np.ndarray:
    """Real ``X`` with ``Psi_eps(X) = B`` for ``B`` at ``m_eps`` whose blocks pair up within one.

    A pair ``(a, b)``, ``a - b`` in ``{0, 1}``, is the image of ``J_{a+b}(z*)``: with ``K`` the
    nilpotent shift of size ``k = a + b``, ``Q = Psi(z* I + sigma K) - m I`` has Jordan chains of
    lengths ``a`` and ``b`` (``S``); matching them to the chains of ``B - lam I`` (``P``)
    gives ``X = P C S^-1 (z* I + sigma K) S C^-1 P^-1`` (``C`` equalizes the chain scalings).
    """
    n = B.shape[0]
    m, z_star = min_gain_point(eps)
    chains = jordan_chains(B - lam * np.eye(n), blocks, scale, rank_tol)  # longest first
    sizes = [len(ch) for ch in chains]
    columns, parts = [], []
    i = 0
    for group in _critical_groups(sizes):
        these = chains[i:i + len(group)]
        i += len(group)
        k = sum(group)
        if k == 1:
            columns.extend(these[0])
            parts.append(np.array([[z_star]]))
            continue
        a2 = abs(taylor_coefficients(complex(z_star), eps, 2)[2])
        sigma = math.sqrt(scale / a2)  # Q ~ a2 sigma^2 K^2 has the magnitude of B - lam I
        K = np.eye(k, k=1)
        Q = psi_matrix(z_star * np.eye(k) + sigma * K, eps) - m * np.eye(k)
        q_sizes = {g: group.count(g) for g in set(group)}
        q_chains = jordan_chains(Q, q_sizes, scale, rank_tol)
        # B's chains satisfy (B - lam) b_i = scale b_{i-1}; Q's likewise with its own vectors
        S = np.column_stack([v for ch in q_chains for v in ch])
        for ch in these:
            columns.extend(ch)
        parts.append(np.linalg.solve(S, (z_star * np.eye(k) + sigma * K) @ S))
    P = np.column_stack(columns)
    return (P @ scipy.linalg.block_diag(*parts) @ np.linalg.inv(P)).real


def _nonreal_preimage(lam: float, eps: float) -> complex:
    """A non-real ``z`` with ``Psi_eps(z) = lam`` for a real ``lam`` at (or near) ``m_eps``.

    Needed for paired Jordan blocks below (or at) the critical value.  Preimages next to
    ``z*`` have ``Psi' ~ 0``, which makes ``theta`` on a Jordan block huge; so besides the arc
    continuation (:func:`theory.inverse.preimage`, for ``lam < m_eps``), Newton runs from starts
    spread around ``z*`` in the upper half plane, and the preimage with the largest ``|Psi'|``
    is returned.
    """
    z_star = min_gain_point(eps)[1]
    best, best_slope = None, 0.0
    if lam < min_gain(eps):
        best = preimage(complex(lam, 0.0), eps)
        best_slope = abs(complex(dpsi_scalar(best, eps)))
    for radius in (0.5, 2.0, 5.0, 10.0):
        for phi in np.linspace(0.2, np.pi - 0.2, 5):
            start = z_star + radius * (1.0 + abs(z_star)) * complex(np.cos(phi), np.sin(phi))
            try:
                z, ok = _newton(start, complex(lam), eps, 1e-14 * max(1.0, abs(lam)), maxit=60)
            except (OverflowError, ZeroDivisionError):
                continue  # this start ran off to infinity; the others decide
            if ok and z.imag > 1e-6 * (1.0 + abs(z)):
                slope = abs(complex(dpsi_scalar(z, eps)))
                if slope > best_slope:
                    best, best_slope = z, slope
    if best is None:
        raise NotRepresentable(f"no non-real preimage of {lam} found for the paired blocks")
    return best


def construct(D, eps: float, *, cluster_tol: float = CLUSTER_TOL,
              rank_tol: float = RANK_TOL, assume_critical: bool = False) -> Construction:
    """Build a real ``theta`` with ``Psi_eps(theta) = D`` eigenvalue by eigenvalue.

    Raises :class:`theory.NotRepresentable` (with the criterion's reason) when there is none.
    """
    D = check_square_real(D)
    eps = check_eps(eps)
    an = analyze(D, eps, cluster_tol=cluster_tol, rank_tol=rank_tol,
                 assume_critical=assume_critical)
    if an.verdict == "undecided":
        raise Undecided(an.reason)
    if not an.representable:
        raise NotRepresentable(an.reason)
    scale = float(np.linalg.norm(D, 2)) or 1.0
    w = an.eigenvalues
    columns: list[np.ndarray] = []
    blocks: list[np.ndarray] = []
    for c in an.clusters:
        g = list(c.indices)
        if c.kind == "complex":
            V, B = _invariant_basis(D, w, g, real=False)
            z = preimage(c.center, eps)
            G = primary_inverse(B, c.center, z, eps, max_order=max(c.blocks) - 1)
            columns += [V, V.conj()]
            blocks += [G, G.conj()]
            continue
        V, B = _invariant_basis(D, w, g, real=True)
        lam = c.center.real
        if c.treatment == "primary":
            X = primary_inverse(B, complex(lam), preimage(complex(lam), eps), eps,
                                max_order=max(c.blocks) - 1).real
        elif c.treatment == "critical":  # semisimple: any real preimage, no derivative needed
            X = real_preimage(max(lam, an.m_eps), eps) * np.eye(len(g))
        elif c.treatment == "critical-pairs":
            X = _critical_block(B, lam, c.blocks, eps, scale, rank_tol)
        else:  # paired
            try:
                X = _paired_block(B, lam, c.blocks, eps, scale, rank_tol)
            except (np.linalg.LinAlgError, IndexError, ZeroDivisionError) as exc:
                raise NotRepresentable(
                    f"the paired Jordan blocks at {lam:.6g} could not be resolved numerically "
                    f"({exc}); the decision is tolerance-dependent here"
                ) from exc
        columns.append(V.astype(complex))
        blocks.append(X.astype(complex))
    V = np.column_stack(columns)
    theta_c = V @ scipy.linalg.block_diag(*blocks) @ np.linalg.inv(V)
    norm = float(np.linalg.norm(theta_c)) or 1.0
    imag_residual = float(np.linalg.norm(theta_c.imag)) / norm
    theta = np.ascontiguousarray(theta_c.real)
    with np.errstate(all="ignore"):
        residual = rel_frobenius(psi_matrix(theta, eps), D)
    return Construction(theta, residual, imag_residual, float(np.linalg.cond(V)), an)


def find_theta(D, eps: float, *, tol: float = RESIDUAL_TOL, certified: bool = True,
               cluster_tol: float = CLUSTER_TOL, rank_tol: float = RANK_TOL,
               assume_critical: bool = False) -> np.ndarray:
    """A real ``theta`` (``(d, d)``) with ``Psi_eps(theta) = D``.

    Built through the (numerical) real Jordan form: the real preimage branch for real
    eigenvalues ``lam > m_eps``, complex roots of ``Psi_eps(z) = lam`` for conjugate pairs and
    for paired blocks of real ``lam < m_eps``.  ``eps = 0`` gives a real matrix logarithm.
    With ``certified=True`` (default) the result is also checked by :func:`theory.certify`
    (``solve_ivp`` on ``eps x'' + x' = theta x`` for every basis vector, relative error
    ``<= 1e-6``).

    Raises
    ------
    NotRepresentable
        if the criterion fails (the reason names the eigenvalue and its Jordan blocks), or the
        construction misses ``D`` by more than ``tol`` (relative Frobenius residual of the
        block ``expm``), which then reports the basis conditioning, or the ``solve_ivp``
        certificate fails (the reason gives its error and amplification).
    """
    con = construct(D, eps, cluster_tol=cluster_tol, rank_tol=rank_tol,
                    assume_critical=assume_critical)
    if not (con.residual <= tol and con.imag_residual <= tol):
        raise NotRepresentable(
            f"construction is numerically unreliable: residual {con.residual:.2e}, imaginary "
            f"part {con.imag_residual:.2e} (tolerance {tol:g}); basis condition number "
            f"{con.cond_basis:.2e}, ||theta||_F = {np.linalg.norm(con.theta):.2e} (a long Jordan "
            "chain near a critical value of Psi_eps makes theta huge; a smaller scale of D, see "
            "representable_scale, is better conditioned)"
        )
    if certified:
        cert = certify(con.theta, D, eps)
        if not cert.passed:
            raise NotRepresentable(
                f"the solve_ivp certificate failed: relative error {cert.error:.2e} > "
                f"{cert.tolerance:g} (amplification max_t ||X(t)|| / ||D|| = "
                f"{cert.amplification:.1e}; closed-form residual {con.residual:.1e})"
            )
    return con.theta


@dataclass
class Decision:
    """``verdict``: "representable", "not representable" or "undecided"; ``reason`` says why
    (which eigenvalue, its error bound and its Jordan blocks); ``analysis`` has the rest."""

    verdict: str
    reason: str
    analysis: Analysis

    @property
    def decided(self) -> bool:
        return self.verdict != "undecided"


def decide(D, eps: float, *, cluster_tol: float = CLUSTER_TOL, rank_tol: float = RANK_TOL,
           assume_critical: bool = False) -> Decision:
    """The three-valued answer to "is ``D = Psi_eps(theta)`` for a real ``theta``?".

    Exact for the matrix as resolved: each real eigenvalue is placed against 0 (``eps = 0``)
    or ``m_eps`` with its own error bound (spread of its cluster plus ``64 u ||D|| kappa``), not
    a tolerance relative to ``||D||``; at ``eps = 0`` an exactly singular ``D`` is found by an
    exact determinant, and the sign of one unresolved simple eigenvalue by the sign of
    ``det D``.  "undecided" when an eigenvalue lies within its bound of the threshold and its
    blocks are representable on one side only (``assume_critical=True``: take it to be
    ``m_eps`` exactly and apply :func:`pairs_within_one`).
    """
    an = analyze(D, eps, cluster_tol=cluster_tol, rank_tol=rank_tol,
                 assume_critical=assume_critical)
    return Decision(an.verdict, an.reason, an)


def is_representable(D, eps: float, *, cluster_tol: float = CLUSTER_TOL,
                     rank_tol: float = RANK_TOL) -> bool:
    """Whether some real ``theta`` has ``Psi_eps(theta) = D`` (the criterion, no optimization).

    ``eps = 0`` is the first-order (ResNet / Neural ODE) case: a real logarithm exists.
    Raises :class:`theory.Undecided` where :func:`decide` says "undecided" (a bool would
    guess).
    """
    dec = decide(D, eps, cluster_tol=cluster_tol, rank_tol=rank_tol)
    if not dec.decided:
        raise Undecided(dec.reason)
    return dec.verdict == "representable"


def representable_scale(D, eps: float, *, fraction: float = 0.5, tol: float = RESIDUAL_TOL,
                        certified: bool = True, cluster_tol: float = CLUSTER_TOL,
                        rank_tol: float = RANK_TOL) -> tuple[float, np.ndarray]:
    """``(lam, theta)`` with ``lam > 0`` and ``Psi_eps(theta) = lam D`` (``theta``: ``(d, d)``).

    Scales are tried in decreasing order until a preimage is built (and certified):

    1. ``lam = 1`` when ``D`` itself is representable;
    2. otherwise (``eps > 0``) ``lam = fraction * m_eps / mu`` for the most negative offending
       real eigenvalue ``mu``: every real eigenvalue of ``lam D`` is then ``> m_eps``, so
       ``lam D`` is representable;
    3. if the construction is numerically unreliable (a Jordan chain much longer than the
       distance ``|m_eps|`` from 0 to the critical value makes ``theta`` huge), or the
       offending eigenvalue is 0 to within the rank threshold of ``D`` (its position relative
       to a tiny ``m_eps`` is not resolved), the smaller ``lam = fraction |m_eps| / ||D||_2``:
       the whole spectrum of ``lam D`` lies in the disc of radius ``fraction |m_eps|``, where
       the tolerances (relative to ``||lam D||``) resolve it and the local inverse converges.

    At ``eps = 0`` no positive factor changes the signs of the eigenvalues or the Jordan
    structure, so a non-representable ``D`` raises :class:`theory.NotRepresentable`.
    """
    if not (0 < fraction < 1):
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    D = check_square_real(D)
    eps = check_eps(eps)
    an = analyze(D, eps, cluster_tol=cluster_tol, rank_tol=rank_tol)
    kwargs = dict(tol=tol, certified=certified, cluster_tol=cluster_tol, rank_tol=rank_tol)
    if eps == 0.0:
        if an.verdict == "undecided":
            raise Undecided(an.reason + "; at eps = 0 a positive factor does not change it")
        if not an.representable:
            raise NotRepresentable(
                an.reason + "; at eps = 0 a positive factor keeps every eigenvalue's sign and "
                "Jordan structure (and the sign of det), so no scale helps"
            )
        return 1.0, find_theta(D, eps, **kwargs)
    if not an.m_eps < 0:
        raise NotRepresentable(f"m_eps = {an.m_eps} underflows in float64 at eps = {eps}: no "
                               "positive scale can be resolved")
    scales = []
    if an.representable:
        scales.append(1.0)
    else:
        bad = [c.center.real for c in an.clusters if c.treatment in ("unpaired", "undecided")]
        if min(bad) < -an.rank_threshold:
            scales.append(fraction * an.m_eps / min(bad))
        # else: the offending eigenvalue is 0 to within the rank threshold of D (its sign
        # relative to m_eps is unresolved at this scale); the scale below resolves it
    small = fraction * abs(an.m_eps) / (float(np.linalg.norm(D, 2)) or 1.0)
    if not scales or small < scales[-1]:
        scales.append(small)
    failures = []
    for lam in scales:
        try:
            return lam, find_theta(lam * D, eps, **kwargs)
        except NotRepresentable as exc:
            failures.append(f"lam={lam:.3g}: {exc.reason}")
    raise NotRepresentable("no scale gave a certified preimage: " + " | ".join(failures))
