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

Data-parallel training: under ``torchrun`` the training runs of the experiments are
data-parallel over the processes (:mod:`experiments.training`); only rank 0 writes results,
figures and checkpoints, and prints. For example

    torchrun --nproc_per_node=2 -m experiments run image_classification --quick --out runs/ddp
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .common import resolve_device
from .datasets import (
    DATASETS,
    LOCAL_DATASETS,
    DataNotFoundError,
    InvalidDataError,
    local_files,
)
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
from .training import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    distributed_world,
    init_distributed,
)

DEFAULT_OUT = "figures"


def _seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= seed < 2**32:
        raise argparse.ArgumentTypeError(f"must lie in [0, 2^32), got {seed}")
    return seed


def _folder(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder, got an empty string")
    return text


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
    p.add_argument("--seed", type=_seed, default=0, help="random seed in [0, 2^32) (default 0)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=_folder, default=None,
                       help=f"output folder (default {DEFAULT_OUT}/, the committed reference)")
    where.add_argument("--fresh", action="store_true",
                       help="write into a new folder runs/<UTC time>/ (nothing cached there)")
    p.add_argument("--force", action="store_true", help="recompute even if results are cached")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="dataset of the experiments that take one (image_classification, "
                        "gamma_robustness)")
    p.add_argument("--data-dir", type=_folder, default=None,
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

    rank, world = distributed_world()
    if args.command == "list":
        for name in EXPERIMENTS if rank == 0 else ():
            print(f"{name:22s} {get(name).TITLE}")
        return 0
    if args.command == "docs":
        if rank == 0:
            print(figures_markdown(args.out))
        return 0
    names = [args.name] if args.command == "run" else list(EXPERIMENTS)
    if world == 1:
        return _run(args, names)
    try:  # torchrun: join the process group first (the device picks the backend)
        init_distributed(resolve_device(args.device))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return _run(args, names, rank, world)
    finally:
        torch.distributed.destroy_process_group()


def _share(value, rank: int):
    """Rank 0's ``value`` on every rank (a picklable object)."""
    box = [value if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def _first_error(error: str | None) -> str | None:
    """The first rank's error, if any rank has one: all ranks stop together."""
    seen: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(seen, error)
    return next((e for e in seen if e is not None), None)


def _collective_device():
    """The device object collectives go through: this rank's GPU for nccl, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def _scratch_folder(out: Path, rank: int) -> Path:
    """An empty folder of this rank for the output folder ``out``, in the temporary directory.
    Its name depends on ``out`` and the rank only, so that one left by a killed run (torchrun
    stops the other ranks with signals when one fails) is emptied by the next."""
    user = getattr(os, "getuid", lambda: 0)()
    key = hashlib.sha256(f"{Path(out).resolve()}:{user}".encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"mode-experiments-rank{rank}-{key}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _mirror_cache(out: Path, scratch: Path, name: str) -> None:
    """Copy ``out/NAME.json`` and its figures into a rank's scratch folder, so that its
    runner takes the cache decision of rank 0 (cached runs train on no rank)."""
    src = out / f"{name}.json"
    if not src.exists():
        return
    shutil.copyfile(src, scratch / src.name)
    try:
        figures = json.loads(src.read_text()).get("figures", [])
    except (OSError, ValueError):
        return
    for fig in figures:
        if (out / fig).is_file():
            shutil.copyfile(out / fig, scratch / Path(fig).name)


def _run(args, names: list[str], rank: int = 0, world: int = 1) -> int:
    """Run ``names`` into the output folder. Under torchrun every rank runs them (the training
    is data-parallel); rank 0 writes into the output folder, and each other rank writes into
    a scratch folder of its own, deleted at the end, that mirrors the output folder's cache
    of each experiment before it runs, so that every rank trains exactly when rank 0 does."""
    t0 = time.perf_counter()
    summary = []
    out = fresh_folder() if args.fresh else Path(args.out or DEFAULT_OUT)
    scratch = None
    error = None
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
        if args.data_dir is not None and args.dataset not in LOCAL_DATASETS:
            raise ValueError(f"--data-dir is read only with --dataset "
                             f"{' or '.join(LOCAL_DATASETS)} (the other datasets are made "
                             f"offline)")
        if args.dataset in LOCAL_DATASETS:  # its files are there, before any experiment runs
            local_files(args.dataset, args.data_dir)
        if world > 1:
            out = _share(out, rank)  # --fresh: rank 0's folder
            if rank != 0:
                scratch = _scratch_folder(out, rank)
                os.environ["MODE_EXPERIMENTS_QUIET"] = "1"  # rank 0 reports
        check_writable(out if scratch is None else scratch)
    except (ValueError, OutputNotWritableError, DataNotFoundError) as err:
        error = str(err)
    if world > 1:
        error = _first_error(error)
    if error is not None:
        # a bad device, an unwritable --out: a clear message before any work, no traceback
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        return 2
    if args.fresh and rank == 0:
        print(f"writing into the fresh folder {out}/ (the committed figures stay in "
              f"{DEFAULT_OUT}/)", file=sys.stderr)
    try:
        for name in names:
            if scratch is not None:
                _mirror_cache(out, scratch, name)
            summary.append(run_experiment(name, args.level, device=args.device,
                                          seed=args.seed, out=out if scratch is None else
                                          scratch, force=args.force,
                                          overrides=overrides.get(name),
                                          data_dir=args.data_dir))
            if world > 1:
                torch.distributed.barrier()
    except (OutputNotWritableError, DataNotFoundError, InvalidDataError,
            CorruptCheckpointError, CheckpointMismatchError) as err:
        # missing or malformed CIFAR files, a damaged checkpoint: a clear message, no traceback
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if rank != 0:
        return 0
    total = time.perf_counter() - t0
    for r in summary:
        print(f"{r['name']:22s} {r['status']:9s} {r['wall_s']:7.1f} s  {r['json']}")
    print(f"total wall time {total:.1f} s" + (f" ({world} processes)" if world > 1 else ""))
    if all(r["status"] == "cached" for r in summary):
        print(f"nothing was recomputed: the results in {out}/ match this configuration "
              f"(cached). --force recomputes them there; --fresh runs everything into a new "
              f"folder runs/<UTC time>/.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
