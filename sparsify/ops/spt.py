"""SPT (sparse fine-tuning, papers.md section 1): softmax attention on the keys ops/key_select.py kept.

Ops (namespace "sparsify"), each with a fake kernel and a CPU reference in plain torch; FLOP formulas for
spt_attention and its backward are registered at the bottom of this file (CUDA kernels: ops/cuda.py):

    spt_attention(q, k, v, index, valid, mask?, scale, dropout_p) -> (out[B,H,Lq,Dv], lse[B,H,Lq], seed)
        Softmax attention restricted to the kept (valid) slots; backward via spt_attention_backward.
        index / valid [B,H,Lq,keep] come from pq_select or qk_select (ops/key_select.py: the selection, its
        semantics, the codebook loss and selection_recall).

Semantics decisions (the Triton kernels must match these):
  * a row with no valid slot (or every kept key masked) gives out = 0 and lse = -inf, no NaN
    (SDPA's safe softmax). lse is fp32, or fp64 for fp64 inputs (so the backward's recomputed P is exact
    enough for float64 gradcheck); it is returned for the kernels' use and is not differentiable.
GQA: query head h reads kv head h // (H // Hkv); gathers index the kv head, they never repeat K or V.

Memory of this CPU reference (the Triton kernels avoid it): spt_attention gathers K and V to
[B, H, rows, keep, D] per chunk of rows. Rows are chunked (key_select._row_chunks) so these temporaries
stay bounded.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ._vjp import _acc_dtype, fresh_seed, philox_dropout_scale, placeholder_grads
from .key_select import _row_chunks


# ---------------------------------------------------------------------------------------------
# spt_attention: forward and the hand-written backward
# ---------------------------------------------------------------------------------------------

def attention_output(q: Tensor, dv: int) -> Tensor:
    """An empty [B, H, Lq, Dv] output laid out [B, Lq, H, Dv] in memory, as SDPA's is: the model's
    transpose(1, 2).reshape to [B, Lq, H * Dv] is then a view, so the output autograd saves for this op's
    backward and the o-projection's saved input are one storage, not two (1 MB per layer at n 2048, d 128)."""
    b, h, lq, _ = q.shape
    return q.new_empty(b, lq, h, dv).transpose(1, 2)


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
    drop = philox_dropout_scale((b, h, lq, keep), acc, q.device, dropout_p, seed)  # the kernels' draw
    mask_b = _broadcast_mask(mask, q, k)
    out = attention_output(q, dv)
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
    return (attention_output(q, v.shape[-1]),
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
    drop = philox_dropout_scale((b, h, lq, keep), acc, q.device, dropout_p, seed)  # the kernels' draw
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


def pack_selection(index: Tensor, valid: Tensor, lk) -> Tensor:
    """index and valid as one tensor for backward: -1 where a slot is not valid, int16 where every key index
    fits (Lk <= 32767, known without a guard). At keep n/8 the int32 index and the bool mask are 5 bytes per
    slot, more than q, k and v together at head_dim 64 and n 2048; packed they are 2."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    small = torch.int16 if statically_known_true(lk <= torch.iinfo(torch.int16).max) else index.dtype
    return index.to(small).masked_fill(~valid, -1)


def unpack_selection(packed: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    valid = packed >= 0
    return packed.clamp_min(0).to(dtype), valid  # an invalid slot reads key 0, masked out as before


def _spt_setup_context(ctx, inputs, output):
    q, k, v, index, valid, mask, scale, dropout_p = inputs
    _, lse, seed = output
    # exactly what the backward formulas need: no output, no [.., keep] probabilities, the selection packed
    ctx.save_for_backward(q, k, v, pack_selection(index, valid, k.shape[2]), mask, lse, seed)
    ctx.index_dtype = index.dtype
    ctx.mark_non_differentiable(lse)
    ctx.args = (scale, dropout_p)
    ctx.mask_is_float = mask is not None and mask.is_floating_point()


def _spt_backward(ctx, grad_out, _grad_lse, _grad_seed):
    q, k, v, packed, mask, lse, seed = ctx.saved_tensors
    index, valid = unpack_selection(packed, ctx.index_dtype)
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2],
             ctx.needs_input_grad[5] and ctx.mask_is_float]
    grads = torch.ops.sparsify.spt_attention_backward(grad_out, q, k, v, index, valid, mask, lse, seed,
                                                      *ctx.args, needs)
    dq, dk, dv, dmask = (g if need else None for g, need in zip(grads, needs))
    return dq, dk, dv, None, None, dmask, None, None


spt_attention.register_autograd(_spt_backward, setup_context=_spt_setup_context)


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


register_flop_formula(torch.ops.sparsify.spt_attention)(spt_attention_flops)
register_flop_formula(torch.ops.sparsify.spt_attention_backward)(spt_attention_backward_flops)
