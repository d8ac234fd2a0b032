"""DDP and FSDP (``fully_shard``) around the reversible engine: 2 CPU processes, gloo.

All cases run in one spawn of two workers (one process group, a few seconds of start-up); each
worker writes the gradients it ends with, and the tests compare them with one process here:

- without BatchNorm, DDP's averaged gradient is the gradient of the full-batch mean loss, so the
  reference is plain autograd (``reversible=False``) on the full batch;
- with BatchNorm each rank normalizes its own shard, so the reference is the mean of the
  shards' losses, each shard through the model on its own (one process, autograd);
- exact mode is deterministic, so DDP's ``g_0 / 2 + g_1 / 2`` is compared bit for bit with the
  same sum of the two shards' exact gradients computed here.

SyncBatchNorm cannot train on CPU: torch raises "SyncBatchNorm expected input tensor to be on
GPU" in its forward whenever a process group of size > 1 exists; that refusal is checked, and in
eval mode (running statistics, no communication) it is compared like BatchNorm.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port, spawn
from torch import nn

import mode

D, DEPTH, N, WORLD = 6, 5, 8, 2
MODES = {"autograd": dict(reversible=False), "float": dict(reversible=True),
         "exact": dict(reversible=True, exact=True)}
TIMEOUT_S = 120


def _model(how: str, norm: str | None = None, seed: int = 0, learned: bool = False) -> nn.Module:
    """A float64 Momentum ResNet: ``f_n = tanh(norm(W_n x + b_n))`` and a linear head; gamma
    an ``nn.Parameter`` where ``learned``."""
    torch.manual_seed(seed)

    def f():
        layers = [nn.Linear(D, D)]
        if norm == "bn":
            layers.append(nn.BatchNorm1d(D))
        elif norm == "sync":
            layers.append(nn.SyncBatchNorm(D))
        return nn.Sequential(*layers, nn.Tanh())

    # (shape (1,): fully_shard refuses 0-dim parameters; float64 at once: 0.8 in float32,
    # converted, is no rational of small denominator, which exact mode multiplies by)
    gamma = nn.Parameter(torch.tensor([0.8], dtype=torch.float64)) if learned else 0.8
    net = mode.MomentumResNet([f() for _ in range(DEPTH)], gamma, **MODES[how])
    return nn.Sequential(net, nn.Linear(D, 1)).double()


def _data(n: int = N, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, D, generator=g, dtype=torch.float64),
            torch.randn(n, 1, generator=g, dtype=torch.float64))


def _loss(model, x, y) -> torch.Tensor:
    return (model(x) - y).pow(2).mean()


def _grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):  # an FSDP DTensor shard
            g = g.full_tensor()
        out[name.removeprefix("_orig_mod.").removeprefix("module.")] = g.detach().clone()
    return out


def _shard(t: torch.Tensor, rank: int, world: int = WORLD) -> torch.Tensor:
    return t.chunk(world)[rank]


# --------------------------------------------------------------------------------------------
# the cases each worker runs


CASES = {
    # name: (wrapper, mode, norm, options)
    **{f"ddp-{m}": ("ddp", m, None, {}) for m in MODES},
    **{f"ddp-{m}-bn": ("ddp", m, "bn", {}) for m in ("float", "exact")},
    "ddp-float-static": ("ddp", "float", None, {"static_graph": True}),
    "ddp-exact-static": ("ddp", "exact", None, {"static_graph": True}),
    "ddp-float-unused": ("ddp", "float", None, {"find_unused_parameters": True}),
    "ddp-exact-unused-bn": ("ddp", "exact", "bn", {"find_unused_parameters": True}),
    "ddp-float-nosync": ("ddp", "float", None, {"no_sync": True}),
    "ddp-exact-nosync-bn": ("ddp", "exact", "bn", {"no_sync": True}),
    **{f"fsdp-{m}": ("fsdp", m, None, {}) for m in ("float", "exact")},
    **{f"fsdp-{m}-bn": ("fsdp", m, "bn", {}) for m in ("float", "exact")},
    # the network its own unit (resharded after forward, gathered again for backward)
    **{f"fsdp-net-{m}": ("fsdp", m, "bn", {"net": True}) for m in ("float", "exact")},
    # torch.compile of the DDP model: the reversible backward traced into its graph, against
    # the same compile of plain autograd and of the opaque engine (their graph breaks)
    "ddp-float-traced": ("ddp", "float", None, {"compiled": True, "traced": True}),
    "ddp-float-traced-bn": ("ddp", "float", "bn", {"compiled": True, "traced": True}),
    "ddp-autograd-compiled": ("ddp", "autograd", None, {"compiled": True}),
    "ddp-float-compiled": ("ddp", "float", None, {"compiled": True}),
    # the same under fully_shard; "net": the network its own unit, resharded after forward
    # and gathered again before the traced backward reads its saved parameters
    "fsdp-float-traced": ("fsdp", "float", None, {"compiled": True, "traced": True}),
    "fsdp-net-float-traced-bn": ("fsdp", "float", "bn",
                                 {"net": True, "compiled": True, "traced": True}),
    "fsdp-autograd-compiled": ("fsdp", "autograd", None, {"compiled": True}),
    "fsdp-net-autograd-compiled-bn": ("fsdp", "autograd", "bn", {"net": True, "compiled": True}),
    "fsdp-float-compiled": ("fsdp", "float", None, {"compiled": True}),
    "fsdp-net-exact-compiled-bn": ("fsdp", "exact", "bn", {"net": True, "compiled": True}),
    # a learned gamma (traced: the chain's tensor coefficient)
    **{f"{w}-{m}-learned": (w, m, None, {"learned": True}) for w in ("ddp", "fsdp")
       for m in ("float", "exact")},
    **{f"{w}-float-traced-learned": (w, "float", None,
                                     {"compiled": True, "traced": True, "learned": True})
       for w in ("ddp", "fsdp")},
}


def _wrap(model, wrapper: str, options: dict):
    if wrapper == "ddp":
        kw = {k: v for k, v in options.items() if k in ("static_graph", "find_unused_parameters")}
        return nn.parallel.DistributedDataParallel(model, **kw)
    from torch.distributed.fsdp import fully_shard

    if options.get("net"):
        fully_shard(model[0])
    return fully_shard(model)


def _run_case(name: str, rank: int) -> dict:
    wrapper, how, norm, options = CASES[name]
    model = _model(how, norm, learned=options.get("learned", False))
    if options.get("traced"):
        mode.traceable(model)
    model = _wrap(model, wrapper, options)
    breaks = None
    if options.get("compiled"):
        import torch._dynamo

        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model = torch.compile(model, backend="aot_eager")
    if options.get("no_sync"):  # two micro-batches, gradients synchronized on the second only
        x, y = _data(2 * N)
        first, second = (x[:N], y[:N]), (x[N:], y[N:])
        with model.no_sync():
            _loss(model, _shard(first[0], rank), _shard(first[1], rank)).backward()
        _loss(model, _shard(second[0], rank), _shard(second[1], rank)).backward()
    else:
        x, y = _data()
        _loss(model, _shard(x, rank), _shard(y, rank)).backward()
    if options.get("compiled"):
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    buffers = {k.removeprefix("_orig_mod.").removeprefix("module."): b.clone()
               for k, b in model.named_buffers()}
    return {"grads": _grads(model), "buffers": buffers, "graph_breaks": breaks}


def _refusals(rank: int) -> dict[str, str]:
    """The messages of what cannot run: SyncBatchNorm on CPU (in torch, in DDP's constructor
    and in its forward) and a residual function that is its own FSDP unit (in mode)."""
    from torch.distributed.fsdp import fully_shard

    def message(fn) -> str:
        try:
            fn()
        except (ValueError, NotImplementedError) as err:
            return str(err)
        return ""

    x, y = _data()
    sync = _model("float", "sync")
    blocks = _model("float")
    for f in blocks[0].functions:
        fully_shard(f)
    return {
        "syncbn-ddp": message(lambda: nn.parallel.DistributedDataParallel(sync)),
        "syncbn-forward": message(lambda: _loss(sync, _shard(x, rank), _shard(y, rank))),
        "fsdp-blocks": message(lambda: _loss(fully_shard(blocks), x, y)),
    }


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=timedelta(seconds=TIMEOUT_S))
    try:
        results = {}
        for name in CASES:
            try:
                results[name] = _run_case(name, rank)
            except Exception as err:  # reported per case; the other cases still run
                results[name] = {"error": f"{type(err).__name__}: {err}"}
            torch.distributed.barrier()
        results["refusals"] = _refusals(rank)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """``{case: {"grads": ..., "buffers": ...}}`` of each rank, from one spawn of 2 workers."""
    out = tmp_path_factory.mktemp("ddp")
    spawn(_worker, (free_port(), str(out)), WORLD, TIMEOUT_S)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# --------------------------------------------------------------------------------------------
# the single-process references


def _reference(norm: str | None, how: str, per_shard: bool, micro: int = 1,
               learned: bool = False) -> dict[str, torch.Tensor]:
    """Gradients of one process. ``per_shard``: the mean over ranks of each shard's loss, the
    shards run separately (BatchNorm statistics per shard); else the full-batch loss. With
    ``micro = 2`` the sum over two micro-batches."""
    model = _model(how, norm, learned=learned)
    x, y = _data(micro * N)
    for k in range(micro):
        xb, yb = x[k * N:(k + 1) * N], y[k * N:(k + 1) * N]
        if per_shard:
            for r in range(WORLD):
                (_loss(model, _shard(xb, r), _shard(yb, r)) / WORLD).backward()
        else:
            _loss(model, xb, yb).backward()
    return _grads(model)


def _exact_reference(norm: str | None, micro: int = 1, learned: bool = False
                     ) -> dict[str, torch.Tensor]:
    """``sum over micro-batches and ranks of g / WORLD``, in DDP's order (each rank's total
    divided, then the two summed), from exact gradients of one process."""
    per_rank = []
    x, y = _data(micro * N)
    for r in range(WORLD):
        model = _model("exact", norm, learned=learned)
        for k in range(micro):
            xb, yb = x[k * N:(k + 1) * N], y[k * N:(k + 1) * N]
            _loss(model, _shard(xb, r), _shard(yb, r)).backward()
        per_rank.append(_grads(model))
    return {k: per_rank[0][k] / WORLD + per_rank[1][k] / WORLD for k in per_rank[0]}


def _close(got: dict, want: dict, tol: float) -> None:
    """Max error relative to the largest gradient entry (a bias before BatchNorm has a zero
    gradient: its round-off is measured on the scale of the others)."""
    assert got.keys() == want.keys()
    scale = max(float(w.abs().max()) for w in want.values())
    for k in want:
        err = float((got[k] - want[k]).abs().max()) / scale
        assert err < tol, (k, err)


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_equal_one_process(results, name):
    wrapper, how, norm, options = CASES[name]
    for rank in range(WORLD):
        assert "error" not in results[rank][name], results[rank][name]
    got = [results[r][name]["grads"] for r in range(WORLD)]
    for k in got[0]:  # every rank ends with the same gradients
        assert torch.equal(got[0][k], got[1][k]), k
    micro = 2 if options.get("no_sync") else 1
    learned = options.get("learned", False)
    want = _reference(norm, "autograd", norm is not None, micro, learned)
    # float64: reconstruction and a different summation order stay near round-off
    _close(got[0], want, 1e-9)
    if how == "exact" and wrapper == "ddp":
        exact = _exact_reference(norm, micro, learned)
        for k in exact:
            assert torch.equal(got[0][k], exact[k]), k


@pytest.mark.parametrize("name, peer", [
    ("ddp-float-traced", "ddp-autograd-compiled"),
    ("ddp-float-traced-bn", "ddp-autograd-compiled"),
    ("fsdp-float-traced", "fsdp-autograd-compiled"),
    ("fsdp-net-float-traced-bn", "fsdp-net-autograd-compiled-bn"),
    ("ddp-float-traced-learned", "ddp-autograd-compiled"),
    ("fsdp-float-traced-learned", "fsdp-autograd-compiled")])
def test_traced_backward_under_ddp_and_fsdp_breaks_no_graph(results, name, peer):
    """torch.compile of the DDP or FSDP model with mode.traceable: the graph breaks are the
    wrapper's own (DDP's logging, FSDP's hooks), as many as with plain autograd; the opaque
    engine adds its own (the check can fail). The gradients are checked with the other
    cases."""
    opaque = f"{name.split('-')[0]}-float-compiled"
    for rank in range(WORLD):
        own = results[rank][peer]["graph_breaks"]
        assert results[rank][name]["graph_breaks"] == own
        assert results[rank][opaque]["graph_breaks"] > own


@pytest.mark.parametrize("name", ["ddp-float-bn", "ddp-exact-bn", "ddp-exact-nosync-bn",
                                  "ddp-float-traced-bn", "fsdp-net-float-traced-bn",
                                  "fsdp-net-exact-compiled-bn"])
def test_batchnorm_statistics_count_each_batch_once(results, name):
    """Rank 0's running statistics are those of its shards through one process's autograd
    model: the reversible recomputation does not update them a second time."""
    _, _, norm, options = CASES[name]
    model = _model("autograd", norm)
    x, y = _data(2 * N if options.get("no_sync") else N)
    for xb, yb in zip(x.split(N), y.split(N)):
        _loss(model, _shard(xb, 0), _shard(yb, 0)).backward()
    want = dict(model.named_buffers())
    got = results[0][name]["buffers"]
    for k, b in want.items():  # exact mode's f reads states rounded to 2^-38
        assert torch.allclose(got[k], b, rtol=1e-10, atol=1e-12), k
    if "exact" in name:  # and one exact process on the same shards gives the same bits
        model = _model("exact", norm)
        for xb, yb in zip(x.split(N), y.split(N)):
            _loss(model, _shard(xb, 0), _shard(yb, 0)).backward()
        for k, b in model.named_buffers():
            assert torch.equal(got[k], b), k


def test_syncbatchnorm_is_refused_on_cpu(results):
    """torch's own refusals (not mode's): SyncBatchNorm needs a GPU to synchronize."""
    for rank in range(WORLD):
        said = results[rank]["refusals"]
        assert "SyncBatchNorm layers only work with GPU modules" in said["syncbn-ddp"]
        assert "SyncBatchNorm expected input tensor to be on GPU" in said["syncbn-forward"]


def test_residual_functions_as_fsdp_units_are_refused(results):
    for rank in range(WORLD):
        assert "is itself an FSDP unit" in results[rank]["refusals"]["fsdp-blocks"]


def test_no_worker_or_process_group_is_left(results):
    assert not torch.distributed.is_initialized()
    assert not mp.active_children()


# --------------------------------------------------------------------------------------------
# SyncBatchNorm inside f, on CUDA: two processes, each its half of the batch. With nccl where
# there are 2 GPUs (one each); else both on cuda:0 over gloo, which torch's SyncBatchNorm
# supports (torch/nn/modules/_functions.py gathers with all_gather when the backend is gloo).
# Synchronized statistics are the full batch's, so the reference is one process with plain
# BatchNorm on the full batch (autograd, float64): gradients and running statistics.


def _sync_worker(rank: int, port: int, out: str, backend: str) -> None:
    torch.set_num_threads(1)
    device = torch.device("cuda", rank if backend == "nccl" else 0)
    torch.cuda.set_device(device)
    torch.distributed.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=timedelta(seconds=TIMEOUT_S))
    try:
        results = {}
        for how in MODES:
            try:
                model = nn.parallel.DistributedDataParallel(
                    _model(how, "sync").to(device), device_ids=[device.index])
                x, y = _data()
                _loss(model, _shard(x, rank).to(device), _shard(y, rank).to(device)).backward()
                results[how] = {
                    "grads": {k: g.cpu() for k, g in _grads(model).items()},
                    "buffers": {k.removeprefix("module."): b.detach().cpu().clone()
                                for k, b in model.named_buffers()}}
            except Exception as err:  # reported per mode; the others still run
                results[how] = {"error": f"{type(err).__name__}: {err}"}
            torch.distributed.barrier()
        torch.save(results, Path(out) / f"sync-rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _spawn_sync(out: Path) -> list[dict]:
    backend = "nccl" if torch.cuda.device_count() >= WORLD else "gloo"
    spawn(_sync_worker, (free_port(), str(out), backend), WORLD, TIMEOUT_S)
    return [torch.load(out / f"sync-rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_syncbatchnorm_in_f_equals_one_process_on_the_full_batch(device, results,
                                                                  tmp_path):
    """On CUDA: every mode's gradients and running statistics equal autograd's with the full
    batch's statistics. On the CPU (no GPU to synchronize on), torch's refusal."""
    if device.type == "cpu":
        for rank in range(WORLD):
            said = results[rank]["refusals"]["syncbn-forward"]
            assert "SyncBatchNorm expected input tensor to be on GPU" in said
        return
    got = _spawn_sync(tmp_path)
    model = _model("autograd", "bn")
    x, y = _data()
    _loss(model, x, y).backward()
    want_grads = _grads(model)
    want_buffers = dict(model.named_buffers())
    for how in MODES:
        for rank in range(WORLD):
            assert "error" not in got[rank][how], (how, got[rank][how])
        _close(got[0][how]["grads"], want_grads, 1e-9)
        for k, b in want_buffers.items():  # counted once, not again in the recomputation
            assert torch.allclose(got[0][how]["buffers"][k], b, rtol=1e-10, atol=1e-12), \
                (how, k)
