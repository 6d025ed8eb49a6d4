"""DDP (gloo, 2 CPU processes) around a model with SPT attention and routed MLPs.

sparsify.prepare registers the codebooks and routers before DDP is built (DDP registers its parameters and
broadcasts rank 0's values at construction); torch.compile then wraps the DDP module. Each rank sees
different data, so equal gradients of the learned state on both ranks show that DDP all-reduced them.
"""
import contextlib
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from paths import TESTS  # noqa: E402



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _process_group(rank: int, world: int, port: int):
    """One gloo rank of a spawned worker (tests importable, one thread), torn down however the body ends."""
    sys.path.insert(0, TESTS)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with _process_group(rank, world, port):
        import sparsify
        from families import tiny_inputs, tiny_model

        model = tiny_model("bert", "sdpa").train()
        options = {"attention": {"method": "spt", "keep": 0.5, "min_seq": 1},
                   "mlp": {"method": "routed", "blocks": 2, "top_k": 1}, "inner": "aot_eager"}
        sparsify.prepare(model, **tiny_inputs("bert", seq=16, seed=1), options=options)
        compiled = torch.compile(torch.nn.parallel.DistributedDataParallel(model), backend="sparsify", options=options)
        out = compiled(**tiny_inputs("bert", seq=16, seed=10 + rank)).last_hidden_state  # per-rank data
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "sparsify_" in n}
        decisions = sorted((r.kind, r.decision) for r in sparsify.last_report().regions)
        torch.save((grads, decisions), os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_all_reduces_the_learned_sparse_state(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    grads0, decisions0 = torch.load(tmp_path / "rank0.pt")
    grads1, decisions1 = torch.load(tmp_path / "rank1.pt")
    assert decisions0 == decisions1 == [("attention", "spt")] * 2 + [("mlp", "routed")] * 2
    assert len(grads0) == 6  # per layer: codebook, router weight, router bias
    for name, grad in grads0.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grads1[name], grad, rtol=0, atol=0, msg=name)


def _mst_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """MST under DDP: each rank trains on its own data; the topology updates (gradient growth on the all-reduced
    gradients, random growth from the one seeded generator) must give every rank the same masks."""
    with _process_group(rank, world, port):
        import transformers
        import sparsify
        from families import tiny_config

        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(tiny_config("gpt2"))
        options = {"linear": {"method": "mst", "total_steps": 6, "delta": 2, "warmup_end": 0.3, "ultra_end": 0.9},
                   "attention": "off", "mlp": "off", "inner": "aot_eager"}
        g = torch.Generator().manual_seed(100 + rank)
        ids = torch.randint(0, 90, (2, 12), generator=g)  # per-rank data
        sparsify.prepare(model, input_ids=ids, options=options)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        compiled = torch.compile(ddp, backend="sparsify", options=options)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        schedule = sparsify.training.MixedSparsity(compiled, optimizer, options)
        for _ in range(6):
            compiled(input_ids=ids, labels=ids).loss.backward()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        masks = {layer.path: layer.mask.clone() for layer in schedule.layers}
        torch.save((masks, schedule.updates), os.path.join(out_dir, f"mst{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_mst_masks_stay_identical_on_every_rank(tmp_path):
    mp.spawn(_mst_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    masks0, updates0 = torch.load(tmp_path / "mst0.pt")
    masks1, updates1 = torch.load(tmp_path / "mst1.pt")
    assert updates0 and any(u["regrown"] for u in updates0)
    assert updates0 == updates1
    for path, mask in masks0.items():
        assert torch.equal(masks1[path], mask), path
