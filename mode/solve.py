"""One entry point for the continuous model ``eps x'' + x' = F(t, x)`` and its first-order limit.

:func:`odeint` solves

    eps x'' + x' = F(t, x),   x(t_0) = x_0,   x'(t_0) = u_0          (eps > 0)
    x' = F(t, x),             x(t_0) = x_0                            (eps = 0)

with any torchdiffeq method (fixed-grid or adaptive, plain autograd or ``odeint_adjoint``) or
with the Momentum ResNet rule itself used as a fixed-grid integrator (``method="momentum"``).
For ``eps > 0`` the torchdiffeq methods integrate the first-order system in ``(x, u = x')``

    x' = u,    u' = (F(t, x) - u) / eps.

The momentum method runs, on a grid of step ``h``,

    v_{n+1} = gamma v_n + (1 - gamma) f_n(x_n),   x_{n+1} = x_n + v_{n+1},
    f_n(x) = h F(t_n, x),   gamma = eps_to_gamma(eps, depth=1, horizon=h) = 1 - h / eps,
    v_0 = h u_0,            velocity u_n = v_n / h,

which is exactly a :class:`mode.MomentumResNet` with those ``f_n`` and ``gamma`` (DESIGN.md 1).
It needs ``h <= eps``; ``eps = 0`` gives ``gamma = 0``, forward Euler. Its gradient strategy is
chosen by ``adjoint``: ``False`` is plain autograd, ``"reversible"`` backpropagates through the
bit-exact fixed-point reconstruction of ``mode.reversible`` (no stored activations: memory
independent of the number of steps; the reconstructed states are bit-identical to the forward
ones, so the gradient is autograd's on that forward, which itself runs in fixed point:
``frac_bits`` fractional bits for ``x`` and ``log2(1/h)`` more for ``v = h u``, see
:func:`fixed_point_bits`; in float64 the gradients match autograd's to about 1e-11) and
``True`` through the float reconstruction (the same memory, gradients exact up to a rounding
error amplified by about ``gamma^{-N}``, the analogue of an adjoint's approximate gradient).
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from numbers import Real

import torch
import torchdiffeq
from torch import nn

from . import reversible as engine
from .conventions import check_real, eps_to_gamma
from .exact import DEFAULT_FRAC_BITS, MAX_FRAC_BITS
from .reversible import DEFAULT_FRAC_BITS_FLOAT64, Strategy, adjoint_strategy
from .steps import Coupling, ReversibleStep, StepGrid

__all__ = ["odeint", "solve", "Field", "MethodInfo", "METHODS", "known_methods", "momentum_grid"]

State = torch.Tensor | tuple[torch.Tensor, ...]

# Default fractional bits of x for adjoint="reversible" are the engine's by dtype (48 for
# float64 states, held in int64: gradients at float64 round-off on the same grid, for a range
# |x|, |u| < 2^(60 - 48) = 4096; 32 otherwise, range 2^(46 - 32) = 16384).


# ----------------------------------------------------------------------------- method registry


@dataclass(frozen=True)
class MethodInfo:
    """What the library knows about an integration method.

    ``family`` is ``"adaptive"`` or ``"fixed"`` (torchdiffeq methods mode has metadata for),
    ``"discrete"`` (the momentum rule) or ``"torchdiffeq"`` (a method the installed torchdiffeq
    registers that mode has no metadata for: accepted and passed through, order unknown);
    ``order`` is the classical order of accuracy (``None`` when variable or unknown);
    ``reversible`` says whether ``adjoint="reversible"`` is available.
    """

    name: str
    family: str
    order: int | None
    reversible: bool = False
    description: str = ""


# Metadata for the methods mode knows (torchdiffeq 0.2.5's and its own). Which methods odeint
# accepts is not this table but the installed torchdiffeq's registry, read at call time
# (known_methods): a method that a newer torchdiffeq adds is accepted without an entry here.
METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo("dopri8", "adaptive", 8, description="Dormand-Prince 8(7), torchdiffeq"),
        MethodInfo("dopri5", "adaptive", 5, description="Dormand-Prince 5(4), torchdiffeq"),
        MethodInfo("bosh3", "adaptive", 3, description="Bogacki-Shampine 3(2), torchdiffeq"),
        MethodInfo("fehlberg2", "adaptive", 2, description="Runge-Kutta-Fehlberg 2(1)"),
        MethodInfo("adaptive_heun", "adaptive", 2, description="Heun-Euler 2(1), torchdiffeq"),
        MethodInfo("euler", "fixed", 1, description="forward Euler, torchdiffeq"),
        MethodInfo("midpoint", "fixed", 2, description="explicit midpoint, torchdiffeq"),
        MethodInfo("heun2", "fixed", 2, description="Heun's method, torchdiffeq"),
        MethodInfo("heun3", "fixed", 3, description="Heun's third-order method, torchdiffeq"),
        MethodInfo("rk4", "fixed", 4, description="Runge-Kutta 4 (3/8 rule), torchdiffeq"),
        MethodInfo(
            "explicit_adams", "fixed", None,
            description="Adams-Bashforth, torchdiffeq. Known to misbehave (torchdiffeq 0.2.5): "
            "on x' = -x with step_size 0.01 it ends at 0.74 instead of exp(-1) = 0.37 at t = 1 "
            "and grows past 1e39 by t = 5; prefer implicit_adams or rk4",
        ),
        MethodInfo("implicit_adams", "fixed", None, description="Adams-Bashforth-Moulton"),
        MethodInfo("fixed_adams", "fixed", None, description="alias of implicit_adams"),
        MethodInfo("scipy_solver", "adaptive", None, description="scipy solve_ivp (no autograd)"),
        MethodInfo(
            "momentum", "discrete", 1, reversible=True,
            description="the Momentum ResNet rule as a fixed-grid integrator (mode)",
        ),
    )
}
# The torchdiffeq methods mode has metadata for; also the fallback list of accepted methods
# when the installed torchdiffeq's registry cannot be read.
TORCHDIFFEQ_METHODS = tuple(name for name, m in METHODS.items() if m.family != "discrete")
_ADJOINT_CHOICES = (False, True, "reversible")
# Where torchdiffeq keeps its name -> solver registry (private; 0.2.x: _impl/odeint.py).
_TORCHDIFFEQ_REGISTRY = ("torchdiffeq._impl.odeint", "SOLVERS")


def _torchdiffeq_methods() -> tuple[str, ...]:
    """The method names the installed torchdiffeq registers, read now.

    The registry is private to torchdiffeq; if it has moved or is not a mapping of names, the
    names mode knows (:data:`TORCHDIFFEQ_METHODS`) are used instead.
    """
    module_name, attribute = _TORCHDIFFEQ_REGISTRY
    try:
        registry = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        return TORCHDIFFEQ_METHODS
    if not isinstance(registry, Mapping):
        return TORCHDIFFEQ_METHODS
    names = tuple(name for name in registry if isinstance(name, str) and name != "momentum")
    return names or TORCHDIFFEQ_METHODS


def known_methods() -> tuple[str, ...]:
    """Names accepted by ``odeint(..., method=...)`` now: the installed torchdiffeq's methods
    (in its registry's order) and ``"momentum"``."""
    return (*_torchdiffeq_methods(), "momentum")


# ----------------------------------------------------------------------------- input checks


def _as_tuple(x: State, name: str) -> tuple[torch.Tensor, ...]:
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, (tuple, list)) and len(x) > 0 and all(isinstance(c, torch.Tensor) for c in x):
        return tuple(x)
    raise TypeError(
        f"{name} must be a tensor or a non-empty tuple of tensors, got {type(x).__name__}"
    )


