"""Fine-tuning a converted pre-trained ResNet under a memory budget (Fig. 8).

No pre-trained weights can be downloaded here, so the pre-training is part of the experiment:

1. a ResNet (``experiments.classifiers.build_resnet``) is trained on the classes ``source`` of an
   offline data set (digits, 8x8 images);
2. its head is replaced by a fresh one for the classes ``target`` (relabelled 0..k-1), giving
   the ResNet to fine-tune, and ``mode.convert(resnet, stages, gamma)`` gives its Momentum
   version (same weights, reversible float);
3. the budget is the measured peak of one ResNet training step at ``resnet_batch``
   (:func:`experiments.memory_meter.step_peak`); the largest batch of the Momentum ResNet whose
   measured peak fits it is found by measuring (:func:`experiments.memory_batch.largest_batch`);
4. both are fine-tuned on ``target`` (all weights, SGD, ``experiments.training.train``), each at
   its own batch with the learning rate scaled linearly with the batch (``lr * b / resnet_batch``),
   and, as a control, the Momentum ResNet at the ResNet's batch.

The test accuracy after every epoch is plotted against the cumulative wall time of training.
"""

from __future__ import annotations

import copy
import dataclasses

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

import mode

from .classifiers import STAGES, build_resnet
from .common import Progress, color, resolve_device, save_figure, seed_everything
from .datasets import Dataset, load_dataset
from .memory_batch import largest_batch
from .memory_meter import step_peak
from .training import Recipe, evaluate, train

TITLE = "fine-tuning a converted ResNet under a memory budget"
FIGURES = ["fine_tuning"]
CAPTION = """
Test accuracy against wall time while fine-tuning, under one memory budget, a ResNet and its
Momentum ResNet conversion (mode.convert, gamma = 0.9, reversible float). No pre-trained weights
can be downloaded here, so the network is pre-trained inside the experiment on digits 0-4
(sklearn's 8x8 digits) and fine-tuned on digits 5-9 with a fresh head (the paper fine-tunes an
ImageNet-pretrained ResNet-152 on ants and bees). The budget is the measured peak memory of one
ResNet training step at its batch; the largest Momentum batch fitting it is found by measuring
(torch.profiler allocation events). The learning rate scales linearly with the batch. The
control (dotted) is the Momentum ResNet at the ResNet's batch. One seed, about 270 test images
(one image is 0.4 points), wall times on a shared 2-core machine: the curves show the budget's
effect on the batch, not a significant accuracy difference.
"""
REVISION = 1

CONFIGS = {
    "tiny": {"dataset": "digits", "source": [0, 1, 2, 3, 4], "target": [5, 6, 7, 8, 9],
             "layers": [2, 3, 2, 2], "width": 8, "pretrain_epochs": 1, "epochs": 1,
             "resnet_batch": 8, "lr": 0.02, "gamma": 0.9, "max_batch": 20,
             "n_train": 60, "n_test": 40},
    "quick": {"dataset": "digits", "source": [0, 1, 2, 3, 4], "target": [5, 6, 7, 8, 9],
              "layers": [2, 4, 4, 2], "width": 16, "pretrain_epochs": 3, "epochs": 4,
              "resnet_batch": 16, "lr": 0.02, "gamma": 0.9, "max_batch": 96,
              "n_train": None, "n_test": None},
    "full": {"dataset": "digits", "source": [0, 1, 2, 3, 4], "target": [5, 6, 7, 8, 9],
             "layers": [3, 8, 36, 3], "width": 32, "pretrain_epochs": 20, "epochs": 20,
             "resnet_batch": 32, "lr": 0.02, "gamma": 0.9, "max_batch": 1024,
             "n_train": None, "n_test": None},
}


def class_subset(data: Dataset, classes, n_train=None, n_test=None) -> Dataset:
    """The examples of ``classes`` only, relabelled ``0 .. len(classes) - 1`` in that order."""
    classes = [int(c) for c in classes]
    if len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"classes must be distinct and non-empty, got {classes}")
    lut = torch.full((data.num_classes,), -1, dtype=torch.int64)
    lut[torch.tensor(classes)] = torch.arange(len(classes))
    keep_tr = lut[data.y_train] >= 0
    keep_te = lut[data.y_test] >= 0
    return dataclasses.replace(
        data, x_train=data.x_train[keep_tr][:n_train], y_train=lut[data.y_train[keep_tr]][:n_train],
        x_test=data.x_test[keep_te][:n_test], y_test=lut[data.y_test[keep_te]][:n_test],
        num_classes=len(classes), classes=tuple(data.classes[c] for c in classes))


def _no_single_last_batch(data: Dataset, batch: int) -> Dataset:
    """Drop one training example if the last batch would hold a single one (batch norm)."""
    if len(data.x_train) % batch == 1:
        return dataclasses.replace(data, x_train=data.x_train[:-1], y_train=data.y_train[:-1])
    return data


