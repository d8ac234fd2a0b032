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
VJP would not see); scalar coefficients with ``eps(dtype) prod 1/|alpha|`` below
:data:`mode.reversible.AMPLIFICATION_WARN`; no module in training mode that draws random
numbers (Dropout, RReLU: the graph cannot replay the RNG); no module whose run assigns
module attributes (the hooks of ``nn.utils.spectral_norm`` and ``nn.utils.weight_norm``,
``parametrizations.spectral_norm`` in training mode: dynamo refuses that side effect inside an
``autograd.Function``); no module backward hook (``torch.func.vjp`` cannot run it). An
ineligible chain runs through the opaque engine, which is faithful
in every case, and breaks the graph there; ``fullgraph=True`` then raises with the reason.

Tensor coefficients (a learned gamma: ``alpha = gamma``, ``scale = 1 - gamma``) are the
couplings' values at this call, inputs of the chain's node: the backward divides by them and
returns ``d alpha = sum(ds[t] s[t])`` (the reconstructed ``s[t]``) and ``d scale`` from the
VJP, which autograd carries on to the parameters they are made of. Their amplification bound
cannot be decided while tracing; it is an assertion in the graph, which raises when the graph
runs (the eager engine warns and goes on; a graph cannot warn).

The contract the graph cannot check: residual functions are deterministic functions of their
input, arguments, parameters and buffers. A function that draws random numbers itself
(``torch.rand`` in its ``forward``) would get other numbers in the recomputation; keep such a
network out of ``traceable``, where the opaque engine replays RNG states. Forward hooks run
twice, in the forward and in the backward's evaluation of ``phi`` (as in the opaque engine and
``torch.utils.checkpoint``); one that changes Python state (appends to a list) is a side effect
dynamo refuses inside the chain: with ``fullgraph=True`` dynamo raises, else the chain runs
eagerly, with the same gradients. A residual function that installs saved-tensor hooks
(``torch.utils.checkpoint``) cannot run inside ``torch.func.vjp``: the compilation raises,
with that reason.

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

from .steps import Coupling, ReversibleStep, StepGrid, coupling_update, scaled_phi

__all__ = ["refusal", "integrate_traced", "distinct_tensors", "assert_in_graph"]

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
    in the chain's tensors, the names of the buffers whose values the forward saves for the
    recomputation, ``(name, shape, dtype)`` of those it only writes (a norm layer's running
    statistics in training: the recomputation writes into fresh tensors), and its couplings as
    the forward made them (a tensor coefficient replaced by its :class:`_Arg`)."""

    module: ReversibleStep
    params: tuple[tuple[str, int], ...]
    buffers: tuple[str, ...]
    scratch: tuple[tuple[str, torch.Size, torch.dtype], ...]
    couplings: tuple[Coupling, ...]


def _batch_statistics(m: nn.Module) -> bool:
    """A BatchNorm or InstanceNorm layer in training mode: it normalizes with the batch's
    statistics and only writes its running statistics (its output never reads them)."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.instancenorm import _InstanceNorm

    return m.training and isinstance(m, (_BatchNorm, _InstanceNorm))


