"""The depth-independent-memory backprop engine over a chain of reversible steps.

``integrate(steps, (s0, s1), args)`` runs the couplings of every step (``mode.steps``). With
``reversible=True`` the forward pass stores no activations: the backward pass walks the chain
in reverse and, for every coupling ``s[t] <- alpha s[t] + shift s[o] + phi(s[o])``,

1. evaluates ``p = phi(s[o])`` once, with autograd recording,
2. reconstructs ``s[t] <- (s[t] - shift s[o] - p) / alpha`` from the detached ``p``,
3. back-propagates the incoming gradient through ``p`` (and ``alpha``).

That is one extra evaluation of each residual function in total, and memory that does not
depend on depth. With ``exact=True`` the states are held in fixed point (:mod:`mode.exact`), so
the reconstructed states are bit-identical to the forward ones at any depth; in float mode
reconstruction error grows like ``prod |alpha|^-1`` and the engine warns when that makes
gradients untrustworthy.

**One immutable plan per call** (DESIGN.md section 5). The forward compiles everything the
backward and :func:`reverse` read into a :class:`Plan`: the couplings of every step with their
coefficients, the parameters the forward read (the tensors themselves, so ``functional_call``
fast weights are honoured) and the versions of every tensor it read, the training flags of the
modules, the RNG state before every step that drew random numbers, the buffers before every
step that changed them (BatchNorm, InstanceNorm, spectral_norm's vectors, a user's EMA) and
the autocast state. The backward installs the forward's parameters as detached leaves, so
parameter hooks fire once on the total gradient; it replays RNG, buffers and autocast, so the
recomputation sees what the forward saw, and it leaves every module as autograd would. Nothing
is cached on user objects and no process-wide hook is installed.

**Memory of the backward.** The chain is one autograd node followed by a small
:class:`_Handoff` node that saves what the backward reads from the forward (the output pair, or
in exact mode the fixed-point pair and the information buffer, its open words stored in the
narrowest exact format). Autograd runs and frees the handoff node first, so while the chain's
backward runs it holds one state pair and one gradient pair, not the outputs and the incoming
gradients beside them: the gradients are the backward's own (cloned once) and updated in place,
states it made are reconstructed in place, and each coupling runs its VJP before the
reconstruction's temporaries exist. ``retain_graph=True`` keeps the handoff's saved tensors for
another backward, as autograd keeps any.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import warnings
import weakref
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from . import fused, traced
from .exact import (
    DEFAULT_FRAC_BITS,
    MAX_FRAC_BITS,
    FixedPoint,
    InformationBuffer,
    rational,
    shift_limit,
    shift_overflow,
)
from .steps import (
    Coupling,
    ReversibleStep,
    State,
    StepGrid,
    _alpha_value,
    coupling_update,
    invert_coupling,
    scaled_phi,
)

__all__ = [
    "integrate",
    "reverse",
    "trajectory",
    "information_buffer",
    "predicted_amplification",
    "Strategy",
    "strategy",
    "adjoint_strategy",
    "default_frac_bits",
    "fixed_point_storage",
    "fixed_points",
    "compiled_function",
    "Plan",
    "ReconstructionWarning",
    "AMPLIFICATION_WARN",
]

# Warn in float mode when eps(dtype) * prod |alpha|^-1 exceeds this relative error.
AMPLIFICATION_WARN = 1e-3

#: Default fractional bits of exact mode for float64 states, held in int64: float64 gradients
#: then match float64 autograd to about 1e-11 at depth 512 (benchmarks/bench_exact_precision.py),
#: for a range |state| < 2^(60 - 48) = 4096.
DEFAULT_FRAC_BITS_FLOAT64 = 48


class ReconstructionWarning(UserWarning):
    """Float reversal is predicted to amplify rounding errors beyond trust."""


# --------------------------------------------------------------------------------------------
# the gradient strategy: one vocabulary for the networks and odeint


class Strategy(NamedTuple):
    """How gradients are computed: plain autograd (``reversible=False``), float reconstruction
    (``reversible=True``) or bit-exact fixed-point reconstruction (``exact=True``).
    ``frac_bits`` (exact mode only) is ``None`` (by dtype: :func:`default_frac_bits`), an int,
    or a pair ``(bits of s0, bits of s1)``."""

    reversible: bool
    exact: bool
    frac_bits: int | tuple[int, int] | None = None

    @property
    def name(self) -> str:
        return "exact" if self.exact else ("float" if self.reversible else "autograd")


def _check_frac_bits(frac_bits, name: str = "frac_bits"):
    if frac_bits is None:
        return None
    bits = tuple(frac_bits) if isinstance(frac_bits, tuple | list) else (frac_bits,)
    if len(bits) not in (1, 2):
        raise ValueError(f"{name} must be an int or a pair of ints, got {frac_bits!r}")
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"{name} must be an int or a pair of ints, got {frac_bits!r}")
        if not 8 <= b <= MAX_FRAC_BITS:
            raise ValueError(f"{name} must lie in [8, {MAX_FRAC_BITS}], got {frac_bits!r}")
    return bits[0] if len(bits) == 1 else bits


def strategy(reversible: bool = True, exact: bool = False, frac_bits=None) -> Strategy:
    """The one validation of the gradient flags of every network and of :func:`integrate`."""
    for name, flag in (("reversible", reversible), ("exact", exact)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if exact and not reversible:
        raise ValueError(
            "exact=True needs reversible=True: exact arithmetic serves reconstruction, which "
            "only the reversible engine performs"
        )
    frac_bits = _check_frac_bits(frac_bits)
    if frac_bits is not None and not exact:
        raise ValueError(
            f"frac_bits={frac_bits!r} sets the fixed point of exact mode; it has no meaning "
            f"without exact=True"
        )
    return Strategy(reversible, exact, frac_bits)


#: ``odeint``'s ``adjoint`` flag in the vocabulary of :class:`Strategy`.
ADJOINT_STRATEGIES = {False: (False, False), True: (True, False), "reversible": (True, True)}


def adjoint_strategy(adjoint, frac_bits=None) -> Strategy:
    """``odeint(adjoint=...)``: ``False`` autograd, ``True`` float reconstruction,
    ``"reversible"`` exact reconstruction, as a :class:`Strategy`."""
    for key, (reversible, exact) in ADJOINT_STRATEGIES.items():
        if adjoint is key or (isinstance(key, str) and isinstance(adjoint, str) and adjoint == key):
            if frac_bits is not None and not exact:
                raise ValueError(
                    f"frac_bits sets the fixed point of adjoint='reversible'; it has no meaning "
                    f"with adjoint={adjoint!r}"
                )
            return Strategy(reversible, exact, _check_frac_bits(frac_bits))
    raise ValueError(f"adjoint must be False, True or 'reversible', got {adjoint!r}")


def fixed_point_storage(dtype: torch.dtype) -> torch.dtype:
    """How exact mode holds the fixed-point integers of ``dtype`` states: int64 for float64
    (room for float64's resolution and a range), float64 otherwise (faster on CPUs)."""
    return torch.int64 if dtype == torch.float64 else torch.float64


def default_frac_bits(dtype: torch.dtype) -> int:
    """Fractional bits of exact mode by state dtype: float64 48 (int64 storage, range
    ``|s| < 4096``, float64 round-off in the gradients), float32, float16 and bfloat16 32
    (float64 storage, range ``|s| < 16384``, below the resolution of those formats)."""
    return DEFAULT_FRAC_BITS_FLOAT64 if dtype == torch.float64 else DEFAULT_FRAC_BITS


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
        if not isinstance(step.swap, bool):  # ("False" would swap)
            raise TypeError(f"steps[{i}].swap must be a bool, got {step.swap!r}")
    return steps


def _refuse_functorch(tensors) -> None:
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    if active is not None and active():
        raise RuntimeError(
            "torch.func transforms (grad, vjp, jacrev, vmap, ...) cannot run through the "
            "reversible engine, whose backward is a hand-written reconstruction; build the "
            "network with reversible=False to use them"
        )


def _refuse_forward_ad(tensors) -> None:
    """Refuse dual tensors (forward-mode AD): the chain's node has no jvp, and a tangent on a
    parameter would be dropped silently (only tensors that require grad enter the node)."""
    level = getattr(torch.autograd.forward_ad, "_current_level", -1)
    if level < 0:
        return
    unpack = torch.autograd.forward_ad.unpack_dual
    if any(isinstance(t, torch.Tensor) and unpack(t).tangent is not None for t in tensors):
        raise RuntimeError(
            "forward-mode AD (dual tensors, torch.autograd.forward_ad, jacobian with "
            "strategy='forward-mode') cannot run through the reversible engine, whose "
            "derivative is a hand-written reverse-mode reconstruction; build the network with "
            "reversible=False to use it")


def _refuse_batched(*grads) -> None:
    """Refuse batched gradients (``is_grads_batched=True``, ``jacobian(vectorize=True)``):
    the backward updates gradients in place, which vmap cannot batch."""
    ft = torch._C._functorch
    tests = [getattr(ft, n) for n in ("is_batchedtensor", "is_legacy_batchedtensor")
             if hasattr(ft, n)]
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    if (active is not None and active()) or any(
            g is not None and test(g) for g in grads for test in tests):
        raise RuntimeError(
            "batched gradients (torch.autograd.grad(..., is_grads_batched=True), "
            "jacobian(vectorize=True)) cannot run through the reversible engine's backward; "
            "loop over the grad outputs, or build the network with reversible=False")


def _step_couplings(steps) -> list[tuple[Coupling, ...]] | None:
    """The couplings of every step of a list, captured now (a grid makes its own per time)."""
    if isinstance(steps, StepGrid):
        return None
    return [tuple(step.couplings()) for step in steps]


def _runs(steps, couplings) -> list[tuple[Sequence[Coupling], int]]:
    """``(couplings, repeats)``: a grid's couplings at its first time, ``len`` times."""
    if couplings is None:
        return [(steps.couplings(0), len(steps))]
    return [(c, 1) for c in couplings]


def _log_amplification(runs) -> float:
    """``-sum log |alpha|`` over the chain; raises if some ``alpha = 0`` (not invertible)."""
    log = 0.0
    for i, (couplings, repeats) in enumerate(runs):
        for c in couplings:
            a = abs(_alpha_value(c.alpha))
            if a == 0.0:
                raise ValueError(
                    f"step {i} has a coupling with alpha = 0, which cannot be inverted (for a "
                    f"momentum step this is gamma = 0, a plain ResNet); use reversible=False"
                )
            if a != 1.0:
                log -= repeats * math.log(a)
    return log


def predicted_amplification(steps: Sequence[ReversibleStep]) -> float:
    """``prod |alpha|^-1`` over the chain: the factor by which float reversal amplifies error."""
    steps = _check_steps(steps)
    return math.exp(min(_log_amplification(_runs(steps, _step_couplings(steps))), 700.0))


def _warn_amplification(runs, dtype: torch.dtype) -> None:
    """Check invertibility and warn when float reversal is predicted to be untrustworthy."""
    amp = math.exp(min(_log_amplification(runs), 700.0))
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
# what a step reads: its modules, parameters and buffers, walked at every call


class _Reads(NamedTuple):
    """The module tree of one step: its modules, ``(module, name, tensor)`` of every
    parameter and ``(module, name)`` of every buffer."""

    modules: tuple[nn.Module, ...]
    params: tuple[tuple[nn.Module, str, torch.Tensor], ...]
    buffers: tuple[tuple[nn.Module, str], ...]


def _walk(step: nn.Module) -> _Reads:
    modules, params, buffers, seen, todo = [], [], [], set(), [step]
    while todo:
        m = todo.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        modules.append(m)
        for name, p in m._parameters.items():
            if p is not None:
                params.append((m, name, p))
        for name, b in m._buffers.items():
            if b is not None:
                buffers.append((m, name))
        todo.extend(c for c in m._modules.values() if c is not None)
    return _Reads(tuple(modules), tuple(params), tuple(buffers))


def _hook_signature(modules) -> tuple:
    """The module hooks that run around the steps' functions: the handles' ids (unique, never
    reused) of every forward, forward pre, backward and backward pre hook of ``modules`` and
    of those registered for every module. The recomputation must run the forward's hooks."""
    from torch.nn.modules import module as m

    hooks = [tuple(d) for d in (m._global_forward_pre_hooks, m._global_forward_hooks,
                                m._global_backward_pre_hooks, m._global_backward_hooks)]
    for q in modules:
        for d in (q._forward_pre_hooks, q._forward_hooks, q._backward_pre_hooks,
                  q._backward_hooks):
            if d:
                hooks.append((id(q), tuple(d)))
    return tuple(hooks)


def _versions(tensors) -> tuple[int, ...] | None:
    if torch.is_inference_mode_enabled():  # no backward can follow; inference tensors have none
        return None
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:  # an inference tensor outside inference mode
        return None


# --------------------------------------------------------------------------------------------
# faithful recomputation: RNG, autocast, buffers, training flags


def _rng_devices(t: torch.Tensor) -> list[int]:
    return [t.device.index or 0] if t.device.type == "cuda" else []


def _get_rng(devices: list[int]) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _rng_signature(state: tuple) -> tuple:
    """A cheap fingerprint of an RNG state: any draw changes it.

    The CPU generator's serialized state starts with its position and seed and ends with the
    cached normal sample; the first words of the Mersenne-twister array change at every
    regeneration. The 16-byte CUDA states are taken whole.
    """
    cpu = state[0].numpy()
    return (cpu[:64].tobytes(), cpu[-64:].tobytes(), *(c.numpy().tobytes() for c in state[1]))


class _RngRecorder:
    """The RNG states before each coupling that drew random numbers (``None`` elsewhere).

    Each coupling only copies the generators' states (a few microseconds, no comparison);
    :meth:`finish` compares consecutive states in one vectorized pass and keeps those before a
    coupling that drew. The copies (about 5 KB each on the CPU) live during the forward only;
    what the plan keeps does not grow with depth unless the couplings draw.
    """

    def __init__(self, devices: list[int]):
        self.devices = devices
        self.cpu = [torch.get_rng_state()]
        self.cuda = [[torch.cuda.get_rng_state(d) for d in devices]]

    def step_done(self) -> None:
        self.cpu.append(torch.get_rng_state())
        if self.devices:
            self.cuda.append([torch.cuda.get_rng_state(d) for d in self.devices])

    def finish(self) -> list[tuple | None]:
        n = len(self.cpu) - 1
        if n == 0:
            return []
        cpu = torch.stack(self.cpu)
        drew = (cpu[1:] != cpu[:-1]).any(1)
        for k in range(len(self.devices)):
            cuda = torch.stack([states[k] for states in self.cuda])
            drew |= (cuda[1:] != cuda[:-1]).any(1)
        drew = drew.tolist()
        return [(self.cpu[i], self.cuda[i] if self.devices else []) if drew[i] else None
                for i in range(n)]


@contextlib.contextmanager
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


def _autocast_state(device_type: str) -> tuple:
    kinds = [device_type] if device_type == "cpu" else [device_type, "cpu"]
    return tuple(
        (k, torch.is_autocast_enabled(k), torch.get_autocast_dtype(k)) for k in kinds
    ), torch.is_autocast_cache_enabled()


@contextlib.contextmanager
def _replay_autocast(state: tuple):
    """Autocast exactly as the forward had it (on or off, same dtype), as checkpoint does."""
    kinds, cache = state
    with contextlib.ExitStack() as stack:
        for kind, enabled, dtype in kinds:
            if enabled or torch.is_autocast_enabled(kind):
                stack.enter_context(
                    torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=cache)
                )
        yield


