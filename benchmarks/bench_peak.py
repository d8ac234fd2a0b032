"""Peak training memory and step time of the networks people train: ResNet-101 and a deep narrow
ResNet, against their Momentum ResNet conversions (float and exact), with a breakdown.

Networks (``mode.models``, CIFAR stem, 32x32 inputs, 10 classes, train mode, float32, seed 0):

- ``resnet101``: Bottleneck, stages of 3, 4, 23, 3 blocks, width 64;
- ``deep narrow``: BasicBlock, 4 stages of 60 blocks, width 16.

Models: the ResNet (autograd); ``mode.convert(model, ["layer1", ..., "layer4"], gamma=0.9)``
(reversible float) and the same with ``exact=True``; and, for the breakdown, both conversions
with ``recompute_first_layer=False`` (the kept first blocks stored as autograd stores them).

Peak: one training step (forward, cross-entropy, backward, parameter gradients set to ``None``
before it), every allocation counted (``experiments.memory_meter``: ``torch.profiler`` CPU
allocation events, or ``torch.cuda.max_memory_allocated``), after one unmeasured warm-up step.
A marker allocation between forward and backward splits the timeline into the forward's peak,
what the forward leaves for the backward ("held") and the backward's peak. Parameter-gradient
bytes and the peak of one training step of the largest-activation block alone (its own input
and output gradient included) bound what any backprop that recomputes blocks can reach: their
sum is printed as the "bound".

Time: median wall time of ``--repeats`` interleaved training steps (no profiler), one thread;
on Linux again in a subprocess whose malloc keeps freed memory (:data:`KEEP_MEMORY`): glibc's
default returns blocks of tens of MiB to the OS, and each new tensor of that size page-faults.

Usage::

    python benchmarks/bench_peak.py          # both networks, batch 32 and 64, writes RESULTS
    python benchmarks/bench_peak.py --quick  # deep narrow at batch 8, prints only
    python benchmarks/bench_peak.py --quick --device cuda --out X.md --json X.json

On CUDA the phases come from ``torch.cuda.memory_allocated``/``max_memory_allocated`` around
the forward and the backward, times are synchronized, and files are written only where
``--out``/``--json`` say (never over the CPU results).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import _measure as M  # noqa: E402

import mode  # noqa: E402
import mode.models  # noqa: E402
from experiments.memory_meter import measure_peak  # noqa: E402

STAGES = ["layer1", "layer2", "layer3", "layer4"]
MIB = 2.0**20
MARK = 777  # bytes of the marker allocation between forward and backward


def network(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "resnet101":
        return mode.models.resnet101(num_classes=10)
    if name == "deep narrow":
        return mode.models.ResNet(mode.models.BasicBlock, [60] * 4, num_classes=10, width=16)
    raise ValueError(name)


def models(base: nn.Module, breakdown: bool) -> dict[str, nn.Module]:
    out = {"resnet": base,
           "float": mode.convert(base, STAGES, gamma=0.9),
           "exact": mode.convert(base, STAGES, gamma=0.9, exact=True)}
    if breakdown:
        out["float, first blocks stored"] = mode.convert(base, STAGES, gamma=0.9,
                                                         recompute_first_layer=False)
        out["exact, first blocks stored"] = mode.convert(base, STAGES, gamma=0.9, exact=True,
                                                         recompute_first_layer=False)
    return out


def data(batch: int):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)


def train_step(model: nn.Module, x, y, mark: bool = False) -> None:
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    if mark:
        marker = torch.empty(MARK, dtype=torch.uint8)  # noqa: F841 (a timeline marker)
    loss.backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def cuda_phases(model: nn.Module, x, y) -> dict:
    """:func:`phases` on CUDA, from the allocator's counters (bytes over the start)."""
    train_step(model, x, y)  # warm-up
    model.zero_grad(set_to_none=True)
    dev = x.device
    torch.cuda.synchronize(dev)
    start = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    loss = nn.functional.cross_entropy(model(x), y)
    torch.cuda.synchronize(dev)
    forward_peak = torch.cuda.max_memory_allocated(dev) - start
    held = torch.cuda.memory_allocated(dev) - start
    torch.cuda.reset_peak_memory_stats(dev)
    loss.backward()
    torch.cuda.synchronize(dev)
    backward_peak = torch.cuda.max_memory_allocated(dev) - start
    model.zero_grad(set_to_none=True)
    return {"peak": max(forward_peak, backward_peak), "forward_peak": forward_peak,
            "held_after_forward": held, "backward_peak": backward_peak}


