"""sparsify::block_sparse_linear: a Linear whose weight is zero outside the blocks a bool block mask keeps (MST's
block mode), computed without the empty blocks, forward and backward.

    y = block_sparse_linear(x, w, b, blocks, grad_blocks)      x [..., K], w [N, K] (F.linear's layout, any
                                                               strides), b [N] or None, blocks and grad_blocks
                                                               bool [R, C] (one block: [N / R, K / C])
    y   = x (w * M)^T + b                  M = blocks expanded to w's shape
    dx  = dy (w * M)                       block_sparse_linear_dgrad
    dw  = (dy^T x) * G                     block_sparse_linear_wgrad, G = grad_blocks expanded: the dense
                                           gradient where grad_blocks is all True (MST's topology-update steps:
                                           growth reads it), only the kept blocks' otherwise
    db  = sum of dy over tokens

CPU: each block row's product over its kept blocks gathered (a loop over block rows: the empty blocks are skipped
here too, so the CPU timing of benchmarks/mst_speed.py is a real block-skipping one); CUDA: the Triton kernels of
codegen/block_linear.py (ops/cuda.py). block_sparse_linear_reference is the dense masked formula the tests hold
both to. The FLOP formulas are the dense counts (a shape-only counter cannot see the mask);
sparsify.training.MixedSparsity counts what the masks keep.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ..codegen.block_linear import block_lists, block_shape


def expand_blocks(blocks: Tensor, shape) -> Tensor:
    """The bool block mask [R, C] as an element mask of `shape` [N, K]."""
    br, bc = block_shape(shape, blocks.shape)
    return blocks.repeat_interleave(br, 0).repeat_interleave(bc, 1)


def _check(x: Tensor, w: Tensor, b: Optional[Tensor], blocks: Tensor, grad_blocks: Tensor) -> None:
    if w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"sparsify::block_sparse_linear expects x [..., K] and w [N, K]; got {tuple(x.shape)}, "
                         f"{tuple(w.shape)}")
    if blocks.dtype != torch.bool or grad_blocks.dtype != torch.bool or blocks.shape != grad_blocks.shape:
        raise ValueError("sparsify::block_sparse_linear: blocks and grad_blocks must be bool tensors of one shape; "
                         f"got {blocks.dtype} {tuple(blocks.shape)}, {grad_blocks.dtype} {tuple(grad_blocks.shape)}")
    block_shape(w.shape, blocks.shape)
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"sparsify::block_sparse_linear: b must be [N] = [{w.shape[0]}], got {tuple(b.shape)}")


def block_sparse_linear_reference(x, w, b, blocks, grad_blocks=None) -> Tensor:
    """The definition: F.linear with the expanded mask (dense work)."""
    return torch.nn.functional.linear(x, w * expand_blocks(blocks, w.shape), b)


def block_mm_cpu(inp: Tensor, a: Tensor, blocks: Tensor) -> Tensor:
    """inp [T, K] @ (a * M)^T for a [N, K]: per block row, one product over the gathered kept block columns."""
    br, bc = block_shape(a.shape, blocks.shape)
    out = inp.new_zeros((inp.shape[0], a.shape[0]))
    index, count = block_lists(blocks)
    within = torch.arange(bc, device=inp.device)
    for r, n in enumerate(count.tolist()):
        if n:
            cols = (index[r, :n].long()[:, None] * bc + within).reshape(-1)
            out[:, r * br:(r + 1) * br] = inp[:, cols] @ a[r * br:(r + 1) * br, cols].t()
    return out


def block_wgrad_cpu(dy: Tensor, x: Tensor, grad_blocks: Tensor) -> Tensor:
    """dy^T x on the kept blocks of grad_blocks, zeros elsewhere: [N, K]."""
    n, k = dy.shape[1], x.shape[1]
    if bool(grad_blocks.all()):
        return dy.t() @ x
    br, bc = block_shape((n, k), grad_blocks.shape)
    dw = dy.new_zeros((n, k))
    index, count = block_lists(grad_blocks)
    within = torch.arange(bc, device=dy.device)
    for r, m in enumerate(count.tolist()):
        if m:
            cols = (index[r, :m].long()[:, None] * bc + within).reshape(-1)
            dw[r * br:(r + 1) * br, cols] = dy[:, r * br:(r + 1) * br].t() @ x[:, cols]
    return dw


@torch.library.custom_op("sparsify::block_sparse_linear", mutates_args=())
def block_sparse_linear(x: Tensor, w: Tensor, b: Optional[Tensor], blocks: Tensor, grad_blocks: Tensor) -> Tensor:
    """x (w * M)^T + b without the empty blocks (module docstring)."""
    _check(x, w, b, blocks, grad_blocks)
    out = block_mm_cpu(x.reshape(-1, x.shape[-1]), w, blocks)
    if b is not None:
        out += b
    return out.reshape(*x.shape[:-1], w.shape[0])


@block_sparse_linear.register_fake
def _(x, w, b, blocks, grad_blocks):
    _check(x, w, b, blocks, grad_blocks)
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.custom_op("sparsify::block_sparse_linear_dgrad", mutates_args=())
def block_sparse_linear_dgrad(dy: Tensor, w: Tensor, blocks: Tensor) -> Tensor:
    """dy [T, N] (w * M) -> [T, K]: the forward's product with w^T, whose block rows are w's block columns."""
    return block_mm_cpu(dy, w.t(), blocks.t())


@block_sparse_linear_dgrad.register_fake
def _(dy, w, blocks):
    return dy.new_empty((dy.shape[0], w.shape[1]))


@torch.library.custom_op("sparsify::block_sparse_linear_wgrad", mutates_args=())
def block_sparse_linear_wgrad(dy: Tensor, x: Tensor, grad_blocks: Tensor) -> Tensor:
    """(dy^T x) * G: [N, K]."""
    return block_wgrad_cpu(dy, x, grad_blocks)


@block_sparse_linear_wgrad.register_fake
def _(dy, x, grad_blocks):
    return dy.new_empty((dy.shape[1], x.shape[1]))


def _setup_context(ctx, inputs, output):
    x, w, b, blocks, grad_blocks = inputs
    ctx.save_for_backward(x, w, blocks, grad_blocks)
    ctx.has_bias = b is not None


def _backward(ctx, grad_out):
    x, w, blocks, grad_blocks = ctx.saved_tensors
    dy = grad_out.reshape(-1, grad_out.shape[-1])
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.sparsify.block_sparse_linear_dgrad(dy, w, blocks).reshape(x.shape)
    if ctx.needs_input_grad[1]:
        grad_w = torch.ops.sparsify.block_sparse_linear_wgrad(dy, x.reshape(-1, x.shape[-1]), grad_blocks)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = dy.sum(0)
    return grad_x, grad_w, grad_b, None, None


block_sparse_linear.register_autograd(_backward, setup_context=_setup_context)


def _tokens(shape) -> int:
    n = 1
    for d in shape[:-1]:
        n *= d
    return n


@register_flop_formula(torch.ops.sparsify.block_sparse_linear)
def _forward_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _tokens(x_shape) * w_shape[0] * w_shape[1]  # dense upper bound (module docstring)


@register_flop_formula(torch.ops.sparsify.block_sparse_linear_dgrad)
def _dgrad_flops(dy_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * dy_shape[0] * w_shape[0] * w_shape[1]


@register_flop_formula(torch.ops.sparsify.block_sparse_linear_wgrad)
def _wgrad_flops(dy_shape, x_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * dy_shape[0] * dy_shape[1] * x_shape[1]
