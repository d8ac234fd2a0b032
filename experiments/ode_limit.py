"""The discrete Momentum ResNet against the continuous second-order ODE it discretizes.

Field: a fixed random MLP F(x) = W2 tanh(W1 x + b1) on the plane, horizon [0, 1], from rest.

- Error against depth: a ``mode.MomentumResNet`` with f_n = (1/N) F and
  ``gamma = mode.eps_to_gamma(eps, N)`` against the solution of eps x'' + x' = F(x) computed
  independently by ``scipy.integrate.solve_ivp`` (DOP853, rtol = atol = 1e-12), for several eps;
  the slope of log(error) against log(N) is fitted (first order: slope -1).
- eps -> 0: ``mode.odeint(..., eps)`` (dopri5) against ``mode.odeint(..., eps=0)``; both
  cross-checked against scipy (Radau for the stiff small eps).
- Trajectories: torchdiffeq's dopri5 (through ``mode.odeint``) and the discrete network at two
  depths, overlaid on the field.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import nn

import mode

from .common import Progress, color, log_slope, resolve_device, save_figure, seed_everything

TITLE = "the discrete Momentum ResNet converges to the second-order ODE; eps -> 0 gives first order"
FIGURES = ["ode_limit"]
CAPTION = """
Left: error of the discrete Momentum ResNet (f_n = F/N, gamma = 1 - 1/(N eps)) at t = 1 against
the second-order ODE solution (scipy solve_ivp, DOP853, tolerance 1e-12) as depth N grows, for
several eps; the fitted log-log slopes (legend) are close to -1: first-order convergence.
Middle: distance between the second-order solution (mode.odeint, dopri5) and the first-order
Neural ODE solution at t = 1 as eps -> 0, with its fitted slopes (about 1 for small eps:
the gap is O(eps)); mode.odeint agrees with scipy to the tolerance stored in the JSON.
Right: trajectories of the same field F (arrows) from rest: torchdiffeq dopri5 solutions of
eps x'' + x' = F(x) (lines), the discrete networks at two depths (markers), and the first-order
flow (dashed).
"""
REVISION = 1

CONFIGS = {
    "tiny": {"hidden": 16, "n_points": 4, "eps_list": [0.1, 1.0], "depths": [16, 64],
             "eps_zero": [0.05, 0.1], "overlay_eps": 0.3, "overlay_depths": [5, 20],
             "n_overlay": 3},
    "quick": {"hidden": 16, "n_points": 16, "eps_list": [0.05, 0.2, 1.0],
              "depths": [20, 40, 80, 160, 320, 640, 1280, 2560],
              "eps_zero": [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2],
              "overlay_eps": 0.3, "overlay_depths": [5, 20], "n_overlay": 5},
    "full": {"hidden": 32, "n_points": 64, "eps_list": [0.02, 0.05, 0.2, 1.0, 5.0],
             "depths": [50, 100, 200, 400, 800, 1600, 3200, 6400, 12800],
             "eps_zero": [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2],
             "overlay_eps": 0.3, "overlay_depths": [5, 20, 80], "n_overlay": 8},
}


class Field(nn.Module):
    """``F(t, x) = W2 tanh(W1 x + b1)``, fixed random weights, float64, 2 -> hidden -> 2."""

    def __init__(self, hidden: int, rng: np.random.Generator):
        super().__init__()
        self.W1 = nn.Parameter(torch.tensor(rng.normal(0, 1.0, (hidden, 2))))
        self.b1 = nn.Parameter(torch.tensor(rng.normal(0, 0.5, hidden)))
        self.W2 = nn.Parameter(torch.tensor(rng.normal(0, 6.0 / np.sqrt(hidden), (2, hidden))))

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.W1.T + self.b1) @ self.W2.T

    def numpy(self, x: np.ndarray) -> np.ndarray:
        """The same field on a numpy array ``(..., 2)`` (for scipy)."""
        W1, b1, W2 = (p.detach().cpu().numpy() for p in (self.W1, self.b1, self.W2))
        return np.tanh(x @ W1.T + b1) @ W2.T


class Step(nn.Module):
    """``f_n(x) = eta F(t_n, x)``."""

    def __init__(self, field: Field, eta: float):
        super().__init__()
        self.field = field
        self.eta = eta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.eta * self.field(None, x)


def reference(field: Field, x0: np.ndarray, eps: float, t_eval=None) -> np.ndarray:
    """``x(1)`` (or ``x(t_eval)``, shape ``(len(t), n, 2)``) by ``solve_ivp`` for a batch."""
    n = x0.shape[0]

    def rhs(t, y):
        if eps == 0:
            return field.numpy(y.reshape(n, 2)).ravel()
        x, u = y[: 2 * n].reshape(n, 2), y[2 * n:].reshape(n, 2)
        return np.concatenate([u.ravel(), ((field.numpy(x) - u) / eps).ravel()])

    y0 = x0.ravel() if eps == 0 else np.concatenate([x0.ravel(), np.zeros(2 * n)])
    stiff = 0 < eps < 0.02  # Radau (implicit) for the stiff small masses, DOP853 otherwise
    sol = solve_ivp(rhs, (0.0, 1.0), y0, method="Radau" if stiff else "DOP853",
                    rtol=1e-10 if stiff else 1e-12, atol=1e-12,
                    t_eval=t_eval if t_eval is not None else [1.0])
    xs = sol.y[: 2 * n].T.reshape(-1, n, 2)
    return xs if t_eval is not None else xs[-1]


def discrete(field: Field, x0: torch.Tensor, eps: float, depth: int,
             trajectory: bool = False) -> torch.Tensor:
    """The Momentum ResNet of ``depth`` layers ``f_n = F / depth`` with the mass ``eps``."""
    gamma = mode.eps_to_gamma(eps, depth)
    net = mode.MomentumResNet([Step(field, 1.0 / depth)] * depth, gamma, reversible=False)
    with torch.no_grad():
        return net.trajectory(x0) if trajectory else net(x0)


def run(config: dict) -> dict:
    device = resolve_device(config["device"])
    rng = seed_everything(config["seed"])
    progress = Progress("ode_limit")
    field = Field(config["hidden"], rng).to(device)
    x0_np = rng.normal(0, 1.0, (config["n_points"], 2))
    x0 = torch.tensor(x0_np, device=device)
    out: dict = {"depth_study": {}, "eps_zero": {}, "overlay": {}}

    for eps in config["eps_list"]:
        ref = reference(field, x0_np, eps)
        depths = [n for n in config["depths"] if 1.0 / n <= eps]
        errs = []
        for depth in depths:
            xn = discrete(field, x0, eps, depth).cpu().numpy()
            errs.append(float(np.linalg.norm(xn - ref, axis=1).max()))
        out["depth_study"][str(eps)] = {"depths": depths, "errors": errs,
                                        "slope": log_slope(depths, errs)}
        progress(f"eps = {eps}: error at depth {depths[-1]} = {errs[-1]:.2e}, "
                 f"slope {out['depth_study'][str(eps)]['slope']:.3f}")

    t = torch.tensor([0.0, 1.0], dtype=torch.float64, device=device)
    with torch.no_grad():
        first = mode.odeint(field, x0, t, eps=0.0, rtol=1e-10, atol=1e-12)[-1].cpu().numpy()
    ref_first = reference(field, x0_np, 0.0)
    gaps, check = [], []
    for eps in config["eps_zero"]:
        with torch.no_grad():
            second = mode.odeint(field, x0, t, eps=eps, rtol=1e-10, atol=1e-12)[-1]
        second = second.cpu().numpy()
        gaps.append(float(np.linalg.norm(second - first, axis=1).max()))
        check.append(float(np.linalg.norm(second - reference(field, x0_np, eps), axis=1).max()))
    out["eps_zero"] = {
        "eps": config["eps_zero"], "gap_to_first_order": gaps,
        "slope": log_slope(config["eps_zero"], gaps),
        # the O(eps) regime: the smallest half of the masses
        "slope_small_eps": log_slope(config["eps_zero"][: max(2, len(gaps) // 2)],
                                     gaps[: max(2, len(gaps) // 2)]),
        "odeint_vs_scipy_max_error": max(check + [
            float(np.linalg.norm(first - ref_first, axis=1).max())]),
    }
    progress(f"eps -> 0: slope {out['eps_zero']['slope']:.3f}, mode.odeint vs scipy "
             f"{out['eps_zero']['odeint_vs_scipy_max_error']:.1e}")

    eps = config["overlay_eps"]
    xs0 = x0[: config["n_overlay"]]
    tt = torch.linspace(0, 1, 101, dtype=torch.float64, device=device)
    with torch.no_grad():
        cont = mode.odeint(field, xs0, tt, eps=eps, method="dopri5", rtol=1e-9, atol=1e-11)
        flow = mode.odeint(field, xs0, tt, eps=0.0, method="dopri5", rtol=1e-9, atol=1e-11)
    out["overlay"] = {
        "eps": eps, "continuous": cont.permute(1, 0, 2), "first_order": flow.permute(1, 0, 2),
        "discrete": {str(n): discrete(field, xs0, eps, n, trajectory=True).permute(1, 0, 2)
                     for n in config["overlay_depths"] if 1.0 / n <= eps},
    }
    lim = float(torch.cat([cont.abs().flatten(), flow.abs().flatten()]).max()) * 1.1
    g = np.linspace(-lim, lim, 17)
    gx, gy = np.meshgrid(g, g)
    vec = field.numpy(np.stack([gx, gy], -1))
    out["overlay"].update(grid=g, field_u=vec[..., 0], field_v=vec[..., 1])
    return out


def plot(results: dict, out_dir) -> list[str]:
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    ax = axes[0]
    for i, (eps, d) in enumerate(results["depth_study"].items()):
        ax.loglog(d["depths"], d["errors"], "o-", color=color(i), ms=4,
                  label=f"$\\varepsilon$ = {float(eps):g} (slope {d['slope']:.2f})")
    all_d = [n for d in results["depth_study"].values() for n in d["depths"]]
    first = next(iter(results["depth_study"].values()))
    n0 = np.array([min(all_d), max(all_d)], float)
    ax.loglog(n0, first["errors"][0] * first["depths"][0] / n0, ":", color=color("black"),
              label="reference slope -1")
    ax.set_xlabel("depth N (layers)")
    ax.set_ylabel("max error $|x_N - x(1)|$ (state units)")
    ax.set_title("discrete Momentum ResNet vs ODE")
    ax.legend()

    ax = axes[1]
    z = results["eps_zero"]
    ax.loglog(z["eps"], z["gap_to_first_order"], "s-", color=color(0),
              label=f"$|x_\\varepsilon(1) - x_0(1)|$ (slope {z['slope']:.2f}; "
              f"{z['slope_small_eps']:.2f} on the smaller half)")
    e = np.array(z["eps"], float)
    ax.loglog(e, z["gap_to_first_order"][-1] * e / e[-1], ":", color=color("black"),
              label="reference slope 1")
    ax.set_xlabel("mass $\\varepsilon$ (horizon T = 1)")
    ax.set_ylabel("max distance at t = 1 (state units)")
    ax.set_title("second order $\\to$ first order as $\\varepsilon \\to 0$")
    ax.legend()

    ax = axes[2]
    o = results["overlay"]
    g = np.asarray(o["grid"])
    ax.quiver(g, g, np.asarray(o["field_u"]), np.asarray(o["field_v"]), color="0.75",
              width=0.003)
    cont = np.asarray(o["continuous"], float)
    flow = np.asarray(o["first_order"], float)
    for i in range(cont.shape[0]):
        ax.plot(cont[i, :, 0], cont[i, :, 1], color=color(0), lw=1.2, zorder=4,
                label=f"dopri5, $\\varepsilon$ = {o['eps']:g}" if i == 0 else None)
        ax.plot(flow[i, :, 0], flow[i, :, 1], "--", color=color("black"), lw=1,
                label="first order ($\\varepsilon$ = 0)" if i == 0 else None)
        ax.plot(cont[i, 0, 0], cont[i, 0, 1], "k.", ms=6)
    markers = ["o", "^", "s", "D"]
    for j, (n, traj) in enumerate(o["discrete"].items()):
        traj = np.asarray(traj, float)
        for i in range(traj.shape[0]):
            ax.plot(traj[i, :, 0], traj[i, :, 1], markers[j % 4], color=color(j + 1), ms=3.5,
                    mfc="none", label=f"Momentum ResNet, N = {n}" if i == 0 else None)
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_title("trajectories on the field F (arrows)")
    ax.legend(fontsize=7)
    ax.set_aspect("equal")
    return save_figure(fig, out_dir, "ode_limit")


def summary(results: dict) -> str:
    """One line with the measured numbers, for the README."""
    slopes = ", ".join(f"{d['slope']:.2f} (eps = {float(e):g})"
                       for e, d in results["depth_study"].items())
    z = results["eps_zero"]
    return (f"Discrete Momentum ResNet vs the ODE: error slopes against depth {slopes}; "
            f"distance to the first-order solution shrinks like eps^{z['slope_small_eps']:.2f} "
            f"as eps -> 0; discrete and dopri5 trajectories overlaid.")