def _check_x0(x0: State) -> tuple[torch.Tensor, ...]:
    xs = _as_tuple(x0, "x0")
    for i, c in enumerate(xs):
        if not c.dtype.is_floating_point:
            raise TypeError(f"x0[{i}] must be a floating tensor, got dtype {c.dtype}")
        if c.dtype != xs[0].dtype or c.device != xs[0].device:
            raise TypeError(
                f"all components of x0 must share dtype and device; x0[0] is {xs[0].dtype} on "
                f"{xs[0].device}, x0[{i}] is {c.dtype} on {c.device}"
            )
    return xs


def _check_t(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        if isinstance(t, Sequence) and all(isinstance(s, Real) for s in t):
            t = torch.tensor([float(s) for s in t], dtype=like.dtype)
        else:
            raise TypeError(f"t must be a 1-D tensor of times, got {type(t).__name__}")
    if t.dim() != 1 or t.numel() < 1:
        raise ValueError(f"t must be a non-empty 1-D tensor of times, got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"t must be a floating tensor, got dtype {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"t must be finite, got {t.tolist()}")
    if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
        raise ValueError(f"t must be strictly increasing, got {t.tolist()}")
    return t.to(device=like.device)


def _step_size(step) -> float:
    """``options['step_size']`` as a float: a positive finite number or a one-element tensor
    (not a bool, which ``float()`` would read as 1)."""
    if isinstance(step, torch.Tensor) and step.numel() == 1:
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, Real) or not (
            math.isfinite(step) and step > 0):
        raise ValueError(f"options['step_size'] must be a positive number, got {step!r}")
    return float(step)


def _check_torchdiffeq_options(options: dict | None, rtol, atol) -> None:
    """The options torchdiffeq would otherwise meet with an internal message (or read
    ``True`` as a step of 1): a step size, and the tolerances."""
    step = (options or {}).get("step_size")
    if step is not None:
        _step_size(step)
    for name, tol in (("rtol", rtol), ("atol", atol)):
        values = tol.detach().reshape(-1).tolist() if isinstance(tol, torch.Tensor) else [tol]
        if any(isinstance(v, bool) or not isinstance(v, Real) or not (math.isfinite(v) and v >= 0)
               for v in values):
            raise ValueError(f"{name} must be a finite number >= 0 (or a tensor of them), got "
                             f"{tol!r}")
    if not isinstance(rtol, torch.Tensor) and not isinstance(atol, torch.Tensor) \
            and rtol == 0 and atol == 0:
        raise ValueError("rtol and atol are both 0: an adaptive step would shrink to nothing")


def _reaches(x: torch.Tensor, ids: set[int]) -> bool:
    """Whether ``x``'s autograd history contains a leaf whose ``id`` is in ``ids``."""
    return any(id(var) in ids for var in engine.graph_leaves(x))


def _check_eps(eps: float | torch.Tensor) -> float | torch.Tensor:
    """Return eps as a float, or as a scalar tensor when it requires grad.

    eps is a real number (not a bool or a string) or a one-element floating tensor (not a
    complex or integer one): ``float()`` would read ``True`` as 1 and ``"0.5"`` as 0.5.
    """
    value = check_real(eps, "eps")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"eps must be a finite number >= 0 (0: first-order ODE), got {value}")
    if isinstance(eps, torch.Tensor) and eps.requires_grad:
        return eps.reshape(())
    return value


