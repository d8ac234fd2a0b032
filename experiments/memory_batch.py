"""Peak training memory against batch size, and the largest batch that fits a budget (Fig. 7 top).

Two networks (``mode.models.ResNet``, train mode, float32, 10 classes):

- ``resnet152``: Bottleneck stages of 3, 8, 36, 3 blocks, width 64, torchvision's ImageNet stem
  (7x7 stride-2 convolution and max pool), images of ``resolution`` pixels (224 in ``full``);
- ``cifar_deep``: BasicBlock stages of n blocks each, width 16, CIFAR stem, 32x32 images
  (depth 8 n + 2).

Five models of each, with the same stem, head and first block of every stage:

- ``resnet``: plain autograd;
- ``checkpoint``: every block under ``torch.utils.checkpoint`` (recomputed in backward);
- ``momentum_float`` / ``momentum_exact``: ``mode.convert(net, stages, gamma)``, reversible in
  float / bit-exact (the kept first blocks recomputed in backward, the default);
- ``revnet``: each stage's blocks after the first replaced by a ``mode.RevNet`` whose ``F_j, G_j``
  are the block's residual branch on half the channels (hidden width chosen so that the two
  branches have the block's convolution parameters), first blocks checkpointed.

Peak = one training step (forward, cross-entropy, backward, parameter gradients included; a
model's first measurement follows one unmeasured warm-up step), measured by
:func:`experiments.memory_meter.step_peak` (every CPU allocation event of ``torch.profiler``, or
``torch.cuda.max_memory_allocated``). The budget is the peak of the autograd ResNet at the
largest listed batch; the largest batch of every model that fits it is found by measuring
(:func:`largest_batch`: from the affine fit of the measured peaks, bracket, then bisect; capped at
``max_batch``).
"""

from __future__ import annotations

import weakref

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import mode
from mode.models import BasicBlock, Bottleneck, ResNet

from .common import Progress, color, resolve_device, save_figure, seed_everything
from .memory_meter import step_peak

TITLE = "peak training memory against batch size; the largest batch within a budget"
FIGURES = ["memory_batch"]
CAPTION = """
Peak memory of one training step (forward, cross-entropy, backward, parameter gradients
included; every allocation counted: torch.profiler allocation events on the CPU,
torch.cuda.max_memory_allocated on a GPU) against batch size, for an ImageNet-shaped ResNet-152
(left; 32x32 images at --quick, 224x224 at --full) and a deep CIFAR ResNet (right; 32x32, depth
114 at --quick, 1202 at --full). Compared: the ResNet with autograd, with torch.utils.checkpoint
on every block, its Momentum ResNet conversion (mode.convert, gamma = 0.9) reversible in float
and bit-exact, and a RevNet with the same stem, first blocks and convolution parameter count.
At --quick the ResNet-152's peak is almost all parameters and their gradients (about 222 MiB)
because its 32x32 images leave tiny activations; there the conversions do not pay (at batch 8
float and exact are within about 1 MiB of autograd). On the deep CIFAR ResNet, where
activations dominate, the conversions cut the slope against batch size. The table gives, for a
budget equal to the autograd ResNet's peak at the largest plotted batch, the largest batch of
every model whose measured peak fits it ("+": the search cap was reached).
"""
REVISION = 1
MODELS = ("resnet", "checkpoint", "momentum_float", "momentum_exact", "revnet")
LABELS = {"resnet": "ResNet, autograd", "checkpoint": "ResNet, checkpoint per block",
          "momentum_float": "Momentum ResNet, float", "momentum_exact": "Momentum ResNet, exact",
          "revnet": "RevNet"}
STAGES = ["layer1", "layer2", "layer3", "layer4"]

CONFIGS = {
    "tiny": {"architectures": ["cifar_deep"], "budget_architectures": ["cifar_deep"],
             "resnet152_layers": [1, 2, 2, 1], "resnet152_width": 8, "resolution": 64,
             "resnet152_batches": [1, 2], "cifar_blocks": 2, "cifar_width": 8,
             "cifar_deep_batches": [2, 4], "gamma": 0.9, "max_batch": 5},
    "quick": {"architectures": ["resnet152", "cifar_deep"],
              "budget_architectures": ["cifar_deep"],
              "resnet152_layers": [3, 8, 36, 3], "resnet152_width": 64, "resolution": 32,
              "resnet152_batches": [2, 8], "cifar_blocks": 14, "cifar_width": 16,
              "cifar_deep_batches": [4, 8], "gamma": 0.9, "max_batch": 48},
    "full": {"architectures": ["resnet152", "cifar_deep"],
             "budget_architectures": ["resnet152", "cifar_deep"],
             "resnet152_layers": [3, 8, 36, 3], "resnet152_width": 64, "resolution": 224,
             "resnet152_batches": [8, 16, 32, 64], "cifar_blocks": 150, "cifar_width": 16,
             "cifar_deep_batches": [32, 64, 128, 256], "gamma": 0.9, "max_batch": 4096},
}


