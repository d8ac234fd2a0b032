"""The memory reductions of converted networks change no result.

Ground truth: the same conversion with ``reversible=False`` (plain autograd) and with
``recompute_first_layer=False`` (the kept first blocks stored as autograd stores them).
"""

from __future__ import annotations

import pytest
import torch
from helpers import saved_bytes
from torch import nn

import mode
from experiments.memory_meter import step_peak
from mode.models import BasicBlock, ResNet

STAGES = ["layer1", "layer2", "layer3", "layer4"]


def _model(dtype=torch.float64, dropout=False, seed=0):
    torch.manual_seed(seed)
    model = ResNet(BasicBlock, [2, 3, 2, 2], num_classes=5, width=4).to(dtype)
    if dropout:  # a random first block: recomputation must replay its RNG state
        model.layer2[0].bn1 = nn.Sequential(model.layer2[0].bn1, nn.Dropout(0.3))
    return model.train()


def _step(model, x, y, seed=5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _data(batch=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 3, 8, 8, generator=g, dtype=dtype),
            torch.randint(0, 5, (batch,), generator=g))


@pytest.mark.parametrize("exact", [False, True])
def test_recomputed_first_blocks_give_the_gradients_and_statistics_of_autograd(exact):
    model = _model(dropout=True)
    x, y = _data()
    runs = {}
    for name, opts in {"recompute": dict(exact=exact),
                       "stored": dict(exact=exact, recompute_first_layer=False),
                       "autograd": dict(reversible=False)}.items():
        conv = mode.convert(model, STAGES, gamma=0.9, **opts)
        runs[name] = (_step(conv, x, y), conv)
    (loss_r, grad_r), conv_r = runs["recompute"]
    (loss_s, grad_s), conv_s = runs["stored"]
    (loss_a, grad_a), conv_a = runs["autograd"]
    # recomputing the first blocks is the same arithmetic as storing them: equal bits
    assert torch.equal(loss_r, loss_s)
    for a, b in zip(grad_r, grad_s):
        assert torch.equal(a, b)
    # against autograd: float64 round-off; exact mode also rounds states onto its 2^-32 grid
    rtol, atol = (1e-8, 1e-7) if exact else (1e-12, 1e-12)
    torch.testing.assert_close(loss_r, loss_a, rtol=rtol, atol=0)
    for a, b in zip(grad_r, grad_a):
        torch.testing.assert_close(a, b, rtol=100 * rtol, atol=atol)
    # BatchNorm statistics updated once per step, as autograd updates them
    norms = [[m for m in c.modules() if isinstance(m, nn.BatchNorm2d)]
             for c in (conv_r, conv_s, conv_a)]
    assert len(norms[0]) == len(norms[1]) == len(norms[2]) > 0
    for a, b, c in zip(*norms):
        assert a.num_batches_tracked == b.num_batches_tracked == c.num_batches_tracked == 1
        assert torch.equal(a.running_mean, b.running_mean)
        assert torch.equal(a.running_var, b.running_var)
        torch.testing.assert_close(a.running_mean, c.running_mean, rtol=rtol, atol=100 * atol)
        torch.testing.assert_close(a.running_var, c.running_var, rtol=rtol, atol=100 * atol)


def test_recomputed_first_blocks_keep_only_their_inputs():
    model = _model(torch.float32)
    x, _ = _data(dtype=torch.float32)
    stored, _ = saved_bytes(lambda: mode.convert(model, STAGES, gamma=0.9,
                                                 recompute_first_layer=False)(x))
    recomputed, _ = saved_bytes(lambda: mode.convert(model, STAGES, gamma=0.9)(x))
    # what autograd saves for the four first blocks alone, on their own inputs
    with torch.no_grad():
        h, inputs = model.relu(model.bn1(model.conv1(x))), []
        for s in STAGES:
            inputs.append(h)
            h = getattr(model, s)(h)
    first, _ = saved_bytes(lambda: [getattr(model, s)[0](h) for s, h in zip(STAGES, inputs)])
    # the first blocks' activations are gone; each keeps its input (the previous stage's
    # output, saved by that stage anyway)
    inputs_bytes = sum(h.numel() * h.element_size() for h in inputs)
    assert stored - recomputed >= first - inputs_bytes > 0


@pytest.mark.parametrize("exact", [False, True])
def test_the_peak_of_a_converted_training_step_is_below_the_resnets(exact):
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [8, 8, 8, 8], num_classes=5, width=4).train()
    x, y = _data(batch=16, dtype=torch.float32)
    resnet = step_peak(model, x, y).bytes
    stored = step_peak(mode.convert(model, STAGES, gamma=0.9, exact=exact,
                                    recompute_first_layer=False), x, y).bytes
    converted = step_peak(mode.convert(model, STAGES, gamma=0.9, exact=exact), x, y).bytes
    assert converted < stored
    assert converted < resnet


def test_recompute_first_layer_is_checked_and_off_without_reversible():
    model = _model()
    with pytest.raises(TypeError, match="recompute_first_layer must be a bool"):
        mode.convert(model, STAGES, recompute_first_layer=1)
    plain = mode.convert(model, STAGES, gamma=0.9, reversible=False)
    assert not any(getattr(plain, s).recompute_first_layer for s in STAGES)
    zero = mode.convert(model, STAGES, gamma=0.0)  # gamma = 0 reproduces the original network
    assert not any(getattr(zero, s).recompute_first_layer for s in STAGES)
    assert all(getattr(mode.convert(model, STAGES, gamma=0.5), s).recompute_first_layer
               for s in STAGES)
