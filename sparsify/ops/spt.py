"""SPT (sparse fine-tuning, papers.md section 1): product-quantised key selection + attention on the kept keys.

Ops (namespace "sparsify"), each with a fake kernel and a CPU reference in plain torch; FLOP formulas for
pq_encode, pq_select, spt_attention and its backward are registered at the bottom of this file:

    pq_encode(x[B,H,L,D], codebook[M,E,dc]) -> codes[B,H,L,M] int32
        code[m] = argmin_e || x_m - C[m, e] ||_1, ties -> lowest e. Integer output: no gradient.
    pq_select(q_codes[B,H,Lq,M], k_codes[B,Hkv,Lk,M], keep, causal, allowed?)
        -> (index[B,H,Lq,keep] int32, valid[B,H,Lq,keep] bool)
        Per query row, the `keep` allowed keys with the most matching codes. allowed: bool, 4 dims, broadcastable
        to [B, H, Lq, Lk] (each of dims 0-2 is 1 or full; HF masks are [B, 1, Lq, Lk], key padding [B, 1, 1, Lk]).
    qk_select(q[B,H,Lq,D], k[B,Hkv,Lk,D], keep, causal, allowed?) -> (index, valid) as pq_select
        The same contract ranked by the exact q . k (score="exact"; no codebook).
    spt_attention(q, k, v, index, valid, mask?, scale, dropout_p) -> (out[B,H,Lq,Dv], lse[B,H,Lq], seed)
        Softmax attention restricted to the kept (valid) slots; backward via spt_attention_backward.
    (the codebook loss reaches the gradient through sparsify::aux_loss, ops/aux_loss.py)

Plus two plain functions: codebook_loss (the PQ codebook's auxiliary loss) and selection_recall.

Semantics decisions (the Triton kernels must match these):
  * Candidates: key j is a candidate for query i of head h iff allowed[b, h, i, j] (broadcast) and, when
    `causal`, j <= i + (Lk - Lq) (bottom-right: the one definition, ops/causal.py); every other structure
    (padding, HF's causal masks, sliding windows, block-diagonal packing) arrives in `allowed`, row by row,
    never reduced to a key mask.
  * Ranking: highest score first, ties broken by the lower key index (deterministic). The kept slots of a row
    are then returned sorted by ascending key index (ELL layout, friendlier to a kernel's loads), with the
    invalid slots last.
  * A row with fewer than `keep` allowed keys (first causal rows, padding) gets valid=False, index 0 in the
    spare slots: never a duplicate of a kept key (a duplicate would count that key twice in the softmax).
  * spt_attention: a row with no valid slot (or every kept key masked) gives out = 0 and lse = -inf, no NaN
    (SDPA's safe softmax). lse is fp32, or fp64 for fp64 inputs (so the backward's recomputed P is exact
    enough for float64 gradcheck); it is returned for the kernels' use and is not differentiable.
GQA: query head h reads kv head h // (H // Hkv); gathers index the kv head, they never repeat K or V.

Memory of this CPU reference (the Triton kernels avoid both): pq_select materialises an int16 score and an
int32 ranking key of [B, H, rows, Lk] for a chunk of query rows; spt_attention gathers K and V to
[B, H, rows, keep, D] per chunk of rows. Rows are chunked so these temporaries stay bounded.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .causal import causal_keep

from ._vjp import _acc_dtype, fresh_seed, placeholder_grads, seeded_dropout

# Element budget for the per-chunk temporaries of the references (about 64 MiB in fp32).
_CHUNK_ELEMS = 1 << 24



def _row_chunks(rows: int, per_row: int):
    step = max(1, _CHUNK_ELEMS // max(1, per_row))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


# ---------------------------------------------------------------------------------------------
# pq_encode
# ---------------------------------------------------------------------------------------------

def _split_subspaces(x: Tensor, codebook: Tensor) -> Tensor:
    """[..., D] -> [N, M, dc]."""
    m, _, dc = codebook.shape
    if x.shape[-1] != m * dc:
        raise ValueError(f"sparsify::pq: head dim {x.shape[-1]} != M * dc = {m} * {dc} (codebook "
                         f"{tuple(codebook.shape)})")
    return x.reshape(-1, m, dc)


def l1_distances(x: Tensor, codebook: Tensor) -> Tensor:
    """L1 distance of every sub-vector to every codeword: x [..., M*dc], codebook [M, E, dc] -> [N, M, E].

    Differentiable (torch.cdist keeps only its inputs for backward, not the [N, M, E, dc] differences).
    Computed in fp32 or wider, so half-precision inputs give the same codes as their fp32 upcast.
    """
    dtype = _acc_dtype(torch.promote_types(x.dtype, codebook.dtype))
    sub = _split_subspaces(x, codebook).to(dtype)                        # [N, M, dc]
    dist = torch.cdist(sub.transpose(0, 1), codebook.to(dtype), p=1.0)  # [M, N, E]
    return dist.transpose(0, 1)


@torch.library.custom_op("sparsify::pq_encode", mutates_args=())
def pq_encode(x: Tensor, codebook: Tensor) -> Tensor:
    """PQ codes of x [B, H, L, D] under codebook [M, E, dc]: [B, H, L, M] int32 (L1 nearest, lowest e on ties)."""
    if x.dim() != 4 or codebook.dim() != 3:
        raise ValueError(f"sparsify::pq_encode expects x [B,H,L,D] and codebook [M,E,dc]; got "
                         f"{tuple(x.shape)}, {tuple(codebook.shape)}")
    m = codebook.shape[0]
    flat = x.reshape(-1, x.shape[-1])
    codes = torch.empty(flat.shape[0], m, dtype=torch.int32, device=x.device)
    for rows in _row_chunks(flat.shape[0], m * codebook.shape[1] * codebook.shape[2]):
        # argmin returns the first minimum, which is the lowest codeword index on ties
        codes[rows] = l1_distances(flat[rows], codebook).argmin(dim=-1).to(torch.int32)
    return codes.reshape(*x.shape[:-1], m)


@pq_encode.register_fake
def _(x, codebook):
    return torch.empty((*x.shape[:-1], codebook.shape[0]), dtype=torch.int32, device=x.device)


# ---------------------------------------------------------------------------------------------
# pq_select
# ---------------------------------------------------------------------------------------------

def check_allowed(op: str, allowed: Optional[Tensor], b: int, h: int, lq: int, lk: int) -> None:
    """The selection ops' `allowed` mask: bool, 4 dims, each of dims 0-2 either 1 or [B, H, Lq], dim 3 Lk."""
    if allowed is None:
        return
    full = (b, h, lq, lk)
    if allowed.dtype != torch.bool or allowed.dim() != 4 or allowed.shape[3] != lk or any(
            n not in (1, f) for n, f in zip(allowed.shape[:3], full[:3])):
        raise ValueError(f"sparsify::{op}: allowed must be a bool mask broadcastable to [B, H, Lq, Lk] = {full} "
                         f"with 4 dims, got {allowed.dtype} {tuple(allowed.shape)}")


