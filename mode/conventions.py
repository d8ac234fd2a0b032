"""The one convention that ties a Momentum ResNet to the ODE ``eps x'' + x' = F(x, t)``.

On a horizon ``[0, T]`` with ``N`` steps of size ``eta = T / N``, the momentum rule

    v_{n+1} = gamma v_n + (1 - gamma) f_n(x_n),     x_{n+1} = x_n + v_{n+1}

discretizes the second-order ODE with

    f_n(x) = eta F(x, t_n),     gamma = 1 - eta / eps,     v_n ~ eta x'(t_n),

so ``eps = eta / (1 - gamma) = T / (N (1 - gamma))``. This module is the only place in the
library where that mapping is written; everything else calls it.
"""

from __future__ import annotations

import math
import operator
from numbers import Real

import torch

__all__ = ["gamma_to_eps", "eps_to_gamma", "check_gamma", "check_depth"]


def _value(x: float | torch.Tensor) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def check_gamma(gamma: float | torch.Tensor, name: str = "gamma") -> None:
    """Raise unless ``gamma`` is a real scalar in ``[0, 1]``."""
    if isinstance(gamma, torch.Tensor):
        if gamma.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(gamma.shape)}")
        if not gamma.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got dtype {gamma.dtype}")
    elif not isinstance(gamma, Real) or isinstance(gamma, bool):
        raise TypeError(f"{name} must be a float or a scalar tensor, got {type(gamma).__name__}")
    value = _value(gamma)
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def check_depth(depth: int, name: str = "depth") -> int:
    """Return ``depth`` as an ``int``; raise unless it is an integer ``>= 1``."""
    if isinstance(depth, bool):
        raise TypeError(f"{name} must be an integer, got {depth!r}")
    try:
        value = operator.index(depth)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {depth!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_horizon(horizon: float) -> None:
    if not math.isfinite(_value(horizon)) or _value(horizon) <= 0:
        raise ValueError(f"horizon must be a finite positive number, got {_value(horizon)}")


def gamma_to_eps(
    gamma: float | torch.Tensor, depth: int, horizon: float = 1.0
) -> float | torch.Tensor:
    """Mass ``eps`` of the ODE discretized by ``depth`` momentum steps on ``[0, horizon]``.

    ``eps = horizon / (depth (1 - gamma))``; ``gamma = 1`` gives ``eps = inf`` (no damping).
    A tensor ``gamma`` gives a tensor, differentiable in ``gamma``.
    """
    check_gamma(gamma)
    depth = check_depth(depth)
    _check_horizon(horizon)
    if isinstance(gamma, torch.Tensor):
        return horizon / (depth * (1 - gamma))
    if gamma == 1.0:
        return math.inf
    return horizon / (depth * (1.0 - gamma))


def eps_to_gamma(
    eps: float | torch.Tensor, depth: int, horizon: float = 1.0
) -> float | torch.Tensor:
    """Momentum ``gamma = 1 - horizon / (depth eps)`` of ``depth`` steps for the mass ``eps > 0``.

    The step ``eta = horizon / depth`` must satisfy ``eps >= eta``: a smaller ``eps`` would need
    ``gamma < 0`` and is an error, never a silent clamp. (The first-order limit ``eps -> 0`` is
    ``gamma = 0``, forward Euler; it is reached by ``mode.odeint(..., eps=0)``, not here.)
    """
    depth = check_depth(depth)
    _check_horizon(horizon)
    if isinstance(eps, torch.Tensor):
        if eps.numel() != 1:
            raise ValueError(f"eps must be a scalar, got a tensor of shape {tuple(eps.shape)}")
    elif not isinstance(eps, Real) or isinstance(eps, bool):
        raise TypeError(f"eps must be a float or a scalar tensor, got {type(eps).__name__}")
    value = _value(eps)
    if not value > 0:
        raise ValueError(f"eps must be > 0, got {value}")
    eta = horizon / depth
    if value < eta * (1 - 1e-12):
        raise ValueError(
            f"eps={value} is smaller than the step size horizon/depth={eta}: it would need "
            f"gamma = 1 - eta/eps < 0. Use depth >= {math.ceil(horizon / value)} or a larger eps."
        )
    if isinstance(eps, torch.Tensor):
        return 1 - eta / eps
    return 0.0 if value <= eta else 1.0 - eta / value
