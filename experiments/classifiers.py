"""The four classifiers of the image-classification study, all from one ResNet.

API (stable: other experiments build on it):

``build_resnet(input_shape, num_classes, *, block="basic", layers=(2, 2, 2, 2), width=16)``
    ``mode.models.ResNet`` with the CIFAR stem for images ``(C, H, W)``; for signals ``(C, L)``
    (MNIST-1D) the same network with 1-d convolutions (:class:`ResNet1d`, same attribute names,
    so ``mode.convert`` treats both alike). ``block="bottleneck"`` with ``layers=(3, 4, 23, 3)``
    and ``width=64`` is ResNet-101.
``momentum_from(resnet, gamma, *, learned_v0=False, reversible=True)``
    ``mode.convert(resnet, STAGES, gamma=gamma, reversible=reversible)`` (the first block of
    every stage kept, ``v_0 = 0``). ``learned_v0=True`` adds, per stage, a fresh block ``B``
    of the stage's kind and sets ``v_0 = B(x_0) - x_0`` (the authors' ``init_speed``: one more
    residual function per stage, learned with the rest).
``with_gamma(model, gamma)``
    A copy of a momentum model with the same weights running at another ``gamma`` (``0``:
    plain autograd).
``revnet_from(resnet)``
    The ResNet with each stage's blocks after the first replaced by a reversible ``mode.RevNet``
    of as many steps; ``F_j, G_j`` are the block's residual branch on half the channels, with
    a hidden width chosen so that the parameter count is the ResNet's (within a few percent).
``count_parameters(model)``; ``STAGES``; ``MODELS`` (the study's model names) and
``build_model(name, resnet, gamma)`` dispatching on them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

import mode
from mode.convert import MomentumStage
from mode.models import BasicBlock, Bottleneck, ResNet

__all__ = ["STAGES", "MODELS", "ResNet1d", "build_resnet", "momentum_from", "with_gamma",
           "revnet_from", "count_parameters", "build_model"]

STAGES = ["layer1", "layer2", "layer3", "layer4"]
#: Model names of the study, in the order of its table.
MODELS = ("resnet", "momentum", "momentum_learned_v0", "revnet")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _init(module: nn.Module) -> nn.Module:
    """The ResNet initialization: Kaiming normal (fan out) convolutions, unit batch norms."""
    for m in module.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


class BasicBlock1d(nn.Module):
    """``relu(x' + bn2(conv2(relu(bn1(conv1(x))))))`` with 1-d convolutions of size 3."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv1d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm1d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv1d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm1d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet1d(nn.Module):
    """A ResNet over signals ``(B, C, L)``: stem, ``layer1`` .. ``layer4`` of
    :class:`BasicBlock1d` (widths ``width * (1, 2, 4, 8)``, stride 2 from ``layer2`` on),
    global average pooling and ``fc``."""

    def __init__(self, layers: Sequence[int], num_classes: int, *, width: int = 16,
                 in_channels: int = 1):
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be four block counts >= 1, got {list(layers)}")
        self.conv1 = nn.Conv1d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        self.relu = nn.ReLU(inplace=True)
        planes = width
        for i, n in enumerate(layers):
            out, stride = width * 2 ** i, 1 if i == 0 else 2
            down = None
            if stride != 1 or planes != out:
                down = nn.Sequential(nn.Conv1d(planes, out, 1, stride, bias=False),
                                     nn.BatchNorm1d(out))
            blocks = [BasicBlock1d(planes, out, stride, down)]
            blocks += [BasicBlock1d(out, out) for _ in range(1, n)]
            setattr(self, STAGES[i], nn.Sequential(*blocks))
            planes = out
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(planes, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_resnet(input_shape: Sequence[int], num_classes: int, *, block: str = "basic",
                 layers: Sequence[int] = (2, 2, 2, 2), width: int = 16) -> nn.Module:
    """A ResNet for inputs of shape ``(C, H, W)`` (images) or ``(C, L)`` (signals)."""
    if block not in ("basic", "bottleneck"):
        raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
    if any(int(n) < 2 for n in layers):
        raise ValueError(f"layers must have at least 2 blocks per stage (the first is kept, the "
                         f"others become momentum or reversible layers), got {list(layers)}")
    if len(input_shape) == 3:
        kind = BasicBlock if block == "basic" else Bottleneck
        return ResNet(kind, list(layers), num_classes=num_classes, cifar_stem=True,
                      width=width, in_channels=int(input_shape[0]))
    if len(input_shape) == 2:
        if block != "basic":
            raise ValueError("signals (C, L) use basic 1-d blocks only, got block='bottleneck'")
        return ResNet1d(layers, num_classes, width=width, in_channels=int(input_shape[0]))
    raise ValueError(f"input_shape must be (C, H, W) or (C, L), got {tuple(input_shape)}")


class InitialVelocity(nn.Module):
    """``v_0 = B(x_0) - x_0`` for a residual block ``B`` that keeps the shape."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) - x


def _fresh_block(block: nn.Module) -> nn.Module:
    """A newly initialized block of ``block``'s kind and shape (shape-keeping: no stride)."""
    inplanes = block.conv1.in_channels
    if isinstance(block, Bottleneck):
        new = Bottleneck(inplanes, block.conv1.out_channels)
    elif isinstance(block, BasicBlock | BasicBlock1d):
        new = type(block)(inplanes, block.conv1.out_channels)
    else:
        raise TypeError(f"no fresh copy for blocks of type {type(block).__name__}")
    return _init(new).to(device=block.conv1.weight.device, dtype=block.conv1.weight.dtype)


def _stages(model: nn.Module):
    for name in STAGES:
        stage = model.get_submodule(name)
        if not isinstance(stage, MomentumStage):
            raise TypeError(f"{name} of this model is a {type(stage).__name__}, not a momentum "
                            "stage: build the model with momentum_from")
        yield name, stage


def momentum_from(resnet: nn.Module, gamma: float, *, learned_v0: bool = False,
                  reversible: bool = True) -> nn.Module:
    """The Momentum ResNet of ``resnet`` (a converted copy; see the module docstring)."""
    model = mode.convert(resnet, STAGES, gamma=gamma, reversible=reversible)
    if learned_v0:
        for _, stage in _stages(model):
            old = stage.momentum
            phi = InitialVelocity(_fresh_block(stage[1]))
            stage.momentum = mode.MomentumResNet(old.functions, old.gamma, init_velocity=phi,
                                                 reversible=old.reversible)
    return model


def with_gamma(model: nn.Module, gamma: float) -> nn.Module:
    """A copy of the momentum model ``model`` (same weights) that runs at ``gamma``."""
    model = copy.deepcopy(model)
    for _, stage in _stages(model):
        old = stage.momentum
        reversible = bool(old.reversible or float(old.gamma) == 0.0) and gamma > 0
        stage.momentum = mode.MomentumResNet(old.functions, gamma,
                                             init_velocity=old.init_velocity,
                                             reversible=reversible)
    return model


def _branch(block: nn.Module, channels: int, hidden: int) -> nn.Module:
    """``block``'s residual branch (convolutions, batch norms, ReLUs) from ``channels`` to
    ``channels`` through ``hidden`` planes."""
    one_d = isinstance(block, BasicBlock1d)
    conv, norm = (nn.Conv1d, nn.BatchNorm1d) if one_d else (nn.Conv2d, nn.BatchNorm2d)
    if isinstance(block, Bottleneck):
        layers = [conv(channels, hidden, 1, bias=False), norm(hidden), nn.ReLU(inplace=True),
                  conv(hidden, hidden, 3, padding=1, bias=False), norm(hidden),
                  nn.ReLU(inplace=True), conv(hidden, channels, 1, bias=False), norm(channels)]
    else:
        layers = [conv(channels, hidden, 3, padding=1, bias=False), norm(hidden),
                  nn.ReLU(inplace=True), conv(hidden, channels, 3, padding=1, bias=False),
                  norm(channels)]
    return _init(nn.Sequential(*layers))


def branch_parameters(block: nn.Module, channels: int, hidden: int) -> int:
    """Parameter count of ``_branch(block, channels, hidden)`` without building it.

    Convolutions have no bias and every batch norm has ``2 C`` parameters: a bottleneck branch
    has ``c h + 9 h^2 + h c + 2 (h + h + c)``, a basic one ``k (c h + h c) + 2 (h + c)`` with
    kernel size ``k = 3`` (1-d) or ``9`` (2-d).
    """
    c, h = channels, hidden
    if isinstance(block, Bottleneck):
        return c * h + 9 * h * h + h * c + 2 * (2 * h + c)
    k = 3 if isinstance(block, BasicBlock1d) else 9
    return k * (c * h + h * c) + 2 * (h + c)


def _matching_hidden(block: nn.Module, channels: int) -> int:
    """The hidden width whose two half-channel branches have ``block``'s parameter count (a
    closed-form count per width, so that ResNet-101's 2048-channel stage is searched at once)."""
    target = count_parameters(block)
    return min(range(1, 4 * channels + 1),
               key=lambda h: abs(2 * branch_parameters(block, channels // 2, h) - target))


def revnet_from(resnet: nn.Module) -> nn.Module:
    """The RevNet of ``resnet`` with its parameter count (see the module docstring)."""
    model = copy.deepcopy(resnet)
    p = next(resnet.parameters())
    for name in STAGES:
        stage = model.get_submodule(name)
        blocks = list(stage.children())
        channels = blocks[1].conv1.in_channels
        if channels % 2:
            raise ValueError(f"{name} has {channels} channels: a RevNet splits them in halves, "
                             "so the width must be even")
        hidden = _matching_hidden(blocks[1], channels)
        F = [_branch(b, channels // 2, hidden) for b in blocks[1:]]
        G = [_branch(b, channels // 2, hidden) for b in blocks[1:]]
        rev = mode.RevNet(F, G, reversible=True).to(device=p.device, dtype=p.dtype)
        setattr(model, name, nn.Sequential(blocks[0], rev))
    return model


def build_model(name: str, resnet: nn.Module, gamma: float = 0.9) -> nn.Module:
    """The study's model ``name`` (one of :data:`MODELS`) built from ``resnet`` (its weights
    are shared by copy, never modified)."""
    if name == "resnet":
        return copy.deepcopy(resnet)
    if name == "momentum":
        return momentum_from(resnet, gamma)
    if name == "momentum_learned_v0":
        return momentum_from(resnet, gamma, learned_v0=True)
    if name == "revnet":
        return revnet_from(resnet)
    raise ValueError(f"model must be one of {', '.join(MODELS)}, got {name!r}")