class _Snapshot(NamedTuple):
    """The buffers of one step use that its forward changed: ``(module, name, value before)``."""

    entries: tuple[tuple[nn.Module, str, torch.Tensor], ...]


def _snapshot_before(reads: _Reads) -> list[tuple[nn.Module, str, torch.Tensor, int, torch.Tensor]]:
    """Every buffer of the step with its identity, version and a copy, before the step runs."""
    out = []
    for m, name in reads.buffers:
        b = m._buffers[name]
        if b is None:
            continue
        out.append((m, name, b, b._version, b.clone()))
    return out


def _changed(m: nn.Module, name: str, b: torch.Tensor, version: int, copy: torch.Tensor) -> bool:
    """Whether the step replaced or modified a buffer. Its values are compared too: some
    kernels (BatchNorm's running statistics) write in place without bumping the version."""
    now = m._buffers.get(name)
    return now is not b or b._version != version or not torch.equal(b, copy)


def _snapshot_after(before) -> _Snapshot | None:
    """Keep the copies of the buffers that the step replaced or modified in place."""
    changed = tuple(
        (m, name, copy) for m, name, b, v, copy in before if _changed(m, name, b, v, copy)
    )
    return _Snapshot(changed) if changed else None


@contextlib.contextmanager
def _replay_buffers(snapshot: _Snapshot | None, reads: _Reads, isolate: bool):
    """Run the block with the buffers the forward step saw; leave the module's own as they are.

    The forward's values are installed as fresh copies (the snapshot itself is never written),
    and the module's buffers are put back after. With ``isolate`` every other buffer of the step
    is also replaced by a copy, so that the block cannot change the module's state.
    """
    saved, installed = [], set()
    entries = snapshot.entries if snapshot is not None else ()
    try:
        for m, name, value in entries:
            saved.append((m, name, m._buffers[name]))
            m._buffers[name] = value.clone()
            installed.add((id(m), name))
        if isolate:
            for m, name in reads.buffers:
                b = m._buffers[name]
                if b is not None and (id(m), name) not in installed:
                    saved.append((m, name, b))
                    m._buffers[name] = b.clone()
        yield
    finally:
        for m, name, b in reversed(saved):
            m._buffers[name] = b


@contextlib.contextmanager
def _installed(plan: Plan, leaves: dict[int, torch.Tensor]):
    """The modules as the forward saw them: its parameters (as ``leaves``, or detached) and
    training flags; everything is put back after."""
    saved = []
    with _exclusive(plan.stateful):
        try:
            for m, name, p in plan.params:
                saved.append((m, name, m._parameters[name]))
                m._parameters[name] = leaves.get(id(p)) if id(p) in leaves else p.detach()
            with _training_flags(plan.training):
                yield
        finally:
            for m, name, p in reversed(saved):
                m._parameters[name] = p


# The modules inside an engine call (a forward, or a backward or inverse, which install the
# forward's parameters and buffers into them), by id, with the thread running it and how
# deeply (a network nested in a residual function runs inside its parent, on one thread).
# Entries live only during the call. Another thread's forward or backward of the same modules
# would read the installed tensors, or put them back in the wrong order: it is refused.
_CONCURRENT = (
    "inside a reversible forward or backward on another thread: the reversible backward "
    "installs the forward's parameters and buffers into the modules while it runs, so one "
    "network cannot run on two threads at once. Give each thread its own copy "
    "(copy.deepcopy), serialize the calls, or use reversible=False")
_owners: dict[int, list] = {}
_owners_lock = threading.Lock()


@contextlib.contextmanager
def _exclusive(modules):
    me = threading.get_ident()
    with _owners_lock:
        for m in modules:
            entry = _owners.get(id(m))
            if entry is not None and entry[0] != me:
                raise RuntimeError(f"{type(m).__name__} is {_CONCURRENT}")
        for m in modules:
            _owners.setdefault(id(m), [me, 0])[1] += 1
    try:
        yield
    finally:
        with _owners_lock:
            for m in modules:
                entry = _owners[id(m)]
                entry[1] -= 1
                if entry[1] == 0:
                    del _owners[id(m)]


def _refuse_sharded_functions(modules) -> None:
    """Refuse a residual function that is its own FSDP unit (``fully_shard``, or FSDP1).

    Such a unit gathers its parameters in its own forward hook and reduce-scatters in its own
    backward hooks; in the engine's recomputation those hooks would replace the parameters the
    engine installs and reduce before the engine's gradients exist. Sharding the network that
    holds the functions (or any module around it) works. Costs nothing unless FSDP is imported.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return
    kinds = tuple(k for k in (getattr(fsdp, "FSDPModule", None),
                              getattr(fsdp, "FullyShardedDataParallel", None)) if k is not None)
    for m in modules:
        if isinstance(m, kinds):
            raise NotImplementedError(
                f"a residual function of the reversible engine is itself an FSDP unit "
                f"({type(m).__name__}): its hooks would gather and reduce its parameters around "
                f"the engine's recomputation, not around the gradients. Apply fully_shard to the "
                f"network that holds the functions (e.g. the MomentumResNet) or to a module "
                f"around it, not to each function; or use reversible=False"
            )


# --------------------------------------------------------------------------------------------
# the plan


class _ExactCoupling(NamedTuple):
    """The fixed-point arithmetic of a coupling, compiled once per plan (not once per step)."""

    t: int
    o: int
    mult: tuple[int, int, int] | None  # alpha = sign n / d; None when alpha = 1
    a: float
    alpha_grad: bool
    shift: int  # exact multiple of q[o] added to q[t] (0: none)
    shift_rounded: int  # multiple of q[o] 2^-shift_bits rounded onto the grid of q[t] (0: none)
    shift_bits: int
    shift_limit: int | None = None  # largest |q[o]| with an exact shift term (None: any state)


def _compile_exact(c: Coupling, fps, memo: dict) -> _ExactCoupling:
    """A shift from a slot with ``k`` more fractional bits than the target is rounded onto the
    target's grid: an additive term that is a deterministic function of ``s[o]``, so the
    coupling stays exactly invertible. Where ``|shift| 2^k`` times the largest state could
    wrap or round (frac_bits far apart), ``shift_limit`` bounds ``|q[o]|``: the forward checks
    it (:func:`_guard_shift`), so the backward's same products are exact too."""
    alpha_grad = isinstance(c.alpha, torch.Tensor) and c.alpha.requires_grad
    a = _alpha_value(c.alpha)
    key = (c.target, a, c.shift, alpha_grad)
    e = memo.get(key)
    if e is None:
        t, o = c.target, 1 - c.target
        shift = rounded = bits = 0
        limit = None
        if c.shift != int(c.shift) or isinstance(c.shift, bool):
            raise ValueError(f"exact mode needs an integer coupling shift (it adds shift "
                             f"q[o] to fixed-point integers), got {c.shift!r}")
        if c.shift:
            k = fps[t].frac_bits - fps[o].frac_bits
            if k >= 0:
                shift = int(c.shift) * 2**k
                limit = shift_limit(fps[t], fps[o], shift)
            else:
                rounded, bits = int(c.shift), -k
                limit = shift_limit(fps[t], fps[o], rounded, bits)
        mult = None if a == 1.0 else rational(a)
        e = memo[key] = _ExactCoupling(t, o, mult, a, alpha_grad, shift, rounded, bits, limit)
    return e


