"""Robustness to gamma (Fig. 6, top, of the paper): train at one gamma, test at another.

A Momentum ResNet (``v_0 = 0``; :func:`experiments.classifiers.momentum_from` of one ResNet) is
trained at each ``gamma_train``; then, for every ``gamma_test`` of a grid, the same weights run
at ``gamma_test`` (:func:`experiments.classifiers.with_gamma`) are evaluated as they are (no
refit) and after a short refit at ``gamma_test`` (a few epochs of SGD from the trained weights).
At ``gamma = 0`` the network is the ResNet; at ``gamma = 1`` with ``v_0 = 0`` the velocity stays
0, so every momentum layer is the identity and only the first block of every stage (kept by the
conversion), the stem and the classifier act.

Results: ``results["runs"][str(gamma_train)]`` with ``"trained"`` (per-seed test accuracy at
``gamma_train``), ``"no_refit"`` and ``"refit"`` (for every ``gamma_test``, the per-seed test
accuracies), accuracies in [0, 1].
"""

from __future__ import annotations

import copy

import matplotlib.pyplot as plt
import numpy as np
import torch

from .classifiers import momentum_from, with_gamma
from .common import Progress, color, resolve_device, save_figure
from .datasets import DATASETS
from .image_classification import DATASET_LABELS, base_resnet, prepare_data, recipe_of, settings
from .training import Recipe, evaluate, train

TITLE = "robustness to gamma: trained at gamma_train, tested at gamma_test, with and without refit"
FIGURES = ["gamma_robustness"]
CAPTION = """
Test accuracy of a Momentum ResNet (v_0 = 0, converted from one ResNet by mode.convert) trained
at gamma_train (one line each; the star is the accuracy as trained, at gamma_test =
gamma_train) and run at gamma_test with the same weights: left as they are (left) and after a
short refit at gamma_test (right; SGD from the trained weights, lr and epochs in the title).
Mean over seeds, band min to max. --quick: small networks on the 8 x 8 digits, 4 epochs, a
one-epoch refit; --full: ResNet-101 on CIFAR-10 with the paper's recipe and a 20-epoch refit. Fig. 6
(top) of the paper shows the same for Momentum ResNet-101 on CIFAR-10 (refit 20 epochs): the
model trained at gamma = 0 (a ResNet) falls from 95.2 % to 92.5 % at gamma_test = 1 without
refit, and a refit brings any model back to about 95 %. At gamma = 1 with v_0 = 0 the momentum
layers are identities (the velocity stays 0), so a model trained there has untrained residual
functions, and a model trained elsewhere loses them at gamma_test = 1. The ImageNet part of
Fig. 6 (bottom: top-1 error 22 % ResNet-101, 23 % Momentum ResNet-101 and RevNet-101) is not
reproduced here.
"""
REVISION = 1


def _config(level: str, dataset: str, gammas_test: list, refit_epochs: int, refit_lr: float,
            seeds: int, gammas_train=(0.0, 0.5, 0.9, 1.0)) -> dict:
    return {"dataset": dataset, "gammas_train": list(gammas_train),
            "gammas_test": gammas_test, "refit_epochs": refit_epochs, "refit_lr": refit_lr,
            "seeds": seeds, "settings": settings(level)}


CONFIGS = {
    "tiny": _config("tiny", "digits", [0.0, 1.0], 1, 0.01, 1, gammas_train=(0.0, 0.9)),
    "quick": _config("quick", "digits", [0.0, 0.25, 0.5, 0.75, 0.9, 1.0], 1, 0.01, 2),
    "full": _config("full", "cifar10", [round(0.1 * k, 1) for k in range(11)], 20, 0.001, 1),
}


def _validate(config: dict) -> None:
    if config["dataset"] not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, "
                         f"got {config['dataset']!r}")
    for key in ("gammas_train", "gammas_test"):
        gammas = config[key]
        if not gammas or any(not 0.0 <= float(g) <= 1.0 for g in gammas):
            raise ValueError(f"{key} must be a non-empty list of values in [0, 1], got {gammas}")
    if isinstance(config["seeds"], bool) or not isinstance(config["seeds"], int) \
            or config["seeds"] < 1:
        raise ValueError(f"seeds must be a positive integer (a count), got {config['seeds']!r}")


def momentum_at(resnet: torch.nn.Module, gamma: float) -> torch.nn.Module:
    """The Momentum ResNet of ``resnet`` at ``gamma`` (memory-saving backprop when
    ``gamma > 0``; at ``gamma = 0`` reversal would divide by 0, so plain autograd)."""
    return momentum_from(copy.deepcopy(resnet), gamma, reversible=gamma > 0)


def _checkpoint(folder, stem: str, seed: int):
    return None if folder is None else folder / f"{stem}-seed{seed}.pt"


