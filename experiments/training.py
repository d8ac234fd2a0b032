"""The supervised training loop of the classification experiments: SGD with step decay,
progress, an atomic checkpoint every epoch, resume, and a cache of finished runs.

API (stable: other experiments build on it):

``Recipe(epochs, batch_size=128, lr=0.01, momentum=0.9, weight_decay=5e-4, milestones=(),
lr_factor=0.1, augment=False, eval_batch_size=1000)``
    SGD with (heavy-ball) ``momentum`` and ``weight_decay``; the learning rate is multiplied by
    ``lr_factor`` at every epoch of ``milestones``; ``augment`` applies
    :func:`experiments.datasets.augment_crop_flip` to every training batch.
    :data:`PAPER_RECIPE` is the authors' CIFAR recipe (220 epochs, lr 0.01 divided by 10 at
    epoch 180, batch 128, crop and flip).

``train(model, data, recipe, *, seed, device="cpu", checkpoint=None, progress=None,
after_epoch=None) -> dict``
    Trains ``model`` (in place) on ``data`` (an :class:`experiments.datasets.Dataset`) and
    returns ``{"curves": {"epoch", "lr", "train_loss", "train_accuracy", "test_loss",
    "test_accuracy", "epoch_s"}, "test_accuracy": float, "epochs": int, "resumed_from": int,
    "cached": bool}`` (accuracies in [0, 1], per epoch; ``test_accuracy`` is the last epoch's).
    Shuffling and augmentation draw from a ``torch.Generator`` seeded with ``seed``; the global
    torch generator is seeded too. With ``checkpoint`` (a file path), the state after every
    epoch (model, optimizer, scheduler, generator and global RNG states, epoch, curves) is
    written atomically; a later call with the same path and the same configuration resumes
    after the last finished epoch, and gives the result an uninterrupted run would have (same
    operations on the same states). A checkpoint of a finished run is returned at once
    (``cached``), with the model's trained state loaded. A checkpoint of another configuration
    (recipe, seed, data, parameter shapes) is an error, not silently reused.
    ``after_epoch(epoch, record)`` is called after each checkpoint (tests interrupt there).

    The record also holds ``"world_size"`` (1 for one process).

``evaluate(model, x, y, batch_size=1000) -> (mean loss, accuracy)``
    In eval mode, without gradients, in the model's device and dtype.

Data-parallel training (``torchrun``). When the process is one of several (an initialized
default process group of size > 1, or ``WORLD_SIZE`` > 1 in the environment, as torchrun sets
it), ``train`` runs data-parallel: it joins the process group if needed
(:func:`init_distributed`), wraps the model in ``DistributedDataParallel``, and every rank
draws the same permutation and takes its contiguous slice (``torch.tensor_split``) of each
global batch of ``recipe.batch_size`` examples; with ``augment`` the whole global batch is
augmented on every rank (the draws of one process) and then sliced. Each rank's loss is its
examples' summed cross-entropy times ``world / batch``, so DDP's averaged gradient is the
full batch's mean-loss gradient even for unequal slices: the optimization is the
single-process one up to float round-off. BatchNorm statistics are per rank (each rank
normalizes its slice); the running statistics kept, evaluated and saved are rank 0's (DDP
broadcasts them from rank 0, and so does ``train`` before every evaluation), unless the model
uses ``SyncBatchNorm``. The test set is split across ranks and the sums all-reduced, so every
rank reports the same curves. Only rank 0 reads and writes the checkpoint (the others receive
its state by broadcast and wait at a barrier while it writes), so no shared file system is
needed; the checkpoint has the single-process format, and either kind of run resumes the
other's. One process is unchanged, bit for bit.

``distributed_world() -> (rank, world_size)``; ``init_distributed(device) -> device``
    This process's rank and the world size (``(0, 1)`` for one process); joining torchrun's
    process group (nccl for CUDA, gloo otherwise) and this rank's device (``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .common import Progress
from .datasets import Dataset, augment_crop_flip

__all__ = ["Recipe", "PAPER_RECIPE", "train", "evaluate", "CheckpointMismatchError",
           "CorruptCheckpointError",
           "distributed_world", "init_distributed"]


class CheckpointMismatchError(ValueError):
    """A checkpoint file belongs to another configuration than the one asked for."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file cannot be read (damaged outside this code: its writes are atomic)."""


