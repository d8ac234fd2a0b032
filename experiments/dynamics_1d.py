"""Learning h(x) = -x^3 on [-1, 1]: first-order trajectories cannot cross, momentum ones can.

One weight-tied residual function F(x) = W2 tanh(W1 x + b1) + b2 (1 -> 16 -> 1) is repeated
over depth N = 15 on the horizon [0, T], following the one convention of ``mode``:
f_n = (T / N) F. With gamma = 0 this is a ResNet (the forward Euler scheme of x' = F(x));
with gamma = 0.99 a Momentum ResNet (eps x'' + x' = F(x), eps = gamma_to_eps(gamma, N, T)).

h reverses the order of the real line. The flow of a first-order ODE preserves order
(two trajectories meeting would have to coincide), and so does a ResNet whose steps are small
(x + (T/N) F(x) is increasing when (T/N) F' > -1); the velocity of a Momentum ResNet lets
trajectories pass each other. The experiment counts crossings among 8 inputs.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

import mode

from .common import Progress, color, resolve_device, save_figure, seed_everything

TITLE = "learning h(x) = -x^3: ResNet vs Momentum ResNet trajectories in depth"
FIGURES = ["dynamics_1d"]
CAPTION = """
Trajectories x_n of 8 inputs through a weight-tied residual MLP (1-16-1, tanh) of depth 15
trained to map x to -x^3 on [-1, 1]: a ResNet (left) and a Momentum ResNet with gamma = 0.99
(middle); right, the learned maps against the target. First-order trajectories cannot cross,
so a ResNet can only approximate this order-reversing map by a flat compromise; momentum
trajectories cross and fit it. The legend of the right panel gives the final mean squared errors.
"""
REVISION = 1

CONFIGS = {
    "tiny": {"depth": 15, "hidden": 16, "gamma": 0.99, "horizon": 1.0, "n_train": 64,
             "iterations": 30, "lr": 0.05, "n_show": 8},
    "quick": {"depth": 15, "hidden": 16, "gamma": 0.99, "horizon": 1.0, "n_train": 256,
              "iterations": 1500, "lr": 0.05, "n_show": 8},
    "full": {"depth": 15, "hidden": 16, "gamma": 0.99, "horizon": 1.0, "n_train": 1024,
             "iterations": 6000, "lr": 0.01, "n_show": 8},
}


def target(x: torch.Tensor) -> torch.Tensor:
    """h(x) = -x^3."""
    return -(x**3)


class ScaledMLP(nn.Module):
    """f(x) = eta F(x), F(x) = W2 tanh(W1 x + b1) + b2 acting on ``(batch, 1)``."""

    def __init__(self, hidden: int, eta: float):
        super().__init__()
        self.eta = eta
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.eta * self.net(x)


def build(config: dict, gamma: float) -> mode.MomentumResNet:
    """A weight-tied network: the same residual module at every one of ``depth`` layers."""
    eta = config["horizon"] / config["depth"]
    f = ScaledMLP(config["hidden"], eta)
    return mode.MomentumResNet([f] * config["depth"], gamma, reversible=False)


def count_crossings(traj: np.ndarray) -> int:
    """Pairs of trajectories (columns of ``traj``, shape ``(N + 1, k)``) whose order flips."""
    k = traj.shape[1]
    crossings = 0
    for i in range(k):
        for j in range(i + 1, k):
            d = np.sign(traj[:, i] - traj[:, j])
            d = d[d != 0]
            crossings += int(np.sum(d[1:] != d[:-1]))
    return crossings


def run(config: dict) -> dict:
    device = resolve_device(config["device"])
    progress = Progress("dynamics_1d")
    x_train = torch.linspace(-1, 1, config["n_train"], device=device).unsqueeze(1)
    y_train = target(x_train)
    x_show = torch.linspace(-1, 1, config["n_show"], device=device).unsqueeze(1)
    x_grid = torch.linspace(-1, 1, 201, device=device).unsqueeze(1)
    out: dict = {"x_show": x_show.squeeze(1), "x_grid": x_grid.squeeze(1),
                 "target_grid": target(x_grid).squeeze(1), "models": {}}
    for label, gamma in (("ResNet", 0.0), ("Momentum ResNet", config["gamma"])):
        seed_everything(config["seed"])  # both models start from the same weights
        net = build(config, gamma).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=config["lr"])
        losses = []
        for it in range(config["iterations"]):
            opt.zero_grad()
            loss = torch.mean((net(x_train) - y_train) ** 2)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            progress.every(it, config["iterations"], f"{label} iteration",
                           extra=f"loss {losses[-1]:.4g}")
        with torch.no_grad():
            traj = net.trajectory(x_show).squeeze(-1)  # (N + 1, n_show)
            final = float(torch.mean((net(x_train) - y_train) ** 2))
            learned = net(x_grid).squeeze(1)
        traj_np = traj.cpu().numpy()
        out["models"][label] = {
            "gamma": gamma,
            "eps": None if gamma == 0 else mode.gamma_to_eps(gamma, config["depth"],
                                                             config["horizon"]),
            "final_mse": final,
            "loss_curve": losses[:: max(1, len(losses) // 300)],
            "trajectories": traj_np.T,  # (n_show, N + 1)
            "crossings": count_crossings(traj_np),
            "learned_grid": learned,
        }
    # the best order-preserving (non-decreasing) fit of -x^3 on a symmetric grid is h = 0
    out["monotone_floor_mse"] = float(torch.mean(y_train**2))
    return out


def plot(results: dict, out_dir) -> list[str]:
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    x_show = np.asarray(results["x_show"])
    for ax, label in zip(axes[:2], ("ResNet", "Momentum ResNet"), strict=True):
        m = results["models"][label]
        traj = np.asarray(m["trajectories"], float)
        depth = np.arange(traj.shape[1])
        for i, row in enumerate(traj):
            ax.plot(depth, row, color=color(i), lw=1.4)
            ax.plot(depth[-1], -(x_show[i] ** 3), "o", mfc="none", color=color(i), ms=5)
        title = label if m["gamma"] == 0 else f"{label} ($\\gamma$ = {m['gamma']:g})"
        ax.set_title(f"{title}: {m['crossings']} crossings")
        ax.set_xlabel("layer n (depth)")
        ax.set_ylabel("state $x_n$")
    axes[1].plot([], [], "o", mfc="none", color="0.3", label="target $-x_0^3$")
    axes[1].legend(loc="lower left")
    ax = axes[2]
    xg = np.asarray(results["x_grid"])
    ax.plot(xg, results["target_grid"], color=color("black"), lw=2, ls="--",
            label="target $h(x) = -x^3$")
    for i, label in enumerate(("ResNet", "Momentum ResNet")):
        m = results["models"][label]
        ax.plot(xg, m["learned_grid"], color=color(i), lw=1.6,
                label=f"{label} (MSE {m['final_mse']:.2g})")
    ax.set_xlabel("input $x_0$")
    ax.set_ylabel("output $x_N$")
    ax.set_title("learned maps")
    ax.legend(loc="upper right")
    return save_figure(fig, out_dir, "dynamics_1d")


def summary(results: dict) -> str:
    """One line with the measured numbers, for the README."""
    r, m = results["models"]["ResNet"], results["models"]["Momentum ResNet"]
    return (f"Learning x -> -x^3: ResNet trajectories never cross ({r['crossings']} crossings) and "
            f"stall at MSE {r['final_mse']:.3f} (the best order-preserving fit, "
            f"{results['monotone_floor_mse']:.3f}); Momentum ResNet trajectories cross "
            f"({m['crossings']} crossings) and reach MSE {m['final_mse']:.1e}.")
