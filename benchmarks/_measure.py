"""Small measuring helpers shared by the benchmark scripts (not part of the library).

Four things are measured, always the same way:

- **time**: :func:`interleaved_times` runs every candidate once per round, round after round,
  so that load from other processes on a shared machine hits all candidates alike; report the
  median of the rounds (after warm-up rounds that are not recorded), both wall-clock and
  process CPU time.
- **held activation memory**: :func:`held_bytes` runs a forward pass under a
  ``torch.autograd.graph.saved_tensors_hooks`` packing hook and adds up the bytes of the
  distinct storages autograd keeps for backward (custom ``autograd.Function``s included: their
  ``save_for_backward`` goes through the hook), plus tensors (and Python big integers) that a
  custom Function keeps as attributes of its ``ctx``, found by walking the graph from the
  outputs. Storages of the model parameters and of the inputs are excluded: they exist whether
  or not a backward pass follows.
- **peak memory**: :func:`run_isolated` runs a worker in a fresh interpreter; the worker
  resets the high-water mark (:func:`reset_peak_rss`) once the model and inputs are built and
  warmed up, records :func:`peak_rss_bytes` (the RSS high-water mark: ``VmHWM`` on Linux,
  else ``getrusage(RUSAGE_SELF).ru_maxrss``) as the baseline, runs the measured work, and
  reports the increase of the high-water mark.
- **gradient error**: :func:`rel_error`, ``||g - g_ref|| / ||g_ref||`` over a list of tensors
  concatenated into one vector.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from statistics import median

import torch

__all__ = [
    "interleaved_times",
    "held_bytes",
    "peak_rss_bytes",
    "reset_peak_rss",
    "run_isolated",
    "rel_error",
    "machine_info",
    "git_commit",
    "median",
]


def interleaved_times(
    candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, dict[str, list[float]] | str]:
    """Seconds per call of each candidate, ``repeats`` rounds of one call each.

    Every round calls every candidate once (in a fixed order), so slow phases of a shared
    machine are spread over all candidates. ``warmup`` rounds run first and are discarded.
    Returns ``{name: {"wall": [...], "cpu": [...]}}``: wall-clock (``time.perf_counter``) and
    CPU time of the whole process (``time.process_time``, all threads); the latter is far less
    sensitive to other processes competing for the cores. A candidate that raises is dropped
    and its entry is the exception text instead.
    """
    times: dict[str, dict[str, list[float]] | str] = {
        name: {"wall": [], "cpu": []} for name in candidates
    }
    for r in range(warmup + repeats):
        for name, fn in candidates.items():
            if isinstance(times[name], str):
                continue
            try:
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
            except Exception as exc:  # a peer that cannot run this configuration
                times[name] = f"{type(exc).__name__}: {exc}"
                continue
            if r >= warmup:
                times[name]["wall"].append(dt)  # type: ignore[index]
                times[name]["cpu"].append(dc)  # type: ignore[index]
    return times


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


def _collect(obj: object, out: list, depth: int = 0) -> None:
    """Tensors and large Python ints reachable from a ctx attribute (modules are skipped).

    Deep enough for mode's exact buffer: ctx -> chain -> buffer -> levels -> (idx, words).
    """
    if depth > 8:
        return
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, int) and not isinstance(obj, bool):
        if obj.bit_length() > 64:
            out.append(obj)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            _collect(item, out, depth + 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            _collect(item, out, depth + 1)
    elif isinstance(obj, torch.nn.Module) or callable(obj):
        return
    elif hasattr(obj, "__dict__"):
        for item in vars(obj).values():
            _collect(item, out, depth + 1)


def ctx_attributes(roots: Iterable[torch.Tensor]) -> list:
    """Tensors / big ints held as attributes of custom autograd Function contexts in a graph."""
    seen: set[int] = set()
    stack = [t.grad_fn for t in roots if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    found: list = []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        attrs = getattr(node, "__dict__", None)
        if attrs:
            _collect(dict(attrs), found)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                stack.append(nxt)
    return found


def held_bytes(
    forward: Callable[[], object], exclude: Iterable[torch.Tensor] = ()
) -> tuple[object, dict[str, int]]:
    """Run ``forward()`` and measure what it keeps alive for the backward pass.

    Returns ``(output, info)`` with ``info = {"saved": bytes of storages packed by autograd,
    "ctx": bytes held as Function ctx attributes, "total": their union}``. Storages of the
    tensors in ``exclude`` (parameters, inputs) are not counted; each storage counts once.
    """
    excluded = {_storage_key(t) for t in exclude}
    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in excluded:
            saved[key] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    outs = out if isinstance(out, (tuple, list)) else (out,)
    ctx: dict[object, int] = {}
    for obj in ctx_attributes(outs):
        if isinstance(obj, torch.Tensor):
            key = _storage_key(obj)
            if key not in excluded:
                ctx[key] = key[1]
        else:
            ctx[("int", id(obj))] = sys.getsizeof(obj)
    union = dict(saved)
    union.update(ctx)
    return out, {
        "saved": sum(saved.values()),
        "ctx": sum(ctx.values()),
        "total": sum(union.values()),
    }


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark to its current RSS (Linux >= 4.0).

    Writes ``5`` to ``/proc/self/clear_refs``, which resets ``VmHWM``. Without the
    reset, transient allocations made while setting up (model building, imports) leave a
    high-water mark that can hide the peak of the measured work. Returns ``False`` where
    unsupported (the measured increase is then only a lower bound).
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set size, in bytes.

    On Linux this is ``VmHWM`` from ``/proc/self/status``: the high-water mark of the process's
    own memory, the quantity ``getrusage(RUSAGE_SELF).ru_maxrss`` is meant to give. (``ru_maxrss``
    itself also keeps the high-water mark of the parent's memory copied at ``fork`` across the
    ``exec``, so in a worker started from a large parent it is stuck at the parent's size.)
    Elsewhere ``ru_maxrss`` (kilobytes on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_isolated(argv: Sequence[str], timeout: float = 600.0) -> dict:
    """Run ``python argv...`` in a fresh interpreter; return the JSON of its last stdout line.

    On failure the dict is ``{"error": "..."}``.
    """
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    try:
        proc = subprocess.run(
            [sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0]}"}
    return json.loads(lines[-1])


def rel_error(grads: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    """``||g - g_ref|| / ||g_ref||`` over all tensors together, computed in float64."""
    g = torch.cat([t.detach().reshape(-1).double() for t in grads])
    r = torch.cat([t.detach().reshape(-1).double() for t in ref])
    return float((g - r).norm() / r.norm())


def write_results(path: str, title: str, script: str, argv, info: dict, how: str,
                  body: str) -> None:
    """A results file: title, the command that made it, the machine, the commit and ``how``
    (device, rounds), then ``body`` (the table)."""
    command = f"python benchmarks/{script} " + " ".join(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(path, "w") as f:
        f.write(f"# {title}\n\nCommand: `{command.strip()}`\n\nMachine: {json.dumps(info)}"
                f"\n\nCommit: {git_commit(root)}, {how}\n\n{body}\n")
    print("wrote", path)


def git_commit(root: str) -> str:
    """Short hash of the checked-out commit (``+dirty`` if tracked files changed), or ``?``."""
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or "?"
    except OSError:
        return "?"


def machine_info() -> dict:
    """What a reader needs to compare numbers: cores, threads, versions, date."""
    return {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def machine_line(info: dict) -> str:
    """``processor, N cores, T torch thread, torch V, date`` of :func:`machine_info`."""
    return (f"{info['processor']}, {info['cpu_count']} cores, {info['torch_threads']} torch "
            f"thread, torch {info['torch']}, {info['date_utc']}")
