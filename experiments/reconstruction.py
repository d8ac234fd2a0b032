"""Input reconstruction error against depth: float reversal, exact reversal, momentumnet.

A Momentum ResNet of depth N (random MLP blocks, float32) maps (x_0, 0) to (x_N, v_N); its
inverse recovers (x_0, v_0). In floating point each inverse layer divides the velocity by
gamma, so rounding errors grow like gamma^-N; ``mode``'s exact mode holds the states in fixed
point with an information buffer and recovers x_0 bit for bit. For the public ``momentumnet``
package (memory mode), which exposes no inverse, the reconstructed states are read where its
backward pass recomputes them: the input it passes to the first block during backward,
compared with the input of that block in the forward pass.
"""

from __future__ import annotations

import math
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

import mode

from .common import (
    MLPBlock,
    Progress,
    color,
    has_momentumnet,
    resolve_device,
    save_figure,
    seed_everything,
)

TITLE = "input reconstruction error against depth: float, exact, momentumnet"
FIGURES = ["reconstruction"]
CAPTION = """
Relative error of the input x_0 reconstructed from the output (x_N, v_N) of a Momentum ResNet
(random MLP blocks, float32) against depth N, for several gamma. Float reversal (solid) grows
like gamma^-N (dotted: float32 unit round-off times gamma^-N) until it exceeds 1e3 or overflows
(triangles at the top); momentumnet's recomputation (dash-dot) behaves alike; mode's exact
mode (bottom strip) returns the input bit for bit at every depth and gamma: error exactly 0
against the input as it enters the fixed-point grid 2^-32 (rounding a float32 input onto that
grid, about 1e-11 relative, is the only difference from the float input, at any depth).
"""
REVISION = 1

CONFIGS = {
    "tiny": {"features": 8, "hidden": 16, "batch": 8, "depths": [5, 20], "gammas": [0.5, 0.9],
             "momentumnet": True},
    "quick": {"features": 16, "hidden": 32, "batch": 64, "depths": [10, 30, 100, 300, 1000],
              "gammas": [0.5, 0.9, 0.99], "momentumnet": True},
    "full": {"features": 64, "hidden": 128, "batch": 256,
             "depths": [10, 30, 100, 300, 1000, 3000, 10000], "gammas": [0.3, 0.5, 0.9, 0.99],
             "momentumnet": True},
}


class Recorder(nn.Module):
    """Wraps a block and records every input it sees (forward and backward recomputation)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.block(x)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|`` (``inf`` when ``a`` is not finite)."""
    if not bool(torch.isfinite(a).all()):
        return math.inf
    return float((a - b).abs().max() / b.abs().max())


def momentumnet_error(blocks: list[nn.Module], gamma: float, x0: torch.Tensor) -> float:
    """x_0 as momentumnet's memory mode reconstructs it in backward, against the true x_0."""
    from momentumnet import MomentumNet

    first = Recorder(blocks[0])
    net = MomentumNet([first, *blocks[1:]], gamma, use_backprop=False)
    x = x0.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net(x).sum().backward()
    forward_input, backward_input = first.inputs[0], first.inputs[-1]
    return relative_error(backward_input, forward_input)


def run(config: dict) -> dict:
    device = resolve_device(config["device"])
    seed_everything(config["seed"])
    progress = Progress("reconstruction")
    d, hidden = config["features"], config["hidden"]
    blocks = [MLPBlock(d, hidden).to(device) for _ in range(max(config["depths"]))]
    x0 = torch.randn(config["batch"], d, device=device)
    # exact mode holds states on the grid 2^-F (F = frac_bits): the input enters it rounded to
    # nearest, and it is that input the exact inverse returns bit for bit
    fp = mode.exact.FixedPoint(mode.exact.DEFAULT_FRAC_BITS)
    x0_grid = fp.decode(fp.encode(x0, "x0"), x0.dtype)
    use_mnet = config["momentumnet"] and has_momentumnet()
    out: dict = {"depths": config["depths"], "gammas": config["gammas"], "float": {},
                 "exact": {}, "exact_vs_float_input": {}, "frac_bits": fp.frac_bits,
                 "input_rounding": relative_error(x0_grid, x0), "momentumnet": {},
                 "momentumnet_installed": use_mnet,
                 "unit_roundoff": float(torch.finfo(torch.float32).eps / 2)}
    for gamma in config["gammas"]:
        errs = {"float": [], "exact": [], "exact_vs_float_input": [], "momentumnet": []}
        for depth in config["depths"]:
            fs = blocks[:depth]
            with torch.no_grad(), warnings.catch_warnings():
                # the float engine warns that gamma^-N is large: that is what is measured here
                warnings.simplefilter("ignore")
                net = mode.MomentumResNet(fs, gamma, reversible=True)
                xn, vn = net(x0, return_velocity=True)
                xr, _ = net.inverse(xn, vn)
                errs["float"].append(relative_error(xr, x0))
                net = mode.MomentumResNet(fs, gamma, reversible=True, exact=True)
                xn, vn = net(x0, return_velocity=True)
                xr, vr = net.inverse(xn, vn)
                errs["exact"].append(relative_error(xr, x0_grid))
                errs["exact_vs_float_input"].append(relative_error(xr, x0))
            if use_mnet:
                errs["momentumnet"].append(momentumnet_error(fs, gamma, x0))
        for key in errs:
            out[key][str(gamma)] = errs[key]
        progress(f"gamma = {gamma}: float {errs['float']}, exact {errs['exact']}")
    return out


