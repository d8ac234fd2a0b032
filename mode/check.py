"""``check_reversible``: run a user's own steps through every promise of the engine.

A :class:`~mode.steps.ReversibleStep` written by hand is correct when its couplings describe
the map it means, and when the engine can invert and differentiate it. The checker runs the
chain on a state pair and compares, each against an independent route:

* float inversion: ``reverse(integrate(s)) = s`` up to rounding;
* exact mode: the round trip is bit-identical in fixed point;
* gradients of the float and the exact reversible backward against plain autograd
  (``reversible=False``) on the same forward, for the state pair, tensor arguments and
  every parameter;
* after the reversible forward and backward, every buffer of the steps equals its value
  after the autograd forward and backward (stateful modules are updated once).

    report = mode.check_reversible([MyStep(...)], (s0, s1))
    assert report.ok, report
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import reversible as engine
from .steps import ReversibleStep, State

__all__ = ["ReversibleCheck", "check_reversible"]


@dataclass
class ReversibleCheck:
    """Outcome of :func:`check_reversible`: ``ok`` and the measured error of each check (max-norm
    errors relative to the largest reference value of each kind; 0 for a bit-identical
    exact round trip)."""

    errors: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        lines = [f"{k}: {v:.3g}" for k, v in self.errors.items()]
        verdict = "all checks passed" if self.ok else "FAILED: " + "; ".join(self.failures)
        return "\n".join([*lines, verdict])


def _rel(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> float:
    """``max |a - b| / max |b|`` over all the tensors of the two lists (``None``: no gradient;
    one ``None`` against a tensor is an infinite error)."""
    diff = scale = 0.0
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            if (x is None) != (y is None):
                return float("inf")
            continue
        if x.numel():
            if not bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all()):
                return float("inf")  # (max() would drop a NaN: a NaN where autograd has none)
            diff = max(diff, float((x - y).abs().max()))
            scale = max(scale, float(y.abs().max()))
    return diff / scale if scale > 0 else diff


def _run(steps, state, args, how: dict, second: State | None = None):
    """Forward, a fixed random cotangent, backward: outputs, gradients and buffers. Every run
    starts from the same RNG state (seed 0; the caller's state is restored after), so that
    steps that draw random numbers (dropout) draw the same ones in each run. ``second``: a
    state that a second forward runs on before the first forward's backward (two batches)."""
    with torch.random.fork_rng(devices=_devices(state[0])):
        torch.manual_seed(0)
        return _run_seeded(steps, state, args, how, second)


def _devices(x: torch.Tensor) -> list[int]:
    return list(range(torch.cuda.device_count())) if x.is_cuda else []


def _run_seeded(steps, state, args, how: dict, second: State | None):
    s0 = state[0].detach().clone().requires_grad_(True)
    s1 = state[1].detach().clone().requires_grad_(True)
    targs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    params = [p for step in steps for p in step.parameters() if p.requires_grad]
    params = list({id(p): p for p in params}.values())
    out = engine.integrate(steps, (s0, s1), args, **how)
    if second is not None:
        engine.integrate(steps, second, args, **how)
    gen = torch.Generator().manual_seed(0)
    cot = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in out]
    loss = sum((o * c).sum() for o, c in zip(out, cot))
    grads = torch.autograd.grad(loss, [s0, s1, *targs, *params], allow_unused=True)
    buffers = [b.detach().clone() for step in steps for b in step.buffers()]
    return [o.detach() for o in out], list(grads), buffers


def _same_function(a, b) -> bool:
    """The same residual function: one object, one bound method of one object, or closures of
    one code over the same cells (``couplings()`` may build its lambdas at every call)."""
    if a is b:
        return True
    if hasattr(a, "__self__") and hasattr(b, "__self__"):
        return a.__self__ is b.__self__ and getattr(a, "__func__", None) is getattr(
            b, "__func__", None)
    code_a, code_b = getattr(a, "__code__", None), getattr(b, "__code__", None)
    if code_a is None or code_a is not code_b:
        return False
    cells_a, cells_b = a.__closure__ or (), b.__closure__ or ()
    return len(cells_a) == len(cells_b) and all(
        x.cell_contents is y.cell_contents for x, y in zip(cells_a, cells_b))


