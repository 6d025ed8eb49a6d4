"""sparsify::sparse_down: an MLP's down projection that reads only the non-zero activations (DEFT inference).

    out = sparse_down(h, w, b, block_t)    h [..., F], w [N, F] (nn.Linear layout), b [N] or None -> [..., N]

Equal to F.linear(h, w, b) up to summation order (a zero activation contributes nothing, so skipping it is
exact): per tile of block_t tokens, the union of the neurons some token activates, and only those columns of h
and rows of W^T are read. CPU: this reference (a gather per tile); CUDA: the Triton kernels (codegen/sparse_down.py,
registered in ops/cuda.py). Gradients are the dense projection's (the op is an inference path; a backward
exists so a graph that needs one stays correct).

Skipping a neuron skips its bytes only when each neuron's N weights are contiguous: W stored as W^T rows, a
[N, F] parameter with strides (1, N). sparsify.prepare with inference "sparse" or "auto" stores the down
projections so (values, shape and identity unchanged: F.linear and cuBLAS read either layout; no copy is kept
beside it, so no in-place update can leave a stale one). A row-major W still gives the exact result; the kernel's
gathers are then strided, and the report says so.
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


# the roofline's machine: H200 fp16/bf16 dense tensor-core peak, HBM3e bandwidth, and an assumed launch cost
H200 = {"flops": 790e12, "bytes_per_s": 4.3e12, "launch_s": 4e-6}


def roofline_ms(tokens: int, d_model: int, d_ff: int, union: float, block_t: int, bytes_per: int = 2,
                layout: str = "rows") -> tuple[float, float]:
    """(dense, sparse) milliseconds of the down projection on an H200: a prediction, not a measurement.

    Dense: max(compute, memory) with h [T, F], W [D, F] and out [T, D] each moved once, + 1 launch. Sparse: the
    union kernel (h read once, the active ids written, 1 launch), then the GEMM kernel: h's active columns
    (re-read per BLOCK_N output tile, from L2: counted once), W's active neurons, out; FLOPs padded to tiles of
    max(T, 16) tokens; 1 launch. `union`: the share of neurons a token tile activates. layout "rows": W stored
    as W^T rows, one contiguous row per neuron; "row_major": W [D, F] gathered by column, each fp16 element of a
    scattered neuron costing a 32-byte sector (16x the bytes, at most all of W)."""
    P, BW, L = H200["flops"], H200["bytes_per_s"], H200["launch_s"]
    t_pad = max(tokens, 16)
    dense = max(2 * tokens * d_ff * d_model / P, (tokens * d_ff + d_ff * d_model + tokens * d_model) * bytes_per / BW) + L
    waste = 1.0 if layout == "rows" else 32 / bytes_per
    union_pass = (tokens * d_ff * bytes_per + -(-tokens // block_t) * d_ff * 4) / BW + L
    w_bytes = min(union * waste, 1.0) * d_ff * d_model * bytes_per
    kernel = max(2 * t_pad * union * d_ff * d_model / P,
                 (tokens * union * d_ff * bytes_per + w_bytes + tokens * d_model * bytes_per) / BW) + L
    return dense * 1e3, (union_pass + kernel) * 1e3


def modelled_switch(tokens: int, d_model: int, d_ff: int, block_t: int, bytes_per: int = 2,
                    layout: str = "rows") -> float:
    """The largest union density (0.01 steps) at which roofline_ms predicts the sparse path faster; 0: never."""
    wins = [u / 100 for u in range(1, 101)
            if (lambda t: t[1] < t[0])(roofline_ms(tokens, d_model, d_ff, u / 100, block_t, bytes_per, layout))]
    return max(wins) if wins else 0.0


@register_flop_formula(torch.ops.sparsify.sparse_down)
def sparse_down_flops(h_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """An upper bound, the dense count: the skipped share depends on the activations' values, which a FLOP
    counter (shapes only) cannot see; the report's measured density gives the share."""
    tokens = 1
    for d in h_shape[:-1]:
        tokens *= d
    return 2 * tokens * w_shape[0] * w_shape[1]

