"""SPT's key selection (papers.md section 1): which keys each query keeps, before ops/spt.py's sparse attention.

Ops (namespace "sparsify"), each with a fake kernel and a CPU reference in plain torch; their FLOP formulas are
registered at the bottom of this file (CUDA kernels of pq_encode / pq_select: ops/cuda.py):

    pq_encode(x[B,H,L,D], codebook[M,E,dc]) -> codes[B,H,L,M] int32
        code[m] = argmin_e || x_m - C[m, e] ||_1, ties -> lowest e. Integer output: no gradient.
    pq_select(q_codes[B,H,Lq,M], k_codes[B,Hkv,Lk,M], keep, causal, allowed?)
        -> (index[B,H,Lq,keep] int32, valid[B,H,Lq,keep] bool)
        Per query row, the `keep` allowed keys with the most matching codes. allowed: bool, 4 dims, broadcastable
        to [B, H, Lq, Lk] (each of dims 0-2 is 1 or full; HF masks are [B, 1, Lq, Lk], key padding [B, 1, 1, Lk]).
    qk_select(q[B,H,Lq,D], k[B,Hkv,Lk,D], keep, causal, allowed?) -> (index, valid) as pq_select
        The same contract ranked by the exact q . k (score="exact"; no codebook).

Plus two plain functions: codebook_loss (the PQ codebook's auxiliary loss; it reaches the gradient through
sparsify::aux_loss, ops/aux_loss.py) and selection_recall.

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
GQA: query head h reads kv head h // (H // Hkv); the selection broadcasts the kv head, it never repeats K.

Memory of the CPU references (the Triton kernels avoid it): pq_select materialises an int16 score and an
int32 ranking key of [B, H, rows, Lk] for a chunk of query rows. Rows are chunked (_row_chunks, shared with
ops/spt.py's attention references) so these temporaries stay bounded.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ._vjp import _acc_dtype, placeholder_grads, recompute_vjp
from ..codegen.pq_kernels import check_allowed as _kernel_check_allowed, check_select_args
from .causal import causal_keep

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
    """The selection ops' `allowed` mask: the kernel layer's one contract (codegen/pq_kernels.check_allowed)."""
    _kernel_check_allowed(f"sparsify::{op}", allowed, b, h, lq, lk)


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
    """pq_select's arguments: the same contract as its kernel's (codegen/pq_kernels.check_select_args)."""
    check_select_args("sparsify::pq_select", q_codes, k_codes, keep, allowed)


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
# Codebook loss
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


@torch.library.custom_op("sparsify::codebook_loss", mutates_args=())
def codebook_loss_recompute(z: Tensor, codebook: Tensor) -> Tensor:
    """codebook_loss as an op that saves only its inputs and recomputes the rest in backward: the distances and
    soft assignments ([N, M, E] each, several times q's size) are never kept for backward. In SPT's graph z is
    q or k, which the attention saves anyway: the loss then costs no saved bytes but the codebook's."""
    return codebook_loss(z, codebook)


@codebook_loss_recompute.register_fake
def _(z, codebook):
    return z.new_empty((), dtype=_acc_dtype(torch.promote_types(z.dtype, codebook.dtype)))


@torch.library.custom_op("sparsify::codebook_loss_backward", mutates_args=())
def codebook_loss_backward(grad: Tensor, z: Tensor, codebook: Tensor, needs_grad: list[bool]) -> list[Tensor]:
    return recompute_vjp(codebook_loss, (z, codebook), needs_grad, grad)


@codebook_loss_backward.register_fake
def _(grad, z, codebook, needs_grad):
    return placeholder_grads((z, codebook), needs_grad, z)


def _codebook_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _codebook_backward(ctx, grad):
    z, codebook = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    dz, dc = torch.ops.sparsify.codebook_loss_backward(grad, z, codebook, needs)
    return (dz if needs[0] else None), (dc if needs[1] else None)


codebook_loss_recompute.register_autograd(_codebook_backward, setup_context=_codebook_setup)


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


register_flop_formula(torch.ops.sparsify.pq_select)(pq_select_flops)
register_flop_formula(torch.ops.sparsify.pq_encode)(pq_encode_flops)
register_flop_formula(torch.ops.sparsify.qk_select)(qk_select_flops)
