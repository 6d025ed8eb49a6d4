"""SPT sparse attention (papers.md section 1): each attention region becomes

    codes_q = pq_encode(q, C)   codes_k = pq_encode(k, C)            C: the module's PQ codebook
    index, valid = pq_select(codes_q, codes_k, L, is_causal, allowed)  top-L keys per query
                 (score="exact": qk_select(q, k, ...) ranks by q . k; no codebook)
    out = spt_attention(q, k, v, index, valid, mask, scale, dropout)  attention on the kept pattern
    out = aux_loss(out, codebook_loss(q, C) + codebook_loss(k, C), w) gradient injection (DESIGN 6)

The codebook is the nn.Parameter sparsify.prepare() registered on the attention module; it reaches
the graph through a sparsify::tag node (DESIGN.md decision 5), which methods/state.py collect_state() removes.

Masks keep their full meaning: the selection is given the region's whole mask as `allowed` [B, H|1, Lq, Lk]
(allowed_from_mask), row by row, and the attention op adds or applies the same mask to every kept score. So
padding, causal masks aligned bottom-right (KV-cache decoding, prefix tuning), sliding windows and the
block-diagonal masks of packed sequences all hold exactly; `is_causal` is only SDPA's own flag, passed on where
Lq == Lk (the ops' causal is bottom-right, ops/causal.py) and as an explicit top-left mask where the lengths
differ (passes/dense.py attention_operands). Causality read off how a mask was built is a report fact, never applied a second time.
"""
from __future__ import annotations

import math
import logging
import operator
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from ..config import choice, integer, real
from ..passes.dense import as_the_model_reads_it, attention_operands
from ..passes.fx_utils import erase_unused, insert_call, shape, value
from ..passes.regions import Region
from ..tables import KERNEL_DTYPES
from .base import Method, StateKind, register

log = logging.getLogger("sparsify")  # debug.log: the methods sit below the reporting layer

SPT_DTYPES = KERNEL_DTYPES  # the SPT kernels
CODEBOOK_KIND = "pq_codebook"  # the state kind sparsify.prepare tags attention modules with
CODEBOOK = "sparsify_pq_codebook"  # its tensor: the module attribute (and checkpoint key suffix)


@dataclass
class SPTOptions:
    """SPT's fields of options.attention (with method="spt").

    keep:          fraction of keys each query attends to, in (0, 1]; L = ceil(keep * n) (default 1/8)
    subspace_dim:  dims per PQ sub-vector d_c, an int >= 1 (head_dim must be a multiple)
    codewords:     codewords E per subspace, an int >= 2
    codebook_loss: weight of the PQ codebook loss (finite, >= 0), added to the gradient of the task loss
    min_seq:       regions with fewer keys stay dense (sparsity does not pay below it); an int >= 0
    granularity:   "token" (top-L keys per query) or "block" (top key blocks per query block)
    block_size:    query/key block size of the block granularity: 16, 32, 64 or 128 (the block kernels' tiles)
    score:         how keys are ranked: "codes" (SPT: the number of matching PQ codes; cheap integer
                   work, needs the codebook) or "exact" (the true q . k, as top-k attention does: one
                   Q K^T in the forward, no codebook, no codebook loss; keeps the quality where the
                   codes' recall is low, e.g. head_dim 32 -> only 4 subspaces)
    """
    keep: float = real(0.125, low=0.0, high=1.0, low_open=True)
    subspace_dim: int = integer(8, low=1)
    codewords: int = integer(16, low=2)
    codebook_loss: float = real(1e-2, low=0.0)
    min_seq: int = integer(128, low=0)
    granularity: str = choice("token", "block")
    block_size: int = integer(64, low=1, among=(16, 32, 64, 128))
    score: str = choice("codes", "exact")


def _codebook_made_with(tensors) -> dict:
    subspaces, codewords, subspace_dim = tensors[CODEBOOK].shape
    return {"subspace_dim": int(subspace_dim), "codewords": int(codewords)}


CODEBOOK_STATE = StateKind(CODEBOOK_KIND, (CODEBOOK,), _codebook_made_with)


