"""What the reversible backward holds while it runs, counted allocation by allocation, and the
autograd behaviours that the handoff of the forward's record must keep (retain_graph, in-place
checks)."""

import pytest
import torch
from torch import nn

import mode
from experiments.memory_meter import measure_peak
from mode.reversible import integrate
from mode.steps import Coupling, ReversibleStep

N = 2**18  # scalars per state: one "map" is N float64 values
MAP = 8 * N
MARK_PHI, MARK_BACKWARD = 999_001, 999_002  # marker allocations (bytes) in the timeline


class _Tanh(nn.Module):
    """phi(x) = tanh(x), marking the timeline at each recomputation in the backward."""

    def forward(self, x):
        if torch.is_grad_enabled():
            torch.empty(MARK_PHI, dtype=torch.uint8)
        return torch.tanh(x)


def _levels_at_marks(exact: bool):
    net = mode.MomentumResNet([_Tanh() for _ in range(6)], 0.5, exact=exact)
    x = torch.randn(N, dtype=torch.float64, requires_grad=True)

    def work():
        loss = net(x).sum()  # the output pair is dropped: only the graph holds what it saved
        torch.empty(MARK_BACKWARD, dtype=torch.uint8)
        loss.backward()

    _, peak = measure_peak(work, timeline=True)
    levels = [level for _, level in peak.timeline]
    steps = [b - a for a, b in zip([0, *levels], levels)]
    marks = [(d, (levels[i] - d) / MAP) for i, d in enumerate(steps)
             if d in (MARK_PHI, MARK_BACKWARD)]
    return marks, peak.bytes / MAP


@pytest.mark.parametrize("exact", [False, True])
def test_backward_holds_one_state_pair_and_one_gradient_pair(exact):
    """Before the backward, the graph holds the output pair (exact: the int64 fixed-point pair
    and one byte of buffer per scalar: six pushes in base 2 stay below 2^8). At every
    recomputation it holds the state pair being reconstructed and the gradient pair (exact: and
    the decoded input of phi), never the output pair or the incoming gradient beside them: the
    handoff node frees them, and the gradients are updated in place."""
    from mode.reversible import FINGERPRINT_SIZE

    marks, _ = _levels_at_marks(exact)
    words = 1 / 8 if exact else 0.0
    # exact mode's per-step fingerprints (mode.reversible._Fingerprints): 2 x FINGERPRINT_SIZE
    # float64 per step and at the start, and their index; the backward records as many again
    fingerprints = ((6 + 1) * 2 + 1) * FINGERPRINT_SIZE * 8 / MAP if exact else 0.0
    assert marks[0] == (MARK_BACKWARD, pytest.approx(2 + words + fingerprints, abs=1e-4))
    during = [level for kind, level in marks[1:] if kind == MARK_PHI]
    assert len(during) == 6
    want = 2 + 2 + (1 if exact else 0) + words + fingerprints
    for level in during:
        assert want - 1e-4 <= level <= want + fingerprints + 1e-4


def _net(exact: bool, reversible: bool = True):
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 6)) for _ in range(4)]
    return mode.MomentumResNet(layers, 0.8, reversible=reversible, exact=exact).double()


@pytest.mark.parametrize("exact", [False, True])
def test_retain_graph_twice_equals_autograd(exact):
    """Two backward passes through one graph (retain_graph=True, as for two losses on a shared
    trunk): the handoff node keeps its saved record for the second."""
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    grads = {}
    for reversible in (False, True):
        net = _net(exact and reversible, reversible)
        out = net(x)
        first = torch.autograd.grad((out ** 2).sum(), [x, *net.parameters()], retain_graph=True)
        second = torch.autograd.grad(out.sin().sum(), [x, *net.parameters()])
        grads[reversible] = (first, second)
    for a, b in zip(grads[False], grads[True]):
        for ga, gb in zip(a, b):
            torch.testing.assert_close(gb, ga, rtol=1e-9, atol=1e-11)


def test_output_modified_in_place_is_refused_at_backward_in_float_mode():
    """Float reconstruction starts from the outputs, which are the chain's own tensors (not
    views): autograd checks them, as it checks any tensor it saved."""
    net = _net(False)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    out = net(x)
    loss = out.sum()
    with torch.no_grad():
        out.mul_(2)
    assert out._base is None
    with pytest.raises(RuntimeError, match="modified in place before the backward"):
        loss.backward()


def test_output_modified_in_place_does_not_change_exact_gradients():
    """Exact reconstruction starts from the fixed-point record, not from the returned floats:
    modifying them after the loss is computed changes nothing, as under autograd (whose last
    operation, an addition, saves nothing)."""
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64)
    grads = {}
    for reversible in (False, True):
        net = _net(reversible, reversible)
        out = net(x)
        loss = (out * w).sum()  # saves w, not out
        with torch.no_grad():
            out.mul_(2)
        grads[reversible] = torch.autograd.grad(loss, [x, *net.parameters()])
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


class _BiasStep(ReversibleStep):
    """``s0 <- s0 / 2 + (s1 + b)``, ``s1 <- s1 + s0``: d/db of the first coupling is the
    incoming gradient of ``s0`` itself (autograd returns that very tensor)."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.randn(5, 6, dtype=torch.float64))

    def _phi(self, x):
        return x + self.b

    def couplings(self):
        return (Coupling(0, alpha=0.5, phi=self._phi), Coupling(1, shift=1))


def test_a_parameter_gradient_that_is_the_grad_output_is_not_scaled_later():
    """The gradient pair is scaled in place after each VJP; a parameter gradient that is the
    grad output itself must be kept as it was."""
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.arange(30.0, dtype=torch.float64).view(5, 6)
    torch.manual_seed(1)
    steps = [_BiasStep() for _ in range(3)]
    got = {}
    for reversible in (False, True):
        out = integrate(steps, (x, 0.3 * x), reversible=reversible)
        got[reversible] = torch.autograd.grad((out[0] * w).sum() + out[1].sum(),
                                              [x, *(s.b for s in steps)])
    for a, b in zip(got[False], got[True]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("graph", [False, True])
def test_exact_inverse_reads_the_record_and_never_writes_it(graph):
    """The inverse computes in place only in what it made: two inversions of one forward give
    the same bits, and a backward after them still returns autograd's gradients."""
    net = _net(True)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=graph)
    with torch.set_grad_enabled(graph):
        xN, vN = net(x, return_velocity=True)
    with torch.no_grad():
        first, second = net.inverse(xN, vN)[0], net.inverse(xN, vN)[0]
    assert torch.equal(first, second)
    # x itself up to its encoding on the 2^-48 grid of float64 exact mode
    torch.testing.assert_close(first, x.detach(), rtol=0, atol=2.0**-48)
    if graph:
        got = torch.autograd.grad((xN * vN).sum(), [x, *net.parameters()])
        ref = _net(False, reversible=False)
        xr, vr = ref(x, return_velocity=True)
        want = torch.autograd.grad((xr * vr).sum(), [x, *ref.parameters()])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