def _reads_buffers_only(m: nn.Module) -> bool:
    """A module whose forward reads its buffers and never writes them, in any mode: the
    orthogonal parametrization's ``base``."""
    from torch.nn.utils.parametrizations import _Orthogonal

    return isinstance(m, _Orthogonal)


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
            exact: bool, limit: float) -> str | None:
    """Why this chain cannot run as a traced graph (``None``: it can). A chain of float
    coefficients is refused where float reversal amplifies rounding by more than ``limit``,
    ``eps(dtype) prod 1/|alpha| > limit`` (tensor coefficients are checked in the graph, by
    :func:`integrate_traced`)."""
    if exact:
        return ("exact mode's range checks and information buffer depend on tensor values, "
                "which a traced graph cannot branch on")
    if isinstance(steps, StepGrid) or couplings is None:
        return "a StepGrid makes its couplings per call; trace a list of steps"
    if _reparametrize_module is None:  # pragma: no cover - older torch
        return "this torch has no torch.nn.utils.stateless._reparametrize_module"
    from torch.nn.modules import module as mod

    if mod._global_backward_hooks or mod._global_backward_pre_hooks:
        return ("a process-wide module backward hook, which torch.func.vjp in the traced "
                "backward cannot run")
    for i, (step, cs) in enumerate(zip(steps, couplings)):
        modules = list(step.modules())
        for c in cs:
            if not _phi_owner(c.phi, modules):
                return (f"step {i}: a residual function that is neither a module of its step nor "
                        f"a method of one (a closure); its tensors would get no gradient")
            for x in (c.alpha, c.scale):
                if isinstance(x, torch.Tensor) and x.numel() != 1:
                    return (f"step {i}: a coefficient of {x.numel()} elements; a coupling's "
                            f"alpha and scale are scalars")
        for m in modules:
            if _draws(m):
                return (f"step {i}: {type(m).__name__} in training mode draws random numbers, "
                        f"which a traced graph cannot replay in the recomputation")
            if m._backward_hooks or m._backward_pre_hooks:
                return (f"step {i}: {type(m).__name__} has a module backward hook "
                        f"(register_full_backward_hook), which torch.func.vjp in the traced "
                        f"backward cannot run")
            what = _assigns(m)
            if what is not None:
                return (f"step {i}: {what} assigns module attributes as it runs, which dynamo "
                        f"cannot trace inside the chain's autograd.Function")
            if (m.training and any(b is not None for b in m._buffers.values())
                    and not _batch_statistics(m) and not _reads_buffers_only(m)):
                return (f"step {i}: {type(m).__name__} in training mode holds buffers, which "
                        f"its forward may read and update; a compiled graph rebuilds the saved "
                        f"copy of such a buffer from its updated value (AOTAutograd), so the "
                        f"recomputation would not see what the forward saw")
    amp = math.exp(min(_float_log_amplification(couplings), 700.0))
    if torch.finfo(dtype).eps * amp > limit:
        return (f"float reversal amplifies rounding by prod(1/|alpha|) = {amp:.3g} (the engine "
                f"warns); use exact=True")
    return None


def _float_log_amplification(couplings: Sequence[Sequence[Coupling]]) -> float:
    """``-sum log|alpha|`` over the float coefficients (``inf`` where one is 0)."""
    log = 0.0
    for cs in couplings:
        for c in cs:
            if not isinstance(c.alpha, torch.Tensor):
                if c.alpha == 0.0:
                    return math.inf
                log -= math.log(abs(c.alpha))
    return log


def assert_in_graph(ok: torch.Tensor, message: str) -> None:
    """Raise ``RuntimeError(message)`` when the graph runs if the boolean 0-dim ``ok`` is
    false: a check of a tensor's value that a traced graph cannot branch on. Checked on the CPU
    (``torch._assert_async``), where it raises with the message; a device tensor is copied
    there first (one small synchronization), since on CUDA the assertion would be a
    device-side assert, fatal to the process's CUDA context and without the message."""
    if ok.device.type != "cpu":
        ok = ok.to("cpu")
    torch._assert_async(ok, message)


def _check_tensor_amplification(couplings, dtype: torch.dtype, limit: float) -> None:
    """The amplification check of :func:`refusal` for a chain with tensor coefficients (a
    learned gamma), as an assertion in the graph: ``eps(dtype) prod 1/|alpha| <= limit`` over
    every coefficient, a float one or a tensor's current value (:func:`assert_in_graph`)."""
    alphas = [c.alpha.detach() for cs in couplings for c in cs if isinstance(c.alpha, torch.Tensor)]
    if not alphas:
        return
    log = _float_log_amplification(couplings)
    for a in alphas:
        log = log - torch.log(torch.abs(a.to(torch.float32)))  # (no float64 on every device)
    ok = torch.finfo(dtype).eps * torch.exp(log) <= limit  # False for NaN, alpha = 0: inf
    # (no number formatted here: under dynamic=True dynamo makes ``limit`` symbolic)
    assert_in_graph(
        ok,
        f"mode.traceable: float reversal of this chain amplifies {dtype} rounding by "
        f"prod(1/|alpha|) > mode.reversible.AMPLIFICATION_WARN / eps (the tensor coefficients, a "
        f"learned gamma, have become small, or zero, or NaN): its reconstructed activations and "
        f"gradients cannot be trusted. Use exact=True, or leave this network out of "
        f"mode.traceable (the opaque engine warns and goes on)",
    )


