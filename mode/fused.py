"""One exact coupling as one compiled loop, for large states.

The exact coupling with a multiplier ``alpha = sign n / d`` (:mod:`mode.exact`),

    q_t <- sign floor((q_t n + c) / d) + shift q_o + round(p 2^F),   c = floor(d / 2),
    w   <- w b + k      (k: the position of q_t in its fibre, b: the fibre's size),

is a dozen elementwise passes over float64 tensors in eager PyTorch (``_Plan.divide``,
``_fibre_of_remainder``, ``InformationBuffer.push``, ``FixedPoint.quantize``, the range check),
and its undo as many. On a state of some MiB every pass costs its memory traffic, so these
passes, not the residual function, made most of exact mode's extra time. Here the same
arithmetic is written once as a function of whole tensors and compiled by ``torch.compile``
(inductor) into one loop that reads and writes each tensor once.

The bits are those of the eager arithmetic: every intermediate is an integer below ``2^53``,
which float64 adds, subtracts and multiplies exactly in any evaluation order, and ``floor(t /
k)`` through a rounded reciprocal (``mode.exact._RECIPROCAL_MAX``) is exact with or without a
fused multiply-add. Inductor compiles without unsafe math (no reassociation), and the sum with
the quantized ``p``, the one addition that may round (a huge or non-finite ``p``, which then
fails the range check), is formed in eager's order. ``tests/test_fused.py`` compares both
paths bit for bit.

Used where the state has at least :data:`MIN_NUMEL` elements (below it, compilation costs
more than it saves), the storage is float64 and ``alpha``'s plan has form ``m`` or ``n``
(every multiplier ``n / d`` with ``n >= 2``, ``n <= 64`` or ``d - n <= 64``); everything else
runs eagerly. ``MODE_FUSED=0`` in the environment, or :data:`ENABLED` set to ``False``, turns it
off; where compilation fails (no C++ compiler, say) a warning says so once and the eager
arithmetic runs.
"""

from __future__ import annotations

import os
import types
import warnings

import torch

from .exact import _is_power_of_two, _plan

__all__ = ["ENABLED", "MIN_NUMEL", "usable", "scale_push_add", "subtract_unscale_pop",
           "checksum"]

ENABLED = os.environ.get("MODE_FUSED", "1") != "0"
MIN_NUMEL = 2**20

_kernels: dict = {}
_failed: list = []  # the first compilation error, once one occurred


def usable(q: torch.Tensor, mult: tuple[int, int, int] | None, storage: torch.dtype) -> bool:
    """Whether the coupling on ``q`` with multiplier ``mult = (sign, n, d)`` runs fused."""
    if not ENABLED or _failed or mult is None or storage != torch.float64:
        return False
    if q.numel() < MIN_NUMEL or q.device.type not in ("cpu", "cuda"):
        return False
    _, n, d = mult
    return n >= 2 and n != d and _plan(n, d).form != "split"


def _floor_div(t, k: int, fast: bool):
    """``floor(t / k)`` as :meth:`mode.exact._Plan._floor_div` computes it: by an exact
    reciprocal (a power of two), a rounded one plus ``1 / (2k)`` (``fast``), or a division."""
    if _is_power_of_two(k):
        return torch.floor(t * (1.0 / k))
    if fast:
        return torch.floor(t * (1.0 / k) + 1.0 / (2 * k))
    return torch.floor(t / k)


def _forward(q, word, p, other, sign, n, d, m, fast, shift, scale):
    c, k = d // 2, d // n
    if m:  # form m: q n + c = q d + (c - q m)
        t = c - q * m
        j = _floor_div(t, d, fast)
        r = t - j * d
        new = q + j
    else:
        t = q * n + c
        new = _floor_div(t, d, fast)
        r = t - new * d
    position = torch.clamp(r - (n - 1), 0, 1) if d < 2 * n else torch.floor(r / n)
    size = torch.clamp((d - k * n + k) - (r - position * n), k, k + 1)
    word.copy_(position + word * size)
    if sign < 0:
        new = -new
    if shift:
        new = new + other * shift
    if p is not None:
        new = new + torch.round(p.to(torch.float64) * scale)
    q.copy_(new)
    return torch.aminmax(new)


