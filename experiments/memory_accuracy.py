"""Final test accuracy against peak training memory, over gamma (Fig. 7 bottom).

One ResNet (``experiments.classifiers.build_resnet``, seed ``seed``) and its Momentum ResNet
conversions ``momentum_from(resnet, gamma)`` (reversible float) for every ``gamma`` of the grid
are trained with the same recipe (``experiments.training.train``) on an offline data set. For
each trained model:

- ``peak_bytes``: the measured peak of one training step at the training batch
  (:func:`experiments.memory_meter.step_peak`: every allocation, parameter gradients included);
- ``test_accuracy``: after the last epoch;
- for the momentum models, the same weights run in exact mode (``mode.convert(..., exact=True)``
  of the trained ResNet weights is not the same model, so the trained stages are switched to the
  exact engine in place of a copy): its training-step peak and its test accuracy (evaluated,
  not retrained).
"""

from __future__ import annotations

import copy

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

import mode

from .classifiers import STAGES, build_resnet, momentum_from
from .common import Progress, color, resolve_device, save_figure, seed_everything
from .datasets import load_dataset
from .memory_meter import step_peak
from .training import Recipe, evaluate, train

TITLE = "final test accuracy against peak training memory, over gamma"
FIGURES = ["memory_accuracy"]
CAPTION = """
Final test accuracy against the measured peak memory of one training step (every allocation,
parameter gradients included; torch.profiler on the CPU), for a ResNet and its Momentum ResNet
conversions over a grid of gamma, all trained with the same recipe from the same initial weights
on an offline data set (sklearn's 8x8 digits at --quick). Filled markers: reversible float
training. Hollow markers: the same trained weights run by the exact engine (bit-exact
reconstruction; accuracy evaluated, not retrained), whose peak adds exact arithmetic's
temporaries and its information buffer (about log2(1/gamma) bits per scalar and layer; at
--quick the temporaries dominate: the exact peaks at gamma 0.5 and 0.9 are equal). The float
peak does not depend on gamma either (one block's recomputation, whatever gamma). One seed,
about 540 test images (one image is 0.2 points): the accuracy differences are those of single
runs.
"""
REVISION = 1

CONFIGS = {
    "tiny": {"dataset": "digits", "layers": [2, 3, 2, 2], "width": 8, "gammas": [0.9],
             "epochs": 1, "batch": 32, "lr": 0.05, "n_train": 64, "n_test": 40},
    "quick": {"dataset": "digits", "layers": [2, 4, 4, 2], "width": 16,
              "gammas": [0.5, 0.9], "epochs": 4, "batch": 32, "lr": 0.05,
              "n_train": None, "n_test": None},
    "full": {"dataset": "mnist1d", "layers": [3, 8, 36, 3], "width": 32,
             "gammas": [0.0, 0.25, 0.5, 0.75, 0.9, 0.99], "epochs": 40, "batch": 128,
             "lr": 0.05, "n_train": None, "n_test": None},
}


def exact_copy(model: nn.Module) -> nn.Module:
    """A copy of a momentum model (``momentum_from``) whose stages run the exact engine."""
    model = copy.deepcopy(model)
    for name in STAGES:
        stage = model.get_submodule(name)
        old = stage.momentum
        stage.momentum = mode.MomentumResNet(old.functions, old.gamma,
                                             init_velocity=old.init_velocity,
                                             reversible=True, exact=True)
    return model


def training_peak(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Peak bytes of one training step on ``(x, y)`` after a warm-up step; batch-norm
    statistics are restored afterwards."""
    state = copy.deepcopy(model.state_dict())
    model.train()
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    peak = step_peak(model, x, y).bytes
    model.load_state_dict(state)
    return peak


def run(config: dict) -> dict:
    device = resolve_device(config["device"])
    seed = config["seed"]
    seed_everything(seed)
    progress = Progress("memory_accuracy")
    data = load_dataset(config["dataset"]).subset(config["n_train"], config["n_test"])
    base = build_resnet(data.input_shape, data.num_classes, layers=config["layers"],
                        width=config["width"]).to(device)
    recipe = Recipe(epochs=config["epochs"], batch_size=config["batch"], lr=config["lr"])
    if len(data.x_train) % recipe.batch_size == 1:  # no batch of one for batch norm
        data = data.subset(len(data.x_train) - 1, None)
    xb = data.x_train[:config["batch"]].to(device)
    yb = data.y_train[:config["batch"]].to(device)
    models = {"resnet": (0.0, copy.deepcopy(base))}
    for g in config["gammas"]:
        if g <= 0:
            continue  # gamma = 0 is the ResNet itself
        models[f"momentum_{g:g}"] = (float(g), momentum_from(base, float(g)))
    results: dict = {"models": {}, "dataset": data.name, "batch": config["batch"]}
    for name, (g, model) in models.items():
        rec = train(model, data, recipe, seed=seed, progress=progress, label=name)
        entry = {"gamma": g, "test_accuracy": rec["test_accuracy"],
                 "peak_bytes": training_peak(model, xb, yb),
                 "train_s": float(np.sum(rec["curves"]["epoch_s"]))}
        if g > 0:
            ex = exact_copy(model)
            entry["exact_peak_bytes"] = training_peak(ex, xb, yb)
            entry["exact_test_accuracy"] = evaluate(ex, data.x_test, data.y_test)[1]
        results["models"][name] = entry
        progress(f"{name}: accuracy {entry['test_accuracy']:.1%}, peak "
                 f"{entry['peak_bytes'] / 2**20:.2f} MiB"
                 + (f", exact {entry['exact_peak_bytes'] / 2**20:.2f} MiB" if g > 0 else ""))
    return results


def plot(results: dict, out_dir) -> list[str]:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    for i, (name, e) in enumerate(results["models"].items()):
        label = "ResNet" if name == "resnet" else f"Momentum, $\\gamma$ = {e['gamma']:g}"
        ax.plot(e["peak_bytes"] / 2**20, 100 * e["test_accuracy"], markers[i % 7],
                color=color(i), ms=8, label=label)
        if "exact_peak_bytes" in e:
            ax.plot(e["exact_peak_bytes"] / 2**20, 100 * e["exact_test_accuracy"],
                    markers[i % 7], color=color(i), ms=8, mfc="none",
                    label="  same weights, exact mode")
    ax.set_xlabel("peak training memory, one step (MiB)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(f"{results['dataset']}, batch {results['batch']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out_dir, "memory_accuracy")


def summary(results: dict) -> str:
    """One line with the measured numbers, for the README."""
    parts = [f"{n} {e['test_accuracy']:.1%} at {e['peak_bytes'] / 2**20:.2f} MiB"
             for n, e in results["models"].items()]
    return "Final test accuracy and peak training memory: " + ", ".join(parts) + "."
