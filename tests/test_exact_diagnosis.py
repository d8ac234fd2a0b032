"""Exact mode tells apart the causes of a failed reconstruction (DESIGN.md section 5): it
names the step where the reconstruction departs from the forward and whether the residual
function there is non-deterministic or depends on hidden state, and it returns no gradient.
Ground truth: which step the test made faulty, and how."""

import pytest
import torch
from torch import nn

import mode
from mode.reversible import FINGERPRINT_SIZE

D = 16
BATCH = 16  # 256 scalars per slot: the fingerprint samples FINGERPRINT_SIZE of them
DEPTH = 5


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D).double()

    def forward(self, x):
        return torch.tanh(self.lin(x))


class Counter(Plain):
    """Hidden state it changes itself: every call scales the output by its call count."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x) * (1 + 1e-3 * self.calls)


class Noisy(Plain):
    """Fresh noise from a private generator at ``where`` (all positions by default): a
    stand-in for a non-deterministic kernel; replaying the global RNG cannot fix it."""

    def __init__(self, where=None):
        super().__init__()
        self.gen = torch.Generator().manual_seed(0)
        self.where = where

    def forward(self, x):
        noise = 1e-6 * torch.randn(x.shape, generator=self.gen, dtype=x.dtype)
        if self.where is not None:
            mask = torch.zeros(x.numel(), dtype=x.dtype)
            mask[self.where] = 1.0
            noise = noise * mask.view(x.shape)
        return super().forward(x) + noise


class Scaled(Plain):
    """Reads a Python attribute it never changes (a user may change it between passes)."""

    def __init__(self):
        super().__init__()
        self.factor = 1.0

    def forward(self, x):
        return super().forward(x) * self.factor


def net_with(j, faulty):
    torch.manual_seed(0)
    functions = [faulty if i == j else Plain() for i in range(DEPTH)]
    return mode.MomentumResNet(functions, 0.9, exact=True)


def x_of():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, D, generator=g, dtype=torch.float64, requires_grad=True)


def backward_error(net, before_backward=None):
    x = x_of()
    loss = net(x).pow(2).sum()
    if before_backward is not None:
        before_backward()
    with pytest.raises(RuntimeError) as err:
        loss.backward()
    assert x.grad is None and all(p.grad is None for p in net.parameters())  # none returned
    return str(err.value)


def test_state_is_larger_than_the_fingerprint():
    assert BATCH * D > FINGERPRINT_SIZE  # the tests below exercise sampled positions


@pytest.mark.parametrize("j", [2, 4])
def test_hidden_counter_is_named_with_its_step(j):
    counter = Counter()
    said = backward_error(net_with(j, counter))
    assert f"departs from the forward at step {j} (MomentumStep, residual function Counter)" \
        in said
    assert "hidden state" in said and "'calls' of Counter" in said
    assert "non-deterministic" not in said
    assert counter.calls == 2  # forward and backward: the diagnosis put its own calls back


def test_hidden_counter_is_named_by_inverse():
    counter = Counter()
    net = net_with(1, counter)
    with torch.no_grad():
        out = net(x_of(), return_velocity=True)
    with pytest.raises(RuntimeError, match=r"at step 1 \(MomentumStep, residual function "
                                           r"Counter\).*hidden state.*'calls' of Counter"):
        net.inverse(*out)


def test_private_generator_is_non_deterministic():
    said = backward_error(net_with(3, Noisy()))
    assert "departs from the forward at step 3 (MomentumStep, residual function Noisy)" in said
    assert "non-deterministic kernel" in said and "hidden state" not in said
    for fix in ("torch.use_deterministic_algorithms(True)",
                "torch.backends.cudnn.benchmark = False", "CUBLAS_WORKSPACE_CONFIG"):
        assert fix in said


def test_attribute_changed_between_forward_and_backward():
    scaled = Scaled()

    def change():
        scaled.factor = 1.5

    said = backward_error(net_with(1, scaled), change)
    assert "departs from the forward at step 1 (MomentumStep, residual function Scaled)" in said
    assert "changed after the forward" in said
    assert "non-deterministic" not in said and "hidden state" not in said


def test_difference_outside_the_sampled_positions_is_still_classified():
    """Noise at one position that the fingerprint does not sample, in the first step, whose
    inversion is elementwise there: the step cannot be located, but the cause is found."""
    said = backward_error(net_with(0, Noisy(where=1)))  # positions sampled: 0, 2, 4, ...
    assert "is not known" in said
    assert "step 0 (MomentumStep, residual function Noisy)" in said
    assert "non-deterministic kernel" in said


def test_modified_parameter_keeps_the_version_message():
    net = net_with(2, Plain())
    weight = net.functions[2].lin.weight

    def modify():
        with torch.no_grad():
            weight.add_(1e-3)

    said = backward_error(net, modify)
    assert "parameter 'weight' of Linear" in said and "modified in place" in said
    assert "reconstruction" not in said


def test_a_correct_chain_raises_nothing():
    """The checks fire on faults only: a plain chain's exact gradient is autograd's."""
    net = net_with(0, Plain())
    grads = []
    for exact in (True, False):
        model = mode.MomentumResNet(net.functions, 0.9, exact=exact, reversible=exact)
        x = x_of()
        model(x).pow(2).sum().backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-9, atol=1e-12)
