"""``mode.convert``: drop-in Momentum ResNet stages in a CIFAR ResNet and in ``nn.Transformer``.

Ground truth: the original network itself (gamma = 0 must reproduce it), the momentum rule
written out by hand over the original blocks, and plain autograd (reversible backprop must give
the same gradients, float64).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mode
from mode.convert import MomentumStage, MomentumTransformerDecoder, MomentumTransformerEncoder
from mode.models import resnet18

DT = torch.float64


STAGES = ["layer1", "layer2", "layer3", "layer4"]


def tiny_resnet(seed=0):
    torch.manual_seed(seed)
    return resnet18(num_classes=5, width=4).to(DT)


def images(seed=1, batch=4):
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=DT)


def tiny_transformer(seed=0, dropout=0.0, batch_first=False):
    torch.manual_seed(seed)
    return nn.Transformer(d_model=8, nhead=2, num_encoder_layers=3, num_decoder_layers=3,
                          dim_feedforward=16, dropout=dropout, batch_first=batch_first).to(DT)


def sequences(batch_first=False, seed=2):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(6, 3, 8, generator=g, dtype=DT)
    tgt = torch.randn(5, 3, 8, generator=g, dtype=DT)
    if batch_first:
        src, tgt = src.transpose(0, 1).contiguous(), tgt.transpose(0, 1).contiguous()
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=DT)
    src_pad = torch.zeros(3, 6, dtype=torch.bool)
    src_pad[1, -2:] = True  # the second sequence has two padded positions
    return src, tgt, dict(tgt_mask=tgt_mask, src_key_padding_mask=src_pad,
                          memory_key_padding_mask=src_pad)


def assert_same_parameters(a: nn.Module, b: nn.Module):
    pa, pb = list(a.parameters()), list(b.parameters())
    assert len(pa) == len(pb)
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------------------------
# CIFAR ResNet


def test_resnet_gamma_zero_reproduces_the_original_train_and_eval():
    model = tiny_resnet()
    before = copy.deepcopy(model.state_dict())
    conv = mode.convert(model, STAGES, gamma=0.0)
    # the input is unchanged, the weights carried over
    assert all(isinstance(getattr(model, s), nn.Sequential) for s in STAGES)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(isinstance(getattr(conv, s), MomentumStage) for s in STAGES)
    assert_same_parameters(conv, model)
    x = images()
    for train in (True, False, True):
        model.train(train)
        conv.train(train)
        torch.testing.assert_close(conv(x), model(x), rtol=1e-12, atol=1e-12)
    # one train-mode forward updated BatchNorm statistics identically
    bn_model = [m.running_mean for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_conv = [m.running_mean for m in conv.modules() if isinstance(m, nn.BatchNorm2d)]
    torch.testing.assert_close(bn_conv, bn_model, rtol=1e-12, atol=1e-14)


def test_resnet_stage_computes_the_momentum_rule():
    model = tiny_resnet()
    gamma = 0.6
    conv = mode.convert(model, STAGES, gamma=gamma).eval()
    model.eval()
    x = images()
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for s in STAGES:
            blocks = list(getattr(model, s))
            h = blocks[0](h)
            v = torch.zeros_like(h)
            for b in blocks[1:]:
                v = gamma * v + (1 - gamma) * (b(h) - h)
                h = h + v
        ref = model.fc(torch.flatten(model.avgpool(h), 1))
        torch.testing.assert_close(conv(x), ref, rtol=1e-12, atol=1e-12)
        assert (conv(x) - model(x)).abs().max() > 1e-6  # momentum changes the function


def _train(model, x, labels, steps=3, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses, grads = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return losses, grads


def test_resnet_gamma_09_trains_with_reversible_gradients_equal_to_autograd():
    model = tiny_resnet()
    rev = mode.convert(model, STAGES, gamma=0.9, reversible=True).train()
    plain = mode.convert(model, STAGES, gamma=0.9, reversible=False).train()
    assert all(s.momentum.reversible for s in (getattr(rev, n) for n in STAGES))
    x, labels = images(), torch.tensor([0, 1, 2, 3])
    loss_r, grad_r = _train(rev, x, labels)
    loss_p, grad_p = _train(plain, x, labels)
    torch.testing.assert_close(loss_r, loss_p, rtol=1e-10, atol=1e-12)
    for gr, gp in zip(grad_r, grad_p):
        for a, b in zip(gr, gp):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert loss_r[-1] < loss_r[0]  # it trains
    # BatchNorm statistics were updated once per forward, not again during reconstruction
    for a, b in zip(rev.modules(), plain.modules()):
        if isinstance(a, nn.BatchNorm2d):
            torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-10, atol=1e-12)
            assert a.num_batches_tracked == b.num_batches_tracked == 3


def test_resnet_exact_mode_gradients_match_autograd():
    model = tiny_resnet()
    x, labels = images(), torch.tensor([0, 1, 2, 3])
    grads = []
    for opts in (dict(exact=True), dict(reversible=False)):
        conv = mode.convert(model, STAGES, gamma=0.9, **opts)
        nn.functional.cross_entropy(conv(x), labels).backward()
        grads.append([p.grad for p in conv.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_compiled_converted_resnet_gives_autograds_gradients():
    """The kept first block is recomputed through torch.utils.checkpoint, whose context_fn
    dynamo cannot trace: a converted model with its defaults did not compile at all
    (InternalTorchDynamoError). That block now runs eagerly, a graph break."""
    dynamo = pytest.importorskip("torch._dynamo")
    dynamo.reset()
    model = tiny_resnet()
    x, labels = images(), torch.tensor([0, 1, 2, 3])
    grads = []
    for opts, compiled in ((dict(reversible=True), True), (dict(reversible=False), False)):
        conv = mode.convert(model, ["layer1"], gamma=0.9, **opts).train()
        run = torch.compile(conv, backend="aot_eager") if compiled else conv
        nn.functional.cross_entropy(run(x), labels).backward()
        grads.append([p.grad for p in conv.parameters()])
    dynamo.reset()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_switching_to_eval_between_forward_and_backward_gives_autograds_gradients():
    """The kept first block is recomputed by torch.utils.checkpoint, which ran it in eval
    mode then: checkpoint's 'Recomputed values ... different metadata'. Its recomputation
    replays the forward's training flags now."""
    grads = []
    for opts in (dict(reversible=False), dict(reversible=True), dict(exact=True)):
        model = mode.convert(tiny_resnet(), STAGES, gamma=0.8, **opts).train()
        y = model(images())
        model.eval()  # an evaluation between forward and backward
        y.square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for got in grads[1:]:
        for a, b in zip(got, grads[0]):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_keep_first_layer_false():
    model = tiny_resnet()
    # layer1 keeps the shape: every block becomes a momentum layer
    conv = mode.convert(model, ["layer1"], gamma=0.0, keep_first_layer=False)
    assert conv.layer1.first is None and len(conv.layer1.momentum.functions) == 2
    x = images()
    torch.testing.assert_close(conv(x), model(x), rtol=1e-12, atol=1e-12)
    # layer2 starts with a stride-2, channel-doubling block
    with pytest.raises(ValueError, match="stage 'layer2': block 0 .*downsample.*keep_first_layer"):
        mode.convert(model, ["layer2"], keep_first_layer=False)


