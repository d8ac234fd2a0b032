"""RevNet, Hamiltonian, midpoint, leapfrog and m-RevNet networks on the shared engine.

Ground truth: the update rules written out by hand with the layers' own weights (DESIGN.md
section 1), plain autograd, float64 ``gradcheck``, central finite differences, and the closed-form
Jacobian determinants (+1 or (-1)^d for the volume-preserving steps, gamma^d with momentum).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import mode
from mode.networks.coupled import (
    ActivatedLayer,
    HamiltonianNet,
    HamiltonianStep,
    LeapfrogNet,
    LeapfrogStep,
    MidpointNet,
    MidpointStep,
    MRevNet,
    MRevStep,
    RevNet,
    RevNetStep,
    TransposedActivatedLayer,
)
from mode.reversible import ReconstructionWarning

DT = torch.float64


H = 0.3
GAMMA = 0.8


class Scaled(nn.Module):
    """``f(y, c) = c * layer(y)``: a residual function with an extra tensor argument."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, y, c):
        return c * self.layer(y)


def kt_sigma_k(layer: TransposedActivatedLayer, y):
    """``K^T tanh(K y + b)`` written with the layer's raw weight (rows of y are vectors)."""
    return torch.tanh(y @ layer.weight.T + layer.bias) @ layer.weight


def sigma_k(layer: ActivatedLayer, y):
    return torch.tanh(y @ layer.weight.T + layer.bias)


# --------------------------------------------------------------------------------------------
# one description per architecture: build, run (pair in, pair out), invert, reference


def build(arch: str, depth: int = 3, *, reversible=True, exact=False, seed=0, width=4):
    torch.manual_seed(seed)
    opts = dict(reversible=reversible, exact=exact)
    if arch == "revnet":
        # each half of the channel split has `width` features
        net = RevNet([Scaled(TransposedActivatedLayer(width, 3)) for _ in range(depth)],
                     [Scaled(TransposedActivatedLayer(width, 3)) for _ in range(depth)], **opts)
    elif arch == "hamiltonian":
        net = HamiltonianNet([Scaled(TransposedActivatedLayer(width, 5)) for _ in range(depth)],
                             [Scaled(TransposedActivatedLayer(width, 5)) for _ in range(depth)],
                             H, **opts)
    elif arch == "midpoint":
        net = MidpointNet([Scaled(ActivatedLayer(width)) for _ in range(depth)], H, **opts)
    elif arch == "leapfrog":
        net = LeapfrogNet([Scaled(TransposedActivatedLayer(width, 5)) for _ in range(depth)], H,
                          **opts)
    elif arch == "mrevnet":
        net = MRevNet([Scaled(TransposedActivatedLayer(width, 5)) for _ in range(depth)], GAMMA,
                      **opts)
    else:  # pragma: no cover
        raise AssertionError(arch)
    return net.to(DT)


ARCHS = ["revnet", "hamiltonian", "midpoint", "leapfrog", "mrevnet"]


def run(arch, net, s0, s1, c):
    """Output pair from an input pair (RevNet: the two halves of its channel split)."""
    if arch == "revnet":
        y = net(torch.cat([s0, s1], dim=1), c)
        return tuple(torch.chunk(y, 2, dim=1))
    if arch == "hamiltonian":
        return net(s0, c, z0=s1, return_pair=True)
    if arch in ("midpoint", "leapfrog"):
        return net(s1, c, y_prev=s0, return_pair=True)
    return net(s0, c, v0=s1, return_velocity=True)


def reference(arch, net, s0, s1, c):
    """The update rule of DESIGN.md, by hand."""
    if arch == "revnet":
        for f, g in zip(net.F_functions, net.G_functions):
            s0 = s0 + c * kt_sigma_k(f.layer, s1)
            s1 = s1 + c * kt_sigma_k(g.layer, s0)
        return s0, s1
    if arch == "hamiltonian":
        y, z = s0, s1
        for f, g in zip(net.F_functions, net.G_functions):
            y = y + H * c * kt_sigma_k(f.layer, z)
            z = z - H * c * kt_sigma_k(g.layer, y)
        return y, z
    if arch == "midpoint":
        prev, cur = s0, s1
        for f in net.functions:
            prev, cur = cur, prev + 2 * H * c * sigma_k(f.layer, cur)
        return prev, cur
    if arch == "leapfrog":
        prev, cur = s0, s1
        for f in net.functions:
            prev, cur = cur, 2 * cur - prev - H**2 * c * kt_sigma_k(f.layer, cur)
        return prev, cur
    x, v = s0, s1
    for f in net.functions:
        v = GAMMA * v + c * kt_sigma_k(f.layer, x)
        x = x + v
    return x, v


