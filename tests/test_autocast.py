"""Mixed precision and the device path of the reversible engine.

Casting policy under test: the states ``(x, v)`` keep their dtype, exact mode's fixed-point
integers (held in float64) and its information buffer keep theirs; the residual functions run
under the autocast state of the forward, which the backward's recomputation replays. Every test
runs on the CPU and, where present, on CUDA (the ``device`` fixture of conftest.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mode
from mode.exact import FixedPoint
from mode.reversible import ReconstructionWarning, information_buffer

WIDTH, DEPTH, BATCH = 16, 50, 8
HALF = [torch.bfloat16, torch.float16]


def _functions(depth: int = DEPTH, dropout: float = 0.0, seed: int = 2) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.Tanh(), nn.Dropout(dropout),
                          nn.Linear(2 * WIDTH, WIDTH)) for _ in range(depth)]


def _grads(fs, x, *, autocast=None, dtype=None, seed=None, **flags):
    """Gradients of ``sum x_N^2`` w.r.t. ``x0`` and every parameter (``autocast``: the dtype of
    autocast on ``x``'s device; ``dtype``: the model and input in that dtype, no autocast)."""
    net = mode.MomentumResNet(fs, 0.9, **flags).to(x.device)
    if dtype is not None:
        net, x = net.to(dtype), x.to(dtype)
    xx = x.detach().clone().requires_grad_(True)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.autocast(x.device.type, autocast or torch.bfloat16, enabled=autocast is not None):
        out = net(xx)
    return out, torch.autograd.grad(out.float().pow(2).sum(), [xx, *net.parameters()])


def _error(got, want) -> float:
    """Largest relative error (2-norm, in float64) over the gradient tensors."""
    return max(float((a.double() - b.double()).norm() / b.double().norm())
               for a, b in zip(got, want))


def _x(device) -> torch.Tensor:
    return torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(0)).to(device)


@pytest.mark.parametrize("half", HALF)
def test_float_reversal_follows_autograd_under_the_same_autocast(device, half):
    """Depth 50: the reversible float gradients are autograd's under the same autocast to
    float reversal's accuracy (measured 1e-3 on the CPU), well inside what autocast itself
    changes for bf16 (7e-3 against no autocast); the state stays float32."""
    fs, x = _functions(), _x(device)
    out, want = _grads(fs, x, autocast=half, reversible=False)
    got_out, got = _grads(fs, x, autocast=half, reversible=True)
    assert out.dtype == got_out.dtype == torch.float32
    assert torch.equal(out, got_out)  # the forward is the same arithmetic
    assert _error(got, want) < 1e-2


@pytest.mark.parametrize("half", HALF)
def test_exact_mode_under_autocast(device, half):
    """Exact mode under autocast: the round trip is bit-exact, the backward's reconstruction is
    verified bit-exact (it raises otherwise), its gradients are deterministic and follow
    autograd's under the same autocast; integers and buffer keep float64."""
    fs, x = _functions(), _x(device)
    net = mode.MomentumResNet(fs, 0.9, exact=True).to(device)
    with torch.autocast(device.type, half):
        xN, vN = net(x, return_velocity=True)
        record = information_buffer(xN, vN)
        x0, v0 = net.inverse(xN, vN)
    fp = FixedPoint(32)
    assert torch.equal(x0, fp.decode(fp.encode(x), x.dtype)) and not v0.any()
    assert xN.dtype == torch.float32
    assert all(q.dtype == torch.float64 for q in record.final)
    assert record.buffer.word.dtype == torch.float64
    _, want = _grads(fs, x, autocast=half, reversible=False)
    _, got = _grads(fs, x, autocast=half, exact=True)
    _, again = _grads(fs, x, autocast=half, exact=True)
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    assert _error(got, want) < 2e-3  # measured on the CPU: bf16 2e-6, fp16 4e-4


