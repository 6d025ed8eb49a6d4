"""sparsify::sparse_down: an MLP's down projection that reads only the non-zero activations (DEFT inference).

    out = sparse_down(h, w, b, block_t)    h [..., F], w [N, F] (nn.Linear layout), b [N] or None -> [..., N]

Equal to F.linear(h, w, b) up to summation order (a zero activation contributes nothing, so skipping it is
exact): per tile of block_t tokens, the union of the neurons some token activates, and only those columns of h
and W are read. CPU: this reference (a gather per tile); CUDA: the Triton kernel (codegen/sparse_down.py,
registered in ops/cuda.py). Gradients are the dense projection's (the op is an inference path; a backward
exists so a graph that needs one stays correct).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ..codegen.sparse_down import active_neurons, check_sparse_down_args


def sparse_down_reference(h: Tensor, w: Tensor, b: Optional[Tensor], block_t: int) -> Tensor:
    lead = h.shape[:-1]
    h2 = h.reshape(-1, h.shape[-1])
    check_sparse_down_args(h2, w, b, block_t)
    out = torch.zeros((h2.shape[0], w.shape[0]), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
    neurons, counts = active_neurons(h2, block_t)
    for tile, count in enumerate(counts.tolist()):
        if count:
            rows = slice(tile * block_t, (tile + 1) * block_t)
            idx = neurons[tile, :count].long()
            out[rows] = h2[rows][:, idx].to(out.dtype) @ w[:, idx].t().to(out.dtype)
    if b is not None:
        out += b.to(out.dtype)
    return out.to(h.dtype).reshape(*lead, w.shape[0])


@torch.library.custom_op("sparsify::sparse_down", mutates_args=())
def sparse_down(h: Tensor, w: Tensor, b: Optional[Tensor], block_t: int) -> Tensor:
    """F.linear(h, w, b) reading only the activations that are not zero (module docstring)."""
    return sparse_down_reference(h, w, b, block_t)


@sparse_down.register_fake
def _(h, w, b, block_t):
    return h.new_empty((*h.shape[:-1], w.shape[0]))


def _setup_context(ctx, inputs, output):
    h, w, b, _ = inputs
    ctx.save_for_backward(h, w)
    ctx.has_bias = b is not None


def _backward(ctx, grad_out):
    h, w = ctx.saved_tensors
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    grad_h = (g2 @ w).reshape(h.shape) if ctx.needs_input_grad[0] else None
    grad_w = g2.t() @ h.reshape(-1, h.shape[-1]) if ctx.needs_input_grad[1] else None
    grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_h, grad_w, grad_b, None


sparse_down.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.sparsify.sparse_down)
def sparse_down_flops(h_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """An upper bound, the dense count: the skipped share depends on the activations' values, which a FLOP
    counter (shapes only) cannot see; the report's measured density gives the share."""
    tokens = 1
    for d in h_shape[:-1]:
        tokens *= d
    return 2 * tokens * w_shape[0] * w_shape[1]

