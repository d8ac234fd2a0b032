"""Linear representability: Psi_eps on the real line, m_eps, and fitting D = diag(-1, 1).

With linear residual functions F(x) = theta x on [0, 1] from rest, the second-order model maps
x(0) to Psi_eps(theta) x(0) (Psi_0 = expm). On the real line Psi_eps takes every value in
[m_eps, inf) (``theory.min_gain``), with m_eps < 0 for eps > 0: momentum reaches negative
gains, first-order models never do.

Training: weight-tied linear networks of depth N (and their N = inf limits expm(theta) and
Psi_eps(theta)) fit D = diag(-1, 1) up to a positive scale. The loss is 1 - cos(M, D) (cosine
of the Frobenius angle between the network's matrix M and D); the figure shows the
scale-invariant residual min over lambda > 0 of ||lambda M - D|| / ||D|| = sqrt(1 - cos_+^2).
Any M with det M > 0 has cos(M, D) <= 1/sqrt(2), a floor of sqrt(1/2) that ResNets (det > 0
for a tied even-depth ResNet and for expm) cannot pass; Momentum ResNets can reach 0.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

import mode
import theory
from theory.range import min_gain_point

from .common import Progress, color, resolve_device, save_figure, seed_everything

TITLE = ("representability: Psi_eps, m_eps, the depth-N range, and fitting diag(-1, 1) up to "
         "scale")
FIGURES = ["representability"]
CAPTION = """
(a) Psi_eps(z), the gain of eps x'' + x' = z x on [0, 1] from rest, for several eps (eps = 0:
exp z), with its minimum m_eps marked: the 1-D range is [m_eps, inf). (b) m_eps against eps
(theory.min_gain): negative for every eps > 0, decreasing towards -1. (c) Training weight-tied
linear networks of depth N (and the N = inf models expm(theta), Psi_eps(theta)) to fit
D = diag(-1, 1) up to a positive factor: the scale-invariant residual of ResNets stalls at the
det > 0 floor sqrt(1/2), Momentum ResNets go to 0. (d) Finite depth: the infimum over real
theta of the depth-N gain P_N(theta) (linear Momentum ResNet, f_n = theta x / N,
gamma = 1 - 1/(N eps), v0 = 0; theory.discrete_min_gain, exact from the critical points) for even
N (solid; odd N: -inf, the range is all of R) and the minimum of P_N on the window
[z* - 1, z* + 1] around the ODE's minimiser (dotted), against the ODE's m_eps (dashed): the window
minimum tends to m_eps, the global one decreases like -N (its minimiser theta ~ -N^2 sits where
the scheme is unstable), so m_eps > -1 is a property of the ODE only. (e) The verdicts of
theory's claim-by-claim report (python -m theory).
"""
REVISION = 2

CONFIGS = {
    "tiny": {"eps_curves": [0.0, 0.5], "eps_range": [0.01, 1.0, 100.0], "depths": [8],
             "eps_depth": [0.5], "even_depths": [2, 4, 8],
             "eps_train": 0.5, "iterations": 20, "lr": 0.05, "report": False},
    "quick": {"eps_curves": [0.0, 0.1, 0.5, 1.0, 5.0],
              "eps_range": np.logspace(-3, 3, 31).tolist(), "depths": [8, 32],
              "eps_depth": [0.5, 2.0, 5.0], "even_depths": [2, 4, 8, 16, 32, 64, 128, 256],
              "eps_train": 0.5, "iterations": 600, "lr": 0.05, "report": True},
    "full": {"eps_curves": [0.0, 0.05, 0.1, 0.5, 1.0, 5.0, 20.0],
             "eps_range": np.logspace(-4, 4, 81).tolist(), "depths": [8, 32, 128],
             "eps_depth": [0.5, 2.0, 5.0],
             "even_depths": [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024],
             "eps_train": 0.5, "iterations": 3000, "lr": 0.02, "report": True},
}

TARGET = torch.diag(torch.tensor([-1.0, 1.0], dtype=torch.float64))


class LinearField(nn.Module):
    """``f(x) = eta x theta^T`` on rows ``x`` of shape ``(batch, 2)`` (weight-tied)."""

    def __init__(self, theta: nn.Parameter, eta: float):
        super().__init__()
        self.theta = theta
        self.eta = eta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.eta * x @ self.theta.T


def network_matrix(theta: nn.Parameter, kind: str, depth: float, eps: float) -> torch.Tensor:
    """The 2x2 linear map of a model: a tied (Momentum) ResNet of ``depth`` or its ODE limit."""
    eye = torch.eye(2, dtype=theta.dtype, device=theta.device)
    if math.isinf(depth):
        if kind == "ResNet":
            return torch.linalg.matrix_exp(theta)
        zero = torch.zeros_like(theta)
        block = torch.cat([torch.cat([zero, eye], 1), torch.cat([theta / eps, -eye / eps], 1)], 0)
        return torch.linalg.matrix_exp(block)[:2, :2]
    depth = int(depth)
    gamma = 0.0 if kind == "ResNet" else mode.eps_to_gamma(eps, depth)
    net = mode.MomentumResNet([LinearField(theta, 1.0 / depth)] * depth, gamma, reversible=False)
    return net(eye).T  # rows are images of the basis vectors


def cosine(M: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    return (M * D).sum() / (M.norm() * D.norm())


def residual(M: torch.Tensor, D: torch.Tensor) -> float:
    """``min_{lambda >= 0} ||lambda M - D|| / ||D||`` (``lambda = <M, D>_+ / |M|^2``)."""
    lam = torch.clamp((M * D).sum() / (M * M).sum(), min=0.0)
    return float((lam * M - D).norm() / D.norm())


def run(config: dict) -> dict:
    device = resolve_device(config["device"])
    seed_everything(config["seed"])
    progress = Progress("representability")
    z = np.linspace(-30.0, 3.0, 1201)
    curves = {}
    for eps in config["eps_curves"]:
        curves[str(eps)] = {
            "psi": theory.psi(z, eps),
            "m_eps": None if eps == 0 else theory.min_gain(eps),
            "z_min": None if eps == 0 else float(z[np.argmin(theory.psi(z, eps))]),
        }
    m_range = [theory.min_gain(e) for e in config["eps_range"]]
    finite = {}
    for e in config["eps_depth"]:
        m, z_star = min_gain_point(e)
        window = z_star + np.linspace(-1.0, 1.0, 2001)
        depths = [n for n in config["even_depths"] if n * e >= 1]
        finite[str(e)] = {
            "m_eps": m, "depths": depths,
            "global": [theory.discrete_min_gain(e, n) for n in depths],
            "window": [float(np.min(theory.discrete_psi(window, e, n))) for n in depths],
            "odd": [theory.discrete_min_gain(e, n + 1) for n in depths],
        }

    eps = config["eps_train"]
    D = TARGET.to(device)
    training = {}
    init = 0.1 * torch.randn(2, 2, dtype=torch.float64)
    for kind in ("ResNet", "Momentum ResNet"):
        for depth in [*config["depths"], math.inf]:
            theta = nn.Parameter(init.clone().to(device))
            opt = torch.optim.Adam([theta], lr=config["lr"])
            res = []
            for _ in range(config["iterations"]):
                opt.zero_grad()
                M = network_matrix(theta, kind, depth, eps)
                (1 - cosine(M, D)).backward()
                opt.step()
                res.append(residual(M.detach(), D))
            with torch.no_grad():
                M = network_matrix(theta, kind, depth, eps)
            label = f"{kind}, N = {'inf (ODE)' if math.isinf(depth) else int(depth)}"
            training[label] = {
                "kind": kind, "depth": None if math.isinf(depth) else int(depth),
                "residual_curve": res, "final_residual": residual(M, D),
                "matrix": M, "det": float(torch.linalg.det(M)),
            }
            progress(f"{label}: final residual {training[label]['final_residual']:.3g}")
    lam, th = theory.representable_scale(TARGET.numpy(), eps)
    out = {
        "z": z, "curves": curves, "eps_range": config["eps_range"], "m_range": m_range,
        "eps_train": eps, "training": training, "floor": math.sqrt(0.5), "finite_depth": finite,
        "theory": {
            "first_order_representable": bool(theory.is_representable(TARGET.numpy(), 0.0)),
            "momentum_scale": float(lam), "momentum_theta": th,
            "momentum_check_error": float(np.abs(theory.psi(th, eps) - lam * TARGET.numpy()).max()),
        },
        "claims": [],
    }
    if config["report"]:
        progress("running theory.verify_claims(quick=True)")
        claims = theory.verify_claims(quick=True, seed=config["seed"])
        out["claims"] = [{k: c.get(k) for k in ("id", "statement", "source", "cases",
                                                  "worst_error", "verdict")} for c in claims]
    return out


def plot(results: dict, out_dir) -> list[str]:
    fig = plt.figure(figsize=(16, 6.0))
    grid = fig.add_gridspec(2, 4, height_ratios=[3, 1.4])
    ax = fig.add_subplot(grid[0, 0])
    z = np.asarray(results["z"])
    for i, (eps, c) in enumerate(results["curves"].items()):
        e = float(eps)
        label = "$\\varepsilon$ = 0 (exp z)" if e == 0 else f"$\\varepsilon$ = {e:g}"
        ax.plot(z, c["psi"], color=color(i), lw=1.5, label=label)
        if c["m_eps"] is not None:
            ax.axhline(c["m_eps"], color=color(i), ls=(0, (2, 3)), lw=0.9)
            if c["z_min"] > z[0]:  # the minimum lies inside the plotted window
                ax.plot(c["z_min"], c["m_eps"], "o", color=color(i), ms=5)
    ax.axhline(0, color="0.4", lw=0.8)
    ax.axhline(-1, color="0.4", lw=0.8, ls=":")
    ax.plot([], [], "o", ls=(0, (2, 3)), color="0.3", label="minimum $m_\\varepsilon$")
    ax.set_ylim(-1.1, 2.5)
    ax.set_xlabel("residual gain z (F(x) = z x)")
    ax.set_ylabel("$\\Psi_\\varepsilon(z)$ = x(1) / x(0)")
    ax.set_title("(a) $\\Psi_\\varepsilon$ on the real line")
    ax.legend(fontsize=7)

    ax = fig.add_subplot(grid[0, 1])
    ax.semilogx(results["eps_range"], results["m_range"], color=color(0), lw=1.5,
                label="$m_\\varepsilon$ = min$_z$ $\\Psi_\\varepsilon(z)$")
    ax.axhline(-1, color="0.4", ls=":", lw=1, label="-1")
    ax.axhline(0, color="0.4", lw=0.8)
    ax.set_xlabel("mass $\\varepsilon$ (horizon 1)")
    ax.set_ylabel("$m_\\varepsilon$ (gain)")
    ax.set_title("(b) bottom of the 1-D range")
    ax.legend(loc="lower left")

    ax = fig.add_subplot(grid[0, 2])
    styles = {"ResNet": "--", "Momentum ResNet": "-"}
    for i, (label, t) in enumerate(results["training"].items()):
        ax.plot(np.arange(1, len(t["residual_curve"]) + 1), t["residual_curve"],
                styles[t["kind"]], color=color(i), lw=1.4,
                label=f"{label} (final {t['final_residual']:.2g})")
    ax.axhline(results["floor"], color="0.3", ls=":", lw=1, label="det > 0 floor $\\sqrt{1/2}$")
    ax.set_yscale("log")
    ax.set_xlabel("Adam iteration")
    ax.set_ylabel("min$_{\\lambda \\geq 0}$ $\\|\\lambda M - D\\| / \\|D\\|$")
    ax.set_title(f"(c) fit D = diag(-1, 1) up to scale ($\\varepsilon$ = "
                 f"{results['eps_train']:g})")
    ax.legend(fontsize=6.5)

    ax = fig.add_subplot(grid[0, 3])
    for i, (e, f) in enumerate(results.get("finite_depth", {}).items()):
        ax.plot(f["depths"], f["global"], "o-", color=color(i), lw=1.3, ms=3,
                label=f"$\\varepsilon$ = {e}: inf over $\\theta$")
        ax.plot(f["depths"], f["window"], ":", color=color(i), lw=1.3)
        ax.axhline(f["m_eps"], color=color(i), ls=(0, (4, 3)), lw=0.9)
    ax.plot([], [], ":", color="0.3", label="min on $[z^*-1, z^*+1]$")
    ax.plot([], [], ls=(0, (4, 3)), color="0.3", label="ODE $m_\\varepsilon$")
    ax.axhline(-1, color="0.4", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("depth N (even; odd N: inf = $-\\infty$)")
    ax.set_ylabel("$\\inf_\\theta P_N(\\theta)$ (gain)")
    ax.set_title("(d) finite depth: bottom of the range")
    ax.legend(fontsize=6.5, loc="lower left")

    ax = fig.add_subplot(grid[1, :])
    ax.axis("off")
    th = results["theory"]
    lines = [
        f"theory.is_representable(diag(-1, 1), eps=0) = {th['first_order_representable']};  "
        f"theory.representable_scale(diag(-1, 1), eps={results['eps_train']:g}) -> "
        f"lambda = {th['momentum_scale']:.4g}, |Psi(theta) - lambda D| = "
        f"{th['momentum_check_error']:.1e}",
        "",
    ]
    if results["claims"]:
        lines.append("(e) theory report (python -m theory):")
        for c in results["claims"]:
            lines.append(f"  [{c['verdict']:^7s}] {c['id']}. {c['statement']}  "
                         f"({c['cases']} cases, worst error {c['worst_error']:.1e}; "
                         f"{c['source']})")
    else:
        lines.append("(e) theory report not run at this size")
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=7.5,
            transform=ax.transAxes)
    return save_figure(fig, out_dir, "representability")


def summary(results: dict) -> str:
    """One line with the measured numbers, for the README."""
    t = results["training"]
    res = max(v["final_residual"] for v in t.values() if v["kind"] == "ResNet")
    mom = max(v["final_residual"] for v in t.values() if v["kind"] == "Momentum ResNet")
    verdicts = [c["verdict"] for c in results["claims"]]
    held = f"; theory report: {verdicts.count('holds')}/{len(verdicts)} claims hold" if (
        verdicts) else ""
    depth = ""
    for e, f in results.get("finite_depth", {}).items():
        depth = (f"; depth N = {f['depths'][-1]}, eps = {e}: inf of the gain "
                 f"{f['global'][-1]:.3g} (ODE m_eps = {f['m_eps']:.3g}; odd N: -inf)")
    return (f"Psi_eps and m_eps; fitting diag(-1, 1) up to scale: ResNets stall at residual "
            f"{res:.3f} (floor sqrt(1/2)), Momentum ResNets reach {mom:.0e}{depth}{held}.")
