"""Helpers shared by several test files."""

from __future__ import annotations

from collections.abc import Callable

import torch


class Counting:
    """A torch.compile backend that counts the graphs it is given and runs them as traced."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def saved_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """``(bytes, fn())``: the bytes of every tensor autograd saves for backward while ``fn``
    runs (its activations, custom Functions' ``save_for_backward`` included)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker: Callable, args: tuple, nprocs: int, timeout_s: float) -> None:
    """Run ``worker(rank, *args)`` in ``nprocs`` spawned processes and wait for all of them;
    raise if one fails or they take longer than ``timeout_s``. No worker is left behind,
    whatever happened."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {nprocs} workers did not finish in {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(5)


# The engine's two reversible modes, for tests that hold them to reversible=False (float64).
REVERSIBLE = [dict(), dict(exact=True)]
REVERSIBLE_IDS = ["float", "exact"]


def small_mlp(d: int, hidden: int = 8) -> torch.nn.Module:
    """``Linear(d, hidden) -> tanh -> Linear(hidden, d)`` in float64."""
    nn = torch.nn
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d)).double()


def seeded_randn(*shape: int, seed: int = 0) -> torch.Tensor:
    """A float64 normal sample of ``shape`` from its own generator."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def assert_same_grads(got, want, tol: float) -> None:
    """Two gradient lists agree: ``None`` where the other is ``None``, else within ``tol``."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)

