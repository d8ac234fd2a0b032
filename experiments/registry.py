"""The registry of experiments and the runner that caches their results.

An experiment is a module ``experiments.<name>`` that defines

- ``TITLE`` (one line) and ``CAPTION`` (what the figure shows, for the README);
- ``CONFIGS``: a dict with the levels ``"tiny"`` (smoke tests), ``"quick"`` (CPU, the default)
  and ``"full"`` (a GPU), each a dict of JSON-serializable settings;
- ``run(config) -> dict``: the results (``config`` also holds ``seed``, ``device`` and
  ``level``);
- ``plot(results, out_dir) -> list[str]``: the figure files it wrote (PNG and PDF).

Modules are imported only when used, so a missing optional dependency of one experiment
never breaks the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import os
import platform
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .common import (
    Progress,
    config_hash,
    resolve_device,
    style,
    to_jsonable,
    write_json_atomic,
)

__all__ = ["EXPERIMENTS", "LEVELS", "RunEnv", "OutputNotWritableError", "get",
           "experiment_config", "dataset_overrides", "check_writable", "run_experiment",
           "run_all"]

#: Registered experiments, in the order ``all`` runs them.
EXPERIMENTS: tuple[str, ...] = (
    "dynamics_1d",
    "nested_rings",
    "ode_limit",
    "trajectories",
    "representability",
    "memory",
    "learning_to_optimize",
    "reconstruction",
    "image_classification",
    "gamma_robustness",
    "memory_batch",
    "fine_tuning",
    "memory_accuracy",
)
LEVELS: tuple[str, ...] = ("tiny", "quick", "full")


def get(name: str) -> ModuleType:
    """The module of the registered experiment ``name``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; registered: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"{__package__}.{name}")


def experiment_config(name: str, level: str = "quick", *, device: str = "cpu", seed: int = 0,
                      overrides: dict | None = None) -> dict:
    """The full configuration of one run: the level's settings plus seed, device and level."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    module = get(name)
    config = dict(module.CONFIGS[level])
    for key, value in (overrides or {}).items():
        if key not in config:
            raise ValueError(
                f"override {key!r} is not a setting of {name}; settings: {', '.join(config)}"
            )
        config[key] = value
    config.update(level=level, device=device, seed=int(seed))
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:  # under torchrun: a run on several processes is cached apart from one
        config["world_size"] = world
    return config


@dataclasses.dataclass(frozen=True)
class RunEnv:
    """What a run may use beside its configuration.

    An experiment receives it when its ``run`` takes an ``env`` keyword: ``run(config, env=)``.
    ``checkpoint_dir``: a folder of this configuration alone for resumable state (training
    checkpoints); it survives an interrupted run, so a rerun resumes, and it is deleted once
    the results are saved. ``data_dir``: where local datasets (CIFAR) are read from; the
    contents of the files a configuration reads there (not the folder's name) are part of
    its cache key.
    """

    checkpoint_dir: Path | None = None
    data_dir: Path | None = None


class OutputNotWritableError(OSError):
    """The output folder cannot be created or written (found before any work)."""


def check_writable(out: str | Path) -> Path:
    """Create ``out`` if needed and write (then delete) a file in it; a clear error if not."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise OutputNotWritableError(
            f"output folder {str(out)!r} cannot be written ({reason}); choose another with "
            "--out DIR") from err
    return out


def dataset_overrides(name: str, dataset: str | None) -> dict:
    """The override that makes experiment ``name`` use ``dataset`` (``{}`` for ``None``).

    An experiment with a ``"datasets"`` setting (a list) runs on ``[dataset]``; one with a
    ``"dataset"`` setting runs on ``dataset``; any other is an error.
    """
    if dataset is None:
        return {}
    keys = get(name).CONFIGS["quick"]
    if "datasets" in keys:
        return {"datasets": [dataset]}
    if "dataset" in keys:
        return {"dataset": dataset}
    raise ValueError(f"experiment {name} has no dataset setting; --dataset applies to "
                     f"{', '.join(n for n in EXPERIMENTS if takes_dataset(n))}")


def takes_dataset(name: str) -> bool:
    """Whether experiment ``name`` has a ``dataset`` or ``datasets`` setting."""
    keys = get(name).CONFIGS["quick"]
    return "datasets" in keys or "dataset" in keys


