"""The experiments: every registered one runs end to end (tiny sizes), caching, the CLI.

Plus the experiments' own numerical pieces against independent ground truth (closed forms,
autograd, hand-built cases).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import mode
from experiments import registry
from experiments.__main__ import main
from experiments.common import (
    SavedTensorMeter,
    config_hash,
    log_slope,
    resolve_device,
    write_json_atomic,
)

NAMES = registry.EXPERIMENTS


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("MODE_EXPERIMENTS_QUIET", "1")


def test_registry_has_the_experiments_with_their_interface():
    assert set(NAMES) == {"dynamics_1d", "nested_rings", "ode_limit", "trajectories",
                          "representability", "memory", "learning_to_optimize",
                          "reconstruction", "image_classification", "gamma_robustness",
                          "memory_batch", "fine_tuning", "memory_accuracy"}
    assert len(set(NAMES)) == len(NAMES)
    for name in NAMES:
        module = registry.get(name)
        assert set(module.CONFIGS) == {"tiny", "quick", "full"}, name
        keys = set(module.CONFIGS["quick"])
        assert set(module.CONFIGS["tiny"]) == keys == set(module.CONFIGS["full"]), name
        assert callable(module.run) and callable(module.plot)
        assert module.TITLE and module.CAPTION.strip() and module.FIGURES


def test_unknown_experiment_level_and_override_are_errors():
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        registry.get("nope")
    with pytest.raises(ValueError, match="level must be one of"):
        registry.experiment_config("dynamics_1d", "huge")
    with pytest.raises(ValueError, match="not a setting of dynamics_1d"):
        registry.experiment_config("dynamics_1d", "tiny", overrides={"widthh": 3})


@pytest.mark.parametrize("name", NAMES)
def test_experiment_runs_end_to_end_and_writes_its_files(name, tmp_path):
    summary = registry.run_experiment(name, "tiny", out=tmp_path, seed=3)
    assert summary["status"] == "ran"
    path = tmp_path / f"{name}.json"
    assert Path(summary["json"]) == path
    with open(path) as fh:
        data = json.load(fh)
    assert data["experiment"] == name
    assert data["config"]["seed"] == 3 and data["config"]["level"] == "tiny"
    assert data["config"]["device"] == "cpu"
    assert data["versions"]["mode"] == mode.__version__
    assert data["versions"]["torch"] == torch.__version__
    assert data["config_hash"] and data["timing"]["run_s"] >= 0
    assert isinstance(data["results"], dict) and data["results"]
    stems = {Path(p).stem for p in data["figures"]}
    assert stems == set(registry.get(name).FIGURES)
    assert sorted(data["figures"]) == sorted(Path(p).name for p in summary["figures"])
    for p in data["figures"]:
        head = (tmp_path / p).read_bytes()[:8]
        assert head.startswith(b"\x89PNG") if p.endswith(".png") else head.startswith(b"%PDF")
    assert {Path(p).suffix for p in data["figures"]} == {".png", ".pdf"}
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary leftovers


def test_cache_skips_same_configuration_and_force_recomputes(tmp_path):
    first = registry.run_experiment("reconstruction", "tiny", out=tmp_path)
    json_path = Path(first["json"])
    stamp = json_path.stat().st_mtime_ns
    again = registry.run_experiment("reconstruction", "tiny", out=tmp_path)
    assert again["status"] == "cached" and json_path.stat().st_mtime_ns == stamp
    # a missing figure is re-plotted from the stored results, not recomputed
    Path(first["figures"][0]).unlink()
    replot = registry.run_experiment("reconstruction", "tiny", out=tmp_path)
    assert replot["status"] == "replotted" and Path(first["figures"][0]).exists()
    # another seed is another configuration; --force recomputes the same one
    assert registry.run_experiment("reconstruction", "tiny", out=tmp_path,
                                   seed=1)["status"] == "ran"
    assert registry.run_experiment("reconstruction", "tiny", out=tmp_path, seed=1,
                                   force=True)["status"] == "ran"


def test_figures_of_another_run_or_a_result_that_is_not_a_record_are_not_cached(tmp_path):
    """A run of other settings into the same folder, interrupted between its figures and its
    JSON, left its figures beside this JSON, which was then served as cached; a JSON that
    parses to null crashed the run."""
    first = registry.run_experiment("reconstruction", "tiny", out=tmp_path)
    figure = Path(first["figures"][0])
    written = figure.read_bytes()
    figure.write_bytes(written + b"another run's figure")
    again = registry.run_experiment("reconstruction", "tiny", out=tmp_path)
    assert again["status"] == "replotted"
    assert figure.read_bytes() != written + b"another run's figure"
    assert registry.run_experiment("reconstruction", "tiny", out=tmp_path)["status"] == "cached"
    Path(first["json"]).write_text("null")
    assert registry.run_experiment("reconstruction", "tiny", out=tmp_path)["status"] == "ran"


@pytest.mark.parametrize("argv, message", [
    (["--out", ""], "must name a folder"),
    (["--seed", "-1"], "must lie in"),
    (["--seed", str(2**70)], "must lie in"),
])
def test_cli_refuses_bad_arguments(tmp_path, capsys, monkeypatch, argv, message):
    """An empty --out wrote into the committed figures/; a negative or huge seed met numpy's
    message."""
    monkeypatch.chdir(tmp_path)  # where a default figures/ would go, should this fail
    with pytest.raises(SystemExit) as info:
        main(["run", "reconstruction", "--tiny", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_cli_refuses_a_data_dir_that_no_dataset_reads(tmp_path, capsys):
    assert main(["run", "image_classification", "--tiny", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "out")]) == 2
    assert "--data-dir is read only with --dataset" in capsys.readouterr().err
    assert not (tmp_path / "out" / "image_classification.json").exists()


def test_runs_are_repeatable_given_the_seed(tmp_path):
    a = registry.run_experiment("dynamics_1d", "tiny", out=tmp_path / "a", seed=5)
    b = registry.run_experiment("dynamics_1d", "tiny", out=tmp_path / "b", seed=5)
    ra = json.loads(Path(a["json"]).read_text())["results"]
    rb = json.loads(Path(b["json"]).read_text())["results"]
    assert ra == rb


def test_cli_list_run_and_bad_device(tmp_path, capsys):
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in NAMES)
    assert main(["run", "reconstruction", "--tiny", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "reconstruction.json").exists()
    assert "reconstruction" in capsys.readouterr().out
    assert main(["run", "reconstruction", "--tiny", "--device", "tpu", "--out",
                 str(tmp_path)]) == 2
    assert "device must be 'cpu' or 'cuda'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "no_such_experiment"])
    assert main(["docs", "--out", str(tmp_path)]) == 0
    docs = capsys.readouterr().out
    assert docs.startswith("## Figures") and "python -m experiments all --quick" in docs
    assert all(f"![{name}](figures/" in docs for name in NAMES)
    assert "Reconstructing x_0" in docs  # the stored results' one-line summary


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_write_json_atomic_replaces_whole_files_only(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"a": 1, "x": torch.tensor([1.0, float("inf")]),
                             "y": np.float32(2.5)})
    assert json.loads(path.read_text()) == {"a": 1, "x": [1.0, None], "y": 2.5}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text())["a"] == 1  # the previous file is intact
    assert os.listdir(tmp_path) == ["r.json"]


def test_config_hash_is_stable_and_sensitive():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_saved_tensor_meter_counts_what_autograd_saves():
    x = torch.randn(100, 10, requires_grad=True)
    meter = SavedTensorMeter()
    with meter.measure():
        y = x.exp()  # exp saves its output: 100 * 10 float32
    assert meter.bytes == 100 * 10 * 4 and meter.count == 1
    w = torch.nn.Parameter(torch.randn(10, 10))
    meter = SavedTensorMeter(exclude=[w])
    with meter.measure():
        z = x @ w  # saves x (an activation) and w (a parameter, excluded)
    assert meter.bytes == x.numel() * 4
    (y.sum() + z.sum()).backward()


def test_log_slope_recovers_a_power_law():
    n = np.array([10.0, 20.0, 40.0, 80.0])
    assert log_slope(n, 3.0 * n**-1.5) == pytest.approx(-1.5, abs=1e-12)
    assert math.isnan(log_slope([1.0], [1.0]))


def test_crossings_counter_on_hand_built_trajectories():
    from experiments.dynamics_1d import count_crossings

    parallel = np.array([[0.0, 1.0, 2.0], [0.1, 1.1, 2.1]])  # (depth, 3 trajectories)
    assert count_crossings(parallel) == 0
    swap = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert count_crossings(swap) == 1
    back_and_forth = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert count_crossings(back_and_forth) == 2


def test_nested_rings_data():
    from experiments.nested_rings import nested_rings

    x, y = nested_rings(1000, np.random.default_rng(0))
    r = np.linalg.norm(x, axis=1)
    assert (r[y == 0] < 0.5).all() and (r[y == 1] > 1.0).all() and (r[y == 1] < 1.5).all()
    assert (y == 0).sum() == 500


def test_scale_invariant_residual_closed_forms():
    from experiments.representability import TARGET, residual

    D = TARGET
    assert residual(torch.eye(2, dtype=torch.float64), D) == pytest.approx(1.0)
    assert residual(3.0 * D, D) == pytest.approx(0.0, abs=1e-15)
    M = torch.diag(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert residual(M, D) == pytest.approx(math.sqrt(0.5))


@pytest.mark.parametrize("problem", ["least squares", "logistic regression"])
def test_l2o_gradient_and_minimizer(problem):
    from experiments.learning_to_optimize import gradient, minimizer, objective, sample

    gen = torch.Generator().manual_seed(0)
    A, b = sample(problem, 3, 4, 12, gen, torch.float64, "cpu")
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    auto = torch.autograd.grad(objective(problem, z, A, b, 0.1).sum(), z)[0]
    assert torch.allclose(gradient(problem, z, A, b, 0.1), auto, atol=1e-12)
    z_star = minimizer(problem, A, b, 0.1)
    assert gradient(problem, z_star, A, b, 0.1).abs().max() < 1e-10


def test_l2o_layer_determinants_match_the_theory():
    """|det J| = 1 for RevNet and Hamiltonian layers, gamma^d for a momentum layer (any P, Q)."""
    from experiments.learning_to_optimize import Unrolled, minimizer, sample

    config = dict(dim=3, gamma=0.7, l2=0.1)
    gen = torch.Generator().manual_seed(1)
    A, b = sample("least squares", 1, 3, 9, gen, torch.float64, "cpu")
    z_star = minimizer("least squares", A, b, 0.1)[0]
    for arch, det in (("Momentum ResNet", 0.7**3), ("RevNet", 1.0), ("Hamiltonian net", 1.0)):
        model = Unrolled(arch, "least squares", config, torch.float64)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        J = model.layer_jacobian(z_star, A, b)
        assert float(torch.linalg.det(J).abs()) == pytest.approx(det, rel=1e-10), arch
