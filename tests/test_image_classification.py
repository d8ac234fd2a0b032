"""The image-classification experiments (image_classification, gamma_robustness) at tiny sizes:
the pinned results layout, the wiring against a direct training run, CIFAR from a fixture,
resume after an interruption at the experiment level; and the runner's output-folder rules
(unwritable --out refused before any work, --fresh, the all-cached message)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from experiments import __main__ as cli
from experiments import gamma_robustness, image_classification, registry
from experiments.__main__ import main
from experiments.classifiers import MODELS, build_resnet
from experiments.common import Progress
from experiments.training import CorruptCheckpointError, Recipe, evaluate, train
from tests.test_datasets import write_cifar10

IC = "image_classification"


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("MODE_EXPERIMENTS_QUIET", "1")


def _results(summary):
    return json.loads(Path(summary["json"]).read_text())["results"]


def _without_times(results):
    """The results with the wall-clock fields (which differ between runs) removed."""
    out = copy.deepcopy(results)
    for table in out["datasets"].values():
        for row in table.values():
            row.pop("train_s")
            for curves in row["curves"]:
                curves.pop("epoch_s")
    return out


def test_results_layout_and_the_resnet_equals_a_direct_training_run(tmp_path):
    config = registry.experiment_config(IC, "tiny", seed=4, overrides={"models": ["resnet"]})
    summary = registry.run_experiment(IC, "tiny", out=tmp_path, seed=4,
                                      overrides={"models": ["resnet"]})
    res = _results(summary)
    row = res["datasets"]["digits"]["resnet"]
    assert res["seeds"] == [4, 5]
    assert len(row["test_accuracy"]) == 2 and all(0 <= a <= 1 for a in row["test_accuracy"])
    for acc, curves in zip(row["test_accuracy"], row["curves"]):
        assert acc == curves["test_accuracy"][-1]
        assert curves["epoch"] == list(range(1, config["settings"]["digits"]["epochs"] + 1))
    # the same ResNet trained by hand from the documented pieces gives the same accuracy
    setting = config["settings"]["digits"]
    data = image_classification.prepare_data("digits", setting, torch.device("cpu"))
    assert len(data.x_train) == setting["n_train"] and len(data.x_test) == setting["n_test"]
    torch.manual_seed(5)
    net = build_resnet((1, 8, 8), 10, width=setting["width"], layers=setting["layers"])
    rec = train(net, data, Recipe(epochs=setting["epochs"], batch_size=setting["batch_size"],
                                  lr=setting["lr"]), seed=5, progress=Progress("t", quiet=True))
    assert rec["curves"]["test_loss"] == row["curves"][1]["test_loss"]
    assert evaluate(net, data.x_test, data.y_test)[1] == row["test_accuracy"][1]
    assert row["parameters"] == sum(p.numel() for p in net.parameters())
    # the resumable state is gone once the results are saved
    assert not (tmp_path / ".checkpoints").exists()


class Interrupt(Exception):
    pass


def test_an_interrupted_experiment_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    settings = copy.deepcopy(image_classification.CONFIGS["tiny"]["settings"])
    settings["digits"]["epochs"] = 2
    overrides = {"models": ["resnet", "momentum"], "seeds": 1, "settings": settings}
    ref = registry.run_experiment(IC, "tiny", out=tmp_path / "ref", overrides=overrides)

    calls, real_train = [], image_classification.train

    def interrupted(*args, **kwargs):  # the second training stops after its first epoch
        calls.append(kwargs.get("checkpoint"))

        def hook(epoch, record):
            if len(calls) == 2 and epoch == 1:
                raise Interrupt
        return real_train(*args, after_epoch=hook, **kwargs)

    monkeypatch.setattr(image_classification, "train", interrupted)
    with pytest.raises(Interrupt):
        registry.run_experiment(IC, "tiny", out=tmp_path / "run", overrides=overrides)
    assert not (tmp_path / "run" / f"{IC}.json").exists()
    left = sorted(p.name for p in (tmp_path / "run" / ".checkpoints").rglob("*.pt"))
    assert left == ["digits-momentum-seed0.pt", "digits-resnet-seed0.pt"]

    resumed = []
    monkeypatch.setattr(image_classification, "train",
                        lambda *a, **k: resumed.append(real_train(*a, **k)) or resumed[-1])
    out = registry.run_experiment(IC, "tiny", out=tmp_path / "run", overrides=overrides)
    assert [r["resumed_from"] for r in resumed] == [2, 1]  # cached, then resumed
    assert _without_times(_results(out)) == _without_times(_results(ref))
    assert not (tmp_path / "run" / ".checkpoints").exists()


def test_cifar10_from_a_fixture_folder_end_to_end(tmp_path, capsys):
    write_cifar10(tmp_path / "data", n_per_batch=8, n_test=6)
    assert main(["run", IC, "--tiny", "--dataset", "cifar10", "--data-dir",
                 str(tmp_path / "data"), "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / f"{IC}.json").read_text())["results"]
    assert list(res["datasets"]) == ["cifar10"]
    row = res["datasets"]["cifar10"]["momentum"]
    assert len(row["test_accuracy"]) == 2
    # 40 training and 6 test images: the fixture's sizes, not the tiny level's cuts
    assert all(acc * 6 == round(acc * 6) for acc in row["test_accuracy"])
    assert res["published"]["cifar10"]["resnet"] == [95.15, 0.12]
    assert list(res["datasets"]["cifar10"]) == list(MODELS)
    line = image_classification.summary(res)
    assert "CIFAR-10: ResNet" in line and line.count(" ± ") == 1 + len(MODELS)  # + the header


def test_the_cache_follows_the_cifar_files_and_force_discards_a_damaged_checkpoint(tmp_path):
    """The cache ignored --data-dir: a run on other CIFAR files printed 'cached' with the old
    numbers. The key holds the files' contents now (the same files elsewhere: cached). A
    damaged checkpoint is named, and --force starts over (it resumed from it before)."""
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_cifar10(tmp_path / name, n_per_batch=8, n_test=6, seed=seed)
    overrides = {"models": ["resnet"], "seeds": 1, "datasets": ["cifar10"]}
    runs = [registry.run_experiment(IC, "tiny", out=tmp_path / "out", overrides=overrides,
                                    data_dir=tmp_path / k) for k in "abc"]
    assert [r["status"] for r in runs] == ["ran", "cached", "ran"]
    record = json.loads(Path(runs[2]["json"]).read_text())
    assert record["data"]["dir"] == str(tmp_path / "c")
    assert "--dataset cifar10 --data-dir" in record["command"]
    damaged = tmp_path / "out" / ".checkpoints" / f"{IC}-{record['config_hash']}"
    damaged.mkdir(parents=True)
    (damaged / "cifar10-resnet-seed0.pt").write_bytes(b"not a checkpoint")
    assert registry.run_experiment(IC, "tiny", out=tmp_path / "out", overrides=overrides,
                                   data_dir=tmp_path / "c", force=True)["status"] == "ran"
    assert not damaged.exists()
    damaged.mkdir(parents=True)
    (damaged / "cifar10-resnet-seed0.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "out" / f"{IC}.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="cifar10-resnet-seed0.pt"):
        registry.run_experiment(IC, "tiny", out=tmp_path / "out", overrides=overrides,
                                data_dir=tmp_path / "c")


def test_missing_cifar_folder_is_a_clear_error_before_any_training(tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setattr(image_classification, "train",
                        lambda *a, **k: pytest.fail("trained without data"))
    rc = main(["run", IC, "--tiny", "--dataset", "cifar100", "--data-dir",
               str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "cifar-100-python" in err and "lacks train, test" in err
    assert "Traceback" not in err and not (tmp_path / "out" / f"{IC}.json").exists()


def test_gamma_robustness_refits_and_evaluates_the_trained_weights(tmp_path):
    res = _results(registry.run_experiment("gamma_robustness", "tiny", out=tmp_path))
    config = gamma_robustness.CONFIGS["tiny"]
    assert res["gammas_train"] == config["gammas_train"]
    for g_train in res["gammas_train"]:
        row = res["runs"][str(g_train)]
        assert len(row["no_refit"]) == len(row["refit"]) == len(res["gammas_test"])
        for j, g_test in enumerate(res["gammas_test"]):
            assert all(0 <= a <= 1 for a in row["no_refit"][j] + row["refit"][j])
            if g_test == g_train:  # the same weights at the same gamma: the trained accuracy
                assert row["no_refit"][j] == row["trained"]
    assert "gamma_test" in gamma_robustness.summary(res)


def test_gamma_robustness_at_a_foreign_gamma_is_another_network():
    """A model trained at gamma 0.9 run at gamma_test = 1 drops its residual functions (v
    stays 0): its output is the network with the momentum layers removed."""
    torch.manual_seed(0)
    resnet = build_resnet((1, 8, 8), 10, width=4)
    model = gamma_robustness.momentum_at(resnet, 0.9).eval()
    from experiments.classifiers import with_gamma

    one = with_gamma(model, 1.0).eval()
    x = torch.randn(3, 1, 8, 8)
    skipped = copy.deepcopy(resnet).eval()
    for name in ("layer1", "layer2", "layer3", "layer4"):
        stage = skipped.get_submodule(name)
        setattr(skipped, name, torch.nn.Sequential(stage[0]))  # the kept first block alone
    torch.testing.assert_close(one(x), skipped(x))
    assert not torch.allclose(model(x), one(x))


def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "run_experiment",
                        lambda *a, **k: pytest.fail("ran with an unwritable --out"))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for command in (["run", "reconstruction"], ["all"]):
        assert main([*command, "--tiny", "--out", str(blocker / "sub")]) == 2
        err = capsys.readouterr().err
        assert "cannot be written" in err and "--out" in err and "Traceback" not in err
    with pytest.raises(registry.OutputNotWritableError, match="cannot be written"):
        registry.check_writable(blocker)


def test_fresh_folder_and_the_all_cached_message(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "reconstruction", "--tiny", "--fresh"]) == 0
    assert main(["run", "reconstruction", "--tiny", "--fresh"]) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((r / "reconstruction.json").exists() for r in runs)
    out = capsys.readouterr().out
    assert out.count(" ran ") == 2 and "nothing was recomputed" not in out
    assert main(["run", "reconstruction", "--tiny", "--out", str(runs[0])]) == 0
    out = capsys.readouterr().out
    assert "cached" in out and "nothing was recomputed" in out and "--force" in out
    with pytest.raises(SystemExit):
        main(["run", "reconstruction", "--tiny", "--fresh", "--out", "x"])
    assert main(["run", "reconstruction", "--tiny", "--dataset", "digits"]) == 2
    assert "no dataset setting" in capsys.readouterr().err


def test_the_main_job_writes_into_a_fresh_folder():
    dev = (Path(__file__).parents[1] / "dev.sh").read_text()
    main_line = [line for line in dev.splitlines() if line.startswith("main)")]
    assert len(main_line) == 1 and "experiments all --quick --fresh" in main_line[0]


@pytest.mark.parametrize("kind", ["bottleneck", "basic", "basic1d"])
def test_branch_parameter_formula_counts_the_built_branch(kind):
    from experiments.classifiers import BasicBlock1d, _branch, branch_parameters
    from mode.models import BasicBlock, Bottleneck

    block = {"bottleneck": Bottleneck(16, 4), "basic": BasicBlock(8, 8),
             "basic1d": BasicBlock1d(8, 8)}[kind]
    for channels, hidden in ((4, 3), (8, 5), (6, 16)):
        built = sum(p.numel() for p in _branch(block, channels, hidden).parameters())
        assert branch_parameters(block, channels, hidden) == built


def test_full_size_models_match_resnet101_parameters():
    """--full builds ResNet-101 (42.5 M parameters on CIFAR-10) and its three variants."""
    from experiments.classifiers import count_parameters, revnet_from

    setting = image_classification.CONFIGS["full"]["settings"]["cifar10"]
    torch.manual_seed(0)
    resnet = build_resnet((3, 32, 32), 10, block=setting["block"], layers=setting["layers"],
                          width=setting["width"])
    n = count_parameters(resnet)
    assert 42e6 < n < 43e6
    # the stem, 33 bottlenecks of 3 convolutions, 4 downsampling convolutions
    assert sum(1 for m in resnet.modules() if isinstance(m, torch.nn.Conv2d)) == 104
    rev = revnet_from(resnet)
    assert abs(count_parameters(rev) - n) / n < 0.02