class Checkpointed(nn.Module):
    """``block(x)`` whose activations are recomputed in backward (``torch.utils.checkpoint``)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(self.block, x, use_reentrant=False)
        return self.block(x)


def checkpointed(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every block of every stage checkpointed."""
    import copy

    net = copy.deepcopy(net)
    for name in STAGES:
        stage = net.get_submodule(name)
        setattr(net, name, nn.Sequential(*(Checkpointed(b) for b in stage.children())))
    return net


def _branch(block: nn.Module, c: int, hidden: int) -> nn.Module:
    """``block``'s residual branch from ``c`` to ``c`` channels through ``hidden`` planes."""
    if isinstance(block, Bottleneck):
        layers = [nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(True),
                  nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
                  nn.ReLU(True), nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c)]
    else:
        layers = [nn.Conv2d(c, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
                  nn.ReLU(True), nn.Conv2d(hidden, c, 3, padding=1, bias=False),
                  nn.BatchNorm2d(c)]
    return nn.Sequential(*layers)


def revnet_hidden(block: nn.Module) -> int:
    """Hidden width ``h`` of two half-channel branches (``c = C / 2``) with the block's
    convolution weights: BasicBlock ``18 C^2 = 2 * 18 c h`` gives ``h = C``; Bottleneck
    (planes ``p``, ``C = 4 p``) ``17 p^2 = 2 (2 c h + 9 h^2)``, the positive root."""
    if isinstance(block, Bottleneck):
        p = block.conv1.out_channels
        c = block.conv3.out_channels // 2
        # 18 h^2 + 4 c h - 17 p^2 = 0
        h = (-4 * c + np.sqrt(16 * c * c + 4 * 18 * 17 * p * p)) / 36
        return max(1, int(round(h)))
    if isinstance(block, BasicBlock):
        return block.conv1.out_channels
    raise TypeError(f"no RevNet branch for blocks of type {type(block).__name__}")


def revnet(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with each stage's blocks after the first replaced by a ``mode.RevNet``
    (first blocks checkpointed, as the conversions recompute theirs)."""
    import copy

    net = copy.deepcopy(net)
    p = next(net.parameters())
    for name in STAGES:
        blocks = list(net.get_submodule(name).children())
        rest = blocks[1:]
        if not rest:
            setattr(net, name, nn.Sequential(Checkpointed(blocks[0])))
            continue
        channels = rest[0].conv1.in_channels
        h = revnet_hidden(rest[0])
        F = [_branch(b, channels // 2, h) for b in rest]
        G = [_branch(b, channels // 2, h) for b in rest]
        rev = mode.RevNet(F, G, reversible=True).to(device=p.device, dtype=p.dtype)
        setattr(net, name, nn.Sequential(Checkpointed(blocks[0]), rev))
    return net


def build_network(arch: str, config: dict) -> tuple[nn.Module, tuple[int, int, int]]:
    """The base ResNet of ``arch`` and its input shape ``(C, H, W)``."""
    if arch == "resnet152":
        net = ResNet(Bottleneck, config["resnet152_layers"], num_classes=10, cifar_stem=False,
                     width=config["resnet152_width"])
        r = config["resolution"]
        return net, (3, r, r)
    if arch == "cifar_deep":
        n = config["cifar_blocks"]
        net = ResNet(BasicBlock, [n] * 4, num_classes=10, cifar_stem=True,
                     width=config["cifar_width"])
        return net, (3, 32, 32)
    raise ValueError(f"unknown architecture {arch!r}")


def build_models(net: nn.Module, gamma: float) -> dict[str, nn.Module]:
    """The five models of :data:`MODELS` built from ``net`` (copies; ``net`` is not changed)."""
    import copy

    return {
        "resnet": copy.deepcopy(net),
        "checkpoint": checkpointed(net),
        "momentum_float": mode.convert(net, STAGES, gamma=gamma),
        "momentum_exact": mode.convert(net, STAGES, gamma=gamma, exact=True),
        "revnet": revnet(net),
    }


_WARM: weakref.WeakSet = weakref.WeakSet()  # models that had their warm-up step


def peak_at(model: nn.Module, shape, batch: int, device: torch.device) -> int:
    """Measured peak bytes of one training step at ``batch`` (the first measurement of a model
    follows one unmeasured warm-up step: lazy initializations are not part of a step)."""
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, *shape, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    model.train()
    if model not in _WARM:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
        _WARM.add(model)
    return step_peak(model, x, y).bytes


def largest_batch(measure, budget: int, batches, peaks, cap: int) -> tuple[int, int]:
    """The largest ``b <= cap`` with ``measure(b) <= budget`` and ``measure(b + 1) > budget``
    (``cap`` if that fits; ``0`` if batch 1 does not), assuming the peak grows with the batch.

    Starts from the affine fit of ``peaks`` (measured at ``batches``), brackets the answer by
    steps doubling away from that guess, then bisects; returns ``(b, new measurements)``.
    """
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    slope, intercept = np.polyfit(np.asarray(batches, float), np.asarray(peaks, float), 1)
    guess = int((budget - intercept) // slope) if slope > 0 else cap
    guess = int(min(max(guess, 1), cap))
    cache: dict[int, int] = dict(zip(batches, peaks))
    known = len(cache)

    def fits(n: int) -> bool:
        if n not in cache:
            cache[n] = measure(n)
        return cache[n] <= budget

    step = 1
    if fits(guess):
        lo, hi = guess, None
        while lo < cap:
            n = min(lo + step, cap)
            if fits(n):
                lo, step = n, 2 * step
            else:
                hi = n
                break
        if hi is None:
            return lo, len(cache) - known
    else:
        lo, hi = None, guess
        while lo is None:
            n = hi - step
            if n < 1:
                lo = 0
            elif fits(n):
                lo = n
            else:
                hi, step = n, 2 * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, len(cache) - known


def run(config: dict) -> dict:
    device = resolve_device(config["device"])
    progress = Progress("memory_batch")
    results: dict = {"architectures": {}, "budget": {}, "device": str(device),
                     "gamma": config["gamma"]}
    for arch in config["architectures"]:
        seed_everything(config["seed"])
        net, shape = build_network(arch, config)
        net = net.to(device)
        models = build_models(net, config["gamma"])
        batches = config[f"{arch}_batches"]
        entry = {}
        for name, model in models.items():
            peaks = [peak_at(model, shape, b, device) for b in batches]
            entry[name] = {"batch_size": list(batches), "peak_bytes": peaks,
                           "parameters": sum(p.numel() for p in model.parameters())}
            progress(f"{arch} {name}: " + ", ".join(
                f"b{b} {p / 2**20:.0f} MiB" for b, p in zip(batches, peaks)))
        depth = (sum(config["resnet152_layers"]) * 3 + 2 if arch == "resnet152"
                 else 8 * config["cifar_blocks"] + 2)
        results["architectures"][arch] = entry
        results.setdefault("shapes", {})[arch] = {"input": list(shape), "depth": depth}
        if arch not in config["budget_architectures"]:
            continue
        budget = entry["resnet"]["peak_bytes"][-1]
        fit = {}
        for name, model in models.items():
            e = entry[name]
            b, extra = largest_batch(lambda n, m=model, s=shape: peak_at(m, s, n, device), budget,
                                     e["batch_size"], e["peak_bytes"], config["max_batch"])
            fit[name] = {"largest_batch": b, "extra_measurements": extra,
                         "capped": b >= config["max_batch"]}
            progress(f"{arch} {name}: largest batch within {budget / 2**20:.0f} MiB: {b}")
        results["budget"][arch] = {"bytes": budget, "models": fit}
    return results


def plot(results: dict, out_dir) -> list[str]:
    archs = list(results["architectures"])
    fig, axes = plt.subplots(2, len(archs), figsize=(6 * len(archs), 6.4),
                             gridspec_kw={"height_ratios": [3, 1.1]}, squeeze=False)
    markers = ["o", "s", "^", "D", "v"]
    for j, arch in enumerate(archs):
        ax = axes[0, j]
        for i, name in enumerate(MODELS):
            e = results["architectures"][arch].get(name)
            if e is None:
                continue
            ax.plot(e["batch_size"], np.asarray(e["peak_bytes"]) / 2**20,
                    "--" if name in ("resnet", "checkpoint") else "-",
                    marker=markers[i], color=color(i), ms=5, label=LABELS[name])
        s = results["shapes"][arch]
        title = ("ResNet-152 (ImageNet stem)" if arch == "resnet152"
                 else f"CIFAR ResNet, depth {s['depth']}")
        ax.set_title(f"{title}, {s['input'][1]}x{s['input'][2]}")
        ax.set_xlabel("batch size")
        ax.set_ylabel("peak training memory (MiB)")
        ax.legend(fontsize=7)
        tab = axes[1, j]
        tab.axis("off")
        if arch not in results["budget"]:
            tab.text(0.5, 0.5, "no budget search at this level", ha="center", va="center",
                     fontsize=8)
            continue
        ax.axhline(results["budget"][arch]["bytes"] / 2**20, color="grey", lw=0.8, ls=":")
        fit = results["budget"][arch]["models"]
        rows = [[LABELS[n], f"{fit[n]['largest_batch']}{'+' if fit[n]['capped'] else ''}"]
                for n in MODELS if n in fit]
        table = tab.table(cellText=rows, colLabels=[
            f"budget {results['budget'][arch]['bytes'] / 2**20:.0f} MiB", "largest batch"],
            loc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
    fig.tight_layout()
    return save_figure(fig, out_dir, "memory_batch")


def summary(results: dict) -> str:
    """One line with the measured numbers, for the README."""
    parts = []
    for arch, b in results["budget"].items():
        fit = b["models"]
        parts.append(f"{arch}: within {b['bytes'] / 2**20:.0f} MiB, largest batch " + ", ".join(
            f"{n} {fit[n]['largest_batch']}" for n in MODELS if n in fit))
    return "Peak training memory against batch size; " + "; ".join(parts) + "."
