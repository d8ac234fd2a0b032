"""``nn.Module`` front ends: every network is a chain of reversible steps run by one engine."""

from .base import ReversibleNet
from .momentum import MomentumResNet

__all__ = ["ReversibleNet", "MomentumResNet"]
