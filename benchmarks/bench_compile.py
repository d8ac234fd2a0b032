"""torch.compile and the reversible engine: speed-up of a training step, one interleaved run.

Two models, each in the three gradient modes of mode (autograd, reversible float, exact):

- ``mlp``: a Momentum ResNet of ``depth`` MLP blocks ``W2 tanh(W1 x + b1) + b2`` (d = 64,
  hidden 128), batch 256, between two linear layers;
- ``conv``: a Momentum ResNet of ``depth`` convolutional blocks
  ``BN(conv3x3(relu(BN(conv3x3(x)))))`` (16 channels, 16x16 images), batch 32, after a stem
  convolution and before pooling and a linear head.

Per (model, mode), three or four ways to run a forward+backward (loss: mean square of the output):

- ``eager``: no compilation (the reference of every ratio);
- ``functions``: ``mode.compile_functions(model)``: only the residual functions, compiled with
  inductor, inside the engine (forward, recomputation);
- ``model``: ``torch.compile(model)`` (inductor); the engine is one opaque call in it, and the
  residual functions inside run compiled (the engine's default under torch.compile);
- ``traced`` (float mode only, in a group of its own with its own ``eager`` reference, see
  :data:`GROUPS`): ``mode.traceable(model)`` and ``torch.compile(model, fullgraph=True)``:
  forward and reversible backward in one graph (``mode.traced``); also in mode
  ``float-learned``, float mode with gamma an ``nn.Parameter`` (eager and traced only).

Reported: the median time of the interleaved rounds (after the compiling first call, which is
reported apart as ``first call``), the ratio to ``eager``, and the gradients' relative error
against ``eager``. In exact mode a ``functions``/``model`` row that raises means the compiled
forward and recomputation disagreed in their bits (the engine verifies the reconstruction).

Usage::

    python benchmarks/bench_compile.py --quick             # the MLP only, depth 16, 5 rounds
    python benchmarks/bench_compile.py                     # both models, writes RESULTS_compile.md
    python benchmarks/bench_compile.py --device cuda       # on a GPU (times synchronized)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import _measure as M  # noqa: E402

import mode  # noqa: E402

MODES = {"autograd": dict(reversible=False), "float": dict(reversible=True),
         "float-learned": dict(reversible=True, learned=True), "exact": dict(exact=True)}
WAYS = ("eager", "functions", "model")

#: (gradient mode, ways) run together, each group after ``torch._dynamo.reset()``. ``traced``
#: has a group of its own: dynamo shares compiled frames among every torch.compile of the same
#: code, and after ``model`` had compiled the opaque engine's frames, a traceable copy reused
#: them and ran the engine eagerly (measured: gradients bit-equal to eager, no new graph).
GROUPS = (("autograd", WAYS), ("float", WAYS), ("float", ("eager", "traced")),
          ("float-learned", ("eager", "traced")), ("exact", WAYS))


def mlp_model(depth: int) -> tuple[nn.Module, torch.Tensor]:
    fs = [nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64)) for _ in range(depth)]
    model = nn.Sequential(nn.Linear(64, 64), mode.MomentumResNet(fs, 0.9), nn.Linear(64, 10))
    return model, torch.randn(256, 64)


def conv_model(depth: int) -> tuple[nn.Module, torch.Tensor]:
    def block():
        return nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                             nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, bias=False),
                             nn.BatchNorm2d(16))

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), mode.MomentumResNet(
        [block() for _ in range(depth)], 0.9), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10))
    return model, torch.randn(32, 3, 16, 16)


MODELS = {"mlp": mlp_model, "conv": conv_model}


def with_mode(model: nn.Module, how: str) -> nn.Module:
    """A copy of ``model`` whose mode network runs in gradient mode ``how``."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, mode.MomentumResNet):
            m.reversible = MODES[how].get("reversible", True)
            m.exact = MODES[how].get("exact", False)
            if MODES[how].get("learned"):  # gamma an nn.Parameter (the couplings' tensor alpha)
                like = next(m.parameters())
                m.gamma = nn.Parameter(torch.tensor(float(m.gamma), device=like.device,
                                                    dtype=like.dtype))
    return model


