"""Every CUDA registration of the sparsify:: ops, in one place: the Triton kernels from codegen/, where they apply.

    sparsify::mlp                 ops/mlp.py mlp_cuda (the generated up-projection kernel)
    sparsify::routed_mlp (+ bwd)  ops/routed.py routed_mlp_cuda / routed_mlp_backward_cuda (grouped GEMMs)
    sparsify::pq_encode, pq_select       codegen/pq_kernels.py
    sparsify::spt_attention (+ bwd), block_sparse_attention (+ bwd)   codegen/spt_attention.py, below
    sparsify::sparse_down         codegen/sparse_down.py (DEFT inference: the non-zero activations only)
    sparsify::sparse_up           codegen/sparse_up.py (DEFT inference: a gated MLP's up rows where the gate is non-zero)
    sparsify::block_sparse_linear (+ dgrad, wgrad)   codegen/block_linear.py (MST's block mode)

What a kernel does not cover falls back to the op's plain-torch reference on the same device (the
same math, unfused), so a CUDA tensor never meets an unsupported kernel; the SPT attention ops':
  spt_attention: in backward, rows whose every kept key carries a huge finite mask (see _absorbed_rows);
                 dropout is drawn in-kernel (Philox, the reference's draw)
  block_sparse_attention: in backward, a float mask that needs a gradient and rows whose every visited
                          key carries a huge finite mask (_absorbed_rows). The kernel reads a bool or float mask
                          tile per visited key tile (a padded HF batch's 4-d mask), causality (op and kernel
                          align it alike, bottom-right: ops/causal.py) and dropout (drawn in-kernel from Philox,
                          the reference's draw: ops/_vjp.py philox_dropout_scale)
"""
from __future__ import annotations

import torch

from ._vjp import fresh_seed
from .mlp import mlp_cuda
from .routed import routed_mlp_backward_cuda, routed_mlp_cuda
from .spt import spt_attention_backward_reference, spt_attention_reference
from .spt_block import block_sparse_attention_backward_reference, block_sparse_attention_reference
from .sparse_down import sparse_down_reference
from .sparse_up import sparse_up_reference
from .block_linear import block_mm_cpu, block_wgrad_cpu

from ..tables import KERNEL_DTYPES  # noqa: E402


def _empty_like_needs(grads, tensors, needs, like):
    return [g if need and t is not None else like.new_empty(0) for g, t, need in zip(grads, tensors, needs)]


@torch.library.register_kernel("sparsify::spt_attention", "cuda")
def _spt_attention_cuda(q, k, v, index, valid, mask, scale, dropout_p):
    if q.dtype not in KERNEL_DTYPES:
        return spt_attention_reference(q, k, v, index, valid, mask, scale, dropout_p)
    from ..codegen.spt_attention import spt_forward
    seed = fresh_seed() if dropout_p > 0 else torch.zeros((), dtype=torch.int64)
    out, lse = spt_forward(q, k, v, index, valid, mask, scale, dropout_p=dropout_p, seed=int(seed))
    return out, lse, seed


@torch.library.register_kernel("sparsify::spt_attention_backward", "cuda")
def _spt_attention_backward_cuda(grad_out, q, k, v, index, valid, mask, lse, seed, scale, dropout_p, needs_grad):
    if q.dtype not in KERNEL_DTYPES or _absorbed_rows(mask, lse):
        return spt_attention_backward_reference(grad_out, q, k, v, index, valid, mask, lse, seed, scale,
                                                dropout_p, needs_grad)
    from ..codegen.spt_attention import spt_backward
    mask_grad = bool(needs_grad[3]) and mask is not None and mask.is_floating_point()
    grads = spt_backward(grad_out, q, k, v, index, valid, mask, lse, scale, mask_grad=mask_grad,
                         dropout_p=dropout_p, seed=int(seed))
    grads = list(grads) + [None] * (4 - len(grads))
    return _empty_like_needs(grads, (q, k, v, mask), needs_grad, grad_out)


def _absorbed_rows(mask, lse) -> bool:
    """A float mask put a huge finite value on every kept key of some row (HF's finfo.min on a left-padding
    row): its lse rounds to the row max and the kernel's exp(s - lse) would not sum to 1; the reference
    renormalises (ops/spt.py _probs). One host sync, only for float masks."""
    return mask is not None and mask.is_floating_point() and bool(((lse < -1e30) & lse.isfinite()).any())


def _block_kernel_applies(q, k, mask, causal, dropout_p) -> bool:
    return q.dtype in KERNEL_DTYPES


@torch.library.register_kernel("sparsify::block_sparse_attention", "cuda")
def _block_sparse_attention_cuda(q, k, v, block_index, block_valid, block, mask, scale, causal, dropout_p):
    if not _block_kernel_applies(q, k, mask, causal, dropout_p):
        return block_sparse_attention_reference(q, k, v, block_index, block_valid, block, mask, scale, causal,
                                                dropout_p)
    from ..codegen.spt_attention import block_sparse_forward
    seed = fresh_seed() if dropout_p > 0 else torch.zeros((), dtype=torch.int64)
    out, lse = block_sparse_forward(q, k, v, block_index, block_valid, block_m=block, block_n=block,
                                    causal=causal, scale=scale, attn_mask=mask, dropout_p=dropout_p,
                                    seed=int(seed))
    return out, lse, seed