class Plan:
    """Everything one forward of :func:`integrate` did that its backward and :func:`reverse`
    read. Built by the forward; read-only afterwards (the exact buffer is read through
    cursors), so two forwards before one backward, or a configuration changed between
    forward and backward, cannot mix.

    Attributes: ``steps`` (the chain), ``couplings`` (per step, or ``None`` for a grid, whose
    couplings are a function of its immutable times), ``args``, ``exact`` (the two
    :class:`~mode.exact.FixedPoint` s or ``None``), ``tensors`` (the tensors that receive
    gradients), ``grad_index`` (per step, indices into ``tensors``), ``params`` (``(module,
    name, tensor)`` the forward read), ``training`` (``(module, flag)``), ``versions``, ``rng``
    and ``snapshots`` (per step), ``autocast``; in exact mode ``buffer`` (a cursor on the
    :class:`~mode.exact.InformationBuffer`) and ``final`` (the output pair in fixed point),
    both read through :meth:`exact_record`, and ``checksum`` (of the input pair).
    """

    def __init__(self, steps, couplings, args, exact, strategy_, s0, s1):
        self.steps = steps
        self.couplings = couplings
        self.args = args
        self.exact = exact
        self.strategy = strategy_
        # the input pair by weak reference only: holding it would keep activations alive
        versions = _versions((s0, s1))
        self.inputs = tuple((weakref.ref(t), v) for t, v in zip((s0, s1), versions)) \
            if versions is not None else ()
        self.device_type = s0.device.type
        self.devices = _rng_devices(s0)
        self.autocast = _autocast_state(self.device_type)
        self.reads = _distinct_reads(steps)
        params, modules, seen_m = [], [], set()
        for r in self.reads.values():
            params.extend(r.params)
            for m in r.modules:
                if id(m) not in seen_m:
                    seen_m.add(id(m))
                    modules.append(m)
        self.params = tuple(params)
        _refuse_sharded_functions(modules)
        self.training = tuple((m, m.training) for m in modules)
        self.modules = tuple(modules)
        self.hooks = _hook_signature(modules)
        # the modules whose parameters or buffers an engine call installs (claimed per call)
        self.stateful = tuple(m for m in modules if m._parameters or m._buffers)
        self._index_tensors(steps, couplings, args)
        watched = {id(t): t for t in (*self.tensors, *(p for _, _, p in params))}
        watched.update((id(a), a) for a in args if isinstance(a, torch.Tensor))
        self.watched = tuple(watched.values())
        self.versions = _versions(self.watched)
        self.buffer_versions: tuple | None = None
        self.rng: list = []
        self.snapshots: list = []
        self.live_buffer: InformationBuffer | None = None  # during the exact forward only
        self.pending: tuple | None = None  # from the forward to the handoff node's save
        self.handoff: tuple | None = None  # from the handoff node's backward to the chain's
        self.saved_by = None  # weak reference to the handoff node, which saves the record
        self.buffer_meta: tuple | None = None  # exact mode: see hold()
        self._held: tuple | None = None
        self.checksum: tuple[int, ...] | None = None
        self.fingerprints = None  # exact mode: _Fingerprints of every step
        self.compiled: dict = {}

    def hold(self, q: list[torch.Tensor], meta: tuple, buffer_tensors: list) -> None:
        """Keep what an exact forward leaves for the inverse: the output pair in fixed point and
        the information buffer. When an autograd graph records the forward, the
        :class:`_Handoff` node saves these tensors and the plan reads them from it, so that
        they are freed once the backward has read them, as autograd frees what it saves;
        otherwise (no_grad, inference_mode) the plan holds them."""
        self.buffer_meta = meta
        self._held = (*q, *buffer_tensors)  # until a handoff node saves them (see there)

    def exact_record(self) -> tuple[list[torch.Tensor], InformationBuffer]:
        """``(final pair in fixed point, cursor on the information buffer)``."""
        if self.buffer_meta is None:
            raise ValueError("this forward did not run in exact mode")
        if self._held is not None:
            tensors = list(self._held)
        else:
            node = self.saved_by() if self.saved_by is not None else None
            try:
                tensors = list(node.saved_tensors) if node is not None else None
            except RuntimeError:  # autograd freed them after the backward
                tensors = None
            if tensors is None:
                raise ValueError(
                    "the information buffer of this exact forward was freed by its backward (as "
                    "autograd frees what it saves): invert before the backward, or run the "
                    "forward under torch.no_grad() to keep it")
        return tensors[:2], InformationBuffer.cursor(self.buffer_meta, tensors[2:])

    def take_handoff(self) -> tuple[torch.Tensor, ...]:
        """What the :class:`_Handoff` node of this backward unpacked for it (taken: the plan
        keeps no reference, so that the tensors are freed as the reconstruction replaces
        them)."""
        handoff, self.handoff = self.handoff, None
        if handoff is None or handoff[0] != _graph_task():
            raise RuntimeError(
                "the reversible engine's backward ran without its handoff node in the same "
                "backward pass (a backward of this graph on another thread at the same time?)")
        return handoff[1]

    @property
    def final(self) -> list[torch.Tensor]:
        """The output pair of the exact forward in fixed point."""
        return self.exact_record()[0]

    @property
    def buffer(self) -> InformationBuffer:
        """A cursor on the information buffer of the exact forward."""
        return self.exact_record()[1]

    def _index_tensors(self, steps, couplings, args) -> None:
        """The tensors that receive gradients (tensor args, parameters and tensor alphas of
        the steps), without duplicates, and per step the indices of those it uses."""
        tensors, add = traced.distinct_tensors()

        arg_idx = [add(a) for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        per_step, shared = [], {}
        uses = ([(steps.step, _runs(steps, None)[0][0], len(steps))] if couplings is None
                else [(s, c, 1) for s, c in zip(steps, couplings)])
        for step, cs, repeats in uses:
            own = [add(p) for _, _, p in self.reads[id(step)].params if p.requires_grad]
            own += [add(x) for c in cs for x in (c.alpha, c.scale)
                    if isinstance(x, torch.Tensor) and x.requires_grad]
            own = arg_idx + sorted(set(own) - set(arg_idx))
            # a step used many times (weight tying, a grid) shares one index list
            per_step.extend([shared.setdefault((id(step), tuple(own)), own)] * repeats)
        self.tensors, self.grad_index = tensors, per_step

    def __len__(self) -> int:
        return len(self.steps)

    def step(self, i: int) -> ReversibleStep:
        return self.steps.step if self.couplings is None else self.steps[i]

    def couplings_of(self, i: int) -> Sequence[Coupling]:
        return self.steps.couplings(i) if self.couplings is None else self.couplings[i]

    def check_unmodified(self) -> None:
        """Raise, as autograd does, if a tensor the forward read was modified in place; and if
        the module hooks around the residual functions changed since the forward (autograd
        keeps the forward's graph; a recomputation would run other hooks)."""
        if _hook_signature(self.modules) != self.hooks:
            raise RuntimeError(
                "module hooks (forward, forward pre, backward or backward pre, on a module of "
                "a residual function or registered for every module) were added or removed "
                "between the reversible forward and its backward: the recomputation of f would "
                "run other hooks than the forward did. Change hooks after backward, or use "
                "reversible=False")
        if self.versions is None:
            return
        for t, v in zip(self.watched, self.versions):
            if t._version != v:
                raise RuntimeError(
                    f"a tensor of shape {tuple(t.shape)} that the reversible forward read ("
                    f"{self._describe(t)}) was modified in place during or after the forward "
                    f"(version {v} -> {t._version}): its backward would recompute with other "
                    f"values. Modify it after backward and not inside a residual function, or "
                    f"use reversible=False"
                )
        for ref, v in self.inputs:
            t = ref()
            if t is not None and t._version != v:
                raise RuntimeError(
                    f"an input state of shape {tuple(t.shape)} of the reversible forward was "
                    f"modified in place after the forward (version {v} -> {t._version}), as "
                    f"autograd refuses for the tensors it saves. Modify it after backward, or "
                    f"pass a copy"
                )
        for m, name, b, v in self.buffer_versions or ():
            if m._buffers.get(name) is not b or b._version != v:
                raise RuntimeError(
                    f"buffer {name!r} of {type(m).__name__} was changed after the reversible "
                    f"forward that read it, and no copy of the value it read was kept (the "
                    f"forward did not change it): the backward cannot recompute faithfully. "
                    f"Run the backward first, or use reversible=False"
                )

    def _describe(self, t: torch.Tensor) -> str:
        for m, name, p in self.params:
            if p is t:
                return f"parameter {name!r} of {type(m).__name__}"
        if any(a is t for a in self.args):
            return "an extra argument"
        return "a coupling coefficient"


# --------------------------------------------------------------------------------------------
# forward


def _step_uses(plan: Plan):
    """``(i, step, reads, couplings)`` for every step of the chain, in order."""
    for i in range(len(plan)):
        step = plan.step(i)
        yield i, step, plan.reads[id(step)], plan.couplings_of(i)


def _forward(plan: Plan, s: list[torch.Tensor], run_couplings) -> list[torch.Tensor]:
    """Run every step with ``run_couplings(couplings, s)``, recording RNG draws and buffer
    changes per coupling (a RevNet step's F and G each draw their own dropout masks, and the
    backward undoes them in reverse order) and the versions of buffers no coupling changed.
    ``plan.rng[i]`` and ``plan.snapshots[i]`` are ``None`` for a step where nothing drew or
    changed, else a tuple with one entry (or ``None``) per coupling of step ``i``."""
    rng = _RngRecorder(plan.devices)
    untouched: dict = {}
    marks_per_step = []
    for _, step, reads, couplings in _step_uses(plan):
        snaps, marks = [], []
        for c in couplings:
            marks.append(c.phi is not None)
            if c.phi is None:  # a linear coupling draws nothing and touches no buffer
                s = run_couplings((c,), s)
                snaps.append(None)
                continue
            before = _snapshot_before(reads) if reads.buffers else None
            s = run_couplings((c,), s)
            rng.step_done()
            snap = None
            if before is not None:
                snap = _snapshot_after(before)
                for m, name, b, _v, _c in before:
                    key = (id(m), name)
                    if snap is not None and any(e[0] is m and e[1] == name
                                                for e in snap.entries):
                        untouched[key] = None  # changed by the forward: replayed from copies
                    elif key not in untouched:
                        untouched[key] = (m, name, b, b._version)
            snaps.append(snap)
        if plan.fingerprints is not None:  # exact mode: positions of the pair after each step
            plan.fingerprints.record(s)
        if step.swap:
            s = [s[1], s[0]]
        marks_per_step.append(marks)
        plan.snapshots.append(tuple(snaps) if any(x is not None for x in snaps) else None)
    flat, plan.rng = iter(rng.finish()), []
    for marks in marks_per_step:  # one recorded state per coupling with a residual function
        states = tuple(next(flat) if m else None for m in marks)
        plan.rng.append(states if any(x is not None for x in states) else None)
    if plan.versions is not None:
        plan.buffer_versions = tuple(v for v in untouched.values() if v is not None)
    return s


_NOTHING = contextlib.nullcontext()  # (reusable: it holds no state)


def _at(entries: tuple | None, k: int):
    """Coupling ``k``'s entry of a step's per-coupling record (``None``: nothing recorded)."""
    return None if entries is None else entries[k]


@contextlib.contextmanager
def _replayed(plan: Plan, i: int, k: int, reads: _Reads | None, isolate: bool):
    """Coupling ``k`` of step ``i`` with the forward's random numbers and buffers."""
    rng, snap = _at(plan.rng[i], k), _at(plan.snapshots[i], k)
    if rng is None and snap is None and not isolate:
        yield
        return
    with _replay_rng(rng, plan.devices), _replay_buffers(snap, reads, isolate):
        yield


def _version(x: torch.Tensor) -> int | None:
    """``x._version``, or ``None`` for an inference tensor (which has no version counter)."""
    try:
        return x._version
    except RuntimeError:
        return None


def _unchanged_input(c: Coupling, x: torch.Tensor, version: int | None) -> None:
    """Refuse a residual function that modified its input ``x`` in place: the coupling's
    ``s[o]`` must be what it read, else no reversal (float or exact) recovers ``s[t]``."""
    if version is not None and x._version != version:
        phi = c.phi.phi if isinstance(c.phi, _CompiledPhi) else c.phi
        name = type(phi).__name__ if isinstance(phi, nn.Module) else getattr(
            phi, "__qualname__", type(phi).__name__)
        raise RuntimeError(
            f"the residual function {name} modified its input in place (version {version} -> "
            f"{x._version}; an in-place operation such as x.mul_() or nn.ReLU(inplace=True) "
            f"applied to the input itself): a reversible coupling s[t] <- a s[t] + phi(s[o]) "
            f"needs s[o] unchanged to reconstruct s[t]. Use an out-of-place operation on the "
            f"input (in place on intermediate results is fine), or reversible=False"
        )


def _float_couplings(args):
    def run(couplings, s):
        for c in couplings:
            other = s[1 - c.target]
            version = _version(other) if c.phi is not None else None
            s[c.target] = coupling_update(c, s, args)
            _unchanged_input(c, other, version)
        return s

    return run


def _phi_of(c: Coupling, x: torch.Tensor, args) -> torch.Tensor:
    """``scale phi(x, *args)``, refusing a function that modifies ``x`` in place."""
    version = _version(x)
    p = scaled_phi(c, x, args)
    _unchanged_input(c, x, version)
    return p


def _exact_couplings(plan: Plan, dtype):
    """The couplings on fixed-point integers (``q`` is overwritten: nothing else holds it)."""
    fps, buf, args, memo = plan.exact, plan.live_buffer, plan.args, plan.compiled
    # This forward's workspace: dead float64 tensors of the state's shape that the arithmetic
    # computes in (a fresh tensor of some MiB costs more than the arithmetic done in it). It
    # lives as long as the forward; what it holds is never seen outside.
    pool: list[torch.Tensor] = []
    known: list = [None, None]  # (state, max |q|) of the last checked state of each target

    def run(couplings, q):
        # q[t] is updated in place: the pair is this forward's own (encoded, then computed here)
        for c in couplings:
            e = _compile_exact(c, fps, memo)
            t, o = e.t, e.o
            if e.shift_limit is not None:  # frac_bits far apart: a shift could wrap or round
                _guard_shift(e, q, fps, known)
            new = q[t]
            p = None
            if fused.usable(new, e.mult, fps[t].storage) and not e.shift_rounded:
                # one compiled loop for the scaling, the push, the shift and the quantized
                # phi (mode.fused): the same bits as the eager arithmetic below
                if c.phi is not None:
                    p = _phi_of(c, fps[o].decode(q[o], dtype), args).detach()
                bounds = fused.scale_push_add(new, buf, e.mult, p, q[o] if e.shift else None,
                                              e.shift, fps[t].scale)
                if bounds is not None:
                    known[t] = (new, fps[t].checked_bound(new, bounds=bounds))
                    continue
            if e.mult is not None:
                new = buf.scale(new, *e.mult, overwrite=True, pool=pool)
            if e.shift:
                new.add_(q[o], alpha=e.shift)
            elif e.shift_rounded:
                new.add_(fps[t].round_shift(q[o], e.shift_rounded, e.shift_bits))
            if c.phi is not None:
                if p is None:
                    p = _phi_of(c, fps[o].decode(q[o], dtype), args)
                # quantized unchecked: a huge or non-finite p makes the new state fail the check
                into = None
                if new.dtype == torch.float64 and p.dtype != torch.float64:
                    into = pool.pop() if pool else torch.empty_like(new)  # no mixed-dtype add
                qp = fps[t].quantize(p, overwrite=_scaled(c), out=into)
                del p
                new.add_(qp)
                if into is not None and len(pool) < 3:
                    pool.append(qp)
                del qp
            q[t] = new
            # checked at once (one check per coupling, as before): every state a coupling reads
            # is in range, which the exactness bounds of mode.exact.shift_limit assume
            known[t] = (new, fps[t].checked_bound(new))
        return q

    return run


def _scaled(c: Coupling) -> bool:
    """Whether ``scaled_phi`` multiplies by a scale, so that its result is a new tensor that
    nothing else holds (``phi`` itself may return its input or a parameter)."""
    return c.phi is not None and (isinstance(c.scale, torch.Tensor) or c.scale != 1.0)


def _guard_shift(e: _ExactCoupling, q: list[torch.Tensor], fps, known: list) -> None:
    """Refuse a shift term that could wrap or round (:func:`mode.exact.shift_limit`): the
    largest ``|q[o]|``, known from its range check (or one aminmax), against the limit."""
    x = q[e.o]
    bound = next((b for entry in known if entry is not None and entry[0] is x
                  for b in (entry[1],)), None)
    if bound is None:  # an input state, not yet checked by a coupling
        bound = fps[e.o].checked_bound(x)
    if bound > e.shift_limit:
        raise shift_overflow(fps[e.t], fps[e.o], (f"s{e.t}", f"s{e.o}"), bound, e.shift_limit)


def _checksum(q: list[torch.Tensor]) -> tuple[int, ...]:
    """Two wrapping int64 sums per tensor: enough to tell a drifted reconstruction."""
    sums = []
    for x in q:
        pair = fused.checksum(x)  # large states: one compiled read, no copy
        if pair is None:
            x = x.to(torch.int64, copy=True)  # copied: squared in place below
            pair = (int(x.sum()), int(x.mul_(x).sum()))
        sums += pair
    return tuple(sums)


#: Positions per slot that an exact forward records after every step (:class:`_Fingerprints`).
FINGERPRINT_SIZE = 32


class _Fingerprints:
    """Both fixed-point slots at ``k = min(numel, FINGERPRINT_SIZE)`` fixed, evenly spaced
    positions, before the first step (row 0) and after the couplings of step ``i`` (row
    ``i + 1``, before its swap): ``rows``, pairs of ``k``-vectors in the storage dtype. Two
    index_selects per step (about 4 us on a CPU, no synchronization; 512 bytes per step whatever
    the state size); read only after a failed reconstruction, to find the step where it
    departs from the forward."""

    def __init__(self, q: list[torch.Tensor]):
        n = q[0].numel()
        k = min(n, FINGERPRINT_SIZE)
        self.index = torch.arange(k, device=q[0].device).mul_(n).div_(k, rounding_mode="floor")
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.record(q)

    def sample(self, q: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``q`` at the recorded positions (two index_selects, no synchronization)."""
        index = self.index
        return (torch.index_select(q[0].reshape(-1), 0, index),
                torch.index_select(q[1].reshape(-1), 0, index))

    def record(self, q: list[torch.Tensor]) -> None:
        self.rows.append(self.sample(q))

    def matches(self, row: int, q: list[torch.Tensor]) -> bool:
        """Whether ``q`` agrees with the forward's row ``row`` at every recorded position."""
        return all(torch.equal(f, x.reshape(-1)[self.index]) for f, x in zip(self.rows[row], q))


def _verify_reconstruction(plan: Plan, q: list[torch.Tensor], dtype=None, record=None,
                           rows: list | None = None) -> None:
    """Raise (before any gradient is returned) if ``q`` is not the forward's input, saying
    why: ``record()`` gives the output pair in fixed point and a fresh cursor on the buffer,
    from which :func:`_diagnose` reconstructs again to find the step and the cause."""
    if _checksum(q) == plan.checksum:
        return
    try:
        located = _locate_rows(plan, rows, q) if rows is not None else None
        cause = _diagnose(plan, dtype, record, located) \
            if record is not None or located is not None else None
    except Exception as error:  # the diagnosis must not hide the failure it explains
        cause = f"(the diagnosis itself failed: {error!r})"
    raise RuntimeError(
        "exact reconstruction did not return to the forward's input, so gradients would be "
        "wrong (none was returned). The parameters, extra arguments and buffers the forward "
        "read are unchanged and its random numbers were replayed. "
        + (cause or _GENERIC_CAUSES)
    )


_DETERMINISM_FIX = (
    "call torch.use_deterministic_algorithms(True), set torch.backends.cudnn.benchmark = False "
    "(and torch.backends.cudnn.deterministic = True) and, on CUDA, the environment variable "
    "CUBLAS_WORKSPACE_CONFIG=:4096:8 before the first cuBLAS call. A function that draws from "
    "its own torch.Generator (the engine replays only the global generators) or reads a "
    "changing global behaves the same way")

_GENERIC_CAUSES = (
    "A residual function gave different outputs for the same input bits in the two passes: a "
    "non-deterministic kernel (" + _DETERMINISM_FIX + "), residual functions compiled with "
    "torch.compile whose forward and recomputation graphs round differently "
    "(mode.compile_functions(model, False)), or state outside its parameters and buffers (a "
    "Python attribute it changes).")

_CHANGED_SINCE_FORWARD = (
    "Cause: its residual function differed between the forward and the recomputation, yet two "
    "calls now agree and change no Python attribute: it depends on state outside its "
    "parameters and buffers that changed after the forward (a Python attribute or a global set "
    "between forward and backward), or it was compiled with torch.compile and its forward and "
    "recomputation graphs round differently (mode.compile_functions(model, False)). Keep such "
    "state constant until the backward, register it as a buffer, or use reversible=False.")

# what nn.Module itself keeps in __dict__: not a user's hidden state
_MODULE_KEYS = frozenset(nn.Module().__dict__) | {"training"}
_SCALARS = (int, float, complex, bool, str, bytes, type(None))


def _attributes(modules) -> list[tuple[nn.Module, dict]]:
    """The plain Python attributes of ``modules``: ``(module, {name: (value, token)})``, the
    token a tensor's version or a container's length (in-place changes), else ``None``."""
    out = []
    for m in modules:
        entries = {}
        for k, v in m.__dict__.items():
            if k in _MODULE_KEYS:
                continue
            token = None
            if isinstance(v, torch.Tensor):
                token = getattr(v, "_version", None) if not v.is_inference() else None
            elif isinstance(v, list | dict | set | bytearray):
                token = len(v)
            entries[k] = (v, token)
        out.append((m, entries))
    return out


def _changed_attributes(before: list) -> list[tuple[nn.Module, str]]:
    """``(module, name)`` of every attribute that differs from ``before`` (added, removed,
    rebound to another value, or a tensor or container changed in place)."""
    changed = []
    for (m, old), (_, new) in zip(before, _attributes(m for m, _ in before)):
        for k in old.keys() | new.keys():
            if k not in old or k not in new:
                changed.append((m, k))
                continue
            (a, ta), (b, tb) = old[k], new[k]
            if type(a) in _SCALARS and type(b) in _SCALARS:
                same = a is b or a == b
            else:
                same = a is b and ta == tb
            if not same:
                changed.append((m, k))
    return changed


def _restore_attributes(before: list) -> None:
    """Put back the attribute bindings of ``before`` (a container or tensor changed in place
    stays changed)."""
    for m, old in before:
        for k in [k for k in m.__dict__ if k not in _MODULE_KEYS and k not in old]:
            del m.__dict__[k]
        for k, (v, _) in old.items():
            m.__dict__[k] = v


def _step_name(plan: Plan, j: int) -> str:
    """``step j (MomentumStep, residual function Linear)``."""
    step = plan.step(j)
    names = []
    for c in plan.couplings_of(j):
        phi = c.phi.phi if isinstance(c.phi, _CompiledPhi) else c.phi
        if phi is not None:
            name = type(phi).__name__ if isinstance(phi, nn.Module) else getattr(
                phi, "__qualname__", type(phi).__name__)
            if name not in names:
                names.append(name)
    what = f", residual function {', '.join(names)}" if names else ""
    return f"step {j} ({type(step).__name__}{what})"


def _run_step(plan: Plan, j: int, x: list[torch.Tensor], args) -> list[torch.Tensor]:
    """The couplings of step ``j`` in float arithmetic on ``x``, with the forward's random
    numbers and buffers (the module's own buffers are left untouched)."""
    reads = plan.reads[id(plan.step(j))]
    s = list(x)
    for k, c in enumerate(plan.couplings_of(j)):
        with _replayed(plan, j, k, reads, True):
            s[c.target] = coupling_update(c, s, args)
    return s


def _same_outputs(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) or bool(((x == y) | (x.isnan() & y.isnan())).all())
               for x, y in zip(a, b))


def _classify(plan: Plan, j: int, x: list[torch.Tensor], args, where: str = "") -> str | None:
    """Call step ``j``'s residual functions twice on ``x`` (replayed RNG and buffers): Python
    attributes that a call changes, restored before the second call, and two calls that
    still differ, tell hidden state from a non-deterministic kernel. The cause, or ``None``
    when both calls agree and change nothing (``where`` names the step, by default in full)."""
    modules = plan.reads[id(plan.step(j))].modules
    before = _attributes(modules)
    first = _run_step(plan, j, x, args)
    changed = _changed_attributes(before)
    _restore_attributes(before)
    second = _run_step(plan, j, x, args)
    where = where or _step_name(plan, j)
    if changed:
        names = ", ".join(f"{k!r} of {type(m).__name__}" for m, k in changed)
        if _same_outputs(first, second):
            return (
                f"Cause: hidden state. Calling {where} changes the Python attribute(s) {names}, "
                f"and with them restored two calls agree: the function depends on state outside "
                f"its parameters and buffers that it changes itself, so the backward's "
                f"recomputation saw other values than the forward. Keep that state constant "
                f"during the forward and the backward, register it as a buffer "
                f"(register_buffer, which the engine replays), or use reversible=False.")
        return (
            f"Cause: a non-deterministic kernel: two calls of {where} on the same input, "
            f"parameters, buffers, random numbers and Python attributes gave different outputs "
            f"(each call also changes the attribute(s) {names}). To fix, {_DETERMINISM_FIX}.")
    if not _same_outputs(first, second):
        return (
            f"Cause: a non-deterministic kernel: two calls of {where} on the same input, "
            f"parameters, buffers and random numbers gave different outputs. To fix, "
            f"{_DETERMINISM_FIX}.")
    return None


def _locate_rows(plan: Plan, rows: list, q: list[torch.Tensor]):
    """As :func:`_locate`, from the positions that the backward itself recorded as it
    reconstructed (``rows``: the pair before each step's inversion, last step first, then the
    final pair): the backward frees the record it starts from, so it cannot run again. The
    input handed to the diagnosis is the final pair (the steps of a chain share its shape)."""
    fp = plan.fingerprints
    if fp is None or len(rows) != len(plan) + 1:
        return None
    n = len(plan)
    for k, row in enumerate(rows):
        forward_row = n - k  # rows[k] is the pair before inverting step n - 1 - k
        if not all(torch.equal(a, b) for a, b in zip(fp.rows[forward_row], row)):
            return forward_row, q, q
    return None, q, q


def _diagnose(plan: Plan, dtype, record, located=None) -> str:
    """Reconstruct again from the output, comparing with the forward's fingerprints after
    every step, to find the step whose input is the first one (walking back) that differs;
    then tell its cause (:func:`_classify`). Every module's Python attributes are put back
    after. Runs only after a failed reconstruction."""
    fps, fp = plan.exact, plan.fingerprints
    if fp is None:
        return ""
    args = plan.args
    before = _attributes(m for m, _ in plan.training)
    try:
        with torch.no_grad(), _replay_autocast(plan.autocast), _installed(plan, {}):
            culprit, x, q = located if located is not None else _locate(plan, record, dtype,
                                                                        args)
            if culprit == len(plan):
                return ("The output pair it started from differs from the forward's output, "
                        "so no step can be located (was it freed or modified in place?). "
                        + _GENERIC_CAUSES)
            decoded = [fps[0].decode(x[0], dtype), fps[1].decode(x[1], dtype)]
            if culprit is not None:
                found = _classify(plan, culprit, decoded, args, "it")
                where = (f"The reconstruction departs from the forward at "
                         f"{_step_name(plan, culprit)}: its output was reconstructed exactly, "
                         f"its input was not (positions compared after every step). ")
                return where + (found if found is not None else _CHANGED_SINCE_FORWARD)
            if _checksum(q) == plan.checksum:
                return ("A second reconstruction, run to diagnose this one, returned to the "
                        "input bit for bit: the residual functions give different outputs from "
                        "one call to the next. Cause: a non-deterministic kernel (or state that "
                        "changes and changes back). To fix, " + _DETERMINISM_FIX + ".")
            for j in _distinct_uses(plan):  # located nowhere: ask every step
                found = _classify(plan, j, decoded, args)
                if found is not None:
                    return ("The recorded positions agree at every step, so the step where the "
                            "reconstruction departs is not known. " + found)
            return ("The recorded positions agree at every step and every residual function "
                    "gives identical outputs on two calls. " + _GENERIC_CAUSES)
    finally:
        _restore_attributes(before)


def _distinct_uses(plan: Plan) -> list[int]:
    """The first index of every distinct step (a grid: every time, its couplings differ)."""
    if plan.couplings is None:
        return list(range(len(plan)))
    first: dict[int, int] = {}
    for j in range(len(plan)):
        first.setdefault(id(plan.step(j)), j)
    return list(first.values())


def _locate(plan: Plan, record, dtype, args):
    """``(culprit, x, q)``: the step whose inversion first misses the forward's fingerprint
    (``len(plan)``: the output itself; ``None``: none), its reconstructed input ``x`` and the
    pair ``q`` reached."""
    fp = plan.fingerprints
    q, buf = record()
    q = list(q)
    x = q
    for i in range(len(plan) - 1, -1, -1):
        if plan.step(i).swap:
            q = [q[1], q[0]]
        if not fp.matches(i + 1, q):
            return i + 1, x, q
        q = _invert_exact_step(plan, i, q, buf, args, dtype)
        x = q
    return (0 if not fp.matches(0, q) else None), x, q


# --------------------------------------------------------------------------------------------
# the autograd function


def _graph_task() -> int | None:
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task() if task is not None else None


def _read_output(plan: Plan) -> int | None:
    """Which of the chain's two outputs its last coupling reads (so that the other output
    depends on it, as autograd's graph would record), or ``None``."""
    n = len(plan)
    if n == 0 or not plan.couplings_of(n - 1):
        return None
    c = plan.couplings_of(n - 1)[-1]
    if c.phi is None and not c.shift:
        return None
    o = 1 - c.target
    return 1 - o if plan.step(n - 1).swap else o


class _Handoff(torch.autograd.Function):
    """The node after the chain: ``(y0, y1) -> (y0, y1)``, marked as modified in place, so the
    user receives the chain's own output tensors.

    It saves what the chain's backward reads from the forward (``plan.pending``: the output
    pair, or in exact mode the fixed-point pair and the information buffer), so that
    saved-tensor hooks see it and autograd checks it for in-place modification. Its backward
    unpacks those tensors and hands them to the chain's backward, which runs next; autograd then
    frees this node's saved tensors (unless ``retain_graph``), so that the chain's output pair
    and fixed-point record die as the reconstruction replaces them, instead of living to the end
    of the chain's backward. It also clones the incoming gradients: the chain's backward owns
    them and updates them in place.
    """

    @staticmethod
    def forward(ctx, plan: Plan, y0, y1):
        tensors, plan.pending, plan._held = plan.pending, None, None
        ctx.mark_dirty(y0, y1)
        ctx.save_for_backward(*tensors)
        ctx.set_materialize_grads(False)  # None: an output nothing used (see the chain's)
        ctx.plan = plan
        ctx.outputs = (weakref.ref(y0), weakref.ref(y1))
        plan.saved_by = weakref.ref(ctx)
        return y0, y1

    @staticmethod
    def backward(ctx, g0, g1):
        plan = ctx.plan
        try:
            saved = ctx.saved_tensors
        except RuntimeError as e:
            if "modified by an inplace operation" not in str(e):
                raise
            raise RuntimeError(
                "an output of a reversible float forward was modified in place before the "
                "backward (y.add_(), y.zero_(), an in-place op on the returned pair): float "
                "mode reconstructs every state from that output, so it must keep its value. "
                "Use an out-of-place operation (y = y + 1), exact=True (which keeps its own "
                "fixed-point copy), or reversible=False") from None
        read = _read_output(plan)
        if read is not None and (g0, g1)[1 - read] is not None:
            y = ctx.outputs[read]()
            if y is not None and (y._backward_hooks or y.retains_grad):
                raise RuntimeError(
                    "a hook or retain_grad() on an output of the reversible chain that its last "
                    "coupling reads (v_N of a MomentumResNet's return_velocity): under autograd "
                    "it would see that output's total gradient, including the path through the "
                    "other output, which the reversible node does not form. Hook the other "
                    "output, the loss or the parameters, or use reversible=False")
        plan.handoff = (_graph_task(), saved)
        return (None, None if g0 is None else g0.clone(), None if g1 is None else g1.clone())


class _ReversibleFunction(torch.autograd.Function):
    """Inputs: the plan, the state pair and the grad-receiving tensors (``plan.tensors``).

    It saves nothing itself: what its backward reads from the forward (the output pair, or in
    exact mode the fixed-point pair and the information buffer) is saved by the
    :class:`_Handoff` node that follows it, which autograd runs, and frees, first."""

    @staticmethod
    def forward(ctx, plan: Plan, s0, s1, *tensors):
        with _exclusive(plan.stateful):
            if not all(m._parameters.get(name) is p for m, name, p in plan.params):
                # the plan read the tensors another thread's backward had installed
                raise RuntimeError(f"a module of this network was {_CONCURRENT}")
            return _ReversibleFunction._run(ctx, plan, s0, s1)

    @staticmethod
    def _run(ctx, plan: Plan, s0, s1):
        dtype = s0.dtype
        if plan.exact is None:
            out = _forward(plan, [s0, s1], _float_couplings(plan.args))
            out = [o.clone() if o is s0 or o is s1 else o for o in out]
            plan.pending = tuple(out)
        else:
            fps = plan.exact
            q = [fps[0].encode(s0, "s0"), fps[1].encode(s1, "s1")]
            plan.checksum = _checksum(q)
            plan.fingerprints = _Fingerprints(q)
            plan.live_buffer = InformationBuffer(s0.shape, s0.device)
            q = _forward(plan, q, _exact_couplings(plan, dtype))
            meta, buffer_tensors = plan.live_buffer.state(compact=True)
            plan.live_buffer = None
            plan.pending = (*q, *buffer_tensors)
            plan.hold(q, meta, buffer_tensors)
            out = [fps[0].decode(q[0], dtype), fps[1].decode(q[1], dtype)]
        ctx.plan, ctx.dtype = plan, dtype
        ctx.set_materialize_grads(False)  # None: an output nothing used (see backward)
        return out[0], out[1]

    @staticmethod
    def backward(ctx, g0, g1):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the reversible engine supports first-order gradients only: its backward is a "
                "reconstruction, not a differentiable graph (create_graph=True, double "
                "backward, Hessian-vector products). Build the network with reversible=False"
            )
        _refuse_batched(g0, g1)
        # inference mode, where the caller runs backward inside it, would leave the
        # recomputation without a graph (enable_grad does not lift it)
        with torch.inference_mode(False):
            return _chain_backward(ctx, g0, g1)