def _read_checkpoint(path: Path, map_location) -> dict:
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise CorruptCheckpointError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); delete it to "
            f"start this run over (python -m experiments run ... --force does)") from None
    if not isinstance(state, dict) or "fingerprint" not in state:
        raise CorruptCheckpointError(f"{path} is not a checkpoint of experiments.training; "
                                     f"delete it or choose another path")
    return state


@dataclasses.dataclass(frozen=True)
class Recipe:
    """SGD with momentum, weight decay and step decay of the learning rate (see module doc)."""

    epochs: int
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = ()
    lr_factor: float = 0.1
    augment: bool = False
    eval_batch_size: int = 1000

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Recipe.{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"Recipe.lr must be > 0, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"Recipe.momentum must be in [0, 1), got {self.momentum!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"Recipe.weight_decay must be >= 0, got {self.weight_decay!r}")
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "milestones": list(self.milestones)}


#: The authors' CIFAR recipe (their ``run_CIFAR_10.py``): SGD, momentum 0.9, weight decay 5e-4,
#: batch 128, 220 epochs, lr 0.01 divided by 10 at epoch 180, random crop (pad 4) and flip.
PAPER_RECIPE = Recipe(epochs=220, batch_size=128, lr=0.01, momentum=0.9, weight_decay=5e-4,
                      milestones=(180,), lr_factor=0.1, augment=True)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError("model has no parameters to train")
    return p.device, p.dtype


@torch.no_grad()
def _evaluate_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   batch_size: int) -> tuple[float, int]:
    """Summed cross-entropy and number of correct predictions of ``model`` on ``(x, y)``."""
    device, dtype = _model_device_dtype(model)
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(device=device, dtype=dtype)
            yb = y[i:i + batch_size].to(device)
            logits = model(xb)
            loss += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    return loss, correct


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in eval mode."""
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x and y must be non-empty and of equal length, got {len(x)}, {len(y)}")
    loss, correct = _evaluate_sums(model, x, y, batch_size)
    return loss / len(x), correct / len(x)


# --------------------------------------------------------------------------------------------
# data parallelism (torchrun): one process per rank, the same optimization as one process


def distributed_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialized default process group, else of torchrun's
    environment (``RANK``, ``WORLD_SIZE``), else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str | torch.device) -> torch.device:
    """Join torchrun's process group when this process is one of several; this rank's device.

    With ``WORLD_SIZE`` > 1 and no default process group yet, initializes one from the
    environment torchrun sets (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``):
    nccl for a CUDA device, gloo otherwise. Under several processes a CUDA device becomes
    ``cuda:LOCAL_RANK`` (made the current device); one process gets ``device`` back unchanged.
    """
    device = torch.device(device)
    _, world = distributed_world()
    if world <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _rank_batch(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, rank: int, world: int,
                augment: bool, generator: torch.Generator, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of the global batch ``x[idx]``: the ``rank``-th of ``world`` contiguous
    slices (``tensor_split``). With ``augment`` the whole batch is augmented first, so the
    generator makes the draws of one process and stays the same on every rank."""
    if augment:
        xb = augment_crop_flip(x[idx].to(device=device, dtype=dtype), generator)
        return xb.tensor_split(world)[rank], y[idx].tensor_split(world)[rank].to(device)
    part = idx.tensor_split(world)[rank]
    return x[part].to(device=device, dtype=dtype), y[part].to(device)


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    """The sums over ranks of ``values`` (float64, one all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank."""
    for b in model.buffers():
        dist.broadcast(b, 0)


@torch.no_grad()
def _evaluate_shared(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                     rank: int, world: int, device: torch.device) -> tuple[float, float]:
    """:func:`evaluate` of rank 0's model, each rank on its slice of ``(x, y)``, the sums
    all-reduced: the same numbers on every rank."""
    _broadcast_buffers(model)
    xs, ys = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
    loss, correct = _evaluate_sums(model, xs, ys, batch_size) if len(xs) else (0.0, 0)
    loss, correct = _all_sum([loss, float(correct)], device)
    return loss / len(x), correct / len(x)


