"""``ReversibleNet``: an ``nn.Module`` over a chain of reversible steps on a state pair."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .. import reversible as engine
from ..conventions import check_gamma
from ..steps import ReversibleStep, State
from ..traced import assert_in_graph

__all__ = ["ReversibleNet", "compile_functions", "traceable"]

Function = Callable[..., torch.Tensor]


def _as_modules(functions, name: str) -> nn.ModuleList:
    containers = nn.ModuleList | nn.Sequential
    if isinstance(functions, nn.Module) and not isinstance(functions, containers):
        raise TypeError(
            f"{name} must be a list, nn.ModuleList or nn.Sequential of residual functions, got "
            f"a single {type(functions).__name__}"
        )
    try:
        functions = list(functions)
    except TypeError:
        raise TypeError(
            f"{name} must be a sequence of residual functions, got {type(functions).__name__}"
        ) from None
    if not functions:
        raise ValueError(f"{name} must contain at least one residual function, got none")
    for i, f in enumerate(functions):
        if not callable(f):
            raise TypeError(f"{name}[{i}] must be callable, got {type(f).__name__}")
    return nn.ModuleList(f if isinstance(f, nn.Module) else _Wrap(f) for f in functions)


def _check_learned_gamma(gamma, nonzero: bool) -> None:
    """The check of a tensor ``gamma`` at each call (a learned one may leave its range):
    ``0 <= gamma <= 1``, and ``gamma != 0`` where ``nonzero`` (a reversible Momentum ResNet).
    Eagerly a ValueError with the value; under ``torch.compile`` an assertion in the graph
    (there the value is data, and reading it would break the graph): a RuntimeError when the
    graph runs (:func:`mode.traced.assert_in_graph`)."""
    if not isinstance(gamma, torch.Tensor):
        return
    if not engine._is_compiling():
        check_gamma(gamma)
        if nonzero and float(gamma.detach()) == 0.0:
            raise ValueError("gamma reached 0, where a Momentum ResNet cannot be reversed")
        return
    g = gamma.detach()
    ok = (g >= 0) & (g <= 1)  # False for NaN
    if nonzero:
        ok = ok & (g != 0)
    assert_in_graph(ok, "gamma must lie in " + ("(0, 1]" if nonzero else "[0, 1]") +
                        " (a learned gamma left that range; checked in the compiled graph)")


class _Wrap(nn.Module):
    """Holds a plain callable inside a ModuleList of residual functions."""

    def __init__(self, fn: Function):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))




def _same_objects(a: tuple, b: tuple) -> bool:
    """Whether two tuples hold the same objects, element by element (identity). The networks
    key their steps by the objects the steps are views over, not by ``id``: ``copy.deepcopy``
    maps a network's functions and its steps' references to them alike, so a copy keeps its
    steps (rebuilding them at its first call would happen inside a torch.compile trace).
    Numbers compare by value: where dynamo makes a changed float (gamma, h) symbolic, the
    steps built for it when it was assigned are still the right ones."""
    return len(a) == len(b) and all(
        x is y or (isinstance(y, (int, float)) and not isinstance(x, (nn.Module, torch.Tensor))
                   and not isinstance(y, bool) and x == y)
        for x, y in zip(a, b))


def _rebind_gamma(steps: list, key: tuple, old_key: tuple) -> bool:
    """Where only gamma's tensor changed (``key[0]``, checked at each call by
    :func:`_check_learned_gamma`; FSDP2 swaps a parameter for its unsharded copy at each
    forward), point the existing steps at it and return True: a rebuild would create modules
    inside a torch.compile trace, which breaks the graph. The networks call it when ``gamma``
    is assigned (their ``__setattr__``, which FSDP2 also goes through), so that no step is
    changed inside a trace either (dynamo refuses to read a module it saw mutated). A pending
    backward is unaffected: the engine captured its couplings when its forward ran."""
    if (not steps or not isinstance(key[0], torch.Tensor) or _same_objects(key[:1], old_key[:1])
            or not _same_objects(key[1:], old_key[1:])):
        return False  # (a number is validated by the steps' constructor: rebuild)
    for step in steps:  # as the steps' constructor: a Parameter registered, a tensor not
        step._parameters.pop("gamma", None)  # (functional_call swaps in plain tensors)
        step.gamma = key[0]
    return True


def _check_flags(reversible: bool, exact: bool, frac_bits=None) -> engine.Strategy:
    """The networks' gradient flags, validated by the engine's one function."""
    return engine.strategy(reversible, exact, frac_bits)


class ReversibleNet(nn.Module):
    """A chain of :class:`~mode.steps.ReversibleStep` run by the reversible engine.

    ``forward(s0, s1, *args) -> (s0_N, s1_N)``; ``inverse`` undoes it; ``trajectory`` returns
    every intermediate pair. Architectures subclass this and only define their steps.

    Parameters
    ----------
    steps : sequence of ReversibleStep
    reversible : bool
        ``True``: no activations are stored; they are reconstructed in backward.
    exact : bool
        Bit-exact reconstruction in fixed point (``mode.exact``); needs ``reversible=True``.
    frac_bits : None, int or (int, int)
        Fractional bits of the fixed-point state in exact mode; ``None``: by the state's dtype
        (:func:`mode.reversible.default_frac_bits`: 48 for float64, held in int64, range
        ``|s| < 2^(60 - 48) = 4096``; 32 otherwise, held in float64, range
        ``|s| < 2^(46 - 32) = 16384``).
    """

    def __init__(
        self,
        steps: Sequence[ReversibleStep],
        *,
        reversible: bool = True,
        exact: bool = False,
        frac_bits: int | tuple[int, int] | None = None,
    ):
        super().__init__()
        _check_flags(reversible, exact, frac_bits)
        self.steps = nn.ModuleList(engine._check_steps(steps))
        self.reversible = reversible
        self.exact = exact
        self.frac_bits = frac_bits

    def chain(self) -> list[ReversibleStep]:
        """The steps, in order."""
        return list(self.steps)

    @property
    def depth(self) -> int:
        return len(self.chain())

    #: ``True`` or a dict of ``torch.compile`` options: the engine runs every residual
    #: function compiled (forward, recomputation and inverse); ``False``: never; ``None``
    #: (default): in float mode, when the network is called inside ``torch.compile``. See
    #: ``mode.compile_functions``.
    compile_functions: bool | dict | None = None

    #: ``True``: under ``torch.compile`` the float reversible forward and backward are traced
    #: into the compiled graph (``fullgraph=True`` works; ``mode.traced``) when the chain is
    #: eligible; ``False`` (default): the engine is one opaque call. See ``mode.traceable``.
    traceable: bool = False

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, *args) -> State:
        return engine.integrate(
            self.chain(),
            (s0, s1),
            args,
            reversible=self.reversible,
            exact=self.exact,
            frac_bits=self.frac_bits,
            compile=self.compile_functions,
            traceable=self.traceable,
        )

    def inverse(self, s0: torch.Tensor, s1: torch.Tensor, *args) -> State:
        """Recover the input pair from the output pair (bit-exact in exact mode)."""
        return engine.reverse(self.chain(), (s0, s1), args, exact=self.exact)

    def trajectory(self, s0: torch.Tensor, s1: torch.Tensor, *args) -> State:
        """Every pair ``(s0_n, s1_n)``, ``n = 0..N``, stacked: two tensors ``(N + 1, *shape)``."""
        pairs = engine.trajectory(self.chain(), (s0, s1), args)
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def extra_repr(self) -> str:
        mode = "exact" if self.exact else ("float" if self.reversible else "off")
        return f"depth={self.depth}, reversible={self.reversible} ({mode})"


def compile_functions(model: nn.Module, enabled: bool = True, **options) -> int:
    """Make the reversible engine run the residual functions of every mode network inside
    ``model`` (``MomentumResNet``, ``RevNet``, ..., converted stages) through ``torch.compile``
    (keyword ``options``, e.g. ``mode="max-autotune"``), in the forward pass, the backward's
    recomputation and ``inverse``. ``enabled=False`` never compiles them (not even inside a
    compiled model). A function with module hooks runs eagerly (functions of one structure
    share graphs, and dynamo does not guard on hooks). The model's modules, parameters and
    state_dict are unchanged. Returns the number of networks set."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    setting = (options or True) if enabled else False
    engine._compile_options(setting)  # validates
    return _set_on_networks(model, "compile_functions", setting)


def traceable(model: nn.Module, enabled: bool = True) -> int:
    """Make ``torch.compile`` trace the reversible engine of every mode network inside
    ``model``: an eligible float chain's forward and reversible backward become part of the
    compiled graph (one graph, ``fullgraph=True`` works, inductor fuses across steps), with
    memory still independent of depth (:mod:`mode.traced`); a learned gamma included, whose
    checks become assertions in the graph. An ineligible chain (exact mode, Dropout in
    training mode, ...) keeps the opaque engine and breaks the
    graph, with the reason under ``fullgraph=True``. Residual functions must be deterministic:
    random numbers drawn in a function's own code are not replayed. No effect outside
    ``torch.compile``; the model's modules and state_dict are unchanged. Returns the number of
    networks set."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    return _set_on_networks(model, "traceable", enabled)


def _set_on_networks(model: nn.Module, name: str, value) -> int:
    """Set attribute ``name`` of every mode network inside ``model``; return how many. Also
    makes the opaque engine's wrapper now (``torch.compile`` is coming)."""
    engine._prepare_opaque()
    count = 0
    for m in model.modules():
        if isinstance(m, ReversibleNet):
            setattr(m, name, value)
            count += 1
    return count
