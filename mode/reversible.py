"""The depth-independent-memory backprop engine over a chain of reversible steps.

``integrate(steps, (s0, s1), args)`` runs the couplings of every step (``mode.steps``). With
``reversible=True`` the forward pass stores no activations: the backward pass walks the chain
in reverse and, for every coupling ``s[t] <- alpha s[t] + shift s[o] + phi(s[o])``,

1. evaluates ``p = phi(s[o])`` once, with autograd recording,
2. reconstructs ``s[t] <- (s[t] - shift s[o] - p) / alpha`` from the detached ``p``,
3. back-propagates the incoming gradient through ``p`` (and ``alpha``).

That is one extra evaluation of each residual function in total (about 4/3 of autograd's
work), and memory that does not depend on depth. With ``exact=True`` the states are held in
fixed point (:mod:`mode.exact`), so the reconstructed states are bit-identical to the forward
ones at any depth; in float mode reconstruction error grows like ``prod |alpha|^-1`` and the
engine warns when that makes gradients untrustworthy.

Recomputation is faithful: a step that drew random numbers in the forward pass (dropout) sees
the same RNG state again, and BatchNorm running statistics are not updated a second time.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from .exact import DEFAULT_FRAC_BITS, FixedPoint, InformationBuffer, rational
from .steps import (
    Coupling,
    ReversibleStep,
    State,
    StepGrid,
    _alpha_value,
    _check_phi_output,
    apply_step,
    coupling_update,
    invert_step,
)

__all__ = [
    "integrate",
    "reverse",
    "trajectory",
    "information_buffer",
    "predicted_amplification",
    "ReconstructionWarning",
    "AMPLIFICATION_WARN",
]

# Warn in float mode when eps(dtype) * prod |alpha|^-1 exceeds this relative error.
AMPLIFICATION_WARN = 1e-3


class ReconstructionWarning(UserWarning):
    """Float reversal is predicted to amplify rounding errors beyond trust."""


# --------------------------------------------------------------------------------------------
# validation


def _check_state(state: State) -> State:
    if not isinstance(state, tuple | list) or len(state) != 2:
        raise TypeError("state must be a pair (s0, s1) of tensors")
    s0, s1 = state
    for name, s in (("s0", s0), ("s1", s1)):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(s).__name__}")
        if not s.dtype.is_floating_point:
            raise TypeError(f"{name} must have a floating dtype, got {s.dtype}")
    if s0.shape != s1.shape:
        raise ValueError(
            f"the two halves of the state must have the same shape, got {tuple(s0.shape)} "
            f"and {tuple(s1.shape)}"
        )
    if s0.dtype != s1.dtype or s0.device != s1.device:
        raise TypeError(
            f"the two halves of the state must share dtype and device, got "
            f"{s0.dtype}/{s0.device} and {s1.dtype}/{s1.device}"
        )
    return s0, s1


def _check_steps(steps: Sequence[ReversibleStep]) -> Sequence[ReversibleStep]:
    if isinstance(steps, StepGrid):  # one module at many times: keep it, do not expand it
        if len(steps) == 0 or not isinstance(steps.step, ReversibleStep):
            raise ValueError("a StepGrid needs a ReversibleStep and at least one time")
        return steps
    steps = list(steps)
    if not steps:
        raise ValueError("steps must contain at least one step, got an empty sequence")
    for i, step in enumerate(steps):
        if not isinstance(step, ReversibleStep):
            raise TypeError(f"steps[{i}] must be a mode.steps.ReversibleStep, got {type(step)}")
    return steps


def _runs(steps: Sequence[ReversibleStep]) -> list[tuple[ReversibleStep, int]]:
    """``(step, repeats)``: a StepGrid is one module ``len(grid)`` times, a list is itself."""
    if isinstance(steps, StepGrid):
        return [(steps.step, len(steps))]
    return [(step, 1) for step in steps]


def _log_amplification(steps: Sequence[ReversibleStep]) -> float:
    """``-sum log |alpha|`` over the chain; raises if some ``alpha = 0`` (not invertible)."""
    log = 0.0
    for i, (step, repeats) in enumerate(_runs(steps)):
        for c in step.couplings():
            a = abs(_alpha_value(c.alpha))
            if a == 0.0:
                raise ValueError(
                    f"step {i} has a coupling with alpha = 0, which cannot be inverted (for a "
                    f"momentum step this is gamma = 0, a plain ResNet); use reversible=False"
                )
            if a != 1.0:
                log -= repeats * math.log(a)
    return log


def _check_invertible(steps: list[ReversibleStep]) -> None:
    _log_amplification(steps)


def predicted_amplification(steps: Sequence[ReversibleStep]) -> float:
    """``prod |alpha|^-1`` over the chain: the factor by which float reversal amplifies error."""
    return math.exp(min(_log_amplification(steps), 700.0))


def _warn_amplification(steps: list[ReversibleStep], dtype: torch.dtype) -> None:
    """Check invertibility and warn when float reversal is predicted to be untrustworthy."""
    amp = predicted_amplification(steps)
    err = torch.finfo(dtype).eps * amp
    if err > AMPLIFICATION_WARN:
        warnings.warn(
            f"float reversal of this chain amplifies rounding errors by prod(1/gamma) = "
            f"{amp:.3g}: with {dtype} (eps {torch.finfo(dtype).eps:.1e}) reconstructed "
            f"activations and gradients may be off by ~{err:.1e} relative or worse. "
            f"Use exact=True for bit-exact reconstruction.",
            ReconstructionWarning,
            stacklevel=4,
        )


# --------------------------------------------------------------------------------------------
# per-step caches

# Walking every step's module tree on every call costs as much as a tenth of a small network's
# forward pass, so the parameter list of each step is cached. Any parameter or submodule
# registered anywhere (assignment, ``register_parameter``, ``add_module``, ``load_state_dict(
# assign=True)``, parametrizations, pruning) bumps the generation and invalidates every entry.
# A removed parameter may linger in an entry; it then simply receives no gradient.
_generation = [0]
_step_params: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bump_generation(*_) -> None:
    _generation[0] += 1


nn.modules.module.register_module_parameter_registration_hook(_bump_generation)
nn.modules.module.register_module_module_registration_hook(_bump_generation)


def _per_generation(cache: weakref.WeakKeyDictionary, module: nn.Module, compute):
    """``compute(module)``, kept in ``cache`` until the registration generation changes."""
    entry = cache.get(module)
    if entry is None or entry[0] != _generation[0]:
        entry = (_generation[0], compute(module))
        cache[module] = entry
    return entry[1]


def _cached_parameters(step: ReversibleStep) -> list[torch.Tensor]:
    """``_parameters(step)``, cached until a parameter or module is registered anywhere."""
    # ``.to()`` under this flag replaces parameters without registering them
    if torch.__future__.get_overwrite_module_params_on_conversion():
        return _parameters(step)
    return _per_generation(_step_params, step, _parameters)


# --------------------------------------------------------------------------------------------
# faithful recomputation: RNG state and BatchNorm statistics


def _rng_devices(t: torch.Tensor) -> list[int]:
    return [t.device.index or 0] if t.device.type == "cuda" else []


def _get_rng(devices: list[int]) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


@contextmanager
def _replay_rng(saved: tuple | None, devices: list[int]):
    """Run the block with the RNG state ``saved`` and restore the caller's state after."""
    if saved is None:
        yield
        return
    with torch.random.fork_rng(devices=devices, enabled=True):
        torch.set_rng_state(saved[0])
        for d, s in zip(devices, saved[1]):
            torch.cuda.set_rng_state(s, d)
        yield