def _scaled_step(net, x, device, scale: float):
    """One GradScaler step under fp16 autocast on ``mean x_N^2``; returns the scaler, the
    unscaled parameter gradients and the parameters before the step."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device.type, init_scale=scale)
    with torch.autocast(device.type, torch.float16):
        loss = net(x).float().pow(2).mean()
    before = [p.detach().clone() for p in net.parameters()]
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grads = [p.grad.clone() for p in net.parameters()]
    scaler.step(opt)
    scaler.update()
    return scaler, grads, before


@pytest.mark.parametrize("exact", [False, True])
def test_grad_scaler_with_fp16(device, exact):
    """``torch.amp.GradScaler`` around a reversible network under fp16 autocast: the unscaled
    gradients are autograd's of the unscaled loss and the step is taken; with a scale so large
    that fp16 gradients overflow, the infinities reach the parameters' gradients through the
    reversible backward, and the scaler skips the step and lowers the scale."""
    fs, x = _functions(depth=8), _x(device)
    ref = mode.MomentumResNet(fs, 0.9, reversible=False).to(device)
    with torch.autocast(device.type, torch.float16):
        loss = ref(x).float().pow(2).mean()
    want = torch.autograd.grad(loss, list(ref.parameters()))
    net = mode.MomentumResNet(fs, 0.9, exact=exact).to(device)
    scaler, got, before = _scaled_step(net, x, device, 2.0**12)
    assert _error(got, want) < 1e-3
    assert scaler.get_scale() == 2.0**12  # no inf or nan found
    assert all(not torch.equal(p, b) for p, b in zip(net.parameters(), before))
    scaler, _, before = _scaled_step(net, x, device, 2.0**40)
    assert scaler.get_scale() == 2.0**39
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


@pytest.mark.parametrize("half", HALF)
def test_pure_half_models(device, half):
    """A model and input in bf16/fp16 (no autocast). Exact mode works: its gradients are no
    further from float64 autograd than autograd in that dtype is. Float reversal works at
    depth 4 and is refused loudly at depth 50 (a ReconstructionWarning naming exact=True), where
    it is indeed wrong."""
    x = _x(device)
    for depth in (4, DEPTH):
        fs = _functions(depth)
        _, truth = _grads(fs, x, dtype=torch.float64, reversible=False)
        _, plain = _grads(fs, x, dtype=half, reversible=False)
        _, exact = _grads(fs, x, dtype=half, exact=True)
        budget = _error(plain, truth)
        assert _error(exact, truth) < 1.5 * budget, depth
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, floats = _grads(fs, x, dtype=half, reversible=True)
        warned = [w for w in caught if issubclass(w.category, ReconstructionWarning)]
        if depth == DEPTH:
            assert warned and "exact=True" in str(warned[0].message)
            assert _error(floats, truth) > 0.1  # the warning is deserved
        else:
            assert _error(floats, truth) < 2 * budget


@pytest.mark.parametrize("flags", [dict(reversible=True), dict(exact=True)])
def test_dropout_random_numbers_are_replayed(device, flags):
    """Dropout in train mode: the recomputation replays the forward's RNG state (the CUDA
    generator on a GPU), so the reversible gradients are autograd's for the same mask."""
    fs, x = _functions(depth=6, dropout=0.5), _x(device)
    out, want = _grads(fs, x, seed=5, reversible=False)
    got_out, got = _grads(fs, x, seed=5, **flags)
    assert torch.allclose(out, got_out, rtol=1e-5, atol=1e-6)
    assert _error(got, want) < 1e-4
    _, other = _grads(fs, x, seed=6, reversible=False)
    assert _error(other, want) > 1e-2  # another mask: the comparison can tell


class _Noisy(nn.Module):
    """``f(x) = tanh(W x) + noise``: a stand-in for a non-deterministic kernel, a different
    tiny perturbation at every call (from its own generator, invisible to the RNG replay, and
    no Python attribute that changes: the engine cannot tell it from a kernel's own)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)
        self.gen = None

    def forward(self, x):
        if self.gen is None or self.gen.device != x.device:
            self.gen = torch.Generator(device=x.device).manual_seed(0)
        noise = torch.randn(x.shape, generator=self.gen, device=x.device, dtype=x.dtype)
        return torch.tanh(self.lin(x)) + 1e-7 * noise


def test_non_deterministic_function_is_reported_in_exact_mode(device):
    """A residual function that differs between the forward and the recomputation makes the
    exact reconstruction miss the input; the error names the fix."""
    torch.manual_seed(0)
    net = mode.MomentumResNet([_Noisy() for _ in range(4)], 0.9, exact=True).to(device)
    x = _x(device).requires_grad_(True)
    loss = net(x).pow(2).sum()
    with pytest.raises(RuntimeError) as err:
        loss.backward()
    said = str(err.value)
    assert "non-deterministic" in said
    assert "torch.use_deterministic_algorithms(True)" in said
    assert "torch.backends.cudnn.benchmark = False" in said
    # the same network without the noise passes: the check fires on non-determinism only
    for f in net.functions:
        f.forward = lambda x, f=f: torch.tanh(f.lin(x))
    net(x).pow(2).sum().backward()