def _under(state: tuple, fn, *a):
    """``fn(*a)`` under the forward's autocast state ``((kind, enabled, dtype), ...)``."""
    if not state:
        return fn(*a)
    kind, enabled, dtype = state[0]
    with torch.autocast(kind, dtype=dtype, enabled=enabled):
        return _under(state[1:], fn, *a)


def integrate_traced(steps: Sequence[ReversibleStep], couplings: Sequence[Sequence[Coupling]],
                     s0: torch.Tensor, s1: torch.Tensor, args: tuple, autocast: tuple,
                     limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Run an eligible float chain (:func:`refusal` is ``None``) as one traced autograd node.

    ``couplings``: each step's couplings, made once here, for this call (forward and backward
    read these, whose tensor coefficients are inputs of the node and get their gradients);
    ``autocast``: the forward's ``((device_type, enabled, dtype), ...)``, replayed in the
    backward; ``limit``: the bound on float reversal's error, checked in the graph for tensor
    coefficients."""
    _check_tensor_amplification(couplings, s0.dtype, limit)
    tensors, add = distinct_tensors()

    def slot(x):
        return _Arg(add(x)) if isinstance(x, torch.Tensor) else x

    prog_steps = []
    for step, cs in zip(steps, couplings):
        # every name of a tied parameter (f[2].weight = f[0].weight): each is swapped for the
        # VJP's input, whose gradients the backward sums
        params = tuple((name, add(p)) for name, p in step.named_parameters(remove_duplicate=False))
        buffers, scratch = [], []
        for prefix, m in step.named_modules():
            for name, b in m._buffers.items():
                if b is not None:
                    full = f"{prefix}.{name}" if prefix else name
                    if _batch_statistics(m):
                        scratch.append((full, b.shape, b.dtype))
                    else:
                        buffers.append(full)
        cs = tuple(c._replace(alpha=slot(c.alpha), scale=slot(c.scale)) for c in cs)
        prog_steps.append(_Step(step, params, tuple(buffers), tuple(scratch), cs))
    program = _Program(tuple(prog_steps), tuple(slot(a) for a in args), autocast)
    # one tensor in two places (MidpointNet's default pair (x, x), v0=x, an argument that is
    # x): dynamo refuses a duplicate input of autograd.Function.apply, so pass an alias
    # (compared with ``is``: an ``id`` would make dynamo guard on the object, recompiling
    # at every call)
    if any(s0 is t for t in tensors):
        s0 = s0.view_as(s0)
    if s1 is s0 or any(s1 is t for t in tensors):
        s1 = s1.view_as(s1)
    return _TracedChain.apply(program, s0, s1, *tensors)


class _Arg(NamedTuple):
    """A tensor's place in the chain's tensors (an argument, a tensor coefficient)."""

    index: int


def _value(x, tensors: Sequence[torch.Tensor]):
    return tensors[x.index] if isinstance(x, _Arg) else x


def _args(program: _Program, tensors: Sequence[torch.Tensor]) -> tuple:
    return tuple(_value(a, tensors) for a in program.args)


def _coupling(c: Coupling, tensors: Sequence[torch.Tensor]) -> Coupling:
    """A coupling of the program with its tensor coefficients."""
    return c._replace(alpha=_value(c.alpha, tensors), scale=_value(c.scale, tensors))


class _TracedChain(torch.autograd.Function):
    """The chain's forward without recording and its reversible backward, both traceable."""

    @staticmethod
    def forward(ctx, program: _Program, s0, s1, *tensors):
        args = _args(program, tensors)
        snapshots = []
        s = (s0, s1)
        for st in program.steps:
            snapshots.extend(st.module.get_buffer(name).clone() for name in st.buffers)
            s = list(s)
            for c in st.couplings:
                s[c.target] = coupling_update(_coupling(c, tensors), s, args)
            s = (s[1], s[0]) if st.module.swap else (s[0], s[1])
        ctx.program = program
        ctx.save_for_backward(*s, *tensors, *snapshots)
        return s

    @staticmethod
    def backward(ctx, g0, g1):
        program: _Program = ctx.program
        saved = ctx.saved_tensors
        n = len(saved) - 2 - sum(len(st.buffers) for st in program.steps)
        s, tensors, snapshots = saved[:2], saved[2:2 + n], saved[2 + n:]
        grads: list[torch.Tensor | None] = [None] * n
        g = (g0, g1)
        end = len(snapshots)
        for st in reversed(program.steps):
            buffers = snapshots[end - len(st.buffers):end]
            end -= len(st.buffers)
            s, g = list(s), list(g)
            if st.module.swap:
                s, g = [s[1], s[0]], [g[1], g[0]]
            for c in reversed(st.couplings):
                for i, d in _backward_coupling(program, st, c, tensors, buffers, s, g):
                    if d is not None:
                        grads[i] = d if grads[i] is None else grads[i] + d
        return (None, *g, *grads)