def _check_u0(u0: State | None, xs: tuple[torch.Tensor, ...], eps_value: float):
    if u0 is None:
        return tuple(torch.zeros_like(c) for c in xs)
    if eps_value == 0:
        raise ValueError(
            "u0 was given but eps == 0: the first-order ODE x' = F(t, x) has no initial "
            "velocity; pass u0=None or eps > 0"
        )
    us = _as_tuple(u0, "u0")
    if len(us) != len(xs) or any(u.shape != c.shape for u, c in zip(us, xs, strict=False)):
        raise ValueError(
            f"u0 must have the structure and shapes of x0: x0 {[tuple(c.shape) for c in xs]}, "
            f"u0 {[tuple(u.shape) for u in us]}"
        )
    return tuple(u.to(dtype=c.dtype, device=c.device) for u, c in zip(us, xs, strict=True))


def _check_method(method: str) -> MethodInfo:
    if not isinstance(method, str):
        raise ValueError(
            f"method must be a string naming a method, got {type(method).__name__} {method!r}; "
            f"known methods: {', '.join(known_methods())}"
        )
    if method == "momentum":
        return METHODS[method]
    accepted = _torchdiffeq_methods()
    if method not in accepted:
        raise ValueError(
            f"method={method!r} is unknown; known methods (those the installed torchdiffeq "
            f"registers, and 'momentum'): {', '.join((*accepted, 'momentum'))}"
        )
    if method in METHODS:
        return METHODS[method]
    return MethodInfo(
        method, "torchdiffeq", None,
        description="registered by the installed torchdiffeq; mode has no metadata for it",
    )


def _check_adjoint(adjoint, info: MethodInfo, eps_value: float, func) -> None:
    if not any(adjoint is a or (isinstance(a, str) and adjoint == a) for a in _ADJOINT_CHOICES):
        raise ValueError(f"adjoint must be False, True or 'reversible', got {adjoint!r}")
    if adjoint == "reversible":
        if not info.reversible:
            raise ValueError(
                f"adjoint='reversible' needs a method that can run backwards exactly; "
                f"method={info.name!r} cannot. Use method='momentum' (reversible methods: "
                f"{', '.join(n for n, m in METHODS.items() if m.reversible)}) or adjoint=True"
            )
        if eps_value == 0:
            raise ValueError(
                "adjoint='reversible' with eps=0: the momentum method is then forward Euler "
                "(gamma = 0), which is not invertible; use eps > 0 or adjoint=False/True"
            )
    if adjoint is True and info.family == "discrete" and eps_value == 0:
        raise ValueError(
            "adjoint=True with method='momentum' and eps=0: the memory-saving backward "
            "reconstructs the forward, and forward Euler (gamma = 0) is not invertible"
        )
    if adjoint is not False and not isinstance(func, nn.Module):
        raise TypeError(
            f"adjoint={adjoint!r} needs func to be an nn.Module whose parameters() cover every "
            f"tensor it uses (their gradients are computed in a separate backward pass); got "
            f"{type(func).__name__}"
        )


