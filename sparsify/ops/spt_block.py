"""Block-granular SPT (granularity="block"): PQ-scored key-block selection and block-sparse attention.

Ops (namespace "sparsify"), each with a fake kernel and a CPU reference in plain torch; FLOP formulas for the
attention op and its backward are registered at the bottom of this file:

    pq_select_blocks(q_codes[B,H,Lq,M], k_codes[B,Hkv,Lk,M], keep_blocks, block, causal, allowed?)
        -> (block_index[B,H,nQB,keep_blocks] int32, block_valid[B,H,nQB,keep_blocks] bool)
        Per query block of `block` rows, the `keep_blocks` key blocks (of `block` keys) with the highest
        aggregated code-match score. nQB = ceil(Lq / block), nKB = ceil(Lk / block), keep_blocks in [1, nKB].
    qk_select_blocks(q[B,H,Lq,D], k[B,Hkv,Lk,D], keep_blocks, block, causal, allowed?) -> the same,
        ranked by the exact aggregated score sum q_i . k_j (score="exact"; no codebook).
    block_sparse_attention(q, k, v, block_index, block_valid, block, mask?, scale, causal, dropout_p)
        -> (out[B,H,Lq,Dv], lse[B,H,Lq], seed)
        Softmax attention restricted to the selected key blocks of each query block (& causal & mask);
        backward via block_sparse_attention_backward -> [dq, dk, dv, dmask] (empty where not needed).

Block score (pq_select_blocks). With score(i, j) = #{m : qc[i, m] == kc[j, m]} (pq_select's token score), the
block score is the sum of score(i, j) over the query rows i of query block qb and the allowed keys j of key block
kb. It is computed from per-block code histograms instead of the [Lq, Lk] token scores:

    Qhist[b, h, qb, m, e]   = #{i in qb : qc[i, m] == e}
    Khist[b, hkv, kb, m, e] = #{j in kb : kc[j, m] == e and key j is visible to some query (allowed)}
    sum_{i in qb} sum_{j in kb, valid} sum_m [qc[i, m] == kc[j, m]]
        = sum_m sum_e #{i in qb : qc[i, m] == e} * #{j in kb valid : kc[j, m] == e}
        = sum_m sum_e Qhist[qb, m, e] * Khist[kb, m, e]

(group the pairs (i, j) of subspace m by the common code value e: a pair matches iff both have code e). So the
block scores are one [nQB, M*E] x [M*E, nKB] matmul per (b, kv head) (GQA: the query heads of one kv head share
its Khist, nothing is repeated), with E = max code + 1, and cost O((Lq + Lk) M + nQB nKB M E) instead of
O(Lq Lk M). The matmul is done in float64 (exact integer counts up to 2**53).

Which key blocks may be selected, and the order of preference:
  * a key block is a candidate for query block qb iff it holds an allowed (query, key) pair (`allowed`: the
    bool mask of pq_select, [B, H|1, Lq|1, Lk], pooled per block pair) and, with `causal` (bottom-right, ops/causal.py:
    key j allowed for query i iff j <= i + (Lk - Lq), as in pq_select), its first key is visible to the last
    query row of qb. The two are pooled separately, so a block pair may be a candidate without a pair allowed by
    both: that only spends a slot, the attention applies the mask and causality in full.
  * causal: the diagonal block, the one holding key first_row(qb) + (Lk - Lq) (kb == qb when Lq == Lk), when a
    candidate, is always kept (every query row of qb sees that key, so no row is left without keys). Its histogram score would count the pairs j > i too; being
    forced, its score is never used.
  * the remaining slots go to the candidates with the highest block score, ties -> lower block index; slots are
    returned sorted by ascending block index, invalid slots (fewer candidates than keep_blocks) last with index 0.
    A block without any allowed key is never selected.

Attention (block_sparse_attention). Key j is visible to query i iff block j // block is among the valid selected
blocks of query block i // block (out-of-range block indices count as invalid; a block listed twice counts once),
and j <= i + (Lk - Lq) if `causal` (ops/causal.py), and the bool mask allows it; a float mask is added to the scores. Rows with no
visible key give out = 0, lse = -inf and zero gradients (safe softmax, no NaN). lse is fp32 (fp64 for fp64 inputs)
and not differentiable. Dropout (on the probabilities) is seeded: the seed output replays the same keep-mask in
backward (sparsify/ops/_vjp.py seeded_dropout / fresh_seed, the same draw over [B, H, Lq, Lk] as SDPA-shaped
probabilities).

Memory of this CPU reference. pq_select_blocks: the histograms [B, H|Hkv, n_blocks, M*E] and the block scores
[B, H, nQB, nKB]: no token-pair tensor. block_sparse_attention: the selected block map is expanded to a boolean
token mask and dense masked attention is computed per chunk of query rows, so the temporaries are
[B, H, rows, Lk] (rows chosen so that stays about _CHUNK_ELEMS elements); GQA folds the query heads of a kv head into
rows ([B, Hkv, H/Hkv * rows, D] against k [B, Hkv, Lk, D]), so K and V are never repeated. Saved for backward: q, k, v,
block_index, block_valid, mask, lse and the seed (no probabilities); the backward recomputes P per chunk from lse
with the explicit formulas (docstring of block_sparse_attention_backward). With dropout_p > 0 the keep-mask is
drawn at full size [B, H, Lq, Lk] (fp32) once per call: the generator draws it in one piece. A float mask that
needs a gradient gets a dense [B, H, Lq, Lk] gradient buffer before being summed to its own shape.
This reference does the dense work (every block, then masked); the block-skipping kernels are in
sparsify/codegen/spt_attention.py (block_sparse_forward / backward, with the same causal alignment).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .causal import causal_keep, causal_offset

from ._vjp import _acc_dtype, fresh_seed, philox_dropout_scale, placeholder_grads
from .key_select import _ell_layout, check_allowed, check_qk_select_inputs
from .spt import attention_output, _broadcast_mask, _effective_needs, _probs, _reduce_to_shape

# Element budget for the per-chunk [B, H, rows, Lk] temporaries (about 64 MiB in fp32).
_CHUNK_ELEMS = 1 << 24


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _row_chunks(rows: int, per_row: int):
    step = max(1, _CHUNK_ELEMS // max(1, per_row))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


# ---------------------------------------------------------------------------------------------
# pq_select_blocks
# ---------------------------------------------------------------------------------------------

def _check_block_select_inputs(q_codes, k_codes, keep_blocks, block, allowed):
    if q_codes.dim() != 4 or k_codes.dim() != 4:
        raise ValueError(f"sparsify::pq_select_blocks expects codes [B,H,L,M]; got {tuple(q_codes.shape)}, "
                         f"{tuple(k_codes.shape)}")
    b, h, _, m = q_codes.shape
    if k_codes.shape[0] != b or k_codes.shape[-1] != m or k_codes.shape[1] == 0 or h % k_codes.shape[1] != 0:
        raise ValueError(f"sparsify::pq_select_blocks: incompatible code shapes {tuple(q_codes.shape)} and "
                         f"{tuple(k_codes.shape)} (need equal B and M, H % Hkv == 0)")
    if q_codes.is_floating_point() or k_codes.is_floating_point() or q_codes.dtype == torch.bool \
            or k_codes.dtype == torch.bool:
        raise ValueError("sparsify::pq_select_blocks: codes must be integer tensors")
    if block < 1:
        raise ValueError(f"sparsify::pq_select_blocks: block must be >= 1, got {block}")
    nkb = _cdiv(k_codes.shape[2], block)
    if not 1 <= keep_blocks <= nkb:
        raise ValueError(f"sparsify::pq_select_blocks: keep_blocks must be in [1, nKB={nkb}], got {keep_blocks}")
    check_allowed("pq_select_blocks", allowed, b, h, q_codes.shape[2], k_codes.shape[2])


def _code_hist(codes: Tensor, block: int, e: int, weight: Optional[Tensor]) -> Tensor:
    """codes [B, X, L, M] -> float64 histograms [B, X, ceil(L / block), M * E] (weight [B, L]: 0/1 per row)."""
    b, x, l, m = codes.shape
    nblk = _cdiv(l, block)
    dev = codes.device
    blk = torch.arange(l, device=dev) // block
    slot = (blk[:, None] * m + torch.arange(m, device=dev)[None, :]) * e          # [L, M]
    flat = (slot + codes.long()).reshape(b, x, l * m)
    if weight is None:
        w = torch.ones(1, 1, 1, dtype=torch.float64, device=dev).expand(b, x, l * m)
    else:
        w = weight.to(torch.float64)[:, None, :, None].expand(b, x, l, m).reshape(b, x, l * m)
    hist = torch.zeros(b, x, nblk * m * e, dtype=torch.float64, device=dev)
    hist.scatter_add_(2, flat, w)
    return hist.view(b, x, nblk, m * e)


def block_scores(q_codes: Tensor, k_codes: Tensor, block: int, key_weight: Optional[Tensor] = None,
                 codewords: Optional[int] = None) -> Tensor:
    """Aggregated block scores [B, H, nQB, nKB] float64 via the histogram identity (module docstring): the number
    of code matches over all (query in qb, valid key in kb) pairs, causality not applied.

    `codewords` (E, the codebook's size, when the caller knows it: SPT's rewrite does): the histograms' width
    without reading the codes' range, and on a GPU without checking it (codes from pq_encode are in [0, E) by
    construction): no host synchronisation. Without it, E is read from the codes (two syncs) and they are checked."""
    b, h, lq, m = q_codes.shape
    hkv = k_codes.shape[1]
    if q_codes.numel() == 0 or k_codes.numel() == 0:
        return torch.zeros(b, h, _cdiv(lq, block), _cdiv(k_codes.shape[2], block), dtype=torch.float64,
                           device=q_codes.device)
    if codewords is None or q_codes.device.type == "cpu":  # a sync is free on the CPU: check the range there
        lo = min(int(q_codes.min()), int(k_codes.min()))
        hi = max(int(q_codes.max()), int(k_codes.max()))
        if lo < 0 or (codewords is not None and hi >= codewords):
            valid = ">= 0" if codewords is None else f"in [0, codewords={codewords})"
            raise ValueError(f"sparsify::pq_select_blocks: codes must be {valid}, got [{lo}, {hi}]")
    e = codewords if codewords is not None else hi + 1
    qh = _code_hist(q_codes, block, e, None)                    # [B, H, nQB, M*E]
    kh = _code_hist(k_codes, block, e, key_weight)              # [B, Hkv, nKB, M*E]
    nqb, nkb = qh.shape[2], kh.shape[2]
    qh = qh.reshape(b, hkv, (h // hkv) * nqb, m * e)            # query heads of one kv head share its Khist
    return torch.matmul(qh, kh.transpose(-1, -2)).reshape(b, h, nqb, nkb)


def key_visible(allowed: Optional[Tensor]) -> Optional[Tensor]:
    """[B, Lk] float 0/1: keys some query of some head may attend to (the block scores count only those)."""
    if allowed is None:
        return None
    return allowed.any(dim=2).any(dim=1).to(torch.float32)


def block_candidates(lq: int, lk: int, block: int, causal: bool, allowed: Optional[Tensor], batch: int,
                     device=None) -> tuple[Tensor, Tensor]:
    """(candidate [B, H|1, nQB, nKB] bool, forced, the same shape): block pairs holding an allowed pair, and
    the causal diagonal blocks that are always kept (module docstring)."""
    nqb, nkb = _cdiv(lq, block), _cdiv(lk, block)
    cand = torch.ones(1, 1, nqb, nkb, dtype=torch.bool, device=device)
    if allowed is not None:  # any allowed pair in the block pair: pad to whole blocks, pool
        a = allowed.expand(-1, -1, lq, -1)
        a = F.pad(a, (0, nkb * block - lk, 0, nqb * block - lq))
        cand = a.view(*a.shape[:2], nqb, block, nkb, block).any(dim=5).any(dim=3)
    forced = torch.zeros_like(cand)
    if causal:  # bottom-right (ops/causal.py): row i sees keys up to i + (Lk - Lq)
        offset = causal_offset(lq, lk)
        first_row = torch.arange(nqb, device=device) * block
        last_row = torch.clamp(first_row + block, max=lq) - 1
        first_key = torch.arange(nkb, device=device) * block
        cand = cand & (first_key[None, :] <= last_row[:, None] + offset)
        # the block of the key the block's first row sees last: every row of the block sees it
        diagonal = (first_row + offset).clamp(min=-1)
        forced = cand & ((first_key[None, :] <= diagonal[:, None]) & (diagonal[:, None] < first_key[None, :] + block))
    return cand.expand(batch, -1, -1, -1), forced.expand(batch, -1, -1, -1)


@torch.library.custom_op("sparsify::pq_select_blocks", mutates_args=())
def pq_select_blocks(
    q_codes: Tensor, k_codes: Tensor, keep_blocks: int, block: int, causal: bool, allowed: Optional[Tensor],
    codewords: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Top-`keep_blocks` key blocks per query block: (block_index int32, block_valid bool) [B, H, nQB, keep].
    `codewords`: the codebook's size E, when known (block_scores: then no host synchronisation on a GPU)."""
    _check_block_select_inputs(q_codes, k_codes, keep_blocks, block, allowed)
    b, h, lq, _ = q_codes.shape
    lk = k_codes.shape[2]
    nqb, nkb = _cdiv(lq, block), _cdiv(lk, block)
    dev = q_codes.device
    if nqb == 0:
        return (torch.empty(b, h, 0, keep_blocks, dtype=torch.int32, device=dev),
                torch.empty(b, h, 0, keep_blocks, dtype=torch.bool, device=dev))
    score = block_scores(q_codes, k_codes, block, key_visible(allowed), codewords).to(torch.int64)  # [B,H,nQB,nKB]
    cand, forced = block_candidates(lq, lk, block, causal, allowed, b, dev)
    # rank = score * nKB + (nKB - 1 - kb): unique, higher is better, lower kb wins ties; forced blocks first,
    # non-candidates -1. A score is at most block^2 * M (every pair matching in every subspace): the forced
    # blocks' score above that bound needs no look at the scores (no host synchronisation), and int64 is far
    # from overflowing.
    top_score = block * block * q_codes.shape[-1] + 1
    score = torch.where(forced, top_score, score)
    kb = torch.arange(nkb, device=dev)
    rank = torch.where(cand, score * nkb + (nkb - 1 - kb), -1)
    top_rank, top_idx = rank.topk(keep_blocks, dim=-1)
    return _ell_layout(top_idx, top_rank >= 0, nkb)


