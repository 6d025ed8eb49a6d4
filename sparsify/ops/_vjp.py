"""Backward by recomputation: the shared mechanism behind the dense ops' autograd.

The dense ops save only their inputs (like activation checkpointing) and, in backward, re-run the
plain-torch reference under autograd to get the vector-Jacobian product. That keeps the dense
backbone exactly equal to eager (same formulas, same rounding) and leaves the hand-written,
memory-saving backward formulas to the sparse methods, which specialise these ops.
"""
from __future__ import annotations

import contextlib
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


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for the half types and fp32, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def fresh_seed() -> Tensor:
    """A CPU int64 seed from torch's global RNG (torch.manual_seed makes runs reproducible; on CPU so
    reading it never synchronises a GPU stream)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu")
