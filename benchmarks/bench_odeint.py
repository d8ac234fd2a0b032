"""Continuous second-order solvers: the reversible momentum method against torchdiffeq, one run.

The problem: ``eps x'' + x' = F(x)`` with ``eps = 0.1``, ``F`` a 64 -> 128 -> 64 tanh MLP
(``Linear(64, 128), Tanh, Linear(128, 64)``, PyTorch's default initialisation, seed 0),
``x0`` of shape (256, 64), ``u0 = 0``, ``t`` in [0, 1], ``N`` steps of size ``1/N``. The loss
is ``<x(1), c>`` for a fixed random cotangent ``c``; gradients go to ``x0`` and every parameter.

Methods (``N`` steps each):

- ``momentum rev``     ``mode.MomentumNeuralODE(F, eps, method="momentum",
                       adjoint="reversible")``: bit-exact reconstruction (fixed point, default
                       ``frac_bits``), no stored activations;
- ``momentum autograd`` the same rule with plain autograd (``adjoint=False``);
- ``euler`` / ``rk4``  ``torchdiffeq.odeint`` on the first-order system ``(x, u)' = (u,
                       (F(x) - u) / eps)`` with ``options={"step_size": 1/N}``;
- ``euler adj`` / ``rk4 adj``  ``torchdiffeq.odeint_adjoint`` on the same system.

Measured per (method, N), each in a fresh interpreter:

- time: forward + backward, median of ``--repeats`` rounds (default 11) after one warm-up
  (float32); the methods of one N are timed in one process, interleaved round by round, so
  that load from other processes on a shared machine hits them alike; the ratio to the euler
  adjoint is the median of the per-round ratios;
- NFE: evaluations of ``F`` in the forward and in the backward pass;
- peak memory: of a second forward + backward (the first, at full size, is a warm-up: the
  steady state of a training loop); on CPU the increase of the RSS high-water mark
  (``VmHWM``, reset before the pass, see ``_measure.py``) over the RSS before it, with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed temporaries leave resident memory; on CUDA
  ``torch.cuda.max_memory_allocated`` minus the allocation before the pass (float32);
- gradient error: ``||g - g_ref|| / ||g_ref||`` in float64, ``g_ref`` the plain-autograd
  gradient of the same discretization (momentum autograd for the momentum rows, torchdiffeq
  ``odeint`` for the adjoint rows); for ``momentum rev`` also with ``frac_bits=40``.

The momentum rule needs ``h = 1/N <= eps``: at ``N = 8`` (h = 0.125) it is not defined.

Usage::

    python benchmarks/bench_odeint.py            # N = 8 .. 512, writes RESULTS_odeint.md
    python benchmarks/bench_odeint.py --quick    # N = 16, 64, 256, fewer repeats
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch
import torchdiffeq
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mode  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import _measure as M  # noqa: E402

EPS = 0.1
D, HIDDEN, BATCH = 64, 128, 256
METHODS = ["momentum rev", "momentum autograd", "euler", "euler adj", "rk4", "rk4 adj"]
REFERENCE = {"momentum rev": "momentum autograd", "euler adj": "euler", "rk4 adj": "rk4"}


class Counted(nn.Module):
    """``F(x)`` with an evaluation counter (``t`` is ignored: an autonomous field)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(D, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, D))
        self.nfe = 0

    def forward(self, t, x):
        self.nfe += 1
        return self.net(x)


class SecondOrder(nn.Module):
    """``(x, u)' = (u, (F(x) - u) / eps)``: what a torchdiffeq user writes for this ODE."""

    def __init__(self, field: Counted, eps: float):
        super().__init__()
        self.field = field
        self.eps = eps

    def forward(self, t, y):
        x, u = y
        return u, (self.field(t, x) - u) / self.eps


def build(method: str, n: int, dtype, device, frac_bits: int | None = None):
    """(field, run) where run(x0) returns x(1) for the method with n steps."""
    field = Counted().to(device=device, dtype=dtype)
    t = torch.tensor([0.0, 1.0], dtype=dtype, device=device)
    if method.startswith("momentum"):
        options = {"step_size": 1.0 / n}
        if frac_bits is not None:
            options["frac_bits"] = frac_bits
        adjoint = "reversible" if method == "momentum rev" else False
        model = mode.MomentumNeuralODE(
            field, EPS, t=t, method="momentum", options=options, adjoint=adjoint
        )
        return field, model, lambda x0: model(x0)
    name, _, adj = method.partition(" ")
    system = SecondOrder(field, EPS)
    solver = torchdiffeq.odeint_adjoint if adj else torchdiffeq.odeint

    def run(x0):
        xs, _ = solver(
            system, (x0, torch.zeros_like(x0)), t, method=name, options={"step_size": 1.0 / n}
        )
        return xs[-1]

    return field, None, run


