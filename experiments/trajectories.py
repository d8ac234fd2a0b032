"""A Momentum Neural ODE and a first-order Neural ODE trained on the same task: cost and paths.

Task: the reflection h(x1, x2) = (-x1, x2) on the unit disk (mean squared error). A flow of
x' = F(x) preserves orientation, so it cannot reflect the plane; the second-order model
eps x'' + x' = F(x) moves in (x, x') and can. Models (one field architecture, 2 -> hidden -> 2,
tanh):

- Neural ODE, dopri5 with torchdiffeq's adjoint;
- Momentum Neural ODE, dopri5 with the adjoint;
- Momentum Neural ODE, the momentum method on a fixed grid with ``adjoint="reversible"``
  (exact reconstruction, memory independent of the number of steps).

Recorded per training iteration: loss, function evaluations forward and backward
(``nfe_forward``, ``nfe_backward``), wall time; and the memory of one forward pass (bytes saved
for backward; on CUDA the peak allocated memory of forward + backward). ``--device cuda`` runs
the same experiment on a GPU (``--full`` sizes).
"""

from __future__ import annotations

import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

import mode

from .common import (
    PlaneField,
    Progress,
    SavedTensorMeter,
    color,
    resolve_device,
    save_figure,
    seed_everything,
)

TITLE = "Momentum Neural ODE vs Neural ODE on one task: trajectories, NFE, time, memory"
FIGURES = ["trajectories"]
CAPTION = """
Learning the reflection (x1, x2) -> (-x1, x2) of the unit disk. Top: trajectories x(t) of test
points (dots at t = 0, crosses at t = 1, circles: targets) for a first-order Neural ODE (dopri5,
adjoint), a Momentum Neural ODE (dopri5, adjoint) and a Momentum Neural ODE integrated by the
momentum method with exact reversible gradients. The first-order flow preserves orientation
and cannot reflect the disk (it collapses it towards the x2 axis); the momentum models can.
Bottom: training loss, function evaluations per iteration (forward solid, backward dashed), and
wall time per iteration with the memory of one forward pass (bytes saved for backward; peak
CUDA memory on a GPU) in the labels.
"""
REVISION = 1

CONFIGS = {
    "tiny": {"n_train": 64, "n_test": 16, "hidden": 16, "eps": 5.0, "iterations": 4,
             "lr": 0.01, "rtol": 1e-3, "atol": 1e-4, "momentum_steps": 10},
    "quick": {"n_train": 256, "n_test": 48, "hidden": 32, "eps": 5.0, "iterations": 200,
              "lr": 0.02, "rtol": 1e-3, "atol": 1e-4, "momentum_steps": 20},
    "full": {"n_train": 8192, "n_test": 96, "hidden": 256, "eps": 5.0, "iterations": 2000,
             "lr": 0.003, "rtol": 1e-4, "atol": 1e-5, "momentum_steps": 50},
}

MODELS = ("Neural ODE (dopri5, adjoint)", "Momentum Neural ODE (dopri5, adjoint)",
          "Momentum Neural ODE (momentum method, reversible)")


