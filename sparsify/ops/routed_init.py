"""State initialisation for sparsify::routed_mlp (ops/routed.py): MoEfication's neuron clustering and a starting
router, computed once before fine-tuning (sparsify/methods/routed.py prepares a region with them; the benchmarks
call them directly).

    cluster_neurons   a balanced k-means of the up-projection rows into `blocks` groups: the neuron_order
    init_router       a router from each block's mean up-projection row
    fit_router        a router fitted on sample tokens (each block's predicted share of the MLP's output)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _balanced_assign(sim: Tensor, capacity: int) -> Tensor:
    """Each row (neuron) to one column (cluster), every column taking exactly `capacity` rows, greedily by
    similarity: every unassigned neuron proposes to its most similar non-full cluster, each cluster accepts
    its most similar proposers up to its remaining room; repeat (at most `clusters` rounds, since every round
    fills a cluster or places every proposer)."""
    n, k = sim.shape
    assign = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((k,), capacity, dtype=torch.long)
    while True:
        free = (assign < 0).nonzero().squeeze(1)
        if free.numel() == 0:
            return assign
        s = sim[free].masked_fill((room == 0)[None, :], float("-inf"))
        best_sim, best = s.max(dim=1)
        # proposers grouped by cluster, most similar first (ties: lower neuron index)
        by_sim = torch.sort(best_sim, descending=True, stable=True).indices
        by_cluster = by_sim[torch.sort(best[by_sim], stable=True).indices]
        cl = best[by_cluster]
        first = torch.searchsorted(cl, cl, right=False)
        rank = torch.arange(cl.numel()) - first
        accept = rank < room[cl]
        assign[free[by_cluster[accept]]] = cl[accept]
        room -= torch.bincount(cl[accept], minlength=k)


def cluster_neurons(up_w: Tensor, blocks: int, iterations: int = 10, seed: int = 0) -> Tensor:
    """MoEfication's neuron split: balanced k-means of the rows of up_w [F, d] into `blocks` groups of F / blocks
    neurons. Returns the permutation (LongTensor [F], block-major: block i = out[i*F/blocks:(i+1)*F/blocks],
    neurons ascending inside a block) to pass as neuron_order.

    Rows are L2-normalised and compared by cosine similarity (spherical k-means: a neuron's direction decides
    which inputs excite it, its norm mostly its scale); centroids start at `blocks` distinct rows drawn with
    `seed`, then alternate balanced assignment (_balanced_assign) and mean-of-members updates. Deterministic.
    For a gated MLP pass the gate projection (the rows whose activation decides whether a neuron fires)."""
    d_ff = up_w.shape[0]
    if blocks < 1 or d_ff % blocks:
        raise ValueError(f"cluster_neurons: d_ff={d_ff} is not a multiple of blocks={blocks}")
    with torch.no_grad():
        rows = F.normalize(up_w.detach().to("cpu", torch.float64), dim=1)
        gen = torch.Generator().manual_seed(seed)
        centroids = rows[torch.randperm(d_ff, generator=gen)[:blocks]]
        assign = None
        for _ in range(max(1, iterations)):
            new = _balanced_assign(rows @ centroids.t(), d_ff // blocks)
            if assign is not None and torch.equal(new, assign):
                break
            assign = new
            sums = torch.zeros(blocks, rows.shape[1], dtype=rows.dtype).index_add_(0, assign, rows)
            centroids = F.normalize(sums, dim=1)
        order = torch.sort(assign * d_ff + torch.arange(d_ff)).indices  # block-major, ascending inside
    return order.to(up_w.device)


def init_router(up_w: Tensor, up_b: Optional[Tensor], neuron_order: Optional[Tensor], blocks: int,
                scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """A starting router: (router_w [blocks, d], router_b [blocks]) in up_w's dtype and device.

    Row i is the mean of block i's up-projection rows minus the mean of all rows (same for the bias), times
    `scale`. So logit_i(x) = scale * (mean pre-activation of block i's neurons - mean over all neurons):
      * tokens go to the blocks whose neurons they excite most on average (the ranking of the blocks is the
        ranking of their mean pre-activations; the centring subtracts the same value from every block of a
        token, so it does not change the selection);
      * the logits are centred across blocks, so p = sigmoid(logit) stays around 1/2 and the SPT gate
        g = 2p around 1 while blocks are about equally excited: at initialisation the routed MLP is close to
        the dense MLP restricted to the kept blocks (no rescaling of their outputs); `scale` < 1 keeps g
        even closer to 1, and training moves the router from there.
    A mean over fb neurons is small unless the block's neurons agree (which clustering makes them do), so
    logits are O(1) without extra normalisation. For a gated MLP pass the gate projection."""
    d_ff, d = up_w.shape
    if blocks < 1 or d_ff % blocks:
        raise ValueError(f"init_router: d_ff={d_ff} is not a multiple of blocks={blocks}")
    with torch.no_grad():
        order = slice(None) if neuron_order is None else neuron_order.long()
        w = up_w.detach().to(torch.float64)[order].reshape(blocks, d_ff // blocks, d).mean(1)
        router_w = (w - w.mean(0, keepdim=True)) * scale
        if up_b is not None:
            b = up_b.detach().to(torch.float64)[order].reshape(blocks, -1).mean(1)
            router_b = (b - b.mean()) * scale
        else:
            router_b = torch.zeros(blocks, dtype=torch.float64, device=up_w.device)
    return router_w.to(up_w.dtype), router_b.to(up_w.dtype)


def fit_router(x: Tensor, hidden: Tensor, down_w: Tensor, neuron_order: Optional[Tensor], blocks: int,
               logit_std: float = 0.05, ridge: float = 1e-3) -> tuple[Tensor, Tensor]:
    """A router fitted on sample tokens: (router_w [blocks, d], router_b [blocks]) in down_w's dtype and device.

    x [T, d] are the MLP's inputs, hidden [T, F] its activations (after the activation and the gated product,
    before the down projection), down_w [d_out, F]. Block i's contribution to a token's output is
    c_i = || hidden[:, block i] @ down_w[:, block i]^T ||; its log, centred per token over the blocks, is the
    target a ridge regression on [x, 1] fits. So the router ranks blocks by their predicted share of the output
    (what top-k routing should keep), from the start. The logits are then scaled to a standard deviation of
    `logit_std` over the samples: ranking does not depend on the scale, and small logits keep p = sigmoid near
    1/2, so the SPT gate 2p starts near 1 (the kept blocks' outputs unscaled) where the sigmoid's slope is
    largest (the router learns fastest). Computed in float64."""
    tokens, d_ff = hidden.shape
    if blocks < 1 or d_ff % blocks:
        raise ValueError(f"fit_router: d_ff={d_ff} is not a multiple of blocks={blocks}")
    with torch.no_grad():
        order = torch.arange(d_ff, device=hidden.device) if neuron_order is None else neuron_order.long()
        h = hidden.detach().to(torch.float64)[:, order].reshape(tokens, blocks, d_ff // blocks)
        w = down_w.detach().to(torch.float64)[:, order].reshape(-1, blocks, d_ff // blocks)
        contrib = torch.einsum("tbf,obf->tbo", h, w).norm(dim=-1)                      # [T, blocks]
        target = contrib.clamp_min(1e-12).log()
        target = target - target.mean(1, keepdim=True)
        xs = torch.cat([x.detach().to(torch.float64).reshape(tokens, -1),
                        torch.ones(tokens, 1, dtype=torch.float64, device=x.device)], dim=1)
        gram = xs.T @ xs
        gram += ridge * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype,
                                                                              device=gram.device)
        coef = torch.linalg.solve(gram, xs.T @ target)                                  # [d + 1, blocks]
        logits = xs @ coef
        coef = coef * (logit_std / logits.std().clamp_min(1e-12))
    return coef[:-1].T.contiguous().to(down_w.dtype), coef[-1].contiguous().to(down_w.dtype)
