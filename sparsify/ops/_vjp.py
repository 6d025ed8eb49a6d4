"""Backward by recomputation: the shared mechanism behind the dense ops' autograd.

The dense ops save only their inputs (like activation checkpointing) and, in backward, re-run the
plain-torch reference under autograd to get the vector-Jacobian product. That keeps the dense
backbone exactly equal to eager (same formulas, same rounding) and leaves the hand-written,
memory-saving backward formulas to the sparse methods, which specialise these ops.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor


def recompute_vjp(
    forward: Callable[..., Tensor],
    tensors: Sequence[Optional[Tensor]],
    needs_grad: Sequence[bool],
    grad_out: Tensor,
) -> list[Tensor]:
    """Gradients of `forward(*tensors)` against `grad_out` for the tensors flagged in `needs_grad`.

    Tensors that are None or not needed get an empty placeholder (a custom op cannot return None
    inside a Tensor[] output); the autograd wrapper turns those back into None.
    """
    with _autograd_reenabled(), torch.enable_grad():
        leaves = [
            t.detach().requires_grad_(need) if t is not None else None
            for t, need in zip(tensors, needs_grad)
        ]
        out = forward(*leaves)
        wanted = [t for t, need in zip(leaves, needs_grad) if t is not None and need]
        grads = torch.autograd.grad(out, wanted, grad_out, allow_unused=True) if wanted else []
    grads_iter = iter(grads)
    result = []
    for t, need in zip(leaves, needs_grad):
        if t is not None and need:
            g = next(grads_iter)
            result.append(torch.zeros_like(t).contiguous() if g is None else g.contiguous())
        else:
            result.append(grad_out.new_empty(0))
    return result


@contextlib.contextmanager
def _autograd_reenabled():
    """A custom op's kernel runs with the Autograd dispatch keys excluded (it sits below autograd);
    take them out of the thread-local exclude set so the recomputation records a graph."""
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set().remove(torch._C.DispatchKey.AutogradFunctionality)
    with torch._C._ForceDispatchKeyGuard(include, exclude):
        yield


def placeholder_grads(tensors: Sequence[Optional[Tensor]], needs_grad: Sequence[bool], like: Tensor) -> list[Tensor]:
    """Fake (meta) counterpart of recompute_vjp: the same shapes, contiguous, no compute."""
    return [
        t.new_empty(t.shape) if (t is not None and need) else like.new_empty(0)
        for t, need in zip(tensors, needs_grad)
    ]


def seeded_dropout(x: Tensor, p: float, seed: Tensor) -> Tensor:
    """Dropout whose keep-mask is a pure function of `seed`, so backward can replay it."""
    if p <= 0.0:
        return x
    if p >= 1.0:  # everything dropped; x * 0 / 0 would be NaN
        return x * 0.0
    generator = torch.Generator(device=x.device)
    generator.manual_seed(int(seed.item()))
    keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32) >= p
    return x * keep.to(x.dtype) / (1.0 - p)


_M32 = 0xFFFFFFFF
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)


def _mul32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32 bits of a * b for a uint32 constant a and uint32 values b held in int64 (no int64 overflow:
    b is split in 16-bit halves)."""
    bh, bl = b >> 16, b & 0xFFFF
    hi_part, lo_part = a * bh, a * bl  # each < 2^48
    high = (hi_part + (lo_part >> 16)) >> 16
    low = (((hi_part & 0xFFFF) << 16) + lo_part) & _M32
    return high, low


def philox_uniform(seed: int, offsets: Tensor) -> Tensor:
    """U[0, 1) float32 per int64 offset, bit for bit what Triton's tl.rand(seed, offset) gives (Philox 4x32, 10
    rounds, counters (offset low, offset high, 0, 0), key (seed low, seed high)), so a kernel and this reference
    draw the same dropout mask from the same seed."""
    seed &= (1 << 64) - 1
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0, c1 = offsets & _M32, (offsets >> 32) & _M32
    c2 = c3 = torch.zeros_like(offsets)
    for _ in range(10):
        hi_b, lo_b = _mul32(_PHILOX_ROUND[1], c2)
        hi_a, lo_a = _mul32(_PHILOX_ROUND[0], c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _M32, (k1 + _PHILOX_KEY[1]) & _M32
    x = torch.where(c0 >= 1 << 31, c0 - (1 << 32), c0)  # as int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def philox_dropout_scale(shape, dtype, device, p: float, seed: Tensor) -> Optional[Tensor]:
    """keep / (1 - p) over a tensor of `shape` (row-major offsets), keep = philox_uniform(seed, offset) >= p: the
    dropout the block-sparse attention kernels draw in-kernel (None for p = 0)."""
    if p <= 0.0:
        return None
    if p >= 1.0:
        return torch.zeros(shape, dtype=dtype, device=device)
    offsets = torch.arange(math.prod(shape), device=device, dtype=torch.int64).reshape(shape)
    keep = philox_uniform(int(seed.item()), offsets) >= p
    return keep.to(dtype) / (1.0 - p)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for the half types and fp32, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def fresh_seed() -> Tensor:
    """A CPU int64 seed from torch's global RNG (torch.manual_seed makes runs reproducible; on CPU so
    reading it never synchronises a GPU stream)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu")