def step_fn(model: nn.Module, x: torch.Tensor, device: torch.device):
    """One forward+backward; returns the gradients (synchronized on a GPU)."""
    params = list(model.parameters())

    def step():
        for p in params:
            p.grad = None
        model(x).pow(2).mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return [p.grad for p in params]

    return step


def run(model_name: str, depth: int, repeats: int, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    base, x = MODELS[model_name](depth)
    base, x = base.to(device), x.to(device)
    rows = []
    for how, ways in GROUPS:
        torch._dynamo.reset()
        candidates, firsts, grads = {}, {}, {}
        for way in ways:
            model = with_mode(base, how)  # compile_functions None: compiled under "model"
            if way == "functions":
                mode.compile_functions(model)
            elif way == "model" and how == "exact":  # exact mode compiles them on request only
                mode.compile_functions(model)
            elif way == "traced":
                mode.traceable(model)
            runner = (torch.compile(model) if way == "model" else
                      torch.compile(model, fullgraph=True) if way == "traced" else model)
            step = step_fn(runner, x, device)
            t0 = time.perf_counter()
            try:
                grads[way] = [g.detach().clone() for g in step()]
            except Exception as exc:  # e.g. exact reconstruction refused
                firsts[way] = f"{type(exc).__name__}: {str(exc)[:120]}"
                continue
            firsts[way] = time.perf_counter() - t0
            candidates[way] = step
        times = M.interleaved_times(candidates, repeats=repeats, warmup=1)
        ref = M.median(times["eager"]["wall"])
        for way in ways:
            t = times.get(way)
            row = {"model": model_name, "depth": depth, "mode": how, "way": way,
                   "first_call_s": firsts[way]}
            if isinstance(t, dict):
                med = M.median(t["wall"])
                row.update(median_s=med, ratio=med / ref, samples=t["wall"],
                           grad_error=M.rel_error(grads[way], grads["eager"]))
            else:
                row["error"] = t if isinstance(t, str) else firsts[way]
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    if "median_s" not in r:
        return f"{r['model']:5s} {r['mode']:9s} {r['way']:10s} ERROR {r.get('error')}"
    first = r["first_call_s"]
    return (f"{r['model']:5s} {r['mode']:9s} {r['way']:10s} median {1e3 * r['median_s']:9.2f} ms"
            f"  x{r['ratio']:.2f} of eager  first call {first:7.2f} s"
            f"  grad err {r['grad_error']:.1e}")


def table(rows: list[dict]) -> str:
    out = ["| model | depth | mode | way | median step (ms) | / eager | first call (s) | "
           "grad error vs eager |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "median_s" in r:
            out.append(f"| {r['model']} | {r['depth']} | {r['mode']} | {r['way']} | "
                       f"{1e3 * r['median_s']:.2f} | {r['ratio']:.2f} | "
                       f"{r['first_call_s']:.1f} | {r['grad_error']:.1e} |")
        else:
            out.append(f"| {r['model']} | {r['depth']} | {r['mode']} | {r['way']} | "
                       f"error: {r.get('error')} | | | |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the MLP at depth 16, 5 rounds")
    ap.add_argument("--models", nargs="+", default=None, choices=list(MODELS))
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="markdown file (default: RESULTS_compile.md "
                    "for a full CPU run, none otherwise)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = args.models or (["mlp"] if args.quick else list(MODELS))
    repeats = args.repeats or (5 if args.quick else 11)
    rows = []
    for name in models:
        rows += run(name, args.depth, repeats, device)
    full = not args.quick and args.models is None and device.type == "cpu"
    out = args.out or (os.path.join(HERE, "RESULTS_compile.md") if full else None)
    info = M.machine_info()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if out:
        M.write_results(out, "torch.compile and the reversible engine", "bench_compile.py",
                        argv or sys.argv[1:], info, f"device {device}, {repeats} interleaved "
                        f"rounds after one warm-up, medians of wall-clock.", table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "device": str(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
