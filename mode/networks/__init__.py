"""``nn.Module`` front ends: every network is a chain of reversible steps run by one engine."""

from .base import ReversibleNet
from .coupled import HamiltonianNet, LeapfrogNet, MidpointNet, MRevNet, RevNet
from .momentum import MomentumResNet

__all__ = [
    "ReversibleNet",
    "MomentumResNet",
    "RevNet",
    "HamiltonianNet",
    "MidpointNet",
    "LeapfrogNet",
    "MRevNet",
]