def run(config: dict, env=None) -> dict:
    _validate(config)
    progress = Progress("gamma_robustness")
    device = resolve_device(config["device"])
    name = config["dataset"]
    setting = config["settings"][name]
    data = prepare_data(name, setting, device, None if env is None else env.data_dir)
    recipe = recipe_of(setting)
    refit = Recipe(epochs=config["refit_epochs"], batch_size=setting["batch_size"],
                   lr=config["refit_lr"], augment=setting["augment"])
    ckpt_dir = None if env is None else env.checkpoint_dir
    seeds = [config["seed"] + k for k in range(config["seeds"])]
    g_test = [float(g) for g in config["gammas_test"]]
    runs = {str(float(g)): {"trained": [], "no_refit": [[] for _ in g_test],
                            "refit": [[] for _ in g_test]} for g in config["gammas_train"]}
    total = len(seeds) * len(runs)
    k = 0
    for seed in seeds:
        resnet = base_resnet(data, setting, seed, device)
        for g_train in config["gammas_train"]:
            g_train, k = float(g_train), k + 1
            label = f"[{k}/{total}] {name} gamma_train {g_train:g} seed {seed}"
            model = momentum_at(resnet, g_train)
            rec = train(model, data, recipe, seed=seed,
                        checkpoint=_checkpoint(ckpt_dir, f"train-{g_train:g}", seed),
                        progress=progress, label=label)
            row = runs[str(g_train)]
            row["trained"].append(rec["test_accuracy"])
            for j, g in enumerate(g_test):
                tested = with_gamma(model, g)
                row["no_refit"][j].append(evaluate(tested, data.x_test, data.y_test,
                                                   recipe.eval_batch_size)[1])
                refit_rec = train(tested, data, refit, seed=seed + 1,
                                  checkpoint=_checkpoint(ckpt_dir, f"refit-{g_train:g}-{g:g}",
                                                         seed),
                                  progress=progress, label=f"{label} refit at {g:g}")
                row["refit"][j].append(refit_rec["test_accuracy"])
            progress(f"{label}: trained {rec['test_accuracy']:.1%}; at gamma_test "
                     + ", ".join(f"{g:g}: {row['no_refit'][j][-1]:.0%} -> "
                                 f"{row['refit'][j][-1]:.0%}" for j, g in enumerate(g_test)))
    return {"dataset": name, "gammas_train": [float(g) for g in config["gammas_train"]],
            "gammas_test": g_test, "seeds": seeds, "refit_epochs": config["refit_epochs"],
            "refit_lr": config["refit_lr"], "epochs": setting["epochs"], "runs": runs}


def plot(results: dict, out_dir) -> list[str]:
    g_test = np.asarray(results["gammas_test"])
    fig, axes = plt.subplots(1, 2, figsize=(8.2, 3.3), sharey=True)
    for ax, key in zip(axes, ("no_refit", "refit")):
        for i, g_train in enumerate(results["gammas_train"]):
            acc = 100 * np.asarray(results["runs"][str(g_train)][key], dtype=float)  # (test, seeds)
            ax.plot(g_test, acc.mean(1), color=color(i), marker=".", lw=1.4,
                    label=f"gamma_train = {g_train:g}")
            ax.fill_between(g_test, acc.min(1), acc.max(1), color=color(i), alpha=0.18, lw=0)
            trained = 100 * np.mean(results["runs"][str(g_train)]["trained"])
            ax.plot([g_train], [trained], marker="*", ms=10, color=color(i), ls="none")
        ax.set_xlabel("gamma_test")
    label = DATASET_LABELS.get(results["dataset"], results["dataset"])
    n = len(results["seeds"])
    axes[0].set_title(f"no refit ({label}, {results['epochs']} epochs, {n} seeds)")
    axes[1].set_title(f"refit at gamma_test ({results['refit_epochs']} epoch(s), "
                      f"lr {results['refit_lr']:g})")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(loc="lower left", fontsize=7)
    return save_figure(fig, out_dir, FIGURES[0])


def summary(results: dict) -> str:
    """One line with the measured numbers, for the README."""
    parts = []
    for g_train in results["gammas_train"]:
        row = results["runs"][str(g_train)]
        worst = min(range(len(results["gammas_test"])), key=lambda j: np.mean(row["no_refit"][j]))
        parts.append(f"trained at {g_train:g}: {100 * np.mean(row['trained']):.1f} %, worst "
                     f"{100 * np.mean(row['no_refit'][worst]):.1f} % at gamma_test "
                     f"{results['gammas_test'][worst]:g} without refit, "
                     f"{100 * np.mean(row['refit'][worst]):.1f} % refit")
    label = DATASET_LABELS.get(results["dataset"], results["dataset"])
    return f"Robustness to gamma on {label} (mean over seeds): {'; '.join(parts)}."