def _chain_backward(ctx, g0, g1):
    """The backward of :class:`_ReversibleFunction`: reconstruct the chain step by step in
    reverse order and pull the gradients back through each coupling."""
    plan, dtype = ctx.plan, ctx.dtype
    plan.check_unmodified()
    saved = plan.take_handoff()
    s = list(saved[:2])  # the handed-over pair: never written (see foreign below)
    shape, device = s[0].shape, s[0].device
    # The gradients are this backward's own (the handoff node cloned them): they are
    # updated in place, so that no second copy of the pair lives beside them.
    g = [
        torch.zeros(shape, dtype=dtype, device=device) if x is None
        else x.clone() if x.is_inference() else x  # updated in place below
        for x in (g0, g1)
    ]
    # A slot whose gradient is structurally zero (an output nothing used, as Z_N of a
    # HamiltonianNet) until a coupling adds to it: autograd runs no node on that path, so
    # its couplings are reconstructed only, and their parameters get no gradient (None,
    # not zeros: weight decay and optimizer moments tell the two apart).
    zero = [g0 is None, g1 is None]
    # Fresh leaves for what receives gradients, so that each VJP stops at them and the
    # tensors' own hooks fire once, on the total that this function returns.
    leaves = {id(t): t.detach().requires_grad_(True) for t in ctx.plan.tensors}
    args = tuple(leaves.get(id(a), a) if isinstance(a, torch.Tensor) else a
                 for a in plan.args)
    inputs_of = [leaves[id(t)] for t in plan.tensors]
    grads: list[torch.Tensor | None] = [None] * len(inputs_of)
    exact = plan.exact
    buf = InformationBuffer.cursor(plan.buffer_meta, saved[2:]) if exact is not None else None
    del saved
    couple = _backward_coupling if exact is None else _backward_coupling_exact
    # the handed-over states are the handoff node's (saved, with retain_graph): never
    # written; every later state is this backward's own and is updated in place
    foreign = {id(s[0]), id(s[1])}
    rows = [] if exact is not None and plan.fingerprints is not None else None
    with _replay_autocast(plan.autocast), _installed(plan, leaves):
        for i in range(len(plan) - 1, -1, -1):
            step = plan.step(i)
            idx = plan.grad_index[i]
            if step.swap:
                s, g, zero = [s[1], s[0]], [g[1], g[0]], [zero[1], zero[0]]
            if rows is not None:  # to locate a failed reconstruction (see _locate_rows)
                rows.append(plan.fingerprints.sample(s))
            inputs = [inputs_of[j] for j in idx]
            cs = plan.couplings_of(i)
            replay = plan.rng[i] is not None or plan.snapshots[i] is not None
            for k in range(len(cs) - 1, -1, -1):
                c = cs[k]
                live = not zero[c.target]
                with _replayed(plan, i, k, None, False) if replay else _NOTHING:
                    couple(plan, step, c, s, g, args, inputs, idx, grads, leaves, buf,
                           dtype, foreign, live)
                if live and (c.phi is not None or c.shift):
                    zero[1 - c.target] = False
    if exact is not None:  # raises before any gradient is returned
        if rows is not None:
            rows.append(plan.fingerprints.sample(s))
        _verify_reconstruction(plan, s, dtype, rows=rows)
    return (None, None if zero[0] else g[0], None if zero[1] else g[1], *grads)