def allowed_rows(allowed: Optional[Tensor], rows: slice, lq: int, hkv: int, groups: int) -> Optional[Tensor]:
    """`allowed` for the query rows `rows`, shaped to broadcast against [B, Hkv, G, rows, Lk] (GQA as a dim)."""
    if allowed is None:
        return None
    chunk = allowed.expand(-1, -1, lq, -1)[:, :, rows]
    if chunk.shape[1] == 1:
        return chunk.unsqueeze(2)
    return chunk.reshape(chunk.shape[0], hkv, groups, *chunk.shape[2:])


def causal_rows(rows: slice, lk: int, device, lq: int) -> Tensor:
    """[rows, Lk] bool: the keys each of these query rows may see (bottom-right aligned, ops/causal.py)."""
    return causal_keep(rows, lq, lk, device)


def _check_select_inputs(q_codes, k_codes, keep, allowed):
    if q_codes.dim() != 4 or k_codes.dim() != 4:
        raise ValueError(f"sparsify::pq_select expects codes [B,H,L,M]; got {tuple(q_codes.shape)}, "
                         f"{tuple(k_codes.shape)}")
    b, h, _, m = q_codes.shape
    if k_codes.shape[0] != b or k_codes.shape[-1] != m or h % k_codes.shape[1] != 0:
        raise ValueError(f"sparsify::pq_select: incompatible code shapes {tuple(q_codes.shape)} and "
                         f"{tuple(k_codes.shape)} (need equal B and M, H % Hkv == 0)")
    if q_codes.is_floating_point() or k_codes.is_floating_point():
        raise ValueError("sparsify::pq_select: codes must be integer tensors")
    if m >= 2**15:
        raise ValueError(f"sparsify::pq_select: M={m} overflows the int16 score")
    lk = k_codes.shape[2]
    if not 1 <= keep <= lk:
        raise ValueError(f"sparsify::pq_select: keep must be in [1, Lk={lk}], got {keep}")
    check_allowed("pq_select", allowed, b, h, q_codes.shape[2], lk)


