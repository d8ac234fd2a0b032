"""Image classification with ResNets, Momentum ResNets and RevNets (Table 2 of the paper).

From one ResNet per seed, four classifiers (:mod:`experiments.classifiers`): the ResNet itself,
its Momentum ResNet (``mode.convert``, ``gamma``, ``v_0 = 0``, memory-saving reversible
backprop), the Momentum ResNet with a learned initial velocity ``v_0 = B(x_0) - x_0`` (one more
block per stage), and a RevNet with the ResNet's parameter count. Each is trained with SGD
(momentum, weight decay, step decay; :mod:`experiments.training`: a checkpoint every epoch,
resumed after an interruption) and its final test accuracy recorded per seed.

Results (pinned: other code reads them): ``results["datasets"][DATASET][MODEL]`` holds
``"test_accuracy"`` (per-seed final test accuracies in [0, 1]), ``"curves"`` (per seed, the
per-epoch curves of :func:`experiments.training.train`), ``"parameters"`` and ``"train_s"``.

Data-parallel (each training run over the ranks, rank 0 writes; see the README, "Training at
scale")::

    torchrun --nproc_per_node=2 -m experiments run image_classification --quick --out runs/ddp

Under torchrun the results also hold ``"world_size"``.
"""

from __future__ import annotations

import copy
import dataclasses

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from .classifiers import MODELS, build_model, build_resnet, count_parameters
from .common import Progress, color, resolve_device, save_figure
from .datasets import Dataset, load_dataset
from .training import Recipe, distributed_world, init_distributed, train

TITLE = "image classification: ResNet, Momentum ResNet (v0 = 0 and learned), RevNet"
FIGURES = ["image_classification"]
CAPTION = """
Test accuracy against epoch (mean over seeds, band: min to max) of four classifiers built from
the same ResNet: the ResNet, its Momentum ResNet (mode.convert, gamma = 0.9, v_0 = 0,
memory-saving reversible backprop), the Momentum ResNet with a learned v_0 = B(x_0) - x_0 and a
RevNet with the ResNet's parameter count; SGD with momentum 0.9, weight decay 5e-4 and a step
decay of the learning rate. The table gives the final test accuracy, mean +- standard deviation
over the seeds, beside the published numbers: Table 2 of the paper (ResNet-101 and Momentum
ResNet-101, 10 runs, 220 epochs: CIFAR-10 95.15 +- 0.12, 95.1 +- 0.13, 95.18 +- 0.06; CIFAR-100
76.86 +- 0.25, 76.39 +- 0.18, 76.38 +- 0.42 for ResNet, v_0 = 0, learned v_0) and, on MNIST-1D
(dotted lines), the dataset authors' baselines of other architectures (logistic regression 32 %,
MLP 68 %, CNN 94 %, GRU 91 %). The --quick sizes are small networks trained for 4 epochs on a
CPU (digits: scikit-learn's 8 x 8 digits; MNIST-1D generated locally), not to convergence: they
compare the four models under one short budget, and are no reproduction of the published
accuracies, which need the --full sizes; --full trains
ResNet-101-sized models on CIFAR-10 and CIFAR-100 with the paper's recipe (220 epochs, lr
divided by 10 at epoch 180, crop and flip) on a GPU.
"""
REVISION = 1

#: Published test accuracies in % (mean, std): Table 2 of the paper (10 runs, CIFAR) and the
#: MNIST-1D paper's baselines (other architectures; no standard deviation published).
PUBLISHED = {
    "cifar10": {"resnet": [95.15, 0.12], "momentum": [95.1, 0.13],
                "momentum_learned_v0": [95.18, 0.06]},
    "cifar100": {"resnet": [76.86, 0.25], "momentum": [76.39, 0.18],
                 "momentum_learned_v0": [76.38, 0.42]},
}
MNIST1D_BASELINES = {"logistic regression": 32.0, "MLP": 68.0, "CNN": 94.0, "GRU": 91.0}
LABELS = {"resnet": "ResNet", "momentum": "Momentum ResNet, v0 = 0",
          "momentum_learned_v0": "Momentum ResNet, learned v0", "revnet": "RevNet"}
SHORT = {"resnet": "ResNet", "momentum": "Momentum (v0 = 0)",
         "momentum_learned_v0": "Momentum (learned v0)", "revnet": "RevNet"}
DATASET_LABELS = {"digits": "digits (8 x 8)", "mnist1d": "MNIST-1D", "cifar10": "CIFAR-10",
                  "cifar100": "CIFAR-100"}


def _setting(width, epochs, lr, milestones, *, batch_size=128, block="basic",
             layers=(2, 2, 2, 2), augment=False, n_train=None, n_test=None) -> dict:
    return {"block": block, "layers": list(layers), "width": width, "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "milestones": list(milestones),
            "augment": augment, "n_train": n_train, "n_test": n_test}