_norms: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _find_batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _batchnorms(module: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers inside ``module`` (cached like the parameter lists)."""
    return _per_generation(_norms, module, _find_batchnorms)


@contextmanager
def _frozen_batchnorm(module: nn.Module):
    """Use batch statistics as in training, but do not update the running statistics."""
    frozen = [m for m in _batchnorms(module) if m.training and m.track_running_stats]
    for m in frozen:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in frozen:
            m.track_running_stats = True


# --------------------------------------------------------------------------------------------
# bookkeeping of what receives gradients


def _parameters(module: nn.Module) -> list[torch.Tensor]:
    """``list(module.parameters())`` (duplicates included), without the generator overhead."""
    out, todo, seen = [], [module], set()
    while todo:
        m = todo.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.extend(p for p in m._parameters.values() if p is not None)
        todo.extend(c for c in m._modules.values() if c is not None)
    return out


def _grad_tensors(steps: list[ReversibleStep], args: tuple) -> tuple[list[torch.Tensor], list]:
    """Tensors that receive gradients: tensor args, parameters and tensor alphas of the steps.

    Returns the unique tensors and, per step, the indices (into that list) of those it uses.
    """
    tensors: list[torch.Tensor] = []
    index: dict[int, int] = {}

    def add(t: torch.Tensor) -> int:
        if id(t) not in index:
            index[id(t)] = len(tensors)
            tensors.append(t)
        return index[id(t)]

    arg_idx = [add(a) for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    per_step, seen = [], {}
    for step, repeats in _runs(steps):
        own = [add(p) for p in _cached_parameters(step) if p.requires_grad]
        for c in step.couplings():
            if isinstance(c.alpha, torch.Tensor) and c.alpha.requires_grad:
                own.append(add(c.alpha))
        own = arg_idx + sorted(set(own) - set(arg_idx))
        # a step used many times (weight tying, a StepGrid) shares one index list
        per_step.extend([seen.setdefault((id(step), tuple(own)), own)] * repeats)
    return tensors, per_step


_verified: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # step -> generation


def _check_closure(step: ReversibleStep, out: torch.Tensor, known: list[torch.Tensor]) -> None:
    """Raise if ``out`` depends on a trainable leaf the engine does not know about.

    Such a tensor (a parameter of a residual function that is not a submodule of the step,
    say) would silently receive no gradient in reversible mode.
    """
    if _verified.get(step) == _generation[0] or out.grad_fn is None:
        return
    stop = {id(t.grad_fn) for t in known if t.grad_fn is not None}
    known_ids = {id(t) for t in known}
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or id(fn) in seen or id(fn) in stop:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)
        if var is not None and id(var) not in known_ids:
            raise ValueError(
                f"a residual function of {type(step).__name__} uses a trainable tensor of shape "
                f"{tuple(var.shape)} that is neither a parameter of the step, nor an argument, "
                f"nor its alpha: in reversible mode it would receive no gradient. Register it "
                f"(make the function an nn.Module holding it) or use reversible=False."
            )
        todo.extend(f for f, _ in fn.next_functions)
    _verified[step] = _generation[0]


# --------------------------------------------------------------------------------------------
# the autograd function


class _Chain:
    """Everything about one call that is not a tensor input of the autograd function."""

    def __init__(self, steps, args, exact: tuple[FixedPoint, FixedPoint] | None, grad_index):
        self.steps = steps
        self.args = args
        self.exact = exact
        self.grad_index = grad_index
        self.buffer: InformationBuffer | None = None
        self.final: list[torch.Tensor] | None = None  # exact mode: the output pair as ints
        self.checksum: tuple[int, ...] | None = None  # exact mode: of the input pair
        self.rng: list[tuple | None] = []
        self.compiled: dict = {}  # exact mode: id(step) -> its compiled couplings


def _rng_signature(state: tuple) -> tuple:
    """A cheap fingerprint of an RNG state: any draw changes it.

    The CPU generator's serialized state starts with its position and seed and ends with the
    cached normal sample; the first words of the Mersenne-twister array change at every
    regeneration. The 16-byte CUDA states are taken whole.
    """
    cpu = state[0].numpy()
    return (cpu[:64].tobytes(), cpu[-64:].tobytes(), *(c.numpy().tobytes() for c in state[1]))


class _RngRecorder:
    """Keeps the RNG state before each step that drew random numbers (``None`` elsewhere).

    Holds at most one other state at a time, so its memory does not grow with depth.
    """

    def __init__(self, devices: list[int]):
        self.devices = devices
        self.before = _get_rng(devices)
        self.signature = _rng_signature(self.before)
        self.states: list[tuple | None] = []

    def step_done(self) -> None:
        after = _get_rng(self.devices)
        signature = _rng_signature(after)
        self.states.append(None if signature == self.signature else self.before)
        self.before, self.signature = after, signature


def _forward_float(chain: _Chain, s: list[torch.Tensor], args: tuple, devices) -> list:
    rng = _RngRecorder(devices)
    for step in chain.steps:
        for c in step.couplings():
            s[c.target] = coupling_update(c, s, args)
        if step.swap:
            s = [s[1], s[0]]
        rng.step_done()
    chain.rng = rng.states
    return s


class _ExactCoupling(NamedTuple):
    """A coupling with what exact mode needs precomputed once per call (not once per step)."""

    c: Coupling
    t: int
    o: int
    mult: tuple[int, int, int] | None  # alpha = sign n / d; None when alpha = 1
    a: float
    alpha_grad: bool
    shift: float  # exact multiple of q[o] added to q[t] (0: none)
    shift_rounded: float  # multiple of q[o] rounded onto the grid of q[t] (0: none)


def _exact_couplings(step: ReversibleStep, fps, cache: dict) -> list[_ExactCoupling]:
    """``step.couplings()`` compiled for fixed point, cached in ``cache`` (the chain's: the
    backward pass and ``reverse`` then use the very multipliers of the forward pass).

    A shift from a slot with ``k`` more fractional bits than the target is rounded onto the
    target's grid: an additive term that is a deterministic function of ``s[o]``, so the
    coupling stays exactly invertible."""
    out = cache.get(id(step))
    if out is None:
        out = []
        for c in step.couplings():
            t, o = c.target, 1 - c.target
            a = _alpha_value(c.alpha)
            shift = rounded = 0.0
            if c.shift:
                k = fps[t].frac_bits - fps[o].frac_bits
                if k >= 0:
                    shift = c.shift * 2**k
                else:
                    rounded = c.shift * 2.0**k
            alpha_grad = isinstance(c.alpha, torch.Tensor) and c.alpha.requires_grad
            mult = None if a == 1.0 else rational(a)
            out.append(_ExactCoupling(c, t, o, mult, a, alpha_grad, shift, rounded))
        cache[id(step)] = out
    return out


def _forward_exact(chain: _Chain, q: list[torch.Tensor], args: tuple, dtype, devices) -> list:
    """The couplings on fixed-point integers (``q`` is overwritten: nothing else holds it)."""
    fps, buf = chain.exact, chain.buffer
    rng = _RngRecorder(devices)
    for step in chain.steps:
        couplings = _exact_couplings(step, fps, chain.compiled)
        for e in couplings:
            t, o = e.t, e.o
            new = buf.scale(q[t], *e.mult) if e.mult is not None else q[t]
            if e.shift:
                new = torch.add(new, q[o], alpha=e.shift)
            elif e.shift_rounded:
                new = torch.add(new, torch.mul(q[o], e.shift_rounded).round_())
            if e.c.phi is not None:
                other = fps[o].decode(q[o], dtype)
                p = _check_phi_output(e.c.phi(other, *args), other)
                del other
                # quantized unchecked: a huge or non-finite p makes the new state fail the check
                if new is q[t]:
                    new = torch.add(new, fps[t].quantize(p))
                else:  # a fresh tensor of this step: added in place
                    new = new.add_(fps[t].quantize(p))
                del p
            q[t] = new
        for e in couplings:  # |q| < 2^STATE_BITS after every step; within one, sums stay exact
            fps[e.t].check(q[e.t])
        if step.swap:
            q = [q[1], q[0]]
        rng.step_done()
    chain.rng = rng.states
    return q


def _checksum(q: list[torch.Tensor]) -> tuple[int, ...]:
    """Two wrapping int64 sums per tensor: enough to tell a drifted reconstruction."""
    q = [x.to(torch.int64) for x in q]
    return tuple(int(v) for x in q for v in (x.sum(), (x * x).sum()))


def _verify_reconstruction(chain: _Chain, q: list[torch.Tensor]) -> None:
    if _checksum(q) != chain.checksum:
        raise RuntimeError(
            "exact reconstruction did not return to the forward's input: a residual function "
            "gave different outputs for the same input bits in the forward and backward passes "
            "(a non-deterministic kernel, or hidden state). Gradients would be wrong. On a GPU, "
            "call torch.use_deterministic_algorithms(True); make stateful functions pure."
        )


class _ReversibleFunction(torch.autograd.Function):
    """Inputs: the chain, the state pair and the grad-receiving tensors (``_grad_tensors``)."""

    @staticmethod
    def forward(ctx, chain: _Chain, s0, s1, *tensors):
        devices = _rng_devices(s0)
        dtype = s0.dtype
        if chain.exact is None:
            out = _forward_float(chain, [s0, s1], chain.args, devices)
            out = [o.clone() if o is s0 or o is s1 else o for o in out]
            ctx.save_for_backward(*out)
        else:
            fps = chain.exact
            q = [fps[0].encode(s0, "s0"), fps[1].encode(s1, "s1")]
            chain.checksum = _checksum(q)
            chain.buffer = InformationBuffer(s0.shape, s0.device)
            q = _forward_exact(chain, q, chain.args, dtype, devices)
            chain.final = q
            ctx.save_for_backward(*q)
            out = [fps[0].decode(q[0], dtype), fps[1].decode(q[1], dtype)]
        ctx.chain, ctx.tensors, ctx.dtype, ctx.devices = chain, tensors, dtype, devices
        return out[0], out[1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g0, g1):
        chain, dtype, devices = ctx.chain, ctx.dtype, ctx.devices
        exact = chain.exact
        buf = chain.buffer.reader() if exact is not None else None
        s = list(ctx.saved_tensors)  # never modified in place: each update makes a new tensor
        shape, device = ctx.saved_tensors[0].shape, ctx.saved_tensors[0].device
        g = [
            g0 if g0 is not None else torch.zeros(shape, dtype=dtype, device=device),
            g1 if g1 is not None else torch.zeros(shape, dtype=dtype, device=device),
        ]
        # Tensor args become fresh leaves, so that each VJP stops at them.
        leaves = {}
        args = []
        for a in chain.args:
            if isinstance(a, torch.Tensor):
                leaves[id(a)] = a.detach().requires_grad_(a.requires_grad)
                a = leaves[id(a)]
            args.append(a)
        args = tuple(args)
        tensors = [leaves.get(id(t), t) for t in ctx.tensors]
        grads: list[torch.Tensor | None] = [None] * len(tensors)
        for i in range(len(chain.steps) - 1, -1, -1):
            step, rng, idx = chain.steps[i], chain.rng[i], chain.grad_index[i]
            if step.swap:
                s, g = [s[1], s[0]], [g[1], g[0]]
            inputs = [tensors[j] for j in idx]
            if exact is None:
                couple, couplings = _backward_coupling, step.couplings()
            else:
                couple = _backward_coupling_exact
                couplings = _exact_couplings(step, exact, chain.compiled)
            if rng is None and not _batchnorms(step):
                for c in reversed(couplings):
                    couple(step, c, s, g, args, inputs, idx, grads, exact, buf, dtype)
                continue
            with _replay_rng(rng, devices), _frozen_batchnorm(step):
                for c in reversed(couplings):
                    couple(step, c, s, g, args, inputs, idx, grads, exact, buf, dtype)
        if exact is not None:
            _verify_reconstruction(chain, s)
        return (None, g[0], g[1], *grads)


def _backward_coupling(step, c, s, g, args, inputs, idx, grads, exact, buf, dtype):
    """Reconstruct the target slot before coupling ``c`` and propagate gradients through it
    (float mode)."""
    t, o = c.target, 1 - c.target
    a = _alpha_value(c.alpha)
    alpha_grad = isinstance(c.alpha, torch.Tensor) and c.alpha.requires_grad
    if c.phi is None and not alpha_grad:
        # s[t] <- a s[t] + shift s[o]: linear, no autograd needed.
        prev = torch.sub(s[t], s[o], alpha=c.shift) if c.shift else s[t]
        s[t] = prev / a if a != 1.0 else prev
        _linear_grads(c, g, t, o, a)
        return
    other = s[o].detach().requires_grad_(True)
    with torch.enable_grad():
        p = c.phi(other, *args) if c.phi is not None else None
    if p is not None:
        _check_closure(step, p, [other, *inputs])
    if alpha_grad:  # the gradient of alpha needs the reconstructed state
        s[t] = _reconstruct_float(c, s, t, o, a, p)
        _vjp(c, g, t, o, a, p, s[t], other, inputs, idx, grads, alpha_grad)
        return
    # Back-propagate first, so that phi's graph is freed before the reconstruction allocates.
    values = p.detach()
    _vjp(c, g, t, o, a, p, None, other, inputs, idx, grads, alpha_grad)
    del p
    s[t] = _reconstruct_float(c, s, t, o, a, values)


def _reconstruct_float(c, s, t, o, a, p) -> torch.Tensor:
    """``(s[t] - shift s[o] - p) / alpha``, in that order of operations, in one fresh tensor."""
    prev = torch.sub(s[t], s[o], alpha=c.shift) if c.shift else None
    if p is not None:
        prev = torch.sub(s[t], p.detach()) if prev is None else prev.sub_(p.detach())
    if prev is None:
        return s[t] / a if a != 1.0 else s[t]
    return prev.div_(a) if a != 1.0 else prev


def _backward_coupling_exact(step, e, s, g, args, inputs, idx, grads, fps, buf, dtype):
    """As :func:`_backward_coupling` on fixed-point integers (``e`` a compiled coupling): the
    reconstruction pops the information buffer and is bit-identical to the forward state."""
    t, o, c = e.t, e.o, e.c
    q = s[t]  # saved by the forward for the first step: never modified in place
    if e.shift:
        q = torch.sub(q, s[o], alpha=e.shift)
    elif e.shift_rounded:
        q = torch.sub(q, torch.mul(s[o], e.shift_rounded).round_())
    if c.phi is None and not e.alpha_grad:
        s[t] = buf.unscale(q, *e.mult) if e.mult is not None else q
        _linear_grads(c, g, t, o, e.a)
        return
    fresh = q is not s[t]  # a tensor of this call alone, free to overwrite
    other = fps[o].decode(s[o], dtype).requires_grad_(True)
    p = None
    if c.phi is not None:
        with torch.enable_grad():
            p = c.phi(other, *args)
        _check_closure(step, p, [other, *inputs])
        q = q.sub_(fps[t].quantize(p)) if fresh else torch.sub(q, fps[t].quantize(p))
        fresh = True
    if not e.alpha_grad:
        # Back-propagate first, so that phi's graph is freed before the unscaling allocates.
        _vjp(c, g, t, o, e.a, p, None, other, inputs, idx, grads, False)
        del p, other
        s[t] = buf.unscale(q, *e.mult, overwrite=fresh) if e.mult is not None else q
        return
    s[t] = buf.unscale(q, *e.mult, overwrite=fresh) if e.mult is not None else q
    prev = fps[t].decode(s[t], dtype)
    _vjp(c, g, t, o, e.a, p, prev, other, inputs, idx, grads, e.alpha_grad)


try:  # the engine call behind torch.autograd.grad, without its argument checks
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # pragma: no cover - other torch versions
    _engine_run_backward = None


def _grad(outputs: list, inputs: list, grad_outputs: list) -> tuple:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)``.

    Called once per layer with arguments that are correct by construction (each grad output
    has its output's shape and dtype), so the public wrapper's validation, about 15 us per
    call and 2% of a reversible backward pass, is skipped where torch exposes the engine call.
    """
    if _engine_run_backward is None:  # pragma: no cover
        return torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
    return _engine_run_backward(
        tuple(outputs), tuple(grad_outputs), False, False, tuple(inputs), True,
        accumulate_grad=False,
    )


def _linear_grads(c, g, t, o, a) -> None:
    """Gradients through ``s[t] <- a s[t] + shift s[o]`` (constant ``a``)."""
    if c.shift:
        g[o] = torch.add(g[o], g[t], alpha=c.shift)
    if a != 1.0:
        g[t] = a * g[t]


def _vjp(c, g, t, o, a, p, prev, other, inputs, idx, grads, alpha_grad) -> None:
    """Vector-Jacobian product: d/d(other, inputs, alpha) of ``<g_t, alpha prev + phi(other)>``
    (plus the linear shift term), accumulated into ``g`` and ``grads``."""
    gt = g[t]
    outputs, grad_outputs = [], []
    if p is not None:
        outputs.append(p)
        grad_outputs.append(gt)
    if alpha_grad:
        outputs.append(c.alpha)
        grad_outputs.append((prev * gt).sum().reshape(c.alpha.shape).to(c.alpha.dtype))
    vjp = _grad(outputs, [other, *inputs], grad_outputs)
    if c.shift:
        g[o] = torch.add(g[o], gt, alpha=c.shift)
    if vjp[0] is not None:
        g[o] = g[o] + vjp[0]
    _accumulate(grads, idx, vjp[1:])
    g[t] = a * gt if a != 1.0 else gt


def _accumulate(grads: list, idx: list[int], new: Sequence[torch.Tensor | None]) -> None:
    """``grads[j] += new_k`` for ``j = idx[k]`` (``None``: no gradient), the additions of
    tensors already seen in one foreach call (the same parameters come back every step)."""
    add_to, add = [], []
    for j, v in zip(idx, new):
        if v is None:
            continue
        if grads[j] is None:
            grads[j] = v
        else:
            add_to.append(j)
            add.append(v)
    if add_to:
        sums = torch._foreach_add([grads[j] for j in add_to], add)
        for j, total in zip(add_to, sums):
            grads[j] = total


# --------------------------------------------------------------------------------------------
# the exact buffer of returned outputs, so that ``reverse`` can undo an exact forward


_buffers: dict[int, tuple] = {}


def _remember(out: State, chain: _Chain) -> None:
    key = id(out[0])
    ref0 = weakref.ref(out[0], lambda _: _buffers.pop(key, None))
    _buffers[key] = (ref0, weakref.ref(out[1]), out[0]._version, out[1]._version, chain)


def information_buffer(s0: torch.Tensor, s1: torch.Tensor) -> _Chain | None:
    """The exact-mode record of an output pair of :func:`integrate`, or ``None``.

    Its ``buffer`` is the :class:`~mode.exact.InformationBuffer` and ``final`` the output pair
    in fixed point.
    """
    entry = _buffers.get(id(s0))
    if entry is None:
        return None
    ref0, ref1, v0, v1, chain = entry
    if ref0() is not s0 or ref1() is not s1:
        return None
    if s0._version != v0 or s1._version != v1:
        raise ValueError("the outputs of an exact forward were modified in place; cannot invert")
    return chain


# --------------------------------------------------------------------------------------------
# public entry points


def _fixed_points(frac_bits: int | tuple[int, int]) -> tuple[FixedPoint, FixedPoint]:
    if isinstance(frac_bits, tuple | list):
        if len(frac_bits) != 2:
            raise ValueError(f"frac_bits must be an int or a pair of ints, got {frac_bits!r}")
        return FixedPoint(frac_bits[0]), FixedPoint(frac_bits[1])
    fp = FixedPoint(frac_bits)
    return fp, fp


def integrate(
    steps: Sequence[ReversibleStep],
    state: State,
    args: tuple = (),
    *,
    reversible: bool = True,
    exact: bool = False,
    frac_bits: int = DEFAULT_FRAC_BITS,
) -> State:
    """Run ``steps`` on ``state = (s0, s1)``; return the final pair.

    Parameters
    ----------
    steps : sequence of ReversibleStep
        The chain, applied in order.
    state : (Tensor, Tensor)
        Two floating tensors of the same shape ``(*, ...)``.
    args : tuple
        Extra positional arguments for every residual function; tensor arguments receive
        gradients.
    reversible : bool
        ``False``: plain autograd (stores activations). ``True``: store nothing, reconstruct
        in backward (memory independent of ``len(steps)``).
    exact : bool
        Hold the state in fixed point with ``frac_bits`` fractional bits and an
        information buffer: reconstruction is bit-exact. Requires ``reversible=True``.
    frac_bits : int or (int, int)
        Fractional bits of ``s0`` and ``s1`` (one int: both). A slot whose values are much
        smaller than the other's (a velocity ``v = h u`` with a small step ``h``) keeps more
        digits with more bits; a shift from it onto a slot with fewer bits is rounded there.
    """
    steps = _check_steps(steps)
    s0, s1 = _check_state(state)
    args = tuple(args)
    if not reversible:
        if exact:
            raise ValueError(
                "exact=True needs reversible=True: exact arithmetic serves reconstruction, "
                "which only the reversible engine performs"
            )
        s = (s0, s1)
        for step in steps:
            s = apply_step(step, s, args)
        return s
    if exact:
        _check_invertible(steps)
    else:
        _warn_amplification(steps, s0.dtype)
    fp = _fixed_points(frac_bits) if exact else None
    tensors, grad_index = _grad_tensors(steps, args)
    chain = _Chain(steps, args, fp, grad_index)
    out = _ReversibleFunction.apply(chain, s0, s1, *tensors)
    if exact:
        _remember(out, chain)
    return out


def reverse(
    steps: Sequence[ReversibleStep], state: State, args: tuple = (), *, exact: bool = False
) -> State:
    """Invert the chain: from the final pair, recover the initial one (no gradients).

    In exact mode ``state`` must be the very output pair of an exact :func:`integrate` call,
    whose information buffer the engine remembers; the recovered pair is bit-identical to the
    input of that call (in the fixed-point representation).
    """
    steps = _check_steps(steps)
    s0, s1 = _check_state(state)
    args = tuple(args)
    _check_invertible(steps)
    if not exact:
        s = (s0, s1)
        with torch.no_grad():
            for step in reversed(steps):
                with _frozen_batchnorm(step):
                    s = invert_step(step, s, args)
        return s
    chain = information_buffer(s0, s1)
    if chain is None:
        raise ValueError(
            "exact inversion needs the information buffer of the exact forward that produced "
            "this state: pass the very tensors returned by the forward (not copies)"
        )
    fps, buf, dtype = chain.exact, chain.buffer.reader(), s0.dtype
    q = list(chain.final)  # the decoded floats may hold fewer bits than the fixed point
    with torch.no_grad():
        for step in reversed(steps):
            if step.swap:
                q = [q[1], q[0]]
            with _frozen_batchnorm(step):
                for e in reversed(_exact_couplings(step, fps, chain.compiled)):
                    t, o = e.t, e.o
                    new = q[t]
                    if e.shift:
                        new = torch.sub(new, q[o], alpha=e.shift)
                    elif e.shift_rounded:
                        new = torch.sub(new, torch.mul(q[o], e.shift_rounded).round_())
                    if e.c.phi is not None:
                        p = e.c.phi(fps[o].decode(q[o], dtype), *args)
                        new = new - fps[t].quantize(p)
                    q[t] = buf.unscale(new, *e.mult) if e.mult is not None else new
    _verify_reconstruction(chain, q)
    return fps[0].decode(q[0], dtype), fps[1].decode(q[1], dtype)


def trajectory(steps: Sequence[ReversibleStep], state: State, args: tuple = ()) -> list[State]:
    """All intermediate pairs ``[s_0, s_1, ..., s_N]`` (plain autograd, for plots)."""
    steps = _check_steps(steps)
    s = _check_state(state)
    out = [s]
    for step in steps:
        s = apply_step(step, s, tuple(args))
        out.append(s)
    return out
