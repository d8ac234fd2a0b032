"""``nn.Module`` front ends: every network is a chain of reversible steps run by one engine."""

from .base import ReversibleNet, compile_functions, traceable
from .coupled import HamiltonianNet, LeapfrogNet, MidpointNet, MRevNet, RevNet
from .momentum import MomentumResNet
from .ode import MomentumNeuralODE, NeuralODE

__all__ = [
    "ReversibleNet",
    "MomentumResNet",
    "RevNet",
    "HamiltonianNet",
    "MidpointNet",
    "LeapfrogNet",
    "MRevNet",
    "NeuralODE",
    "MomentumNeuralODE",
    "compile_functions",
    "traceable",
]
