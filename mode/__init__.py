"""mode: Momentum ResNets and the neural second-order ODE ``eps x'' + x' = f(x, theta)``.

A model is a vector field, an integrator and a gradient strategy:

- :mod:`mode.conventions` -- the one mapping between momentum ``gamma``, mass ``eps`` and step;
- :mod:`mode.steps` -- invertible one-step maps written as additive couplings;
- :mod:`mode.exact` -- fixed-point arithmetic with an information buffer (bit-exact reversal);
- :mod:`mode.reversible` -- the depth-independent-memory backprop engine over a chain of steps;
- :mod:`mode.networks` -- ``nn.Module`` front ends (``MomentumResNet``, ...).
"""

from . import exact, reversible
from .conventions import eps_to_gamma, gamma_to_eps
from .networks import MomentumResNet, ReversibleNet
from .steps import Coupling, MomentumStep, ReversibleStep

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "gamma_to_eps",
    "eps_to_gamma",
    "Coupling",
    "ReversibleStep",
    "MomentumStep",
    "MomentumResNet",
    "ReversibleNet",
    "exact",
    "reversible",
]

from .convert import convert  # noqa: E402  (the function shadows the submodule's name)
from .networks.coupled import HamiltonianNet, LeapfrogNet, MidpointNet, MRevNet, RevNet  # noqa: E402

__all__ += ["RevNet", "HamiltonianNet", "MidpointNet", "LeapfrogNet", "MRevNet", "convert"]
from .networks.ode import MomentumNeuralODE, NeuralODE  # noqa: E402
from .solve import odeint  # noqa: E402

__all__ += ["odeint", "NeuralODE", "MomentumNeuralODE"]
