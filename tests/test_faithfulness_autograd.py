"""The reversible engine under autograd's own API (DESIGN.md section 5): backward inside
inference mode, outputs nothing used, forward-mode AD and batched gradients, in-place changes
of the outputs, reentrant checkpoints inside f, threads. Ground truth: the same model with
``reversible=False``, float64; where autograd's answer cannot be reproduced, the engine must
refuse with the cause."""

import copy
import threading

import pytest
import torch
from helpers import REVERSIBLE, REVERSIBLE_IDS, assert_same_grads, seeded_randn, small_mlp
from torch import nn

import mode

D = 6
RIDS = REVERSIBLE_IDS


def nets(how, depth=3, seed=0):
    torch.manual_seed(seed)
    fs = [small_mlp(D) for _ in range(depth)]
    return (mode.MomentumResNet(fs, gamma=0.9, reversible=False),
            mode.MomentumResNet(copy.deepcopy(fs), gamma=0.9, **how))


@pytest.mark.parametrize("how", REVERSIBLE, ids=RIDS)
def test_backward_inside_inference_mode_equals_autograd(how):
    """Autograd's backward ignores inference mode; the recomputation's enable_grad does not
    lift it (was torch's 'does not require grad', then a silently wrong gradient)."""
    out = []
    for net in nets(how):
        x = seeded_randn(3, D).requires_grad_(True)
        loss = (net(x) ** 2).sum()
        with torch.inference_mode():
            loss.backward()
        out.append([x.grad, *(p.grad for p in net.parameters())])
    assert_same_grads(*out, tol=1e-10)


@pytest.mark.parametrize("how", [dict(reversible=False), *REVERSIBLE],
                         ids=["autograd", *RIDS])
def test_a_function_that_feeds_only_an_unused_output_gets_no_gradient(how):
    """HamiltonianNet returns Y_N: its last G only feeds Z_N. Autograd leaves that G's
    gradients None (weight decay then leaves it alone); the engine wrote zeros."""
    torch.manual_seed(0)
    net = mode.HamiltonianNet.dense(D, 3, 0.5, **how).double()
    x = seeded_randn(3, D).requires_grad_(True)
    (net(x) ** 2).sum().backward()
    assert all(p.grad is None for p in net.G_functions[-1].parameters())
    assert all(p.grad is not None for p in net.F_functions[-1].parameters())


@pytest.mark.parametrize("how", REVERSIBLE, ids=RIDS)
def test_unused_outputs_give_autograds_gradients(how):
    """A loss on v_N alone (x_N unused), and on the HamiltonianNet: the skipped couplings are
    still reconstructed, so every gradient that autograd gives is there."""
    ref, net = nets(how)
    out = []
    for m in (ref, net):
        x = seeded_randn(3, D).requires_grad_(True)
        _, v = m(x, return_velocity=True)
        out.append(torch.autograd.grad((v ** 2).sum(), [x, *m.parameters()]))
    assert_same_grads(*out, tol=1e-10)
    torch.manual_seed(0)
    ref = mode.HamiltonianNet.dense(D, 3, 0.5, reversible=False).double()
    net = copy.deepcopy(ref)
    net.reversible, net.exact = True, bool(how)
    out = []
    for m in (ref, net):
        x = seeded_randn(3, D).requires_grad_(True)
        ps = [p for f in m.F_functions for p in f.parameters()]
        out.append(torch.autograd.grad((m(x) ** 2).sum(), [x, *ps]))
    assert_same_grads(*out, tol=1e-10)


@pytest.mark.parametrize("how", REVERSIBLE, ids=RIDS)
def test_forward_mode_ad_is_refused(how):
    """A dual parameter (functional_call) lost its tangent silently; a dual input met torch's
    'implement the jvp function'."""
    import torch.autograd.forward_ad as fwad

    _, net = nets(how)
    name, p = next(iter(net.named_parameters()))
    with fwad.dual_level():
        dual = fwad.make_dual(p.detach(), torch.ones_like(p))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            torch.func.functional_call(net, {name: dual}, (seeded_randn(3, D),))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            net(fwad.make_dual(seeded_randn(3, D), torch.ones(3, D, dtype=torch.float64)))