def invert(arch, net, out, c):
    if arch == "revnet":
        x = net.inverse(out, c)
        return tuple(torch.chunk(x, 2, dim=1))
    return net.inverse(*out, c)


def inputs(width=4, batch=3, seed=1, dyadic=False):
    g = torch.Generator().manual_seed(seed)
    s0, s1 = (torch.randn(batch, width, generator=g, dtype=DT) for _ in range(2))
    c = torch.tensor(0.9, dtype=DT)
    if dyadic:  # exactly representable in fixed point with 32 fractional bits
        s0, s1 = (torch.round(s * 2**20) / 2**20 for s in (s0, s1))
    return s0, s1, c


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("reversible", [True, False])
def test_forward_is_the_update_rule(arch, reversible):
    net = build(arch, reversible=reversible)
    s0, s1, c = inputs()
    out = run(arch, net, s0, s1, c)
    ref = reference(arch, net, s0, s1, c)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("arch", ARCHS)
def test_inverse_round_trip_float(arch):
    net = build(arch, depth=4)
    s0, s1, c = inputs()
    with torch.no_grad():
        back = invert(arch, net, run(arch, net, s0, s1, c) if arch != "revnet"
                      else net(torch.cat([s0, s1], 1), c), c)
    torch.testing.assert_close(back[0], s0, rtol=0, atol=1e-12)
    torch.testing.assert_close(back[1], s1, rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
def test_inverse_round_trip_exact_is_bit_exact(arch):
    net = build(arch, depth=6, exact=True)
    s0, s1, c = inputs(dyadic=True)
    with torch.no_grad():
        out = (net(torch.cat([s0, s1], 1), c) if arch == "revnet"
               else run(arch, net, s0, s1, c))
        back = invert(arch, net, out, c)
    assert torch.equal(back[0], s0) and torch.equal(back[1], s1)


def test_exact_mrevnet_survives_where_float_reversal_drifts():
    # gamma = 0.5, 60 layers: float reversal amplifies rounding by 2^60 ~ 1e18.
    torch.manual_seed(0)
    fs = [Scaled(TransposedActivatedLayer(4, 5)) for _ in range(60)]
    x0, _, c = inputs(dyadic=True)
    exact = MRevNet(fs, 0.5, exact=True).to(DT)
    with torch.no_grad():
        back = exact.inverse(*exact(x0, c, return_velocity=True), c)
    assert torch.equal(back[0], x0) and torch.equal(back[1], torch.zeros_like(x0))
    floating = MRevNet(fs, 0.5).to(DT)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ReconstructionWarning)
        back = floating.inverse(*floating(x0, c, return_velocity=True), c)
    assert (back[0] - x0).abs().max() > 1e-6


def _grads(arch, net, s0, s1, c, w0, w1):
    s0, s1, c = (t.detach().clone().requires_grad_(True) for t in (s0, s1, c))
    out = run(arch, net, s0, s1, c)
    ((out[0] * w0).sum() + (out[1] * w1).sum()).backward()
    return [s0.grad, s1.grad, c.grad] + [p.grad for p in net.parameters()]


