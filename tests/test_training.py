"""The training loop: an interrupted run resumed from its checkpoint ends bit-for-bit where an
uninterrupted run with the same seed ends; finished runs are cached; mismatches refused.
And the four classifiers built from one ResNet (parameter counts, conversions)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import mode
from experiments.classifiers import (
    MODELS,
    build_model,
    build_resnet,
    count_parameters,
    with_gamma,
)
from experiments.common import Progress
from experiments.datasets import load_dataset
from experiments.training import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    Recipe,
    evaluate,
    train,
)

QUIET = Progress("test", quiet=True)


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def small():
    return load_dataset("digits").subset(96, 64)


def _model(seed, name="momentum", layers=(2, 2, 2, 2)):
    torch.manual_seed(seed)
    data = load_dataset("digits")
    return build_model(name, build_resnet(data.input_shape, 10, width=4, layers=layers))


def _stop_after(k):
    def hook(epoch, record):
        if epoch == k:
            raise Interrupt
    return hook


@pytest.mark.parametrize("augment", [False, True])
def test_resume_after_an_interruption_equals_the_uninterrupted_run(small, tmp_path, augment):
    data = small
    if augment:  # crop and flip need images of at least pad size: digits are 8 x 8
        import dataclasses
        data = dataclasses.replace(small, augment=True)
    recipe = Recipe(epochs=3, batch_size=32, lr=0.05, milestones=(2,), augment=augment)
    ref_model = _model(1)
    ref = train(ref_model, data, recipe, seed=7, checkpoint=tmp_path / "ref.pt", progress=QUIET)
    model = _model(1)
    with pytest.raises(Interrupt):
        train(model, data, recipe, seed=7, checkpoint=tmp_path / "run.pt", progress=QUIET,
              after_epoch=_stop_after(1))
    # a new process would start from a fresh model and a disturbed global RNG
    torch.manual_seed(12345)
    resumed_model = _model(99)
    out = train(resumed_model, data, recipe, seed=7, checkpoint=tmp_path / "run.pt",
                progress=QUIET)
    assert out["resumed_from"] == 1 and not out["cached"]
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr"):
        assert out["curves"][key] == ref["curves"][key], key
    assert out["curves"]["lr"] == [0.05, 0.05, pytest.approx(0.005)]
    ref_state, state = ref_model.state_dict(), resumed_model.state_dict()
    assert ref_state.keys() == state.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], state[k]), k
    # without a checkpoint at all, the same seed gives the same run (the checkpoint is inert)
    plain = train(_model(1), data, recipe, seed=7, progress=QUIET)
    assert plain["curves"]["test_loss"] == ref["curves"]["test_loss"]
    # a different seed gives a different run (the comparison above can fail)
    other = train(_model(1), data, recipe, seed=8, progress=QUIET)
    assert other["curves"]["train_loss"] != ref["curves"]["train_loss"]


def test_a_finished_checkpoint_is_returned_cached_with_its_trained_weights(small, tmp_path):
    recipe = Recipe(epochs=2, batch_size=32, lr=0.05)
    trained = _model(2, "resnet")
    first = train(trained, small, recipe, seed=0, checkpoint=tmp_path / "c.pt", progress=QUIET)
    fresh = _model(3, "resnet")
    again = train(fresh, small, recipe, seed=0, checkpoint=tmp_path / "c.pt", progress=QUIET,
                  after_epoch=_stop_after(1))  # never called: nothing is trained
    assert again["cached"] and again["curves"] == first["curves"]
    assert evaluate(fresh, small.x_test, small.y_test) == evaluate(trained, small.x_test,
                                                                     small.y_test)
    with pytest.raises(CheckpointMismatchError, match="another configuration"):
        train(_model(2, "resnet"), small, Recipe(epochs=2, batch_size=16, lr=0.05), seed=0,
              checkpoint=tmp_path / "c.pt", progress=QUIET)


def test_evaluate_counts_correct_predictions():
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].long(), 3).float() + 0 * self.w

    x = torch.tensor([[0.0], [1.0], [2.0], [2.0]])
    y = torch.tensor([0, 1, 1, 2])
    loss, acc = evaluate(Fixed(), x, y, batch_size=3)
    assert acc == 0.75
    # cross-entropy of logits one_hot: -log(e / (e + 2)) when right, -log(1 / (e + 2)) when wrong
    import math
    e = math.e
    assert loss == pytest.approx((3 * -math.log(e / (e + 2)) - math.log(1 / (e + 2))) / 4)


def test_recipe_rejects_bad_settings():
    with pytest.raises(ValueError, match="Recipe.epochs must be a positive integer"):
        Recipe(epochs=0)
    with pytest.raises(ValueError, match="Recipe.momentum"):
        Recipe(epochs=1, momentum=1.0)


def test_the_four_models_share_the_resnet_and_match_its_size():
    torch.manual_seed(0)
    resnet = build_resnet((1, 8, 8), 10, width=8, layers=(3, 2, 2, 2))
    x = torch.randn(5, 1, 8, 8)
    n = count_parameters(resnet)
    models = {name: build_model(name, resnet) for name in MODELS}
    assert count_parameters(models["momentum"]) == n
    assert abs(count_parameters(models["revnet"]) - n) / n < 0.02
    assert count_parameters(models["momentum_learned_v0"]) > n  # one more block per stage
    for m in models.values():
        m.eval()
        assert m(x).shape == (5, 10)
    # converted at gamma = 0, the momentum model is the ResNet itself (same weights)
    resnet.eval()
    zero = with_gamma(models["momentum"], 0.0).eval()
    torch.testing.assert_close(zero(x), resnet(x), rtol=1e-5, atol=1e-5)
    # memory-saving backprop: the momentum stages are reversible, and their gradients equal
    # plain autograd's on the same forward (float64, so that round-off does not blur it)
    rev = copy.deepcopy(models["momentum_learned_v0"]).double()
    stage = rev.layer1.momentum
    assert isinstance(stage, mode.MomentumResNet) and stage.reversible
    assert stage.init_velocity is not None
    ref = copy.deepcopy(rev)
    for s in ("layer1", "layer2", "layer3", "layer4"):
        old = ref.get_submodule(s).momentum
        ref.get_submodule(s).momentum = mode.MomentumResNet(
            old.functions, old.gamma, init_velocity=old.init_velocity, reversible=False)
    for m in (rev, ref):
        m.train()
        m(x.double()).pow(2).sum().backward()
    for (k, p), q in zip(rev.named_parameters(), ref.parameters()):
        assert p.grad.abs().max() > 0, k
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10, msg=k)


def test_a_damaged_checkpoint_is_named_and_other_data_or_gamma_do_not_resume(small, tmp_path):
    """A truncated checkpoint gave torch's zip-reader message without the file; a checkpoint
    made on other images with the same labels, or at another gamma, was resumed silently."""
    recipe = Recipe(epochs=2, batch_size=32, lr=0.05)
    path = tmp_path / "c.pt"
    with pytest.raises(Interrupt):
        train(_model(1), small, recipe, seed=0, checkpoint=path, progress=QUIET,
              after_epoch=_stop_after(1))
    good = path.read_bytes()
    for damaged in (good[: len(good) // 2], b""):
        path.write_bytes(damaged)
        with pytest.raises(CorruptCheckpointError, match=str(path)):
            train(_model(1), small, recipe, seed=0, checkpoint=path, progress=QUIET)
    path.write_bytes(good)
    other = dataclasses.replace(small, x_train=small.x_train.flip(0))
    with pytest.raises(CheckpointMismatchError):
        train(_model(1), other, recipe, seed=0, checkpoint=path, progress=QUIET)
    torch.manual_seed(1)
    data = load_dataset("digits")
    at_half = build_model("momentum", build_resnet(data.input_shape, 10, width=4,
                                                   layers=(2, 2, 2, 2)), gamma=0.5)
    with pytest.raises(CheckpointMismatchError):
        train(at_half, small, recipe, seed=0, checkpoint=path, progress=QUIET)
    assert train(_model(1), small, recipe, seed=0, checkpoint=path,
                 progress=QUIET)["resumed_from"] == 1