def disk(n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` points uniform in the unit disk, ``(n, 2)``."""
    r = torch.sqrt(torch.rand(n, generator=gen))
    a = 2 * torch.pi * torch.rand(n, generator=gen)
    return torch.stack([r * torch.cos(a), r * torch.sin(a)], 1)


def reflect(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor([-1.0, 1.0], dtype=x.dtype, device=x.device)


def build(name: str, config: dict) -> nn.Module:
    field = PlaneField(config["hidden"])
    tol = {"rtol": config["rtol"], "atol": config["atol"]}
    if name.startswith("Neural ODE"):
        return mode.NeuralODE(field, method="dopri5", adjoint=True, **tol)
    if "dopri5" in name:
        return mode.MomentumNeuralODE(field, config["eps"], method="dopri5", adjoint=True, **tol)
    h = 1.0 / config["momentum_steps"]
    return mode.MomentumNeuralODE(field, config["eps"], method="momentum",
                                  options={"step_size": h}, adjoint="reversible")


def run(config: dict) -> dict:
    device = resolve_device(config["device"])
    seed_everything(config["seed"])
    progress = Progress("trajectories")
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(config["seed"])
    x_train = disk(config["n_train"], gen).to(device)
    x_test = disk(config["n_test"], gen).to(device)
    y_train, y_test = reflect(x_train), reflect(x_test)
    t_path = torch.linspace(0, 1, 41, device=device)
    out: dict = {"x_test": x_test, "y_test": y_test, "models": {}, "device": str(device)}
    for name in MODELS:
        torch.manual_seed(config["seed"] + 1)  # the same initial field for every model
        model = build(name, config).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
        losses, nfe_f, nfe_b, times = [], [], [], []
        for it in range(config["iterations"]):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = ((model(x_train) - y_train) ** 2).sum(-1).mean()
            loss.backward()
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            nfe_f.append(model.nfe_forward)
            nfe_b.append(model.nfe_backward)
            progress.every(it, config["iterations"], f"{name}: iteration",
                           extra=f"loss {losses[-1]:.4f}, NFE {nfe_f[-1]}+{nfe_b[-1]}")
        # memory of one forward pass (and the CUDA peak of forward + backward)
        params = list(model.parameters())
        meter = SavedTensorMeter(exclude=params)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with meter.measure():
            loss = ((model(x_train) - y_train) ** 2).sum(-1).mean()
        loss.backward()
        peak = torch.cuda.max_memory_allocated() - base if cuda else None
        opt.zero_grad()
        with torch.no_grad():
            test_mse = float(((model(x_test) - y_test) ** 2).sum(-1).mean())
            # the paths, on a dense output grid (same solver and tolerances)
            model.trajectory = True
            path = model(x_test, t_path)
            model.trajectory = False
        out["models"][name] = {
            "loss_curve": losses, "nfe_forward": nfe_f, "nfe_backward": nfe_b,
            "time_per_iteration_s": float(np.median(times)),
            "total_train_time_s": float(np.sum(times)),
            "saved_bytes_forward": meter.bytes, "cuda_peak_bytes": peak,
            "test_mse": test_mse, "final_loss": losses[-1],
            "paths": path.permute(1, 0, 2),
        }
        progress(f"{name}: test MSE {test_mse:.4f}, NFE/iteration "
                 f"{np.mean(nfe_f):.0f}+{np.mean(nfe_b):.0f}, "
                 f"{1e3 * np.median(times):.1f} ms/iteration, saved {meter.bytes / 1024:.0f} KiB")
    return out


def plot(results: dict, out_dir) -> list[str]:
    fig, axes = plt.subplots(2, 3, figsize=(12.5, 8))
    y = np.asarray(results["y_test"], float)
    angle = np.arctan2(np.asarray(results["x_test"])[:, 1], np.asarray(results["x_test"])[:, 0])
    order = np.argsort(angle)
    short = ["Neural ODE\n(dopri5, adjoint)", "Momentum Neural ODE\n(dopri5, adjoint)",
             "Momentum Neural ODE\n(momentum method, reversible)"]
    circle = np.linspace(0, 2 * np.pi, 200)
    for j, name in enumerate(MODELS):
        m = results["models"][name]
        ax = axes[0, j]
        ax.plot(np.cos(circle), np.sin(circle), color="0.7", lw=0.8)
        paths = np.asarray(m["paths"], float)
        for rank, i in enumerate(order):
            c = plt.cm.viridis(rank / max(1, len(order) - 1))
            ax.plot(paths[i, :, 0], paths[i, :, 1], color=c, lw=0.8)
            ax.plot(paths[i, 0, 0], paths[i, 0, 1], ".", color=c, ms=4)
            ax.plot(paths[i, -1, 0], paths[i, -1, 1], "x", color=c, ms=4)
            ax.plot(y[i, 0], y[i, 1], "o", mfc="none", color=c, ms=5)
        ax.set_aspect("equal")
        ax.set_title(f"{short[j]}: test MSE {m['test_mse']:.3f}", fontsize=9)
        ax.set_xlabel("$x_1$")
        ax.set_ylabel("$x_2$")
    axes[0, 0].plot([], [], ".", color="0.3", label="x(0)")
    axes[0, 0].plot([], [], "x", color="0.3", label="x(1)")
    axes[0, 0].plot([], [], "o", mfc="none", color="0.3", label="target (-x1, x2)")
    axes[0, 0].legend(fontsize=7, loc="lower left")

    labels = ["Neural ODE", "Momentum NODE, dopri5", "Momentum NODE, reversible"]
    ax = axes[1, 0]
    for j, name in enumerate(MODELS):
        ax.semilogy(results["models"][name]["loss_curve"], color=color(j), label=labels[j])
    ax.set_xlabel("training iteration")
    ax.set_ylabel("training MSE")
    ax.set_title("training loss")
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    for j, name in enumerate(MODELS):
        m = results["models"][name]
        ax.plot(m["nfe_forward"], color=color(j), lw=1.2, label=f"{labels[j]}, forward")
        ax.plot(m["nfe_backward"], "--", color=color(j), lw=1.2, label=f"{labels[j]}, backward")
    ax.set_xlabel("training iteration")
    ax.set_ylabel("function evaluations per pass")
    ax.set_title("NFE")
    ax.legend(fontsize=6)
    ax = axes[1, 2]
    for j, name in enumerate(MODELS):
        m = results["models"][name]
        mem = m["cuda_peak_bytes"] if m["cuda_peak_bytes"] is not None else m[
            "saved_bytes_forward"]
        ax.bar(j, 1e3 * m["time_per_iteration_s"], color=color(j))
        ax.text(j, 1e3 * m["time_per_iteration_s"], f"{mem / 1024:.0f} KiB", ha="center",
                va="bottom", fontsize=7)
    ax.set_xticks(range(len(MODELS)))
    ax.set_xticklabels([lab.replace(", ", "\n") for lab in labels], fontsize=7)
    ax.set_ylabel("median time per iteration (ms)")
    what = "peak CUDA memory" if any(
        results["models"][n]["cuda_peak_bytes"] is not None for n in MODELS) else (
        "saved for backward")
    ax.set_title(f"time per iteration on {results['device']} (labels: {what})", fontsize=9)
    return save_figure(fig, out_dir, "trajectories")


def summary(results: dict) -> str:
    """One line with the measured numbers, for the README."""
    parts = []
    for name, short in zip(MODELS, ("Neural ODE", "Momentum NODE (dopri5)",
                                    "Momentum NODE (reversible)"), strict=True):
        m = results["models"][name]
        parts.append(f"{short} MSE {m['test_mse']:.3f}, NFE {np.mean(m['nfe_forward']):.0f}+"
                     f"{np.mean(m['nfe_backward']):.0f}, {1e3 * m['time_per_iteration_s']:.0f} ms")
    return "Learning a reflection of the disk (test MSE, NFE forward+backward, time per " \
        "iteration): " + "; ".join(parts) + "."
