"""Peers: time and peak training memory of memory-saving backprop libraries on the same stages.

Two workloads (float32, train mode, seed 0):

- ``cifar stage``: ``blocks`` BasicBlocks of ``channels`` channels on ``(batch, channels, 32, 32)``
  (a CIFAR ResNet stage without its first, shape-changing block);
- ``transformer``: ``nn.TransformerEncoder`` of ``layers`` layers (d_model 64, 4 heads,
  feed-forward 128, batch first, dropout 0) on ``(batch, 64 tokens, 64)``.

Candidates (same blocks, the same weights where the function is the same):

- ``autograd``: the stage as it is; ``checkpoint``: ``torch.utils.checkpoint`` on every block;
- ``revlib momentum``: revlib 1.7.2 ``sequential_to_momentum_net(blocks, split_dim,
  residual=True, beta=0.9)`` (memory-saving), its two streams the two halves of the channels,
  so its blocks are built on half the width; its gradient error is against the same network
  with ``MemoryModes.no_savings`` (plain autograd of the same forward);
- ``memcnn additive``: memcnn 1.5.2 ``InvertibleModuleWrapper(AdditiveCoupling(F, G),
  keep_input=False)`` per block, ``F, G`` the block's residual branch on half the channels
  (hidden width = channels, the block's parameter count); a fresh input tensor every step, as
  ``keep_input=False`` frees it. Its gradient error is against ``mode.RevNet`` with
  ``reversible=False`` on the same ``F, G`` (the same function); for the transformer,
  ``F, G`` are encoder layers of half width (d_model 32) with ``split_dim=2``;
- ``mode float`` / ``mode exact``: ``mode.convert(stage, gamma=0.9)`` (every block converted,
  ``keep_first_layer=False``), reversible in float / bit-exact; gradient error against the
  same conversion with ``reversible=False``.

Peak: one training step (forward, ``sum of squares`` loss, backward; parameter gradients set to
``None`` first), every CPU allocation counted (``experiments.memory_meter``), after a warm-up
step. Time: median wall time of ``--repeats`` interleaved steps (no profiler), one thread.

Usage::

    python benchmarks/bench_peers.py          # writes RESULTS_peers.md and results_peers.json
    python benchmarks/bench_peers.py --quick  # small sizes, prints only
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import warnings

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import _measure as M  # noqa: E402

import mode  # noqa: E402
from experiments.memory_meter import measure_peak  # noqa: E402
from mode.models import BasicBlock  # noqa: E402

MIB = 2.0**20
GAMMA = 0.9


def peers() -> dict[str, object]:
    """The importable peer modules (name -> module or the import error text)."""
    out: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("revlib", "memcnn"):
            try:
                out[name] = __import__(name)
            except Exception as exc:  # noqa: BLE001 (report any import failure)
                out[name] = f"{type(exc).__name__}: {exc}"
    return out


class Sequential(nn.Module):
    """``x <- m(x)`` for every module, optionally checkpointing each."""

    def __init__(self, modules, checkpointed: bool = False):
        super().__init__()
        self.mods = nn.ModuleList(modules)
        self.checkpointed = checkpointed

    def forward(self, x):
        for m in self.mods:
            x = checkpoint(m, x, use_reentrant=False) if self.checkpointed else m(x)
        return x


class BasicBranch(nn.Module):
    """A BasicBlock's residual branch ``bn(conv(relu(bn(conv(x)))))`` on ``c`` channels."""

    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(c, hidden, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(hidden), nn.ReLU(),
                                 nn.Conv2d(hidden, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return self.net(x)


class EncoderBranch(nn.Module):
    """``layer(x) - x``: the residual part of an encoder layer (for couplings)."""

    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.layer(x) - x


def workload(kind: str, size: dict):
    """``(blocks, couple_F, couple_G, split_dim, x)`` of a workload."""
    torch.manual_seed(0)
    if kind == "cifar stage":
        c, n, b = size["channels"], size["blocks"], size["batch"]
        blocks = [BasicBlock(c, c) for _ in range(n)]
        F = [BasicBranch(c // 2, c) for _ in range(n)]
        G = [BasicBranch(c // 2, c) for _ in range(n)]
        x = torch.randn(b, c, 32, 32)
        return blocks, F, G, 1, x
    if kind == "transformer":
        n, b = size["layers"], size["batch"]
        enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0,
                                                               batch_first=True), n,
                                    enable_nested_tensor=False)
        F = [EncoderBranch(32, 2, 64) for _ in range(n)]
        G = [EncoderBranch(32, 2, 64) for _ in range(n)]
        x = torch.randn(b, 64, 64)
        return enc, F, G, 2, x
    raise ValueError(kind)


def half_blocks(kind: str, size: dict) -> list[nn.Module]:
    """The workload's blocks on half the channels (revlib's two streams are the two halves)."""
    torch.manual_seed(1)
    if kind == "cifar stage":
        c = size["channels"] // 2
        return [BasicBlock(c, c) for _ in range(size["blocks"])]
    return [nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
            for _ in range(size["layers"])]


def candidates(kind: str, size: dict, found: dict) -> tuple[dict, dict, torch.Tensor]:
    """Name -> model, name -> the reference model of its gradient error, and the input."""
    blocks, F, G, split, x = workload(kind, size)
    layers = list(blocks.layers) if kind == "transformer" else blocks
    models: dict[str, nn.Module] = {
        "autograd": Sequential(copy.deepcopy(layers)),
        "checkpoint": Sequential(copy.deepcopy(layers), checkpointed=True),
    }
    refs: dict[str, nn.Module] = {}
    revlib = found.get("revlib")
    if not isinstance(revlib, str):
        from revlib.core import MemoryModes
        from revlib.utils import sequential_to_momentum_net

        halves = half_blocks(kind, size)
        nets = [sequential_to_momentum_net(nn.Sequential(*copy.deepcopy(halves)),
                                           split_dim=split, residual=True, beta=GAMMA,
                                           memory_mode=mm)
                for mm in (MemoryModes.autograd_function, MemoryModes.no_savings)]
        nets[1].load_state_dict(nets[0].state_dict())  # the same weights in both
        models["revlib momentum"], refs["revlib momentum"] = nets
    memcnn = found.get("memcnn")
    if not isinstance(memcnn, str):
        wrapped = [memcnn.InvertibleModuleWrapper(
            memcnn.AdditiveCoupling(copy.deepcopy(f), copy.deepcopy(g), split_dim=split),
            keep_input=False, keep_input_inverse=False) for f, g in zip(F, G)]
        models["memcnn additive"] = Sequential(wrapped)
        ref = mode.RevNet([w._fn.Fm for w in wrapped], [w._fn.Gm for w in wrapped],
                          split_dim=split, reversible=False)
        refs["memcnn additive"] = ref
    stage = nn.Sequential(*copy.deepcopy(layers))
    for name, exact in (("mode float", False), ("mode exact", True)):
        models[name] = _convert(stage, exact)
        refs[name] = _convert(stage, False, reversible=False)
        refs[name].load_state_dict(models[name].state_dict())
    return models, refs, x


class _Holder(nn.Module):
    def __init__(self, stage: nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, x):
        return self.stage(x)


def _convert(stage: nn.Sequential, exact: bool, reversible: bool = True) -> nn.Module:
    """``mode.convert`` of a bare stage (held in a module so that it has a path)."""
    return mode.convert(_Holder(stage), "stage", gamma=GAMMA, keep_first_layer=False,
                        exact=exact, reversible=reversible)


def step(model: nn.Module, x: torch.Tensor, fresh: bool) -> None:
    model.zero_grad(set_to_none=True)
    inp = x.clone().requires_grad_(True) if fresh else x
    model(inp).pow(2).sum().backward()


def grads(model: nn.Module, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """``id(parameter) -> gradient`` of one training step (zeros where none flowed)."""
    step(model, x, fresh=True)
    out = {id(p): (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
           for p in model.parameters()}
    model.zero_grad(set_to_none=True)
    return out


def grad_error(model: nn.Module, ref: nn.Module, x: torch.Tensor) -> float:
    """Relative error of ``model``'s parameter gradients against ``ref``'s: by identity when
    they share parameters, else in parameter order (copies of the same structure)."""
    g, r = grads(model, x), grads(ref, x)
    if set(g) == set(r):
        keys = list(g)
        return M.rel_error([g[k] for k in keys], [r[k] for k in keys])
    gl, rl = list(g.values()), list(r.values())
    if [t.shape for t in gl] != [t.shape for t in rl]:
        raise ValueError("model and reference have different parameters")
    return M.rel_error(gl, rl)


def measure(kind: str, size: dict, repeats: int, found: dict) -> dict:
    models, refs, x = candidates(kind, size, found)
    entry: dict = {"workload": kind, "size": size, "models": {}}
    for name, m in models.items():
        m.train()
        # memcnn frees its input: every candidate gets a fresh clone, which keeps it fair
        step(m, x, True)  # warm-up
        _, peak = measure_peak(lambda m=m: step(m, x, True))
        m.zero_grad(set_to_none=True)
        err = None
        if name in refs:
            refs[name].train()
            err = grad_error(m, refs[name], x)
        entry["models"][name] = {"peak": peak.bytes, "grad_rel_error": err}
        print(f"  {kind} {name}: peak {peak.bytes / MIB:.1f} MiB"
              + ("" if err is None else f", grad error {err:.1e}"), flush=True)
    times = M.interleaved_times({k: (lambda m=m: step(m, x, True)) for k, m in models.items()},
                                repeats=repeats, warmup=1)
    ref_t = M.median(times["autograd"]["wall"])
    ref_p = entry["models"]["autograd"]["peak"]
    for k, t in times.items():
        e = entry["models"][k]
        if isinstance(t, str):
            e["error"] = t
            continue
        e["time_s"] = M.median(t["wall"])
        e["time_all_s"] = t["wall"]
        e["time_vs_autograd"] = e["time_s"] / ref_t
        e["peak_vs_autograd"] = e["peak"] / ref_p
    return entry


def markdown(results: dict) -> str:
    info = results["machine"]
    lines = [
        "# Peers: time and peak training memory on the same stages",
        "",
        f"`{results['command']}` on {M.machine_line(info)}, commit {results['commit']}; "
        f"revlib {results['versions'].get('revlib')}, memcnn "
        f"{results['versions'].get('memcnn')} (installed with --no-deps; see below). One "
        "training step (forward, sum-of-squares loss, backward, parameter gradients included), "
        "every CPU allocation counted (torch.profiler), after a warm-up step; time: median of "
        f"{results['repeats']} interleaved steps without the profiler (a shared 2-core machine: "
        "compare ratios within a table, not absolute times). gamma = beta = 0.9.",
        "",
        "| workload | candidate | peak (MiB) | / autograd | step time (s) | / autograd | "
        "gradient error (vs) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    vs = {"revlib momentum": "revlib no_savings", "memcnn additive": "mode.RevNet autograd",
          "mode float": "mode reversible=False", "mode exact": "mode reversible=False"}
    for e in results["runs"]:
        s = ", ".join(f"{k} {v}" for k, v in e["size"].items())
        for name, r in e["models"].items():
            err = r.get("grad_rel_error")
            t = r.get("time_s")
            lines.append(
                f"| {e['workload']} ({s}) | {name} | {r['peak'] / MIB:.1f} | "
                f"{r.get('peak_vs_autograd', float('nan')):.2f} | "
                f"{'' if t is None else f'{t:.3f}'} | "
                f"{'' if t is None else format(r['time_vs_autograd'], '.2f')} | "
                f"{'' if err is None else f'{err:.1e} ({vs[name]})'} |")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


NOTES = [
    "revlib and memcnn import without torchvision (memcnn prints a FutureWarning about "
    "`torch.cuda.amp.custom_bwd`); no shim was needed.",
    "revlib runs as `sequential_to_momentum_net(blocks, split_dim, residual=True, beta=0.9)`: "
    "its two streams are the two halves of the channels (of d_model for the transformer), so "
    "its blocks are built on half the width (a quarter of the stage's parameters). Its "
    "drop-in `module_list_to_momentum_net` was tried first: in the memory-saving mode "
    "(`MemoryModes.autograd_function`) every parameter gradient came back zero (not None) on "
    "these blocks, against non-zero ones with `MemoryModes.no_savings`, so it is not used.",
    "revlib's MomentumNet scales the streams by beta^idx and (1 - beta) / beta^(idx + 1); "
    "its reconstruction is not exact in float, so its gradients differ from plain autograd "
    "of the same forward (the error column).",
    "memcnn's additive coupling is a RevNet (y1 = x1 + F(x2), y2 = x2 + G(y1)), a different "
    "function from the ResNet stage, with the block's parameter count; its reference is "
    "mode.RevNet(F, G, reversible=False) on the very same F, G modules.",
    "mode converts every block (keep_first_layer=False); its reference is the same "
    "conversion with reversible=False (plain autograd of the same Momentum ResNet).",
    "memcnn's gradient error of 1.4 on the transformer is not memcnn's: mode.RevNet "
    "(reversible=True, float) on the very same F, G has the same error (1.39 against its "
    "reversible=False), and reconstructing the input from the output with mode.RevNet.inverse "
    "is off by 482 on inputs of size 4.6: the additive coupling of these half-width encoder "
    "layers is not invertible in float32 over 12 layers (checked once by hand, not by the "
    "script).",
    "revlib's peak and time are not comparable one to one with the others: its blocks are half "
    "as wide (see above).",
]


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    found = peers()
    for name, mod in found.items():
        if isinstance(mod, str):
            print(f"{name} not importable ({mod}): left out", flush=True)
    if args.quick:
        plan = [("cifar stage", {"channels": 8, "blocks": 3, "batch": 4}),
                ("transformer", {"layers": 2, "batch": 2})]
    else:
        plan = [("cifar stage", {"channels": 16, "blocks": 18, "batch": 32}),
                ("transformer", {"layers": 12, "batch": 16})]
    runs = [measure(kind, size, args.repeats, found) for kind, size in plan]
    versions = {n: _version(n) for n, m in found.items() if not isinstance(m, str)}
    results = {"machine": M.machine_info(), "commit": M.git_commit(os.path.dirname(HERE)),
               "command": "python benchmarks/bench_peers.py" + (" --quick" if args.quick else ""),
               "repeats": args.repeats, "versions": versions, "runs": runs, "notes": NOTES}
    text = markdown(results)
    print(text)
    if not args.quick:
        with open(os.path.join(HERE, "results_peers.json"), "w") as fh:
            json.dump(results, fh, indent=1)
        with open(os.path.join(HERE, "RESULTS_peers.md"), "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
