"""The other reversible architectures of the sources, each written as a coupling step.

Every network here is a chain of :class:`~mode.steps.ReversibleStep` on a state pair
``(s0, s1)``: the step lists its couplings ``s[t] <- alpha s[t] + shift s[o] + phi(s[o])`` and
nothing else; forward, inverse, memory-saving backprop and the bit-exact mode all come from the
one engine (:mod:`mode.reversible`). Per layer ``j`` (``h > 0`` a step size, ``gamma`` a
momentum):

==============  =====================  ===================================================
network         state ``(s0, s1)``     step
==============  =====================  ===================================================
RevNet          ``(x1, x2)``           ``x1 <- x1 + F_j(x2)``;  ``x2 <- x2 + G_j(x1)``
HamiltonianNet  ``(Y, Z)``             ``Y <- Y + h F_j(Z)``;  ``Z <- Z - h G_j(Y)``
MidpointNet     ``(Y_{j-1}, Y_j)``     ``Y_{j+1} = Y_{j-1} + 2 h f_j(Y_j)``, then swap
LeapfrogNet     ``(Y_{j-1}, Y_j)``     ``Y_{j+1} = 2 Y_j - Y_{j-1} - h^2 f_j(Y_j)``, then swap
MRevNet         ``(x, v)``             ``v <- gamma v + f_j(x)``;  ``x <- x + v``
==============  =====================  ===================================================

The networks of Chang et al. (2018, "Reversible architectures for arbitrarily deep residual
neural networks") use ``F_j(Z) = K^T sigma(K Z + b)`` (:class:`TransposedActivatedLayer`) in the
Hamiltonian and leapfrog networks and ``f_j(Y) = sigma(K Y + b)`` (:class:`ActivatedLayer`) in the
midpoint network; the classmethods ``dense`` and ``conv`` build exactly those (dense matrices
for vectors, convolutions for images). The constructors themselves take arbitrary residual
functions ``f_j(y, *args)`` (``nn.Module``\\ s, so that their parameters get gradients), with the
constructor shape of :class:`~mode.MomentumResNet`: ``Net(functions, h_or_gamma, *,
reversible=True, exact=False)``.

Jacobian determinants of one step: RevNet, Hamiltonian and leapfrog ``+1``, midpoint
``(-1)^d`` (volume preserving); m-RevNet ``gamma^d`` like a Momentum ResNet (d = number of
scalars in one slot).

**m-RevNet.** The rule implemented is the heavy-ball (Polyak momentum) block

    v_{j+1} = gamma v_j + f_j(x_j),      x_{j+1} = x_j + v_{j+1},

i.e. ``x_{j+1} = x_j + gamma (x_j - x_{j-1}) + f_j(x_j)`` with ``v_j = x_j - x_{j-1}``, the
two-stream momentum update of m-RevNet ("m-RevNet: Deep Reversible Neural Networks with
Momentum", 2021, arXiv:2108.05862), a discretization of ``x'' + (1 - gamma) x' = f(x)`` (unit
mass). It differs from the Momentum ResNet rule ``v_{j+1} = gamma v_j + (1 - gamma) f_j(x_j)``
only by the scaling of the residual function: ``MRevNet(f, gamma)`` computes exactly what
``MomentumResNet(f / (1 - gamma), gamma)`` computes for ``gamma < 1`` (and
``MomentumResNet(f, gamma) = MRevNet((1 - gamma) f, gamma)``); at ``gamma = 0`` both are the plain
ResNet ``x_{j+1} = x_j + f_j(x_j)`` (not invertible). At ``gamma = 1`` m-RevNet is the
undamped second-order rule ``x_{j+1} = 2 x_j - x_{j-1} + f_j(x_j)`` (the leapfrog form, det 1),
while a Momentum ResNet ignores ``f``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import reversible as engine
from ..conventions import _gamma_for_repr, _scalar_text, check_gamma, check_real
from ..steps import Coupling, ReversibleStep
from .base import (
    Function,
    ReversibleNet,
    _as_modules,
    _check_flags,
    _check_learned_gamma,
    _rebind_gamma,
    _same_objects,
)

__all__ = [
    "ActivatedLayer",
    "TransposedActivatedLayer",
    "RevNetStep",
    "HamiltonianStep",
    "MidpointStep",
    "LeapfrogStep",
    "MRevStep",
    "RevNet",
    "HamiltonianNet",
    "MidpointNet",
    "LeapfrogNet",
    "MRevNet",
    "check_step_size",
]

# --------------------------------------------------------------------------------------------
# validation


def check_step_size(h: float, name: str = "h") -> float:
    """Return ``h`` as a float; raise unless it is a finite real number ``> 0``.

    A one-element tensor that does not require grad counts as its number. A tensor that
    requires grad is an error: the step size is a constant of the network (its couplings
    hold a float), so the tensor would be frozen and never learned.
    """
    if isinstance(h, torch.Tensor) and h.requires_grad:
        raise TypeError(
            f"{name} must be a number, got a tensor that requires grad ({name}={h!r}): learning "
            f"the step size is not supported, and the tensor would be frozen to a float "
            f"silently. Pass a number, or a tensor that does not require grad "
            f"({name}.detach())"
        )
    h = check_real(h, name, integer_tensors=True)
    if not (math.isfinite(h) and h > 0.0):
        raise ValueError(f"{name} must be a finite step size > 0, got {h}")
    return h


def _check_depth_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# the layers of Chang et al.: sigma(K y + b) and K^T sigma(K y + b)


class _KernelLayer(nn.Module):
    """Holds ``K`` (a matrix ``(hidden, features)`` or a kernel ``(hidden, C, k, k)``) and ``b``."""

    def __init__(self, features: int, hidden: int, kernel_size: int | None,
                 activation: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        _check_depth_int(features, "features")
        _check_depth_int(hidden, "hidden")
        if not callable(activation):
            raise TypeError(f"activation must be callable, got {type(activation).__name__}")
        if kernel_size is None:
            self.weight = nn.Parameter(torch.empty(hidden, features))
            fan_in = features
        else:
            if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) \
                    or kernel_size < 1 or kernel_size % 2 == 0:
                raise ValueError(
                    f"kernel_size must be an odd integer >= 1 (a 'same' convolution), got "
                    f"{kernel_size!r}"
                )
            self.weight = nn.Parameter(torch.empty(hidden, features, kernel_size, kernel_size))
            fan_in = features * kernel_size * kernel_size
        self.bias = nn.Parameter(torch.empty(hidden))
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)
        self.kernel_size = kernel_size
        self.activation = activation

    def _k(self, y: torch.Tensor) -> torch.Tensor:
        """``K y + b``: ``y`` is ``(*, features)`` (dense) or ``(B, C, H, W)`` (convolution)."""
        if self.kernel_size is None:
            return F.linear(y, self.weight, self.bias)
        return F.conv2d(y, self.weight, self.bias, padding=self.kernel_size // 2)

    def _kt(self, s: torch.Tensor) -> torch.Tensor:
        """``K^T s`` (the adjoint of ``y -> K y``)."""
        if self.kernel_size is None:
            return s @ self.weight
        return F.conv_transpose2d(s, self.weight, padding=self.kernel_size // 2)

    def extra_repr(self) -> str:
        hidden, features = self.weight.shape[:2]
        k = self.kernel_size
        kind = "dense" if k is None else f"conv {k}x{k}"
        act = getattr(self.activation, "__name__", repr(self.activation))
        return f"features={features}, hidden={hidden}, {kind}, activation={act}"


class ActivatedLayer(_KernelLayer):
    """``y -> sigma(K y + b)`` with a square ``K`` (the midpoint network of Chang et al.).

    Parameters
    ----------
    features : int
        Size of ``y``'s last dimension (dense) or its channels (``kernel_size`` given).
    kernel_size : int, optional
        Odd kernel size: ``K`` is a stride-1 'same' convolution on ``(B, C, H, W)``.
    activation : callable
        ``sigma``, default ``torch.tanh``.
    antisymmetric : bool
        Use ``K = W - W^T`` (dense only), the stable choice for the midpoint rule.
    """

    def __init__(self, features: int, *, kernel_size: int | None = None,
                 activation: Callable[[torch.Tensor], torch.Tensor] = torch.tanh,
                 antisymmetric: bool = False):
        super().__init__(features, features, kernel_size, activation)
        if antisymmetric and kernel_size is not None:
            raise ValueError("antisymmetric=True needs a dense layer (kernel_size=None)")
        self.antisymmetric = bool(antisymmetric)

    def forward(self, y: torch.Tensor, *args) -> torch.Tensor:
        if self.antisymmetric:
            k = self.weight - self.weight.transpose(0, 1)
            return self.activation(F.linear(y, k, self.bias))
        return self.activation(self._k(y))


class TransposedActivatedLayer(_KernelLayer):
    """``y -> K^T sigma(K y + b)`` (Hamiltonian and leapfrog networks of Chang et al.).

    Parameters
    ----------
    features : int
        Size of ``y``'s last dimension (dense) or its channels (``kernel_size`` given).
    hidden : int, optional
        Rows of ``K`` (output channels of the convolution); default ``features``.
    kernel_size : int, optional
        Odd kernel size: ``K`` is a stride-1 'same' convolution and ``K^T`` its transpose.
    activation : callable
        ``sigma``, default ``torch.tanh``.
    """

    def __init__(self, features: int, hidden: int | None = None, *,
                 kernel_size: int | None = None,
                 activation: Callable[[torch.Tensor], torch.Tensor] = torch.tanh):
        super().__init__(features, features if hidden is None else hidden, kernel_size,
                         activation)

    def forward(self, y: torch.Tensor, *args) -> torch.Tensor:
        return self._kt(self.activation(self._k(y)))


# --------------------------------------------------------------------------------------------
# the steps


class RevNetStep(ReversibleStep):
    """``x1 <- x1 + F(x2, *args)``;  ``x2 <- x2 + G(x1, *args)`` on ``(x1, x2)``."""

    def __init__(self, F: Function, G: Function):
        super().__init__()
        self.F = F
        self.G = G

    def couplings(self) -> Sequence[Coupling]:
        return (Coupling(target=0, phi=self.F), Coupling(target=1, phi=self.G))


class HamiltonianStep(ReversibleStep):
    """Verlet step on ``(Y, Z)``: ``Y <- Y + h F(Z)``;  ``Z <- Z - h G(Y)`` (new ``Y``)."""

    def __init__(self, F: Function, G: Function, h: float):
        super().__init__()
        self.F = F
        self.G = G
        self.h = check_step_size(h)

    def _kick_y(self, z: torch.Tensor, *args) -> torch.Tensor:
        return self.h * self.F(z, *args)

    def _kick_z(self, y: torch.Tensor, *args) -> torch.Tensor:
        return -self.h * self.G(y, *args)

    def couplings(self) -> Sequence[Coupling]:
        return (Coupling(target=0, phi=self._kick_y), Coupling(target=1, phi=self._kick_z))

    def extra_repr(self) -> str:
        return f"h={_scalar_text(self.h)}"


class MidpointStep(ReversibleStep):
    """On ``(Y_{j-1}, Y_j)``: ``Y_{j+1} = Y_{j-1} + 2 h f(Y_j)``; returns ``(Y_j, Y_{j+1})``."""

    swap = True

    def __init__(self, function: Function, h: float):
        super().__init__()
        self.function = function
        self.h = check_step_size(h)

    def _increment(self, y: torch.Tensor, *args) -> torch.Tensor:
        return (2.0 * self.h) * self.function(y, *args)

    def couplings(self) -> Sequence[Coupling]:
        return (Coupling(target=0, phi=self._increment),)

    def extra_repr(self) -> str:
        return f"h={_scalar_text(self.h)}"


class LeapfrogStep(ReversibleStep):
    """On ``(Y_{j-1}, Y_j)``: ``Y_{j+1} = 2 Y_j - Y_{j-1} - h^2 f(Y_j)``; gives ``(Y_j, Y_{j+1})``.

    One coupling with ``alpha = -1`` and ``shift = 2`` (both exact in fixed point), then a swap.
    """

    swap = True

    def __init__(self, function: Function, h: float):
        super().__init__()
        self.function = function
        self.h = check_step_size(h)

    def _increment(self, y: torch.Tensor, *args) -> torch.Tensor:
        return -(self.h * self.h) * self.function(y, *args)

    def couplings(self) -> Sequence[Coupling]:
        return (Coupling(target=0, alpha=-1.0, shift=2, phi=self._increment),)

    def extra_repr(self) -> str:
        return f"h={_scalar_text(self.h)}"


class MRevStep(ReversibleStep):
    """m-RevNet step on ``(x, v)``: ``v <- gamma v + f(x)``;  ``x <- x + v``."""

    def __init__(self, function: Function, gamma: float | torch.Tensor):
        super().__init__()
        check_gamma(gamma)
        self.function = function
        self.gamma = gamma

    def couplings(self) -> Sequence[Coupling]:
        return (
            Coupling(target=1, alpha=self.gamma, phi=self.function),
            Coupling(target=0, alpha=1.0, shift=1),
        )

    def extra_repr(self) -> str:
        text, value = _gamma_for_repr(self.gamma)
        return f"gamma={text}" + ("" if value is not None else " (outside [0, 1])")


# --------------------------------------------------------------------------------------------
# the networks


def _check_input(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    return x


def _companion(x: torch.Tensor, given: torch.Tensor | None, name: str,
               default: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The second slot of the initial pair: ``given`` (checked) or ``default(x)``."""
    if given is None:
        return default(x)
    if not isinstance(given, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(given).__name__}")
    if given.shape != x.shape:
        raise ValueError(f"{name} must have the input's shape {tuple(x.shape)}, "
                         f"got {tuple(given.shape)}")
    if given.dtype != x.dtype or given.device != x.device:
        raise TypeError(f"{name} must have the input's dtype and device ({x.dtype}, {x.device}), "
                        f"got ({given.dtype}, {given.device})")
    return given


