"""``visionft.engine.grad_sync.FlatGradientAllReduce`` on 2 gloo ranks: the mean of the ranks' gradients, per dtype,
missing gradients as zeros, ``.grad`` as views of the flat buffer, and accumulation into those views."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2


def _params() -> list[nn.Parameter]:
    return [
        nn.Parameter(torch.zeros(3, 4)),
        nn.Parameter(torch.zeros(5)),
        nn.Parameter(torch.zeros(2, 2, dtype=torch.float64)),
        nn.Parameter(torch.zeros(7)),  # rank 1 gives it no gradient
        nn.Parameter(torch.zeros(2), requires_grad=False),  # not averaged at all
    ]


def _grads(rank: int, step: int) -> list[torch.Tensor | None]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    g = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in _params()[:4]]
    if rank == 1:
        g[3] = None
    return [*g, None]


def _worker(rank: int, init_file: str, out: str) -> None:
    from visionft.engine.grad_sync import FlatGradientAllReduce

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    params = _params()
    sync = FlatGradientAllReduce(params)
    record = {}
    for step in range(2):
        for p, g in zip(params, _grads(rank, step), strict=True):
            p.grad = None if g is None else g.clone()
        sync()
        record[step] = [None if p.grad is None else p.grad.clone() for p in params]
    # Accumulating in place into the views (zero_grad(set_to_none=False), then backward) and averaging again.
    where = [p.grad.data_ptr() for p in params[:4]]
    for p in params[:4]:
        p.grad.zero_()
    for p in params[:4]:
        p.grad.add_(torch.full_like(p, float(rank + 1)))
    sync()
    record["accumulated"] = [p.grad.clone() for p in params[:4]]
    record["same_views"] = [p.grad.data_ptr() for p in params[:4]] == where
    record["calls"] = sync.calls
    record["numel"] = sync.numel
    torch.save(record, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_flat_all_reduce_averages_like_ddp(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    for step in range(2):
        g0, g1 = _grads(0, step), _grads(1, step)
        for i in range(4):
            other = g1[i] if g1[i] is not None else torch.zeros_like(g0[i])
            expected = (g0[i] + other) / WORLD
            for rec in (r0, r1):
                assert rec[step][i].dtype == expected.dtype
                torch.testing.assert_close(rec[step][i], expected, rtol=0, atol=1e-12)
        assert r0[step][4] is None and r1[step][4] is None
    for rec in (r0, r1):
        assert rec["same_views"]
        for g in rec["accumulated"]:
            torch.testing.assert_close(g, torch.full_like(g, 1.5))  # (1 + 2) / 2
        assert rec["calls"] == 3
        assert rec["numel"] == 12 + 5 + 4 + 7


def _accumulate_grad_hook_fires_after(detach: bool, init_file) -> bool:
    """Whether a backward after (optionally) detaching runs the AccumulateGrad node DDP made at wrap time."""
    import gc

    from torch.nn.parallel import DistributedDataParallel
    from visionft.engine.grad_sync import detach_ddp_reducer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    try:
        model = nn.Linear(4, 3)
        ddp = DistributedDataParallel(model)
        fired: list[int] = []
        node = torch.autograd.graph.get_gradient_edge(model.weight).node  # the one the reducer holds
        node.register_hook(lambda *args: fired.append(1))
        del node
        if detach:
            assert detach_ddp_reducer(ddp)
            assert not detach_ddp_reducer(ddp)  # once only
            assert not hasattr(ddp, "reducer")
        gc.collect()
        ddp(torch.randn(2, 4)).sum().backward()  # through the wrapper, as an evaluation or eager step may
        model(torch.randn(2, 4)).sum().backward()  # and around it, as the engine's step does
        assert model.weight.grad is not None
        return bool(fired)
    finally:
        dist.destroy_process_group()


def test_detached_ddp_holds_no_grad_accumulator(tmp_path):
    """DDP's reducer keeps the AccumulateGrad node made at wrap time (and the stream it was made on) in
    every backward; once detached, backward uses fresh nodes and the wrapper still forwards."""
    assert _accumulate_grad_hook_fires_after(detach=False, init_file=tmp_path / "kept")
    assert not _accumulate_grad_hook_fires_after(detach=True, init_file=tmp_path / "detached")


def test_detach_leaves_other_modules_alone():
    from visionft.engine.grad_sync import detach_ddp_reducer

    assert not detach_ddp_reducer(nn.Linear(2, 2))