def _leaf(x, leaves: dict):
    """The backward's leaf for a captured tensor coefficient (a float stays a float)."""
    return leaves.get(id(x), x) if isinstance(x, torch.Tensor) else x


def _check_closure(step, out: torch.Tensor, known: list[torch.Tensor],
                   other: torch.Tensor) -> None:
    """Raise if ``out`` depends on a trainable leaf the engine does not know about, or if the
    residual function registered a hook on its input ``other``.

    Such a tensor (a parameter of a residual function that is not a submodule of the step,
    say) would silently receive no gradient in reversible mode. A hook on the input would act
    on phi's share of the state's gradient only, where autograd hands it the total.
    """
    if other._backward_hooks:
        raise RuntimeError(
            f"a residual function of {type(step).__name__} registered a hook on its input "
            f"(x.register_hook): autograd would call it with the total gradient of the state, "
            f"which the reversible backward does not form at that point (it would see phi's "
            f"share only). Register the hook on the network's input or output, or use "
            f"reversible=False")
    known_ids = {id(t) for t in known}
    stop = {id(t.grad_fn) for t in known if t.grad_fn is not None}
    for var in graph_leaves(out, stop):
        if id(var) not in known_ids:
            what = ("an nn.Parameter that is not registered in the step (a parameter of "
                    "another module, reached through a list, a closure or a bound method)"
                    if isinstance(var, nn.Parameter) else
                    "neither a parameter of the step, nor an argument, nor its alpha")
            raise ValueError(
                f"a residual function of {type(step).__name__} uses a trainable tensor of shape "
                f"{tuple(var.shape)} that is {what}: in reversible mode it would receive no "
                f"gradient. Register it (make the function an nn.Module holding it, as a "
                f"submodule of the step) or use reversible=False."
            )


