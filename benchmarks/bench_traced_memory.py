"""Peak memory of one compiled training step: the reversible backward traced into the graph
(``mode.traceable``, ``fullgraph=True``) against the compiled autograd model and the opaque
engine, by depth.

Model: a Momentum ResNet of ``depth`` blocks ``W2 tanh(W1 x + b1) + b2`` (d = 256, hidden 256),
gamma = 0.9, float32, batch 4096, between two linear layers. Each (way, depth) runs in a fresh
process: build, one compiling step, then one measured step (forward + backward, loss the mean
square of the output). Peak = the highest level of every tensor allocation of forward and
backward above what was allocated before the step, parameter gradients included
(``experiments.memory_meter.measure_peak``: torch.profiler's CPU allocation events, on CUDA
``torch.cuda.max_memory_allocated``).

Ways: ``autograd`` (``torch.compile(model)`` of ``reversible=False``), ``opaque``
(``torch.compile(model)``, the reversible engine one opaque call), ``traced``
(``mode.traceable(model)``, ``torch.compile(model, fullgraph=True)``). Backend: inductor.

Usage::

    python benchmarks/bench_traced_memory.py       # depths 16, 64: RESULTS_traced_memory.md
    python benchmarks/bench_traced_memory.py --depths 8 32 --device cuda --out FILE.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

WAYS = ("autograd", "opaque", "traced")
WIDTH, BATCH = 256, 4096


def worker(way: str, depth: int, device: str) -> dict:
    import torch
    from torch import nn

    import mode
    from experiments.memory_meter import measure_peak

    torch.set_num_threads(1)
    torch.manual_seed(0)
    fs = [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH))
          for _ in range(depth)]
    net = mode.MomentumResNet(fs, 0.9, reversible=way != "autograd")
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), net, nn.Linear(WIDTH, 1)).to(device)
    if way == "traced":
        mode.traceable(model)
    compiled = torch.compile(model, fullgraph=way == "traced")
    x = torch.randn(BATCH, WIDTH, device=device)

    def step():
        for p in model.parameters():
            p.grad = None
        compiled(x).pow(2).mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # compiles
    for p in model.parameters():
        p.grad = None
    _, peak = measure_peak(step, device)
    return {"way": way, "depth": depth, "peak_bytes": peak.bytes}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.device)))
        return
    import _measure as M

    rows = []
    for depth in args.depths:
        for way in WAYS:
            r = M.run_isolated([os.path.abspath(__file__), "--device", args.device,
                                "--worker", way, str(depth)], timeout=1200)
            r.setdefault("way", way)
            r.setdefault("depth", depth)
            rows.append(r)
            print(json.dumps(r), flush=True)
    lines = ["| depth | way | peak of one step (MiB) | / autograd |", "|---|---|---|---|"]
    for depth in args.depths:
        ref = next((r.get("peak_bytes") for r in rows
                    if r["depth"] == depth and r["way"] == "autograd"), None)
        for r in rows:
            if r["depth"] != depth:
                continue
            if "peak_bytes" not in r:
                lines.append(f"| {depth} | {r['way']} | error: {r.get('error')} | |")
                continue
            ratio = f"{r['peak_bytes'] / ref:.3f}" if ref else ""
            lines.append(f"| {depth} | {r['way']} | {r['peak_bytes'] / 2**20:.1f} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    out = args.out or (os.path.join(HERE, "RESULTS_traced_memory.md")
                       if args.device == "cpu" else None)
    if out:
        M.write_results(out, "Peak memory of the traced reversible backward",
                        "bench_traced_memory.py", argv or sys.argv[1:], M.machine_info(),
                        f"device {args.device}, one fresh process per row, inductor.", table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