@torch.library.custom_op("sparsify::pq_select", mutates_args=())
def pq_select(
    q_codes: Tensor, k_codes: Tensor, keep: int, causal: bool, allowed: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """Top-`keep` keys per query by code matches: (index int32, valid bool), both [B, H, Lq, keep]."""
    _check_select_inputs(q_codes, k_codes, keep, allowed)
    b, h, lq, m = q_codes.shape
    hkv, lk = k_codes.shape[1], k_codes.shape[2]
    groups = h // hkv
    qc = q_codes.reshape(b, hkv, groups, lq, m)     # GQA as a broadcast dim, no repeat of k_codes
    kc = k_codes.reshape(b, hkv, 1, 1, lk, m)
    keys = torch.arange(lk, device=q_codes.device)
    # rank key = score * Lk + (Lk - 1 - j): unique per allowed key, higher is better, lower j wins ties;
    # disallowed keys get -1. int32 is enough: (M + 1) * Lk < 2**31 for any realistic M and Lk.
    tie_break = (lk - 1 - keys).to(torch.int32)
    index = torch.empty(b, hkv, groups, lq, keep, dtype=torch.int32, device=q_codes.device)
    valid = torch.empty(b, hkv, groups, lq, keep, dtype=torch.bool, device=q_codes.device)
    for rows in _row_chunks(lq, b * h * lk):
        score = torch.zeros(b, hkv, groups, rows.stop - rows.start, lk, dtype=torch.int16, device=q_codes.device)
        for sub in range(m):  # one subspace at a time keeps the temporary at [.., rows, Lk] bool
            score += qc[:, :, :, rows, sub, None] == kc[..., sub]
        rank = score.to(torch.int32) * lk + tie_break
        candidate = torch.ones_like(rank, dtype=torch.bool)
        if causal:
            candidate = candidate & causal_rows(rows, lk, q_codes.device, lq)
        if allowed is not None:
            candidate = candidate & allowed_rows(allowed, rows, lq, hkv, groups)
        rank = rank.masked_fill(~candidate, -1)
        top_rank, top_idx = rank.topk(keep, dim=-1)
        index[:, :, :, rows], valid[:, :, :, rows] = _ell_layout(top_idx, top_rank >= 0, lk)
    return index.reshape(b, h, lq, keep), valid.reshape(b, h, lq, keep)


@pq_select.register_fake
def _(q_codes, k_codes, keep, causal, allowed):
    shape = (*q_codes.shape[:-1], keep)
    return (torch.empty(shape, dtype=torch.int32, device=q_codes.device),
            torch.empty(shape, dtype=torch.bool, device=q_codes.device))


# ---------------------------------------------------------------------------------------------
# qk_select: the exact top-L (score="exact")
# ---------------------------------------------------------------------------------------------

def check_qk_select_inputs(op: str, q: Tensor, k: Tensor, keep: int, block: int, allowed: Optional[Tensor]):
    """Shared by qk_select (block = 1: keep counts keys) and qk_select_blocks (keep counts key blocks)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] \
            or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"sparsify::{op} expects q [B,H,Lq,D] and k [B,Hkv,Lk,D] with H % Hkv == 0; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}")
    if block < 1:
        raise ValueError(f"sparsify::{op}: block must be >= 1, got {block}")
    b, lk = q.shape[0], k.shape[2]
    units = -(-lk // block)
    if not 1 <= keep <= units:
        what = "Lk" if block == 1 else "nKB"
        raise ValueError(f"sparsify::{op}: keep must be in [1, {what}={units}], got {keep}")
    check_allowed(op, allowed, b, q.shape[1], q.shape[2], lk)


@torch.library.custom_op("sparsify::qk_select", mutates_args=())
def qk_select(
    q: Tensor, k: Tensor, keep: int, causal: bool, allowed: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """Top-`keep` keys per query by the exact score q . k: (index int32, valid bool), both [B, H, Lq, keep].

    pq_select's contract (allowed keys, ELL layout, invalid slots last with index 0) with the true score
    instead of the code-match count: the selection of top-k attention (Gupta et al. 2021). Ties go to the
    lower key index. Costs one Q K^T per query chunk in the forward, computed
    in fp32 (fp64 for fp64 inputs) and dropped at once: nothing of size Lq x Lk is kept or saved, and the
    selection has no gradient. Plain torch, so the same code runs on CPU and CUDA (cuBLAS + topk).
    """
    check_qk_select_inputs("qk_select", q, k, keep, 1, allowed)
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    groups = h // hkv
    acc = _acc_dtype(q.dtype)
    qg = q.reshape(b, hkv, groups, lq, d)          # GQA as a broadcast dim, no repeat of k
    kt = k.to(acc).transpose(-1, -2)[:, :, None]  # [B, Hkv, 1, D, Lk]
    keys = torch.arange(lk, device=q.device, dtype=torch.int32)
    slots = torch.arange(keep, device=q.device)
    index = torch.empty(b, hkv, groups, lq, keep, dtype=torch.int32, device=q.device)
    valid = torch.empty(b, hkv, groups, lq, keep, dtype=torch.bool, device=q.device)
    with torch.no_grad():
        for rows in _row_chunks(lq, b * h * lk):
            score = qg[:, :, :, rows].to(acc) @ kt                   # [B, Hkv, G, rows, Lk]
            # NaN scores rank as disallowed, so a NaN row selects nothing rather than garbage
            candidate = ~score.isnan()
            if causal:
                candidate = candidate & causal_rows(rows, lk, q.device, lq)
            if allowed is not None:
                candidate = candidate & allowed_rows(allowed, rows, lq, hkv, groups)
            score = score.masked_fill(~candidate, float("-inf"))
            # threshold selection, cheaper than a sort: every key above the L-th best score, then the
            # lowest-index keys tied with it until L are taken
            cut = score.topk(keep, dim=-1).values[..., -1:]
            above = score > cut
            tied = (score == cut) & candidate
            chosen = above | (tied & (tied.cumsum(-1) <= keep - above.sum(-1, keepdim=True)))
            # ELL layout without a sort: the chosen keys in ascending order fill slots 0.. of the row,
            # everything else is scattered into a spare column that is dropped
            slot = torch.where(chosen, chosen.cumsum(-1) - 1, keep)
            out = torch.zeros(*slot.shape[:-1], keep + 1, dtype=torch.int32, device=q.device)
            out.scatter_(-1, slot, keys.expand_as(slot))
            ok = slots < chosen.sum(-1, keepdim=True)
            index[:, :, :, rows] = torch.where(ok, out[..., :keep], 0)
            valid[:, :, :, rows] = ok
    return index.reshape(b, h, lq, keep), valid.reshape(b, h, lq, keep)


@qk_select.register_fake
def _(q, k, keep, causal, allowed):
    shape = (*q.shape[:-1], keep)
    return q.new_empty(shape, dtype=torch.int32), q.new_empty(shape, dtype=torch.bool)


def _ell_layout(top_idx: Tensor, ok: Tensor, lk: int) -> tuple[Tensor, Tensor]:
    """Kept keys in ascending order, spare (invalid) slots last with index 0: (index int32, valid)."""
    sorted_idx, _ = torch.where(ok, top_idx, lk).sort(dim=-1)
    ok = sorted_idx < lk
    return torch.where(ok, sorted_idx, 0).to(torch.int32), ok


# ---------------------------------------------------------------------------------------------
# spt_attention: forward and the hand-written backward
# ---------------------------------------------------------------------------------------------

def _check_spt_inputs(q, k, v, index, valid, mask, dropout_p):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"sparsify::spt_attention expects 4-d q, k, v; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    b, h, lq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b or h % k.shape[1] != 0 or k.shape[1] != v.shape[1] \
            or k.shape[-1] != d or k.shape[2] != v.shape[2]:
        raise ValueError(f"sparsify::spt_attention: incompatible q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if index.dim() != 4 or tuple(index.shape[:3]) != (b, h, lq) or index.is_floating_point() \
            or index.dtype == torch.bool:
        raise ValueError(f"sparsify::spt_attention: index must be integer [B, H, Lq, keep] with B, H, Lq = "
                         f"{(b, h, lq)}; got {index.dtype} {tuple(index.shape)}")
    if valid.dtype != torch.bool or valid.shape != index.shape:
        raise ValueError(f"sparsify::spt_attention: valid must be bool of index's shape {tuple(index.shape)}")
    if mask is not None:
        try:
            torch.broadcast_shapes(mask.shape, (b, h, lq, k.shape[2]))
        except RuntimeError:
            raise ValueError(f"sparsify::spt_attention: mask {tuple(mask.shape)} does not broadcast to "
                             f"{(b, h, lq, k.shape[2])}") from None
        if mask.dim() > 4:
            raise ValueError(f"sparsify::spt_attention: mask has {mask.dim()} dims")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"sparsify::spt_attention: dropout_p must be in [0, 1], got {dropout_p}")


def _gather_kv(t: Tensor, idx: Tensor) -> Tensor:
    """t [B, Hkv, Lk, X], idx [B, H, rows, S] int64 -> t[b, h // G, idx] as [B, H, rows, S, X], no repeat."""
    b, hkv, _, x = t.shape
    _, h, rows, s = idx.shape
    flat = idx.reshape(b, hkv, (h // hkv) * rows * s)  # h = hkv * G + g, so this groups heads by kv head
    out = t.gather(2, flat.unsqueeze(-1).expand(-1, -1, -1, x))
    return out.reshape(b, h, rows, s, x)


def _scatter_kv(dst: Tensor, idx: Tensor, src: Tensor) -> None:
    """Adjoint of _gather_kv: dst [B, Hkv, Lk, X] += src [B, H, rows, S, X] at idx (sums GQA groups)."""
    b, hkv, _, x = dst.shape
    flat = idx.reshape(b, hkv, -1)
    dst.scatter_add_(2, flat.unsqueeze(-1).expand(-1, -1, -1, x), src.reshape(b, hkv, -1, x))


def _scores(q, k, idx, valid, mask_b, scale, acc):
    """Masked scores of the kept slots, [B, H, rows, S] in acc dtype; -inf where masked out; and K gathered."""
    kg = _gather_kv(k, idx)
    s = torch.einsum("bhid,bhisd->bhis", q.to(acc), kg.to(acc)) * scale
    if mask_b is not None:
        m = mask_b.gather(-1, idx)
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(acc)
    return s.masked_fill(~valid, float("-inf")), kg


def _probs(s: Tensor, lse: Tensor) -> Tensor:
    """exp(s - lse), renormalised, with empty rows (lse = -inf) giving 0 instead of NaN.

    The renormalisation matters where every score of a row carries a huge finite mask (HF's finfo.min on a
    left-padding row): lse = max + log(sum) rounds to max there, exp(s - lse) sums to the row length instead
    of 1, and eager's softmax (the uniform average) would be missed by that factor."""
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1))
    total = p.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, p / torch.where(total > 0, total, 1.0), 0.0)


def _dropout_scale(shape, dtype, device, p: float, seed: Tensor) -> Optional[Tensor]:
    """keep / (1 - p) over the [B, H, Lq, S] probabilities, the same draw as _vjp.seeded_dropout."""
    if p <= 0.0:
        return None
    return seeded_dropout(torch.ones(shape, dtype=dtype, device=device), p, seed)


def _broadcast_mask(mask, q, k):
    if mask is None:
        return None
    return mask.broadcast_to(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def spt_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, index: Tensor, valid: Tensor, mask: Optional[Tensor],
    scale: float, dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention over the kept slots: (out [B,H,Lq,Dv], lse [B,H,Lq], seed int64 CPU scalar)."""
    _check_spt_inputs(q, k, v, index, valid, mask, dropout_p)
    b, h, lq, d = q.shape
    dv = v.shape[-1]
    keep = index.shape[-1]
    acc = _acc_dtype(q.dtype)
    seed = fresh_seed() if dropout_p > 0 else torch.zeros((), dtype=torch.int64)
    drop = _dropout_scale((b, h, lq, keep), acc, q.device, dropout_p, seed)
    mask_b = _broadcast_mask(mask, q, k)
    out = q.new_empty(b, h, lq, dv)
    lse = torch.empty(b, h, lq, dtype=acc, device=q.device)
    for rows in _row_chunks(lq, b * h * keep * max(d, dv)):
        idx = index[:, :, rows].long()
        s, _ = _scores(q[:, :, rows], k, idx, valid[:, :, rows],
                       None if mask_b is None else mask_b[:, :, rows], scale, acc)
        lse_rows = torch.logsumexp(s, dim=-1)  # -inf for rows with nothing valid
        p = _probs(s, lse_rows)
        if drop is not None:
            p = p * drop[:, :, rows]
        out[:, :, rows] = torch.einsum("bhis,bhisd->bhid", p, _gather_kv(v, idx).to(acc)).to(q.dtype)
        lse[:, :, rows] = lse_rows
    return out, lse, seed




@torch.library.custom_op("sparsify::spt_attention", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def spt_attention(
    q: Tensor, k: Tensor, v: Tensor, index: Tensor, valid: Tensor, mask: Optional[Tensor],
    scale: float, dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The CPU implementation; CUDA: sparsify/ops/cuda.py."""
    return spt_attention_reference(q, k, v, index, valid, mask, scale, dropout_p)


@spt_attention.register_fake
def _(q, k, v, index, valid, mask, scale, dropout_p):
    b, h, lq, _ = q.shape
    return (q.new_empty(b, h, lq, v.shape[-1]),
            q.new_empty(b, h, lq, dtype=_acc_dtype(q.dtype)),
            torch.empty((), dtype=torch.int64, device="cpu"))


def _effective_needs(mask: Optional[Tensor], needs_grad: list[bool]) -> list[bool]:
    """A mask gradient exists only for a float (additive) mask."""
    needs = list(needs_grad) + [False] * (4 - len(needs_grad))
    needs[3] = bool(needs[3]) and mask is not None and mask.is_floating_point()
    return needs[:4]


def _reduce_to_shape(grad: Tensor, shape) -> Tensor:
    """Sum a [B, H, Lq, Lk] gradient down to the shape it was broadcast from."""
    lead = grad.dim() - len(shape)
    if lead:
        grad = grad.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def spt_attention_backward_reference(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, index: Tensor, valid: Tensor, mask: Optional[Tensor],
    lse: Tensor, seed: Tensor, scale: float, dropout_p: float, needs_grad: list[bool],
) -> list[Tensor]:
    """(dq, dk, dv, dmask) with the pattern fixed; entries not needed are empty tensors.

    Per chunk of query rows, from the saved inputs and lse only (no saved probabilities):
        S = q . K[idx] * scale (+ mask), P = exp(S - lse)        (recompute, masked slots -> 0)
        Z = dropout keep / (1 - p) replayed from seed;  Pd = P * Z
        dV[idx] += Pd^T dO;  dP = (dO . V[idx]) * Z;  dS = P * (dP - rowsum(P * dP))
        dQ = dS K[idx] * scale;  dK[idx] += dS^T q * scale;  dmask[.., idx] += dS (then un-broadcast)
    """
    needs = _effective_needs(mask, needs_grad)
    b, h, lq, d = q.shape
    keep = index.shape[-1]
    acc = _acc_dtype(q.dtype)
    drop = _dropout_scale((b, h, lq, keep), acc, q.device, dropout_p, seed)
    mask_b = _broadcast_mask(mask, q, k)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device) if needs[0] else None
    dk = torch.zeros(k.shape, dtype=acc, device=k.device) if needs[1] else None
    dv = torch.zeros(v.shape, dtype=acc, device=v.device) if needs[2] else None
    # the mask's gradient is dense by nature: [B, H, Lq, Lk] before reducing to the mask's own shape
    dmask = torch.zeros(b, h, lq, k.shape[2], dtype=acc, device=q.device) if needs[3] else None
    for rows in _row_chunks(lq, b * h * keep * max(d, v.shape[-1])):
        idx = index[:, :, rows].long()
        q_rows = q[:, :, rows].to(acc)
        s, kg = _scores(q_rows, k, idx, valid[:, :, rows],
                        None if mask_b is None else mask_b[:, :, rows], scale, acc)
        p = _probs(s, lse[:, :, rows].to(acc))
        del s
        z = None if drop is None else drop[:, :, rows]
        d_out = grad_out[:, :, rows].to(acc)
        if dv is not None:
            pd = p if z is None else p * z
            _scatter_kv(dv, idx, pd.unsqueeze(-1) * d_out.unsqueeze(-2))
        if not (needs[0] or needs[1] or needs[3]):
            continue
        dp = torch.einsum("bhid,bhisd->bhis", d_out, _gather_kv(v, idx).to(acc))
        if z is not None:
            dp = dp * z
        ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
        if dq is not None:
            dq[:, :, rows] = torch.einsum("bhis,bhisd->bhid", ds, kg.to(acc)) * scale
        if dk is not None:
            _scatter_kv(dk, idx, (ds * scale).unsqueeze(-1) * q_rows.unsqueeze(-2))
        if dmask is not None:
            dmask[:, :, rows].scatter_add_(-1, idx, ds)  # invalid slots have ds = 0: adding 0 at index 0
    if dmask is not None:
        dmask = _reduce_to_shape(dmask, mask.shape).to(mask.dtype).contiguous()
    # one fresh empty tensor per missing gradient: outputs may not alias each other
    return [g.to(t.dtype) if g is not None else grad_out.new_empty(0)
            for g, t in zip((dq, dk, dv, dmask), (q, k, v, mask))]




@torch.library.custom_op("sparsify::spt_attention_backward", mutates_args=())
def spt_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, index: Tensor, valid: Tensor, mask: Optional[Tensor],
    lse: Tensor, seed: Tensor, scale: float, dropout_p: float, needs_grad: list[bool],
) -> list[Tensor]:
    """The CPU implementation; CUDA: sparsify/ops/cuda.py."""
    return spt_attention_backward_reference(grad_out, q, k, v, index, valid, mask, lse, seed, scale, dropout_p, needs_grad)