@pytest.mark.parametrize("arch", ARCHS)
def test_reversible_gradients_equal_autograd(arch):
    s0, s1, c = inputs()
    w0, w1 = torch.randn_like(s0), torch.randn_like(s1)
    plain = _grads(arch, build(arch, depth=4, reversible=False), s0, s1, c, w0, w1)
    rev = _grads(arch, build(arch, depth=4, reversible=True), s0, s1, c, w0, w1)
    assert len(plain) == len(rev) > 3
    for a, b in zip(rev, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # exact mode: the forward is rounded to 2^-32, so gradients agree to that resolution
    exact = _grads(arch, build(arch, depth=4, exact=True), s0, s1, c, w0, w1)
    for a, b in zip(exact, plain):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradcheck_inputs_and_parameters(arch):
    net = build(arch, depth=2, width=2)
    s0, s1, c = inputs(width=2, batch=1)

    def f(a, b, cc):
        return run(arch, net, a, b, cc)

    args = tuple(t.clone().requires_grad_(True) for t in (s0, s1, c))
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-8)

    # parameters: reversible gradient against a central finite difference along a direction
    params = list(net.parameters())
    dirs = [torch.randn_like(p) for p in params]
    w = torch.randn_like(s0)

    def loss():
        out = run(arch, net, s0, s1, c)
        return (out[0] * w).sum() + out[1].square().sum()

    net.zero_grad()
    loss().backward()
    analytic = sum((p.grad * d).sum() for p, d in zip(params, dirs))
    delta = 1e-6
    with torch.no_grad():
        for p, d in zip(params, dirs):
            p.add_(delta * d)
        up = loss()
        for p, d in zip(params, dirs):
            p.sub_(2 * delta * d)
        down = loss()
        for p, d in zip(params, dirs):
            p.add_(delta * d)
    torch.testing.assert_close(analytic, (up - down) / (2 * delta), rtol=1e-6, atol=1e-8)


def _step_jacobian_det(step, width=3):
    """det of the Jacobian of one step on the flattened pair, via the reversible engine."""
    step = step.to(DT)

    def flat(z):
        s = mode.reversible.integrate([step], (z[:width], z[width:]), reversible=True)
        return torch.cat(s)

    z = torch.randn(2 * width, dtype=DT)
    jac = torch.autograd.functional.jacobian(flat, z)
    return torch.linalg.det(jac).item()


