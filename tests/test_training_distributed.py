"""``experiments.training.train`` under torchrun: 2 CPU processes (gloo) give the run of one
process on the full batch.

Both workers of one spawn get the environment torchrun sets (``MASTER_ADDR``, ``MASTER_PORT``,
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and call ``train`` with no process group, so ``train``
joins it itself. Each worker saves its final state and record; the tests compare them with
``train`` in this process (one process, the full batch):

- a float64 Momentum ResNet without BatchNorm (reversible float, and exact with crop-and-flip
  augmentation): the same optimization up to round-off. The global batch of 25 splits 13 + 12
  and the last one of 15 splits 8 + 7, so a per-rank mean (instead of the weighted sum) would
  differ by far more than round-off;
- resume: a run interrupted after its first epoch and resumed gives the uninterrupted run bit
  for bit, and only rank 0 writes a checkpoint (rank 1's folder stays empty);
- a converted ResNet with BatchNorm (statistics per rank, as documented): every rank ends with
  the same state, and the curves report rank 0's model evaluated on the whole test set;
- the command line, as ``torchrun -m experiments run image_classification --tiny`` runs it
  (a process group of its own, on a second port): rank 0 alone writes and prints, the other
  rank leaves no scratch folder, and a rerun is cached on every rank (no rank trains alone).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port, spawn
from torch import nn

import mode
from experiments.classifiers import build_model, build_resnet
from experiments.common import Progress
from experiments.datasets import load_dataset
from experiments.training import Recipe, evaluate, train

WORLD, TIMEOUT_S, HIDDEN = 2, 120, 12
QUIET = Progress("test", quiet=True)
RECIPE = Recipe(epochs=2, batch_size=25, lr=0.05, milestones=(1,))


class Interrupt(Exception):
    pass


def _data(augment: bool = False):
    data = load_dataset("digits").subset(90, 40)
    if augment:
        import dataclasses
        data = dataclasses.replace(data, augment=True)
    return data


def _momentum_mlp(exact: bool, seed: int = 0) -> nn.Module:
    """Flatten, a linear stem, a reversible Momentum ResNet of tanh layers, a linear head
    (float64, no BatchNorm)."""
    torch.manual_seed(seed)
    fs = [nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh()) for _ in range(3)]
    net = mode.MomentumResNet(fs, 0.9, reversible=True, exact=exact)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, HIDDEN), net, nn.Linear(HIDDEN, 10)).double()


def _converted_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("momentum", build_resnet((1, 8, 8), 10, width=4, layers=(2, 2, 2, 2)))


#: name: (model builder, recipe)
CASES = {
    "float": (lambda: _momentum_mlp(False), RECIPE),
    "exact-augment": (lambda: _momentum_mlp(True), Recipe(**{**RECIPE.as_dict(),
                                                             "augment": True})),
    "batchnorm": (_converted_resnet, RECIPE),
}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run(name: str) -> dict:
    build, recipe = CASES[name]
    model = build()
    rec = train(model, _data(recipe.augment), recipe, seed=3, progress=QUIET)
    out = {"record": rec, "state": _state(model)}
    if name == "batchnorm":  # rank 0's model on the whole test set, evaluated here
        data = _data()
        out["evaluated"] = evaluate(model, data.x_test, data.y_test)
    return out


def _resume(rank: int, out: Path) -> dict:
    """Interrupted after epoch 1 and resumed in a fresh model; each rank names its own
    checkpoint path, so a file in rank 1's folder would be a write by rank 1."""
    path = out / f"rank{rank}" / "run.pt"
    path.parent.mkdir()

    def stop(epoch, record):
        if epoch == 1:
            raise Interrupt

    try:
        train(_momentum_mlp(False), _data(), RECIPE, seed=3, checkpoint=path, progress=QUIET,
              after_epoch=stop)
    except Interrupt:
        pass
    torch.manual_seed(999)
    model = _momentum_mlp(False, seed=5)
    rec = train(model, _data(), RECIPE, seed=3, checkpoint=path, progress=QUIET)
    return {"record": rec, "state": _state(model),
            "files": sorted(p.name for p in path.parent.iterdir())}


def _scratch_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("mode-experiments-rank*")}


def _command_line(out: Path) -> dict:
    """``python -m experiments run image_classification --tiny --out OUT`` twice in this
    rank: exit codes and what each printed."""
    import experiments.__main__ as cli

    before = _scratch_folders()
    said, wrote = [], []
    runner = cli.run_experiment

    def recorded(*args, **kwargs):  # where this rank's runner writes
        result = runner(*args, **kwargs)
        wrote.append(str(Path(result["json"]).resolve()))
        return result

    cli.run_experiment = recorded
    try:
        for _ in range(2):
            text = io.StringIO()
            with contextlib.redirect_stdout(text):
                code = cli.main(["run", "image_classification", "--tiny", "--out", str(out)])
            said.append((code, text.getvalue()))
    finally:
        cli.run_experiment = runner
    return {"said": said, "wrote": wrote, "left": sorted(_scratch_folders() - before),
            "group_left": torch.distributed.is_initialized()}