def graph_leaves(out: torch.Tensor, stop: set[int] = frozenset()):
    """The leaf tensors (``AccumulateGrad`` variables) in ``out``'s autograd history, each
    once; the walk does not go past nodes whose ``id`` is in ``stop``."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or id(fn) in seen or id(fn) in stop:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)
        if var is not None:
            yield var
        todo.extend(f for f, _ in fn.next_functions)


def _backward_coupling(plan, step, c, s, g, args, inputs, idx, grads, leaves, buf, dtype,
                       foreign, grad=True):
    """Reconstruct the target slot before coupling ``c`` and propagate gradients through it
    (float mode). ``grad=False``: ``g[t]`` is structurally zero (it comes from an output that
    nothing used), so autograd would run nothing here: reconstruct only."""
    t, o = c.target, 1 - c.target
    a = _alpha_value(c.alpha)
    alpha = _leaf(c.alpha, leaves)
    alpha_grad = grad and isinstance(alpha, torch.Tensor) and alpha.requires_grad
    own = id(s[t]) not in foreign  # a state of this backward's own: updated in place
    if c.phi is None and not alpha_grad:
        # s[t] <- a s[t] + shift s[o]: linear, no autograd needed.
        prev = s[t]
        if c.shift:
            prev = prev.sub_(s[o], alpha=c.shift) if own else torch.sub(prev, s[o], alpha=c.shift)
            own = True
        if a != 1.0:
            prev = prev.div_(a) if own else prev / a
        s[t] = prev
        if grad:
            _linear_grads(c, g, t, o, a)
        return
    other = s[o].detach().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        p = scaled_phi(c, other, args, _leaf(c.scale, leaves)) if c.phi is not None else None
    if p is not None and grad:
        _check_closure(step, p, [other, *inputs], other)
    if grad and not alpha_grad:
        # The VJP first: phi's graph and its temporaries are freed before the reconstructed
        # state exists (the reconstruction needs only the detached p).
        _vjp(c, alpha, g, t, o, a, p, None, other, inputs, idx, grads, False)
        p = p.detach() if p is not None else None
    # s[t] itself when it is this backward's own, else one new tensor; then in place: the
    # same operations in the same order either way
    if c.shift:
        prev = s[t].sub_(s[o], alpha=c.shift) if own else torch.sub(s[t], s[o], alpha=c.shift)
        if p is not None:
            prev.sub_(p.detach())
    elif p is not None:
        prev = s[t].sub_(p.detach()) if own else torch.sub(s[t], p.detach())
    else:
        prev = s[t] if own else s[t].clone()
    if a != 1.0:
        prev.div_(a)
    s[t] = prev
    if alpha_grad:  # d/d alpha reads the reconstructed state
        _vjp(c, alpha, g, t, o, a, p, prev, other, inputs, idx, grads, True)


def _undo_exact(e: _ExactCoupling, fps, q: list, p: list, buf: InformationBuffer, own: bool,
                overwrite: bool = False):
    """``q[t]`` before the coupling ``e``: its shift and the quantized ``p`` subtracted, then
    unscaled (popping ``buf``). The backward's and the inverse's one exact undo.

    ``p``: the (scaled) residual in a list of one (or an empty list), emptied here, so that its
    tensor is freed once subtracted; ``overwrite``: it may be quantized in its own storage.
    ``own``: ``q[t]`` is the caller's own and may be updated in place (a handed-over or
    recorded state never is)."""
    t, o = e.t, e.o
    p = p.pop().detach() if p else None
    x = q[t]
    if fused.usable(x, e.mult, fps[t].storage) and not e.shift_rounded:
        x = x if own else x.clone()  # mode.fused: one compiled loop, the same bits
        if fused.subtract_unscale_pop(x, buf, e.mult, p, q[o] if e.shift else None, e.shift,
                                      fps[t].scale):
            return x
        own = True
    qp = fps[t].quantize(p, overwrite=overwrite) if p is not None else None
    del p
    if e.shift:
        x = x.sub_(q[o], alpha=e.shift) if own else torch.sub(x, q[o], alpha=e.shift)
        own = True
    elif e.shift_rounded:
        shift = fps[t].round_shift(q[o], e.shift_rounded, e.shift_bits)
        x = x.sub_(shift) if own else torch.sub(x, shift)
        own = True
    pool = []
    if qp is not None:
        if x.dtype == torch.float64 and qp.dtype != torch.float64:
            # no mixed-dtype subtraction (a hidden float64 copy): qp in float64, whose tensor
            # the unscaling then computes in
            qp = torch.empty_like(x).copy_(qp)
            pool.append(qp)
        x = x.sub_(qp) if own else torch.sub(x, qp)
        own = True
        del qp
    return buf.unscale(x, *e.mult, overwrite=own, pool=pool) if e.mult is not None else x


def _backward_coupling_exact(plan, step, c, s, g, args, inputs, idx, grads, leaves, buf, dtype,
                             foreign, grad=True):
    """As :func:`_backward_coupling` on fixed-point integers: the reconstruction pops the
    information buffer and is bit-identical to the forward state.

    Order (for memory): phi with its graph, the VJP, then the quantized ``p`` and the
    reconstruction, so that phi's graph is freed before any temporary of the integer
    arithmetic exists; with a learned alpha the VJP needs the reconstructed state and comes
    last."""
    fps = plan.exact
    e = _compile_exact(c, fps, plan.compiled)
    t, o = e.t, e.o
    alpha_grad = grad and e.alpha_grad
    p = None
    if not grad:
        if c.phi is not None:
            with torch.no_grad():
                p = scaled_phi(c, fps[o].decode(s[o], dtype), args, _leaf(c.scale, leaves))
    elif c.phi is not None or alpha_grad:
        other = fps[o].decode(s[o], dtype).requires_grad_(True)
        if c.phi is not None:
            with torch.enable_grad():
                p = scaled_phi(c, other, args, _leaf(c.scale, leaves))
            _check_closure(step, p, [other, *inputs], other)
        alpha = _leaf(c.alpha, leaves)
        if not alpha_grad:
            _vjp(c, alpha, g, t, o, e.a, p, None, other, inputs, idx, grads, False)
            del other
    # after the VJP p is dead (its graph freed): quantized in its own storage when scaled
    terms = [p] if p is not None else []
    if not alpha_grad:
        del p
    s[t] = _undo_exact(e, fps, s, terms, buf, own=id(s[t]) not in foreign,
                       overwrite=_scaled(c) and not alpha_grad)
    if alpha_grad:  # d/d alpha reads the reconstructed state
        prev = fps[t].decode(s[t], dtype)
        _vjp(c, alpha, g, t, o, e.a, p, prev, other, inputs, idx, grads, True)
    elif c.phi is None and grad:
        _linear_grads(c, g, t, o, e.a)


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
    try:
        if _engine_run_backward is None:  # pragma: no cover
            return torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
        return _engine_run_backward(
            tuple(outputs), tuple(grad_outputs), False, False, tuple(inputs), True,
            accumulate_grad=False,
        )
    except RuntimeError as e:
        if "use_reentrant=True" not in str(e):
            raise
        raise RuntimeError(
            "a residual function runs torch.utils.checkpoint with use_reentrant=True, which "
            "cannot run inside the reversible backward (it differentiates each function with "
            "torch.autograd.grad). The reversible backward recomputes f anyway: drop the "
            "checkpoint, or use use_reentrant=False") from None


def _linear_grads(c, g, t, o, a) -> None:
    """Gradients through ``s[t] <- a s[t] + shift s[o]`` (constant ``a``), in place: the
    backward owns ``g``."""
    if c.shift:
        g[o].add_(g[t], alpha=c.shift)
    if a != 1.0:
        g[t].mul_(a)


def _storage(x: torch.Tensor) -> int | None:
    return x.untyped_storage().data_ptr() if x.layout == torch.strided else None


def _vjp(c, alpha, g, t, o, a, p, prev, other, inputs, idx, grads, alpha_grad) -> None:
    """Vector-Jacobian product: d/d(other, inputs, alpha) of ``<g_t, alpha prev + phi(other)>``
    (plus the linear shift term), accumulated into ``g`` (in place) and ``grads``."""
    gt = g[t]
    outputs, grad_outputs = [], []
    if p is not None and p.requires_grad:  # else phi is constant here: it adds no gradient
        outputs.append(p)
        grad_outputs.append(gt if p.dtype == gt.dtype else gt.to(p.dtype))
    if alpha_grad:
        outputs.append(alpha)
        grad_outputs.append((prev.detach() * gt).sum().reshape(alpha.shape).to(alpha.dtype))
    vjp = _grad(outputs, [other, *inputs], grad_outputs) if outputs else \
        (None,) * (1 + len(inputs))
    if c.shift:
        g[o].add_(gt, alpha=c.shift)
    if vjp[0] is not None:
        g[o].add_(vjp[0])
    new = vjp[1:]
    if any(v is not None for v in new):
        # A parameter's gradient may be the grad output itself (phi(x) = x + b, b of x's
        # shape): it must not change when g[t] is updated in place, scaled below or added to
        # by a later coupling (alpha = 1 too: RevNet's halves).
        own = _storage(gt)
        new = [v.clone() if v is not None and _storage(v) == own else v for v in new]
    _accumulate(grads, idx, new)
    if a != 1.0:
        gt.mul_(a)


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
# the plans of returned outputs, so that ``reverse`` can undo a forward faithfully


_records: dict[int, tuple] = {}


def _remember(out: State, plan: Plan) -> None:
    key = id(out[0])
    ref0 = weakref.ref(out[0], lambda _: _records.pop(key, None))
    versions = _versions(out) or (None, None)
    _records[key] = (ref0, weakref.ref(out[1]), versions[0], versions[1], plan)


def _record(s0: torch.Tensor, s1: torch.Tensor) -> Plan | None:
    entry = _records.get(id(s0))
    if entry is None:
        return None
    ref0, ref1, v0, v1, plan = entry
    if ref0() is not s0 or ref1() is not s1:
        return None
    if v0 is not None and (s0._version != v0 or s1._version != v1):
        return None
    return plan


def information_buffer(s0: torch.Tensor, s1: torch.Tensor) -> Plan | None:
    """The :class:`Plan` of the exact forward that returned the pair ``(s0, s1)``, or ``None``.

    Its ``buffer`` is the :class:`~mode.exact.InformationBuffer` and ``final`` the output pair
    in fixed point.
    """
    entry = _records.get(id(s0))
    if entry is not None and entry[0]() is s0 and entry[1]() is s1 and entry[2] is not None \
            and (s0._version != entry[2] or s1._version != entry[3]) and entry[4].exact:
        raise ValueError("the outputs of an exact forward were modified in place; cannot invert")
    plan = _record(s0, s1)
    return plan if plan is not None and plan.exact is not None else None


# --------------------------------------------------------------------------------------------
# compiled residual functions


def _call(phi, x, *args):
    """``phi(x, *args)``: the frame that ``torch.compile`` traces, inlining ``phi``. One frame
    for every function: built-in modules' parameters are inputs of the graph, so functions of
    one structure share a graph (one per grad mode), however many there are."""
    return phi(x, *args)


_compiled_calls: dict = {}


def compiled_function(options: dict | None = None):
    """``torch.compile(_call, **options)``, made once per set of options: the compiled
    ``(phi, x, *args) -> phi(x, *args)`` that the engine calls with ``compile=``."""
    options = dict(options or {})
    key = tuple(sorted((k, repr(v)) for k, v in options.items()))
    fn = _compiled_calls.get(key)
    if fn is None:
        fn = _compiled_calls[key] = torch.compile(_call, **options)
    return fn


class _CompiledPhi:
    """A residual function called through :func:`compiled_function`."""

    __slots__ = ("phi", "fn")

    def __init__(self, phi, options: dict):
        self.phi, self.fn = phi, compiled_function(options)

    def __call__(self, x, *args):
        return self.fn(self.phi, x, *args)


def _compile_options(compile) -> dict | None:
    if compile is False or compile is None:
        return None
    if compile is True:
        return {}
    if isinstance(compile, dict):
        return compile
    raise TypeError(f"compile must be a bool or a dict of torch.compile options, got {compile!r}")


def _hooked(phi) -> bool:
    """Whether module hooks (forward, forward pre, backward, backward pre) run around ``phi``:
    on a module of the one owning it (``phi`` itself or the module of a bound method), or
    registered for every module. Such a function is not compiled: functions of one
    structure share their graphs and dynamo does not guard on hooks
    (``skip_nnmodule_hook_guards``), so a hooked function would run another's graph without
    its hooks (a hook that changes the output: wrong gradients), and dynamo refuses backward
    hooks without compiled autograd."""
    owner = phi if isinstance(phi, nn.Module) else getattr(phi, "__self__", None)
    # (the signature's entries are empty tuples for empty process-wide hook dicts)
    return any(_hook_signature(owner.modules() if isinstance(owner, nn.Module) else ()))


def _compiled_coupling(c: Coupling, options: dict) -> Coupling:
    """``c`` with its residual function run through :func:`compiled_function`, unless it has
    none, is compiled already, or runs module hooks (:func:`_hooked`: it stays eager)."""
    if c.phi is None or isinstance(c.phi, _CompiledPhi) or _hooked(c.phi):
        return c
    return c._replace(phi=_CompiledPhi(c.phi, options))


# --------------------------------------------------------------------------------------------
# public entry points


def fixed_points(frac_bits, dtype: torch.dtype) -> tuple[FixedPoint, FixedPoint]:
    """The :class:`~mode.exact.FixedPoint` of each slot that exact mode uses for ``dtype``
    states: ``frac_bits`` an int, a pair, or ``None`` (:func:`default_frac_bits`), in the
    storage of :func:`fixed_point_storage`."""
    if frac_bits is None:
        frac_bits = default_frac_bits(dtype)
    storage = fixed_point_storage(dtype)
    if isinstance(frac_bits, tuple | list):
        if len(frac_bits) != 2:
            raise ValueError(f"frac_bits must be an int or a pair of ints, got {frac_bits!r}")
        return FixedPoint(frac_bits[0], storage), FixedPoint(frac_bits[1], storage)
    fp = FixedPoint(frac_bits, storage)
    return fp, fp


def integrate(
    steps: Sequence[ReversibleStep],
    state: State,
    args: tuple = (),
    *,
    reversible: bool = True,
    exact: bool = False,
    frac_bits: int | tuple[int, int] | None = None,
    compile: bool | dict | None = None,
    traceable: bool = False,
) -> State:
    """Run ``steps`` on ``state = (s0, s1)``; return the final pair.

    Parameters
    ----------
    steps : sequence of ReversibleStep, or a StepGrid
        The chain, applied in order. ``step.couplings()`` is called once per step, now: the
        couplings (their coefficients) are what the backward pass uses.
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
    frac_bits : None, int or (int, int)
        Fractional bits of ``s0`` and ``s1`` (one int: both; ``None``: by dtype,
        :func:`default_frac_bits`). A slot whose values are much smaller than the other's (a
        velocity ``v = h u`` with a small step ``h``) keeps more digits with more bits; a
        shift from it onto a slot with fewer bits is rounded there.
    compile : None, bool or dict
        Run every residual function through ``torch.compile`` (a dict: its keyword
        arguments), in the forward, the backward's recomputation and :func:`reverse` alike
        (:func:`compiled_function`). ``None`` (default): in float mode, when this call is
        itself being compiled (``torch.compile`` of a model holding the network), with
        torch.compile's default options; exact mode compiles them only on request, since a
        compiled forward and recomputation may round differently. Not for a StepGrid (its
        couplings are made per call). The engine itself is not traced: ``torch.compile``
        breaks the graph at it (with ``fullgraph=True``: an error naming the reason), unless
        ``traceable``.
    traceable : bool
        Under ``torch.compile``, trace the float reversible forward and backward into the
        compiled graph (:mod:`mode.traced`; ``fullgraph=True`` works) when the chain is
        eligible (:func:`mode.traced.refusal`), else run the opaque engine. No effect outside
        ``torch.compile``.
    """
    how = strategy(reversible, exact, frac_bits)
    steps = _check_steps(steps)
    s0, s1 = _check_state(state)
    args = tuple(args)
    compiling = _is_compiling()
    if not compiling:
        _prepare_opaque()
    if not how.reversible:  # plain autograd: an outer torch.compile traces it whole
        options = None if compiling else _compile_options(compile)
        return _apply_chain(steps, (s0, s1), args, options=options)[-1]
    run = _integrate_reversible
    if compiling:  # being traced: the engine is one opaque call, or traced whole
        if traceable:
            couplings = _step_couplings(steps)
            why = traced.refusal(steps, couplings, s0.dtype, how.exact, AMPLIFICATION_WARN)
            if why is None:
                _refuse_sharded_functions(m for step in steps for m in step.modules())
                return traced.integrate_traced(steps, couplings, s0, s1, args,
                                               _autocast_state(s0.device.type)[0],
                                               AMPLIFICATION_WARN)
            _refuse_tracing(f"mode.traceable: this chain runs through the opaque engine: {why}")
        run = _OPAQUE.get("run")
        if run is None:  # made here, in the trace: name the reason before dynamo's own break
            _refuse_tracing(_OPAQUE_REASON)
            run = _opaque()
        if compile is None:  # exact mode: on request only (see _verify_reconstruction)
            compile = not how.exact
    return run(how, steps, s0, s1, args, _compile_options(compile))


_OPAQUE: dict = {}

_OPAQUE_REASON = (
    "mode's reversible engine is opaque to torch.compile: its backward is a hand-written "
    "reconstruction driven by Python (plans, RNG and buffer replay, fixed-point checks). The "
    "residual functions inside it run compiled (integrate's compile=); use fullgraph=False, "
    "or reversible=False for one graph")


def _is_compiling() -> bool:
    """Whether dynamo is tracing this call (``torch.compiler.is_compiling``, torch >= 2.3)."""
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(check()) if check is not None else False


def _opaque():
    """:func:`_integrate_reversible` behind ``torch.compiler.disable``. Made once dynamo is
    imported (at mode's import if it already was, by :func:`mode.traceable` and
    :func:`mode.compile_functions`, at an eager call, else at the first traced call, which
    then breaks the graph one more time); making it at import would import dynamo with
    mode, 0.8 s."""
    run = _OPAQUE.get("run")
    if run is not None:
        return run
    try:
        run = torch.compiler.disable(_integrate_reversible, reason=_OPAQUE_REASON)
    except TypeError:  # torch < 2.7: no reason
        run = torch.compiler.disable(_integrate_reversible)
    _OPAQUE["run"] = run
    return run


def _prepare_opaque() -> None:
    """Make :func:`_opaque`'s function now if dynamo is loaded (a dictionary lookup if made)."""
    if "run" not in _OPAQUE and "torch._dynamo" in sys.modules:
        _opaque()


