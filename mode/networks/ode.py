"""``nn.Module`` front ends of :func:`mode.odeint`: the first-order and the momentum Neural ODE.

    NeuralODE:          x' = F(t, x)
    MomentumNeuralODE:  eps x'' + x' = F(t, x),  x'(t_0) = u_0 (0, or init_velocity(x_0))

Both keep the number of evaluations of ``F`` in the last forward pass (``nfe_forward``) and in
the last backward pass (``nfe_backward``: 0 for plain autograd, the adjoint solve's count for
``adjoint=True``, the recomputation's count for the reversible momentum method).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as nnf

from ..conventions import _scalar_text, check_real
from ..solve import Field, State, solve

__all__ = ["NeuralODE", "MomentumNeuralODE"]


class _BackwardStart(torch.autograd.Function):
    """Identity whose backward runs a callback first: marks the start of a backward pass."""

    @staticmethod
    def forward(ctx, callback, *tensors):
        ctx.callback = callback
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.callback()
        return (None, *grads)


class _ODEBase(nn.Module):
    def __init__(
        self,
        func: Callable,
        *,
        t: torch.Tensor | Sequence[float] | None,
        method: str,
        rtol: float,
        atol: float,
        options: dict | None,
        adjoint: bool | str,
        trajectory: bool,
    ):
        super().__init__()
        self.field = Field(func)
        self.field.counter = self._count
        t = torch.tensor([0.0, 1.0]) if t is None else torch.as_tensor(t)
        if t.dim() != 1 or t.numel() < 2 or not t.dtype.is_floating_point:
            raise ValueError(f"t must be a 1-D float tensor of >= 2 times, got {t!r}")
        self.register_buffer("t", t.clone())
        self.method = method
        self.rtol = rtol
        self.atol = atol
        self.options = options
        self.adjoint = adjoint
        self.trajectory = trajectory
        self.nfe_forward = 0
        self.nfe_backward = 0
        self._pass = "idle"

    @property
    def func(self) -> Callable:
        return self.field.func

    def _count(self) -> None:
        counts = self.__dict__  # plain ints: nn.Module.__setattr__ would cost ~3 us per count
        if self._pass == "forward":
            counts["nfe_forward"] += 1
        elif self._pass == "backward":
            counts["nfe_backward"] += 1

    def _backward_started(self) -> None:
        self._pass = "backward"
        self.nfe_backward = 0

    def _run(self, x0: State, t, eps, u0, return_velocity: bool):
        if t is None:  # the default times follow the state's dtype
            like = x0 if isinstance(x0, torch.Tensor) else x0[0]
            t = self.t.to(dtype=like.dtype) if like.dtype.is_floating_point else self.t
        self._pass = "forward"
        self.nfe_forward = 0
        try:
            out = solve(
                self.field, x0, t, eps=eps, u0=u0, method=self.method, rtol=self.rtol,
                atol=self.atol, options=self.options, adjoint=self.adjoint,
                return_velocity=return_velocity,
            )
        finally:
            self._pass = "idle"
        flat = _flat(out)
        if torch.is_grad_enabled() and any(z.requires_grad for z in flat):
            flat = _BackwardStart.apply(self._backward_started, *flat)
        out = _unflat(flat, out)
        if self.trajectory:
            return out
        return _map(lambda z: z[-1], out)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, adjoint={self.adjoint!r}, t={self.t.tolist()}"


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [z for part in out for z in _flat(part)]


def _unflat(flat, like):
    it = iter(flat)

    def build(node):
        if isinstance(node, torch.Tensor):
            return next(it)
        return tuple(build(p) for p in node)

    return build(like)


def _map(fn, out):
    if isinstance(out, torch.Tensor):
        return fn(out)
    return tuple(_map(fn, p) for p in out)


class NeuralODE(_ODEBase):
    """First-order Neural ODE ``x' = func(t, x)`` solved by :func:`mode.odeint` (``eps = 0``).

    Parameters
    ----------
    func : callable ``func(t, x)`` (an ``nn.Module`` for learning)
        The vector field, torchdiffeq's convention.
    t : 1-D tensor, optional
        Default output times (``[0, 1]``); ``forward(x0, t)`` may override them.
    method, rtol, atol, options, adjoint
        As in :func:`mode.odeint` (``adjoint="reversible"`` is impossible at ``eps = 0``).
    trajectory : bool
        ``forward`` returns the states at every time, shape ``(len(t), *x0.shape)``; by default
        only the final state, shape ``x0.shape`` (a drop-in layer).

    Attributes
    ----------
    nfe_forward, nfe_backward : int
        Evaluations of ``func`` in the last forward and backward passes.
    """

    def __init__(
        self,
        func: Callable,
        *,
        t: torch.Tensor | Sequence[float] | None = None,
        method: str = "dopri5",
        rtol: float = 1e-7,
        atol: float = 1e-9,
        options: dict | None = None,
        adjoint: bool | str = False,
        trajectory: bool = False,
    ):
        super().__init__(
            func, t=t, method=method, rtol=rtol, atol=atol, options=options, adjoint=adjoint,
            trajectory=trajectory,
        )

    def forward(self, x0: State, t: torch.Tensor | None = None):
        """``x(t_end)`` (or the trajectory) of ``x' = func(t, x)``, ``x(t_0) = x0``."""
        return self._run(x0, t, 0.0, None, False)


