"""Activation memory and time against depth: autograd, checkpointing, reversible, exact.

A stack of MLP blocks f_n(x) = W2 tanh(W1 x + b1) + b2 (d -> hidden -> d), float32, run as

- a ResNet x + f_n(x) with plain autograd, and with ``torch.utils.checkpoint`` on every block;
- a Momentum ResNet (``mode.MomentumResNet``) with plain autograd, reversible in float, and
  reversible exact (fixed point with an information buffer);
- the public ``momentumnet`` package (0.10), memory-saving mode, when it is installed.

Activation memory is the bytes of the distinct tensors autograd saves for backward during the
forward pass (``torch.autograd.graph.saved_tensors_hooks``; parameters excluded), plus, in exact
mode, the bytes of the information buffer the engine keeps (``mode.reversible.
information_buffer``). On CUDA, the allocator's growth over the forward pass is recorded too.
Time is the median forward + backward wall time. The gradients of every momentum variant are
compared with Momentum autograd at the same depth (relative error of all parameter gradients).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import mode

from .common import (
    MLPBlock,
    Progress,
    SavedTensorMeter,
    color,
    has_momentumnet,
    median_time,
    resolve_device,
    save_figure,
    seed_everything,
)

TITLE = "activation memory and time against depth"
FIGURES = ["memory"]
CAPTION = """
Left: activation memory (bytes of the tensors saved for backward, plus the information buffer in
exact mode) of one forward pass against depth, for MLP blocks (d = 64, hidden 128, float32).
Plain autograd and per-block checkpointing grow linearly with depth; the reversible Momentum
ResNet (float and exact) and momentumnet's memory mode stay flat. Exact mode's information
buffer (dotted) is the only part that grows: about 0.2 bits per scalar and layer for gamma = 0.9
(at least log2(10/9) = 0.15), stored in float64 words of about 46-52 bits, so one more 8-byte
word per scalar every 230 layers or so, against 32 bits per layer for a stored float32
activation. Right: median forward + backward
time on this machine (1 thread); its legend gives each momentum variant's relative gradient
error against autograd at the largest depth: float reversal amplifies rounding like gamma^-N,
exact mode stays at float32 round-off.
"""
REVISION = 1

CONFIGS = {
    "tiny": {"features": 16, "hidden": 32, "batch": 16, "depths": [4, 8], "gamma": 0.9,
             "repeats": 1},
    "quick": {"features": 64, "hidden": 128, "batch": 128,
              "depths": [8, 16, 32, 64, 128, 256, 512],
              "gamma": 0.9, "repeats": 5},
    "full": {"features": 256, "hidden": 1024, "batch": 512,
             "depths": [8, 16, 32, 64, 128, 256, 512, 1024], "gamma": 0.9, "repeats": 5},
}


class ResNet(nn.Module):
    """``x_{n+1} = x_n + f_n(x_n)``, optionally checkpointing every block."""

    def __init__(self, blocks: nn.ModuleList, checkpointed: bool):
        super().__init__()
        self.blocks = blocks
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for f in self.blocks:
            if self.checkpointed:
                x = x + checkpoint(f, x, use_reentrant=True)
            else:
                x = x + f(x)
        return x


def methods(blocks: nn.ModuleList, gamma: float) -> dict[str, tuple[nn.Module, bool]]:
    """Name -> (model, is_momentum). All share the same blocks (the same parameters)."""
    out = {
        "ResNet, autograd": (ResNet(blocks, False), False),
        "ResNet, checkpoint per block": (ResNet(blocks, True), False),
        "Momentum ResNet, autograd": (
            mode.MomentumResNet(blocks, gamma, reversible=False), True),
        "Momentum ResNet, reversible float": (
            mode.MomentumResNet(blocks, gamma, reversible=True), True),
        "Momentum ResNet, reversible exact": (
            mode.MomentumResNet(blocks, gamma, reversible=True, exact=True), True),
    }
    if has_momentumnet():
        from momentumnet import MomentumNet

        out["momentumnet 0.10, memory mode"] = (
            MomentumNet(list(blocks), gamma, use_backprop=False), True)
    return out


def run(config: dict) -> dict:
    device = resolve_device(config["device"])
    seed_everything(config["seed"])
    progress = Progress("memory")
    d, hidden, batch = config["features"], config["hidden"], config["batch"]
    gamma = config["gamma"]
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    results: dict = {"depths": config["depths"], "methods": {}}
    for depth in config["depths"]:
        blocks = nn.ModuleList(MLPBlock(d, hidden) for _ in range(depth)).to(device)
        params = list(blocks.parameters())
        x0 = torch.randn(batch, d, device=device)
        reference = None
        for name, (model, momentum) in methods(blocks, gamma).items():
            entry = results["methods"].setdefault(
                name, {"activation_bytes": [], "saved_bytes": [], "buffer_bytes": [],
                       "time_s": [], "grad_rel_error": [], "cuda_forward_bytes": []})
            x = x0.clone().requires_grad_(True)
            meter = SavedTensorMeter(exclude=params)
            if cuda:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
            with meter.measure():
                if isinstance(model, mode.MomentumResNet):
                    out, v = model(x, return_velocity=True)
                else:
                    out, v = model(x), None
            cuda_bytes = torch.cuda.memory_allocated() - before if cuda else None
            buffer = 0
            if v is not None and getattr(model, "exact", False):
                record = mode.reversible.information_buffer(out, v)
                if record is None:  # never report a buffer of 0 bytes that was not measured
                    raise RuntimeError("the exact forward's information buffer was not found "
                                       "(mode.reversible.information_buffer returned None)")
                buffer = int(record.buffer.nbytes)
            blocks.zero_grad(set_to_none=True)
            out.pow(2).sum().backward()  # (reentrant checkpointing supports .backward only)
            del out, v
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            if name == "Momentum ResNet, autograd":
                reference = flat
            err = None
            if momentum and reference is not None and name != "Momentum ResNet, autograd":
                err = float((flat - reference).norm() / reference.norm())

            def step(model=model, x0=x0):
                xx = x0.clone().requires_grad_(True)
                model(xx).pow(2).sum().backward()

            t = median_time(step, config["repeats"], warmup=1, sync=sync)
            blocks.zero_grad(set_to_none=True)
            entry["saved_bytes"].append(meter.bytes)
            entry["buffer_bytes"].append(buffer)
            entry["activation_bytes"].append(meter.bytes + buffer)
            entry["time_s"].append(t)
            entry["grad_rel_error"].append(err)
            entry["cuda_forward_bytes"].append(cuda_bytes)
        progress(f"depth {depth}: " + ", ".join(
            f"{n.split(',')[0][:8]}.. {e['activation_bytes'][-1] / 2**20:.2f} MiB"
            for n, e in results["methods"].items()))
    results["momentumnet_installed"] = has_momentumnet()
    results["gamma"] = gamma
    results["shape"] = {"features": d, "hidden": hidden, "batch": batch}
    return results


def plot(results: dict, out_dir) -> list[str]:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    depths = np.asarray(results["depths"])
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    for i, (name, e) in enumerate(results["methods"].items()):
        style = "--" if name.startswith("ResNet") else "-"
        hollow = {"mfc": "none", "ms": 8} if name.startswith("ResNet") else {"ms": 4}
        axes[0].loglog(depths, np.asarray(e["activation_bytes"]) / 2**20, style,
                       marker=markers[i % 7], color=color(i), label=name, **hollow)
        err = e["grad_rel_error"][-1]
        label = name if err is None else f"{name} (grad. error {err:.1e})"
        axes[1].loglog(depths, np.asarray(e["time_s"]) * 1e3, style, marker=markers[i % 7],
                       color=color(i), ms=4, label=label)
    exact = results["methods"].get("Momentum ResNet, reversible exact")
    if exact is not None:
        axes[0].loglog(depths, np.maximum(np.asarray(exact["buffer_bytes"]), 1) / 2**20, ":",
                       color=color(4), lw=1, label="  of which exact information buffer")
    s = results["shape"]
    axes[0].set_title(f"activation memory (batch {s['batch']}, d = {s['features']}, "
                      f"$\\gamma$ = {results['gamma']:g})")
    axes[0].set_xlabel("depth N (blocks)")
    axes[0].set_ylabel("saved for backward (MiB)")
    axes[0].legend(fontsize=7)
    axes[1].set_title("forward + backward time (median)")
    axes[1].set_xlabel("depth N (blocks)")
    axes[1].set_ylabel("wall time (ms)")
    axes[1].legend(fontsize=7)
    return save_figure(fig, out_dir, "memory")


def summary(results: dict) -> str:
    """One line with the measured numbers, for the README."""
    m = results["methods"]
    d0, d1 = results["depths"][0], results["depths"][-1]

    def mib(name: str, i: int) -> str:
        return f"{m[name]['activation_bytes'][i] / 2**20:.2f}"

    return (f"Activation memory from depth {d0} to {d1}: autograd {mib('ResNet, autograd', 0)}"
            f" -> {mib('ResNet, autograd', -1)} MiB, checkpointing "
            f"{mib('ResNet, checkpoint per block', 0)} -> "
            f"{mib('ResNet, checkpoint per block', -1)} MiB, reversible float "
            f"{mib('Momentum ResNet, reversible float', -1)} MiB at every depth, exact "
            f"{mib('Momentum ResNet, reversible exact', 0)} -> "
            f"{mib('Momentum ResNet, reversible exact', -1)} MiB (only its information buffer "
            f"grows); time and gradient errors in the right panel.")
