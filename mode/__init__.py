"""mode: Momentum ResNets and the neural second-order ODE ``eps x'' + x' = f(x, theta)``.

A model is a vector field, an integrator and a gradient strategy:

- :mod:`mode.conventions` -- the one mapping between momentum ``gamma``, mass ``eps`` and step;
- :mod:`mode.steps` -- invertible one-step maps written as additive couplings;
- :mod:`mode.exact` -- fixed-point arithmetic with an information buffer (bit-exact reversal);
- :mod:`mode.fused` -- one exact coupling as one compiled loop for large states (the same bits);
- :mod:`mode.reversible` -- the depth-independent-memory backprop engine over a chain of steps;
- :mod:`mode.traced` -- its float backward as part of a ``torch.compile`` graph (``fullgraph``);
- :mod:`mode.check` -- ``check_reversible``: a user's own steps against autograd;
- :mod:`mode.networks` -- ``nn.Module`` front ends (``MomentumResNet``, ``RevNet``, ...,
  ``NeuralODE``);
- :mod:`mode.solve` -- ``odeint``: torchdiffeq methods and the momentum method side by side;
- :mod:`mode.convert` -- drop-in conversion of an existing network's residual stages.
"""

from . import exact, reversible
from .check import ReversibleCheck, check_reversible
from .conventions import eps_to_gamma, gamma_to_eps
from .convert import convert  # the function; the module is mode.convert's namesake
from .networks import (
    HamiltonianNet,
    LeapfrogNet,
    MidpointNet,
    MomentumNeuralODE,
    MomentumResNet,
    MRevNet,
    NeuralODE,
    ReversibleNet,
    RevNet,
    compile_functions,
    traceable,
)
from .solve import odeint
from .steps import Coupling, MomentumStep, ReversibleStep

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # conventions
    "gamma_to_eps",
    "eps_to_gamma",
    # the step protocol and the engine
    "Coupling",
    "ReversibleStep",
    "MomentumStep",
    "exact",
    "reversible",
    "check_reversible",
    "ReversibleCheck",
    # networks
    "ReversibleNet",
    "MomentumResNet",
    "RevNet",
    "HamiltonianNet",
    "MidpointNet",
    "LeapfrogNet",
    "MRevNet",
    "NeuralODE",
    "MomentumNeuralODE",
    # continuous solvers and conversion
    "odeint",
    "convert",
    "compile_functions",
    "traceable",
]
