"""Offline image-classification data: digits, MNIST-1D, CIFAR-10 and CIFAR-100.

Nothing is downloaded, ever. API (stable: other experiments build on it):

``load_dataset(name, data_dir=None) -> Dataset``
    ``name`` in :data:`DATASETS`. ``"digits"``: scikit-learn's ``load_digits`` (1797 grey 8x8
    images, 10 classes), split 70/30 stratified with a fixed seed. ``"mnist1d"``: the MNIST-1D
    set of Greydanus & Kobak, generated locally with ``mnist1d.data.make_dataset`` (4000 train
    and 1000 test signals of length 40, 10 classes; the package's fixed seed 42, and the global
    ``random``/``numpy`` states it sets are restored). ``"cifar10"`` / ``"cifar100"``: the
    standard python pickles under ``data_dir`` (``cifar-10-batches-py/data_batch_1..5,
    test_batch``; ``cifar-100-python/train, test``); a missing folder or file raises
    :class:`DataNotFoundError` saying where the files must be.

``Dataset``
    ``x_train, x_test``: float32 tensors ``(N, C, H, W)`` (images) or ``(N, C, L)`` (signals),
    standardized per channel with the training set's mean and standard deviation;
    ``y_train, y_test``: int64 labels; ``num_classes``; ``augment``: whether the paper's CIFAR
    augmentation applies (:func:`augment_crop_flip`); ``classes``: label names;
    ``subset(n_train, n_test)``: the first examples (for smoke tests).

``augment_crop_flip(x, generator)``
    Random crop of the original size after zero padding by 4, and a horizontal flip with
    probability 1/2, per example, drawn from ``generator`` (a ``torch.Generator`` on
    ``x``'s device): the augmentation of the paper's CIFAR recipe, without torchvision.
"""

from __future__ import annotations

import dataclasses
import pickle
import random
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DATASETS", "LOCAL_DATASETS", "Dataset", "DataNotFoundError", "InvalidDataError",
           "load_dataset", "local_files", "local_fingerprint", "augment_crop_flip"]

#: Names accepted by :func:`load_dataset`.
DATASETS: tuple[str, ...] = ("digits", "mnist1d", "cifar10", "cifar100")


class DataNotFoundError(FileNotFoundError):
    """Files of a dataset that must be provided locally are missing (the message says where)."""