def settings(level: str) -> dict[str, dict]:
    """Network and recipe of every dataset at ``level`` (shared with ``gamma_robustness``)."""
    if level == "tiny":
        small = _setting(4, 1, 0.05, [], batch_size=32, n_train=64, n_test=32)
        return {"digits": small, "mnist1d": small,
                "cifar10": {**small, "augment": True}, "cifar100": {**small, "augment": True}}
    if level == "quick":
        cifar = _setting(16, 10, 0.05, [8], augment=True, n_train=10000, n_test=2000)
        return {"digits": _setting(8, 4, 0.1, [3]), "mnist1d": _setting(8, 4, 0.1, [3]),
                "cifar10": cifar, "cifar100": cifar}
    if level == "full":
        # ResNet-101 (bottleneck blocks 3, 4, 23, 3, width 64) and the authors' recipe
        cifar = _setting(64, 220, 0.01, [180], block="bottleneck", layers=(3, 4, 23, 3),
                         augment=True)
        return {"digits": _setting(16, 30, 0.1, [20]), "mnist1d": _setting(32, 60, 0.1, [45]),
                "cifar10": cifar, "cifar100": cifar}
    raise ValueError(f"no settings for level {level!r}")


CONFIGS = {
    "tiny": {"datasets": ["digits"], "models": list(MODELS), "seeds": 2, "gamma": 0.9,
             "settings": settings("tiny")},
    "quick": {"datasets": ["digits", "mnist1d"], "models": list(MODELS), "seeds": 3,
              "gamma": 0.9, "settings": settings("quick")},
    "full": {"datasets": ["cifar10", "cifar100"], "models": list(MODELS), "seeds": 10,
             "gamma": 0.9, "settings": settings("full")},
}


def recipe_of(setting: dict) -> Recipe:
    """The training recipe of one dataset's setting."""
    return Recipe(epochs=setting["epochs"], batch_size=setting["batch_size"], lr=setting["lr"],
                  milestones=tuple(setting["milestones"]), augment=setting["augment"])


def prepare_data(name: str, setting: dict, device: torch.device, data_dir=None) -> Dataset:
    """The dataset ``name``, cut to the setting's sizes, with the augmentation flag it asks
    for, on ``device``."""
    data = load_dataset(name, data_dir).subset(setting["n_train"], setting["n_test"])
    data = dataclasses.replace(data, augment=bool(setting["augment"]))
    if device.type != "cpu":  # one copy on the accelerator instead of one per batch
        data = dataclasses.replace(data, **{k: getattr(data, k).to(device) for k in
                                            ("x_train", "y_train", "x_test", "y_test")})
    return data


def base_resnet(data: Dataset, setting: dict, seed: int, device: torch.device):
    """The ResNet of ``seed`` for ``data`` (its initialization drawn from ``seed`` alone)."""
    torch.manual_seed(seed)
    net = build_resnet(data.input_shape, data.num_classes, block=setting["block"],
                       layers=setting["layers"], width=setting["width"])
    return net.to(device)


def _validate(config: dict) -> None:
    unknown = [m for m in config["models"] if m not in MODELS]
    if unknown or not config["models"]:
        raise ValueError(f"models must be a non-empty list of {', '.join(MODELS)}, "
                         f"got {config['models']}")
    missing = [d for d in config["datasets"] if d not in config["settings"]]
    if missing or not config["datasets"]:
        raise ValueError(f"datasets must be a non-empty list of {', '.join(config['settings'])}"
                         f", got {config['datasets']}")
    if isinstance(config["seeds"], bool) or not isinstance(config["seeds"], int) \
            or config["seeds"] < 1:
        raise ValueError(f"seeds must be a positive integer (a count), got {config['seeds']!r}")


def run(config: dict, env=None) -> dict:
    """Train every model on every dataset and seed. Under torchrun each training run is
    data-parallel over the ranks (:func:`experiments.training.train`; a CUDA device becomes
    ``cuda:LOCAL_RANK``), rank 0 reports, and the results are those of rank 0 (the same on
    every rank), with ``"world_size"``."""
    _validate(config)
    device = init_distributed(resolve_device(config["device"]))
    rank, world = distributed_world()
    progress = Progress("image_classification", quiet=True if rank else None)
    data_dir = None if env is None else env.data_dir
    ckpt_dir = None if env is None else env.checkpoint_dir
    seeds = [config["seed"] + k for k in range(config["seeds"])]
    # every dataset is read first: a missing CIFAR folder is an error before any training
    datas = {name: prepare_data(name, config["settings"][name], device, data_dir)
             for name in config["datasets"]}
    out = {"datasets": {}, "seeds": seeds, "gamma": config["gamma"],
           "models": config["models"], "published": PUBLISHED,
           "mnist1d_baselines": MNIST1D_BASELINES}
    if world > 1:  # one process gives results without the key, exactly as before
        out["world_size"] = world
    n_runs, k = len(datas) * len(seeds) * len(config["models"]), 0
    for name, data in datas.items():
        setting = config["settings"][name]
        recipe = recipe_of(setting)
        table = {m: {"test_accuracy": [], "curves": [], "train_s": [], "parameters": None}
                 for m in config["models"]}
        for seed in seeds:
            resnet = base_resnet(data, setting, seed, device)
            for model_name in config["models"]:
                k += 1
                torch.manual_seed(seed + 7919)  # the fresh blocks of v_0 and of the RevNet
                model = build_model(model_name, copy.deepcopy(resnet), config["gamma"])
                model = model.to(device)
                label = f"[{k}/{n_runs}] {name} {model_name} seed {seed}"
                ckpt = None if ckpt_dir is None else \
                    ckpt_dir / f"{name}-{model_name}-seed{seed}.pt"
                rec = train(model, data, recipe, seed=seed, checkpoint=ckpt, progress=progress,
                            label=label)
                row = table[model_name]
                row["test_accuracy"].append(rec["test_accuracy"])
                row["curves"].append(rec["curves"])
                row["train_s"].append(float(sum(rec["curves"]["epoch_s"])))
                row["parameters"] = count_parameters(model)
                progress(f"{label}: test accuracy {rec['test_accuracy']:.1%}")
        out["datasets"][name] = table
    return out


