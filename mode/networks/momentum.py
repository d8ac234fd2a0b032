"""``MomentumResNet``: the Momentum ResNet of Sander et al. (2021).

    v_{n+1} = gamma v_n + (1 - gamma) f_n(x_n, *args)
    x_{n+1} = x_n + v_{n+1}

with ``v_0 = 0`` or ``v_0 = init_velocity(x_0)``. Invertible for ``gamma > 0``:
``x_n = x_{n+1} - v_{n+1}``, ``v_n = (v_{n+1} - (1 - gamma) f_n(x_n)) / gamma``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .. import reversible as engine
from ..conventions import _gamma_for_repr, _scalar_text, check_gamma, gamma_to_eps
from ..steps import MomentumStep
from .base import (
    ReversibleNet,
    _as_modules,
    _check_flags,
    _check_learned_gamma,
    _rebind_gamma,
    _same_objects,
)

__all__ = ["MomentumResNet"]


def _gamma_value(gamma: float | torch.Tensor) -> float:
    return float(gamma.detach()) if isinstance(gamma, torch.Tensor) else float(gamma)


class MomentumResNet(ReversibleNet):
    """A Momentum ResNet over the residual functions ``f_0, ..., f_{N-1}``.

    Parameters
    ----------
    functions : list, nn.ModuleList or nn.Sequential of callables
        Residual functions ``f_n(x, *args) -> tensor of x's shape``. Make them ``nn.Module``s
        so that their parameters receive gradients in reversible mode.
    gamma : float or 0-dim tensor
        Momentum in ``[0, 1]``. An ``nn.Parameter`` (or any tensor requiring grad) is learned;
        gradients with respect to it are exact in every mode. ``gamma = 0`` is a plain ResNet
        (``reversible=False`` only).
    init_velocity : callable, optional
        ``v_0 = init_velocity(x_0)``; default ``v_0 = 0``.
    reversible : bool
        ``True`` (default): activations are not stored but reconstructed from ``(x_N, v_N)``
        in backward; memory independent of depth. ``False``: plain autograd.
    exact : bool
        Bit-exact reconstruction: states in fixed point, multiplication by ``gamma`` as a
        rational with an information buffer (``mode.exact``). Needs ``reversible=True``.
    frac_bits : None, int or (int, int)
        Fractional bits ``F`` of the fixed-point states in exact mode. ``None`` (default): by
        dtype, 48 for float64 (int64 integers, range ``|x|, |v| < 2^(60 - F) = 4096``,
        gradients within about 1e-11 of float64 autograd at depth 512) and 32 otherwise
        (float64-held integers, range ``2^(46 - F) = 16384``). Up to 56 bits for float64
        states, 52 otherwise (``benchmarks/RESULTS_exact_precision.md``).

    Shapes
    ------
    ``x0``: any shape ``(*)`` (with or without a batch dimension); ``v0`` the same;
    ``net(x0)`` returns ``x_N`` of shape ``(*)``; ``trajectory`` returns ``(N + 1, *)``.
    """

    def __init__(
        self,
        functions: Sequence[Callable[..., torch.Tensor]] | nn.ModuleList | nn.Sequential,
        gamma: float | torch.Tensor,
        *,
        init_velocity: Callable[[torch.Tensor], torch.Tensor] | None = None,
        reversible: bool = True,
        exact: bool = False,
        frac_bits: int | tuple[int, int] | None = None,
    ):
        nn.Module.__init__(self)
        _check_flags(reversible, exact, frac_bits)
        functions = _as_modules(functions, "functions")
        if init_velocity is not None and not callable(init_velocity):
            raise TypeError(f"init_velocity must be callable, got {type(init_velocity).__name__}")
        check_gamma(gamma)
        if reversible and _gamma_value(gamma) == 0.0:
            raise ValueError(
                "gamma = 0 is a plain ResNet, which has no inverse: reversible=True is "
                "impossible. Use reversible=False, or gamma in (0, 1]."
            )
        self.functions = functions
        if isinstance(gamma, nn.Parameter):
            self.gamma = gamma
        elif isinstance(gamma, torch.Tensor) and not gamma.requires_grad:
            self.register_buffer("gamma", gamma.detach().clone())
        else:
            self.gamma = gamma  # a float, or a tensor computed from parameters elsewhere
        self.init_velocity = init_velocity
        self.reversible = reversible
        self.exact = exact
        self.frac_bits = frac_bits
        self._steps: list[MomentumStep] = []
        self._steps_key: tuple = ()
        # built now, not at the first call: a first call that changes these attributes would
        # make torch.compile recompile the network at its second call
        self.chain()

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "gamma" and self.__dict__.get("_steps"):
            self.chain()  # the steps follow now, not at the next call (inside a trace)

    def chain(self) -> list[MomentumStep]:
        key = (self.gamma, *self.functions)
        if _rebind_gamma(self._steps, key, self._steps_key):
            self._steps_key = key
        elif not _same_objects(key, self._steps_key):
            # The steps are views over the registered functions and gamma, not submodules:
            # the parameters and state_dict keys stay those of ``functions``.
            self._steps = [MomentumStep(f, self.gamma) for f in self.functions]
            self._steps_key = key
        return self._steps

    def _check_gamma_now(self) -> None:
        _check_learned_gamma(self.gamma, self.reversible)

    def _initial_velocity(self, x0: torch.Tensor, v0: torch.Tensor | None) -> torch.Tensor:
        if not isinstance(x0, torch.Tensor):
            raise TypeError(f"x0 must be a tensor, got {type(x0).__name__}")
        if not x0.dtype.is_floating_point:
            raise TypeError(f"x0 must have a floating dtype, got {x0.dtype}")
        if v0 is None:
            v0 = self.init_velocity(x0) if self.init_velocity is not None else torch.zeros_like(x0)
            what = "init_velocity(x0)"
        else:
            what = "v0"
        if not isinstance(v0, torch.Tensor):
            raise TypeError(f"{what} must be a tensor, got {type(v0).__name__}")
        if v0.shape != x0.shape:
            raise ValueError(
                f"{what} must have the shape of x0 {tuple(x0.shape)}, got {tuple(v0.shape)}"
            )
        if v0.dtype != x0.dtype:
            raise TypeError(f"{what} must have the dtype of x0 ({x0.dtype}), got {v0.dtype}")
        return v0

    def forward(
        self,
        x0: torch.Tensor,
        *args,
        v0: torch.Tensor | None = None,
        return_velocity: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``x_N`` (or ``(x_N, v_N)`` with ``return_velocity=True``) from ``x0`` of shape ``(*)``.

        ``v0`` overrides ``init_velocity``; extra positional ``args`` go to every ``f_n``.
        """
        self._check_gamma_now()
        v0 = self._initial_velocity(x0, v0)
        x, v = super().forward(x0, v0, *args)
        return (x, v) if return_velocity else x

    def inverse(
        self, x: torch.Tensor, v: torch.Tensor, *args
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_0, v_0)`` from ``(x_N, v_N)``; bit-exact when ``exact=True``."""
        self._check_gamma_now()
        if _gamma_value(self.gamma) == 0.0:
            raise ValueError("gamma = 0 is a plain ResNet, which has no inverse")
        return super().inverse(x, v, *args)

    def trajectory(
        self,
        x0: torch.Tensor,
        *args,
        v0: torch.Tensor | None = None,
        return_velocity: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Every state ``x_n``, ``n = 0..N``, stacked as ``(N + 1, *x0.shape)`` (plain autograd)."""
        self._check_gamma_now()
        v0 = self._initial_velocity(x0, v0)
        pairs = engine.trajectory(self.chain(), (x0, v0), args)
        xs = torch.stack([p[0] for p in pairs])
        return (xs, torch.stack([p[1] for p in pairs])) if return_velocity else xs

    def extra_repr(self) -> str:
        # Never raises: a learned gamma may have left [0, 1], where eps is undefined.
        text, g = _gamma_for_repr(self.gamma)
        learned = isinstance(self.gamma, torch.Tensor) and self.gamma.requires_grad
        depth = len(self.functions)
        if g is None:
            eps = "outside [0, 1]: eps undefined"
        else:
            eps = f"eps={_scalar_text(gamma_to_eps(g, depth), '.4g')} (horizon 1)"
        mode = "exact" if self.exact else ("float" if self.reversible else "off")
        return (
            f"depth={depth}, gamma={text}{' (learned)' if learned else ''}, {eps}, "
            f"reversible={self.reversible} ({mode}), "
            f"init_velocity={'yes' if self.init_velocity is not None else 'no (v0 = 0)'}"
        )