def test_shape_changing_block_found_at_run_time():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 6)).to(DT)
    conv = mode.convert(model, [""], gamma=0.5, keep_first_layer=False, is_residual=True)
    with pytest.raises(ValueError, match="block 0 of stage ''.*keep_first_layer=True"):
        conv(torch.randn(2, 4, dtype=DT))
    kept = mode.convert(model, [""], gamma=0.5, is_residual=True)
    x = torch.randn(2, 4, dtype=DT)
    h = model[0](x)
    torch.testing.assert_close(kept(x), h + 0.5 * model[1](h), rtol=1e-12, atol=1e-12)


def test_bad_input():
    model = tiny_resnet()
    with pytest.raises(ValueError, match="no module at path 'layer9'.*'layer1'.*'layer4'"):
        mode.convert(model, ["layer9"])
    with pytest.raises(TypeError, match="'fc' is a Linear, not a stage"):
        mode.convert(model, ["fc"])
    with pytest.raises(ValueError, match="twice"):
        mode.convert(model, ["layer1", "layer1"])
    with pytest.raises(ValueError, match="overlap"):
        mode.convert(model, ["layer1", "layer1.0"])
    with pytest.raises(ValueError, match="gamma must lie in"):
        mode.convert(model, STAGES, gamma=1.5)
    with pytest.raises(ValueError, match="gamma = 0"):
        mode.convert(model, STAGES, gamma=0.0, exact=True)
    with pytest.raises(ValueError, match="exact=True needs reversible=True"):
        mode.convert(model, STAGES, reversible=False, exact=True)
    with pytest.raises(TypeError, match="keep_first_layer must be a bool"):
        mode.convert(model, STAGES, keep_first_layer=1)
    with pytest.raises(ValueError, match="at least one"):
        mode.convert(model, [])


