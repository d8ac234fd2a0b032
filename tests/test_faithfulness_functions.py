"""What residual functions are and do, against autograd (DESIGN.md section 5): gradients that
alias the incoming gradient, functions with a constant output, functions that modify their
input, hooks that change between forward and backward, trainable tensors the step does not
register. Ground truth: the same model with ``reversible=False``, float64; where autograd's
answer cannot be reproduced, the engine must refuse with the cause."""

import copy

import pytest
import torch
from helpers import REVERSIBLE, REVERSIBLE_IDS, assert_same_grads, seeded_randn, small_mlp
from torch import nn

import mode

D = 6
RIDS = REVERSIBLE_IDS


def gradients(net, x, loss=lambda y: (y ** 2).sum()):
    x = x.clone().requires_grad_(True)
    params = [p for p in net.parameters() if p.requires_grad]
    return torch.autograd.grad(loss(net(x)), [x, *params], allow_unused=True)


def assert_same(a, b, tol=1e-10):
    assert_same_grads(a, b, tol)


class TanhPlusBias(nn.Module):
    """``tanh(x) + b`` with ``b`` of the half-state's shape: d/db of ``<g, phi>`` is ``g``
    itself, which autograd hands back without a copy."""

    def __init__(self, shape):
        super().__init__()
        self.b = nn.Parameter(torch.randn(*shape, dtype=torch.float64))

    def forward(self, x):
        return torch.tanh(x) + self.b