def plot(results: dict, out_dir) -> list[str]:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    depths = np.asarray(results["depths"], float)
    top, bottom = 1e3, 1e-12
    u = results["unit_roundoff"]
    for i, g in enumerate(results["gammas"]):
        key = str(g)
        fl = np.array([np.inf if e is None else e for e in results["float"][key]], float)
        finite = np.isfinite(fl) & (fl < top)
        ax.loglog(depths[finite], np.maximum(fl[finite], bottom), "o-", color=color(i), ms=4,
                  label=f"float reversal, $\\gamma$ = {g:g}")
        if (~finite).any():
            ax.plot(depths[~finite], np.full((~finite).sum(), top), "^", color=color(i), ms=7)
        pred = u * np.power(float(g), -depths)
        keep = pred < top
        ax.loglog(depths[keep], pred[keep], ":", color=color(i), lw=1)
        if results["momentumnet_installed"] and results["momentumnet"].get(key):
            mn = np.array([np.inf if e is None else e for e in results["momentumnet"][key]])
            ok = np.isfinite(mn) & (mn < top)
            ax.loglog(depths[ok], np.maximum(mn[ok], bottom), "s-.", color=color(i), ms=4,
                      mfc="none", label=f"momentumnet 0.10, $\\gamma$ = {g:g}")
            if (~ok).any():
                ax.plot(depths[~ok], np.full((~ok).sum(), top), "^", color=color(i), ms=7,
                        mfc="none")
        ex = np.asarray(results["exact"][key], float)
        ax.plot(depths * (1 + 0.06 * i), np.full(len(depths), bottom * 3), "D", color=color(i),
                ms=5, label=f"exact mode, $\\gamma$ = {g:g}: max error {ex.max():g}")
    ax.axhspan(bottom, bottom * 10, color="0.9", zorder=0)
    ax.text(depths[0], bottom * 6, "error exactly 0 (exact mode)", fontsize=7, va="bottom")
    ax.axhline(top, color="0.5", lw=0.8)
    ax.text(depths[0], top * 0.4, "error > 1e3 or non-finite ($\\blacktriangle$)", fontsize=7,
            va="top")
    ax.plot([], [], ":", color="0.3", label="predicted $u\\,\\gamma^{-N}$ (u = 2$^{-24}$)")
    ax.set_ylim(bottom, top * 3)
    ax.set_xlabel("depth N (layers)")
    ax.set_ylabel("relative error of reconstructed $x_0$")
    ax.set_title("reconstructing the input from $(x_N, v_N)$")
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(fig, out_dir, "reconstruction")


def summary(results: dict) -> str:
    """One line with the measured numbers, for the README."""
    g = str(results["gammas"][-1])
    fl = results["float"][g]
    n = results["depths"]
    worst_exact = max(max(v) for v in results["exact"].values())
    return (f"Reconstructing x_0 from (x_N, v_N): float reversal error grows like gamma^-N "
            f"(gamma = {g}: {fl[0]:.0e} at N = {n[0]} to {fl[-1]:.0e} at N = {n[-1]}; "
            f"smaller gamma exceed 1e3 or overflow), exact mode error {worst_exact:g} at every "
            f"depth and gamma.")
