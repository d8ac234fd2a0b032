"""The float reversible backward as part of a ``torch.compile`` graph (``fullgraph=True``).

Under ``torch.compile`` the engine of :mod:`mode.reversible` is one opaque call: its backward
is driven by Python (plans, RNG and buffer replay) and breaks the graph. For a network marked
``traceable`` (:func:`mode.traceable`), an eligible float chain runs instead as
:class:`_TracedChain`, an ``autograd.Function`` whose forward and backward dynamo traces whole:

    forward   s_{n+1} = step_n(s_n)                   no autograd record; saved: s_N, the
                                                      parameters, and each step's buffers as
                                                      they were before it ran
    backward  for n = N-1, ..., 0, and each coupling s[t] <- a s[t] + shift s[o] + p of
              step n in reverse order, p = scale phi(s[o], *args) (s[o] is unchanged by it):
                (p, pull) = vjp(phi, s[o], θ_n, args)            torch.func.vjp, phi once
                s[t] <- (s[t] - shift s[o] - p) / a              float reversal
                ds[o] <- ds[o] + shift ds[t] + pull(ds[t])_0,  ds[t] <- a ds[t]
                dθ_n, dargs += pull(ds[t])_1..
              (a step that swaps its pair at the end swaps s and ds back first)

with ``phi`` evaluated on the step's saved parameters and copies of the saved buffers
(``functional_call``), so the recomputation sees what the forward saw and leaves the modules'
buffers (BatchNorm's running statistics) as the forward left them. Memory: one state pair and
the buffers' copies, independent of depth; the compiled backward is one graph (inductor fuses
across steps). The autocast state of the forward is replayed in the backward.

Eligible (:func:`refusal` says why not): float mode; a list of steps (not a StepGrid); every
residual function a module of its step or a method of one (no free closures, whose tensors the
VJP would not see); float coefficients with ``eps(dtype) prod 1/|alpha|`` below
:data:`mode.reversible.AMPLIFICATION_WARN` (a tensor ``alpha``, a learned gamma, would need
its value); no module in training mode that draws random numbers (Dropout, RReLU: the graph
cannot replay the RNG); no module whose run assigns module attributes (the hooks of
``nn.utils.spectral_norm`` and ``nn.utils.weight_norm``, ``parametrizations.spectral_norm``
in training mode: dynamo refuses that side effect inside an ``autograd.Function``). An
ineligible chain runs through the opaque engine, which is faithful
in every case, and breaks the graph there; ``fullgraph=True`` then raises with the reason.

The contract the graph cannot check: residual functions are deterministic functions of their
input, arguments, parameters and buffers. A function that draws random numbers itself
(``torch.rand`` in its ``forward``) would get other numbers in the recomputation; keep such a
network out of ``traceable``, where the opaque engine replays RNG states. Forward hooks run
twice, in the forward and in the backward's evaluation of ``phi`` (as in the opaque engine and
``torch.utils.checkpoint``); one that changes Python state (appends to a list) is a side effect
dynamo refuses inside the chain: with ``fullgraph=True`` dynamo raises, else the chain runs
eagerly, with the same gradients.

Dynamo shares compiled frames among every ``torch.compile`` of the same code: in a process that
compiled the same model structure without ``traceable``, a traceable copy may reuse those
frames and run the engine eagerly (correct, not one graph); compile it first or after
``torch._dynamo.reset()``. The residual functions are part of the traced graph, so
``compile_functions`` options do not apply to a traced chain.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from .steps import Coupling, ReversibleStep, StepGrid, apply_step, scaled_phi

__all__ = ["refusal", "integrate_traced", "distinct_tensors"]

try:  # what torch.func.functional_call uses; dynamo traces it (trace_rules), also inside vjp
    from torch.nn.utils.stateless import _reparametrize_module
except ImportError:  # pragma: no cover - older torch
    _reparametrize_module = None


def _draws(m: nn.Module) -> bool:
    """Whether the module's forward draws random numbers (Dropout family with ``p > 0``,
    RReLU, in training mode)."""
    if not m.training:
        return False
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p > 0
    return isinstance(m, nn.RReLU) and m.lower != m.upper


def _assigns(m: nn.Module) -> str | None:
    """What of ``m`` assigns module attributes while it runs (dynamo refuses such a side
    effect inside the chain's ``autograd.Function``): the hook of ``nn.utils.spectral_norm`` or
    ``nn.utils.weight_norm`` (it sets the weight), or the power iteration of
    ``parametrizations.spectral_norm`` in training mode (it sets ``_u`` and ``_v``)."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import _SpectralNorm
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in m._forward_pre_hooks.values():
        if isinstance(hook, (SpectralNorm, WeightNorm)):
            return f"nn.utils.{type(hook).__name__.lower().replace('norm', '_norm')}"
    if isinstance(m, parametrize.ParametrizationList):
        if any(isinstance(q, _SpectralNorm) and q.training for q in m):
            return "parametrizations.spectral_norm in training mode"
    return None


class _Step(NamedTuple):
    """One step of the traced chain: its module, the names of its parameters with their index
    in the chain's tensors, and the names of its buffers."""

    module: ReversibleStep
    params: tuple[tuple[str, int], ...]
    buffers: tuple[str, ...]


class _Program(NamedTuple):
    """What the traced backward reads besides tensors: the steps, where the tensor arguments
    sit among the arguments, and the forward's autocast state."""

    steps: tuple[_Step, ...]
    args: tuple  # the arguments, with tensors replaced by their index in the chain's tensors
    autocast: tuple  # ((device_type, enabled, dtype), ...)


def distinct_tensors():
    """``(tensors, add)``: ``add(t)`` appends ``t`` to the list ``tensors`` unless it is there
    (by identity) and returns its index (a parameter shared by several steps is one tensor)."""
    tensors: list[torch.Tensor] = []
    index: dict[int, int] = {}

    def add(t: torch.Tensor) -> int:
        if id(t) not in index:
            index[id(t)] = len(tensors)
            tensors.append(t)
        return index[id(t)]

    return tensors, add


def _phi_owner(phi, modules: list[nn.Module]) -> bool:
    if phi is None:
        return True
    if isinstance(phi, nn.Module):
        return any(phi is m for m in modules)
    if not isinstance(phi, types.MethodType):  # a bound method of one of the step's modules
        return False
    owner = phi.__self__  # (under dynamo, getattr(phi, "__self__", None) gives None)
    return any(owner is m for m in modules)


def refusal(steps, couplings: Sequence[Sequence[Coupling]] | None, dtype: torch.dtype,
            exact: bool, log_amplification, limit: float) -> str | None:
    """Why this chain cannot run as a traced graph (``None``: it can). ``log_amplification()``
    is the engine's ``-sum log|alpha|`` (called once every coefficient is known to be a float);
    the chain is refused where ``eps(dtype)`` times its exponential exceeds ``limit``."""
    if exact:
        return ("exact mode's range checks and information buffer depend on tensor values, "
                "which a traced graph cannot branch on")
    if isinstance(steps, StepGrid) or couplings is None:
        return "a StepGrid makes its couplings per call; trace a list of steps"
    if _reparametrize_module is None:  # pragma: no cover - older torch
        return "this torch has no torch.nn.utils.stateless._reparametrize_module"
    for i, (step, cs) in enumerate(zip(steps, couplings)):
        modules = list(step.modules())
        for c in cs:
            if not _phi_owner(c.phi, modules):
                return (f"step {i}: a residual function that is neither a module of its step nor "
                        f"a method of one (a closure); its tensors would get no gradient")
            for x in (c.alpha, c.scale):
                if isinstance(x, torch.Tensor):
                    return (f"step {i}: a tensor coefficient (a learned gamma): bounding float "
                            f"reversal's error needs its value, which a traced graph cannot read")
        for m in modules:
            if _draws(m):
                return (f"step {i}: {type(m).__name__} in training mode draws random numbers, "
                        f"which a traced graph cannot replay in the recomputation")
            what = _assigns(m)
            if what is not None:
                return (f"step {i}: {what} assigns module attributes as it runs, which dynamo "
                        f"cannot trace inside the chain's autograd.Function")
    amp = math.exp(min(log_amplification(), 700.0))
    if torch.finfo(dtype).eps * amp > limit:
        return (f"float reversal amplifies rounding by prod(1/|alpha|) = {amp:.3g} (the engine "
                f"warns); use exact=True")
    return None


def _under(state: tuple, fn, *a):
    """``fn(*a)`` under the forward's autocast state ``((kind, enabled, dtype), ...)``."""
    if not state:
        return fn(*a)
    kind, enabled, dtype = state[0]
    with torch.autocast(kind, dtype=dtype, enabled=enabled):
        return _under(state[1:], fn, *a)


def integrate_traced(steps: Sequence[ReversibleStep], s0: torch.Tensor, s1: torch.Tensor,
                     args: tuple, autocast: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Run an eligible float chain (:func:`refusal` is ``None``) as one traced autograd node;
    ``autocast``: the forward's ``((device_type, enabled, dtype), ...)``, replayed in the
    backward."""
    tensors, add = distinct_tensors()

    prog_steps = []
    for step in steps:
        params = tuple((name, add(p)) for name, p in step.named_parameters())
        buffers = tuple(name for name, _ in step.named_buffers())
        prog_steps.append(_Step(step, params, buffers))
    arg_slots = tuple(_Arg(add(a)) if isinstance(a, torch.Tensor) else a for a in args)
    program = _Program(tuple(prog_steps), arg_slots, autocast)
    return _TracedChain.apply(program, s0, s1, *tensors)


class _Arg(NamedTuple):
    """A tensor argument's place in the chain's tensors."""

    index: int


def _args(program: _Program, tensors: Sequence[torch.Tensor]) -> tuple:
    return tuple(tensors[a.index] if isinstance(a, _Arg) else a for a in program.args)


class _TracedChain(torch.autograd.Function):
    """The chain's forward without recording and its reversible backward, both traceable."""

    @staticmethod
    def forward(ctx, program: _Program, s0, s1, *tensors):
        args = _args(program, tensors)
        snapshots = []
        s = (s0, s1)
        for st in program.steps:
            snapshots.extend(b.clone() for _, b in st.module.named_buffers())
            s = apply_step(st.module, s, args)
        ctx.program = program
        ctx.save_for_backward(*s, *tensors, *snapshots)
        return s

    @staticmethod
    def backward(ctx, g0, g1):
        program: _Program = ctx.program
        saved = ctx.saved_tensors
        n = len(saved) - 2 - sum(len(st.buffers) for st in program.steps)
        s, tensors, snapshots = saved[:2], saved[2:2 + n], saved[2 + n:]
        args = _args(program, tensors)
        slots = [j for j, a in enumerate(program.args) if isinstance(a, _Arg)]
        grads: list[torch.Tensor | None] = [None] * n
        g = (g0, g1)
        end = len(snapshots)
        for st in reversed(program.steps):
            buffers = snapshots[end - len(st.buffers):end]
            end -= len(st.buffers)
            params = [tensors[i] for _, i in st.params]
            targets = [i for _, i in st.params] + [program.args[j].index for j in slots]
            s, g = list(s), list(g)
            if st.module.swap:
                s, g = [s[1], s[0]], [g[1], g[0]]
            for c in reversed(st.module.couplings()):
                new = _backward_coupling(program, st, c, params, buffers, s, g, args, slots)
                for i, d in zip(targets, new):
                    if d is not None:
                        grads[i] = d if grads[i] is None else grads[i] + d
        return (None, *g, *grads)


def _backward_coupling(program: _Program, st: _Step, c: Coupling, params, buffers, s: list,
                       g: list, args: tuple, slots) -> Sequence[torch.Tensor | None]:
    """Undo ``s[t] <- a s[t] + shift s[o] + p``, ``p = scale phi(s[o], *args)``, and pull
    ``g`` back through it, in place in the lists ``s`` and ``g``; returns ``(dθ, dargs)``.
    ``p`` is evaluated once, for both: the VJP of ``phi`` at ``s[o]`` (unchanged by the
    coupling) gives ``p`` with its pullback."""
    t, o = c.target, 1 - c.target
    a = float(c.alpha)  # a float: refusal() turns tensor coefficients away
    new: Sequence[torch.Tensor | None] = ()
    prev, gt = s[t], g[t]
    if c.shift:
        prev = prev - c.shift * s[o]
        g[o] = torch.add(g[o], gt, alpha=c.shift)
    if c.phi is not None:
        p, pull = torch.func.vjp(_scaled_phi(program, st, c, buffers, args, slots),
                                 s[o], *params, *(args[j] for j in slots))
        prev = prev - p
        d = pull(gt if gt.dtype == p.dtype else gt.to(p.dtype))
        g[o] = g[o] + d[0]
        new = d[1:]
    s[t] = prev / a if a != 1.0 else prev
    if a != 1.0:
        g[t] = gt * a
    return new


def _scaled_phi(program: _Program, st: _Step, c: Coupling, buffers, args, slots):
    """``(other, *params, *tensor_args) -> scale phi(other, *args)``, evaluated with the step's
    parameters ``params``, copies of its saved ``buffers`` and the forward's autocast state."""
    n = len(st.params)
    names = [name for name, _ in st.params]

    def fn(other, *primals):
        own = list(args)
        for j, x in zip(slots, primals[n:]):
            own[j] = x
        values = dict(zip(names, primals[:n]))
        values.update((name, b.clone()) for name, b in zip(st.buffers, buffers))
        with _reparametrize_module(st.module, values):
            return _under(program.autocast, scaled_phi, c, other, tuple(own))

    return fn
