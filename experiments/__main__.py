"""Command line of the study.

    python -m experiments list
    python -m experiments run NAME [--quick | --full] [--device cpu|cuda] [--seed S]
                                   [--out DIR] [--force]
    python -m experiments all [--quick | --full] [...]
    python -m experiments docs [--out DIR]        (the README's figure section, markdown)

``--quick`` (the default) runs on a CPU in minutes; ``--full`` sizes are meant for a GPU;
``--tiny`` is the smoke-test size used by the test suite.
"""

from __future__ import annotations

import argparse
import sys
import time

from .common import resolve_device
from .registry import EXPERIMENTS, figures_markdown, get, run_experiment


def _add_run_options(p: argparse.ArgumentParser) -> None:
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="level", action="store_const", const="quick",
                      help="CPU sizes, minutes in all (default)")
    size.add_argument("--full", dest="level", action="store_const", const="full",
                      help="the study's sizes, for a GPU")
    size.add_argument("--tiny", dest="level", action="store_const", const="tiny",
                      help="smoke-test sizes (seconds; used by the tests)")
    p.set_defaults(level="quick")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default="figures", help="output folder (default figures/)")
    p.add_argument("--force", action="store_true", help="recompute even if results are cached")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the registered experiments")
    run = sub.add_parser("run", help="run one experiment")
    run.add_argument("name", choices=EXPERIMENTS, metavar="NAME",
                     help="one of: " + ", ".join(EXPERIMENTS))
    _add_run_options(run)
    everything = sub.add_parser("all", help="run every experiment in turn")
    _add_run_options(everything)
    docs = sub.add_parser("docs", help="print the README section that shows every figure")
    docs.add_argument("--out", default="figures", help="folder of the results (for timings)")
    args = parser.parse_args(argv)

    if args.command == "list":
        for name in EXPERIMENTS:
            print(f"{name:22s} {get(name).TITLE}")
        return 0
    if args.command == "docs":
        print(figures_markdown(args.out))
        return 0
    names = [args.name] if args.command == "run" else list(EXPERIMENTS)
    t0 = time.perf_counter()
    summary = []
    try:
        resolve_device(args.device)
    except ValueError as err:  # e.g. --device cuda without CUDA: a clear message, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name in names:
        summary.append(run_experiment(name, args.level, device=args.device, seed=args.seed,
                                      out=args.out, force=args.force))
    total = time.perf_counter() - t0
    for r in summary:
        print(f"{r['name']:22s} {r['status']:9s} {r['wall_s']:7.1f} s  {r['json']}")
    print(f"total wall time {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