class InvalidDataError(ValueError):
    """A dataset's file, or a :class:`Dataset`, does not hold what its format requires (the
    message names the file and what is wrong)."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split of standardized float32 inputs and int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    classes: tuple[str, ...]
    augment: bool = False

    def __post_init__(self):
        where = f"dataset {self.name!r}"
        for split, x, y in (("train", self.x_train, self.y_train),
                            ("test", self.x_test, self.y_test)):
            if len(x) == 0:
                raise InvalidDataError(f"{where}: the {split} split is empty")
            if len(x) != len(y):
                raise InvalidDataError(f"{where}: {len(x)} {split} inputs but {len(y)} labels")
            if y.dtype != torch.int64:
                raise InvalidDataError(f"{where}: {split} labels must be int64, got {y.dtype}")
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= self.num_classes:
                raise InvalidDataError(f"{where}: {split} labels must lie in [0, "
                                       f"{self.num_classes}), got [{low}, {high}]")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, ``(C, H, W)`` or ``(C, L)``."""
        return tuple(self.x_train.shape[1:])

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> Dataset:
        """The first ``n_train`` training and ``n_test`` test examples (``None``: all)."""
        for arg, n in (("n_train", n_train), ("n_test", n_test)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ValueError(f"{arg} must be a positive integer or None, got {n!r}")
        return dataclasses.replace(self, x_train=self.x_train[:n_train],
                                   y_train=self.y_train[:n_train],
                                   x_test=self.x_test[:n_test], y_test=self.y_test[:n_test])


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel standardization (channel axis 1) with the training statistics, float32."""
    axes = (0, *range(2, x_train.ndim))
    mean = x_train.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x_train.std(axis=axes, keepdims=True, dtype=np.float64)
    std = np.where(std > 0, std, 1.0)
    out = [torch.from_numpy(((x - mean) / std).astype(np.float32)) for x in (x_train, x_test)]
    return out[0], out[1]


def _make(name, x_train, y_train, x_test, y_test, classes, augment=False) -> Dataset:
    xtr, xte = _standardize(np.asarray(x_train), np.asarray(x_test))
    return Dataset(name=name, x_train=xtr, y_train=torch.as_tensor(np.asarray(y_train),
                                                                  dtype=torch.int64),
                   x_test=xte, y_test=torch.as_tensor(np.asarray(y_test), dtype=torch.int64),
                   num_classes=len(classes), classes=tuple(classes), augment=augment)


@lru_cache(maxsize=2)
def _digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x.reshape(-1, 1, 8, 8).astype(np.float64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    return _make("digits", x_tr, y_tr, x_te, y_te, [str(k) for k in range(10)])


@lru_cache(maxsize=2)
def _mnist1d() -> Dataset:
    import mnist1d.data

    # make_dataset reseeds the global random and numpy generators: leave them as they were
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x_tr, x_te = data["x"][:, None, :], data["x_test"][:, None, :]
    return _make("mnist1d", x_tr, data["y"], x_te, data["y_test"], [str(k) for k in range(10)])


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError) as err:
        raise InvalidDataError(f"{path}: not a python pickle of the dataset, or damaged "
                               f"({type(err).__name__}: {err})") from None
    if not isinstance(batch, dict):
        raise InvalidDataError(f"{path}: must hold a dict, got {type(batch).__name__}")
    return batch


def _entry(batch: dict, key: bytes, path: Path):
    if key not in batch:
        raise InvalidDataError(f"{path}: has no {key!r} entry (it has {sorted(batch)!r}; the "
                               f"standard python version of the dataset has bytes keys)")
    return batch[key]


def _images(batch: dict, path: Path) -> np.ndarray:
    data = np.asarray(_entry(batch, b"data", path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise InvalidDataError(f"{path}: b'data' must be (N, 3072) uint8 rows, got "
                               f"{data.shape} {data.dtype}")
    return data.reshape(-1, 3, 32, 32)


def _labels(batch: dict, key: bytes, path: Path, n: int, classes: int) -> np.ndarray:
    y = np.asarray(_entry(batch, key, path))
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise InvalidDataError(f"{path}: {key!r} must be {n} integer labels (one per image), got "
                               f"shape {y.shape} {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise InvalidDataError(f"{path}: {key!r} must lie in [0, {classes}), got "
                               f"[{y.min()}, {y.max()}]")
    return y


def _cifar_files(data_dir, folder: str, files: list[str], name: str) -> list[Path]:
    layout = ", ".join(files)
    if data_dir is None:
        raise DataNotFoundError(
            f"dataset {name!r} is read from local files: pass --data-dir DIR (data_dir=...) with "
            f"DIR/{folder}/ holding {layout} (the standard python version of the dataset); "
            "nothing is downloaded")
    root = Path(data_dir).expanduser() / folder
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise DataNotFoundError(
            f"dataset {name!r}: {root} lacks {', '.join(missing)}; it must hold {layout} (the "
            "standard python version of the dataset, unpacked); nothing is downloaded")
    return [root / f for f in files]


def _label_names(path: Path, key: bytes, n: int) -> list[str]:
    if path.is_file():
        names = _unpickle(path).get(key)
        if names is not None and len(names) == n:
            return [s.decode() if isinstance(s, bytes) else str(s) for s in names]
    return [str(k) for k in range(n)]


class _Layout(NamedTuple):
    """A local dataset's files: its folder, training and test batches, label key, number of
    classes, and meta file with the key of its class names."""

    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    labels: bytes
    classes: int
    meta: str
    names: bytes

    @property
    def files(self) -> list[str]:
        return [*self.train, *self.test]


_LAYOUTS = {
    "cifar10": _Layout("cifar-10-batches-py", tuple(f"data_batch_{k}" for k in range(1, 6)),
                       ("test_batch",), b"labels", 10, "batches.meta", b"label_names"),
    "cifar100": _Layout("cifar-100-python", ("train",), ("test",), b"fine_labels", 100, "meta",
                        b"fine_label_names"),
}

#: The datasets read from a user's folder (``data_dir``); the others are made offline.
LOCAL_DATASETS: tuple[str, ...] = tuple(_LAYOUTS)


def _split(paths: list[Path], key: bytes, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of the batches ``paths``, checked."""
    xs, ys = [], []
    for p in paths:
        batch = _unpickle(p)
        x = _images(batch, p)
        xs.append(x)
        ys.append(_labels(batch, key, p, len(x), classes))
    return np.concatenate(xs), np.concatenate(ys)


def local_files(name: str, data_dir) -> list[Path]:
    """The batch files of the local dataset ``name`` under ``data_dir``; raises
    :class:`DataNotFoundError` where they are missing (nothing is read)."""
    layout = _LAYOUTS[name]
    return _cifar_files(data_dir, layout.folder, layout.files, name)


def _cifar(name: str, data_dir) -> Dataset:
    layout = _LAYOUTS[name]
    paths = local_files(name, data_dir)
    n = len(layout.train)
    x_tr, y_tr = _split(paths[:n], layout.labels, layout.classes)
    x_te, y_te = _split(paths[n:], layout.labels, layout.classes)
    classes = _label_names(paths[0].parent / layout.meta, layout.names, layout.classes)
    return _make(name, x_tr / 255.0, y_tr, x_te / 255.0, y_te, classes, augment=True)


def local_fingerprint(name: str, data_dir) -> str:
    """SHA-256 of the files of the local dataset ``name`` under ``data_dir`` (its batches and
    its meta file): what a cached result or a checkpoint of a run on it must match. Raises
    :class:`DataNotFoundError` where they are missing."""
    import hashlib

    paths = local_files(name, data_dir)
    paths += [p for p in (paths[0].parent / _LAYOUTS[name].meta,) if p.is_file()]
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """The dataset ``name`` (one of :data:`DATASETS`); CIFAR is read from ``data_dir``."""
    if name == "digits":
        return _digits()
    if name == "mnist1d":
        return _mnist1d()
    if name in _LAYOUTS:
        return _cifar(name, data_dir)
    raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")


def augment_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` and random horizontal flip, per example.

    ``x``: ``(B, C, H, W)``. Offsets and flips are drawn from ``generator`` (on ``x``'s device),
    so the augmentation is reproducible and its state can be checkpointed.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be a batch of images (B, C, H, W), got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    di = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=x.device)
    dj = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=x.device)
    flip = torch.rand(b, generator=generator, device=x.device) < 0.5
    rows = di[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = dj[:, None] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    # Standard strides, not only "contiguous": with C = 1 the permuted tensor counts as
    # contiguous while its strides are channels-last ones, and convolutions of torch 2.13 on
    # the CPU then corrupt the heap in backward (measured: "corrupted double-linked list").
    return out.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)