def _backward(q, word, p, other, sign, n, d, m, fast, shift, scale):
    c, k = d // 2, d // n
    x = q
    if shift:
        x = x - other * shift
    if p is not None:
        x = x - torch.round(p.to(torch.float64) * scale)
    if sign < 0:
        x = -x
    if m:  # form m: (x d - c) / n = x - (c - x m) / n
        u = c - x * m
        f = _floor_div(u, n, fast)
        low = x - f
    else:  # form n: low = -floor((c - x d) / n)
        u = c - x * d
        f = _floor_div(u, n, fast)
        low = -f
    size = torch.clamp((d - k * n + k) - (u - f * n), k, k + 1)
    quotient = torch.floor(word / size)
    q.copy_(low + (word - quotient * size))
    word.copy_(quotient)


def _kernel(fn, key: tuple):
    """``fn`` compiled with the constants of ``key`` as its defaults, under a code object of its
    own: dynamo keeps its compiled graphs (and counts recompilations) per code object, so that
    the kernels of different multipliers never share one cache or its recompilation limit."""
    kernel = _kernels.get((fn, key))
    if kernel is None:
        sign, n, d, shift, scale = key
        plan = _plan(n, d)  # the form and the division of the eager arithmetic
        m = plan.m if plan.form == "m" else 0
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{len(_kernels)}")
        own = types.FunctionType(code, fn.__globals__, code.co_name,
                                 (sign, n, d, m, plan.fast, shift, scale))
        kernel = _kernels[(fn, key)] = torch.compile(own, dynamic=True, fullgraph=True)
    return kernel


def _run(fn, key, q, word, p, other):
    return _attempt(lambda: _kernel(fn, key)(q, word, p, other))


def _attempt(call):
    """``(call(), True)``, or ``(None, False)`` after the first compilation error (warned
    once; the eager arithmetic runs from then on)."""
    try:
        with torch.no_grad():
            return call(), True
    except Exception as error:
        if _failed:
            raise
        _failed.append(error)
        warnings.warn(f"mode: the fused exact arithmetic could not be compiled ({error!r}); "
                      "exact mode runs it eagerly (slower, the same bits)", RuntimeWarning,
                      stacklevel=4)
        return None, False


def scale_push_add(q, buf, mult, p, other, shift: int, scale: float):
    """``q <- sign round(q n / d) + shift other + round(p scale)`` in place, pushing the fibre
    positions onto ``buf``; returns ``(low, high)``, the range of the new ``q`` (0-dim
    tensors), or ``None`` where the kernel could not be compiled (nothing was changed).

    ``q``: float64 integers (the forward's own), ``p``: the residual (any float dtype, ``q``'s
    shape) or ``None``, ``other``: the state the shift reads (or ``None``)."""
    sign, n, d = mult
    max_base = -(-d // n)
    buf.prepare_push(max_base)
    out, ok = _run(_forward, (sign, n, d, shift, scale), q, buf.word, p, other)
    if ok:
        buf.pushed(max_base)
    return out


def subtract_unscale_pop(q, buf, mult, p, other, shift: int, scale: float) -> bool:
    """The inverse of :func:`scale_push_add`, in place on ``q`` (the caller's own): subtract
    ``shift other + round(p scale)``, pop the fibre positions and restore ``q``. Returns
    whether it ran (``False``: nothing was changed)."""
    sign, n, d = mult
    buf.prepare_pop()
    _, ok = _run(_backward, (sign, n, d, shift, scale), q, buf.word, p, other)
    if ok:
        buf.popped()
    return ok


def _sums(x):
    v = x.to(torch.int64)
    return v.sum(), (v * v).sum()


def checksum(x: torch.Tensor) -> tuple[int, int] | None:
    """``(sum q, sum q^2)`` of the integers ``q`` of ``x``, wrapping modulo ``2^64`` (as
    ``mode.reversible._checksum`` computes them, in any order: wrapping sums are associative),
    in one read of ``x`` and no copy; ``None`` where ``x`` is too small or it cannot run."""
    if not ENABLED or _failed or x.numel() < MIN_NUMEL or x.device.type not in ("cpu", "cuda"):
        return None
    out, ok = _run_sums(x)
    return (int(out[0]), int(out[1])) if ok else None


def _run_sums(x):
    kernel = _kernels.get(_sums)
    if kernel is None:
        kernel = _kernels[_sums] = torch.compile(_sums, dynamic=True, fullgraph=True)
    return _attempt(lambda: kernel(x))
