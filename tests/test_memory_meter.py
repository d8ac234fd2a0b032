"""The peak-memory meter of the experiments, on work whose peak is known by construction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from experiments.memory_meter import measure_peak, step_peak

MIB = 2**20


def _bytes(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.uint8)


def test_peak_of_known_allocations_in_a_known_order():
    def work():
        a = _bytes(1 * MIB)
        b = _bytes(2 * MIB)  # 3 MiB live
        del a  # 2 MiB
        c = _bytes(3 * MIB)  # 5 MiB: the peak
        del b, c
        return _bytes(MIB // 2)  # returned: still live at the end

    out, peak = measure_peak(work, timeline=True)
    assert peak.bytes == 5 * MIB
    assert peak.events == 7  # 4 allocations, 3 frees
    assert peak.timeline[-1][1] == MIB // 2 == out.numel()


def test_memory_allocated_before_the_work_counts_as_held_throughout():
    # The profiler does not see the free of a block it did not see allocated: the CPU figure
    # then keeps it, an upper bound (a training step frees nothing allocated before it).
    held = [_bytes(4 * MIB)]

    def work():
        a = _bytes(1 * MIB)
        held.pop()  # not seen
        b = _bytes(2 * MIB)  # 3 MiB above the start
        del a  # 2 MiB
        return b

    _, peak = measure_peak(work)
    assert peak.bytes == 3 * MIB


class _KnownStep(torch.autograd.Function):
    """Forward: a 3 MiB temporary, then a 1 MiB output. Backward: a 6 MiB temporary live while
    the 1 MiB gradient of ``w`` is allocated."""

    @staticmethod
    def forward(ctx, w):
        tmp = torch.zeros(3 * MIB // 4)
        del tmp
        return w.detach() * 2.0

    @staticmethod
    def backward(ctx, g):
        tmp = torch.zeros(6 * MIB // 4)
        grad = g * 2.0
        del tmp
        return grad


def test_a_training_step_counts_forward_backward_and_the_parameter_gradient():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(MIB // 4))

        def forward(self, x):
            return _KnownStep.apply(self.w)[: x.shape[0]].reshape(x.shape[0], 1)

    model = Model()
    x = torch.zeros(4, 1)
    peak = step_peak(model, x, torch.zeros(4, 1), nn.functional.mse_loss)
    # live at the peak: the forward's 1 MiB output, the 6 MiB temporary and the 1 MiB gradient,
    # plus a few scalars (the loss and its gradient, the 4-element slices)
    assert 8 * MIB <= peak.bytes < 8 * MIB + 4096
    assert model.w.grad is None  # the step leaves nothing behind


def test_an_unsupported_device_is_an_error():
    with pytest.raises(ValueError, match="cpu and cuda"):
        measure_peak(lambda: None, "meta")
