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
from numbers import Complex, Real

import torch

__all__ = ["gamma_to_eps", "eps_to_gamma", "check_gamma", "check_depth", "check_real"]


def _value(x: float | torch.Tensor) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def check_real(
    x: float | torch.Tensor, name: str, *, integer_tensors: bool = False
) -> float:
    """Return the value of the real scalar ``x``; raise unless it is one.

    Accepted: a real number (``int``, ``float``, numpy's real scalars; not ``bool``) or a
    one-element floating tensor (also an integer tensor with ``integer_tensors=True``). A bool,
    a string, a complex number or tensor, or a tensor of several elements is an error naming
    ``name``: ``float()`` would turn ``True`` into 1 and ``"0.5"`` into 0.5 silently, and a
    complex tensor would carry a complex value through the library's formulas.
    """
    allowed = "a real number or a one-element floating tensor"
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar ({allowed}), got a tensor of shape "
                             f"{tuple(x.shape)}")
        if x.dtype.is_complex:
            raise TypeError(f"{name} must be real ({allowed}), got a complex tensor "
                            f"(dtype {x.dtype})")
        if x.dtype == torch.bool or not (
            x.dtype.is_floating_point or integer_tensors
        ):
            raise TypeError(f"{name} must be {allowed}, got a tensor of dtype {x.dtype}")
        return float(x.detach())
    if isinstance(x, bool) or not isinstance(x, Real):
        complex_ = isinstance(x, Complex) and not isinstance(x, Real)  # bool is a Complex
        kind = "complex number" if complex_ else type(x).__name__
        raise TypeError(f"{name} must be {allowed}, got {kind} {x!r}")
    return float(x)


def check_gamma(gamma: float | torch.Tensor, name: str = "gamma") -> None:
    """Raise unless ``gamma`` is a real scalar in ``[0, 1]`` (a number or a floating tensor)."""
    value = check_real(gamma, name)
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def _scalar_text(x: float | torch.Tensor, spec: str = "g") -> str:
    """``x`` formatted with ``spec`` for a ``repr``; never raises (a ``repr`` must not).

    A tensor of several elements, a complex or unreadable value is described instead.
    """
    try:
        if isinstance(x, torch.Tensor):
            if x.numel() != 1:
                return f"<tensor of shape {tuple(x.shape)}>"
            if x.dtype.is_complex:
                return f"<complex tensor {complex(x.detach())}>"
        return format(_value(x), spec)
    except Exception:  # noqa: BLE001 - e.g. a meta tensor has no value to print
        return f"<{type(x).__name__} without a printable value>"


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
    value = check_real(horizon, "horizon")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"horizon must be a finite positive number, got {value}")


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
    value = check_real(eps, "eps")
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


def _gamma_for_repr(gamma: float | torch.Tensor) -> tuple[str, float | None]:
    """``(text, value)`` for a ``repr``: ``gamma`` formatted, and its value when it is a valid
    momentum in ``[0, 1]`` (``None`` otherwise: a learned gamma may leave the interval, and a
    ``repr`` must still print it). Never raises."""
    try:
        check_gamma(gamma)
    except (TypeError, ValueError):
        return _scalar_text(gamma), None
    return _scalar_text(gamma), _value(gamma)
