"""Invertible one-step maps on a state pair, written as additive couplings.

Every reversible architecture in the library is a sequence of *steps*; every step acts on a
pair of tensors ``s = (s0, s1)`` of the same shape and is a short list of **couplings**

    s[t] <- alpha * s[t] + shift * s[o] + phi(s[o], *args),        o = 1 - t,

applied in order, followed by an optional swap ``(s0, s1) <- (s1, s0)``. ``alpha`` is a nonzero
scalar (a float or a 0-dim tensor that may require grad), ``shift`` a small integer and ``phi``
any function of the *other* slot (``None`` means zero). A coupling is invertible whatever
``phi`` is:

    s[t] <- (s[t] - shift * s[o] - phi(s[o], *args)) / alpha.

Writing a step this way is all an architecture has to do: the forward step, the inverse step,
the memory-saving backward pass and the bit-exact fixed-point mode (``mode.exact``) all follow
from the couplings (``mode.reversible`` runs them). ``shift`` is kept apart from ``phi``
because an integer multiple of a fixed-point state is exact, while ``phi`` is rounded.

Examples (DESIGN.md section 1)::

    momentum   (x, v):   v <- gamma v + (1 - gamma) f(x);   x <- x + v
    RevNet     (x1, x2): x1 <- x1 + F(x2);                  x2 <- x2 + G(x1)
    leapfrog   (Y_{j-1}, Y_j): Y_{j-1} <- -Y_{j-1} + 2 Y_j - h^2 g(Y_j), then swap
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from .conventions import check_gamma

__all__ = [
    "Coupling",
    "ReversibleStep",
    "MomentumStep",
    "StepGrid",
    "coupling_update",
    "scaled_phi",
    "apply_step",
    "invert_coupling",
    "invert_step",
]

State = tuple[torch.Tensor, torch.Tensor]


class Coupling(NamedTuple):
    """``s[t] <- alpha s[t] + shift s[o] + scale phi(s[o], *args)``, ``t = target, o = 1 - t``.

    ``alpha`` and ``scale`` are floats or 0-dim tensors (which may require grad); ``shift`` is a
    small integer. The engine captures a coupling when the forward runs and uses that very
    value in the backward pass: ``phi`` may read the parameters and buffers of its modules (the
    engine restores those the forward saw), but every other coefficient belongs in ``alpha``,
    ``scale`` or the closure itself, never in mutable Python state read at call time.
    """

    target: int
    alpha: float | torch.Tensor = 1.0
    shift: int = 0
    phi: Callable[..., torch.Tensor] | None = None
    scale: float | torch.Tensor = 1.0


def _alpha_value(alpha: float | torch.Tensor) -> float:
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1:
            raise ValueError(
                f"a coupling's alpha must be a number or a one-element tensor (one scalar for "
                f"the whole state), got a tensor of shape {tuple(alpha.shape)}")
        return float(alpha.detach())
    return float(alpha)


class ReversibleStep(nn.Module):
    """One invertible map ``(s0, s1) -> (s0', s1')`` given by :meth:`couplings`.

    Subclasses implement :meth:`couplings` (and set ``swap = True`` if the pair is exchanged
    at the end). ``forward`` and ``inverse`` are derived; ``mode.reversible.integrate`` runs
    a sequence of steps with depth-independent memory and, optionally, bit-exact arithmetic.
    ``mode.check_reversible`` checks a step of one's own against autograd.
    """

    swap: bool = False

    def couplings(self) -> Sequence[Coupling]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, *args) -> State:
        return apply_step(self, (s0, s1), args)

    def inverse(self, s0: torch.Tensor, s1: torch.Tensor, *args) -> State:
        return invert_step(self, (s0, s1), args)


def _check_phi_output(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"a residual function must return a tensor, got {type(out).__name__}")
    if out.shape != like.shape:
        raise ValueError(
            f"a residual function changed the shape of its input: {tuple(like.shape)} -> "
            f"{tuple(out.shape)}; residual functions must map x to a tensor of x's shape"
        )
    if out.is_complex() and not like.is_complex():
        raise TypeError(
            f"a residual function returned a {out.dtype} tensor for a real {like.dtype} state; "
            f"a coupling adds it to the state, so it must be real (take .real or .abs())"
        )
    return out


def scaled_phi(c: Coupling, other: torch.Tensor, args: tuple = (), scale=None) -> torch.Tensor:
    """``scale * phi(other, *args)`` (``scale`` defaults to ``c.scale``; 1 multiplies nothing)."""
    p = _check_phi_output(c.phi(other, *args), other)
    scale = c.scale if scale is None else scale
    if isinstance(scale, torch.Tensor) or scale != 1.0:
        p = scale * p
    return p


def coupling_update(c: Coupling, s: Sequence[torch.Tensor], args: tuple = ()) -> torch.Tensor:
    """The new value of ``s[c.target]``: ``alpha s[t] + shift s[o] + scale phi(s[o], *args)``.

    The one float implementation of a coupling, shared by autograd and the reversible engine so
    that both compute bit-identical forward passes.
    """
    other, new = s[1 - c.target], s[c.target]
    if c.phi is not None:
        p = scaled_phi(c, other, args)
        if isinstance(c.alpha, torch.Tensor):
            new = torch.addcmul(p, new, c.alpha)
        else:
            new = torch.add(p, new, alpha=c.alpha) if c.alpha != 1.0 else p + new
    elif _alpha_value(c.alpha) != 1.0:
        new = new * c.alpha
    if c.shift:
        new = torch.add(new, other, alpha=c.shift)
    return new


def apply_step(step: ReversibleStep, state: State, args: tuple = ()) -> State:
    """Run one step forward in ordinary (differentiable) float arithmetic."""
    s = list(state)
    for c in step.couplings():
        s[c.target] = coupling_update(c, s, args)
    return (s[1], s[0]) if step.swap else (s[0], s[1])


def invert_coupling(c: Coupling, s: list[torch.Tensor], args: tuple = ()) -> torch.Tensor:
    """The value of ``s[c.target]`` before the coupling, in float arithmetic."""
    a = _alpha_value(c.alpha)
    if a == 0.0:
        raise ValueError(
            "cannot invert a coupling with alpha = 0 (for a momentum step: gamma = 0 is a "
            "plain ResNet, which has no inverse)"
        )
    other = s[1 - c.target]
    new = s[c.target]
    if c.shift:
        new = new - c.shift * other
    if c.phi is not None:
        new = new - scaled_phi(c, other, args)
    return new / c.alpha if a != 1.0 else new


def invert_step(step: ReversibleStep, state: State, args: tuple = ()) -> State:
    """Undo :func:`apply_step` in float arithmetic (couplings in reverse order)."""
    s = list(state)
    if step.swap:
        s = [s[1], s[0]]
    for c in reversed(step.couplings()):
        s[c.target] = invert_coupling(c, s, args)
    return s[0], s[1]


class MomentumStep(ReversibleStep):
    """One Momentum ResNet layer on the state ``(x, v)``.

        v <- gamma v + (1 - gamma) f(x, *args)
        x <- x + v

    Parameters
    ----------
    function : callable
        The residual function ``f(x, *args)``; must return a tensor of ``x``'s shape.
    gamma : float or 0-dim tensor
        Momentum in ``[0, 1]``; a tensor (e.g. an ``nn.Parameter``) may be learned.
    """

    def __init__(self, function: Callable[..., torch.Tensor], gamma: float | torch.Tensor):
        super().__init__()
        check_gamma(gamma)
        self.function = function
        self.gamma = gamma

    def couplings(self) -> Sequence[Coupling]:
        g = self.gamma
        return (
            Coupling(target=1, alpha=g, phi=self.function, scale=1 - g),
            Coupling(target=0, alpha=1.0, shift=1),
        )

    def extra_repr(self) -> str:
        g = _alpha_value(self.gamma)
        learn = isinstance(self.gamma, torch.Tensor) and self.gamma.requires_grad
        return f"gamma={g:g}{' (learned)' if learn else ''}"


class StepGrid(Sequence[ReversibleStep]):
    """One step module applied at the times of a grid: a chain of ``len(times)`` steps that
    costs one module, not one per step.

    Item ``j`` is the module; ``couplings(j)`` are its couplings at ``times[j]``, made by
    ``couplings_at(times[j])`` (a time-dependent step, ``h F(t_n, x)`` of an ODE solver, bakes
    ``t_n`` into them). A grid is a value: build a new one rather than change one.

    Parameters
    ----------
    step : ReversibleStep
        The shared step (its parameters, buffers and modules are the chain's).
    times : 1-D tensor
        One time per step.
    couplings_at : callable
        ``couplings_at(t_j) -> Sequence[Coupling]`` for a 0-dim tensor ``t_j``; the same
        ``alpha``, ``shift`` and ``scale`` at every time.
    """

    def __init__(self, step: ReversibleStep, times: torch.Tensor, couplings_at: Callable):
        self.step, self.times, self.couplings_at = step, times, couplings_at

    def __len__(self) -> int:
        return self.times.shape[0]

    def __getitem__(self, j):
        if isinstance(j, slice):
            raise TypeError("a StepGrid is indexed by integers only")
        if not -len(self) <= j < len(self):
            raise IndexError(f"step {j} of a grid of {len(self)}")
        return self.step

    def couplings(self, j: int) -> Sequence[Coupling]:
        """The couplings of step ``j``: those of the module at ``times[j]``."""
        return tuple(self.couplings_at(self.times.select(0, j)))

    def __repr__(self) -> str:
        return f"StepGrid({self.step!r}, {len(self)} times)"