def cpu_threads() -> int:
    """Intra-op CPU threads for a run: ``$MODE_EXPERIMENTS_THREADS``, default 1.

    The experiments are made of many small tensor operations, for which one thread is fastest
    and, on a shared machine, far more predictable (an oversubscribed thread pool can make a
    small ``tanh`` 50 times slower). Timings are recorded with the thread count used.
    """
    import os

    value = os.environ.get("MODE_EXPERIMENTS_THREADS", "1")
    try:
        threads = int(value)
    except ValueError:
        raise ValueError(f"MODE_EXPERIMENTS_THREADS must be a positive integer, got {value!r}")\
            from None
    if threads < 1:
        raise ValueError(f"MODE_EXPERIMENTS_THREADS must be a positive integer, got {threads}")
    return threads


def _versions() -> dict[str, str]:
    import mode

    return {
        "mode": mode.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _is_cached(json_path: Path, chash: str) -> dict | None:
    import json

    if not json_path.exists():
        return None
    try:
        with open(json_path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("config_hash") != chash:
        return None
    return data


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _figures_current(out: Path, record: dict) -> bool:
    """Whether the figures of a cached ``record`` are there and are those its run wrote
    (by their SHA-256, where the record has them: a run of other settings into the same
    folder, interrupted before its JSON, leaves its own figures beside this JSON)."""
    names = record.get("figures") or []
    digests = record.get("figure_sha256") or {}
    return bool(names) and all((out / f).is_file() and (f not in digests or
                                                        _sha256(out / f) == digests[f])
                               for f in names)


def _local_data(config: dict, data_dir) -> dict[str, str]:
    """``{dataset: fingerprint}`` of the local datasets (CIFAR) that ``config`` reads from
    ``data_dir``: part of the cache key, so that other files give another result."""
    from .datasets import LOCAL_DATASETS, local_fingerprint

    names = config.get("datasets") or [config.get("dataset")]
    names = [n for n in names if isinstance(n, str) and n in LOCAL_DATASETS]
    return {n: local_fingerprint(n, data_dir) for n in names}


def run_experiment(
    name: str,
    level: str = "quick",
    *,
    device: str = "cpu",
    seed: int = 0,
    out: str | Path = "figures",
    force: bool = False,
    overrides: dict | None = None,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run (or reuse) one experiment; write ``out/name.json`` and its figures.

    The JSON holds the configuration, its hash, the seed, the device, the versions of
    ``mode``/torch/numpy/python, the timings, the results and the figure file names (relative
    to the JSON's folder). It is written
    last and atomically, so it marks a finished run. If it exists with the same configuration
    hash, nothing is recomputed (missing figures are re-plotted from the stored results)
    unless ``force`` is true. ``out`` is checked to be writable before any work
    (:class:`OutputNotWritableError`). An experiment whose ``run`` takes ``env`` gets a
    :class:`RunEnv` (a checkpoint folder ``out/.checkpoints/NAME-HASH``, deleted after a
    finished run, and ``data_dir``).

    Returns
    -------
    dict
        ``{"name", "status" ("ran" | "cached" | "replotted"), "json", "figures", "wall_s"}``.
    """
    module = get(name)
    config = experiment_config(name, level, device=device, seed=seed, overrides=overrides)
    resolve_device(device)
    threads = cpu_threads()
    revision = getattr(module, "REVISION", 0)
    # the cache key: the configuration, the experiment's revision and the library's version
    key = {"config": config, "revision": revision, "mode": _versions()["mode"]}
    data = _local_data(config, data_dir)  # (raises DataNotFoundError before any work)
    if data:
        key["data"] = data
    chash = config_hash(key)
    out = check_writable(out)
    json_path = out / f"{name}.json"
    progress = Progress(name)
    style(dpi=50 if level == "tiny" else 150)  # smoke tests need no print-quality raster
    t0 = time.perf_counter()
    cached = None if force else _is_cached(json_path, chash)
    if cached is not None:
        names = cached.get("figures", [])
        if _figures_current(out, cached):
            progress(f"cached (config {chash}); use --force to recompute")
            return {"name": name, "status": "cached", "json": str(json_path),
                    "figures": [str(out / f) for f in names],
                    "wall_s": cached["timing"]["run_s"]}
        progress("results cached, figures missing or not this run's: re-plotting")
        names = [Path(p).name for p in module.plot(cached["results"], out)]
        cached["figures"] = names
        cached["figure_sha256"] = {f: _sha256(out / f) for f in names}
        write_json_atomic(json_path, cached)
        return {"name": name, "status": "replotted", "json": str(json_path),
                "figures": [str(out / f) for f in names], "wall_s": cached["timing"]["run_s"]}

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    progress(f"running ({level}, device {device}, seed {seed}, {threads} CPU thread(s))")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    checkpoints = out / ".checkpoints" / f"{name}-{chash}"
    if force and checkpoints.exists():  # --force: start over, a damaged checkpoint included
        shutil.rmtree(checkpoints, ignore_errors=True)
    kwargs = {}
    if "env" in inspect.signature(module.run).parameters:
        kwargs["env"] = RunEnv(checkpoint_dir=checkpoints,
                               data_dir=None if data_dir is None else Path(data_dir))
    try:
        # plots read the JSON form of the results, exactly what a cached re-plot reads
        results = to_jsonable(module.run(config, **kwargs))
        run_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        names = [Path(p).name for p in module.plot(results, out)]  # relative to the JSON
        plot_s = time.perf_counter() - t1
    finally:
        torch.set_num_threads(previous_threads)
    record = {
        "experiment": name,
        "title": module.TITLE,
        "level": level,
        "config": config,
        "config_hash": chash,
        "revision": revision,
        "seed": int(seed),
        "device": device,
        "cpu_threads": threads,
        "versions": _versions(),
        "timing": {"run_s": run_s, "plot_s": plot_s, "started": started,
                   "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "command": f"python -m experiments run {name} --{level} --device {device} --seed {seed}"
                   + "".join(f" --dataset {n}" for n in data)
                   + (f" --data-dir {data_dir}" if data else ""),
        "results": results,
        "figures": names,
        "figure_sha256": {f: _sha256(out / f) for f in names},
    }
    if data:
        record["data"] = {"dir": str(data_dir), "sha256": data}
    write_json_atomic(json_path, record)
    if checkpoints.exists():  # the results are saved: the resumable state is no longer needed
        shutil.rmtree(checkpoints, ignore_errors=True)
        with contextlib.suppress(OSError):
            checkpoints.parent.rmdir()  # only when no other run's checkpoints are left
    progress(f"done in {run_s + plot_s:.1f} s -> {json_path}")
    return {"name": name, "status": "ran", "json": str(json_path),
            "figures": [str(out / f) for f in names], "wall_s": run_s + plot_s}


def run_all(level: str = "quick", **kwargs) -> list[dict[str, Any]]:
    """Run every registered experiment in turn (each result is saved as soon as it is done)."""
    return [run_experiment(name, level, **kwargs) for name in EXPERIMENTS]


def figures_markdown(out: str | Path = "figures", level: str = "quick") -> str:
    """The README section: every figure, one line on what it shows (with the measured numbers
    of the stored results), the command that made it, and the full caption folded."""
    import json

    entries, total = [], 0.0
    for name in EXPERIMENTS:
        module = get(name)
        json_path = Path(out) / f"{name}.json"
        data = None
        if json_path.exists():
            with open(json_path) as fh:
                data = json.load(fh)
            total += data["timing"]["run_s"] + data["timing"]["plot_s"]
        entries.append((name, module, data))
    lines = [
        "## Figures",
        "",
        "Every figure below, with its results as JSON beside it in `figures/`, is made by one "
        "command (deterministic given `--seed`, cached by configuration; `--force` recomputes):",
        "",
        "```",
        f"python -m experiments all --{level}",
        "```",
        "",
        f"It took {total / 60:.1f} minutes on a 2-core CPU. A rerun into `figures/` of the "
        "same configuration only prints `cached`; `bash dev.sh main` runs it with `--fresh`, "
        "into a new folder `runs/<UTC time>/`, so that everything is recomputed and the "
        "committed `figures/` stay the reference. `--full` sizes and `--device cuda` are meant "
        "for a GPU; `python -m experiments list` names the experiments. The image "
        "classification experiments take `--dataset digits|mnist1d|cifar10|cifar100`; CIFAR "
        "(the `--full` data) is read, never downloaded, from `--data-dir DIR` holding "
        "`cifar-10-batches-py/` or `cifar-100-python/` (the standard python version); the "
        "files are checked (shapes, uint8 pixels, one label in range per image) and their "
        "contents are part of the cache key. An interrupted run resumes from its checkpoints "
        "in `OUT/.checkpoints/`; `--force` discards them with the cached result.",
        "",
    ]
    for name, module, data in entries:
        line = module.TITLE
        wall = ""
        if data is not None:
            if hasattr(module, "summary"):
                line = module.summary(data["results"])
            wall = f" ({data['timing']['run_s'] + data['timing']['plot_s']:.0f} s)"
        lines += [f"### `{name}`", ""]
        for stem in module.FIGURES:
            lines.append(f"![{name}](figures/{stem}.png)")
        caption = " ".join(module.CAPTION.split())
        lines += ["", line, "",
                  f"Command: `python -m experiments run {name} --{level}`{wall}", "",
                  "<details><summary>Caption</summary>", "", caption, "", "</details>", ""]
    return "\n".join(lines)