def _mean_std(values) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _cell(values) -> str:
    m, s = _mean_std(values)
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def plot(results: dict, out_dir) -> list[str]:
    names = list(results["datasets"])
    models = results["models"]
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(3.4 * len(names) + 4.6, 3.3),
                             gridspec_kw={"width_ratios": [1] * len(names) + [1.5]})
    for ax, name in zip(axes, names):
        for i, model in enumerate(models):
            curves = results["datasets"][name][model]["curves"]
            acc = 100 * np.array([c["test_accuracy"] for c in curves])  # (seeds, epochs)
            epochs = np.asarray(curves[0]["epoch"])
            ax.plot(epochs, acc.mean(0), color=color(i), label=LABELS[model], lw=1.4,
                    marker="." if len(epochs) < 15 else None)
            ax.fill_between(epochs, acc.min(0), acc.max(0), color=color(i), alpha=0.18, lw=0)
        if name == "mnist1d":
            for label, value in results.get("mnist1d_baselines", {}).items():
                ax.axhline(value, color="0.45", ls=":", lw=0.9)
                ax.text(ax.get_xlim()[0], value, f" {label}", fontsize=6.5, va="bottom",
                        ha="left", color="0.35")
        ax.set_title(f"{DATASET_LABELS.get(name, name)}, {len(results['seeds'])} seeds")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test accuracy (%)")
        top = max(100 * max(max(c["test_accuracy"]) for c in results["datasets"][name][m]
                            ["curves"]) for m in models)
        ax.set_ylim(max(0.0, top - 40.0), min(100.0, top + 3.0))
    axes[0].legend(loc="lower right", fontsize=7)
    ax = axes[-1]
    ax.axis("off")
    columns = ["model", "parameters"]
    cells = [[SHORT[m], " / ".join(f"{results['datasets'][n][m]['parameters'] / 1e3:.0f}k"
                                   for n in names)] for m in models]
    for name in names:
        columns.append(f"{DATASET_LABELS.get(name, name)}\nours")
        for row, m in zip(cells, models):
            row.append(_cell(results["datasets"][name][m]["test_accuracy"]))
        if name in results["published"]:
            columns.append(f"{DATASET_LABELS.get(name, name)}\npaper (101 layers)")
            for row, m in zip(cells, models):
                pub = results["published"][name].get(m)
                row.append("-" if pub is None else f"{pub[0]:.2f} ± {pub[1]:.2f}")
    table = ax.table(cellText=cells, colLabels=columns, loc="upper center", cellLoc="center",
                     bbox=None)
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.scale(1.0, 2.2)
    table.auto_set_column_width(list(range(len(columns))))
    for (r, _), cell in table.get_celld().items():
        if r == 0:
            cell.set_height(cell.get_height() * 1.3)
    ax.set_title("final test accuracy (%), mean ± std over seeds", fontsize=9)
    pub = results["published"]
    lines = ["published: paper, Table 2 (101 layers, 10 runs; ResNet / Momentum v0 = 0 / "
             "learned v0)"]
    for name in ("cifar10", "cifar100"):
        if name in pub:
            lines.append(f"{DATASET_LABELS[name]}: " + " / ".join(
                f"{pub[name][m][0]:.2f} ± {pub[name][m][1]:.2f}" for m in
                ("resnet", "momentum", "momentum_learned_v0")))
    lines.append("MNIST-1D (other architectures): " + ", ".join(
        f"{k} {v:.0f}" for k, v in results.get("mnist1d_baselines", {}).items()))
    ax.text(0.5, 0.0, "\n".join(lines), transform=ax.transAxes, ha="center", va="bottom",
            fontsize=6.5, color="0.3")
    return save_figure(fig, out_dir, FIGURES[0])


def summary(results: dict) -> str:
    """One line with the measured numbers, for the README."""
    parts = []
    for name, table in results["datasets"].items():
        cells = ", ".join(f"{SHORT[m]} {_cell(row['test_accuracy'])}"
                          for m, row in table.items())
        parts.append(f"{DATASET_LABELS.get(name, name)}: {cells}")
    n = len(results["seeds"])
    return (f"Final test accuracy (%, mean ± std over {n} seeds) of classifiers built from one "
            f"ResNet; {'; '.join(parts)}.")
