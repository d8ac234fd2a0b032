"""Input validation shared by the ``theory`` modules."""

from __future__ import annotations

import math
from numbers import Real

import numpy as np

__all__ = ["NotRepresentable", "Undecided", "check_eps", "check_square_real"]


class NotRepresentable(ValueError):
    """No real ``theta`` with ``Psi_eps(theta) = D`` (or none this implementation can certify).

    ``reason`` says which eigenvalue or Jordan structure is in the way, or which numerical
    condition made the construction fail.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Undecided(NotRepresentable):
    """The decision lies inside the numerical tolerance: an eigenvalue within its error bound of
    0 (``eps = 0``) or of ``m_eps``, with Jordan blocks that are representable on one side and
    not on the other.  ``reason`` names the eigenvalue, its bound and its blocks."""


def check_eps(eps: float, name: str = "eps") -> float:
    """Return ``eps`` as a float; raise unless it is a finite real number ``>= 0``."""
    if isinstance(eps, bool) or not isinstance(eps, (Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {type(eps).__name__}")
    value = float(eps)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_square_real(D, name: str = "D") -> np.ndarray:
    """Return ``D`` as a float64 ``(d, d)`` array; raise on non-square, complex or non-finite."""
    try:
        arr = np.asarray(D)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name} must be array-like, got {type(D).__name__}") from exc
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating)
        or np.issubdtype(arr.dtype, np.integer)
        or np.issubdtype(arr.dtype, np.complexfloating)
    ):
        raise TypeError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(
            f"{name} must be a real matrix (a linear map of R^d), got dtype {arr.dtype}"
        )
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square (d, d) matrix, got shape {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must have finite entries, got NaN or inf")
    return arr