@pq_select_blocks.register_fake
def _(q_codes, k_codes, keep_blocks, block, causal, allowed, codewords=None):
    shape = (q_codes.shape[0], q_codes.shape[1], _cdiv(q_codes.shape[2], block), keep_blocks)
    return (q_codes.new_empty(shape, dtype=torch.int32), q_codes.new_empty(shape, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# qk_select_blocks: block selection by the exact score (score="exact")
# ---------------------------------------------------------------------------------------------

def _block_sums(x: Tensor, block: int, weight: Optional[Tensor]) -> Tensor:
    """x [B, X, L, D] -> per-block sums [B, X, ceil(L / block), D] in the accumulation dtype (weight [B, L]:
    0/1 per row, so invalid keys add nothing)."""
    b, n_heads, l, d = x.shape
    nblk = _cdiv(l, block)
    x = x.to(_acc_dtype(x.dtype))
    if weight is not None:
        x = x * weight.to(x.dtype)[:, None, :, None]
    x = F.pad(x, (0, 0, 0, nblk * block - l))
    return x.view(b, n_heads, nblk, block, d).sum(3)


@torch.library.custom_op("sparsify::qk_select_blocks", mutates_args=())
def qk_select_blocks(
    q: Tensor, k: Tensor, keep_blocks: int, block: int, causal: bool, allowed: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """pq_select_blocks' contract (candidates, forced causal diagonal, ELL layout) with the exact aggregated
    score: the sum of q_i . k_j over the query rows i of qb and the valid keys j of kb, which is
    (sum_i q_i) . (sum_j k_j): one [nQB, D] x [D, nKB] product per head, no token pair is formed. Ties (and
    NaN scores, which rank last) go to the lower block index."""
    check_qk_select_inputs("qk_select_blocks", q, k, keep_blocks, block, allowed)
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    nqb, nkb = _cdiv(lq, block), _cdiv(lk, block)
    with torch.no_grad():
        qs = _block_sums(q, block, None).reshape(b, hkv, (h // hkv) * nqb, d)   # GQA: heads share kv sums
        ks = _block_sums(k, block, key_visible(allowed))                          # [B, Hkv, nKB, D]
        score = (qs @ ks.transpose(-1, -2)).reshape(b, h, nqb, nkb)
        cand, forced = block_candidates(lq, lk, block, causal, allowed, b, q.device)
        score = score.nan_to_num(nan=float("-inf"), posinf=torch.finfo(score.dtype).max)
        score = torch.where(forced, float("inf"), score)   # the causal diagonal first
        score = torch.where(cand, score, float("-inf"))
        _, order = score.sort(dim=-1, descending=True, stable=True)
        top_idx = order[..., :keep_blocks]
        return _ell_layout(top_idx, cand.expand_as(score).gather(-1, top_idx), nkb)


@qk_select_blocks.register_fake
def _(q, k, keep_blocks, block, causal, allowed):
    shape = (q.shape[0], q.shape[1], _cdiv(q.shape[2], block), keep_blocks)
    return q.new_empty(shape, dtype=torch.int32), q.new_empty(shape, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# block_sparse_attention: forward and the hand-written backward
# ---------------------------------------------------------------------------------------------

def _check_block_attention_inputs(q, k, v, block_index, block_valid, block, mask, dropout_p):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"sparsify::block_sparse_attention expects 4-d q, k, v; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, lq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[1] == 0 or h % k.shape[1] != 0 \
            or k.shape[1] != v.shape[1] or k.shape[-1] != d or k.shape[2] != v.shape[2]:
        raise ValueError(f"sparsify::block_sparse_attention: incompatible q/k/v shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if block < 1:
        raise ValueError(f"sparsify::block_sparse_attention: block must be >= 1, got {block}")
    nqb = _cdiv(lq, block)
    if block_index.dim() != 4 or block_index.is_floating_point() or block_index.dtype == torch.bool:
        raise ValueError(f"sparsify::block_sparse_attention: block_index must be an integer [B, H, nQB, kb] "
                         f"tensor, got {block_index.dtype} {tuple(block_index.shape)}")
    shape = (b, h, nqb, block_index.shape[-1])
    try:
        torch.broadcast_shapes(block_index.shape, shape)
        torch.broadcast_shapes(block_valid.shape, shape)
        ok = torch.broadcast_shapes(block_index.shape, block_valid.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok or block_valid.dtype != torch.bool:
        raise ValueError(f"sparsify::block_sparse_attention: block_index {tuple(block_index.shape)} and bool "
                         f"block_valid {block_valid.dtype} {tuple(block_valid.shape)} must broadcast to "
                         f"[B, H, ceil(Lq / block), kb] = {shape}")
    if mask is not None:
        try:
            torch.broadcast_shapes(mask.shape, (b, h, lq, k.shape[2]))
        except RuntimeError:
            raise ValueError(f"sparsify::block_sparse_attention: mask {tuple(mask.shape)} does not broadcast "
                             f"to {(b, h, lq, k.shape[2])}") from None
        if mask.dim() > 4:
            raise ValueError(f"sparsify::block_sparse_attention: mask has {mask.dim()} dims")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"sparsify::block_sparse_attention: dropout_p must be in [0, 1], got {dropout_p}")


def block_map(block_index: Tensor, block_valid: Tensor, lq: int, lk: int, block: int) -> Tensor:
    """Selected blocks as a dense bool map [B, H, nQB, nKB] (out-of-range indices ignored, duplicates once)."""
    nkb = _cdiv(lk, block)
    idx = block_index.long()
    ok = block_valid & (idx >= 0) & (idx < nkb)
    shape = torch.broadcast_shapes(idx.shape, ok.shape)
    idx, ok = idx.expand(shape), ok.expand(shape)
    bm = torch.zeros(*shape[:-1], nkb + 1, dtype=torch.bool, device=block_index.device)
    bm.scatter_(-1, torch.where(ok, idx, nkb), True)
    return bm[..., :nkb]


def _allowed_rows(bmap: Tensor, rows: slice, lk: int, block: int, causal: bool, mask_rows: Optional[Tensor],
                  b: int, h: int, lq: int) -> Tensor:
    """Token-level visibility [B, H, rows, Lk] bool: selected block & causal (ops/causal.py) & bool mask."""
    dev = bmap.device
    qpos = torch.arange(rows.start, rows.stop, device=dev)
    kpos = torch.arange(lk, device=dev)
    allowed = bmap[:, :, qpos // block][..., kpos // block].expand(b, h, -1, -1)
    if causal:
        allowed = allowed & causal_keep(rows, lq, lk, dev)
    if mask_rows is not None and mask_rows.dtype == torch.bool:
        allowed = allowed & mask_rows
    return allowed


def _fold_group(t: Tensor, hkv: int) -> Tensor:
    """[B, H, r, X] -> [B, Hkv, G*r, X] (h = hkv * G + g): the query heads of one kv head become extra rows."""
    b, h, r, x = t.shape
    return t.reshape(b, hkv, (h // hkv) * r, x)


def _gqa_scores(q_rows: Tensor, k: Tensor) -> Tensor:
    """q_rows [B, H, r, D] . k [B, Hkv, Lk, D] -> [B, H, r, Lk]; one matmul per kv head, k never repeated."""
    b, h, r, _ = q_rows.shape
    return torch.matmul(_fold_group(q_rows, k.shape[1]), k.transpose(-1, -2)).reshape(b, h, r, k.shape[2])


def _gqa_apply(p: Tensor, v: Tensor) -> Tensor:
    """p [B, H, r, Lk] @ v [B, Hkv, Lk, Dv] -> [B, H, r, Dv], v never repeated."""
    b, h, r, _ = p.shape
    return torch.matmul(_fold_group(p, v.shape[1]), v).reshape(b, h, r, v.shape[-1])


def _gqa_adjoint(p: Tensor, x: Tensor, hkv: int) -> Tensor:
    """Sum over query rows and the GQA group: p [B, H, r, Lk], x [B, H, r, X] -> p^T x as [B, Hkv, Lk, X]."""
    return torch.matmul(_fold_group(p, hkv).transpose(-1, -2), _fold_group(x, hkv))


def _masked_scores(q_rows, k, bmap, rows, block, causal, mask_rows, scale, acc, lq):
    """Scores [B, H, r, Lk] in acc dtype, -inf where not visible (rows of the Lq query rows)."""
    b, h = q_rows.shape[:2]
    s = _gqa_scores(q_rows.to(acc), k.to(acc)) * scale
    if mask_rows is not None and mask_rows.dtype != torch.bool:
        s = s + mask_rows.to(acc)
    allowed = _allowed_rows(bmap, rows, k.shape[2], block, causal, mask_rows, b, h, lq)
    return s.masked_fill(~allowed, float("-inf"))


def block_sparse_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, block_index: Tensor, block_valid: Tensor, block: int,
    mask: Optional[Tensor], scale: float, causal: bool, dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention over the selected key blocks: (out [B,H,Lq,Dv], lse [B,H,Lq], seed int64 CPU scalar)."""
    _check_block_attention_inputs(q, k, v, block_index, block_valid, block, mask, dropout_p)
    b, h, lq, _ = q.shape
    lk, dv = k.shape[2], v.shape[-1]
    acc = _acc_dtype(q.dtype)
    seed = fresh_seed() if dropout_p > 0 else torch.zeros((), dtype=torch.int64)
    drop = philox_dropout_scale((b, h, lq, lk), acc, q.device, dropout_p, seed)  # the kernels' draw
    mask_b = _broadcast_mask(mask, q, k)
    bmap = block_map(block_index, block_valid, lq, lk, block)
    out = attention_output(q, dv)
    lse = torch.empty(b, h, lq, dtype=acc, device=q.device)
    for rows in _row_chunks(lq, b * h * lk):
        s = _masked_scores(q[:, :, rows], k, bmap, rows, block, causal,
                           None if mask_b is None else mask_b[:, :, rows], scale, acc, q.shape[2])
        lse_rows = torch.logsumexp(s, dim=-1)  # -inf for rows with nothing visible
        p = _probs(s, lse_rows)
        if drop is not None:
            p = p * drop[:, :, rows]
        out[:, :, rows] = _gqa_apply(p, v.to(acc)).to(q.dtype)
        lse[:, :, rows] = lse_rows
    return out, lse, seed




@torch.library.custom_op("sparsify::block_sparse_attention", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, block_index: Tensor, block_valid: Tensor, block: int,
    mask: Optional[Tensor], scale: float, causal: bool, dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The CPU implementation; CUDA: sparsify/ops/cuda.py."""
    return block_sparse_attention_reference(q, k, v, block_index, block_valid, block, mask, scale, causal, dropout_p)


@block_sparse_attention.register_fake
def _(q, k, v, block_index, block_valid, block, mask, scale, causal, dropout_p):
    b, h, lq, _ = q.shape
    return (attention_output(q, v.shape[-1]),
            q.new_empty(b, h, lq, dtype=_acc_dtype(q.dtype)),
            torch.empty((), dtype=torch.int64, device="cpu"))


def block_sparse_attention_backward_reference(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, block_index: Tensor, block_valid: Tensor, block: int,
    mask: Optional[Tensor], lse: Tensor, seed: Tensor, scale: float, causal: bool, dropout_p: float,
    needs_grad: list[bool],
) -> list[Tensor]:
    """(dq, dk, dv, dmask) with the block pattern fixed; entries not needed are empty tensors.

    Per chunk of query rows, from the saved inputs and lse only (no saved probabilities):
        S = q K^T * scale (+ float mask), -inf where not visible;  P = exp(S - lse)   (recompute)
        Z = dropout keep / (1 - p) replayed from seed;  Pd = P * Z
        dV += Pd^T dO;  dP = (dO V^T) * Z;  dS = P * (dP - rowsum(P * dP))
        dQ = dS K * scale;  dK += dS^T q * scale;  dmask = dS (then summed to the mask's shape)
    GQA: dK / dV sum over the query heads of each kv head (folded into the rows of one matmul, no repeat).
    """
    needs = _effective_needs(mask, needs_grad)
    b, h, lq, _ = q.shape
    lk, hkv = k.shape[2], k.shape[1]
    acc = _acc_dtype(q.dtype)
    drop = philox_dropout_scale((b, h, lq, lk), acc, q.device, dropout_p, seed)  # the kernels' draw
    mask_b = _broadcast_mask(mask, q, k)
    bmap = block_map(block_index, block_valid, lq, lk, block)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device) if needs[0] else None
    dk = torch.zeros(k.shape, dtype=acc, device=k.device) if needs[1] else None
    dv = torch.zeros(v.shape, dtype=acc, device=v.device) if needs[2] else None
    dmask = torch.zeros(b, h, lq, lk, dtype=acc, device=q.device) if needs[3] else None
    k_acc, v_acc = k.to(acc), v.to(acc)
    for rows in _row_chunks(lq, b * h * lk):
        q_rows = q[:, :, rows].to(acc)
        s = _masked_scores(q_rows, k_acc, bmap, rows, block, causal,
                           None if mask_b is None else mask_b[:, :, rows], scale, acc, q.shape[2])
        p = _probs(s, lse[:, :, rows].to(acc))
        del s
        z = None if drop is None else drop[:, :, rows]
        d_out = grad_out[:, :, rows].to(acc)
        if dv is not None:
            dv += _gqa_adjoint(p if z is None else p * z, d_out, hkv)
        if not (needs[0] or needs[1] or needs[3]):
            continue
        dp = _gqa_scores(d_out, v_acc)
        if z is not None:
            dp = dp * z
        ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
        if dq is not None:
            dq[:, :, rows] = _gqa_apply(ds, k_acc) * scale
        if dk is not None:
            dk += _gqa_adjoint(ds, q_rows, hkv) * scale
        if dmask is not None:
            dmask[:, :, rows] = ds
    if dmask is not None:
        dmask = _reduce_to_shape(dmask, mask.shape).to(mask.dtype).contiguous()
    # one fresh empty tensor per missing gradient: outputs may not alias each other
    return [g.to(t.dtype) if g is not None else grad_out.new_empty(0)
            for g, t in zip((dq, dk, dv, dmask), (q, k, v, mask))]




@torch.library.custom_op("sparsify::block_sparse_attention_backward", mutates_args=())
def block_sparse_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, block_index: Tensor, block_valid: Tensor, block: int,
    mask: Optional[Tensor], lse: Tensor, seed: Tensor, scale: float, causal: bool, dropout_p: float,
    needs_grad: list[bool], out: Optional[Tensor] = None,
) -> list[Tensor]:
    """The CPU implementation; CUDA: sparsify/ops/cuda.py. `out`: the forward's output, from which the CUDA kernel
    takes D_i = rowsum(dO * O) instead of recomputing it from P and dP (two dots fewer per tile); the reference
    computes it from P (the same value)."""
    return block_sparse_attention_backward_reference(grad_out, q, k, v, block_index, block_valid, block, mask, lse, seed, scale, causal, dropout_p, needs_grad)


@block_sparse_attention_backward.register_fake
def _(grad_out, q, k, v, block_index, block_valid, block, mask, lse, seed, scale, causal, dropout_p, needs_grad,
      out=None):
    return placeholder_grads((q, k, v, mask), _effective_needs(mask, needs_grad), grad_out)


def _setup_context(ctx, inputs, output):
    q, k, v, block_index, block_valid, block, mask, scale, causal, dropout_p = inputs
    out, lse, seed = output
    # the output too, as SDPA saves it: the backward kernel reads D_i = rowsum(dO * O) from it
    ctx.save_for_backward(q, k, v, block_index, block_valid, mask, lse, seed, out)
    ctx.mark_non_differentiable(lse)
    ctx.args = (scale, causal, dropout_p)
    ctx.block = block
    ctx.mask_is_float = mask is not None and mask.is_floating_point()


def _backward(ctx, grad_out, _grad_lse, _grad_seed):
    q, k, v, block_index, block_valid, mask, lse, seed, out = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2],
             ctx.needs_input_grad[6] and ctx.mask_is_float]
    grads = torch.ops.sparsify.block_sparse_attention_backward(
        grad_out, q, k, v, block_index, block_valid, ctx.block, mask, lse, seed, *ctx.args, needs, out)
    dq, dk, dv, dmask = (g if need else None for g, need in zip(grads, needs))
    return dq, dk, dv, None, None, None, dmask, None, None, None


block_sparse_attention.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# FLOP formulas (2 FLOPs per multiply-add, as aten.bmm)
# ---------------------------------------------------------------------------------------------
# The number of selected (query block, key block) pairs depends on the data (invalid slots, the causal
# diagonal); the formulas count what a block-skipping kernel does for a full map: every query row visits
# keep_blocks blocks of `block` keys, capped at Lk. The reference above does dense work; this is the cost of
# the method, as for spt_attention.

def _visited_keys(k_shape, block_index_shape, block) -> int:
    return min(k_shape[2], block_index_shape[-1] * block)


def block_sparse_attention_flops(q_shape, k_shape, v_shape, block_index_shape, block_valid_shape, block, *args,
                                 out_shape=None, **kwargs) -> int:
    """S = q K^T and O = P V over the visited keys: 2 * B*H*Lq * min(Lk, keep_blocks*block) * (D + Dv)."""
    b, h, lq, d = q_shape
    return 2 * b * h * lq * _visited_keys(k_shape, block_index_shape, block) * (d + v_shape[-1])


def block_sparse_attention_backward_flops(grad_out_shape, q_shape, k_shape, v_shape, block_index_shape,
                                          block_valid_shape, block, *args, out_shape=None, **kwargs) -> int:
    """Recompute S (D), dV (Dv), dP (Dv), dQ (D), dK (D): 2 * B*H*Lq * min(Lk, keep_blocks*block) * (3D + 2Dv)."""
    b, h, lq, d = q_shape
    return 2 * b * h * lq * _visited_keys(k_shape, block_index_shape, block) * (3 * d + 2 * v_shape[-1])


def qk_select_blocks_flops(q_shape, k_shape, keep_blocks, block, *args, out_shape=None, **kwargs) -> int:
    """The pooled scores: 2 * B*H*nQB*nKB*D (the block sums are additions, not counted)."""
    b, h, lq, d = q_shape
    return 2 * b * h * _cdiv(lq, block) * _cdiv(k_shape[2], block) * d


register_flop_formula(torch.ops.sparsify.qk_select_blocks)(qk_select_blocks_flops)
register_flop_formula(torch.ops.sparsify.block_sparse_attention)(block_sparse_attention_flops)
register_flop_formula(torch.ops.sparsify.block_sparse_attention_backward)(block_sparse_attention_backward_flops)