class SPT(Method):
    name = "spt"
    kinds = ("attention",)
    options = SPTOptions
    report_facts = ("keep_keys", "keep_blocks", "score")
    state = (CODEBOOK_STATE,)
    needs_prepare = True

    def guard(self, region, options, states, mode):
        return spt_guard(region, options, states)

    def rewrite(self, gm, region, options, states, mode):
        codebook = states.get((region.module, CODEBOOK_KIND), [None])[0]  # None for score="exact"
        rewrite_spt(gm, region, codebook, options)

    # --- prepare: a k-means codebook per attention module from the example call's q and k ----------------------
    def wants_samples(self, options):
        return options.score == "codes"  # "exact" needs no state

    def record_sample(self, kind, args):
        return (args[0].detach(), args[1].detach())  # sparsify::attention(q, k, ...)

    def prepare_region(self, ctx, region, options):
        if options.score == "exact":
            ctx.decide(region, "prepared: nothing needed", "score='exact' ranks keys by q.k: no codebook")
            return
        head_dim = region.facts.get("head_dim")
        if not head_dim or head_dim % options.subspace_dim:
            ctx.decide(region, "dense", f"head_dim {head_dim} is not a multiple of subspace_dim "
                                        f"{options.subspace_dim}: no codebook attached")
            return
        samples = ctx.samples_of(self, region)
        weight = next(ctx.model.get_submodule(region.module).parameters(), None)
        vectors = sum(t.numel() // head_dim for pair in samples for t in pair)

        def make_codebook():
            codebook = init_codebook(samples, head_dim, options.subspace_dim, options.codewords)
            if weight is not None:
                codebook = codebook.to(device=weight.device, dtype=weight.dtype)
            return {CODEBOOK: codebook}

        # a frame's own module runs its hooks outside the frame: tag from its q projection
        created = ctx.attach(region, CODEBOOK_KIND, make_codebook, ctx.hook_child(region, region.facts.get("q_projection")))
        if created:
            log.info("prepare: PQ codebook on %s (k-means on %d q/k sub-vectors)", region.module, vectors)
            if vectors < options.codewords:
                ctx.notes.setdefault(self.name, []).append((region.module or "<root>", vectors, options.codewords))
        ctx.decide_prepared(region, CODEBOOK_KIND, created,
                            {"subspace_dim": options.subspace_dim, "codewords": options.codewords},
                            f"k-means on {vectors} q/k sub-vectors")

    def finish_prepare(self, ctx, options):
        few = ctx.notes.get(self.name)  # (module, sub-vectors, codewords) where k-means has fewer samples
        if few:
            module, vectors, codewords = few[0]
            warnings.warn(f"sparsify.prepare: the example batch gives {module} only {vectors} q/k sub-vectors per "
                          f"subspace for codewords={codewords} ({len(few)} module(s) alike): k-means pads the "
                          "codebook with near-copies of them, so several codewords start as duplicates; pass a "
                          "larger example batch or fewer codewords", stacklevel=3)


def spt_guard(region: Region, options: SPTOptions, states: dict) -> Optional[str]:
    """Why this attention region cannot take SPT (None: it can)."""
    facts = region.facts
    f = facts.get("_match")
    head_dim = facts.get("head_dim")
    if options.score == "codes" and (not head_dim or head_dim % options.subspace_dim):
        return f"head_dim {head_dim} is not a multiple of subspace_dim {options.subspace_dim}"
    if value(f.q).dtype not in SPT_DTYPES:
        return f"dtype {value(f.q).dtype} has no SPT kernel (supported: fp16, bf16, fp32)"
    k_shape = shape(f.k)
    seq = k_shape[-1] if f.k_transposed else k_shape[-2]
    # a dynamic length is compared symbolically: bool() installs a shape guard, so a later call on the other
    # side of min_seq recompiles with its own plan (the plan never depends on the order of lengths)
    if bool(seq < options.min_seq):
        return f"sequence length {seq} is below min_seq={options.min_seq}"
    if options.score == "exact":
        return None  # ranks by q . k: no codebook to check
    if (region.module, CODEBOOK_KIND) not in states:
        return ("no PQ codebook on this module: call sparsify.prepare(model, *example_inputs, "
                "options=...) before torch.compile")
    cb = value(states[(region.module, CODEBOOK_KIND)][0])
    expected = (head_dim // options.subspace_dim, options.codewords, options.subspace_dim)
    if tuple(cb.shape) != expected:
        return f"the module's codebook has shape {tuple(cb.shape)}, options ask for {expected}"
    return None


# An additive mask entry at or below this masks its key: eager's exp() of such a score relative to any row
# with an unmasked key is exactly 0 in every float dtype (HF uses finfo.min; older models -1e4 or -1e9).
MASKED_BELOW = -1e4


def allowed_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B|1, H|1, Lq|1, Lk] bool, the selection's `allowed`: where the region's mask lets query i see key j.

    bool masks as they are (a row with no key gives 0, as SDPA). A float mask's row that masks every key with
    a finite value is softmax over equally shifted scores in eager (the uniform average for finfo.min, e.g.
    left-padding rows): every key stays a candidate there, and the attention adds the mask in full, as eager.
    """
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.dtype == torch.bool:
        return mask
    allowed = mask > MASKED_BELOW
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def spt_codebook_aux(q: torch.Tensor, k: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    # the recompute op: the distances and soft assignments are not saved for backward (q and k are, by the attention)
    loss = torch.ops.sparsify.codebook_loss
    return loss(q, codebook) + loss(k, codebook)


def rewrite_spt(gm: GraphModule, region: Region, codebook: Optional[Node], options: SPTOptions) -> None:
    """Replace the region by selection + sparse attention; `codebook` is None for score="exact"."""
    f = region.facts["_match"]
    graph = gm.graph
    like = region.output
    exact = options.score == "exact"
    with graph.inserting_before(region.output):
        k, mask, is_causal = attention_operands(graph, region)
        # what the selection ranks: q and k themselves ("exact"), or their PQ codes
        if exact:
            rank_q, rank_k = f.q, k
        else:
            rank_q = insert_call(graph, torch.ops.sparsify.pq_encode.default, (f.q, codebook), like=like)
            rank_k = insert_call(graph, torch.ops.sparsify.pq_encode.default, (k, codebook), like=like)
        allowed = None if mask is None else insert_call(graph, allowed_from_mask, (mask,), like=like)
        v = f.v
        if options.codebook_loss > 0 and not exact:
            # the codebook loss rides on v, not on the output: aux_loss returns a copy, and the attention saves
            # the copy of v in the original's place, where a copy of the output would be one more saved tensor
            aux = insert_call(graph, spt_codebook_aux, (f.q, k, codebook), like=like)
            v = insert_call(graph, torch.ops.sparsify.aux_loss.default,
                            (v, aux, float(options.codebook_loss), region.module), like=like)
        # is_causal: SDPA's flag as the ops mean it (bottom-right; a top-left one came back as a mask); a causal
        # mask the model built is in `allowed` and `mask`
        if options.granularity == "block":  # per query block, the key blocks with the best PQ score
            block = options.block_size
            keep = _keep_count(graph, k, options.keep, like, block)
            select = torch.ops.sparsify.qk_select_blocks if exact else torch.ops.sparsify.pq_select_blocks
            # codes: the codebook's size, so the block scores need no look at the codes (no host sync)
            extra = () if exact else (options.codewords,)
            selected = insert_call(graph, select.default,
                                   (rank_q, rank_k, keep, block, is_causal, allowed, *extra), like=like)
            args = (f.q, k, v, _item(graph, selected, 0, like), _item(graph, selected, 1, like), block, mask,
                    float(f.scale), is_causal, float(f.dropout_p))
            call = insert_call(graph, torch.ops.sparsify.block_sparse_attention.default, args, like=like)
        else:  # per query, the L keys with the most matching codes (or the highest q . k)
            keep = _keep_count(graph, k, options.keep, like)
            select = torch.ops.sparsify.qk_select if exact else torch.ops.sparsify.pq_select
            selected = insert_call(graph, select.default,
                                   (rank_q, rank_k, keep, is_causal, allowed), like=like)
            args = (f.q, k, v, _item(graph, selected, 0, like), _item(graph, selected, 1, like), mask,
                    float(f.scale), float(f.dropout_p))
            call = insert_call(graph, torch.ops.sparsify.spt_attention.default, args, like=like)
        call.meta["sparsify_module"] = region.module
        out = as_the_model_reads_it(graph, _item(graph, call, 0, like), region)
    region.output.replace_all_uses_with(out)
    erase_unused(region.interior)
    unit = "blocks" if options.granularity == "block" else "keys"
    region.facts[f"keep_{unit}"] = keep if isinstance(keep, int) else f"ceil({options.keep:g}*n_{unit})"
    # what ranks the keys: few PQ subspaces make a coarse score (README: recall at head_dim 32)
    region.facts["score"] = "exact" if exact else f"codes({value(codebook).shape[0]} subspaces)"


def _item(graph, node: Node, index: int, like: Node) -> Node:
    return insert_call(graph, operator.getitem, (node, index), like=like)


def _keep_count(graph, k: Node, keep: float, like: Node, block: int = 1):
    """ceil(keep * n) for n = Lk keys, or n = ceil(Lk / block) key blocks: an int for a static
    length, else SymInt arithmetic in the graph (keep as a fraction num/den: exact integer math)."""
    lk = shape(k)[-2]
    if isinstance(lk, int):
        n = -(-lk // block)
        return max(1, min(n, math.ceil(keep * n)))
    ratio = Fraction(keep).limit_denominator(4096)
    size = insert_call(graph, torch.ops.aten.sym_size.int, (k, 2), like=like)
    if block > 1:
        padded = insert_call(graph, operator.add, (size, block - 1), like=like)
        size = insert_call(graph, operator.floordiv, (padded, block), like=like)
    scaled = insert_call(graph, operator.mul, (size, ratio.numerator), like=like)
    rounded_up = insert_call(graph, operator.add, (scaled, ratio.denominator - 1), like=like)
    return insert_call(graph, operator.floordiv, (rounded_up, ratio.denominator), like=like)


# --- the codebook's initial value ---------------------------------------------------------------------------

def kmeans_codebook(vectors: torch.Tensor, codewords: int, iterations: int = 12,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Lloyd's k-means (L2) on [N, d_c] sub-vectors -> [codewords, d_c], seeded from a random sample.

    L2 k-means rather than the L1 used for encoding: the centroid update is a plain mean, and the
    codebook is trained further by the codebook loss anyway.
    """
    n = vectors.shape[0]
    centers = vectors[torch.randperm(n, generator=generator)[:codewords]].clone()
    if centers.shape[0] < codewords:  # fewer samples than codewords: pad with perturbed copies
        extra = centers[torch.randint(0, max(1, centers.shape[0]), (codewords - centers.shape[0],), generator=generator)]
        centers = torch.cat([centers, extra + 1e-3 * torch.randn(extra.shape, generator=generator)])
    for _ in range(iterations):
        assign = torch.cdist(vectors, centers).argmin(dim=1)
        sums = torch.zeros_like(centers).index_add_(0, assign, vectors)
        counts = torch.bincount(assign, minlength=codewords).unsqueeze(1)
        centers = torch.where(counts > 0, sums / counts.clamp(min=1), centers)
    return centers


def init_codebook(samples: list, head_dim: int, subspace_dim: int, codewords: int,
                  max_vectors: int = 16384, seed: int = 0) -> torch.Tensor:
    """A [M, E, d_c] codebook from k-means on the sub-vectors of the recorded q and k (shared, as
    the codebook is: papers.md), per subspace."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.cat([t.reshape(-1, head_dim).float().cpu() for pair in samples for t in pair])
    if rows.shape[0] > max_vectors:
        rows = rows[torch.randperm(rows.shape[0], generator=generator)[:max_vectors]]
    subspaces = rows.reshape(rows.shape[0], head_dim // subspace_dim, subspace_dim)
    return torch.stack([kmeans_codebook(subspaces[:, m], codewords, generator=generator)
                        for m in range(subspaces.shape[1])])


SPT_METHOD = register(SPT())
