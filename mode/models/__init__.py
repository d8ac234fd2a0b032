"""Ready-made network definitions used by the tests, the conversion examples and experiments.

:mod:`mode.models.resnet` is a torchvision-compatible ResNet (same class names, constructor
arguments and attribute names, so torchvision state dicts load into it), with a CIFAR stem
option, written without importing torchvision.
"""

from .resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50, resnet101

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50", "resnet101"]