def _load_shared(path: Path | None, fingerprint: str, rank: int,
                 device: torch.device) -> dict | None:
    """Rank 0 reads the checkpoint (if any) and broadcasts it; every rank gets the state or
    raises the same :class:`CheckpointMismatchError`."""
    box: list = [None, None]
    if rank == 0 and path is not None and path.exists():
        try:
            state = _read_checkpoint(path, "cpu")
        except CorruptCheckpointError as err:
            box[1] = ("corrupt", str(err))
        else:
            if state.get("fingerprint") != fingerprint:
                box[1] = ("mismatch", str(path))
            else:
                box[0] = state
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    if box[1] is not None:
        kind, what = box[1]
        if kind == "corrupt":
            raise CorruptCheckpointError(what)
        raise CheckpointMismatchError(
            f"checkpoint {what} belongs to another configuration (recipe, seed, data or "
            f"model differ); delete it or choose another path")
    return box[0]


def _check_same_run(fingerprint: str, device: torch.device) -> None:
    """Every rank trains the same configuration (recipe, seed, data, parameter shapes)."""
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, fingerprint)
    if len(set(seen)) != 1:
        raise ValueError(f"the ranks train different configurations (fingerprints {seen}): "
                         "every rank must get the same model, data, recipe and seed")


def _fingerprint(model: nn.Module, data: Dataset, recipe: Recipe, seed: int) -> str:
    """What a checkpoint must match to be resumed: recipe, seed, data (shapes, labels and a
    sample of at most 2^20 evenly spaced input values of each split), the model's structure
    and settings (:func:`_settings`: gamma, reversible, exact, ...) and parameter shapes."""
    h = hashlib.sha256()
    h.update(repr((recipe.as_dict(), int(seed), data.name, tuple(data.x_train.shape),
                   tuple(data.x_test.shape), data.num_classes)).encode())
    h.update(repr(_settings(model)).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
    h.update(data.y_train.numpy().tobytes())
    for x in (data.x_train, data.x_test):
        flat = x.reshape(-1)
        step = max(1, flat.numel() >> 20)
        h.update(flat[::step].contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _settings(model: nn.Module) -> list:
    """Each module's type and public number, string and flag attributes (a float gamma, h,
    ``reversible``, ``exact``; not ``training``, nor parameters, whose values training
    changes)."""
    return [(name, type(m).__name__,
             sorted((k, v) for k, v in vars(m).items() if not k.startswith("_")
                    and k != "training" and isinstance(v, (bool, int, float, str, type(None)))))
            for name, m in model.named_modules()]


def _save_atomic(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as fh:  # on disk before it replaces the previous checkpoint
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _rng_states(generator: torch.Generator, device: torch.device) -> dict:
    out = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def _set_rng_states(states: dict, generator: torch.Generator, device: torch.device) -> None:
    generator.set_state(states["generator"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def _batch_meter(n: int, desc: str, quiet: bool):
    """A tqdm bar over the batches of one epoch on an interactive terminal, else None."""
    if quiet or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=n, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


def _joined(device: torch.device) -> tuple[int, int]:
    """``(rank, world)``, joining torchrun's process group first when there are several
    processes; a model on another GPU than ``cuda:LOCAL_RANK`` is an error."""
    _, world = distributed_world()
    if world > 1:
        if device.type == "cuda" and "LOCAL_RANK" in os.environ \
                and device.index != int(os.environ["LOCAL_RANK"]):
            raise ValueError(f"under torchrun each rank trains on cuda:LOCAL_RANK; this rank's "
                             f"model is on {device}, LOCAL_RANK is {os.environ['LOCAL_RANK']} "
                             "(place it on init_distributed(device))")
        init_distributed(device)
    return distributed_world()


def _restore(state: dict, model, optimizer, scheduler, generator, device) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_states(state["rng"], generator, device)


def train(model: nn.Module, data: Dataset, recipe: Recipe, *, seed: int,
          checkpoint: str | os.PathLike | None = None, progress: Progress | None = None,
          label: str = "", after_epoch: Callable[[int, dict], None] | None = None) -> dict:
    """Train ``model`` in place; see the module docstring for the returned record (and for
    data-parallel training under torchrun)."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a Recipe, got {type(recipe).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if recipe.augment and data.x_train.dim() != 4:
        raise ValueError(f"Recipe.augment=True needs images (N, C, H, W); dataset {data.name!r} "
                         f"has inputs of shape {tuple(data.x_train.shape[1:])}")
    device, dtype = _model_device_dtype(model)
    rank, world = _joined(device)
    progress = progress if progress is not None else Progress("train")
    if rank != 0:  # one report per run, from rank 0
        progress = Progress(progress.name, quiet=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(recipe.milestones),
                                                     gamma=recipe.lr_factor)
    torch.manual_seed(seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    curves: dict[str, list] = {k: [] for k in ("epoch", "lr", "train_loss", "train_accuracy",
                                               "test_loss", "test_accuracy", "epoch_s")}
    start = 0
    path = Path(checkpoint) if checkpoint is not None else None
    fingerprint = _fingerprint(model, data, recipe, seed)
    state = None
    if world > 1:
        _check_same_run(fingerprint, device)
        state = _load_shared(path, fingerprint, rank, device)
    elif path is not None and path.exists():
        state = _read_checkpoint(path, device)
        if state.get("fingerprint") != fingerprint:
            raise CheckpointMismatchError(
                f"checkpoint {path} belongs to another configuration (recipe, seed, data or "
                f"model differ); delete it or choose another path")
    if state is not None:
        _restore(state, model, optimizer, scheduler, generator, device)
        curves, start = state["curves"], int(state["epoch"])
        if start < recipe.epochs:
            progress(f"{label} resuming after epoch {start}/{recipe.epochs} from {path}")
    resumed_from = start
    net = model
    if world > 1:  # one process per rank: DDP averages the gradients of the slices
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    x_train, y_train = data.x_train, data.y_train
    n = len(x_train)
    batches = (n + recipe.batch_size - 1) // recipe.batch_size
    for epoch in range(start, recipe.epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=generator, device=device).cpu()
        total_loss, correct = 0.0, 0
        meter = _batch_meter(batches, f"{label} epoch {epoch + 1}", progress.quiet)
        for b in range(batches):
            idx = order[b * recipe.batch_size:(b + 1) * recipe.batch_size]
            if world == 1:
                xb = x_train[idx].to(device=device, dtype=dtype)
                yb = y_train[idx].to(device)
                if recipe.augment:
                    xb = augment_crop_flip(xb, generator)
                logits = net(xb)
                loss = F.cross_entropy(logits, yb)
                summed = None
            else:
                xb, yb = _rank_batch(x_train, y_train, idx, rank, world, recipe.augment,
                                     generator, device, dtype)
                logits = net(xb)
                # DDP divides the sum of the ranks' gradients by world: this makes it the
                # gradient of the global batch's mean loss, whatever the slices' sizes
                summed = F.cross_entropy(logits, yb, reduction="sum")
                loss = summed * (world / len(idx))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if summed is None:
                total_loss += float(loss.detach()) * len(idx)
            else:
                total_loss += float(summed.detach())
            correct += int((logits.detach().argmax(1) == yb).sum())
            if meter is not None:
                meter.update(1)
        if meter is not None:
            meter.close()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        if world == 1:
            test_loss, test_acc = evaluate(model, data.x_test, data.y_test,
                                           recipe.eval_batch_size)
        else:
            total_loss, correct = _all_sum([total_loss, float(correct)], device)
            test_loss, test_acc = _evaluate_shared(model, data.x_test, data.y_test,
                                                   recipe.eval_batch_size, rank, world, device)
        for key, value in (("epoch", epoch + 1), ("lr", lr), ("train_loss", total_loss / n),
                           ("train_accuracy", correct / n), ("test_loss", test_loss),
                           ("test_accuracy", test_acc),
                           ("epoch_s", time.perf_counter() - t0)):
            curves[key].append(value)
        record = {"curves": curves, "epoch": epoch + 1}
        if path is not None and rank == 0:
            _save_atomic({"fingerprint": fingerprint, "epoch": epoch + 1, "curves": curves,
                          "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(),
                          "rng": _rng_states(generator, device)}, path)
        if world > 1:  # the others wait while rank 0 writes
            dist.barrier()
        progress(f"{label} epoch {epoch + 1}/{recipe.epochs}: loss {total_loss / n:.3f}, "
                 f"train {correct / n:.1%}, test {test_acc:.1%}")
        if after_epoch is not None:
            after_epoch(epoch + 1, record)
    if not curves["test_accuracy"]:
        raise RuntimeError("training ran no epoch")  # unreachable: epochs >= 1
    return {"curves": curves, "test_accuracy": curves["test_accuracy"][-1],
            "epochs": recipe.epochs, "resumed_from": resumed_from,
            "cached": resumed_from == recipe.epochs, "world_size": world}
