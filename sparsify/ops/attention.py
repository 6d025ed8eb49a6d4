"""sparsify::attention: dense scaled-dot-product attention, the op every attention region becomes.

Semantics (the union of what Hugging Face models spell out by hand and what SDPA does):
    scores = (q @ k^T) * scale             q: [B, H, Lq, D], k: [B, Hkv, Lk, D], H % Hkv == 0 (GQA)
    scores = causal_mask(scores)           if is_causal (bottom-right aligned: ops/causal.py)
    scores = scores + mask                 float mask: additive, may carry gradient (T5 position bias)
           | scores.masked_fill(~mask, -inf)   bool mask: True keeps
    probs  = softmax(scores in fp32).to(q.dtype); fully masked rows give 0, as SDPA does
    probs  = dropout(probs, dropout_p)
    out    = probs @ v                     v: [B, Hkv, Lk, Dv]
The sparse methods (SPT, hybrid attention) specialise this op; the region finder guarantees the
inputs it passes here equal what the model computed.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .causal import causal_mask

from ._vjp import fresh_seed, placeholder_grads, recompute_vjp, seeded_dropout


def attention_reference(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float,
    dropout_p: float, is_causal: bool, seed: Tensor,
) -> Tensor:
    """Plain-torch attention; differentiable in every tensor input (used for forward and backward)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # GQA: head h of q reads kv head h // groups (what HF repeat_kv builds)
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    # scale and mask in fp32 (or wider): a half-precision score plus a finfo(fp16).min padding mask
    # would overflow to -inf, turning a padded row into NaN
    scores = torch.matmul(q, k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale
    if is_causal:
        scores = scores.masked_fill(~causal_mask(scores.shape[-2], scores.shape[-1], q.device), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    # rows with every key masked give 0, not NaN (SDPA's safe softmax)
    empty_rows = torch.isneginf(scores).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty_rows, 0.0), dim=-1).masked_fill(empty_rows, 0.0)
    probs = seeded_dropout(probs.to(q.dtype), dropout_p, seed)
    return torch.matmul(probs, v)


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], dropout_p: float) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"sparsify::attention expects 4-d q, k, v [B, H, L, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0 or k.shape[1] != v.shape[1]:
        raise ValueError(f"sparsify::attention: query heads ({q.shape[1]}) must be a multiple of key/value "
                         f"heads ({k.shape[1]}, {v.shape[1]})")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"sparsify::attention: dropout_p must be in [0, 1], got {dropout_p}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError("sparsify::attention: q/k head dims or k/v lengths differ: "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


@torch.library.custom_op("sparsify::attention", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float,
    dropout_p: float, is_causal: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (out, seed); the seed is what backward needs to replay the dropout mask."""
    check_attention_inputs(q, k, v, mask, dropout_p)
    seed = fresh_seed() if dropout_p > 0 else torch.zeros((), dtype=torch.int64)
    return attention_reference(q, k, v, mask, scale, dropout_p, is_causal, seed).contiguous(), seed


@attention.register_fake
def _(q, k, v, mask, scale, dropout_p, is_causal):
    out_shape = (*q.shape[:-1], v.shape[-1])
    return q.new_empty(out_shape), torch.empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op("sparsify::attention_backward", mutates_args=())
def attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], seed: Tensor,
    scale: float, dropout_p: float, is_causal: bool, needs_grad: list[bool],
) -> list[Tensor]:
    """(dq, dk, dv, dmask); an entry not asked for in needs_grad is an empty tensor."""
    def forward(q_, k_, v_, mask_):
        return attention_reference(q_, k_, v_, mask_, scale, dropout_p, is_causal, seed)
    return recompute_vjp(forward, (q, k, v, mask), needs_grad, grad_out)


@attention_backward.register_fake
def _(grad_out, q, k, v, mask, seed, scale, dropout_p, is_causal, needs_grad):
    return placeholder_grads((q, k, v, mask), needs_grad, grad_out)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, dropout_p, is_causal = inputs
    ctx.save_for_backward(q, k, v, mask, output[1])
    ctx.args = (scale, dropout_p, is_causal)
    ctx.mask_is_float = mask is not None and mask.is_floating_point()


def _backward(ctx, grad_out, _grad_seed):
    q, k, v, mask, seed = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2],
             ctx.needs_input_grad[3] and ctx.mask_is_float]
    grads = torch.ops.sparsify.attention_backward(grad_out, q, k, v, mask, seed, *ctx.args, needs)
    dq, dk, dv, dmask = (g if need else None for g, need in zip(grads, needs))
    return dq, dk, dv, dmask, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)


def attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """Dense count: QK^T and PV, 2 FLOPs per multiply-add (the same convention as aten.bmm)."""
    b, h, lq, d = q_shape
    lk, dv = k_shape[-2], v_shape[-1]
    return 2 * b * h * lq * lk * (d + dv)


def attention_backward_flops(grad_out_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """Recompute (QK^T, PV) plus dV, dP, dQ, dK: three times the forward count."""
    return 3 * attention_flops(q_shape, k_shape, v_shape)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