def gradients(run, field, x0, cot):
    x0 = x0.detach().requires_grad_()
    out = run(x0)
    wrt = [x0, *field.parameters()]
    return [g.detach() for g in torch.autograd.grad((out * cot).sum(), wrt)]


def rel_error(a, b) -> float:
    a = torch.cat([x.reshape(-1) for x in a])
    b = torch.cat([x.reshape(-1) for x in b])
    return float((a - b).norm() / b.norm())


def worker(method: str, n: int, device: str, repeats: int = 0) -> dict:
    """One (method, N) in this fresh interpreter: peak memory, NFE, gradient error."""
    torch.set_num_threads(1)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(BATCH, D, generator=g).to(dev)
    cot = torch.randn(BATCH, D, generator=g).to(dev)
    field, _, run = build(method, n, torch.float32, dev)
    x0.requires_grad_()
    params = list(field.parameters())
    # warm-up: one full forward + backward, so that library initialisation, code paths used
    # for the first time (their pages count as resident memory) and the allocator's first
    # growth are not counted: the measured pass is the steady state of a training loop
    torch.autograd.grad((run(x0) * cot).sum(), [x0, *params])

    # peak memory of one forward + backward
    if dev.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        M.reset_peak_rss()  # VmHWM back to the current RSS: the warm-up's peak is forgotten
        base = M.peak_rss_bytes()
    field.nfe = 0
    out = run(x0)
    nfe_forward = field.nfe
    torch.autograd.grad((out * cot).sum(), [x0, *params])
    nfe_backward = field.nfe - nfe_forward
    sync()
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        peak = M.peak_rss_bytes() - base
    del out

    # gradient error in float64 against autograd on the same discretization
    x64, c64 = x0.detach().double(), cot.double()
    errors = {}
    if method in REFERENCE:
        f_ref, _, run_ref = build(REFERENCE[method], n, torch.float64, dev)
        g_ref = gradients(run_ref, f_ref, x64, c64)
        f64, _, run64 = build(method, n, torch.float64, dev)
        errors["default"] = rel_error(gradients(run64, f64, x64, c64), g_ref)
        if method == "momentum rev":
            f40, _, run40 = build(method, n, torch.float64, dev, frac_bits=40)
            errors["frac_bits=40"] = rel_error(gradients(run40, f40, x64, c64), g_ref)
    return dict(method=method, n=n, nfe_forward=nfe_forward, nfe_backward=nfe_backward,
                peak_bytes=peak, errors=errors)


def time_worker(n: int, methods: list[str], device: str, rounds: int) -> dict:
    """Forward + backward times of every method at N, interleaved round by round (the order
    rotates each round) so that load from other processes hits all methods alike."""
    torch.set_num_threads(1)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(BATCH, D, generator=g).to(dev).requires_grad_()
    cot = torch.randn(BATCH, D, generator=g).to(dev)
    runs = {}
    for m in methods:
        field, _, run = build(m, n, torch.float32, dev)
        runs[m] = (run, [x0, *field.parameters()])

    def once(m: str) -> float:
        run, wrt = runs[m]
        sync()
        start = time.perf_counter()
        out = run(x0)
        torch.autograd.grad((out * cot).sum(), wrt)
        sync()
        return time.perf_counter() - start

    for m in methods:  # warm-up
        once(m)
    times = {m: [] for m in methods}
    for r in range(rounds):
        k = r % len(methods)
        for m in methods[k:] + methods[:k]:
            times[m].append(once(m))
    return times


