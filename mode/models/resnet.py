"""A torchvision-compatible ResNet with a CIFAR stem option (no torchvision import).

The class names, constructor arguments, block attribute names (``conv1``, ``bn1``, ``relu``,
``conv2``, ``bn2``, ``conv3``, ``bn3``, ``downsample``, ``stride``) and network attribute names
(``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1`` .. ``layer4``, ``avgpool``, ``fc``) follow
``torchvision.models.resnet``, so that with ``cifar_stem=False`` and ``width=64`` a torchvision
state dict loads into these models, and ``mode.convert(model, ["layer1", ..., "layer4"])``
works on both.

A residual block computes ``relu(x' + B(x))`` where ``x' = x`` or ``downsample(x)``; the first
block of ``layer2`` .. ``layer4`` halves the spatial size and changes the channel count (this
is the block that ``mode.convert(..., keep_first_layer=True)`` keeps as it is).

``cifar_stem=True`` (the default) replaces the ImageNet stem (7x7 convolution of stride 2 and
a 3x3 max pool) by a 3x3 convolution of stride 1 and no pooling, the usual choice for 32x32
CIFAR images; ``width`` scales every stage (torchvision's ResNets have ``width=64``: stages of
64, 128, 256 and 512 planes), so small widths give tiny networks for tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50", "resnet101"]

NormLayer = Callable[[int], nn.Module]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1,
            dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding ``dilation`` and no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions: ``relu(x' + bn2(conv2(relu(bn1(conv1(x))))))``.

    ``x' = downsample(x)`` when ``downsample`` is given, else ``x``. Input ``(B, inplanes, H, W)``,
    output ``(B, planes, H / stride, W / stride)``.
    """

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError(
                f"BasicBlock only supports groups=1 and base_width=64, got groups={groups}, "
                f"base_width={base_width}"
            )
        if dilation > 1:
            raise ValueError(f"BasicBlock does not support dilation > 1, got dilation={dilation}")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1, 3x3, 1x1 convolutions: ``relu(x' + bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))))``.

    The stride sits on the 3x3 convolution (torchvision's "ResNet V1.5"). Input
    ``(B, inplanes, H, W)``, output ``(B, 4 planes, H / stride, W / stride)``.
    """

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet of He et al. (2016) with torchvision's layout.

    Parameters
    ----------
    block : BasicBlock or Bottleneck
    layers : four ints, the number of blocks of ``layer1`` .. ``layer4``.
    num_classes : output size of ``fc``.
    zero_init_residual : start the last batch norm of every block at zero (blocks start as
        the identity on their residual branch).
    groups, width_per_group, replace_stride_with_dilation, norm_layer : as in torchvision.
    cifar_stem : 3x3 stride-1 stem without max pool (True) or torchvision's ImageNet stem.
    width : planes of the stem and ``layer1``; the stages have ``width * (1, 2, 4, 8)`` planes.
    in_channels : channels of the input images.

    Input ``(B, in_channels, H, W)``, output logits ``(B, num_classes)``.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 num_classes: int = 1000, zero_init_residual: bool = False, groups: int = 1,
                 width_per_group: int = 64,
                 replace_stride_with_dilation: Sequence[bool] | None = None,
                 norm_layer: NormLayer | None = None, *, cifar_stem: bool = True,
                 width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be four block counts >= 1, got {list(layers)}")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive integer, got {width!r}")
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.inplanes = width
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation must be None or three booleans, got "
                f"{replace_stride_with_dilation!r}"
            )
        self.groups = groups
        self.base_width = width_per_group
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1,
                                   bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3,
                                   bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = (nn.Identity() if cifar_stem
                        else nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2,
                                       dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2,
                                       dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2,
                                       dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int = 1, dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation, norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width, dilation=self.dilation,
                                norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]); keyword arguments go to :class:`ResNet`."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, **kwargs)


def resnet34(num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3]); keyword arguments go to :class:`ResNet`."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


def resnet50(num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]); keyword arguments go to :class:`ResNet`."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


def resnet101(num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-101 (Bottleneck, [3, 4, 23, 3]); keyword arguments go to :class:`ResNet`."""
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, **kwargs)
