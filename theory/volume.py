"""A RevNet-type step for the volume comparison (claim 7).

    x1 <- x1 + F(x2);    x2 <- x2 + G(x1)

Two additive couplings with ``alpha = 1``: the Jacobian is a product of unit block-triangular
matrices, so ``det = 1`` (volume preserving), whereas a momentum step has ``det = gamma^d``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mode.steps import Coupling, ReversibleStep

__all__ = ["RevNetStep"]


class RevNetStep(ReversibleStep):
    """RevNet step on ``(x1, x2)``: ``x1 += F(x2)``, then ``x2 += G(x1)``."""

    def __init__(self, F: Callable[[torch.Tensor], torch.Tensor],
                 G: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.F = F
        self.G = G

    def couplings(self) -> Sequence[Coupling]:
        return (Coupling(target=0, alpha=1.0, phi=self.F),
                Coupling(target=1, alpha=1.0, phi=self.G))