def phases(model: nn.Module, x, y) -> dict:
    """Peak, forward peak, held after forward, backward peak (bytes)."""
    train_step(model, x, y)  # warm-up
    model.zero_grad(set_to_none=True)
    _, peak = measure_peak(lambda: train_step(model, x, y, mark=True), timeline=True)
    model.zero_grad(set_to_none=True)
    line = peak.timeline
    levels = [level for _, level in line]
    deltas = [levels[0]] + [b - a for a, b in zip(levels, levels[1:])]
    i = deltas.index(MARK)
    return {"peak": peak.bytes, "forward_peak": max(levels[: i + 1]),
            "held_after_forward": levels[i], "backward_peak": max(levels[i:])}


def block_bound(base: nn.Module, x) -> dict:
    """Parameter-gradient bytes and one training step of the block with the largest
    activations (the second block of layer1) on its own input."""
    params = sum(p.numel() * p.element_size() for p in base.parameters())
    with torch.no_grad():
        h = base.layer1[0](base.relu(base.bn1(base.conv1(x))))
    block = base.layer1[1]
    inp = h.clone().requires_grad_(True)

    def work():
        out = block(inp)
        out.backward(torch.ones_like(out))
        inp.grad = None

    block.zero_grad(set_to_none=True)
    _, peak = measure_peak(work, x.device)
    block.zero_grad(set_to_none=True)
    return {"param_grad_bytes": params, "one_block_step_bytes": peak.bytes,
            "bound_bytes": params + peak.bytes}


def measure(net: str, batch: int, repeats: int, breakdown: bool,
            device: str | torch.device = "cpu") -> dict:
    device = torch.device(device)
    base = network(net).train().to(device)
    x, y = (t.to(device) for t in data(batch))
    ms = models(base, breakdown)
    entry: dict = {"network": net, "batch": batch, "models": {}}
    for name, m in ms.items():
        m.train()
        entry["models"][name] = cuda_phases(m, x, y) if device.type == "cuda" else \
            phases(m, x, y)
        print(f"  {net} b{batch} {name}: peak {entry['models'][name]['peak'] / MIB:.0f} MiB",
              flush=True)
    entry["bound"] = block_bound(base, x)
    for k, t in step_times(ms, x, y, repeats).items():
        entry["models"][k]["time_s"] = M.median(t["wall"])
        entry["models"][k]["time_all_s"] = t["wall"]
    ref = entry["models"]["resnet"]["peak"]
    for e in entry["models"].values():
        e["peak_vs_resnet"] = e["peak"] / ref
    entry["bound"]["bound_vs_resnet"] = entry["bound"]["bound_bytes"] / ref
    return entry


def step_times(ms: dict, x, y, repeats: int) -> dict:
    """Interleaved training-step times of the ResNet and both conversions."""
    timed = {k: ms[k] for k in ("resnet", "float", "exact")}
    return M.interleaved_times({k: (lambda m=m: train_step(m, x, y)) for k, m in timed.items()},
                               repeats=repeats, warmup=1)


# glibc's malloc hands large freed blocks back to the OS (munmap, heap trimming) and adjusts
# these thresholds as it goes, so the next tensor of that size page-faults on every page it
# touches; with both fixed high it keeps them, as jemalloc or tcmalloc do. Timed both ways.
KEEP_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**34)}