@spt_attention_backward.register_fake
def _(grad_out, q, k, v, index, valid, mask, lse, seed, scale, dropout_p, needs_grad):
    return placeholder_grads((q, k, v, mask), _effective_needs(mask, needs_grad), grad_out)


def _spt_setup_context(ctx, inputs, output):
    q, k, v, index, valid, mask, scale, dropout_p = inputs
    _, lse, seed = output
    # exactly what the backward formulas need: no output, no [.., keep] probabilities
    ctx.save_for_backward(q, k, v, index, valid, mask, lse, seed)
    ctx.mark_non_differentiable(lse)
    ctx.args = (scale, dropout_p)
    ctx.mask_is_float = mask is not None and mask.is_floating_point()


def _spt_backward(ctx, grad_out, _grad_lse, _grad_seed):
    q, k, v, index, valid, mask, lse, seed = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2],
             ctx.needs_input_grad[5] and ctx.mask_is_float]
    grads = torch.ops.sparsify.spt_attention_backward(grad_out, q, k, v, index, valid, mask, lse, seed,
                                                      *ctx.args, needs)
    dq, dk, dv, dmask = (g if need else None for g, need in zip(grads, needs))
    return dq, dk, dv, None, None, dmask, None, None


spt_attention.register_autograd(_spt_backward, setup_context=_spt_setup_context)


