"""Momentum ResNet backprop: time, memory and gradient accuracy against the peers, one run.

A stack of MLP blocks ``f_n(x) = W2 tanh(W1 x + b1) + b2`` (d = 64, hidden 128, PyTorch's
default ``nn.Linear`` initialisation, seed 0), batch 256, float32, CPU, under the momentum
update ``v <- gamma v + (1 - gamma) f_n(x); x <- x + v`` (v_0 = 0), backpropagated with:

- ``autograd loop``      the update written by hand, plain autograd (the reference);
- ``mode autograd``      ``mode.MomentumResNet(fs, gamma, reversible=False)``;
- ``checkpoint``         the hand loop with ``torch.utils.checkpoint`` around every block
                         (``use_reentrant=False``);
- ``momentumnet bp``     ``momentumnet.MomentumNet(fs, gamma, use_backprop=True)`` (0.10);
- ``momentumnet mem``    ``momentumnet.MomentumNet(fs, gamma, use_backprop=False)``;
- ``mode float``         ``mode.MomentumResNet(fs, gamma, reversible=True, exact=False)``;
- ``mode exact``         ``mode.MomentumResNet(fs, gamma, reversible=True, exact=True)``.

Measured per method and depth (see ``benchmarks/_measure.py`` for how):

- forward+backward time: median over interleaved repeats after warm-up, ``x_N`` backpropagated
  with a fixed random cotangent, gradients to the input and every parameter;
- held activation memory after the forward pass (saved tensors + Function ctx attributes,
  parameters and the input excluded);
- peak memory: increase of the RSS high-water mark (``VmHWM``, what ``ru_maxrss`` reports for
  the process's own memory) over a baseline taken after building the model and
  inputs and after a warm-up forward+backward of the same method on a depth-2 copy, with the
  high-water mark reset there (``/proc/self/clear_refs``), one fresh interpreter per
  (method, depth);
- gradient relative error ``||g - g_ref|| / ||g_ref||`` over the input gradient and all parameter
  gradients: every method in float64 against the autograd loop in float64, and every method
  in float32 against the autograd loop in float32.

Usage::

    python benchmarks/bench_momentum.py            # full: depths 8..512, writes RESULTS
    python benchmarks/bench_momentum.py --quick    # a minute or two, prints only
    python benchmarks/bench_momentum.py --quick --device cuda --out X.md --json X.json

On CUDA (``--device cuda``) times are taken after ``torch.cuda.synchronize``, peak memory is
``torch.cuda.max_memory_allocated`` over the step (in-process, after a reset), and files are
written only where ``--out``/``--json`` say (never over the CPU results).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import sys
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _measure as M  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
D, HIDDEN, BATCH = 64, 128, 256
FULL_DEPTHS = [8, 16, 32, 64, 128, 256, 512]
QUICK_DEPTHS = [8, 16, 64]
REF = "autograd loop"
MIB = 2.0**20
#: the device of the problems (``--device``; the CPU unless told)
DEVICE = torch.device("cpu")


# --------------------------------------------------------------------------------------------
# the model and the methods


class MLPBlock(nn.Module):
    """``f(x) = W2 tanh(W1 x + b1) + b2``."""

    def __init__(self, d: int = D, hidden: int = HIDDEN):
        super().__init__()
        self.lin1 = nn.Linear(d, hidden)
        self.lin2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.tanh(self.lin1(x)))


def make_problem(depth: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Blocks, input (requires grad) and output cotangent, deterministic given the seed."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    blocks = nn.ModuleList(MLPBlock() for _ in range(depth)).to(dtype).to(DEVICE)
    x0 = torch.randn(BATCH, D, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    cot = torch.randn(BATCH, D, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    return blocks, x0.requires_grad_(True), cot


def _momentum_block(f: nn.Module, gamma: float, x: torch.Tensor, v: torch.Tensor):
    v = gamma * v + (1 - gamma) * f(x)
    return x + v, v


def _loop(blocks, gamma: float, x: torch.Tensor) -> torch.Tensor:
    v = torch.zeros_like(x)
    for f in blocks:
        x, v = _momentum_block(f, gamma, x, v)
    return x


def _checkpointed(blocks, gamma: float, x: torch.Tensor) -> torch.Tensor:
    v = torch.zeros_like(x)
    for f in blocks:
        x, v = checkpoint(functools.partial(_momentum_block, f, gamma), x, v, use_reentrant=False)
    return x


def _mode_available() -> bool:
    try:
        import mode

        return hasattr(mode, "MomentumResNet")
    except ImportError:
        return False


def build(method: str, blocks: nn.ModuleList, gamma: float) -> Callable[[torch.Tensor], object]:
    """``net(x0) -> x_N`` for a method name (see the module docstring)."""
    if method == REF:
        return functools.partial(_loop, blocks, gamma)
    if method == "checkpoint":
        return functools.partial(_checkpointed, blocks, gamma)
    if method.startswith("momentumnet"):
        from momentumnet import MomentumNet

        return MomentumNet(list(blocks), gamma, use_backprop=method.endswith("bp"))
    if method.startswith("mode"):
        import mode

        kind = method.split()[1]
        return mode.MomentumResNet(
            blocks, gamma, reversible=kind != "autograd", exact=kind == "exact"
        )
    raise ValueError(f"unknown method {method!r}")


def methods_available() -> list[str]:
    import importlib.util

    names = [REF, "checkpoint", "momentumnet bp", "momentumnet mem"]
    if importlib.util.find_spec("momentumnet") is None:  # e.g. on a GPU machine without it
        names = names[:2]
    if _mode_available():
        names[1:1] = ["mode autograd"]
        names += ["mode float", "mode exact"]
    return names


def step_fn(net, blocks, x0, cot) -> Callable[[], None]:
    """One forward+backward: gradients to x0 and all parameters (cleared first)."""

    def run() -> None:
        x0.grad = None
        for p in blocks.parameters():
            p.grad = None
        out = net(x0)
        out.backward(cot)
        if x0.device.type == "cuda":
            torch.cuda.synchronize(x0.device)

    return run


def grads_of(net, blocks, x0, cot) -> list[torch.Tensor]:
    step_fn(net, blocks, x0, cot)()
    return [x0.grad.clone()] + [p.grad.clone() for p in blocks.parameters()]


# --------------------------------------------------------------------------------------------
# the four measurements


# Timing only: a no-grad forward pass followed by the autograd loop's forward+backward. This is
# the work of any reversible backprop of this update (the forward without a graph, then per
# layer one evaluation with a graph and its VJP, reconstruction from the same evaluation), so
# its ratio is the lower bound of "mode float" on this machine. The 4/3 of the issue assumes a
# backward pass costs twice a forward pass; here it costs less (see the README).
BOUND = "bound: no-grad fwd + autograd loop"


def _bound_step(blocks, gamma: float, ref_step: Callable[[], None], x0) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            _loop(blocks, gamma, x0)
        ref_step()  # synchronizes on CUDA

    return run


def measure_times(methods, depths, gammas, repeats, warmup) -> dict:
    out: dict = {}
    for gamma in gammas:
        for depth in depths:
            blocks, x0, cot = make_problem(depth)
            cands = {m: step_fn(build(m, blocks, gamma), blocks, x0, cot) for m in methods}
            cands[BOUND] = _bound_step(blocks, gamma, cands[REF], x0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                times = M.interleaved_times(cands, repeats, warmup)
            for m, t in times.items():
                if isinstance(t, str):
                    entry = {"error": t}
                else:
                    entry = {
                        "median_s": M.median(t["wall"]),
                        "median_cpu_s": M.median(t["cpu"]),
                        "wall_s": t["wall"],
                        "cpu_s": t["cpu"],
                    }
                out.setdefault(str(gamma), {}).setdefault(m, {})[str(depth)] = entry
            row = out[str(gamma)]
            ref = row[REF][str(depth)]["median_s"]
            print(
                f"  time  gamma={gamma} depth={depth:4d}  "
                + "  ".join(
                    f"{m}: {row[m][str(depth)]['median_s'] / ref:.2f}x"
                    for m in [*methods, BOUND]
                    if m != REF and "error" not in row[m][str(depth)]
                )
                + f"  ({REF}: {1e3 * ref:.1f} ms)",
                flush=True,
            )
    return out


def measure_held(methods, depths, gammas) -> dict:
    out: dict = {}
    for gamma in gammas:
        for depth in depths:
            blocks, x0, cot = make_problem(depth)
            exclude = [x0, *blocks.parameters()]
            for m in methods:
                net = build(m, blocks, gamma)
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        y, info = M.held_bytes(lambda net=net, x0=x0: net(x0), exclude)
                    y.backward(cot)
                except Exception as exc:
                    info = {"error": f"{type(exc).__name__}: {exc}"}
                del net
                out.setdefault(str(gamma), {}).setdefault(m, {})[str(depth)] = info
        print(f"  held memory gamma={gamma} done", flush=True)
    return out


def peak_worker(method: str, depth: int, gamma: float, threads: int) -> dict:
    """Run in a fresh interpreter: RSS high-water mark increase of one forward+backward."""
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    small, xs, cs = make_problem(2, seed=1)
    step_fn(build(method, small, gamma), small, xs, cs)()  # load code paths, thread pools
    blocks, x0, cot = make_problem(depth)
    run = step_fn(build(method, blocks, gamma), blocks, x0, cot)
    del small, xs, cs
    gc.collect()
    grads = 4 * (x0.numel() + sum(p.numel() for p in blocks.parameters()))
    if DEVICE.type == "cuda":  # the allocator's own peak, in this process
        base = torch.cuda.memory_allocated(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        run()
        return {"peak_increase_bytes": torch.cuda.max_memory_allocated(DEVICE) - base,
                "baseline_bytes": base, "grad_bytes": grads, "high_water_reset": True}
    reset = M.reset_peak_rss()
    base = M.peak_rss_bytes()
    run()
    peak = M.peak_rss_bytes()
    return {
        "peak_increase_bytes": peak - base,
        "baseline_bytes": base,
        "grad_bytes": grads,
        "high_water_reset": reset,
    }


def measure_peak(methods, depths, gamma, threads) -> dict:
    out: dict = {}
    me = os.path.abspath(__file__)
    for depth in depths:
        for m in methods:
            if DEVICE.type == "cuda":
                out.setdefault(m, {})[str(depth)] = peak_worker(m, depth, gamma, threads)
                continue
            argv = [me, "--peak-worker", m, str(depth), str(gamma), "--threads", str(threads)]
            out.setdefault(m, {})[str(depth)] = M.run_isolated(argv)
        print(f"  peak memory depth={depth} done", flush=True)
    return out


def measure_errors(methods, depths, gammas) -> dict:
    out: dict = {}
    for gamma in gammas:
        for depth in depths:
            for dtype in (torch.float64, torch.float32):
                blocks, x0, cot = make_problem(depth, dtype)
                ref = grads_of(build(REF, blocks, gamma), blocks, x0, cot)
                for m in methods:
                    if m == REF:
                        continue
                    key = "err64" if dtype == torch.float64 else "err32"
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        try:
                            net = build(m, blocks, gamma)
                            err = M.rel_error(grads_of(net, blocks, x0, cot), ref)
                        except Exception as exc:
                            err = f"{type(exc).__name__}: {exc}"
                    entry = (
                        out.setdefault(str(gamma), {}).setdefault(m, {}).setdefault(str(depth), {})
                    )
                    entry[key] = err
                    entry[key + "_warned"] = any(
                        "reversal" in str(w.message) or "amplif" in str(w.message) for w in caught
                    )
            # the floor: float32 autograd against float64 autograd
            b64, x64, c64 = make_problem(depth, torch.float64)
            b32, x32, c32 = make_problem(depth, torch.float32)
            e = M.rel_error(
                grads_of(build(REF, b32, gamma), b32, x32, c32),
                grads_of(build(REF, b64, gamma), b64, x64, c64),
            )
            out[str(gamma)].setdefault(REF, {})[str(depth)] = {"err32_vs_64": e}
        print(f"  gradient errors gamma={gamma} done", flush=True)
    return out


# --------------------------------------------------------------------------------------------
# report


def _fmt_err(e) -> str:
    if isinstance(e, str):
        return "fails"
    if e is None:
        return "-"
    if not math.isfinite(e):
        return str(e)
    return f"{e:.1e}" if e < 0.01 or e >= 100 else f"{e:.3g}"


def _row(name: str, cells: list[str]) -> str:
    return f"| {name} | " + " | ".join(cells) + " |"


def _header(first: str, depths) -> list[str]:
    return [_row(first, [str(d) for d in depths]), "|" + "---|" * (len(depths) + 1)]


def report(res: dict) -> str:
    depths, methods, gammas = res["depths"], res["methods"], res["gammas"]
    lines: list[str] = []
    for clock, key, what in (
        ("wall-clock", "median_s", "median ms"),
        ("process CPU time", "median_cpu_s", "median CPU ms"),
    ):
        for g in map(str, gammas):
            t = res["time"][g]
            lines += [f"\n**Forward+backward {clock}, gamma = {g}** ({what}; ratio to {REF})\n"]
            lines += _header("method \\ depth", depths)
            for m in [*methods, *([BOUND] if BOUND in t else [])]:
                cells = []
                for d in map(str, depths):
                    e, r = t[m][d], t[REF][d]
                    if "error" in e:
                        cells.append("fails")
                    else:
                        cells.append(f"{1e3 * e[key]:.1f} ({e[key] / r[key]:.2f}x)")
                lines.append(_row(m, cells))
    for g in map(str, gammas):
        h = res["held"][g]
        lines += [
            f"\n**Held activation memory after forward, gamma = {g}** (MiB; saved tensors + "
            "ctx attributes, parameters and input excluded)\n"
        ]
        lines += _header("method \\ depth", depths)
        for m in methods:
            cells = [
                "fails" if "error" in h[m][d] else f"{h[m][d]['total'] / MIB:.2f}"
                for d in map(str, depths)
            ]
            lines.append(_row(m, cells))
    if res.get("peak"):
        p = res["peak"]
        lines += [
            f"\n**Peak memory, gamma = {res['peak_gamma']}** (MiB; "
            + ("torch.cuda.max_memory_allocated over the allocated bytes before the step, in "
               "this process; " if DEVICE.type == "cuda" else
               "increase of the RSS high-water mark over a post-build, post-warm-up baseline, "
               "fresh process per cell; ")
            + "includes the parameter gradients, row `grads`)\n"
        ]
        lines += _header("method \\ depth", depths)
        for m in methods:
            cells = [
                "fails" if "error" in p[m][d] else f"{p[m][d]['peak_increase_bytes'] / MIB:.1f}"
                for d in map(str, depths)
            ]
            lines.append(_row(m, cells))
        any_m = methods[0]
        lines.append(
            _row(
                "grads",
                [
                    f"{p[any_m][d].get('grad_bytes', float('nan')) / MIB:.1f}"
                    for d in map(str, depths)
                ],
            )
        )
    for g in map(str, gammas):
        e = res["errors"][g]
        lines += [
            f"\n**Gradient relative error, gamma = {g}**: float64 run vs {REF} float64 / "
            f"float32 run vs {REF} float32 (`*`: the method warned about reversal error)\n"
        ]
        lines += _header("method \\ depth", depths)
        for m in methods:
            if m == REF:
                cells = [_fmt_err(e[m][d]["err32_vs_64"]) for d in map(str, depths)]
                lines.append(_row(f"{REF} (f32 vs f64)", cells))
                continue
            cells = []
            for d in map(str, depths):
                c = e[m][d]
                w64 = "*" if c.get("err64_warned") else ""
                w32 = "*" if c.get("err32_warned") else ""
                cells.append(f"{_fmt_err(c['err64'])}{w64} / {_fmt_err(c['err32'])}{w32}")
            lines.append(_row(m, cells))
    return "\n".join(lines) + "\n"


def checks(res: dict) -> list[str]:
    """PASS/MISS lines for the targets of issue 3 (at the largest depth measured).

    The verdicts on time use the wall-clock medians; the process CPU time ratios are printed
    beside them for reference only.
    """
    depths = res["depths"]
    top = str(max(depths))
    where = f"depth {top}" + ("" if top == "512" else " (target is stated at depth 512)")
    out = []
    if "mode float" not in res["methods"]:
        return ["MISS  mode.MomentumResNet is not available: no target can be checked"]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    for g in map(str, res["gammas"]):
        t = res["time"][g]

        def ratio(m: str, key: str = "median_s", t=t) -> float:
            return t[m][top].get(key, math.inf) / t[REF][top][key]

        if "momentumnet mem" not in t:
            out.append(f"MISS  gamma={g}: momentumnet not installed, its targets unchecked")
            continue
        fl, ex, mm = ratio("mode float"), ratio("mode exact"), ratio("momentumnet mem")
        cfl, cex, cmm = (
            ratio(m, "median_cpu_s") for m in ("mode float", "mode exact", "momentumnet mem")
        )
        bound = f"; the bound of any reversible backprop, {BOUND}: {ratio(BOUND):.2f}x" if (
            BOUND in t) else ""
        out.append(
            f"{verdict(fl <= 1.35)}  gamma={g}: mode float time {fl:.2f}x autograd at {where} "
            f"(target <= 1.35x; process CPU time: {cfl:.2f}x{bound})"
        )
        out.append(
            f"{verdict(ex <= 2.0)}  gamma={g}: mode exact time {ex:.2f}x autograd at {where} "
            f"(target <= 2x; process CPU time: {cex:.2f}x)"
        )
        out.append(
            f"{verdict(fl < mm and ex < mm)}  gamma={g}: faster than momentumnet memory mode "
            f"({mm:.2f}x) at {where}: float {fl:.2f}x, exact {ex:.2f}x (process CPU time: "
            f"{cmm:.2f}x vs {cfl:.2f}x, {cex:.2f}x)"
        )
    for g in map(str, res["gammas"]):
        h = res["held"][g]["mode float"]
        lo = "16" if "16" in h else str(min(depths))
        a, b = h[top].get("total", math.inf), h[lo].get("total", math.nan)
        out.append(
            f"{verdict(a <= 1.2 * b)}  gamma={g}: mode float held activation memory "
            f"{a / MIB:.3f} MiB at {where} vs {b / MIB:.3f} MiB at depth {lo}: "
            f"{a / b:.2f}x (target <= 1.2x)"
        )
    if "0.5" in res["errors"]:
        e = res["errors"]["0.5"]["mode exact"][top]["err32"]
        ok = isinstance(e, float) and e <= 1e-4
        out.append(
            f"{verdict(ok)}  gamma=0.5: mode exact float32 gradient rel. error vs float32 "
            f"autograd {_fmt_err(e)} at {where} (target <= 1e-4)"
        )
    else:
        out.append("MISS  gamma=0.5 not measured: exact-mode accuracy target unchecked")
    return out


# --------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="depths 8 16 64, 3 repeats, no files")
    ap.add_argument("--depths", type=int, nargs="+", help="depths (default 8..512)")
    ap.add_argument("--repeats", type=int, help="timed rounds (default 7; quick 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--gammas", type=float, nargs="+", default=[0.5, 0.9])
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1, see benchmarks/README.md)",
    )
    ap.add_argument("--no-peak", action="store_true", help="skip the subprocess peak memory")
    ap.add_argument("--peak-gamma", type=float, default=0.9)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument(
        "--out",
        help="results markdown (default benchmarks/RESULTS_momentum.md "
        "for a full run, none with --quick)",
    )
    ap.add_argument(
        "--json", help="raw results (default benchmarks/results_momentum.json for a full run)"
    )
    ap.add_argument(
        "--peak-worker", nargs=3, metavar=("METHOD", "DEPTH", "GAMMA"), help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)

    if args.peak_worker:
        m, d, g = args.peak_worker
        print(json.dumps(peak_worker(m, int(d), float(g), args.threads)))
        return 0

    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    depths = args.depths or (QUICK_DEPTHS if args.quick else FULL_DEPTHS)
    repeats = args.repeats or (3 if args.quick else 7)
    # the repository's RESULTS files are the CPU's: another device writes only where told
    full = not args.quick and args.depths is None and DEVICE.type == "cpu"
    out_md = args.out or (os.path.join(HERE, "RESULTS_momentum.md") if full else None)
    out_json = args.json or (os.path.join(HERE, "results_momentum.json") if full else None)
    methods = methods_available()
    command = "python benchmarks/bench_momentum.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    info = M.machine_info()
    info["git_commit"] = M.git_commit(os.path.dirname(HERE))
    if DEVICE.type == "cuda":
        info["device"] = f"{DEVICE} ({torch.cuda.get_device_name(DEVICE)})"
    print(f"# {command.strip()}\n# {info}\n# methods: {methods}", flush=True)

    res: dict = {
        "command": command.strip(),
        "machine": info,
        "depths": depths,
        "gammas": args.gammas,
        "methods": methods,
        "repeats": repeats,
        "warmup": args.warmup,
        "problem": {"d": D, "hidden": HIDDEN, "batch": BATCH, "dtype": "float32"},
    }
    res["time"] = measure_times(methods, depths, args.gammas, repeats, args.warmup)
    res["held"] = measure_held(methods, depths, args.gammas)
    if not args.no_peak:
        res["peak_gamma"] = args.peak_gamma
        res["peak"] = measure_peak(methods, depths, args.peak_gamma, args.threads)
    res["errors"] = measure_errors(methods, depths, args.gammas)
    res["checks"] = checks(res)

    table = report(res)
    print(table)
    print("\n".join(res["checks"]))
    if out_json:
        tmp = out_json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(res, fh, indent=1)
        os.replace(tmp, out_json)
    if out_md:
        head = (
            "# Momentum ResNet backprop benchmark\n\n"
            f"Command (from the repository root): `{res['command']}`\n\n"
            f"Machine: {info['cpu_count']} CPU cores ({info['processor']}, {info['platform']}), "
            f"torch {info['torch']} with torch.set_num_threads({info['torch_threads']}), "
            f"Python {info['python']}; date {info['date_utc']}; repository at commit "
            f"{info['git_commit']}.\n\n"
            + (f"Device: {info['device']}.\n\n" if "device" in info else "")
            + f"Problem: {len(depths)} depths, MLP blocks d={D}, hidden={HIDDEN}, batch {BATCH}, "
            f"float32; {repeats} timed rounds after {args.warmup} warm-up, interleaved across "
            "methods. How memory is measured: benchmarks/README.md. Raw numbers: "
            "benchmarks/results_momentum.json.\n"
        )
        body = head + table + "\n## Targets (issue 3)\n\n```\n" + "\n".join(res["checks"])
        tmp = out_md + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(body + "\n```\n")
        os.replace(tmp, out_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