def kept_times(quick: bool, repeats: int, threads: int) -> dict:
    """``{(network, batch): {model: (median, all)}}``: the step times again, in a process whose
    allocator keeps freed memory (:data:`KEEP_MEMORY`); ``{}`` where that process failed."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "times.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--times-only", path,
               "--repeats", str(repeats), "--threads", str(threads)]
        if quick:
            cmd.append("--quick")
        done = subprocess.run(cmd, env={**os.environ, **KEEP_MEMORY})
        if done.returncode != 0:
            return {}
        with open(path) as fh:
            rows = json.load(fh)
    return {(r["network"], r["batch"]): r["times"] for r in rows}


def times_only(plan, repeats: int, path: str) -> None:
    rows = []
    for net, batch, _ in plan:
        base = network(net).train()
        x, y = data(batch)
        t = step_times(models(base, False), x, y, repeats)
        rows.append({"network": net, "batch": batch,
                     "times": {k: [M.median(v["wall"]), v["wall"]] for k, v in t.items()}})
        print(f"  {net} b{batch} (allocator keeps memory): "
              + ", ".join(f"{k} {v[0]:.2f} s" for k, v in rows[-1]["times"].items()), flush=True)
    with open(path, "w") as fh:
        json.dump(rows, fh)


TARGETS = {"resnet101": {"float": 0.45, "exact": 0.55}, "deep narrow": {"float": 0.10,
                                                                         "exact": 0.10}}


def markdown(results: dict) -> str:
    info = results["machine"]
    lines = [
        "# Peak training memory: ResNet-101 and a deep narrow ResNet",
        "",
        f"`python benchmarks/bench_peak.py` on {M.machine_line(info)}, "
        f"commit {results['commit']}. One training step (forward, cross-entropy, backward, "
        "parameter gradients included), every CPU allocation counted (torch.profiler), after a "
        "warm-up step; time: median of interleaved steps without the profiler, with glibc's "
        "default malloc and again in a process whose malloc keeps freed memory "
        f"(`{' '.join(f'{k}={v}' for k, v in KEEP_MEMORY.items())}`, as jemalloc or tcmalloc "
        "would: no page faults on reused blocks). "
        "gamma = 0.9, `mode.convert(model, ['layer1', ..., 'layer4'])`.",
        "",
        "| network | batch | model | peak (MiB) | / ResNet | target | forward peak | held after "
        "forward | backward peak | step time (s) | / float | step time, memory kept (s) "
        "| / float |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in results["runs"]:
        m = e["models"]
        for name, r in m.items():
            target = TARGETS[e["network"]].get(name)
            t, kept = r.get("time_s"), r.get("time_kept_s")
            ref = m["float"].get("time_kept_s")
            lines.append(
                f"| {e['network']} | {e['batch']} | {name} | {r['peak'] / MIB:.0f} | "
                f"{r['peak_vs_resnet']:.3f} | {f'≤ {target:.2f}' if target else ''} | "
                f"{r['forward_peak'] / MIB:.0f} | {r['held_after_forward'] / MIB:.0f} | "
                f"{r['backward_peak'] / MIB:.0f} | {'' if t is None else f'{t:.2f}'} | "
                f"{'' if t is None else format(t / m['float']['time_s'], '.2f')} | "
                f"{'' if kept is None else f'{kept:.2f}'} | "
                f"{'' if kept is None or not ref else format(kept / ref, '.2f')} |")
        b = e["bound"]
        lines.append(
            f"| {e['network']} | {e['batch']} | bound: parameter gradients "
            f"({b['param_grad_bytes'] / MIB:.0f}) + one block's training step "
            f"({b['one_block_step_bytes'] / MIB:.0f}) | {b['bound_bytes'] / MIB:.0f} | "
            f"{b['bound_vs_resnet']:.3f} | | | | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--out", help="markdown results (default: RESULTS_peak.md for a full CPU "
                    "run; none otherwise)")
    ap.add_argument("--json", help="raw results (default: results_peak.json likewise)")
    ap.add_argument("--times-only", metavar="JSON", help=argparse.SUPPRESS)  # see kept_times
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.quick:
        plan = [("deep narrow", 8, True)]
    else:
        plan = [("resnet101", 32, True), ("resnet101", 64, False), ("deep narrow", 32, True),
                ("deep narrow", 64, False)]
    if args.times_only:
        times_only(plan, args.repeats, args.times_only)
        return 0
    runs = [measure(net, b, args.repeats, breakdown, device) for net, b, breakdown in plan]
    if device.type == "cpu" and sys.platform.startswith("linux"):
        kept = kept_times(args.quick, args.repeats, args.threads)
        for e in runs:
            for k, (t, ts) in kept.get((e["network"], e["batch"]), {}).items():
                e["models"][k]["time_kept_s"], e["models"][k]["time_kept_all_s"] = t, ts
    results = {"machine": M.machine_info(), "commit": M.git_commit(os.path.dirname(HERE)),
               "runs": runs}
    text = markdown(results)
    if device.type == "cuda":
        results["device"] = f"{device} ({torch.cuda.get_device_name(device)})"
        text += (f"\nDevice: {results['device']}; peaks from torch.cuda.max_memory_allocated "
                 "(not the CPU profiler the header names).\n")
    print(text)
    # the repository's RESULTS files are the CPU's: another device writes only where told
    full_cpu = not args.quick and device.type == "cpu"
    out_md = args.out or (os.path.join(HERE, "RESULTS_peak.md") if full_cpu else None)
    out_json = args.json or (os.path.join(HERE, "results_peak.json") if full_cpu else None)
    if out_md:
        with open(out_md, "w") as fh:
            fh.write(text)
    if out_json:
        with open(out_json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