# ---------------------------------------------------------------------------------------------
# Codebook loss and gradient injection
# ---------------------------------------------------------------------------------------------

def codebook_loss(z: Tensor, codebook: Tensor) -> Tensor:
    """PQ codebook loss of z [..., D] (q or k, per head) under codebook [M, E, dc]; a scalar (fp32 or wider).

        dist  = L1(z_m, C[m, e])                          [N, M, E]
        a     = softmax(-log(clamp(dist, 1e-5)), dim=E)   soft assignment
        z_q   = C[m, argmin_e dist]                       hard centroid
        loss  = MSE(a @ C, z_q) + MSE(z, z_q)

    Gradient flow (our choice; papers.md fixes the formula, not the detaching):
      * term 1 trains only the codebook: z is detached there, C gets gradient through both a @ C (and the
        distances inside a) and z_q. It pulls the soft assignment towards the hard one, so the codewords
        spread so that each sub-vector has one clearly nearest codeword.
      * term 2 trains both: C through z_q (codewords move towards the sub-vectors assigned to them, as in
        k-means) and z (q / k are pulled towards their centroids, so LoRA weights upstream see it).
    Apply it to q and to k and add the two (the caller's business).
    """
    m, e, dc = codebook.shape
    dtype = _acc_dtype(torch.promote_types(z.dtype, codebook.dtype))
    zs, cb = _split_subspaces(z, codebook).to(dtype), codebook.to(dtype)
    dist = l1_distances(z.detach(), cb)                               # [N, M, E], z detached (term 1)
    assign = torch.softmax(-torch.log(dist.clamp_min(1e-5)), dim=-1)
    z_soft = torch.einsum("nme,med->nmd", assign, cb)
    code = dist.detach().argmin(dim=-1)                               # [N, M]
    z_q = cb[torch.arange(m, device=cb.device), code]                 # [N, M, dc], gradient to C
    return F.mse_loss(z_soft, z_q) + F.mse_loss(zs, z_q)