def _worker(rank: int, ports: tuple[int, int], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MODE_EXPERIMENTS_QUIET="1")
    torch.set_num_threads(1)
    try:
        results = {name: _run(name) for name in CASES}
        results["resume"] = _resume(rank, Path(out))
        results["group"] = (torch.distributed.get_rank(), torch.distributed.get_world_size(),
                            torch.distributed.get_backend())
        torch.distributed.destroy_process_group()
        os.environ["MASTER_PORT"] = str(ports[1])
        results["cli"] = _command_line(Path(out) / "cli")
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The results of each rank, from one spawn of 2 workers."""
    out = tmp_path_factory.mktemp("torchrun")
    ports = (free_port(), free_port())
    spawn(_worker, (ports, str(out)), WORLD, TIMEOUT_S)
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    results[0]["cli_out"] = out / "cli"
    return results


def _assert_states_close(got: dict, want: dict, tol: float) -> None:
    assert got.keys() == want.keys()
    for k in want:
        err = float((got[k] - want[k]).abs().max()) / max(float(want[k].abs().max()), 1e-300)
        assert err < tol, (k, err)


def test_train_joined_the_process_group_torchrun_describes(ranks):
    for r in range(WORLD):
        assert ranks[r]["group"] == (r, WORLD, "gloo")
        assert ranks[r]["float"]["record"]["world_size"] == WORLD


@pytest.mark.parametrize("name", ["float", "exact-augment"])
def test_two_processes_train_as_one_on_the_full_batch(ranks, name):
    build, recipe = CASES[name]
    model = build()
    want = train(model, _data(recipe.augment), recipe, seed=3, progress=QUIET)
    assert want["world_size"] == 1
    for r in range(WORLD):  # every rank holds the same parameters, bit for bit
        for k, v in ranks[0][name]["state"].items():
            assert torch.equal(v, ranks[r][name]["state"][k]), (r, k)
    got = ranks[0][name]["record"]
    # float64: the two processes sum the batch in two parts and all-reduce, one process sums
    # it at once (measured: 4e-16 after 8 SGD steps; 1e-10 leaves room for other kernels)
    _assert_states_close(ranks[0][name]["state"], _state(model), 1e-10)
    for key in ("train_loss", "test_loss"):
        assert got["curves"][key] == pytest.approx(want["curves"][key], rel=1e-10), key
    for key in ("epoch", "lr", "train_accuracy", "test_accuracy"):
        assert got["curves"][key] == want["curves"][key], key
    # the runs train: the comparison is not between two untouched initializations
    assert max(float((v - build().state_dict()[k]).abs().max())
               for k, v in _state(model).items()) > 1e-3


def test_resume_gives_the_uninterrupted_run_and_only_rank_0_writes(ranks):
    for r in range(WORLD):
        got, want = ranks[r]["resume"], ranks[r]["float"]
        assert got["record"]["resumed_from"] == 1 and not got["record"]["cached"]
        assert got["record"]["curves"] == {**want["record"]["curves"],
                                           "epoch_s": got["record"]["curves"]["epoch_s"]}
        for k, v in want["state"].items():
            assert torch.equal(got["state"][k], v), (r, k)
    assert ranks[0]["resume"]["files"] == ["run.pt"]
    assert ranks[1]["resume"]["files"] == []


def test_batchnorm_ranks_agree_and_evaluation_is_rank_0s_model(ranks):
    states = [ranks[r]["batchnorm"]["state"] for r in range(WORLD)]
    assert any("running_mean" in k for k in states[0])
    for k, v in states[0].items():  # parameters and rank 0's running statistics everywhere
        assert torch.equal(v, states[1][k]), k
    for r in range(WORLD):
        curves = ranks[r]["batchnorm"]["record"]["curves"]
        loss, acc = ranks[0]["batchnorm"]["evaluated"]
        # float32; the slices of 20 test examples are evaluated as batches of their own
        assert curves["test_loss"][-1] == pytest.approx(loss, rel=1e-5)
        assert curves["test_accuracy"][-1] == acc


def test_command_line_under_torchrun_writes_on_rank_0_only(ranks):
    out = ranks[0]["cli_out"]
    assert sorted(p.name for p in out.iterdir()) == [
        "image_classification.json", "image_classification.pdf", "image_classification.png"]
    record = json.loads((out / "image_classification.json").read_text())
    assert record["results"]["world_size"] == WORLD
    accuracies = record["results"]["datasets"]["digits"]["momentum"]["test_accuracy"]
    assert len(accuracies) == 2 and all(0 <= a <= 1 for a in accuracies)
    (first, said_first), (second, said_second) = ranks[0]["cli"]["said"]
    assert first == second == 0
    assert "image_classification   ran" in said_first and f"({WORLD} processes)" in said_first
    assert "image_classification   cached" in said_second
    mine = str((out / "image_classification.json").resolve())
    assert ranks[0]["cli"]["wrote"] == [mine, mine]
    for r in range(1, WORLD):  # the others ran too, silently, elsewhere, and left nothing
        assert [code for code, _ in ranks[r]["cli"]["said"]] == [0, 0]
        assert len(ranks[r]["cli"]["wrote"]) == 2
        assert not any(p.startswith(str(out.resolve())) for p in ranks[r]["cli"]["wrote"])
        assert all(text == "" for _, text in ranks[r]["cli"]["said"])
    for r in range(WORLD):
        assert ranks[r]["cli"]["left"] == [] and not ranks[r]["cli"]["group_left"]


def test_no_worker_or_process_group_is_left(ranks):
    assert not torch.distributed.is_initialized()
    assert not mp.active_children()


def test_the_number_of_processes_is_part_of_the_cache_key(monkeypatch):
    """A torchrun run and a one-process run of the same experiment are cached apart; one
    process keeps the key it always had."""
    from experiments.registry import experiment_config

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one = experiment_config("image_classification", "tiny")
    assert "world_size" not in one
    monkeypatch.setenv("WORLD_SIZE", "2")
    two = experiment_config("image_classification", "tiny")
    assert two == {**one, "world_size": 2}
