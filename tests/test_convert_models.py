"""``mode.models``: the torchvision-compatible ResNet that conversion tests and experiments use.

Ground truth: torchvision's published parameter counts (ResNet-18: 11,689,512; ResNet-50:
25,557,032 with 1000 classes) and its state-dict key names, which a torchvision checkpoint
needs in order to load.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mode
from mode.models import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_torchvision_parameter_counts_and_key_names():
    r18 = resnet18(num_classes=1000, cifar_stem=False)
    assert count(r18) == 11_689_512
    assert count(resnet50(num_classes=1000, cifar_stem=False)) == 25_557_032
    keys = set(r18.state_dict())
    for k in ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.1.bn2.bias",
              "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_mean",
              "layer4.1.conv2.weight", "fc.weight", "fc.bias"):
        assert k in keys
    assert isinstance(r18.maxpool, nn.MaxPool2d) and r18.conv1.kernel_size == (7, 7)
    assert [len(getattr(resnet34(), f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]


def test_cifar_stem_shapes_and_zero_init_residual():
    torch.manual_seed(0)
    model = resnet18(width=4).eval()
    assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, nn.Identity)
    x = torch.randn(2, 3, 8, 8)
    assert model(x).shape == (2, 10)
    h = model.layer1(model.relu(model.bn1(model.conv1(x))))
    assert model.layer2(h).shape == (2, 8, 4, 4)
    # zero_init_residual: every block without downsample is relu(x) on a non-negative x
    zero = ResNet(BasicBlock, [2, 2, 2, 2], width=4, zero_init_residual=True).eval()
    h = torch.relu(torch.randn(2, 4, 8, 8))
    torch.testing.assert_close(zero.layer1[1](h), h)
    zb = ResNet(Bottleneck, [1, 2, 1, 1], width=2, zero_init_residual=True).eval()
    h = torch.relu(torch.randn(2, 16, 4, 4))
    torch.testing.assert_close(zb.layer2[1](h), h)


def test_bottleneck_resnet_converts_with_gamma_zero():
    torch.manual_seed(0)
    model = resnet50(width=2).to(torch.float64)
    conv = mode.convert(model, ["layer1", "layer2", "layer3", "layer4"], gamma=0.0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for train in (True, False):
        model.train(train)
        conv.train(train)
        torch.testing.assert_close(conv(x), model(x), rtol=1e-12, atol=1e-12)


def test_bad_configuration():
    with pytest.raises(ValueError, match="layers must be four"):
        ResNet(BasicBlock, [2, 2, 2])
    with pytest.raises(ValueError, match="width must be a positive integer"):
        resnet18(width=0)
    with pytest.raises(ValueError, match="BasicBlock only supports groups=1"):
        resnet18(groups=2)
