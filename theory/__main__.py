"""``python -m theory [--json PATH] [--full] [--seed N] [--strict]``: the verification report."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from .report import format_table, verify_claims


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj)
    if isinstance(obj, (np.complexfloating, complex)):
        return [float(obj.real), float(obj.imag)]
    return obj


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file, then rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(_jsonable(payload), fh, indent=2, allow_nan=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def json_target_problem(path: str) -> str | None:
    """Why ``path`` cannot receive the JSON (checked before any work), or ``None`` if it can."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        return f"{path} is a directory"
    directory = os.path.dirname(target)
    existing = directory
    while not os.path.isdir(existing):  # the nearest existing ancestor must let us create it
        parent = os.path.dirname(existing)
        if parent == existing or (os.path.exists(existing) and not os.path.isdir(existing)):
            return f"{existing} is not a directory"
        existing = parent
    try:  # a real probe (os.access says yes to root even where writing fails, e.g. /proc)
        fd, probe = tempfile.mkstemp(dir=existing, suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot create files in {existing} ({exc.strerror or exc})"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m theory", description=__doc__)
    parser.add_argument("--json", metavar="PATH", help="also write the claims as JSON to PATH")
    parser.add_argument("--full", action="store_true", help="more cases (slower than quick)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 when a claim fails")
    args = parser.parse_args(argv)
    if args.json:
        problem = json_target_problem(args.json)
        if problem:
            parser.error(f"--json {args.json}: {problem}")
    t0 = time.perf_counter()
    claims = verify_claims(quick=not args.full, seed=args.seed)
    elapsed = time.perf_counter() - t0
    print(format_table(claims))
    print()
    for c in claims:
        print(f"[{c['id']}] {c['verdict']}: {c['criterion']}")
        if c.get("proved"):
            print(f"     proved: {c['proved']}")
        if c.get("measured") and c["measured"] != c["criterion"]:
            print(f"     measured: {c['measured']}")
        if c.get("notes"):
            print(f"     note: {c['notes']}")
    print(f"\n{sum(c['verdict'] == 'holds' for c in claims)}/{len(claims)} claims hold "
          f"({'full' if args.full else 'quick'} mode, seed {args.seed}, {elapsed:.1f} s)")
    if args.json:
        try:
            write_json(args.json, {"mode": "full" if args.full else "quick", "seed": args.seed,
                                   "seconds": elapsed, "claims": claims})
        except OSError as exc:
            print(f"python -m theory: error: could not write --json {args.json}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"wrote {args.json}")
    if args.strict and any(c["verdict"] != "holds" for c in claims):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
