"""Command line of the study.

    python -m experiments list
    python -m experiments run NAME [--quick | --full] [--device cpu|cuda] [--seed S]
                                   [--out DIR | --fresh] [--force]
                                   [--dataset NAME] [--data-dir DIR]
    python -m experiments all [--quick | --full] [...]
    python -m experiments docs [--out DIR]        (the README's figure section, markdown)

``--quick`` (the default) runs on a CPU in minutes; ``--full`` sizes are meant for a GPU;
``--tiny`` is the smoke-test size used by the test suite. Results are cached in the output
folder (default ``figures/``, the committed reference): a rerun of the same configuration
prints "cached"; ``--force`` recomputes, ``--fresh`` writes into a new folder
``runs/<UTC time>/``. ``--dataset`` (digits, mnist1d, cifar10, cifar100) applies to the
experiments with a dataset setting (image_classification, gamma_robustness); CIFAR is read
from ``--data-dir DIR`` (the standard python pickles), never downloaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from .common import resolve_device
from .datasets import DATASETS, DataNotFoundError
from .registry import (
    EXPERIMENTS,
    OutputNotWritableError,
    check_writable,
    dataset_overrides,
    figures_markdown,
    get,
    run_experiment,
    takes_dataset,
)

DEFAULT_OUT = "figures"


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
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", default=None,
                       help=f"output folder (default {DEFAULT_OUT}/, the committed reference)")
    where.add_argument("--fresh", action="store_true",
                       help="write into a new folder runs/<UTC time>/ (nothing cached there)")
    p.add_argument("--force", action="store_true", help="recompute even if results are cached")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="dataset of the experiments that take one (image_classification, "
                        "gamma_robustness)")
    p.add_argument("--data-dir", default=None,
                   help="folder holding cifar-10-batches-py/ or cifar-100-python/ (local files)")


def fresh_folder(root: str | Path = "runs") -> Path:
    """A folder ``root/<UTC time>`` that does not exist yet (a suffix ``-k`` if needed)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path, k = Path(root) / stamp, 1
    while path.exists():
        path, k = Path(root) / f"{stamp}-{k}", k + 1
    return path


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
    out = fresh_folder() if args.fresh else Path(args.out or DEFAULT_OUT)
    try:
        # every check that needs no work comes first: device, output folder, dataset choice
        resolve_device(args.device)
        overrides = {}
        if args.dataset is not None:
            if args.command == "run":
                overrides[args.name] = dataset_overrides(args.name, args.dataset)
            else:  # all: the experiments that take a dataset
                overrides = {n: dataset_overrides(n, args.dataset) for n in names
                             if takes_dataset(n)}
        check_writable(out)
    except (ValueError, OutputNotWritableError) as err:
        # a bad device, an unwritable --out: a clear message before any work, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.fresh:
        print(f"writing into the fresh folder {out}/ (the committed figures stay in "
              f"{DEFAULT_OUT}/)", file=sys.stderr)
    try:
        for name in names:
            summary.append(run_experiment(name, args.level, device=args.device,
                                          seed=args.seed, out=out, force=args.force,
                                          overrides=overrides.get(name),
                                          data_dir=args.data_dir))
    except (OutputNotWritableError, DataNotFoundError) as err:
        # missing CIFAR files (found before any training): a clear message, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    total = time.perf_counter() - t0
    for r in summary:
        print(f"{r['name']:22s} {r['status']:9s} {r['wall_s']:7.1f} s  {r['json']}")
    print(f"total wall time {total:.1f} s")
    if all(r["status"] == "cached" for r in summary):
        print(f"nothing was recomputed: the results in {out}/ match this configuration "
              f"(cached). --force recomputes them there; --fresh runs everything into a new "
              f"folder runs/<UTC time>/.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