def run_isolated(args: list[str], device: str) -> tuple[dict | None, str]:
    """Run this script with ``args`` in a fresh interpreter: (its JSON answer, error line)."""
    cmd = [sys.executable, os.path.abspath(__file__), *args, "--device", device]
    env = dict(os.environ)
    if device == "cpu" and "--worker" in args:
        # a fixed mmap threshold returns freed temporaries to the OS at once, so that the RSS
        # tracks live memory rather than glibc's heap growth (same for every method). Only for
        # the memory measurement: it makes every large allocation a fresh mmap, which would
        # distort the timings (several times slower, and unlike any user's setting).
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        return None, (proc.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


def paired_ratio(r: dict, peer: dict) -> float:
    """Median over rounds of ``time / peer time`` in the same round: the rounds run the
    methods back to back, so load that drifts from round to round cancels in each ratio."""
    if not r.get("times") or not peer.get("times"):
        return float("nan")
    return statistics.median(a / b for a, b in zip(r["times"], peer["times"], strict=True))


def table(results: list[dict], ns: list[int]) -> str:
    by = {(r["method"], r["n"]): r for r in results}
    lines = [
        "| method | N | time (ms) | time / euler adj | NFE fwd | NFE bwd | peak mem (MB) "
        "| grad rel err (float64) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for n in ns:
        peer = by.get(("euler adj", n), {})
        for m in METHODS:
            r = by.get((m, n))
            if r is None:
                continue
            if "failed" in r:
                lines.append(f"| {m} | {n} | n/a | | | | | {r['failed'][:90]} |")
                continue
            ratio = paired_ratio(r, peer)
            if r["errors"]:
                err = "; ".join(f"{v:.1e}" + ("" if k == "default" else f" ({k})")
                                for k, v in r["errors"].items())
            else:
                err = "reference (autograd)"
            lines.append(
                f"| {m} | {n} | {1e3 * r['time_s']:.1f} | {ratio:.2f} | {r['nfe_forward']} "
                f"| {r['nfe_backward']} | {r['peak_bytes'] / 2**20:.1f} | {err} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 16, 64, 256; 3 rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timing rounds (default 11)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "RESULTS_odeint.md"))
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--time-worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, n = args.worker
        print(json.dumps(worker(method, int(n), args.device)))
        return
    if args.time_worker:
        n, *methods = args.time_worker
        print(json.dumps(time_worker(int(n), methods, args.device, args.repeats or 11)))
        return
    ns = [16, 64, 256] if args.quick else [8, 16, 32, 64, 128, 256, 512]
    repeats = args.repeats or (3 if args.quick else 11)
    results = []
    for n in ns:
        here = []
        for m in METHODS:
            r, failed = run_isolated(["--worker", m, str(n)], args.device)
            here.append(r or dict(method=m, n=n, failed=failed))
        ok = [r["method"] for r in here if "failed" not in r]
        times, failed = run_isolated(
            ["--time-worker", str(n), *ok, "--repeats", str(repeats)], args.device)
        for r in here:
            if "failed" not in r:
                r["times"] = times[r["method"]] if times else []
                r["time_s"] = statistics.median(r["times"]) if times else float("nan")
            shown = r.get("failed") or (
                f"{1e3 * r['time_s']:.1f} ms, NFE {r['nfe_forward']}/{r['nfe_backward']}, "
                f"{r['peak_bytes'] / 2**20:.1f} MB, err {r['errors']}")
            print(f"N={n:4d} {r['method']:18s} {shown}", flush=True)
        if failed:
            print(f"N={n:4d} timing failed: {failed}", flush=True)
        results.extend(here)
    command = "python benchmarks/bench_odeint.py" + (" --quick" if args.quick else "")
    if args.device != "cpu":
        command += f" --device {args.device}"
    device_name = (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
                   else platform.processor() or platform.machine())
    text = f"""# odeint: reversible momentum method vs torchdiffeq

Command: `{command}` ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)

Machine: {args.device} ({device_name}), {os.cpu_count()} CPUs (shared with other jobs),
torch {torch.__version__}, torchdiffeq {torchdiffeq.__version__}, one thread
(`torch.set_num_threads(1)`).

Problem: `eps x'' + x' = F(x)`, eps = {EPS}, F = 64 -> 128 -> 64 tanh MLP, batch {BATCH},
t in [0, 1], N steps of 1/N, u0 = 0.

- Time: forward + backward, float32, median of {repeats} rounds; all methods of one N are
  timed in one process, interleaved round by round. "time / euler adj" is the median over
  rounds of the ratio within each round (paired, so that load drifting between rounds
  cancels); per-round times are in `results_odeint.json`.
- NFE: evaluations of F in the forward and in the backward pass.
- Peak memory: each (method, N) in a fresh interpreter, float32; of a second forward +
  backward after a full-size warm-up (the steady state of a training loop): increase of the
  RSS high-water mark (CPU: `VmHWM`, reset before the pass) over the RSS before it, with
  `MALLOC_MMAP_THRESHOLD_=65536` so that freed temporaries leave resident memory.
- Gradient error: float64, `||g - g_ref|| / ||g_ref||` over the gradients of x0 and all
  parameters, g_ref plain autograd on the same discretization (momentum autograd for
  `momentum rev`, torchdiffeq `odeint` with the same method for the adjoints).
- The momentum rule needs 1/N <= eps: it does not exist at N = 8.

{table(results, ns)}
"""
    with open(args.out + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")
    raw = os.path.join(os.path.dirname(args.out), "results_odeint.json")
    with open(raw + ".tmp", "w") as fh:
        json.dump(dict(command=command, results=results), fh, indent=1)
    os.replace(raw + ".tmp", raw)
    print(f"wrote {raw}")


if __name__ == "__main__":
    main()