# ----------------------------------------------------------------------------- vector fields


class Field(nn.Module):
    """The user's ``func(t, x)`` on a tuple state, with shape checks and an evaluation counter.

    ``forward(t, xs)`` takes and returns a tuple of tensors; ``func`` itself is called with a
    tensor when the state is a single tensor and with a tuple otherwise (torchdiffeq's
    convention). ``nfe`` counts evaluations; ``mode.networks.ode`` splits it by pass.
    """

    def __init__(self, func: Callable, shapes: Sequence[torch.Size] | None = None):
        super().__init__()
        if not callable(func):
            raise TypeError(f"func must be callable as func(t, x), got {type(func).__name__}")
        self.func = func  # registered as a submodule when it is an nn.Module
        self.shapes = None if shapes is None else tuple(shapes)
        self.nfe = 0
        self.counter: Callable[[], None] | None = None

    def forward(self, t: torch.Tensor, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        # a plain int: written to __dict__, not through nn.Module.__setattr__ (~3 us per call)
        self.__dict__["nfe"] = self.nfe + 1
        if self.counter is not None:
            self.counter()
        if len(xs) == 1:
            out = self.func(t, xs[0])
            if type(out) is torch.Tensor and out.shape == xs[0].shape:  # the common case
                return (out,)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"func must return a tensor, got {type(out).__name__}")
            outs = (out,)
        else:
            out = outs = self.func(t, xs)
        if not isinstance(outs, (tuple, list)) or len(outs) != len(xs):
            raise ValueError(
                f"func must return a tuple of {len(xs)} tensors like its input state, got "
                f"{type(out).__name__}"
            )
        for i, (o, c) in enumerate(zip(outs, xs, strict=True)):
            if not isinstance(o, torch.Tensor) or o.shape != c.shape:
                got = tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__
                raise ValueError(
                    f"func returned the wrong shape for state component {i}: expected "
                    f"{tuple(c.shape)} (the shape of x), got {got}"
                )
        return tuple(outs)


class _FirstOrder(nn.Module):
    """``x' = F(t, x)`` in torchdiffeq's form (a tensor state, or a tuple)."""

    def __init__(self, field: Field, single: bool):
        super().__init__()
        self.field = field
        self.single = single

    def forward(self, t, y):
        if self.single:
            return self.field(t, (y,))[0]
        return self.field(t, tuple(y))


class _SecondOrder(nn.Module):
    """``(x, u)' = (u, (F(t, x) - u) / eps)`` on the tuple ``(x_1..x_m, u_1..u_m)``."""

    def __init__(self, field: Field, m: int, eps: float | torch.Tensor):
        super().__init__()
        self.field = field
        self.m = m
        self.__dict__["eps"] = eps  # never registered: a Parameter eps is an adjoint param

    def forward(self, t, y):
        xs, us = tuple(y[: self.m]), tuple(y[self.m :])
        fs = self.field(t, xs)
        return (*us, *((f - u) / self.eps for f, u in zip(fs, us, strict=True)))


# ----------------------------------------------------------------------------- momentum method


def momentum_grid(t: Sequence[float], step_size: float | None) -> list[tuple[float, float, int]]:
    """Split each interval ``[t_k, t_{k+1}]`` into ``ceil(length / step_size)`` equal sub-steps.

    Returns ``(t_k, h_k, m_k)`` per interval (``m_k`` steps of size ``h_k``); without a step
    size each interval is one step (the grid of ``t``).
    """
    out = []
    for a, b in zip(t[:-1], t[1:], strict=True):
        length = b - a
        if step_size is None:
            m = 1
        else:
            r = length / step_size
            # a float32 grid makes 0.1 / 0.1 read 1.0000000149: snap near-integers, else ceil
            m = round(r) if abs(r - round(r)) <= 1e-6 * max(1.0, r) else math.ceil(r)
            m = max(1, m)
        out.append((a, length / m, m))
    return out