def measure_peak_at(model: nn.Module, data: Dataset, batch: int, device) -> int:
    """Measured peak bytes of one training step on the first ``batch`` training examples."""
    x = data.x_train[:batch].to(device)
    y = data.y_train[:batch].to(device)
    if len(x) < batch:
        raise ValueError(f"batch {batch} exceeds the {len(data.x_train)} training examples")
    model.train()
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()  # warm-up
    state = copy.deepcopy(model.state_dict())  # batch-norm statistics moved: restore them
    peak = step_peak(model, x, y).bytes
    model.load_state_dict(state)
    return peak


def fine_tune(model: nn.Module, data: Dataset, batch: int, lr: float, epochs: int, seed: int,
              progress: Progress, label: str) -> dict:
    recipe = Recipe(epochs=epochs, batch_size=batch, lr=lr, weight_decay=5e-4)
    record = train(model, _no_single_last_batch(data, batch), recipe, seed=seed,
                   progress=progress, label=label)
    c = record["curves"]
    return {"batch": batch, "lr": lr, "wall_s": np.cumsum(c["epoch_s"]).tolist(),
            "test_accuracy": c["test_accuracy"], "train_loss": c["train_loss"]}


def run(config: dict) -> dict:
    device = resolve_device(config["device"])
    seed = config["seed"]
    seed_everything(seed)
    progress = Progress("fine_tuning")
    data = load_dataset(config["dataset"])
    source = class_subset(data, config["source"], config["n_train"], config["n_test"])
    target = class_subset(data, config["target"], config["n_train"], config["n_test"])
    net = build_resnet(data.input_shape, source.num_classes, layers=config["layers"],
                       width=config["width"]).to(device)
    rb = config["resnet_batch"]
    pre = train(net, _no_single_last_batch(source, rb),
                Recipe(epochs=config["pretrain_epochs"], batch_size=rb, lr=config["lr"]),
                seed=seed, progress=progress, label="pre-train")
    torch.manual_seed(seed + 1)
    net.fc = nn.Linear(net.fc.in_features, target.num_classes).to(device)
    resnet = net
    momentum = mode.convert(net, STAGES, gamma=config["gamma"])
    _, converted_acc = evaluate(momentum, target.x_test, target.y_test)  # fresh head: chance
    budget = measure_peak_at(copy.deepcopy(resnet), target, rb, device)
    probe = copy.deepcopy(momentum)
    batches = [rb, 2 * rb]
    peaks = [measure_peak_at(probe, target, b, device) for b in batches]
    mb, _ = largest_batch(lambda b: measure_peak_at(probe, target, b, device), budget, batches,
                          peaks, min(config["max_batch"], len(target.x_train)))
    if mb < 1:
        raise RuntimeError(f"the Momentum ResNet does not fit the budget {budget} B at batch 1")
    momentum_peak = measure_peak_at(probe, target, mb, device)
    progress(f"budget {budget / 2**20:.2f} MiB (ResNet at batch {rb}); Momentum ResNet fits "
             f"batch {mb} ({momentum_peak / 2**20:.2f} MiB)")
    runs = {}
    lr = config["lr"]
    for name, model, batch in (("resnet", copy.deepcopy(resnet), rb),
                               ("momentum", copy.deepcopy(momentum), mb),
                               ("momentum_same_batch", copy.deepcopy(momentum), rb)):
        runs[name] = fine_tune(model, target, batch, lr * batch / rb, config["epochs"], seed,
                               progress, name)
        progress(f"{name} (batch {batch}): test accuracy {runs[name]['test_accuracy'][-1]:.1%}")
    return {"budget_bytes": budget, "resnet_batch": rb, "momentum_batch": mb,
            "momentum_peak_bytes": momentum_peak, "probe_batches": batches,
            "probe_peaks": peaks, "pretrain_test_accuracy": pre["test_accuracy"],
            "converted_test_accuracy_before": converted_acc, "runs": runs,
            "gamma": config["gamma"], "source": config["source"], "target": config["target"]}


def plot(results: dict, out_dir) -> list[str]:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {"resnet": ("ResNet", "--", 0), "momentum": ("Momentum ResNet", "-", 3),
              "momentum_same_batch": ("Momentum ResNet, ResNet's batch", ":", 2)}
    for name, r in results["runs"].items():
        label, ls, c = styles[name]
        ax.plot(r["wall_s"], 100 * np.asarray(r["test_accuracy"]), ls, marker="o", ms=3,
                color=color(c), label=f"{label} (batch {r['batch']})")
    ax.set_xlabel("fine-tuning wall time (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"fine-tuning within {results['budget_bytes'] / 2**20:.1f} MiB "
                 f"(digits {results['source'][0]}-{results['source'][-1]} -> "
                 f"{results['target'][0]}-{results['target'][-1]})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out_dir, "fine_tuning")


def summary(results: dict) -> str:
    """One line with the measured numbers, for the README."""
    r = results["runs"]
    return (f"Within {results['budget_bytes'] / 2**20:.1f} MiB the ResNet trains at batch "
            f"{results['resnet_batch']} and its Momentum conversion at batch "
            f"{results['momentum_batch']}; final test accuracy "
            f"{r['resnet']['test_accuracy'][-1]:.1%}"
            f" in {r['resnet']['wall_s'][-1]:.0f} s vs "
            f"{r['momentum']['test_accuracy'][-1]:.1%} in {r['momentum']['wall_s'][-1]:.0f} s.")
