"""Shared machinery of the experiments: seeding, progress, atomic files, plotting, memory.

Nothing here is specific to one experiment. The plotting style uses the Okabe-Ito palette
(distinguishable under the common colour-vision deficiencies) and the non-interactive Agg
backend, so that figures are produced identically on a headless machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

__all__ = [
    "OKABE_ITO",
    "color",
    "seed_everything",
    "resolve_device",
    "Progress",
    "config_hash",
    "write_json_atomic",
    "save_figure",
    "style",
    "SavedTensorMeter",
    "to_jsonable",
    "median_time",
]

#: The Okabe-Ito colour-blind-safe palette (black first, then the eight hues' usual order).
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "skyblue": "#56B4E9",
    "green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "purple": "#CC79A7",
}
_CYCLE = ["blue", "vermillion", "green", "orange", "purple", "skyblue", "black", "yellow"]


def color(i: int | str) -> str:
    """The ``i``-th colour of the cycle (or a named Okabe-Ito colour)."""
    if isinstance(i, str):
        return OKABE_ITO[i]
    return OKABE_ITO[_CYCLE[i % len(_CYCLE)]]


def style(dpi: int = 150) -> None:
    """Set the matplotlib defaults used by every figure of the study (PNG at ``dpi``)."""
    plt.rcParams.update(
        {
            "axes.prop_cycle": matplotlib.cycler(color=[OKABE_ITO[c] for c in _CYCLE]),
            "figure.dpi": 110,
            "savefig.dpi": dpi,
            "font.size": 9,
            "axes.titlesize": 10,
            "axes.labelsize": 9,
            "legend.fontsize": 8,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "figure.constrained_layout.use": True,
            "pdf.fonttype": 42,
            "svg.hashsalt": "mode",
        }
    )


def seed_everything(seed: int) -> np.random.Generator:
    """Seed torch (all devices) and return a numpy ``Generator`` for the same seed."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def resolve_device(device: str) -> torch.device:
    """``"cpu"`` or ``"cuda"`` (``"cuda:k"``); a CUDA request without CUDA is an error."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a string, got {type(device).__name__}")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} was requested but CUDA is not available on this machine; "
                "use --device cpu"
            )
        return torch.device(device)
    raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:k'), got {device!r}")


class Progress:
    """A one-line progress report on stderr: ``[name] what k/n (elapsed s)``."""

    def __init__(self, name: str, stream=None, quiet: bool | None = None):
        self.name = name
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = bool(os.environ.get("MODE_EXPERIMENTS_QUIET")) if quiet is None else quiet
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.start
        print(f"[{self.name}] {message} ({elapsed:.1f} s)", file=self.stream, flush=True)

    def every(self, k: int, n: int, what: str, chunks: int = 4, extra: str = "") -> None:
        """Report at roughly ``chunks`` evenly spaced points of a loop of ``n`` iterations."""
        step = max(1, n // chunks)
        if (k + 1) % step == 0 or k + 1 == n:
            self(f"{what} {k + 1}/{n}{' ' + extra if extra else ''}")


def to_jsonable(obj: Any) -> Any:
    """Convert tensors, arrays and numpy scalars to plain JSON values (non-finite -> None)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def config_hash(config: dict) -> str:
    """A stable short hash of a JSON-serializable configuration."""
    text = json.dumps(to_jsonable(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _atomic_target(path: Path, suffix: str):
    """A temporary file beside ``path`` with the permissions a plain ``open`` would give."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


def write_json_atomic(path: str | os.PathLike, data: dict) -> Path:
    """Write ``data`` as JSON: a temporary file in the same folder, then ``os.replace``."""
    path = Path(path)
    tmp = _atomic_target(path, ".tmp")
    try:
        with open(tmp, "w") as fh:
            json.dump(to_jsonable(data), fh, indent=1, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_figure(fig: matplotlib.figure.Figure, out_dir: str | os.PathLike, stem: str) -> list[str]:
    """Save ``fig`` as ``stem.png`` and ``stem.pdf`` in ``out_dir`` atomically; close it."""
    out_dir = Path(out_dir)
    paths = []
    for fmt in ("png", "pdf"):
        path = out_dir / f"{stem}.{fmt}"
        tmp = _atomic_target(path, f".{fmt}")
        try:
            metadata = {"Software": "mode experiments"} if fmt == "png" else {
                "Creator": "mode experiments", "CreationDate": None}
            fig.savefig(tmp, format=fmt, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        paths.append(str(path))
    plt.close(fig)
    return paths


def median_time(fn, repeats: int, warmup: int = 1, sync=None) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


class SavedTensorMeter:
    """Bytes of the tensors autograd saves for backward while the context is active.

    Uses ``torch.autograd.graph.saved_tensors_hooks``: every tensor packed for backward (by
    built-in operations and by custom ``autograd.Function``s through ``save_for_backward``) is
    recorded once per storage; storages of the given ``exclude`` tensors (the parameters) are
    not activations and are left out. The tensors themselves are passed through unchanged.

    Attributes
    ----------
    bytes : int
        Total bytes of distinct saved storages.
    count : int
        Number of distinct saved storages.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._exclude and ptr not in self._seen:
            self._seen[ptr] = storage.nbytes()
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def bytes(self) -> int:
        return int(sum(self._seen.values()))

    @property
    def count(self) -> int:
        return len(self._seen)

    @contextlib.contextmanager
    def measure(self) -> Iterator[SavedTensorMeter]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self


def log_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (finite positive points only)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if keep.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])


def has_momentumnet() -> bool:
    """Whether the public ``momentumnet`` package (a peer, installed with --no-deps) is present."""
    return importlib.util.find_spec("momentumnet") is not None


class MLPBlock(nn.Module):
    """The residual function of the memory and reconstruction studies: ``W2 tanh(W1 x + b1) + b2``
    (``d -> hidden -> d``)."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PlaneField(MLPBlock):
    """The autonomous field ``F(t, x) = W2 tanh(W1 x + b1) + b2`` on the plane (2 -> hidden
    -> 2) of the nested-rings and trajectories studies, in torchdiffeq's ``func(t, x)`` form."""

    def __init__(self, hidden: int):
        super().__init__(2, hidden)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
