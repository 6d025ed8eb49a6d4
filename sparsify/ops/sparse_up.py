"""sparsify::sparse_up: a gated MLP's up projection times its gate, computing only the neurons the gate keeps
(DEFT inference).

    out = sparse_up(g, x, w, b, block_t)    g [..., F] the activated gate, x [..., D], w [F, D], b [F] or None
        = g * F.linear(x, w, b)             (only where some token of the tile has g != 0)

The gate's activation is an exact predictor of zeros: the product is 0 where it is 0, so the up projection's
rows of those neurons are never read. Equal to dense up to summation order, except where g is 0 and the up
projection overflows (dense: NaN; here: 0). CPU: this reference (a gather per token tile); CUDA: the Triton
kernel (codegen/sparse_up.py, registered in ops/cuda.py). Gradients are dense (an inference path; a backward
exists so a graph that needs one stays correct).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ..codegen.sparse_down import active_neurons
from ..codegen.sparse_up import check_sparse_up_args


def sparse_up_reference(g: Tensor, x: Tensor, w: Tensor, b: Optional[Tensor], block_t: int) -> Tensor:
    lead = g.shape[:-1]
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    check_sparse_up_args(g2, x2, w, b, block_t)
    acc = torch.promote_types(g.dtype, torch.float32)
    out = torch.zeros(g2.shape, dtype=acc, device=g.device)
    neurons, counts = active_neurons(g2, block_t)
    for tile, count in enumerate(counts.tolist()):
        if count:
            rows = slice(tile * block_t, (tile + 1) * block_t)
            idx = neurons[tile, :count].long()
            up = x2[rows].to(acc) @ w[idx].t().to(acc)
            if b is not None:
                up = up + b[idx].to(acc)
            out[rows, idx] = g2[rows][:, idx].to(acc) * up
    return out.to(g.dtype).reshape(*lead, g.shape[-1])


@torch.library.custom_op("sparsify::sparse_up", mutates_args=())
def sparse_up(g: Tensor, x: Tensor, w: Tensor, b: Optional[Tensor], block_t: int) -> Tensor:
    """g * F.linear(x, w, b), reading only the rows of w whose neuron the gate keeps (module docstring)."""
    return sparse_up_reference(g, x, w, b, block_t)


@sparse_up.register_fake
def _(g, x, w, b, block_t):
    return torch.empty_like(g)


def _setup_context(ctx, inputs, output):
    g, x, w, b, _ = inputs
    ctx.save_for_backward(g, x, w, b if b is not None else torch.empty(0))
    ctx.has_bias = b is not None


def _backward(ctx, grad_out):
    g, x, w, b = ctx.saved_tensors
    up = torch.nn.functional.linear(x, w, b if ctx.has_bias else None)
    grad_up = grad_out * g
    grad_g = grad_out * up if ctx.needs_input_grad[0] else None
    grad_x = grad_up @ w if ctx.needs_input_grad[1] else None
    flat_up, flat_x = grad_up.reshape(-1, grad_up.shape[-1]), x.reshape(-1, x.shape[-1])
    grad_w = flat_up.t() @ flat_x if ctx.needs_input_grad[2] else None
    grad_b = flat_up.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return grad_g, grad_x, grad_w, grad_b, None


sparse_up.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.sparsify.sparse_up)
def sparse_up_flops(g_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """An upper bound, the dense count (the product and the gate multiply): the skipped share depends on the
    gate's values, which a shape-only counter cannot see."""
    tokens = 1
    for d in g_shape[:-1]:
        tokens *= d
    return 2 * tokens * w_shape[0] * w_shape[1] + tokens * w_shape[0]