# ---------------------------------------------------------------------------------------------
# Selection quality
# ---------------------------------------------------------------------------------------------

def selection_recall(
    q: Tensor, k: Tensor, index: Tensor, valid: Tensor, keep: int, causal: bool,
    allowed: Optional[Tensor] = None,
) -> float:
    """Mean over query rows of |selected & exact top-L| / L, where exact top-L ranks the allowed keys by q . k
    and L = min(keep, allowed keys in the row); rows with no allowed key are skipped. Materialises the dense
    [B, H, Lq, Lk] scores: an evaluation tool, not a training path."""
    b, h, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    groups = h // hkv
    with torch.no_grad():
        scores = torch.einsum("bkgid,bkjd->bkgij", q.reshape(b, hkv, groups, lq, -1).double(), k.double())
        scores = scores.reshape(b, h, lq, lk)
        candidate = torch.ones(lq, lk, dtype=torch.bool, device=q.device).expand(b, h, lq, lk)
        if causal:
            candidate = candidate & causal_keep(slice(0, lq), lq, lk, q.device)
        if allowed is not None:
            candidate = candidate & allowed
        target = candidate.sum(-1).clamp(max=keep)
        top = scores.masked_fill(~candidate, float("-inf")).topk(keep, dim=-1).indices
        in_top = torch.zeros(b, h, lq, lk, dtype=torch.bool, device=q.device)
        slot = torch.arange(keep, device=q.device)
        in_top.scatter_(-1, top, (slot < target.unsqueeze(-1)))
        # spare slots go to an extra column, so their index 0 never unmarks a kept key 0
        picked = torch.zeros(b, h, lq, lk + 1, dtype=torch.bool, device=q.device)
        picked.scatter_(-1, torch.where(valid, index.long(), lk), True)
        picked = picked[..., :lk]
        hits = (picked & in_top).sum(-1)
        rows = target > 0
        return (hits[rows].double() / target[rows].double()).mean().item() if rows.any() else 1.0