@pytest.mark.parametrize("how", REVERSIBLE, ids=RIDS)
def test_revnet_gradient_that_is_the_incoming_gradient_is_not_overwritten(how):
    """alpha = 1: the gradient of b aliased g[t], which the next coupling updated in place
    (was off by 3 to 9)."""
    torch.manual_seed(0)
    F = [TanhPlusBias((3, D // 2)) for _ in range(3)]
    G = [TanhPlusBias((3, D // 2)) for _ in range(3)]
    ref = mode.RevNet(F, G, reversible=False)
    net = mode.RevNet(copy.deepcopy(F), copy.deepcopy(G), **how)
    assert_same(gradients(net, seeded_randn(3, D)), gradients(ref, seeded_randn(3, D)))


class Constant(nn.Module):
    """A residual function whose output does not depend on anything trainable."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(D, D).double()
        self.register_buffer("c", torch.linspace(-1, 1, D, dtype=torch.float64))

    def forward(self, x):
        if self.kind == "zeros":
            return torch.zeros_like(x)
        if self.kind == "buffer":
            return self.c.expand_as(x)
        with torch.no_grad():
            return torch.tanh(self.lin(x))


@pytest.mark.parametrize("kind", ["zeros", "buffer", "no_grad"])
@pytest.mark.parametrize("how", REVERSIBLE, ids=RIDS)
def test_a_function_with_a_constant_output_adds_no_gradient(kind, how):
    """Its output has no graph: was torch's 'element 0 of tensors does not require grad'."""
    torch.manual_seed(2)
    fs = [small_mlp(D), Constant(kind), small_mlp(D)]
    ref = mode.MomentumResNet(fs, gamma=0.8, reversible=False)
    net = mode.MomentumResNet(copy.deepcopy(fs), gamma=0.8, **how)
    assert_same(gradients(net, seeded_randn(3, D)), gradients(ref, seeded_randn(3, D)))


class InPlaceOnInput(nn.Module):
    def __init__(self, first_relu):
        super().__init__()
        self.first_relu = first_relu
        self.lin = nn.Linear(D, D).double()

    def forward(self, x):
        if self.first_relu:
            x = nn.functional.relu(x, inplace=True)
        else:
            x.mul_(2)
        return torch.tanh(self.lin(x))


@pytest.mark.parametrize("first_relu", [False, True], ids=["mul_", "relu_inplace"])
@pytest.mark.parametrize("arch", ["momentum", "revnet"])
@pytest.mark.parametrize("how", REVERSIBLE, ids=RIDS)
def test_a_function_that_modifies_its_input_is_refused_in_the_forward(first_relu, arch, how):
    """Exact mode computed another function silently (f changed a decoded copy); float mode
    changed the user's leaf and blamed it on a change after the forward."""
    torch.manual_seed(3)
    if arch == "momentum":
        net = mode.MomentumResNet([InPlaceOnInput(first_relu) for _ in range(2)], 0.9, **how)
        x = seeded_randn(3, D)
    else:
        net = mode.RevNet([InPlaceOnInput(first_relu).double() for _ in range(2)],
                          [InPlaceOnInput(first_relu).double() for _ in range(2)], **how)
        x = seeded_randn(3, 2 * D)
    with pytest.raises(RuntimeError, match="modified its input in place"):
        net(x.requires_grad_(True) * 1.0)


@pytest.mark.parametrize("how", REVERSIBLE, ids=RIDS)
def test_in_place_operations_on_intermediate_results_are_fine(how):
    torch.manual_seed(4)
    fs = [nn.Sequential(nn.Linear(D, 8), nn.ReLU(inplace=True), nn.Linear(8, D)).double()
          for _ in range(3)]
    ref = mode.MomentumResNet(fs, gamma=0.9, reversible=False)
    net = mode.MomentumResNet(copy.deepcopy(fs), gamma=0.9, **how)
    assert_same(gradients(net, seeded_randn(3, D)), gradients(ref, seeded_randn(3, D)))


@pytest.mark.parametrize("how", [dict(reversible=False), *REVERSIBLE], ids=["autograd", *RIDS])
def test_a_complex_output_for_a_real_state_is_refused(how):
    net = mode.MomentumResNet([lambda x: x * (1 + 1j)], gamma=0.9, **how)
    with pytest.raises(TypeError, match="must be real"):
        net(seeded_randn(3, D))


def _tripling_hook(module, inputs, output):
    return 3 * output


@pytest.mark.parametrize("change", ["removed", "added", "global"])
@pytest.mark.parametrize("how", REVERSIBLE, ids=RIDS)
def test_hooks_changed_between_forward_and_backward_are_refused(change, how):
    """The recomputation would run other hooks than the forward (float mode was silently off
    by 0.4 to 2)."""
    fs = [small_mlp(D) for _ in range(3)]
    net = mode.MomentumResNet(fs, gamma=0.9, **how)
    handles = [fs[1].register_forward_hook(_tripling_hook)] if change == "removed" else []
    if change == "global":
        handles.append(nn.modules.module.register_module_forward_hook(
            lambda m, i, o: None))
    x = seeded_randn(3, D).requires_grad_(True)
    try:
        y = net(x)
    finally:
        for h in handles:
            h.remove()
    if change == "added":
        handles = [fs[0].register_forward_hook(_tripling_hook)]
    try:
        with pytest.raises(RuntimeError, match="hooks .* were added or removed"):
            y.sum().backward()
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("how", REVERSIBLE, ids=RIDS)
def test_hooks_kept_from_forward_to_backward_give_autograds_gradients(how):
    fs = [small_mlp(D) for _ in range(3)]
    ref_fs = copy.deepcopy(fs)
    for f in (fs[1], ref_fs[1]):
        f.register_forward_hook(_tripling_hook)
    ref = mode.MomentumResNet(ref_fs, gamma=0.9, reversible=False)
    net = mode.MomentumResNet(fs, gamma=0.9, **how)
    assert_same(gradients(net, seeded_randn(3, D)), gradients(ref, seeded_randn(3, D)))


class HooksItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D).double()

    def forward(self, x):
        if x.requires_grad:
            x.register_hook(lambda g: 2 * g)
        return torch.tanh(self.lin(x))


@pytest.mark.parametrize("how", REVERSIBLE, ids=RIDS)
def test_a_tensor_hook_on_the_functions_input_is_refused(how):
    """Autograd calls it with the state's total gradient; the recomputation's leaf sees phi's
    share only (was silently off by 6)."""
    net = mode.MomentumResNet([HooksItsInput() for _ in range(2)], gamma=0.9, **how)
    y = net(seeded_randn(3, D).requires_grad_(True) * 1.0)
    with pytest.raises(RuntimeError, match="registered a hook on its input"):
        y.sum().backward()


class Switch(nn.Module):
    """Uses the unregistered tensor ``w`` only once ``on`` is set."""

    def __init__(self, w):
        super().__init__()
        self.lin = nn.Linear(D, D).double()
        self.w = [w]  # hidden from the module tree
        self.on = False

    def forward(self, x):
        y = self.lin(x)
        return torch.tanh(y * self.w[0] if self.on else y)


@pytest.mark.parametrize("later", ["unfrozen", "branch"])
@pytest.mark.parametrize("how", REVERSIBLE, ids=RIDS)
def test_an_unregistered_tensor_is_refused_at_every_backward(later, how):
    """The check ran at a step's first backward only (a cache on the step): a tensor that
    became trainable, or a branch first taken, later got no gradient and no error."""
    w = torch.tensor(1.5, dtype=torch.float64, requires_grad=later == "branch")
    fs = [Switch(w) for _ in range(2)]
    for f in fs:
        f.on = later == "unfrozen"
    net = mode.MomentumResNet(fs, gamma=0.9, **how)
    net(seeded_randn(3, D).requires_grad_(True)).sum().backward()  # nothing hidden trains yet
    if later == "unfrozen":
        w.requires_grad_(True)
    else:
        for f in fs:
            f.on = True
    y = net(seeded_randn(3, D).requires_grad_(True))
    with pytest.raises(ValueError, match="would receive no gradient"):
        y.sum().backward()


def test_a_parameter_of_another_module_is_named_as_such():
    shared = nn.Linear(D, D).double()
    holder = [shared]
    net = mode.MomentumResNet([lambda x: torch.tanh(holder[0](x))], gamma=0.9)
    with pytest.raises(ValueError, match="nn.Parameter that is not registered in the step"):
        net(seeded_randn(3, D).requires_grad_(True)).sum().backward()


class Counted(nn.Module):
    """Scales by a buffer that its forward reads and then updates (a step counter)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D // 2, D // 2).double()
        self.register_buffer("calls", torch.ones((), dtype=torch.float64))

    def forward(self, x):
        y = torch.tanh(self.lin(x)) * (self.calls + 0)  # (autograd saves the sum)
        self.calls.add_(1)
        return y


@pytest.mark.parametrize("what", ["dropout", "buffer"])
@pytest.mark.parametrize("how", REVERSIBLE, ids=RIDS)
def test_two_couplings_of_one_step_each_replay_their_own_state(what, how):
    """A RevNet step's F and G draw their own dropout masks (or one module updates a buffer
    in both): the forward recorded the RNG state and buffers once per step, and the backward,
    which undoes G before F, gave G F's masks (float gradients off by 21; exact raised)."""
    torch.manual_seed(5)
    if what == "dropout":
        make = lambda: nn.Sequential(nn.Linear(D // 2, D // 2), nn.Dropout(0.5)).double()  # noqa: E731
        F, G = [make() for _ in range(2)], [make() for _ in range(2)]
    else:
        shared = [Counted() for _ in range(2)]
        F, G = shared, shared
    out = []
    for opts in (dict(reversible=False), how):
        net = mode.RevNet(*copy.deepcopy((F, G)), **opts)  # (one copy: the sharing kept)
        torch.manual_seed(7)
        x = seeded_randn(3, D).requires_grad_(True)
        (net(x) ** 2).sum().backward()
        out.append([x.grad, *(p.grad for p in net.parameters()), *net.buffers()])
    assert_same(out[1], out[0])