@pytest.mark.parametrize("how", REVERSIBLE, ids=RIDS)
def test_batched_gradients_are_refused(how):
    _, net = nets(how)
    x = seeded_randn(3, D).requires_grad_(True)
    y = net(x)
    eye = torch.eye(3 * D, dtype=torch.float64).reshape(3 * D, 3, D)
    with pytest.raises(RuntimeError, match="batched gradients"):
        torch.autograd.grad(y, x, eye, is_grads_batched=True)


class ReentrantCheckpoint(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = small_mlp(D)

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.f, x, use_reentrant=True)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("how", REVERSIBLE, ids=RIDS)
def test_reentrant_checkpoint_inside_f_is_refused_with_the_way_out(how):
    net = mode.MomentumResNet([ReentrantCheckpoint() for _ in range(2)], 0.9, **how)
    y = net(seeded_randn(3, D).requires_grad_(True))
    with pytest.raises(RuntimeError, match="cannot run inside the reversible backward"):
        y.sum().backward()


def test_a_float_output_modified_in_place_is_refused_with_the_cause():
    """Float mode reconstructs from its output (was torch's message naming an internal node);
    exact mode keeps its own copy and gives autograd's gradient."""
    ref, net = nets(dict())
    y = net(seeded_randn(3, D).requires_grad_(True))
    y.add_(1)
    with pytest.raises(RuntimeError, match="modified in place before the backward"):
        (y ** 2).sum().backward()
    ref, exact = nets(dict(exact=True))
    out = []
    for m in (ref, exact):
        x = seeded_randn(3, D).requires_grad_(True)
        y = m(x)
        y.add_(1)
        out.append(torch.autograd.grad((y ** 2).sum(), [x, *m.parameters()]))
    assert_same_grads(*out, tol=1e-10)


@pytest.mark.parametrize("how", REVERSIBLE, ids=RIDS)
def test_one_network_on_several_threads_is_refused_never_corrupted(how):
    """The backward installs the forward's parameters into the modules: interleaved calls on
    threads restored each other's tensors (every Parameter replaced by a plain tensor,
    gradients lost). Now each call either completes, with autograd's gradient, or is refused;
    the modules keep their Parameters."""
    ref, net = nets(how, depth=6)
    params = list(net.parameters())
    n, rounds = 4, 6
    done, errors = [], []
    barrier = threading.Barrier(n)

    def work(k):
        barrier.wait()
        for r in range(rounds):
            try:
                x = seeded_randn(3, D, seed=10 * k + r).requires_grad_(True)
                (net(x) ** 2).sum().backward()
                done.append(10 * k + r)
            except RuntimeError as e:
                errors.append(str(e))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all("on another thread" in e for e in errors), errors[:1]
    assert [p for p in net.parameters()] == params
    assert all(type(p) is nn.Parameter for p in net.parameters())
    for x in (seeded_randn(3, D, seed=s).requires_grad_(True) for s in done):
        (ref(x) ** 2).sum().backward()
    for p, q in zip(net.parameters(), ref.parameters()):
        if q.grad is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("how", REVERSIBLE, ids=RIDS)
def test_hooks_on_the_returned_velocity_are_refused_and_on_the_position_kept(how):
    """x_N = x_{N-1} + v_N: autograd hands a hook on v_N its total gradient, through x_N too;
    the chain's node returns the two as separate outputs (a zeroing hook on v_N changed the
    parameters' gradients by 0.4, silently). A hook on x_N sees what autograd's sees."""
    ref, net = nets(how)
    y, v = net(seeded_randn(3, D).requires_grad_(True), return_velocity=True)
    v.register_hook(torch.zeros_like)
    with pytest.raises(RuntimeError, match="total gradient"):
        (y.sum() + v.sum()).backward()
    y, v = net(seeded_randn(3, D).requires_grad_(True), return_velocity=True)
    v.retain_grad()
    with pytest.raises(RuntimeError, match="total gradient"):
        (y.sum() + v.sum()).backward()
    out = []
    for m in (ref, net):
        x = seeded_randn(3, D).requires_grad_(True)
        y, v = m(x, return_velocity=True)
        y.register_hook(lambda g: 2 * g)
        out.append(torch.autograd.grad((y ** 2).sum() + v.sum(), [x, *m.parameters()]))
    assert_same_grads(*out, tol=1e-10)