# ---------------------------------------------------------------------------------------------
# FLOP formulas (2 FLOPs per multiply-add, as aten.bmm)
# ---------------------------------------------------------------------------------------------

def spt_attention_flops(q_shape, k_shape, v_shape, index_shape, *args, out_shape=None, **kwargs) -> int:
    """S = q . K[idx] and O = P V[idx] over the kept slots only."""
    b, h, lq, d = q_shape
    return 2 * b * h * lq * index_shape[-1] * (d + v_shape[-1])


def spt_attention_backward_flops(grad_out_shape, q_shape, k_shape, v_shape, index_shape, *args,
                                 out_shape=None, **kwargs) -> int:
    """Recompute S (D), dV (Dv), dP (Dv), dQ (D), dK (D): 2 * B*H*Lq*keep * (3D + 2Dv). O is not recomputed
    (rowsum(P * dP) replaces rowsum(dO * O)), so this is 2.5x the forward for D == Dv, not 3x."""
    b, h, lq, d = q_shape
    return 2 * b * h * lq * index_shape[-1] * (3 * d + 2 * v_shape[-1])


def pq_select_flops(q_codes_shape, k_codes_shape, *args, out_shape=None, **kwargs) -> int:
    """One per code comparison-and-count, B*H*Lq*Lk*M. Integer work, but counted: it is the only part of
    SPT that scales with Lq * Lk, and leaving it out would flatter the FLOP comparison against dense."""
    b, h, lq, m = q_codes_shape
    return b * h * lq * k_codes_shape[2] * m


def qk_select_flops(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    """The scores q . k of every (query, key) pair: 2 * B*H*Lq*Lk*D (the sort is not counted)."""
    b, h, lq, d = q_shape
    return 2 * b * h * lq * k_shape[2] * d


def pq_encode_flops(x_shape, codebook_shape, *args, out_shape=None, **kwargs) -> int:
    """2 per (sub-vector, codeword, dim): |x - c| accumulated, B*H*L*M*E*dc*2."""
    m, e, dc = codebook_shape
    return math.prod(x_shape[:-1]) * m * e * dc * 2


register_flop_formula(torch.ops.sparsify.spt_attention)(spt_attention_flops)
register_flop_formula(torch.ops.sparsify.spt_attention_backward)(spt_attention_backward_flops)
register_flop_formula(torch.ops.sparsify.pq_select)(pq_select_flops)
register_flop_formula(torch.ops.sparsify.pq_encode)(pq_encode_flops)
register_flop_formula(torch.ops.sparsify.qk_select)(qk_select_flops)
