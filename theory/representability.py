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

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from ._checks import NotRepresentable, check_eps, check_square_real
from .certify import certify, rel_frobenius
from .inverse import _newton, preimage, primary_inverse
from .jordan import jordan_block_sizes, jordan_chains
from .psi import dpsi_scalar, psi_matrix
from .range import min_gain, min_gain_point, real_preimage

__all__ = [
    "Cluster",
    "Analysis",
    "Construction",
    "analyze",
    "construct",
    "find_theta",
    "is_representable",
    "representable_scale",
]

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
    treatment: str  # primary | critical | paired | singular | unpaired | undecided
    radius: float
    at_tol: float = 0.0  # |lam - m_eps| below this counts as *at* the critical value

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


def _invariant_basis(D: np.ndarray, w: np.ndarray, members: list[int], real: bool):
    """Orthonormal basis of the invariant subspace of the eigenvalues ``w[members]``."""
    members_set = set(members)

    def selected(ev: complex) -> bool:
        return int(np.argmin(np.abs(w - ev))) in members_set

    if real:
        T, Z, sdim = scipy.linalg.schur(D, output="real",
                                        sort=lambda re, im: selected(complex(re, im)))
    else:
        T, Z, sdim = scipy.linalg.schur(D.astype(complex), output="complex", sort=selected)
    if sdim != len(members):
        raise NotRepresentable(
            f"could not separate the eigenvalue cluster at {np.mean(w[members]):.6g} from the "
            f"rest of the spectrum (Schur reordering selected {sdim} of {len(members)})"
        )
    V = Z[:, :sdim]
    return V, V.conj().T @ D @ V


def _classify_real(lam: float, blocks: dict[int, int], eps: float, m: float, at_tol: float,
                   singular: bool) -> str:
    """``at_tol``: how close to ``m_eps`` counts as *at* the critical value (the cluster's
    spread plus the rank threshold); ``singular``: ``D`` is singular and this cluster holds 0."""
    paired = all(count % 2 == 0 for count in blocks.values())
    if eps == 0.0:
        if singular:
            return "singular"
        if lam > 0:
            return "primary"
        return "paired" if paired else "unpaired"
    if lam > m + at_tol:
        return "primary"
    if lam >= m - at_tol:
        if set(blocks) == {1}:
            return "critical"
        return "paired" if paired else "undecided"
    return "paired" if paired else "unpaired"


def analyze(D, eps: float, *, cluster_tol: float = CLUSTER_TOL,
            rank_tol: float = RANK_TOL) -> Analysis:
    """Apply the criterion to ``D`` (``(d, d)`` real) for ``Psi_eps``; no preimage is built."""
    D = check_square_real(D)
    eps = check_eps(eps)
    for name, tol in (("cluster_tol", cluster_tol), ("rank_tol", rank_tol)):
        if not (0 < tol < 1):
            raise ValueError(f"{name} must lie in (0, 1), got {tol}")
    scale = float(np.linalg.norm(D, 2)) or 1.0
    m = min_gain(eps)
    w = np.linalg.eigvals(D)
    radius = cluster_tol * scale
    rank_threshold = rank_tol * scale
    sigma_min = float(np.linalg.svd(D, compute_uv=False)[-1])
    singular = sigma_min <= rank_threshold
    clusters: list[Cluster] = []

    def visit(members: list[int], rad: float) -> None:
        for g in _single_linkage(w, members, rad):
            center = complex(np.mean(w[g]))
            if abs(center.imag) > rad:
                if center.imag > 0:  # the conjugate cluster is built from this one
                    _, B = _invariant_basis(D, w, g, real=False)
                    blocks = jordan_block_sizes(B - center * np.eye(len(g)), scale, rank_tol)
                    if blocks is None:
                        if rad / 1000 > rank_threshold:
                            visit(g, rad / 1000)
                            continue
                        blocks = {1: len(g)}
                    clusters.append(Cluster(center, tuple(g), "complex", blocks, "primary", rad))
                continue
            lam = center.real
            _, B = _invariant_basis(D, w, g, real=True)
            blocks = jordan_block_sizes(B - lam * np.eye(len(g)), scale, rank_tol)
            if blocks is None:
                if rad / 1000 > rank_threshold:
                    visit(g, rad / 1000)
                    continue
                blocks = {1: len(g)}  # unresolvable at rank_tol: count the copies as simple
            at_tol = rank_threshold + float(np.max(np.abs(w[g] - lam)))
            treatment = _classify_real(lam, blocks, eps, m, at_tol, singular and abs(lam) <= rad)
            clusters.append(Cluster(complex(lam), tuple(g), "real", blocks, treatment, rad,
                                    at_tol))

    visit(list(range(len(w))), radius)
    bad = [c for c in clusters if c.treatment in ("singular", "unpaired", "undecided")]
    if eps == 0.0 and singular and not any(c.treatment == "singular" for c in bad):
        bad.append(Cluster(0j, (), "real", {1: 1}, "singular", radius))
    reasons = []
    for c in bad:
        sizes = ", ".join(f"{cnt} x size {s}" for s, cnt in sorted(c.blocks.items()))
        if c.treatment == "singular":
            reasons.append(f"D is singular (smallest singular value {sigma_min:.2e}): 0 is not "
                           "a value of exp")
        elif c.treatment == "unpaired":
            where = "<= 0" if eps == 0 else f"< m_eps = {m:.6g}"
            reasons.append(f"real eigenvalue {c.center.real:.6g} {where} has Jordan blocks "
                           f"[{sizes}] that do not come in equal pairs")
        else:
            reasons.append(f"eigenvalue {c.center.real:.6g} is within {c.at_tol:.1e} of the "
                           f"critical value m_eps = {m:.6g} and has unpaired non-trivial blocks "
                           f"[{sizes}]: undecided here")
    reason = "; ".join(reasons) if reasons else "representable"
    return Analysis(eps, m, clusters, not reasons, reason, radius, rank_threshold, w)


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
              rank_tol: float = RANK_TOL) -> Construction:
    """Build a real ``theta`` with ``Psi_eps(theta) = D`` eigenvalue by eigenvalue.

    Raises :class:`theory.NotRepresentable` (with the criterion's reason) when there is none.
    """
    D = check_square_real(D)
    eps = check_eps(eps)
    an = analyze(D, eps, cluster_tol=cluster_tol, rank_tol=rank_tol)
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
               cluster_tol: float = CLUSTER_TOL, rank_tol: float = RANK_TOL) -> np.ndarray:
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
    con = construct(D, eps, cluster_tol=cluster_tol, rank_tol=rank_tol)
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


def is_representable(D, eps: float, *, cluster_tol: float = CLUSTER_TOL,
                     rank_tol: float = RANK_TOL) -> bool:
    """Whether some real ``theta`` has ``Psi_eps(theta) = D`` (the criterion, no optimization).

    ``eps = 0`` is the first-order (ResNet / Neural ODE) case: a real logarithm exists.
    """
    return analyze(D, eps, cluster_tol=cluster_tol, rank_tol=rank_tol).representable


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