def _same_number(a, b) -> bool:
    """Equal coefficients (a tensor one, such as ``1 - gamma``, may be made anew per call)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and torch.equal(a.detach(), b.detach()))
    return a == b


def _changing_couplings(steps) -> str | None:
    """Why a step's ``couplings()`` describe another map on a second call, or ``None``. The
    engine reads them once per call; the step's own ``forward`` and ``inverse`` read them
    again, so a step whose couplings change does not invert itself."""
    for i, step in enumerate(steps):
        try:
            first, again = tuple(step.couplings()), tuple(step.couplings())
        except Exception as err:
            return f"steps[{i}].couplings() raised {err!r}"
        if len(first) != len(again) or not all(
                a.target == b.target and _same_number(a.alpha, b.alpha)
                and _same_number(a.scale, b.scale) and _same_number(a.shift, b.shift)
                and (a.phi is None) == (b.phi is None)
                and (a.phi is None or _same_function(a.phi, b.phi))
                for a, b in zip(first, again)):
            return (f"steps[{i}].couplings() describes another map on a second call (its "
                    f"targets, coefficients or residual functions changed): a step's couplings "
                    f"must be a function of its state, not of how often they were asked for")
    return None


def check_reversible(
    steps: ReversibleStep | Sequence[ReversibleStep],
    state: State,
    args: tuple = (),
    *,
    rtol: float | None = None,
    frac_bits: int | None = None,
) -> ReversibleCheck:
    """Check a chain of steps (or one step) on ``state = (s0, s1)`` against autograd.

    ``rtol`` is the relative tolerance of the float checks (default ``1e-9`` in float64,
    ``1e-4`` otherwise); exact mode's round trip must be bit-identical and its gradients, of
    the fixed-point forward, must agree with autograd to ``rtol`` times ``2^(53 - F)`` eps
    (they differ from it by the rounding of the states to ``F`` fractional bits). Modules are
    deep-copied for each run, so buffers and parameters of ``steps`` are left as they were.
    """
    if isinstance(steps, ReversibleStep):
        steps = [steps]
    steps = list(engine._check_steps(steps))
    s0, s1 = engine._check_state(state)
    args = tuple(args)
    dtype = s0.dtype
    rtol = (1e-9 if dtype == torch.float64 else 1e-4) if rtol is None else rtol
    bits = engine.default_frac_bits(dtype) if frac_bits is None else frac_bits
    exact_rtol = max(rtol, 2.0 ** (-bits) * 1e4)
    report = ReversibleCheck()

    def fresh():
        return copy.deepcopy(steps)

    changing = _changing_couplings(steps)
    if changing is not None:
        report.failures.append(changing)
    second = (2 * s0, 0.5 * s1)  # another batch, run forward before the first one's backward
    try:
        ref_out, ref_grads, ref_buffers = _run(fresh(), (s0, s1), args, dict(reversible=False))
        ref_two = _run(fresh(), (s0, s1), args, dict(reversible=False), second)[1]
    except Exception as err:  # the check reports, it does not crash on the user's step
        report.failures.append(f"the steps do not run under plain autograd: {err!r}")
        return report
    for name, how, tol in (
        ("float", dict(reversible=True), rtol),
        ("exact", dict(reversible=True, exact=True, frac_bits=frac_bits), exact_rtol),
    ):
        chain = fresh()
        try:
            out, grads, buffers = _run(chain, (s0, s1), args, how)
        except Exception as err:  # the check reports, it does not crash on the user's step
            report.failures.append(f"{name} reversible forward/backward raised {err!r}")
            continue
        try:
            two = _run(fresh(), (s0, s1), args, how, second)[1]
        except Exception as err:
            report.failures.append(f"{name} with two forwards before one backward raised "
                                   f"{err!r}")
            continue
        errs = {
            f"{name} output": _rel(out, ref_out),
            f"{name} gradients": _rel(grads, ref_grads),
            f"{name} gradients, two forwards before one backward": _rel(two, ref_two),
            f"{name} buffers": _rel(buffers, ref_buffers),
        }
        for key, err in errs.items():
            report.errors[key] = err
            if not err <= tol:
                report.failures.append(f"{key} differ from autograd by {err:.3g} > {tol:.3g}")
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=_devices(s0)):
                x = engine.integrate(chain, (s0, s1), args, **how)
                back = engine.reverse(chain, x, args, exact=name == "exact")
        except Exception as err:
            report.failures.append(f"{name} round trip raised {err!r}")
            continue
        if name == "float":
            err = _rel(back, (s0, s1))
            report.errors["float round trip"] = err
            if not err <= tol:
                report.failures.append(f"float round trip off by {err:.3g} > {tol:.3g}")
        else:
            fps = engine.fixed_points(frac_bits, dtype)
            want = [fps[i].decode(fps[i].encode(s), dtype) for i, s in enumerate((s0, s1))]
            same = all(torch.equal(a, b) for a, b in zip(back, want))
            report.errors["exact round trip"] = 0.0 if same else _rel(back, want)
            if not same:
                report.failures.append("exact round trip is not bit-identical")
    return report
