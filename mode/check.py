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


def _run(steps, state, args, how: dict):
    """Forward, a fixed random cotangent, backward: outputs, gradients and buffers. Every run
    starts from the same RNG state (seed 0; the caller's state is restored after), so that
    steps that draw random numbers (dropout) draw the same ones in each run."""
    with torch.random.fork_rng(devices=_devices(state[0])):
        torch.manual_seed(0)
        return _run_seeded(steps, state, args, how)


def _devices(x: torch.Tensor) -> list[int]:
    return list(range(torch.cuda.device_count())) if x.is_cuda else []


def _run_seeded(steps, state, args, how: dict):
    s0 = state[0].detach().clone().requires_grad_(True)
    s1 = state[1].detach().clone().requires_grad_(True)
    targs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    params = [p for step in steps for p in step.parameters() if p.requires_grad]
    params = list({id(p): p for p in params}.values())
    out = engine.integrate(steps, (s0, s1), args, **how)
    gen = torch.Generator().manual_seed(0)
    cot = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in out]
    loss = sum((o * c).sum() for o, c in zip(out, cot))
    grads = torch.autograd.grad(loss, [s0, s1, *targs, *params], allow_unused=True)
    buffers = [b.detach().clone() for step in steps for b in step.buffers()]
    return [o.detach() for o in out], list(grads), buffers


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

    try:
        ref_out, ref_grads, ref_buffers = _run(fresh(), (s0, s1), args, dict(reversible=False))
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
        errs = {
            f"{name} output": _rel(out, ref_out),
            f"{name} gradients": _rel(grads, ref_grads),
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
