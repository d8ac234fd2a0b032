"""Families of test matrices for the claims (deterministic given a numpy Generator)."""

from __future__ import annotations

import numpy as np
import scipy.linalg

__all__ = ["similar", "jordan_block", "rotation", "reflection", "sample_family", "FAMILIES"]


def similar(J: np.ndarray, rng: np.random.Generator, cond_max: float = 1e3) -> np.ndarray:
    """``V J V^{-1}`` for a random Gaussian ``V`` with condition number below ``cond_max``."""
    d = J.shape[0]
    while True:
        V = rng.standard_normal((d, d))
        if np.linalg.cond(V) < cond_max:
            return V @ J @ np.linalg.inv(V)


def jordan_block(lam: float, k: int) -> np.ndarray:
    """The ``k x k`` Jordan block with eigenvalue ``lam``."""
    return lam * np.eye(k) + np.eye(k, k=1)


def rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    """A random rotation (orthogonal, det +1)."""
    Q, R = np.linalg.qr(rng.standard_normal((d, d)))
    Q = Q * np.sign(np.diag(R))
    if np.linalg.det(Q) < 0:
        Q[:, 0] = -Q[:, 0]
    return Q


def reflection(d: int, rng: np.random.Generator) -> np.ndarray:
    """A random Householder reflection ``I - 2 u u^T`` (det -1)."""
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    return np.eye(d) - 2.0 * np.outer(u, u)


def _gaussian(rng):
    d = int(rng.integers(2, 6))
    return rng.standard_normal((d, d))


def _odd_negative(rng):
    k = int(rng.choice([1, 3]))
    lam = -float(rng.uniform(0.5, 4.0))
    rest = rng.uniform(0.3, 3.0, size=int(rng.integers(0, 3)))
    return similar(np.diag(np.concatenate([np.full(k, lam), rest])), rng)


def _rotation(rng):
    d = int(rng.integers(2, 5))
    return rotation(d, rng) * float(rng.uniform(0.5, 2.0))


def _reflection(rng):
    return reflection(int(rng.integers(2, 5)), rng) * float(rng.uniform(0.5, 2.0))


def _defective(rng):
    lam = float(rng.choice([-3.0, -1.0, -0.05, 0.0, 0.5, 2.0]))
    k = int(rng.choice([2, 3]))
    blocks = [jordan_block(lam, k)]
    if rng.random() < 0.5:
        blocks.append(jordan_block(lam, k))  # a pair: first-order representable for lam < 0
    if rng.random() < 0.5:
        blocks.append(np.array([[float(rng.uniform(0.5, 2.0))]]))
    return similar(scipy.linalg.block_diag(*blocks), rng, cond_max=1e2)


def _singular(rng):
    d = int(rng.integers(2, 5))
    A = rng.standard_normal((d, d - 1))
    return A @ rng.standard_normal((d - 1, d))


FAMILIES = {
    "gaussian": _gaussian,
    "odd negative eigenvalues": _odd_negative,
    "rotation": _rotation,
    "reflection": _reflection,
    "defective": _defective,
    "singular": _singular,
}


def sample_family(name: str, rng: np.random.Generator) -> np.ndarray:
    """One matrix of the family ``name`` (a key of :data:`FAMILIES`)."""
    if name not in FAMILIES:
        raise ValueError(f"name must be one of {sorted(FAMILIES)}, got {name!r}")
    return FAMILIES[name](rng)
