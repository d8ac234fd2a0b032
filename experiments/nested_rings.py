"""Nested rings: a first-order flow cannot untangle them in the plane, a second-order one can.

Points of an inner disk (class 0) are surrounded by a ring (class 1). Each model transports
the 2-D input x(0) to x(T) and a linear classifier reads x(T). The flow of x' = F(x) is a
homeomorphism of the plane: the image of the ring still surrounds the image of the disk, so
no line separates them unless the flow squeezes the data to extremes. The second-order model
eps x'' + x' = F(x) (from rest) moves the pair (x, x') in four dimensions, so its trajectories
in the plane may cross and the rings can be pulled apart.

Models: ``mode.NeuralODE`` and ``mode.MomentumNeuralODE`` (continuous, fixed-step rk4 of
``mode.odeint``), and the discrete ResNet (gamma = 0) and Momentum ResNet
(``gamma = eps_to_gamma(eps, depth)``) with untied layers f_n = (T/N) F_n.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from torch import nn

import mode

from .common import (
    OKABE_ITO,
    PlaneField,
    Progress,
    color,
    resolve_device,
    save_figure,
    seed_everything,
)

TITLE = "nested rings: (Momentum) Neural ODEs and (Momentum) ResNets, trajectories and regions"
FIGURES = ["nested_rings"]
CAPTION = """
Top: trajectories x(t) in the plane of training points of the inner disk (blue) and the
surrounding ring (vermillion), from x(0) (dots) to x(T) (crosses), with the learned linear
decision boundary at x(T) (dashed). Bottom: decision regions in input space and test
accuracy. First-order models (Neural ODE, ResNet) transport the plane by a homeomorphism, so
the ring keeps surrounding the disk and no line at x(T) separates them; the second-order
models (Momentum Neural ODE, Momentum ResNet) move in (x, x') and separate the classes.
A discrete ResNet can separate them only by leaving that regime: its title reports the
smallest Jacobian determinant of a layer x -> x + f_n(x) on the data; a negative value means
the learned steps fold the plane (they are not invertible and no longer discretize a flow).
"""
REVISION = 2

CONFIGS = {
    "tiny": {"n_train": 128, "n_test": 128, "hidden": 16, "eps": 0.5, "horizon": 1.0,
             "ode_steps": 5, "depth": 5, "iterations": 5, "lr": 0.02, "grid": 30,
             "n_traj": 16},
    "quick": {"n_train": 512, "n_test": 1024, "hidden": 32, "eps": 0.5, "horizon": 1.0,
              "ode_steps": 10, "depth": 10, "iterations": 400, "lr": 0.02, "grid": 120,
              "n_traj": 40},
    "full": {"n_train": 4096, "n_test": 8192, "hidden": 64, "eps": 0.5, "horizon": 1.0,
             "ode_steps": 20, "depth": 20, "iterations": 3000, "lr": 0.01, "grid": 300,
             "n_traj": 60},
}

MODELS = ("Neural ODE", "Momentum Neural ODE", "ResNet", "Momentum ResNet")


def nested_rings(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points: half uniform in the disk r < 0.5 (label 0), half in 1 < r < 1.5 (label 1).

    Radii are drawn so that the density is uniform in area. Returns ``(x (n, 2), y (n,))``.
    """
    n0 = n // 2
    n1 = n - n0
    r0 = 0.5 * np.sqrt(rng.uniform(0, 1, n0))
    r1 = np.sqrt(rng.uniform(1.0**2, 1.5**2, n1))
    r = np.concatenate([r0, r1])
    a = rng.uniform(0, 2 * np.pi, n)
    x = np.stack([r * np.cos(a), r * np.sin(a)], axis=1)
    y = np.concatenate([np.zeros(n0), np.ones(n1)])
    return x.astype(np.float32), y.astype(np.float32)


class Layer(nn.Module):
    """A residual function ``f_n(x) = eta F_n(x)`` of a discrete network."""

    def __init__(self, hidden: int, eta: float):
        super().__init__()
        self.eta = eta
        self.field = PlaneField(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.eta * self.field(None, x)


class Classifier(nn.Module):
    """A transport ``x(0) -> x(T)`` followed by a linear read-out (logit)."""

    def __init__(self, kind: str, config: dict):
        super().__init__()
        self.kind = kind
        T, hidden = config["horizon"], config["hidden"]
        t = torch.linspace(0.0, T, config["ode_steps"] + 1)
        if kind == "Neural ODE":
            self.flow = mode.NeuralODE(PlaneField(hidden), t=t, method="rk4", trajectory=True)
        elif kind == "Momentum Neural ODE":
            self.flow = mode.MomentumNeuralODE(PlaneField(hidden), config["eps"], t=t, method="rk4",
                                               trajectory=True)
        else:
            depth = config["depth"]
            gamma = 0.0 if kind == "ResNet" else mode.eps_to_gamma(config["eps"], depth, T)
            self.gamma = gamma
            layers = [Layer(hidden, T / depth) for _ in range(depth)]
            self.flow = mode.MomentumResNet(layers, gamma, reversible=False)
        self.readout = nn.Linear(2, 1)

    def paths(self, x: torch.Tensor) -> torch.Tensor:
        """States along depth/time, ``(steps + 1, batch, 2)``."""
        if isinstance(self.flow, mode.MomentumResNet):
            return self.flow.trajectory(x)
        return self.flow(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.flow, mode.MomentumResNet):
            end = self.flow(x)
        else:
            end = self.flow(x)[-1]
        return self.readout(end).squeeze(-1)


def plotted(t: torch.Tensor, decimals: int = 4) -> np.ndarray:
    """An array kept only for the figure, rounded (in float64) to keep the JSON small."""
    return np.round(t.detach().cpu().double().numpy(), decimals)


def min_layer_det(flow: mode.MomentumResNet, x: torch.Tensor) -> float:
    """Smallest ``det(I + df_n/dx)`` of the ResNet layers ``x -> x + f_n(x)`` along the data.

    Negative means a layer folds the plane (it is not invertible), so the discrete network has
    left the regime in which it discretizes a flow.
    """
    worst = float("inf")
    states = flow.trajectory(x).detach()
    for n, f in enumerate(flow.functions):
        z = states[n].clone().requires_grad_(True)
        out = z + f(z)
        rows = [torch.autograd.grad(out[:, i].sum(), z, retain_graph=True)[0] for i in range(2)]
        jac = torch.stack(rows, dim=1)  # (batch, 2, 2)
        worst = min(worst, float(torch.linalg.det(jac).min()))
    return worst


def run(config: dict) -> dict:
    device = resolve_device(config["device"])
    rng = seed_everything(config["seed"])
    progress = Progress("nested_rings")
    xtr, ytr = nested_rings(config["n_train"], rng)
    xte, yte = nested_rings(config["n_test"], rng)
    xtr, ytr = torch.tensor(xtr, device=device), torch.tensor(ytr, device=device)
    xte, yte = torch.tensor(xte, device=device), torch.tensor(yte, device=device)
    g = np.linspace(-2.0, 2.0, config["grid"], dtype=np.float32)
    grid = torch.tensor(np.stack(np.meshgrid(g, g), -1).reshape(-1, 2), device=device)
    show = np.concatenate([np.arange(config["n_traj"] // 2),
                           config["n_train"] // 2 + np.arange(config["n_traj"] // 2)])
    out: dict = {"grid_axis": g, "x_train": plotted(xtr), "y_train": ytr.cpu().numpy(),
                 "show": show, "models": {}}
    loss_fn = nn.BCEWithLogitsLoss()
    for k, kind in enumerate(MODELS):
        torch.manual_seed(config["seed"] + k)
        model = Classifier(kind, config).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
        losses = []
        for it in range(config["iterations"]):
            opt.zero_grad()
            loss = loss_fn(model(xtr), ytr)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            progress.every(it, config["iterations"], f"{kind}: iteration",
                           extra=f"loss {losses[-1]:.3f}")
        with torch.no_grad():
            acc_train = float(((model(xtr) > 0).float() == ytr).float().mean())
            acc_test = float(((model(xte) > 0).float() == yte).float().mean())
            prob = torch.sigmoid(model(grid)).reshape(len(g), len(g))
            paths = model.paths(xtr[torch.as_tensor(show, device=device)])
            w = model.readout.weight.squeeze(0)
            b = model.readout.bias
        det = min_layer_det(model.flow, xtr) if kind == "ResNet" else None
        progress(f"{kind}: train accuracy {acc_train:.3f}, test accuracy {acc_test:.3f}")
        out["models"][kind] = {
            "train_accuracy": acc_train,
            "test_accuracy": acc_test,
            "final_loss": losses[-1],
            "loss_curve": losses[:: max(1, len(losses) // 200)],
            "probability_grid": plotted(prob),
            "paths": plotted(paths.permute(1, 0, 2)),  # (n_traj, steps + 1, 2)
            "readout": {"w": w, "b": b},
            "gamma": getattr(model, "gamma", None),
            "min_layer_det": det,
        }
    out["eps"] = config["eps"]
    return out


def plot(results: dict, out_dir) -> list[str]:
    fig, axes = plt.subplots(2, 4, figsize=(13, 6.6))
    g = np.asarray(results["grid_axis"])
    cmap = ListedColormap([OKABE_ITO["skyblue"], OKABE_ITO["orange"]])
    x = np.asarray(results["x_train"])
    y = np.asarray(results["y_train"])
    show = np.asarray(results["show"])
    for j, kind in enumerate(MODELS):
        m = results["models"][kind]
        ax = axes[0, j]
        paths = np.asarray(m["paths"], float)
        for i, p in enumerate(paths):
            c = color("blue") if y[show[i]] == 0 else color("vermillion")
            ax.plot(p[:, 0], p[:, 1], color=c, lw=0.7, alpha=0.8)
            ax.plot(p[0, 0], p[0, 1], ".", color=c, ms=4)
            ax.plot(p[-1, 0], p[-1, 1], "x", color=c, ms=4)
        w = np.asarray(m["readout"]["w"], float)
        b = float(np.asarray(m["readout"]["b"]).reshape(-1)[0])
        lim = np.abs(paths).max() * 1.1 + 1e-9
        xs = np.linspace(-lim, lim, 2)
        if abs(w[1]) > 1e-9:
            ax.plot(xs, -(w[0] * xs + b) / w[1], "--", color=color("black"), lw=1)
        else:
            ax.axvline(-b / w[0], ls="--", color=color("black"), lw=1)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        sub = "" if m.get("gamma") in (None, 0.0) else f", $\\gamma$ = {m['gamma']:.2f}"
        if "Momentum" in kind:
            sub = f" ($\\varepsilon$ = {results['eps']:g}{sub})"
        ax.set_title(f"{kind}{sub}", fontsize=9)
        ax.set_xlabel("$x_1$")
        ax.set_ylabel("$x_2$")
        ax = axes[1, j]
        prob = np.asarray(m["probability_grid"], float)
        ax.contourf(g, g, (prob > 0.5).astype(float), levels=[-0.5, 0.5, 1.5], cmap=cmap,
                    alpha=0.45)
        ax.contour(g, g, prob, levels=[0.5], colors=[color("black")], linewidths=0.8)
        for label, c in ((0, "blue"), (1, "vermillion")):
            sel = y == label
            ax.scatter(x[sel, 0], x[sel, 1], s=3, color=color(c),
                       label="inner disk (class 0)" if label == 0 else "ring (class 1)")
        ax.set_aspect("equal")
        ax.set_xlim(g[0], g[-1])
        ax.set_ylim(g[0], g[-1])
        extra = ""
        if m.get("min_layer_det") is not None:
            extra = f"\nmin det(I + $\\partial f_n$) = {m['min_layer_det']:.2g} on the data"
        ax.set_title(f"test accuracy {100 * m['test_accuracy']:.1f}%{extra}", fontsize=9)
        ax.set_xlabel("input $x_1(0)$")
        ax.set_ylabel("input $x_2(0)$")
    axes[0, 0].plot([], [], ".", color="0.3", label="x(0)")
    axes[0, 0].plot([], [], "x", color="0.3", label="x(T)")
    axes[0, 0].plot([], [], "--", color=color("black"), label="boundary at x(T)")
    axes[0, 0].legend(loc="lower left", fontsize=7)
    axes[1, 0].legend(loc="lower left", fontsize=7, markerscale=3)
    return save_figure(fig, out_dir, "nested_rings")


def summary(results: dict) -> str:
    """One line with the measured numbers, for the README."""
    acc = {k: f"{100 * m['test_accuracy']:.1f}%" for k, m in results["models"].items()}
    det = results["models"]["ResNet"]["min_layer_det"]
    return (f"Nested rings, test accuracy: Neural ODE {acc['Neural ODE']}, Momentum Neural ODE "
            f"{acc['Momentum Neural ODE']}, ResNet {acc['ResNet']} (only by folding the plane: "
            f"min layer det {det:.2f} < 0), Momentum ResNet {acc['Momentum ResNet']}.")