def _check_constant(value, name: str) -> float:
    """``value`` as a float: a real number, or a one-element floating tensor without grad.

    A tensor that requires grad would be frozen into a float here and never learned; the
    learned mass is ``learn_eps=True``.
    """
    if isinstance(value, torch.Tensor) and value.requires_grad:
        raise TypeError(
            f"{name} must be a number, got a tensor that requires grad ({name}={value!r}): it "
            f"would be frozen to a float silently. To learn the mass pass learn_eps=True (eps "
            f"is then the initial value); otherwise pass a number or {name}.detach()"
        )
    return check_real(value, name)


class MomentumNeuralODE(_ODEBase):
    """Second-order Neural ODE ``eps x'' + x' = func(t, x)``, the continuous Momentum ResNet.

    Parameters
    ----------
    func : callable ``func(t, x)``
        The field ``F``.
    eps : float > 0
        The mass (initial value when learned): a real number (a one-element floating tensor
        without grad is read as its number; bools, strings and complex values are errors).
    learn_eps : bool
        Learn ``eps`` through the positive parameterization ``eps = eps_min + softplus(r)``.
        Must be ``True`` or ``False``.
    eps_min : float >= 0
        Lower bound of a learned ``eps``. With ``method="momentum"`` and step ``h`` set
        ``eps_min >= h`` so that ``gamma = 1 - h/eps`` stays in ``[0, 1]`` while learning.
    init_velocity : callable, optional
        ``u_0 = init_velocity(x_0)`` (default ``u_0 = 0``); an explicit ``u0`` wins.
    t, method, rtol, atol, options, adjoint, trajectory
        As in :class:`NeuralODE` and :func:`mode.odeint`; ``method="momentum"`` with
        ``adjoint="reversible"`` is the exact constant-memory solver.

    Attributes
    ----------
    eps : float or 0-dim tensor
        The current mass (a tensor with a gradient when learned).
    nfe_forward, nfe_backward : int
        Evaluations of ``func`` in the last forward and backward passes.
    """

    def __init__(
        self,
        func: Callable,
        eps: float,
        *,
        learn_eps: bool = False,
        eps_min: float = 0.0,
        init_velocity: Callable | None = None,
        t: torch.Tensor | Sequence[float] | None = None,
        method: str = "dopri5",
        rtol: float = 1e-7,
        atol: float = 1e-9,
        options: dict | None = None,
        adjoint: bool | str = False,
        trajectory: bool = False,
    ):
        super().__init__(
            func, t=t, method=method, rtol=rtol, atol=atol, options=options, adjoint=adjoint,
            trajectory=trajectory,
        )
        eps = _check_constant(eps, "eps")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {eps}")
        eps_min = _check_constant(eps_min, "eps_min")
        if not (math.isfinite(eps_min) and 0 <= eps_min < eps):
            raise ValueError(f"eps_min must satisfy 0 <= eps_min < eps={eps}, got {eps_min}")
        if not isinstance(learn_eps, bool):  # bool("no") is True: never guess
            raise TypeError(f"learn_eps must be a bool (True or False), got {learn_eps!r}")
        if init_velocity is not None and not callable(init_velocity):
            raise TypeError(f"init_velocity must be callable, got {type(init_velocity).__name__}")
        self.init_velocity = init_velocity
        self.learn_eps = learn_eps
        self.eps_min = eps_min
        if self.learn_eps:
            gap = eps - eps_min  # softplus^{-1}(gap) = gap + log(1 - exp(-gap))
            self.eps_raw = nn.Parameter(torch.tensor(gap + math.log(-math.expm1(-gap))))
        else:
            self._eps = eps

    @property
    def eps(self) -> float | torch.Tensor:
        if self.learn_eps:
            return self.eps_min + nnf.softplus(self.eps_raw)
        return self._eps

    def forward(
        self,
        x0: State,
        t: torch.Tensor | None = None,
        *,
        u0: State | None = None,
        return_velocity: bool = False,
    ):
        """``x(t_end)`` (or the trajectory), and ``x'`` with ``return_velocity``.

        Shapes as in :func:`mode.odeint` (the last time only unless ``trajectory=True``).
        """
        if u0 is None and self.init_velocity is not None:
            u0 = self.init_velocity(x0)
        eps = self.eps
        if isinstance(eps, torch.Tensor):
            like = x0 if isinstance(x0, torch.Tensor) else x0[0]
            eps = eps.to(dtype=like.dtype, device=like.device)
        return self._run(x0, t, eps, u0, return_velocity)

    def extra_repr(self) -> str:
        try:
            e = _scalar_text(self.eps)
        except Exception:  # noqa: BLE001 - a repr never raises (e.g. a replaced eps_raw)
            e = "<unreadable>"
        return f"eps={e}{' (learned)' if self.learn_eps else ''}, " + super().extra_repr()