class _Scaled(nn.Module):
    """A residual block with a keyword argument: ``x + scale * lin(x)``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, scale):
        return x + scale * self.lin(x)


class _Loop(nn.Module):
    """Owns a ModuleList and loops over it in its own forward, like torch's encoders."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_Scaled() for _ in range(3))

    def forward(self, x, scale):
        for b in self.blocks:
            x = b(x, scale=scale)
        return x


def test_module_list_owned_by_a_custom_loop():
    torch.manual_seed(0)
    net = _Loop().to(DT)
    conv = mode.convert(net, ["blocks"], gamma=0.5, keep_first_layer=False)
    assert isinstance(conv.blocks, nn.ModuleList) and len(conv.blocks) == 1  # the stage
    x, s = torch.randn(2, 4, dtype=DT), torch.tensor(0.7, dtype=DT)
    v, h = torch.zeros_like(x), x
    for b in net.blocks:
        v = 0.5 * v + 0.5 * s * b.lin(h)
        h = h + v
    torch.testing.assert_close(conv(x, s), h, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# nn.Transformer


@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_gamma_zero_reproduces_the_original(batch_first):
    model = tiny_transformer(dropout=0.1, batch_first=batch_first)
    conv = mode.convert(model, ["encoder.layers", "decoder.layers"], gamma=0.0)
    assert isinstance(conv.encoder, MomentumTransformerEncoder)
    assert isinstance(conv.decoder, MomentumTransformerDecoder)
    assert isinstance(model.encoder, nn.TransformerEncoder)  # input unchanged
    assert conv.encoder.layers[0].self_attn.batch_first == batch_first
    assert len(conv.encoder.layers) == 3
    assert_same_parameters(conv, model)
    src, tgt, masks = sequences(batch_first)
    for train in (True, False):
        model.train(train)
        conv.train(train)
        torch.manual_seed(5)
        expected = model(src, tgt, **masks)
        torch.manual_seed(5)  # same dropout masks: the layers draw in the same order
        torch.testing.assert_close(conv(src, tgt, **masks), expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        # inference: the original takes torch's fused attention path (and, batch_first with a
        # padding mask, its nested-tensor path, which zeroes padded memory positions that the
        # decoder then ignores through memory_key_padding_mask)
        torch.testing.assert_close(conv(src, tgt, **masks), model(src, tgt, **masks),
                                   rtol=1e-10, atol=1e-10)


def test_transformer_boolean_masks_and_causal_hints():
    model = tiny_transformer().eval()
    conv = mode.convert(model, ["encoder", "decoder"], gamma=0.0)
    src, tgt, _ = sequences()
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
    src_causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)
    for kw in (dict(tgt_mask=causal), dict(tgt_mask=causal, tgt_is_causal=True),
               dict(src_mask=src_causal, tgt_mask=causal)):
        torch.testing.assert_close(conv(src, tgt, **kw), model(src, tgt, **kw),
                                   rtol=1e-12, atol=1e-12)


def test_transformer_gamma_09_trains_with_reversible_gradients_equal_to_autograd():
    model = tiny_transformer(dropout=0.1)
    paths = ["encoder.layers", "decoder.layers"]
    rev = mode.convert(model, paths, gamma=0.9).train()
    plain = mode.convert(model, paths, gamma=0.9, reversible=False).train()
    src, tgt, masks = sequences()
    target = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(9), dtype=DT)

    def steps(net):
        torch.manual_seed(11)  # dropout: the reversible engine must replay the same masks
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        out = []
        for _ in range(3):
            opt.zero_grad()
            loss = (net(src, tgt, **masks) - target).square().mean()
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in net.parameters()]))
            opt.step()
        return out

    for (lr_, gr), (lp, gp) in zip(steps(rev), steps(plain)):
        torch.testing.assert_close(lr_, lp, rtol=1e-10, atol=1e-12)
        for a, b in zip(gr, gp):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # the encoder is trained through the decoder's memory argument
    enc = rev.encoder.layers[2].linear1.weight
    assert enc.grad is not None and enc.grad.abs().max() > 0