def test_jacobian_determinants_of_one_step():
    torch.manual_seed(3)
    d = 3
    lay = lambda: TransposedActivatedLayer(d, 4)  # noqa: E731
    assert _step_jacobian_det(RevNetStep(lay(), lay()), d) == pytest.approx(1.0, abs=1e-12)
    assert _step_jacobian_det(HamiltonianStep(lay(), lay(), 0.7), d) == pytest.approx(
        1.0, abs=1e-12)
    assert _step_jacobian_det(MidpointStep(ActivatedLayer(d), 0.7), d) == pytest.approx(
        (-1.0) ** d, abs=1e-12)
    assert _step_jacobian_det(MidpointStep(ActivatedLayer(4), 0.7), 4) == pytest.approx(
        1.0, abs=1e-12)
    assert _step_jacobian_det(LeapfrogStep(lay(), 0.7), d) == pytest.approx(1.0, abs=1e-12)
    for gamma in (0.9, 0.5):
        assert _step_jacobian_det(MRevStep(lay(), gamma), d) == pytest.approx(
            gamma**d, rel=1e-12)
        assert _step_jacobian_det(mode.MomentumStep(lay(), gamma), d) == pytest.approx(
            gamma**d, rel=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
def test_trajectory_starts_at_input_and_ends_at_output(arch):
    net = build(arch)
    s0, s1, c = inputs()
    if arch == "revnet":
        x = torch.cat([s0, s1], 1)
        traj = net.trajectory(x, c)
        assert traj.shape == (4, *x.shape)
        torch.testing.assert_close(traj[0], x, rtol=0, atol=0)
        torch.testing.assert_close(traj[-1], net(x, c), rtol=1e-13, atol=1e-13)
        return
    out = run(arch, net, s0, s1, c)
    if arch == "hamiltonian":
        ys, zs = net.trajectory(s0, c, z0=s1, return_pair=True)
        first = (s0, s1)
    elif arch == "mrevnet":
        ys, zs = net.trajectory(s0, c, v0=s1, return_velocity=True)
        first = (s0, s1)
    else:
        ys, zs = net.trajectory(s1, c, y_prev=s0, return_pair=True)
        first = (s0, s1)
    assert ys.shape == zs.shape == (4, *s0.shape)
    torch.testing.assert_close((ys[0], zs[0]), first, rtol=0, atol=0)
    torch.testing.assert_close((ys[-1], zs[-1]), tuple(out), rtol=1e-13, atol=1e-13)


def test_default_initial_pairs():
    s0, _, c = inputs()
    ham = build("hamiltonian")
    torch.testing.assert_close(ham(s0, c), reference("hamiltonian", ham, s0, 0 * s0, c)[0])
    for arch in ("midpoint", "leapfrog"):
        net = build(arch)
        torch.testing.assert_close(net(s0, c), reference(arch, net, s0, s0, c)[1])
    mrev = build("mrevnet")
    torch.testing.assert_close(mrev(s0, c), reference("mrevnet", mrev, s0, 0 * s0, c)[0])


def test_mrevnet_is_a_rescaled_momentum_resnet():
    torch.manual_seed(0)
    layers = [TransposedActivatedLayer(4, 5).to(DT) for _ in range(5)]
    x0 = torch.randn(3, 4, dtype=DT)
    v0 = torch.randn(3, 4, dtype=DT)
    gamma = 0.7
    mrev = MRevNet(layers, gamma)
    mom = mode.MomentumResNet([lambda x, f=f: f(x) / (1 - gamma) for f in layers], gamma,
                              reversible=False)
    torch.testing.assert_close(mrev(x0, v0=v0, return_velocity=True),
                               mom(x0, v0=v0, return_velocity=True), rtol=1e-13, atol=1e-13)
    # gamma = 1: the undamped rule x_{j+1} = 2 x_j - x_{j-1} + f(x_j)
    one = MRevNet(layers, 1.0)
    prev, cur = x0 - v0, x0
    for f in layers:
        prev, cur = cur, 2 * cur - prev + f(cur)
    torch.testing.assert_close(one(x0, v0=v0), cur, rtol=1e-12, atol=1e-12)


def test_mrevnet_learned_gamma_gradient():
    torch.manual_seed(0)
    x0 = torch.randn(3, 4, dtype=DT)
    grads = []
    for reversible in (False, True):
        torch.manual_seed(1)
        gamma = nn.Parameter(torch.tensor(0.8, dtype=DT))
        net = MRevNet([TransposedActivatedLayer(4).to(DT) for _ in range(3)], gamma,
                      reversible=reversible)
        net(x0).square().sum().backward()
        grads.append(gamma.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# the source weights (dense and convolutional K_j)


def test_transposed_convolution_is_the_adjoint():
    torch.manual_seed(0)
    layer = TransposedActivatedLayer(3, 5, kernel_size=3).to(DT)
    y = torch.randn(2, 3, 6, 6, dtype=DT)
    s = torch.randn(2, 5, 6, 6, dtype=DT)
    ky = torch.nn.functional.conv2d(y, layer.weight, padding=1)
    torch.testing.assert_close((ky * s).sum(), (y * layer._kt(s)).sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [HamiltonianNet, MidpointNet, LeapfrogNet])
def test_source_networks_dense_and_conv(cls):
    torch.manual_seed(0)
    for net, x in ((cls.dense(4, 3, 0.2), torch.randn(5, 4, dtype=DT)),
                   (cls.conv(2, 3, 0.2), torch.randn(2, 2, 5, 5, dtype=DT))):
        net = net.to(DT)
        out = net(x, return_pair=True)
        assert out[0].shape == out[1].shape == x.shape
        back = net.inverse(*out)
        torch.testing.assert_close(back[1] if cls is not HamiltonianNet else back[0], x,
                                   rtol=0, atol=1e-12)
        x_req = x.clone().requires_grad_(True)
        net(x_req).sum().backward()
        # the parameters that reach the output get gradients, as under autograd (the last G
        # of a HamiltonianNet feeds only Z_N, which is not returned: None for both)
        ref = copy.deepcopy(net)
        ref.reversible = False
        for p in ref.parameters():
            p.grad = None
        ref(x.clone().requires_grad_(True)).sum().backward()
        assert x_req.grad is not None
        assert [p.grad is None for p in net.parameters()] == \
            [p.grad is None for p in ref.parameters()]
        assert any(p.grad is not None for p in net.parameters())


def test_revnet_on_images_splits_channels():
    torch.manual_seed(0)
    conv = lambda: TransposedActivatedLayer(2, 3, kernel_size=3)  # noqa: E731
    nets = [RevNet([conv() for _ in range(3)], [conv() for _ in range(3)],
                   reversible=r).to(DT) for r in (True, False)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(2, 4, 5, 5, dtype=DT)
    y = nets[0](x)
    x1, x2 = x[:, :2], x[:, 2:]
    for f, g in zip(nets[0].F_functions, nets[0].G_functions):
        x1 = x1 + f(x2)
        x2 = x2 + g(x1)
    torch.testing.assert_close(y, torch.cat([x1, x2], 1), rtol=1e-13, atol=1e-13)
    with torch.no_grad():
        torch.testing.assert_close(nets[0].inverse(y), x, rtol=0, atol=1e-12)
    grads = []
    for net in nets:
        xr = x.clone().requires_grad_(True)
        net(xr).square().sum().backward()
        grads.append([xr.grad] + [p.grad for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_mrevnet_init_velocity():
    torch.manual_seed(0)
    f = [TransposedActivatedLayer(4).to(DT) for _ in range(2)]
    phi = nn.Linear(4, 4).to(DT)
    net = MRevNet(f, 0.5, init_velocity=phi)
    x0 = torch.randn(3, 4, dtype=DT)
    torch.testing.assert_close(net(x0), MRevNet(f, 0.5)(x0, v0=phi(x0)), rtol=0, atol=0)
    x_n, v_n = net(x0, return_velocity=True)
    with torch.no_grad():
        back = net.inverse(x_n, v_n)
    torch.testing.assert_close(back, (x0, phi(x0)), rtol=0, atol=1e-12)


def test_antisymmetric_midpoint_kernel():
    torch.manual_seed(0)
    layer = ActivatedLayer(4, antisymmetric=True).to(DT)
    y = torch.randn(2, 4, dtype=DT)
    k = layer.weight - layer.weight.T
    torch.testing.assert_close(layer(y), torch.tanh(y @ k.T + layer.bias))


def test_revnet_exact_inverse_of_concatenated_output_and_odd_split():
    net = build("revnet", exact=True)
    s0, s1, c = inputs(dyadic=True)
    x = torch.cat([s0, s1], 1)
    with torch.no_grad():
        y = net(x, c)
        assert torch.equal(net.inverse(y, c), x)
        with pytest.raises(ValueError, match="even size"):
            net(torch.randn(2, 5, dtype=DT), c)


# --------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("h", [0.0, -0.1, float("nan"), float("inf")])
def test_nonpositive_step_size_is_an_error(h):
    f = [TransposedActivatedLayer(2)]
    for make in (lambda: HamiltonianNet(f, f, h), lambda: MidpointNet(f, h),
                 lambda: LeapfrogNet(f, h), lambda: LeapfrogNet.dense(2, 2, h),
                 lambda: HamiltonianStep(f[0], f[0], h), lambda: MidpointStep(f[0], h),
                 lambda: LeapfrogStep(f[0], h)):
        with pytest.raises(ValueError, match="h must be a finite step size > 0"):
            make()


def test_other_bad_inputs():
    f = [TransposedActivatedLayer(2)]
    with pytest.raises(TypeError, match="h must be a real number"):
        MidpointNet(f, "0.1")
    with pytest.raises(ValueError, match="same length"):
        RevNet(f, f + f)
    with pytest.raises(ValueError, match="gamma = 0"):
        MRevNet(f, 0.0)
    with pytest.raises(ValueError, match="gamma must lie in"):
        MRevNet(f, 1.5)
    with pytest.raises(ValueError, match="kernel_size must be an odd"):
        TransposedActivatedLayer(2, kernel_size=2)
    with pytest.raises(ValueError, match="at least one"):
        LeapfrogNet([], 0.1)
    with pytest.raises(TypeError, match="single"):
        LeapfrogNet(TransposedActivatedLayer(2), 0.1)
    net = LeapfrogNet(f, 0.1)
    with pytest.raises(ValueError, match="y_prev must have the input's shape"):
        net(torch.randn(3, 2), y_prev=torch.randn(3, 3))
    plain = MRevNet(f, 0.0, reversible=False)  # gamma = 0 is a plain ResNet, fine without reversal
    x = torch.randn(3, 2)
    torch.testing.assert_close(plain(x), x + f[0](x))
    with pytest.raises(ValueError, match="no inverse"):
        plain.inverse(x, x)


def _saved_numel(arch, depth, reversible):
    """Scalars autograd keeps for the backward pass of one forward."""
    net = build(arch, depth=depth, reversible=reversible)
    s0, s1, c = inputs()
    s0 = s0.clone().requires_grad_(True)
    total = [0]

    def pack(t):
        total[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(arch, net, s0, s1, c)
    return total[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_reversible_memory_does_not_grow_with_depth(arch):
    assert _saved_numel(arch, 2, True) == _saved_numel(arch, 12, True)
    assert _saved_numel(arch, 12, False) > 3 * _saved_numel(arch, 2, False)
