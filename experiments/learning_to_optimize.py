"""Learning to optimize: unrolled, learned gradient steps as the layers of a residual network.

A family of problems min_z L(z; A, b) (least squares, and l2-regularized logistic regression)
is solved by a network whose layers are one learned gradient-like step g(z) = -P grad L(z),
P a learned d x d matrix shared by all layers (weight-tied, so depth = number of iterations):

- ResNet:          z <- z + g(z)                                  (learned gradient descent)
- Momentum ResNet: v <- gamma v + (1 - gamma) g(z); z <- z + v    (learned heavy ball)
- RevNet:          w <- w + g(z);  z <- z + Q w                   (state (w, z), Q learned)
- Hamiltonian:     z <- z + Q w;   w <- w + g(z)                  (Verlet, state (z, w))

All start from z = 0 (and w = v = 0), are trained at one depth to minimize the mean
suboptimality L(z_N) - L*, and are then unrolled deeper. The determinant argument: a RevNet
or Hamiltonian layer is a composition of shears, so |det J| = 1 for its Jacobian J at every
point. At a fixed point (z*, 0) the eigenvalues of J multiply to +-1 in modulus, so they
cannot all lie inside the unit disc: the fixed point is never attracting, and the iterates do
not converge to the minimizer. A momentum layer has det J = gamma^d < 1 for any P, so its
spectral radius can be, and after training is, below 1.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

import mode
from mode.steps import apply_step

from .common import Progress, color, resolve_device, save_figure, seed_everything

TITLE = "learning to optimize: momentum converges, volume-preserving networks cannot"
FIGURES = ["learning_to_optimize"]
CAPTION = """
Mean suboptimality L(z_n) - L* over held-out problems against the number of unrolled layers n,
for least squares (left) and l2-regularized logistic regression (right). Each network's layer is
one learned gradient-like step z -> z - P grad L(z) (P shared by all layers), trained at the depth
marked by the vertical line and then unrolled further. ResNet (learned gradient descent) and
Momentum ResNet (learned heavy ball) converge to the minimizer; RevNet and the Hamiltonian
network cannot. Determinant argument: their layers are compositions of shears, so the layer
Jacobian has |det J| = 1 everywhere; at a fixed point the eigenvalues of J multiply to modulus 1,
so they cannot all lie inside the unit disc and the fixed point cannot attract the iterates. A
momentum layer has det J = gamma^d < 1 whatever P, and can contract. The legend gives |det J|
and the largest spectral radius rho(J) of each trained layer at the minimizers of 8 held-out
problems (for the ResNet, J is that of z -> z - P grad L(z)).
"""
REVISION = 1

CONFIGS = {
    "tiny": {"dim": 4, "samples": 8, "n_train": 8, "n_test": 8, "train_depth": 4,
             "eval_depth": 12, "iterations": 5, "lr": 0.01, "gamma": 0.8, "l2": 0.1},
    "quick": {"dim": 10, "samples": 40, "n_train": 64, "n_test": 64, "train_depth": 15,
              "eval_depth": 200, "iterations": 300, "lr": 0.01, "gamma": 0.8, "l2": 0.1},
    "full": {"dim": 50, "samples": 200, "n_train": 512, "n_test": 512, "train_depth": 20,
             "eval_depth": 1000, "iterations": 2000, "lr": 0.005, "gamma": 0.8, "l2": 0.1},
}

ARCHITECTURES = ("ResNet", "Momentum ResNet", "RevNet", "Hamiltonian net")
PROBLEMS = ("least squares", "logistic regression")


# ------------------------------------------------------------------------------------------
# the problems: A (P, m, d), b (P, m); z (P, d)


def objective(problem: str, z: torch.Tensor, A: torch.Tensor, b: torch.Tensor, l2: float):
    """``L(z)`` per problem, shape ``(P,)``."""
    r = torch.einsum("pmd,pd->pm", A, z)
    if problem == "least squares":
        return 0.5 * ((r - b) ** 2).sum(-1)
    return nn.functional.softplus(-b * r).mean(-1) + 0.5 * l2 * (z**2).sum(-1)


def gradient(problem: str, z: torch.Tensor, A: torch.Tensor, b: torch.Tensor, l2: float):
    """``grad L(z)``, shape ``(P, d)`` (closed form)."""
    r = torch.einsum("pmd,pd->pm", A, z)
    if problem == "least squares":
        return torch.einsum("pmd,pm->pd", A, r - b)
    s = -b * torch.sigmoid(-b * r) / A.shape[1]
    return torch.einsum("pmd,pm->pd", A, s) + l2 * z


def minimizer(problem: str, A: torch.Tensor, b: torch.Tensor, l2: float) -> torch.Tensor:
    """``z*`` per problem: least squares by ``lstsq``, logistic regression by Newton."""
    if problem == "least squares":
        return torch.linalg.lstsq(A, b.unsqueeze(-1)).solution.squeeze(-1)
    z = torch.zeros(A.shape[0], A.shape[2], dtype=A.dtype, device=A.device)
    eye = torch.eye(A.shape[2], dtype=A.dtype, device=A.device)
    for _ in range(50):
        r = torch.einsum("pmd,pd->pm", A, z)
        w = torch.sigmoid(r) * torch.sigmoid(-r) / A.shape[1]
        H = torch.einsum("pmd,pm,pme->pde", A, w, A) + l2 * eye
        z = z - torch.linalg.solve(H, gradient(problem, z, A, b, l2))
    return z


def sample(problem: str, n: int, d: int, m: int, gen: torch.Generator, dtype, device):
    A = torch.randn(n, m, d, generator=gen, dtype=dtype) / m**0.5
    truth = torch.randn(n, d, generator=gen, dtype=dtype)
    noise = 0.1 * torch.randn(n, m, generator=gen, dtype=dtype)
    r = torch.einsum("pmd,pd->pm", A, truth) + noise
    b = r if problem == "least squares" else torch.sign(r)
    return A.to(device), b.to(device)


# ------------------------------------------------------------------------------------------
# the layers


class GradientStep(nn.Module):
    """``g(z) = -grad L(z) P^T`` on ``(P, d)``; ``P`` learned, shared by every layer."""

    def __init__(self, problem: str, dim: int, scale: float, l2: float, dtype):
        super().__init__()
        self.problem, self.l2 = problem, l2
        self.P = nn.Parameter(scale * torch.eye(dim, dtype=dtype))

    def forward(self, z: torch.Tensor, A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return -gradient(self.problem, z, A, b, self.l2) @ self.P.T


class Coupling(nn.Module):
    """``w -> w Q^T`` (the coupling of the auxiliary state back into the iterate)."""

    def __init__(self, dim: int, dtype):
        super().__init__()
        self.Q = nn.Parameter(torch.eye(dim, dtype=dtype))

    def forward(self, w: torch.Tensor, A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return w @ self.Q.T


class Negated(nn.Module):
    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f

    def forward(self, *args):
        return -self.f(*args)


class Unrolled(nn.Module):
    """One architecture with its tied layer; ``path(depth, A, b)`` gives ``z_0 .. z_depth``."""

    def __init__(self, arch: str, problem: str, config: dict, dtype):
        super().__init__()
        d = config["dim"]
        self.arch, self.d, self.gamma = arch, d, config["gamma"]
        scale = 0.3 if problem == "least squares" else 1.0
        if arch == "Momentum ResNet":
            scale = scale / (1 - self.gamma)  # the momentum rule multiplies g by (1 - gamma)
        self.step = GradientStep(problem, d, scale, config["l2"], dtype)
        self.coupling = Coupling(d, dtype) if arch in ("RevNet", "Hamiltonian net") else None

    def net(self, depth: int) -> nn.Module:
        if self.arch == "ResNet":
            return mode.MomentumResNet([self.step] * depth, 0.0, reversible=False)
        if self.arch == "Momentum ResNet":
            return mode.MomentumResNet([self.step] * depth, self.gamma, reversible=False)
        if self.arch == "RevNet":  # (x1, x2) = (w, z): w <- w + g(z); z <- z + Q w
            return mode.RevNet([self.step] * depth, [self.coupling] * depth, reversible=False)
        # Hamiltonian, (Y, Z) = (z, w), h = 1: z <- z + Q w; w <- w - (-g(z))
        return mode.HamiltonianNet([self.coupling] * depth, [Negated(self.step)] * depth, 1.0,
                                   reversible=False)

    def _input(self, A: torch.Tensor) -> torch.Tensor:
        z0 = torch.zeros(A.shape[0], self.d, dtype=A.dtype, device=A.device)
        return torch.cat([z0, z0], 1) if self.arch == "RevNet" else z0

    def final(self, depth: int, A, b) -> torch.Tensor:
        out = self.net(depth)(self._input(A), A, b)
        return out[:, self.d:] if self.arch == "RevNet" else out

    def path(self, depth: int, A, b) -> torch.Tensor:
        out = self.net(depth).trajectory(self._input(A), A, b)
        return out[..., self.d:] if self.arch == "RevNet" else out

    def layer_jacobian(self, z_star: torch.Tensor, A, b) -> torch.Tensor:
        """Jacobian of one layer on its full state pair at the fixed point (one problem).

        For the ResNet (whose velocity slot is overwritten, gamma = 0) it is the Jacobian of
        ``z -> z + g(z)`` alone.
        """
        if self.arch == "ResNet":
            return torch.autograd.functional.jacobian(
                lambda z: (z + self.step(z.unsqueeze(0), A, b)).squeeze(0), z_star)
        step = self.net(1).chain()[0]
        d = self.d
        zero = torch.zeros_like(z_star)
        pair = {"RevNet": (zero, z_star)}.get(self.arch, (z_star, zero))

        def one(s: torch.Tensor) -> torch.Tensor:
            s0, s1 = apply_step(step, (s[:d].unsqueeze(0), s[d:].unsqueeze(0)), (A, b))
            return torch.cat([s0.squeeze(0), s1.squeeze(0)])

        return torch.autograd.functional.jacobian(one, torch.cat(pair))


def run(config: dict) -> dict:
    device = resolve_device(config["device"])
    seed_everything(config["seed"])
    progress = Progress("learning_to_optimize")
    dtype = torch.float64
    gen = torch.Generator().manual_seed(config["seed"])
    out: dict = {"train_depth": config["train_depth"], "eval_depth": config["eval_depth"],
                 "gamma": config["gamma"], "problems": {}}
    for problem in PROBLEMS:
        dims = (config["dim"], config["samples"], gen, dtype, device)
        A, b = sample(problem, config["n_train"], *dims)
        At, bt = sample(problem, config["n_test"], *dims)
        l2 = config["l2"]
        L_star = objective(problem, minimizer(problem, A, b, l2), A, b, l2)
        zt_star = minimizer(problem, At, bt, l2)
        Lt_star = objective(problem, zt_star, At, bt, l2)
        assert float(gradient(problem, zt_star, At, bt, l2).abs().max()) < 1e-8
        res = {}
        for arch in ARCHITECTURES:
            model = Unrolled(arch, problem, config, dtype).to(device)
            opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
            for it in range(config["iterations"]):
                opt.zero_grad()
                z = model.final(config["train_depth"], A, b)
                loss = (objective(problem, z, A, b, l2) - L_star).mean()
                loss.backward()
                opt.step()
                progress.every(it, config["iterations"], f"{problem}, {arch}: iteration",
                               chunks=2, extra=f"suboptimality {loss.item():.3g}")
            with torch.no_grad():
                path = model.path(config["eval_depth"], At, bt)  # (N + 1, P, d)
                sub = torch.stack([objective(problem, zn, At, bt, l2) - Lt_star for zn in path])
            dets, radii = [], []
            for k in range(min(8, config["n_test"])):
                J = model.layer_jacobian(zt_star[k], At[k:k + 1], bt[k:k + 1]).detach()
                dets.append(float(torch.linalg.det(J).abs()))
                radii.append(float(torch.linalg.eigvals(J).abs().max()))
            res[arch] = {
                "suboptimality": sub.mean(1).clamp_min(0.0),
                "final_suboptimality": float(sub[-1].mean()),
                "at_train_depth": float(sub[config["train_depth"]].mean()),
                "abs_det_jacobian": float(np.median(dets)),
                "abs_det_jacobian_all": dets,
                "spectral_radius": max(radii),
                "spectral_radius_all": radii,
            }
            progress(f"{problem}, {arch}: suboptimality {res[arch]['at_train_depth']:.2e} at "
                     f"depth {config['train_depth']}, {res[arch]['final_suboptimality']:.2e} "
                     f"at {config['eval_depth']}; |det J| = {res[arch]['abs_det_jacobian']:.3g},"
                     f" rho(J) = {res[arch]['spectral_radius']:.4f}")
        out["problems"][problem] = res
    return out


def plot(results: dict, out_dir) -> list[str]:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    styles = {"ResNet": "--", "Momentum ResNet": "-", "RevNet": "-.", "Hamiltonian net": ":"}
    for ax, problem in zip(axes, PROBLEMS, strict=True):
        for i, (arch, r) in enumerate(results["problems"][problem].items()):
            s = np.asarray(r["suboptimality"], float)
            n = np.arange(len(s))
            ax.semilogy(n[1:], np.maximum(s[1:], 1e-17), styles[arch], color=color(i), lw=1.5,
                        label=f"{arch}: |det J| = {r['abs_det_jacobian']:.2g}, "
                              f"max $\\rho$(J) = {r['spectral_radius']:.3f}")
        ax.axvline(results["train_depth"], color="0.4", lw=0.8)
        ax.text(results["train_depth"], ax.get_ylim()[1], " trained depth", va="top",
                fontsize=7, color="0.3")
        ax.set_xlabel("unrolled layers n (iterations)")
        ax.set_ylabel("mean suboptimality $L(z_n) - L^*$")
        ax.set_title(problem)
        ax.legend(fontsize=7, loc="lower left")
    return save_figure(fig, out_dir, "learning_to_optimize")


def summary(results: dict) -> str:
    """One line with the measured numbers, for the README."""
    ls = results["problems"]["least squares"]
    n = results["eval_depth"]

    def fmt(x: float) -> str:
        return f"{x:.0e}" if x > 1e-15 else "< 1e-15 (round-off)"

    return (f"Unrolled learned gradient steps, least-squares suboptimality at depth {n}: ResNet "
            f"{fmt(ls['ResNet']['final_suboptimality'])}, Momentum ResNet "
            f"{fmt(ls['Momentum ResNet']['final_suboptimality'])}, RevNet "
            f"{ls['RevNet']['final_suboptimality']:.1f}, Hamiltonian "
            f"{ls['Hamiltonian net']['final_suboptimality']:.1f} (|det J| = 1 forbids an "
            f"attracting fixed point).")