@torch.library.register_kernel("sparsify::block_sparse_attention_backward", "cuda")
def _block_sparse_attention_backward_cuda(grad_out, q, k, v, block_index, block_valid, block, mask, lse, seed,
                                          scale, causal, dropout_p, needs_grad, out=None):
    mask_grad = bool(needs_grad[3]) and mask is not None and mask.is_floating_point()
    no_delta = dropout_p > 0 and out is None  # dropout's D_i comes from the output
    if not _block_kernel_applies(q, k, mask, causal, dropout_p) or mask_grad or no_delta or _absorbed_rows(mask, lse):
        return block_sparse_attention_backward_reference(grad_out, q, k, v, block_index, block_valid, block, mask,
                                                         lse, seed, scale, causal, dropout_p, needs_grad)
    from ..codegen.spt_attention import block_sparse_backward
    dq, dk, dv = block_sparse_backward(grad_out, q, k, v, block_index, block_valid, lse, block_m=block,
                                       block_n=block, causal=causal, scale=scale, out=out, attn_mask=mask,
                                       dropout_p=dropout_p, seed=int(seed))
    return _empty_like_needs([dq, dk, dv, None], (q, k, v, mask), needs_grad, grad_out)


@torch.library.register_kernel("sparsify::pq_encode", "cuda")
def _pq_encode_cuda(x, codebook):
    from ..codegen.pq_kernels import pq_encode_triton
    return pq_encode_triton(x, codebook)


@torch.library.register_kernel("sparsify::pq_select", "cuda")
def _pq_select_cuda(q_codes, k_codes, keep, causal, allowed):
    from ..codegen.pq_kernels import pq_select_triton
    return pq_select_triton(q_codes, k_codes, keep, causal, allowed)


torch.library.register_kernel("sparsify::mlp", "cuda")(mlp_cuda)
torch.library.register_kernel("sparsify::routed_mlp", "cuda")(routed_mlp_cuda)
torch.library.register_kernel("sparsify::routed_mlp_backward", "cuda")(routed_mlp_backward_cuda)


@torch.library.register_kernel("sparsify::sparse_down", "cuda")
def _sparse_down_cuda(h, w, b, block_t):
    if h.dtype not in KERNEL_DTYPES:
        return sparse_down_reference(h, w, b, block_t)
    from ..codegen.sparse_down import sparse_down_triton
    out = sparse_down_triton(h.reshape(-1, h.shape[-1]), w, b, block_t)
    return out.reshape(*h.shape[:-1], w.shape[0])


@torch.library.register_kernel("sparsify::sparse_up", "cuda")
def _sparse_up_cuda(g, x, w, b, block_t):
    if g.dtype not in KERNEL_DTYPES:
        return sparse_up_reference(g, x, w, b, block_t)
    from ..codegen.sparse_up import sparse_up_triton
    out = sparse_up_triton(g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]), w, b, block_t)
    return out.reshape(g.shape)


# MST block mode. The kernels take one dtype of KERNEL_DTYPES for all tensors; other inputs (fp64, mixed) run the
# CPU path's torch ops on the device (the same block-skipping math, unfused).
def _kernel_dtypes(*tensors) -> bool:
    return tensors[0].dtype in KERNEL_DTYPES and all(t.dtype == tensors[0].dtype for t in tensors if t is not None)


@torch.library.register_kernel("sparsify::block_sparse_linear", "cuda")
def _block_sparse_linear_cuda(x, w, b, blocks, grad_blocks):
    x2 = x.reshape(-1, x.shape[-1])
    if _kernel_dtypes(x, w, b):
        from ..codegen.block_linear import block_mm_triton
        out = block_mm_triton(x2, w, blocks, b)
    else:
        out = block_mm_cpu(x2, w, blocks)
        out = out + b if b is not None else out
    return out.reshape(*x.shape[:-1], w.shape[0])


@torch.library.register_kernel("sparsify::block_sparse_linear_dgrad", "cuda")
def _block_sparse_linear_dgrad_cuda(dy, w, blocks):
    if _kernel_dtypes(dy, w):
        from ..codegen.block_linear import block_mm_triton
        return block_mm_triton(dy, w.t(), blocks.t())
    return block_mm_cpu(dy, w.t(), blocks.t())


@torch.library.register_kernel("sparsify::block_sparse_linear_wgrad", "cuda")
def _block_sparse_linear_wgrad_cuda(dy, x, grad_blocks):
    if _kernel_dtypes(dy, x):
        from ..codegen.block_linear import block_wgrad_triton
        return block_wgrad_triton(dy, x, grad_blocks)
    return block_wgrad_cpu(dy, x, grad_blocks)