def _refuse_tracing(reason: str) -> None:
    """Break the graph before the opaque engine, saying why: ``fullgraph=True`` raises with
    ``reason``."""
    sys.modules["torch._dynamo"].graph_break(msg=f"{reason}")  # a constant for dynamo to print


def _integrate_reversible(how, steps, s0, s1, args, options) -> State:
    """The reversible part of :func:`integrate` (not traced by dynamo: :func:`_opaque`)."""
    _refuse_functorch((s0, s1, *args))
    couplings = _step_couplings(steps)
    if options is not None and couplings is not None:
        couplings = [tuple(_compiled_coupling(c, options) for c in cs) for cs in couplings]
    runs = _runs(steps, couplings)
    if how.exact:
        _log_amplification(runs)  # raises for a non-invertible coupling
    else:
        _warn_amplification(runs, s0.dtype)
    fps = fixed_points(how.frac_bits, s0.dtype) if how.exact else None
    plan = Plan(steps, couplings, args, fps, how, s0, s1)
    _refuse_forward_ad((s0, s1, *args, *(t for _, _, t in plan.params), *plan.tensors))
    out = _ReversibleFunction.apply(plan, s0, s1, *plan.tensors)
    if out[0].grad_fn is not None:
        out = _Handoff.apply(plan, *out)
    plan.pending = None  # no graph: nothing saves it (an exact plan holds its record itself)
    _remember(out, plan)
    return out


