r"""Numerical Jordan structure of a nilpotent matrix (rank sequences and Jordan chains).

For a nilpotent ``N`` (``n x n``) the nullities ``k_j = dim ker N^j`` determine the Jordan
blocks: ``#(blocks of size >= j) = k_j - k_{j-1}``.  Ranks are decided by singular values
against ``rank_tol * scale^j`` for ``N^j``; a rank sequence that is not that of a nilpotent
matrix (``k_n < n``, or increments that grow) means the cluster is not one eigenvalue at this
tolerance, and ``None`` is returned so the caller can split it.

Chains: for each size ``j`` (largest first) the new chain heads are taken in ``ker N^j`` and
as far as possible (largest singular values) from ``ker N^(j-1) + span{N^(i-j) h}`` of the
longer chains; the chain ``(N^(j-1) h, ..., N h, h)`` gives columns ``P`` with
``N P = P J`` (``J`` the nilpotent Jordan form, ones on the superdiagonal).
"""

from __future__ import annotations

import numpy as np

__all__ = ["jordan_block_sizes", "jordan_chains"]


def _powers(N: np.ndarray, count: int | None = None) -> list[np.ndarray]:
    """``[I, N, ..., N^count]`` (``count`` defaults to ``n``)."""
    n = N.shape[0]
    out = [np.eye(n, dtype=N.dtype)]
    for _ in range(n if count is None else count):
        out.append(out[-1] @ N)
    return out


def _nullities(Ns: np.ndarray, rank_tol: float) -> list[int]:
    """``[k_0 = 0, k_1, ..., k_n]``, ``k_j = dim ker Ns^j`` at ``rank_tol``; stops computing
    once ``k_j = n`` (every further power is then zero too)."""
    n = Ns.shape[0]
    k = [0]
    P = np.eye(n, dtype=Ns.dtype)
    for _ in range(n):
        P = P @ Ns
        s = np.linalg.svd(P, compute_uv=False)
        k.append(n - int(np.sum(s > rank_tol)))
        if k[-1] == n:
            break
    return k + [k[-1]] * (n + 1 - len(k))


def jordan_block_sizes(N: np.ndarray, scale: float, rank_tol: float) -> dict[int, int] | None:
    """``{size: count}`` of the Jordan blocks of the (numerically) nilpotent ``N``, or ``None``."""
    n = N.shape[0]
    k = _nullities(N / scale, rank_tol)
    if k[n] != n:
        return None
    d = [k[j] - k[j - 1] for j in range(1, n + 1)] + [0]
    if d[0] < 1 or any(d[i + 1] > d[i] for i in range(n)):
        return None
    return {j: d[j - 1] - d[j] for j in range(1, n + 1) if d[j - 1] - d[j] > 0}


def _nullspace(A: np.ndarray, thresh: float) -> np.ndarray:
    _, s, vh = np.linalg.svd(A)
    r = int(np.sum(s > thresh))
    return vh[r:].conj().T


def _orth(A: np.ndarray, rank: int) -> np.ndarray:
    if A.shape[1] == 0 or rank == 0:
        return np.zeros((A.shape[0], 0), dtype=A.dtype)
    u, _, _ = np.linalg.svd(A, full_matrices=False)
    return u[:, :rank]


def jordan_chains(N: np.ndarray, sizes: dict[int, int], scale: float,
                  rank_tol: float) -> list[list[np.ndarray]]:
    """Jordan chains of ``N`` for the block structure ``sizes``.

    Returns a list of chains, longest first; chain ``[b_1, ..., b_j]`` has ``N b_1 ~ 0`` and
    ``N b_i = scale * b_{i-1}`` (chains of ``N / scale``: no power of ``scale`` is formed).
    """
    n = N.shape[0]
    pw = _powers(N / scale, max(sizes))
    th = [rank_tol] * len(pw)
    chains: list[list[np.ndarray]] = []
    for j in sorted(sizes, reverse=True):
        count = sizes[j]
        K_j = _nullspace(pw[j], th[j])
        K_prev = _nullspace(pw[j - 1], th[j - 1]) if j > 1 else np.zeros((n, 0), N.dtype)
        longer = [pw[len(ch) - j] @ ch[-1] for ch in chains]
        avoid = np.column_stack([K_prev, *longer]) if (K_prev.shape[1] or longer) else K_prev
        Q = _orth(avoid, K_prev.shape[1] + len(longer))
        X = K_j - Q @ (Q.conj().T @ K_j)
        _, _, vh = np.linalg.svd(X, full_matrices=False)
        for r in range(count):
            h = K_j @ vh[r].conj()
            h = h / np.linalg.norm(h)
            chains.append([pw[j - 1 - i] @ h for i in range(j)])
    return chains
