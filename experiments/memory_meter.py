"""Peak memory of a piece of work, typically one training step: every allocation counts.

    peak = max over t of (bytes allocated at t) - (bytes allocated when the work started)

so a tensor that lives only for a moment inside forward or backward (a recomputed block, a
temporary of exact arithmetic, a parameter gradient) counts exactly like one kept to the end.

- CPU: the allocation and free events of ``torch.profiler`` (``profile_memory=True``), summed in
  time order. Every tensor storage taken from PyTorch's CPU allocator is an event; memory that
  a library manages outside it (oneDNN scratch pads, Python objects) is not. The profiler does
  not see the free of a block allocated before it started, so such a block counts as held
  throughout (an upper bound; :func:`step_peak` frees nothing allocated before the step).
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the bytes
  allocated at the start.

:func:`step_peak` measures one training step (forward, loss, backward; parameter gradients
are set to ``None`` first, so that their allocation is part of the step).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

__all__ = ["Peak", "measure_peak", "step_peak"]


class Peak(NamedTuple):
    """``bytes``: the peak increase; ``events``: allocation events seen (CPU; 0 on CUDA);
    ``timeline``: ``(t_ns, bytes)`` after each event (CPU, when asked for), ``t`` from the start."""

    bytes: int
    events: int
    timeline: list[tuple[int, int]] | None


def _cpu_memory_events(prof) -> list[tuple[int, int]]:
    """``(start_ns, nbytes)`` of the CPU allocations (> 0) and frees (< 0), in time order."""
    out = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    out.sort(key=lambda item: item[0])
    return out


def measure_peak(work: Callable[[], object], device: torch.device | str = "cpu", *,
                 timeline: bool = False) -> tuple[object, Peak]:
    """Run ``work()`` and return ``(its result, Peak)``.

    The result is returned, not dropped, so memory it keeps alive is not freed inside the window.
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = work()
        torch.cuda.synchronize(device)
        return result, Peak(int(torch.cuda.max_memory_allocated(device) - start), 0, None)
    if device.type != "cpu":
        raise ValueError(f"measure_peak supports cpu and cuda devices, got {device}")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = work()
    events = _cpu_memory_events(prof)
    level = peak = 0
    line = [] if timeline else None
    t0 = events[0][0] if events else 0
    for t, nbytes in events:
        level += nbytes
        peak = max(peak, level)
        if line is not None:
            line.append((t - t0, level))
    return result, Peak(int(peak), len(events), line)


def step_peak(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
              loss_fn: Callable = nn.functional.cross_entropy, *,
              timeline: bool = False) -> Peak:
    """Peak memory of one training step ``loss_fn(model(x), target).backward()``.

    Parameter gradients are reset to ``None`` first (their allocation belongs to the step) and
    again after, so the step leaves nothing behind.
    """
    model.zero_grad(set_to_none=True)

    def work():
        loss = loss_fn(model(x), target)
        loss.backward()
        return None

    _, peak = measure_peak(work, x.device, timeline=timeline)
    model.zero_grad(set_to_none=True)
    return peak