class _CoupledNet(ReversibleNet):
    """Shared plumbing: registered residual functions, steps built as views over them.

    The steps are not submodules (as in :class:`~mode.MomentumResNet`): parameters and
    ``state_dict`` keys are those of the registered functions.
    """

    def __init__(self, *, reversible: bool, exact: bool, frac_bits):
        nn.Module.__init__(self)
        _check_flags(reversible, exact, frac_bits)
        self.reversible = reversible
        self.exact = exact
        self.frac_bits = frac_bits
        self._steps: list[ReversibleStep] = []
        self._steps_key: tuple = ()

    def _key(self) -> tuple:  # pragma: no cover - abstract
        """The objects the steps are views over (compared by identity, see chain())."""
        raise NotImplementedError

    def _build(self) -> list[ReversibleStep]:  # pragma: no cover - abstract
        raise NotImplementedError

    def chain(self) -> list[ReversibleStep]:
        key = self._key()
        if not _same_objects(key, self._steps_key):
            self._steps = self._build()
            self._steps_key = key
        return self._steps

    def extra_repr(self) -> str:
        # The depth is counted on the registered functions, not on chain(): building the steps
        # validates their coefficients (a learned gamma outside [0, 1] raises), and a repr
        # must print whatever state the network is in.
        functions = getattr(self, "functions", None)
        depth = len(functions if functions is not None else self.F_functions)
        mode = "exact" if self.exact else ("float" if self.reversible else "off")
        return f"depth={depth}, reversible={self.reversible} ({mode})"

    def _pair(self, s0: torch.Tensor, s1: torch.Tensor, *args):
        """The final pair from the initial pair, through the engine."""
        return ReversibleNet.forward(self, s0, s1, *args)

    def _stacked(self, s0: torch.Tensor, s1: torch.Tensor, args: tuple):
        pairs = engine.trajectory(self.chain(), (s0, s1), args)
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class RevNet(_CoupledNet):
    """The reversible residual network of Gomez et al. (2017).

    The input is split in two halves ``x = (x1, x2)`` along ``split_dim`` (the channel
    dimension 1 of a batched input ``(B, C, ...)``; ``C`` must be even), and each block computes

        y1 = x1 + F_j(x2, *args),      y2 = x2 + G_j(y1, *args),

    inverted by ``x2 = y2 - G_j(y1)``, ``x1 = y1 - F_j(x2)``. The output is ``cat(y1, y2)``.

    Parameters
    ----------
    F_functions, G_functions : sequences of callables (``nn.Module``\\ s), of equal length
        ``F_j, G_j`` map a half ``(B, C/2, ...)`` to a tensor of the same shape.
    split_dim : int
        Dimension to split (default 1: channels of a batched input; use 0 or -1 for a single
        unbatched vector).
    reversible, exact, frac_bits : as in :class:`~mode.MomentumResNet`.
    """

    def __init__(self, F_functions: Sequence[Function], G_functions: Sequence[Function], *,
                 split_dim: int = 1, reversible: bool = True, exact: bool = False,
                 frac_bits: int | tuple[int, int] | None = None):
        super().__init__(reversible=reversible, exact=exact, frac_bits=frac_bits)
        self.F_functions = _as_modules(F_functions, "F_functions")
        self.G_functions = _as_modules(G_functions, "G_functions")
        if len(self.F_functions) != len(self.G_functions):
            raise ValueError(
                f"F_functions and G_functions must have the same length, got "
                f"{len(self.F_functions)} and {len(self.G_functions)}"
            )
        if isinstance(split_dim, bool) or not isinstance(split_dim, int):
            raise TypeError(f"split_dim must be an int, got {split_dim!r}")
        self.split_dim = split_dim
        self.chain()  # built now, not inside the first call (a torch.compile trace)

    def _key(self) -> tuple:
        return (*self.F_functions, *self.G_functions)

    def _build(self) -> list[ReversibleStep]:
        return [RevNetStep(f, g) for f, g in zip(self.F_functions, self.G_functions)]

    def _split(self, x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        _check_input(x, name)
        if not -x.dim() <= self.split_dim < x.dim():
            raise ValueError(f"split_dim={self.split_dim} is out of range for {name} of shape "
                             f"{tuple(x.shape)}")
        size = x.shape[self.split_dim]
        if size % 2:
            raise ValueError(f"{name} must have an even size along split_dim={self.split_dim} "
                             f"to be split in halves, got shape {tuple(x.shape)}")
        x1, x2 = torch.split(x, size // 2, dim=self.split_dim)
        return x1.contiguous(), x2.contiguous()

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        """``cat(y1, y2)`` of ``x``'s shape."""
        y1, y2 = self._pair(*self._split(x, "x"), *args)
        y = torch.cat([y1, y2], dim=self.split_dim)
        if self.exact:
            # the engine's information buffer is keyed on the pair it returned: keep that pair
            # with the concatenated output so that ``inverse(y)`` can be bit-exact
            y._mode_exact_pair = (y._version, y1, y2)
        return y

    def inverse(self, y: torch.Tensor, *args) -> torch.Tensor:
        """``x`` from ``y = net(x)``; in exact mode ``y`` must be the very tensor returned."""
        entry = getattr(y, "_mode_exact_pair", None) if self.exact else None
        if entry is not None:
            if y._version != entry[0]:
                raise ValueError("the output of an exact forward was modified in place; "
                                 "cannot invert it exactly")
            y1, y2 = entry[1], entry[2]
        else:
            y1, y2 = self._split(y, "y")
        x1, x2 = ReversibleNet.inverse(self, y1, y2, *args)
        return torch.cat([x1, x2], dim=self.split_dim)

    def trajectory(self, x: torch.Tensor, *args) -> torch.Tensor:
        """Every ``x_n = cat(x1_n, x2_n)``, ``n = 0..N``, stacked as ``(N + 1, *x.shape)``."""
        a, b = self._stacked(*self._split(x, "x"), args)
        return torch.cat([a, b], dim=self.split_dim + 1 if self.split_dim >= 0 else self.split_dim)


class _StepSizeNet(_CoupledNet):
    """A net with a step size ``h`` (validated) and the output slot ``_out``."""

    _out: int = 0
    _companion_name: str = ""

    def __init__(self, h: float, *, reversible: bool, exact: bool, frac_bits):
        super().__init__(reversible=reversible, exact=exact, frac_bits=frac_bits)
        self.h = check_step_size(h)

    def __setattr__(self, name: str, value) -> None:
        if name == "h" and "_steps" in self.__dict__:  # a new step size, validated
            value = check_step_size(value)
        super().__setattr__(name, value)
        if name == "h" and self.__dict__.get("_steps"):
            self.chain()  # the steps follow now, not at the next call (inside a trace)

    def _initial_pair(self, x: torch.Tensor, other: torch.Tensor | None):
        raise NotImplementedError  # pragma: no cover

    def forward(self, x: torch.Tensor, *args, return_pair: bool = False, **companion):
        s0, s1 = self._initial_pair(_check_input(x, "x"), self._take(companion))
        out = self._pair(s0, s1, *args)
        return out if return_pair else out[self._out]

    def trajectory(self, x: torch.Tensor, *args, return_pair: bool = False, **companion):
        s0, s1 = self._initial_pair(_check_input(x, "x"), self._take(companion))
        out = self._stacked(s0, s1, args)
        return out if return_pair else out[self._out]

    def inverse(self, s0: torch.Tensor, s1: torch.Tensor, *args):
        """The initial pair from the final pair (as returned with ``return_pair=True``)."""
        return ReversibleNet.inverse(self, s0, s1, *args)

    def _take(self, companion: dict) -> torch.Tensor | None:
        unknown = set(companion) - {self._companion_name}
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward got unexpected keyword argument(s) "
                            f"{sorted(unknown)}; allowed: {self._companion_name}, return_pair")
        return companion.get(self._companion_name)

    def extra_repr(self) -> str:
        return f"h={_scalar_text(self.h)}, " + super().extra_repr()


class HamiltonianNet(_StepSizeNet):
    """The Hamiltonian (Verlet) network of Chang et al. (2018).

        Y_{j+1} = Y_j + h F_j(Z_j),        Z_{j+1} = Z_j - h G_j(Y_{j+1}),

    with ``F_j = K_{j1}^T sigma(K_{j1} . + b_{j1})`` and
    ``G_j = K_{j2}^T sigma(K_{j2} . + b_{j2})`` in the source (:meth:`dense`, :meth:`conv`); the
    constructor takes any ``F_j, G_j``.

    The initial pair is ``(Y_0, Z_0) = (x, 0)`` unless ``z0`` is given. ``net(x)`` returns ``Y_N``
    (shape of ``x``); ``net(x, return_pair=True)`` returns ``(Y_N, Z_N)``, the pair that
    :meth:`inverse` maps back to ``(Y_0, Z_0)``.

    Parameters
    ----------
    F_functions, G_functions : sequences of callables of equal length
    h : float > 0
    reversible, exact, frac_bits : as in :class:`~mode.MomentumResNet`.
    """

    _out = 0
    _companion_name = "z0"

    def __init__(self, F_functions: Sequence[Function], G_functions: Sequence[Function],
                 h: float, *, reversible: bool = True, exact: bool = False,
                 frac_bits: int | tuple[int, int] | None = None):
        super().__init__(h, reversible=reversible, exact=exact, frac_bits=frac_bits)
        self.F_functions = _as_modules(F_functions, "F_functions")
        self.G_functions = _as_modules(G_functions, "G_functions")
        if len(self.F_functions) != len(self.G_functions):
            raise ValueError(
                f"F_functions and G_functions must have the same length, got "
                f"{len(self.F_functions)} and {len(self.G_functions)}"
            )
        self.chain()  # built now, not inside the first call (a torch.compile trace)

    @classmethod
    def dense(cls, features: int, depth: int, h: float, *, hidden: int | None = None,
              activation: Callable[[torch.Tensor], torch.Tensor] = torch.tanh,
              **options) -> HamiltonianNet:
        """Chang et al.'s net on vectors ``(*, features)``: ``K_j`` is ``(hidden, features)``."""
        _check_depth_int(depth, "depth")
        make = lambda: TransposedActivatedLayer(features, hidden, activation=activation)  # noqa: E731
        return cls([make() for _ in range(depth)], [make() for _ in range(depth)], h, **options)

    @classmethod
    def conv(cls, channels: int, depth: int, h: float, *, kernel_size: int = 3,
             hidden: int | None = None,
             activation: Callable[[torch.Tensor], torch.Tensor] = torch.relu,
             **options) -> HamiltonianNet:
        """Chang et al.'s network on images ``(B, channels, H, W)``: convolutional ``K_j``."""
        _check_depth_int(depth, "depth")
        make = lambda: TransposedActivatedLayer(channels, hidden, kernel_size=kernel_size,  # noqa: E731
                                                activation=activation)
        return cls([make() for _ in range(depth)], [make() for _ in range(depth)], h, **options)

    def _key(self) -> tuple:
        return (self.h, *self.F_functions, *self.G_functions)

    def _build(self) -> list[ReversibleStep]:
        return [HamiltonianStep(f, g, self.h) for f, g in zip(self.F_functions, self.G_functions)]

    def _initial_pair(self, x, z0):
        return x, _companion(x, z0, "z0", torch.zeros_like)

    def forward(self, x: torch.Tensor, *args, z0: torch.Tensor | None = None,
                return_pair: bool = False):
        """``Y_N`` (or ``(Y_N, Z_N)``) from ``Y_0 = x`` and ``Z_0 = z0`` (default 0)."""
        return super().forward(x, *args, return_pair=return_pair, z0=z0)

    def trajectory(self, x: torch.Tensor, *args, z0: torch.Tensor | None = None,
                   return_pair: bool = False):
        """Every ``Y_n`` stacked ``(N + 1, *x.shape)`` (and every ``Z_n`` with ``return_pair``)."""
        return super().trajectory(x, *args, return_pair=return_pair, z0=z0)


class _TwoStepNet(_StepSizeNet):
    """Midpoint and leapfrog: state ``(Y_{j-1}, Y_j)``, initial pair ``(y_prev, x)``."""

    _out = 1
    _companion_name = "y_prev"
    _step: type[ReversibleStep]

    def __init__(self, functions: Sequence[Function], h: float, *, reversible: bool = True,
                 exact: bool = False, frac_bits: int | tuple[int, int] | None = None):
        super().__init__(h, reversible=reversible, exact=exact, frac_bits=frac_bits)
        self.functions = _as_modules(functions, "functions")
        self.chain()  # built now, not inside the first call (a torch.compile trace)

    def _key(self) -> tuple:
        return (self.h, *self.functions)

    def _build(self) -> list[ReversibleStep]:
        return [self._step(f, self.h) for f in self.functions]

    def _initial_pair(self, x, y_prev):
        return _companion(x, y_prev, "y_prev", lambda t: t), x

    def forward(self, x: torch.Tensor, *args, y_prev: torch.Tensor | None = None,
                return_pair: bool = False):
        """``Y_N`` (or ``(Y_{N-1}, Y_N)``) from ``Y_0 = x``, ``Y_{-1} = y_prev`` (default ``x``)."""
        return super().forward(x, *args, return_pair=return_pair, y_prev=y_prev)

    def trajectory(self, x: torch.Tensor, *args, y_prev: torch.Tensor | None = None,
                   return_pair: bool = False):
        """Every ``Y_n`` stacked ``(N + 1, *x.shape)`` (pairs ``(Y_{n-1}, Y_n)``: return_pair)."""
        return super().trajectory(x, *args, return_pair=return_pair, y_prev=y_prev)


class MidpointNet(_TwoStepNet):
    """The midpoint network of Chang et al. (2018).

        Y_{j+1} = Y_{j-1} + 2 h f_j(Y_j),      f_j = sigma(K_j . + b_j) in the source,

    on the state ``(Y_{j-1}, Y_j)``. The initial pair is ``(Y_{-1}, Y_0) = (x, x)`` (zero initial
    velocity; the first step is then an Euler step of size ``2h``) unless ``y_prev`` is given.
    ``net(x)`` returns ``Y_N``; ``net(x, return_pair=True)`` returns ``(Y_{N-1}, Y_N)``, which
    :meth:`inverse` maps back to ``(Y_{-1}, Y_0)``. Jacobian determinant of a step:
    ``(-1)^d``.

    Parameters
    ----------
    functions : sequence of callables ``f_j(y, *args)``
    h : float > 0
    reversible, exact, frac_bits : as in :class:`~mode.MomentumResNet`.
    """

    _step = MidpointStep

    @classmethod
    def dense(cls, features: int, depth: int, h: float, *,
              activation: Callable[[torch.Tensor], torch.Tensor] = torch.tanh,
              antisymmetric: bool = False, **options) -> MidpointNet:
        """Chang et al.'s network on vectors ``(*, features)``: square dense ``K_j``."""
        _check_depth_int(depth, "depth")
        return cls([ActivatedLayer(features, activation=activation, antisymmetric=antisymmetric)
                    for _ in range(depth)], h, **options)

    @classmethod
    def conv(cls, channels: int, depth: int, h: float, *, kernel_size: int = 3,
             activation: Callable[[torch.Tensor], torch.Tensor] = torch.relu,
             **options) -> MidpointNet:
        """Chang et al.'s network on images ``(B, channels, H, W)``: convolutional ``K_j``."""
        _check_depth_int(depth, "depth")
        return cls([ActivatedLayer(channels, kernel_size=kernel_size, activation=activation)
                    for _ in range(depth)], h, **options)


class LeapfrogNet(_TwoStepNet):
    """The leapfrog network of Chang et al. (2018).

        Y_{j+1} = 2 Y_j - Y_{j-1} - h^2 f_j(Y_j),      f_j = K_j^T sigma(K_j . + b_j) in the source,

    on the state ``(Y_{j-1}, Y_j)``, a discretization of ``Y'' = -f(Y)``. The initial pair is
    ``(Y_{-1}, Y_0) = (x, x)`` (zero initial velocity) unless ``y_prev`` is given. ``net(x)``
    returns ``Y_N``; ``net(x, return_pair=True)`` returns ``(Y_{N-1}, Y_N)``, which
    :meth:`inverse` maps back. Jacobian determinant of a step: ``+1``.

    Parameters
    ----------
    functions : sequence of callables ``f_j(y, *args)``
    h : float > 0
    reversible, exact, frac_bits : as in :class:`~mode.MomentumResNet`.
    """

    _step = LeapfrogStep

    @classmethod
    def dense(cls, features: int, depth: int, h: float, *, hidden: int | None = None,
              activation: Callable[[torch.Tensor], torch.Tensor] = torch.tanh,
              **options) -> LeapfrogNet:
        """Chang et al.'s net on vectors ``(*, features)``: ``K_j`` is ``(hidden, features)``."""
        _check_depth_int(depth, "depth")
        return cls([TransposedActivatedLayer(features, hidden, activation=activation)
                    for _ in range(depth)], h, **options)

    @classmethod
    def conv(cls, channels: int, depth: int, h: float, *, kernel_size: int = 3,
             hidden: int | None = None,
             activation: Callable[[torch.Tensor], torch.Tensor] = torch.relu,
             **options) -> LeapfrogNet:
        """Chang et al.'s network on images ``(B, channels, H, W)``: convolutional ``K_j``."""
        _check_depth_int(depth, "depth")
        return cls([TransposedActivatedLayer(channels, hidden, kernel_size=kernel_size,
                                             activation=activation) for _ in range(depth)],
                   h, **options)


def _gamma_value(gamma: float | torch.Tensor) -> float:
    return float(gamma.detach()) if isinstance(gamma, torch.Tensor) else float(gamma)


class MRevNet(_CoupledNet):
    """m-RevNet (arXiv:2108.05862, 2021): a heavy-ball momentum two-stream network.

        v_{j+1} = gamma v_j + f_j(x_j, *args),      x_{j+1} = x_j + v_{j+1},

    i.e. ``x_{j+1} = x_j + gamma (x_j - x_{j-1}) + f_j(x_j)``. ``MRevNet(f, gamma)`` computes what
    ``MomentumResNet(f / (1 - gamma), gamma)`` computes (see the module docstring); the Jacobian
    determinant of a step is ``gamma^d``. Inverse: ``x_j = x_{j+1} - v_{j+1}``,
    ``v_j = (v_{j+1} - f_j(x_j)) / gamma`` (``gamma > 0``).

    Parameters, calling convention and shapes are those of :class:`~mode.MomentumResNet`:
    ``net(x0)`` returns ``x_N``; ``net(x0, v0=..., return_velocity=True)`` returns
    ``(x_N, v_N)``; ``net.inverse(x_N, v_N)`` returns ``(x_0, v_0)``; ``v_0 = 0`` or
    ``init_velocity(x_0)``.
    """

    def __init__(self, functions: Sequence[Function], gamma: float | torch.Tensor, *,
                 init_velocity: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 reversible: bool = True, exact: bool = False,
                 frac_bits: int | tuple[int, int] | None = None):
        super().__init__(reversible=reversible, exact=exact, frac_bits=frac_bits)
        self.functions = _as_modules(functions, "functions")
        check_gamma(gamma)
        if reversible and _gamma_value(gamma) == 0.0:
            raise ValueError("gamma = 0 is a plain ResNet, which has no inverse: reversible=True "
                             "is impossible. Use reversible=False, or gamma in (0, 1].")
        if init_velocity is not None and not callable(init_velocity):
            raise TypeError(f"init_velocity must be callable, got {type(init_velocity).__name__}")
        if isinstance(gamma, nn.Parameter):
            self.gamma = gamma
        elif isinstance(gamma, torch.Tensor) and not gamma.requires_grad:
            self.register_buffer("gamma", gamma.detach().clone())
        else:
            self.gamma = gamma
        self.init_velocity = init_velocity
        self.chain()  # built now, not inside the first call (a torch.compile trace)

    def _key(self) -> tuple:
        return (self.gamma, *self.functions)

    def _build(self) -> list[ReversibleStep]:
        return [MRevStep(f, self.gamma) for f in self.functions]

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "gamma" and self.__dict__.get("_steps"):
            self.chain()  # the steps follow now, not at the next call (inside a trace)

    def chain(self) -> list[ReversibleStep]:
        key = self._key()
        if _rebind_gamma(self._steps, key, self._steps_key):
            self._steps_key = key
        return super().chain()

    def _initial_pair(self, x0: torch.Tensor, v0: torch.Tensor | None):
        _check_input(x0, "x0")
        _check_learned_gamma(self.gamma, False)  # (gamma = 0: the engine refuses to invert)
        default = self.init_velocity if self.init_velocity is not None else torch.zeros_like
        return x0, _companion(x0, v0, "v0", default)

    def forward(self, x0: torch.Tensor, *args, v0: torch.Tensor | None = None,
                return_velocity: bool = False):
        """``x_N`` (or ``(x_N, v_N)``) from ``x0`` of any shape ``(*)``."""
        x, v = self._pair(*self._initial_pair(x0, v0), *args)
        return (x, v) if return_velocity else x

    def inverse(self, x: torch.Tensor, v: torch.Tensor, *args):
        """``(x_0, v_0)`` from ``(x_N, v_N)``; bit-exact when ``exact=True``."""
        if _gamma_value(self.gamma) == 0.0:
            raise ValueError("gamma = 0 is a plain ResNet, which has no inverse")
        return ReversibleNet.inverse(self, x, v, *args)

    def trajectory(self, x0: torch.Tensor, *args, v0: torch.Tensor | None = None,
                   return_velocity: bool = False):
        """Every ``x_n`` stacked ``(N + 1, *x0.shape)`` (and every ``v_n``: return_velocity)."""
        xs, vs = self._stacked(*self._initial_pair(x0, v0), args)
        return (xs, vs) if return_velocity else xs

    def extra_repr(self) -> str:
        text, value = _gamma_for_repr(self.gamma)
        note = "" if value is not None else " (outside [0, 1])"
        return f"gamma={text}{note}, " + super().extra_repr()