class _GridMomentumStep(ReversibleStep):
    """The momentum layer of an odeint interval of step ``h`` on the flat state ``(x, w)``,
    ``w = h_ref u``, at every time of its grid (a :class:`~mode.steps.StepGrid`):

        w <- gamma w + ((1 - gamma) h_ref) F(t_n, x),    x <- x + rho w,

    the momentum rule on ``(x, v = rho w)`` with ``h = rho h_ref`` (``rho = 1`` on a uniform
    grid). On a grid whose intervals have different sub-steps the velocity is kept on the
    smallest step ``h_ref``, so no step ever scales a state by more than 1 (which exact mode
    cannot invert). Built per call with its ``gamma``: a value, never changed. ``field`` is a
    submodule, so the engine finds its parameters and buffers.
    """

    def __init__(self, field: Field, h_ref: float, shapes, gamma: float | torch.Tensor,
                 rho: float = 1.0):
        super().__init__()
        self.field = field
        self.shapes = shapes
        # plain attributes (not nn.Module's slower paths)
        self.__dict__.update(gamma=gamma, h_ref=h_ref, rho=rho, _call_field=field.__call__)
        self.__dict__["scale"] = (1 - gamma) * h_ref  # one multiplication of F, not two

    def _field(self, t_n: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``F(t_n, x)`` on the flat state (the Field checks its shapes)."""
        if len(self.shapes) == 1:
            return self._call_field(t_n, (x,))[0]
        return _flatten(self._call_field(t_n, _unflatten(x, self.shapes)))

    def _stretch(self, w: torch.Tensor) -> torch.Tensor:
        return self.rho * w

    def couplings_at(self, t_n: torch.Tensor) -> tuple[Coupling, Coupling]:
        kick = Coupling(target=1, alpha=self.gamma, phi=partial(self._field, t_n),
                        scale=self.scale)
        if self.rho == 1.0:
            return kick, Coupling(target=0, alpha=1.0, shift=1)
        return kick, Coupling(target=0, alpha=1.0, phi=self._stretch)

    def couplings(self) -> Sequence[Coupling]:  # pragma: no cover - the grid supplies times
        raise TypeError("a grid momentum step has couplings only at a time: use its StepGrid")

    def extra_repr(self) -> str:
        return f"h={self.rho * self.h_ref:g}"


def _flatten(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([c.reshape(-1) for c in xs])


def _unflatten(x: torch.Tensor, shapes) -> tuple[torch.Tensor, ...]:
    out, i = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(x[i : i + n].reshape(s))
        i += n
    return tuple(out)


def _momentum_options(options: dict | None, adjoint, frac_bits) -> tuple[float | None, Strategy]:
    """``(step_size, gradient strategy)`` from the options of the momentum method."""
    options = {} if options is None else dict(options)
    step = options.pop("step_size", None)
    option_bits = options.pop("frac_bits", None)
    if options:
        raise ValueError(
            f"options {sorted(options)} are not understood by method='momentum' "
            "(it takes 'step_size' and, with adjoint='reversible', 'frac_bits')"
        )
    if step is not None:
        step = _step_size(step)
    if option_bits is not None:
        if frac_bits is not None and option_bits != frac_bits:
            raise ValueError(
                f"frac_bits={frac_bits!r} and options['frac_bits']={option_bits!r} disagree; "
                f"give one of them"
            )
        frac_bits = option_bits
    if frac_bits is not None and (isinstance(frac_bits, bool) or not isinstance(frac_bits, int)):
        raise TypeError(f"frac_bits of method='momentum' must be an int (both slots get bits "
                        f"by the state's dtype from it), got {frac_bits!r}")
    return step, adjoint_strategy(adjoint, frac_bits)


def _check_momentum_eps(grid, eps: float | torch.Tensor) -> None:
    eps_value = float(eps.detach()) if isinstance(eps, torch.Tensor) else float(eps)
    hmax = max(h for _, h, _ in grid)
    if eps_value > 0 and eps_value < hmax * (1 - 1e-12):
        raise ValueError(
            f"method='momentum' needs a step size h <= eps (gamma = 1 - h/eps >= 0); got "
            f"eps={eps_value} and h={hmax}. Pass options={{'step_size': h}} with h <= {eps_value}"
        )


def momentum_steps(
    field: Field, t: torch.Tensor, step_size: float | None, shapes, eps: float | torch.Tensor
) -> tuple[list[tuple[float, float, int]], list[StepGrid]]:
    """The grid and, per interval, its momentum layers with
    ``gamma = eps_to_gamma(eps, depth=1, horizon=h)`` (``eps = 0``: 0, forward Euler).

    Each interval is a :class:`~mode.steps.StepGrid`: one step module at the interval's
    times, so memory does not grow with the number of steps. Built anew at every call, so a
    call's grid (its ``gamma`` and times) is never changed by a later one. When the intervals
    have different sub-steps ``h_k``, the velocity is carried as ``h_ref u`` with
    ``h_ref = min h_k`` and longer steps stretch it (:class:`_GridMomentumStep`).
    """
    grid = momentum_grid(t.tolist(), step_size)
    _check_momentum_eps(grid, eps)
    eps_value = float(eps.detach()) if isinstance(eps, torch.Tensor) else float(eps)
    h_ref = min(h for _, h, _ in grid)
    gammas: dict[float, float | torch.Tensor] = {}
    chains = []
    for a, h, m in grid:
        if h not in gammas:
            gammas[h] = 0.0 if eps_value == 0 else eps_to_gamma(eps, depth=1, horizon=h)
        times = torch.tensor([a + j * h for j in range(m)], dtype=t.dtype, device=t.device)
        step = _GridMomentumStep(field, h_ref, shapes, gammas[h], h / h_ref)
        chains.append(StepGrid(step, times, step.couplings_at))
    return grid, chains


def fixed_point_bits(frac_bits: int | None, dtype: torch.dtype, h: float) -> tuple[int, int]:
    """Fractional bits of ``(x, v)`` for ``adjoint="reversible"``.

    float64 states: ``x`` gets ``frac_bits`` (default :data:`DEFAULT_FRAC_BITS_FLOAT64`). The
    velocity slot holds ``v = h u``, about ``h`` times smaller, so it gets
    ``floor(log2(1 / h))`` more bits: ``x`` and ``u`` then share the range
    ``|.| < 2^(60 - frac_bits)`` (int64 storage) and the relative precision, and the rounding
    errors of ``v`` no longer pile up in ``x`` over the ``eps / h`` steps they persist (each
    ``x`` update rounds ``v`` to the grid of ``x`` once instead, two more kernels per step and
    pass).

    Other dtypes: both slots get ``frac_bits`` (default ``mode.exact.DEFAULT_FRAC_BITS``).
    2^-32 is far below float32's own resolution, which the decoded ``x`` of every step is
    rounded to anyway, so the extra bits would cost time and buy nothing.
    """
    if dtype != torch.float64:
        return (DEFAULT_FRAC_BITS if frac_bits is None else frac_bits,) * 2
    if frac_bits is None:
        frac_bits = DEFAULT_FRAC_BITS_FLOAT64
    extra = max(0, math.floor(math.log2(1.0 / h))) if h < 1 else 0
    return frac_bits, min(frac_bits + extra, MAX_FRAC_BITS)


def _integrate_momentum(
    field: Field, xs, us, t, eps, step_size, how: Strategy
) -> tuple[list[tuple[torch.Tensor, ...]], list[tuple[torch.Tensor, ...]]]:
    shapes = tuple(c.shape for c in xs)
    single = len(xs) == 1
    grid, chains = momentum_steps(field, t, step_size, shapes, eps)
    x = xs[0] if single else _flatten(xs)
    u = us[0] if single else _flatten(us)
    h_ref = min(h for _, h, _ in grid)
    bits = fixed_point_bits(how.frac_bits, x.dtype, h_ref) if how.exact else None
    v = h_ref * u
    out_x, out_u = [x], [u]
    for steps in chains:
        x, v = engine.integrate(steps, (x, v), (), reversible=how.reversible, exact=how.exact,
                                frac_bits=bits)
        out_x.append(x)
        out_u.append(v / h_ref)
    unpack = (lambda z: (z,)) if single else (lambda z: _unflatten(z, shapes))
    return [unpack(z) for z in out_x], [unpack(z) for z in out_u]


# ----------------------------------------------------------------------------- entry point


def solve(
    field: Field,
    x0: State,
    t: torch.Tensor,
    *,
    eps: float | torch.Tensor,
    u0: State | None = None,
    method: str = "dopri5",
    rtol: float = 1e-7,
    atol: float = 1e-9,
    options: dict | None = None,
    adjoint: bool | str = False,
    return_velocity: bool = False,
    frac_bits: int | None = None,
):
    """:func:`odeint` on an existing :class:`Field` (shared by the ``nn.Module`` front ends)."""
    xs = _check_x0(x0)
    single = isinstance(x0, torch.Tensor)
    t = _check_t(t, xs[0])
    eps = _check_eps(eps)
    eps_value = float(eps.detach()) if isinstance(eps, torch.Tensor) else eps
    if isinstance(eps, torch.Tensor):
        if eps_value == 0:
            raise ValueError(
                "eps is a tensor that requires grad and is 0: eps = 0 is the first-order ODE, "
                "which has no eps to differentiate; start from eps > 0, or pass a number")
        eps = eps.to(xs[0].dtype)  # (a float32 eps would round gamma for a float64 state)
    info = _check_method(method)
    _check_adjoint(adjoint, info, eps_value, field.func)
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict or None, got {type(options).__name__}")
    if info.family != "discrete":
        _check_torchdiffeq_options(options, rtol, atol)
    if method == "scipy_solver" and torch.is_grad_enabled() and (
            any(c.requires_grad for c in xs) or isinstance(eps, torch.Tensor)
            or any(p.requires_grad for p in field.parameters())):
        raise ValueError(
            "method='scipy_solver' solves on numpy copies: its output has no gradient, so a "
            "loss through it would silently miss this term. Run it under torch.no_grad(), or "
            "use a torch method (dopri5, rk4, ...) for gradients")
    if not isinstance(return_velocity, bool):
        raise TypeError(f"return_velocity must be a bool, got {return_velocity!r}")
    us = _check_u0(u0, xs, eps_value)
    m = len(xs)

    if info.family == "discrete":
        if t.requires_grad:
            raise ValueError(
                "t requires grad, but method='momentum' runs on a fixed grid built from the "
                "values of t and gives no gradient with respect to t; pass t.detach()"
            )
        step_size, how = _momentum_options(options, adjoint, frac_bits)
        if t.numel() == 1:
            traj_x, traj_u = [xs], [us]
        else:
            traj_x, traj_u = _integrate_momentum(field, xs, us, t, eps, step_size, how)
        sol_x = tuple(torch.stack([s[i] for s in traj_x]) for i in range(m))
        sol_u = tuple(torch.stack([s[i] for s in traj_u]) for i in range(m))
    else:
        if frac_bits is not None:
            raise ValueError(
                f"frac_bits sets the fixed point of method='momentum' with adjoint='reversible'; "
                f"it has no meaning for method={method!r}"
            )
        solver = torchdiffeq.odeint_adjoint if adjoint is True else torchdiffeq.odeint
        kwargs = dict(rtol=rtol, atol=atol, method=method, options=options)
        if eps_value == 0:
            system = _FirstOrder(field, single)
            y0 = xs[0] if single else xs
        else:
            system = _SecondOrder(field, m, eps)
            y0 = (*xs, *us)
        if adjoint is True:
            params = list(field.parameters())
            if isinstance(eps, torch.Tensor):
                base = eps if eps._base is None else eps._base  # (_check_eps reshapes it)
                ids = {id(p) for p in params}
                if id(base) not in ids:
                    if _reaches(eps, ids):
                        raise ValueError(
                            "eps is computed from a parameter of func: with adjoint=True "
                            "torchdiffeq's adjoint would count that parameter's gradient twice "
                            "(through eps inside the solve, and again outside). Keep the "
                            "parameter out of func (on the module that calls odeint), pass it "
                            "itself as eps, or use adjoint=False")
                    params.append(eps)
            kwargs["adjoint_params"] = tuple(params)
        with warnings.catch_warnings():  # torchdiffeq ignores a misspelt option, with a warning
            warnings.filterwarnings("error", message=".*Unexpected arguments")
            try:
                sol = solver(system, y0, t, **kwargs)
            except UserWarning as err:
                raise ValueError(f"options not understood by method={method!r}: {err}") from None
        sol = (sol,) if isinstance(sol, torch.Tensor) else tuple(sol)
        sol_x, sol_u = sol[:m], sol[m:]

    if return_velocity and eps_value == 0:
        # the first-order velocity x'(t_k) = F(t_k, x(t_k)) at the computed states
        vel = [field(t[k], tuple(c[k] for c in sol_x)) for k in range(t.numel())]
        sol_u = tuple(torch.stack([v[i] for v in vel]) for i in range(m))
    xs_out = sol_x[0] if single else sol_x
    if not return_velocity:
        return xs_out
    return xs_out, (sol_u[0] if single else sol_u)


def odeint(
    func: Callable,
    x0: State,
    t: torch.Tensor,
    *,
    eps: float | torch.Tensor,
    u0: State | None = None,
    method: str = "dopri5",
    rtol: float = 1e-7,
    atol: float = 1e-9,
    options: dict | None = None,
    adjoint: bool | str = False,
    return_velocity: bool = False,
    frac_bits: int | None = None,
):
    """Solve ``eps x'' + x' = func(t, x)`` (``eps > 0``) or ``x' = func(t, x)`` (``eps = 0``).

    Parameters
    ----------
    func : callable ``func(t, x)``
        The field ``F``, torchdiffeq's convention: ``t`` a scalar tensor, ``x`` a tensor (or a
        tuple of tensors, as ``x0``); returns the same shapes. An ``nn.Module`` when
        ``adjoint`` is not ``False``.
    x0 : tensor or tuple of tensors
        Initial state, any shape (batched states are just tensors with a batch axis).
    t : 1-D tensor
        Strictly increasing output times; ``t[0]`` is the initial time.
    eps : float or scalar tensor, ``>= 0``
        The mass. A tensor that requires grad receives a gradient (every ``adjoint`` mode).
    u0 : like ``x0``, optional
        Initial velocity ``x'(t[0])`` (default 0); only for ``eps > 0``.
    method : str
        Any method the installed torchdiffeq registers (``"dopri5"``, ``"rk4"``, ...; read from
        its registry at call time, so methods of a newer torchdiffeq are accepted too, and
        :data:`METHODS` holds the order and family of those mode knows) or ``"momentum"``, the
        Momentum ResNet rule on a grid of step ``h`` (``options={"step_size": h}``, each
        interval of ``t`` split into ``ceil(length / h)`` equal steps; without it, the grid
        ``t``) with ``f_n = h F(t_n, .)``, ``gamma = eps_to_gamma(eps, 1, h)``, ``v = h u``;
        needs ``h <= eps``. :func:`known_methods` lists them all. Beware torchdiffeq's
        ``"explicit_adams"`` (0.2.5): it misbehaves even on ``x' = -x`` with step 0.01 (``x(1)``
        0.74 instead of 0.37, over ``1e39`` by ``t = 5``); use ``"implicit_adams"`` or ``"rk4"``.
    rtol, atol : float
        Tolerances of the adaptive torchdiffeq methods (fixed-grid methods ignore them).
    options : dict, optional
        Solver options, passed to torchdiffeq. The momentum method takes ``step_size`` and,
        with ``adjoint="reversible"``, ``frac_bits`` (fractional bits of ``x`` in fixed
        point: default 48 for float64 states, held in int64, ``x`` and ``u`` below
        ``2^(60 - frac_bits)`` = 4096 in magnitude; ``mode.exact.DEFAULT_FRAC_BITS`` = 32
        otherwise, held in float64, below ``2^(46 - frac_bits)`` = 16384).
    adjoint : False, True or "reversible"
        Gradient strategy. ``False``: autograd through the solver. ``True``: torchdiffeq's
        ``odeint_adjoint``; for ``"momentum"``, backprop through the float reconstruction of
        the reversible rule (memory independent of the steps, gradient exact up to rounding
        amplified by ``~gamma^{-N}``). ``"reversible"`` (``"momentum"`` only, ``eps > 0``):
        bit-exact fixed-point reconstruction, memory independent of the number of steps and
        gradients of the fixed-point forward (float64: within about 1e-11 relative of float
        autograd on the same grid; ``options["frac_bits"]`` trades range for digits).
    frac_bits : int, optional
        With ``adjoint="reversible"``: fractional bits of ``x`` in fixed point, as the networks'
        ``frac_bits`` (``options["frac_bits"]`` is the same setting).
    return_velocity : bool
        Also return ``u = x'`` at the output times (momentum: ``v_n / h``; ``eps = 0``:
        ``F(t_k, x(t_k))``, one extra evaluation per output time).

    Returns
    -------
    xs : tensor of shape ``(len(t), *x0.shape)`` (a tuple of them for a tuple state), and
    ``us`` of the same shapes when ``return_velocity``.
    """
    shapes = tuple(c.shape for c in _check_x0(x0))
    return solve(
        Field(func, shapes), x0, t, eps=eps, u0=u0, method=method, rtol=rtol, atol=atol,
        options=options, adjoint=adjoint, return_velocity=return_velocity, frac_bits=frac_bits,
    )
