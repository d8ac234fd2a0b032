"""The memory experiments (memory_batch, fine_tuning, memory_accuracy): their pieces against
independent ground truth, and each end to end at ``--tiny``."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from experiments import fine_tuning, memory_accuracy, memory_batch
from experiments.datasets import load_dataset
from experiments.registry import EXPERIMENTS, run_experiment
from mode.models import BasicBlock, Bottleneck, ResNet


@pytest.mark.parametrize("true", [0, 1, 3, 17, 40, 64, 500])
def test_largest_batch_finds_the_threshold_of_a_monotone_peak(true):
    """Against a known peak curve (affine plus a quadratic bend, so the fit's guess is off):
    the answer is the largest b with peak(b) <= budget, capped at 64."""
    def peak(b):
        return 1000 + 37 * b + b * b

    budget = peak(true) if true > 0 else peak(1) - 1
    calls = []
    b, extra = memory_batch.largest_batch(lambda n: calls.append(n) or peak(n), budget,
                                          [2, 4], [peak(2), peak(4)], cap=64)
    assert b == min(true, 64)
    assert extra == len(set(calls)) and extra <= 16  # bracketing + bisection, not a scan
    if 0 < b < 64:
        assert b + 1 in calls or b + 1 in (2, 4)  # the next batch was seen not to fit


def test_largest_batch_rejects_a_bad_cap():
    with pytest.raises(ValueError, match="cap"):
        memory_batch.largest_batch(lambda n: n, 10, [1, 2], [1, 2], cap=0)


@pytest.mark.parametrize("block,layers", [(BasicBlock, [2, 3, 2, 2]), (Bottleneck, [2, 2, 3, 2])])
def test_revnet_keeps_the_parameter_count(block, layers):
    """The RevNet's branch width is chosen so that its convolutions have the ResNet's weights:
    the parameter counts agree within 3 % (batch norms and rounding of the hidden width)."""
    net = ResNet(block, layers, num_classes=10, width=16)
    rev = memory_batch.revnet(net)
    n0 = sum(p.numel() for p in net.parameters())
    n1 = sum(p.numel() for p in rev.parameters())
    assert abs(n1 - n0) / n0 < 0.03
    x = torch.randn(3, 3, 16, 16)
    assert rev(x).shape == (3, 10)


def test_checkpointed_resnet_has_the_resnets_gradients():
    """Checkpointing changes memory, not the function: same loss and parameter gradients as
    the ResNet (float64, the same weights)."""
    torch.manual_seed(0)
    net = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=10, width=8).double()
    ckpt = memory_batch.checkpointed(net)
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    grads = []
    for m in (net, ckpt):
        m.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(m(x), y).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


def test_class_subset_relabels_in_the_given_order():
    data = load_dataset("digits")
    sub = fine_tuning.class_subset(data, [7, 3])
    assert sub.num_classes == 2 and sub.classes == ("7", "3")
    assert int((data.y_train == 7).sum()) == int((sub.y_train == 0).sum())
    assert int((data.y_train == 3).sum()) == int((sub.y_train == 1).sum())
    assert set(sub.y_test.tolist()) == {0, 1}
    # the images kept are the ones of the named classes, in order
    torch.testing.assert_close(sub.x_train[sub.y_train == 0], data.x_train[data.y_train == 7])
    with pytest.raises(ValueError, match="distinct"):
        fine_tuning.class_subset(data, [1, 1])


def test_registered():
    for name in ("memory_batch", "fine_tuning", "memory_accuracy"):
        assert name in EXPERIMENTS


def _load(path):
    with open(path) as fh:
        return json.load(fh)


def test_memory_batch_tiny_end_to_end(tmp_path):
    out = run_experiment("memory_batch", "tiny", out=tmp_path)
    res = _load(out["json"])["results"]
    arch = res["architectures"]["cifar_deep"]
    assert set(arch) == set(memory_batch.MODELS)
    for e in arch.values():  # the pinned layout
        assert e["batch_size"] == [2, 4] and len(e["peak_bytes"]) == 2
        assert e["peak_bytes"][1] > e["peak_bytes"][0] > 0  # more examples, more memory
    fit = res["budget"]["cifar_deep"]
    # the budget is the ResNet's peak at the largest batch, which it therefore fits
    assert fit["bytes"] == arch["resnet"]["peak_bytes"][-1]
    assert fit["models"]["resnet"]["largest_batch"] >= 4
    assert all(f.endswith((".png", ".pdf")) for f in out["figures"])


def test_fine_tuning_tiny_end_to_end(tmp_path):
    out = run_experiment("fine_tuning", "tiny", out=tmp_path)
    res = _load(out["json"])["results"]
    assert res["momentum_peak_bytes"] <= res["budget_bytes"]  # it fits the budget it was given
    assert 1 <= res["momentum_batch"] <= 20
    for r in res["runs"].values():
        assert len(r["wall_s"]) == len(r["test_accuracy"]) == 1
        assert 0.0 <= r["test_accuracy"][0] <= 1.0
    assert res["runs"]["momentum"]["batch"] == res["momentum_batch"]


def test_memory_accuracy_tiny_end_to_end(tmp_path):
    out = run_experiment("memory_accuracy", "tiny", out=tmp_path)
    res = _load(out["json"])["results"]
    assert set(res["models"]) == {"resnet", "momentum_0.9"}
    m = res["models"]["momentum_0.9"]
    assert m["peak_bytes"] > 0 and m["exact_peak_bytes"] > 0
    assert 0.0 <= m["test_accuracy"] <= 1.0


def test_exact_copy_runs_the_same_function():
    """The exact engine on the same weights computes the float model's logits up to rounding."""
    from experiments.classifiers import build_resnet, momentum_from

    torch.manual_seed(0)
    model = momentum_from(build_resnet((1, 8, 8), 3, layers=(2, 3, 2, 2), width=8), 0.9).eval()
    ex = memory_accuracy.exact_copy(model).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ex(x), model(x), rtol=1e-4, atol=1e-4)
    assert all(s.momentum.exact for s in (ex.layer1, ex.layer2, ex.layer3, ex.layer4))