def _reverse_float(steps, couplings, s: list, args, plan: Plan | None, reads, devices):
    """Float inversion in reverse order; with the forward's plan its random numbers and
    buffers are replayed, without one a step that draws random numbers is refused."""
    n = len(steps)
    for i in range(n - 1, -1, -1):
        step = steps.step if isinstance(steps, StepGrid) else steps[i]
        cs = steps.couplings(i) if couplings is None else couplings[i]
        if step.swap:
            s = [s[1], s[0]]
        before = _get_rng(devices) if plan is None else None
        for k in range(len(cs) - 1, -1, -1):
            c = cs[k]
            with _replayed(plan, i, k, reads[id(step)], True) if plan is not None else \
                    _replay_buffers(None, reads[id(step)], True):
                s[c.target] = invert_coupling(c, s, args)
        if before is not None and _rng_signature(_get_rng(devices)) != _rng_signature(before):
            raise RuntimeError(
                f"step {i} draws random numbers (dropout in train mode?), and these states are "
                f"not the outputs of a forward whose random numbers could be replayed: pass "
                f"the very tensors the forward returned, or call net.eval() first"
            )
    return s


def reverse(
    steps: Sequence[ReversibleStep], state: State, args: tuple = (), *, exact: bool = False
) -> State:
    """Invert the chain: from the final pair, recover the initial one (no gradients).

    When ``state`` is the very output pair of a reversible :func:`integrate` call, the
    inversion uses that forward's plan: its couplings, random numbers (dropout) and buffers.
    In exact mode it must be, and the recovered pair is bit-identical to the input of that
    call (in the fixed-point representation). In float mode any pair can be inverted by a
    chain that draws no random numbers. The inversion never changes a module's buffers.
    """
    steps = _check_steps(steps)
    s0, s1 = _check_state(state)
    args = tuple(args)
    plan = _record(s0, s1)
    if plan is not None and (plan.steps is not steps and list(plan.steps) != list(steps)):
        plan = None
    if exact:
        if plan is None or plan.exact is None:
            information_buffer(s0, s1)  # raises if the outputs were modified in place
            raise ValueError(
                "exact inversion needs the information buffer of the exact forward that "
                "produced this state: pass the very tensors returned by the forward (not copies)"
            )
        return _reverse_exact(plan, args if args else plan.args, s0.dtype)
    if plan is not None and plan.exact is not None:
        plan = None  # an exact forward inverted in float arithmetic: use no exact records
    couplings = plan.couplings if plan is not None else _step_couplings(steps)
    _log_amplification(_runs(steps, couplings))
    reads = plan.reads if plan is not None else _distinct_reads(steps)
    devices = _rng_devices(s0)
    autocast = plan.autocast if plan is not None else _autocast_state(s0.device.type)
    flags = plan.training if plan is not None else ()
    with torch.no_grad(), _replay_autocast(autocast), _training_flags(flags):
        s = _reverse_float(steps, couplings, [s0, s1], args, plan, reads, devices)
    return s[0], s[1]


def _distinct_reads(steps) -> dict:
    """``id(step) -> _Reads`` for every distinct step of the chain (a grid has one)."""
    distinct = [steps.step] if isinstance(steps, StepGrid) else {id(s): s for s in steps}.values()
    return {id(s): _walk(s) for s in distinct}


@contextlib.contextmanager
def _training_flags(flags):
    saved = []
    try:
        for m, flag in flags:
            if m.training is not flag:
                saved.append((m, m.training))
                m.training = flag
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _reverse_exact(plan: Plan, args, dtype) -> State:
    plan.check_unmodified()
    fps = plan.exact
    q, buf = plan.exact_record()  # the decoded floats may hold fewer bits than the fixed point
    foreign = {id(q[0]), id(q[1])}  # the record itself: read, never written
    with torch.no_grad(), _replay_autocast(plan.autocast), _installed(plan, {}):
        for i in range(len(plan) - 1, -1, -1):
            if plan.step(i).swap:
                q = [q[1], q[0]]
            q = _invert_exact_step(plan, i, q, buf, args, dtype, foreign)
    _verify_reconstruction(plan, q, dtype, plan.exact_record)
    return fps[0].decode(q[0], dtype), fps[1].decode(q[1], dtype)


def _invert_exact_step(plan: Plan, i: int, q: list, buf: InformationBuffer, args, dtype,
                       foreign: set | None = None) -> list:
    """Undo the couplings of step ``i`` (its swap already undone) on the fixed-point pair
    ``q``, popping ``buf``, with the forward's random numbers and buffers (no grad).
    ``foreign``: ids of states never to write (the recorded output); ``None``: write none."""
    fps = plan.exact
    reads = plan.reads[id(plan.step(i))]
    cs = plan.couplings_of(i)
    for k in range(len(cs) - 1, -1, -1):
        c = cs[k]
        with _replayed(plan, i, k, reads, True):
            e = _compile_exact(c, fps, plan.compiled)
            terms = [scaled_phi(c, fps[e.o].decode(q[e.o], dtype), args)] \
                if c.phi is not None else []
            own = foreign is not None and id(q[e.t]) not in foreign
            q[e.t] = _undo_exact(e, fps, q, terms, buf, own, overwrite=_scaled(c))
    return q


def _apply_chain(steps, s: State, args: tuple, keep: bool = False,
                 options: dict | None = None) -> list[State]:
    """The chain in plain (differentiable) float arithmetic: the last pair, or every pair."""
    out = [s]
    for i in range(len(steps)):
        if isinstance(steps, StepGrid):
            step, couplings = steps.step, steps.couplings(i)
        else:
            step = steps[i]
            couplings = step.couplings()
            if options is not None:
                couplings = [_compiled_coupling(c, options) for c in couplings]
        x = list(s)
        for c in couplings:
            x[c.target] = coupling_update(c, x, args)
        s = (x[1], x[0]) if step.swap else (x[0], x[1])
        if keep:
            out.append(s)
        else:
            out[0] = s
    return out


def trajectory(steps: Sequence[ReversibleStep], state: State, args: tuple = ()) -> list[State]:
    """All intermediate pairs ``[s_0, s_1, ..., s_N]`` (plain autograd, for plots)."""
    return _apply_chain(_check_steps(steps), _check_state(state), tuple(args), keep=True)


_prepare_opaque()