def _backward_coupling(program: _Program, st: _Step, c: Coupling, tensors, buffers, s: list,
                       g: list) -> list[tuple[int, torch.Tensor | None]]:
    """Undo ``s[t] <- a s[t] + shift s[o] + p``, ``p = scale phi(s[o], *args)``, and pull
    ``g`` back through it, in place in the lists ``s`` and ``g``; returns ``(index, gradient)``
    for the chain's tensors it reaches (θ, tensor arguments, a tensor ``scale`` through the
    VJP; a tensor ``a``: ``da = sum(g[t] s[t])`` with the reconstructed ``s[t]``). ``p`` is
    evaluated once, for both: the VJP of ``phi`` at ``s[o]`` (unchanged by the coupling) gives
    ``p`` with its pullback."""
    t, o = c.target, 1 - c.target
    a = _value(c.alpha, tensors)
    out: list[tuple[int, torch.Tensor | None]] = []
    prev, gt = s[t], g[t]
    if c.shift:
        prev = prev - c.shift * s[o]
        g[o] = torch.add(g[o], gt, alpha=c.shift)
    if c.phi is not None:
        slots = [j for j, x in enumerate(program.args) if isinstance(x, _Arg)]
        where = [i for _, i in st.params] + [program.args[j].index for j in slots]
        if isinstance(c.scale, _Arg):
            where.append(c.scale.index)
        args = _args(program, tensors)
        primals = [tensors[i] for i in where]
        p, pull = torch.func.vjp(_scaled_phi(program, st, _coupling(c, tensors), buffers, args,
                                             slots), s[o], *primals)
        prev = prev - p
        d = pull(gt if gt.dtype == p.dtype else gt.to(p.dtype))
        g[o] = g[o] + d[0]
        out = list(zip(where, d[1:]))
    tensor = isinstance(a, torch.Tensor)
    s[t] = prev / a if tensor or a != 1.0 else prev
    if tensor:
        out.append((c.alpha.index, (gt * s[t]).sum_to_size(a.shape).to(a.dtype)))
    if tensor or a != 1.0:
        g[t] = gt * a
    return out


_NO_SAVED_TENSOR_HOOKS = (
    "mode.traceable: a residual function installs saved-tensor hooks (torch.utils.checkpoint, "
    "save_on_cpu), which torch.func.vjp in the traced backward cannot run. The reversible "
    "backward already recomputes f, so drop the checkpoint inside it; or leave this network "
    "out of mode.traceable (the opaque engine runs them)")


def _scaled_phi(program: _Program, st: _Step, c: Coupling, buffers, args, slots):
    """``(other, *params, *tensor_args[, scale]) -> scale phi(other, *args)`` (``scale`` a
    primal where it is a tensor), evaluated with the step's parameters ``params``, copies of
    its saved ``buffers`` and the forward's autocast state."""
    n = len(st.params)
    names = [name for name, _ in st.params]
    tensor_scale = isinstance(c.scale, torch.Tensor)

    def fn(other, *primals):
        own = list(args)
        for j, x in zip(slots, primals[n:n + len(slots)]):
            own[j] = x
        values = dict(zip(names, primals[:n]))
        values.update((name, b.clone()) for name, b in zip(st.buffers, buffers))
        values.update((name, torch.zeros(shape, dtype=dtype, device=other.device))
                      for name, shape, dtype in st.scratch)
        scale = primals[-1] if tensor_scale else c.scale
        with _reparametrize_module(st.module, values), \
                torch.autograd.graph.disable_saved_tensors_hooks(_NO_SAVED_TENSOR_HOOKS):
            return _under(program.autocast, scaled_phi, c, other, tuple(own), scale)

    return fn