def test_decoder_memory_receives_the_autograd_gradient():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0)
    decoder = nn.TransformerDecoder(layer, num_layers=3).to(DT)
    tgt = torch.randn(5, 2, 8, dtype=DT)
    memory = torch.randn(4, 2, 8, dtype=DT)
    grads = []
    for reversible in (True, False):
        conv = mode.convert(decoder, ["layers"], gamma=0.8, keep_first_layer=False,
                            reversible=reversible)
        assert isinstance(conv, MomentumTransformerDecoder)
        mem = memory.clone().requires_grad_(True)
        conv(tgt, mem, tgt_mask=nn.Transformer.generate_square_subsequent_mask(5, dtype=DT)
             ).square().sum().backward()
        grads.append(mem.grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_transformer_encoder_eval_mode_reversible_forward_reconstructs():
    # In eval mode torch would take its fused attention path when autograd is off (the engine's
    # forward) but not when it is on (the recomputation); the converted layers use one path.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0,
                                       batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False).to(DT).eval()
    src = torch.randn(2, 6, 8, dtype=DT)
    grads = []
    for reversible in (True, False):
        conv = mode.convert(enc, ["layers"], gamma=0.9, reversible=reversible).eval()
        x = src.clone().requires_grad_(True)
        conv(x).square().sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


class _Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x):
        return x + torch.tanh(self.f(x))


def test_learned_gamma_in_a_stage_named_by_index():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(*[_Res() for _ in range(4)]),
                          nn.Linear(4, 2)).to(DT)
    x = torch.randn(5, 3, dtype=DT)
    grads = []
    for reversible in (True, False):
        gamma = nn.Parameter(torch.tensor(0.7, dtype=DT))
        conv = mode.convert(model, ["1"], gamma=gamma, reversible=reversible)
        assert isinstance(conv[1], MomentumStage)
        assert any(p is gamma for p in conv.parameters())
        conv(x).square().sum().backward()
        grads.append(gamma.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    # and against a central finite difference in gamma
    delta = 1e-6
    with torch.no_grad():
        up, down = (mode.convert(model, ["1"], gamma=0.7 + s * delta)(x).square().sum()
                    for s in (1, -1))
    torch.testing.assert_close(grads[0], (up - down) / (2 * delta), rtol=1e-6, atol=1e-8)


def _saved_numel(model, x):
    total = [0]

    def pack(t):
        total[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total[0]


def test_converted_stage_memory_does_not_grow_with_its_depth():
    from mode.models import BasicBlock, ResNet

    x = images().requires_grad_(True)
    saved = {}
    for blocks in (2, 6):
        torch.manual_seed(0)
        model = ResNet(BasicBlock, [1, blocks, 1, 1], width=2).to(DT)
        for reversible in (True, False):
            conv = mode.convert(model, ["layer2"], gamma=0.9, reversible=reversible)
            saved[blocks, reversible] = _saved_numel(conv, x)
    assert saved[2, True] == saved[6, True]
    assert saved[6, False] > saved[2, False]
