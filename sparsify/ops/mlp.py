"""sparsify::mlp: the dense feed-forward block every MLP region becomes.

    up   = proj(x, up)                        proj(x, p) = x @ p.w^T + p.b + s * (x @ p.A^T) @ p.B^T
    h    = act(up)                            plain MLP (BERT, GPT-2, OPT)
         | act(proj(x, gate)) * up            gated MLP (Llama SwiGLU, T5 v1.1 gated-GELU)
    h    = dropout(h, dropout_p)              T5 drops here; most models have p = 0
    out  = proj(h, down)
The LoRA terms (A, B, s) are present when the region's Linears are wrapped by peft. Weights arrive
in nn.Linear layout [out, in]; a GPT-2 Conv1D weight arrives as a transposed view.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._vjp import fresh_seed, placeholder_grads, recompute_vjp, seeded_dropout

from ..tables import ACTIVATIONS, KERNEL_DTYPES  # noqa: E402  (name -> elementwise function: the one table, sparsify/tables.py)


def _proj(x: Tensor, w: Tensor, b: Optional[Tensor], lora_a: Optional[Tensor], lora_b: Optional[Tensor],
          lora_scale: float) -> Tensor:
    y = F.linear(x, w, b)
    if lora_a is not None:  # same order of operations as peft's LoRA Linear
        y = y + F.linear(F.linear(x, lora_a), lora_b) * lora_scale
    return y


def mlp_hidden(
    x: Tensor, up_w: Tensor, up_b: Optional[Tensor], gate_w: Optional[Tensor], gate_b: Optional[Tensor],
    up_lora_a: Optional[Tensor], up_lora_b: Optional[Tensor],
    gate_lora_a: Optional[Tensor], gate_lora_b: Optional[Tensor],
    lora_scales: list[float], activation: str,
) -> Tensor:
    """The activations the down projection reads: act(up x), or act(gate x) * (up x) for a gated MLP."""
    act = ACTIVATIONS[activation]
    up = _proj(x, up_w, up_b, up_lora_a, up_lora_b, lora_scales[0])
    if gate_w is not None:
        return act(_proj(x, gate_w, gate_b, gate_lora_a, gate_lora_b, lora_scales[1])) * up
    return act(up)


def mlp_reference(
    x: Tensor, up_w: Tensor, up_b: Optional[Tensor], gate_w: Optional[Tensor], gate_b: Optional[Tensor],
    down_w: Tensor, down_b: Optional[Tensor],
    up_lora_a: Optional[Tensor], up_lora_b: Optional[Tensor],
    gate_lora_a: Optional[Tensor], gate_lora_b: Optional[Tensor],
    down_lora_a: Optional[Tensor], down_lora_b: Optional[Tensor],
    lora_scales: list[float], activation: str, dropout_p: float, seed: Tensor,
) -> Tensor:
    h = mlp_hidden(x, up_w, up_b, gate_w, gate_b, up_lora_a, up_lora_b, gate_lora_a, gate_lora_b, lora_scales,
                   activation)
    h = seeded_dropout(h, dropout_p, seed)
    return _proj(h, down_w, down_b, down_lora_a, down_lora_b, lora_scales[2])


def check_mlp_inputs(x, up_w, gate_w, down_w, activation, dropout_p, op: str = "sparsify::mlp") -> None:
    """The checks every MLP op shares; `op` names the op in the messages."""
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1], got {dropout_p}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    if up_w.shape[1] != x.shape[-1] or down_w.shape[1] != up_w.shape[0]:
        raise ValueError(f"{op}: shapes do not chain: x {tuple(x.shape)}, up {tuple(up_w.shape)}, "
                         f"down {tuple(down_w.shape)}")
    if gate_w is not None and gate_w.shape != up_w.shape:
        raise ValueError(f"{op}: gate {tuple(gate_w.shape)} and up {tuple(up_w.shape)} differ")


_TENSOR_ARGS = 13  # x, up_w, up_b, gate_w, gate_b, down_w, down_b, and six LoRA factors


@torch.library.custom_op("sparsify::mlp", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def mlp(
    x: Tensor, up_w: Tensor, up_b: Optional[Tensor], gate_w: Optional[Tensor], gate_b: Optional[Tensor],
    down_w: Tensor, down_b: Optional[Tensor],
    up_lora_a: Optional[Tensor], up_lora_b: Optional[Tensor],
    gate_lora_a: Optional[Tensor], gate_lora_b: Optional[Tensor],
    down_lora_a: Optional[Tensor], down_lora_b: Optional[Tensor],
    lora_scales: list[float], activation: str, dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """Returns (out, seed); the seed replays the dropout mask in backward."""
    check_mlp_inputs(x, up_w, gate_w, down_w, activation, dropout_p)
    seed = fresh_seed() if dropout_p > 0 else torch.zeros((), dtype=torch.int64)
    out = mlp_reference(x, up_w, up_b, gate_w, gate_b, down_w, down_b, up_lora_a, up_lora_b,
                        gate_lora_a, gate_lora_b, down_lora_a, down_lora_b, lora_scales, activation,
                        dropout_p, seed)
    return out.contiguous(), seed


def mlp_cuda(x, up_w, up_b, gate_w, gate_b, down_w, down_b, up_lora_a, up_lora_b, gate_lora_a, gate_lora_b,
      down_lora_a, down_lora_b, lora_scales, activation, dropout_p):
    check_mlp_inputs(x, up_w, gate_w, down_w, activation, dropout_p)
    seed = fresh_seed() if dropout_p > 0 else torch.zeros((), dtype=torch.int64)
    if triton_supports(x, up_b, gate_w, gate_b, up_lora_a, gate_lora_a):
        out = mlp_forward_triton(x, up_w, up_b, gate_w, gate_b, down_w, down_b, down_lora_a, down_lora_b,
                                 lora_scales[2], activation, dropout_p, seed)
    else:  # what the generated kernel does not take runs the reference (the same math, unfused)
        out = mlp_reference(x, up_w, up_b, gate_w, gate_b, down_w, down_b, up_lora_a, up_lora_b,
                            gate_lora_a, gate_lora_b, down_lora_a, down_lora_b, lora_scales, activation,
                            dropout_p, seed)
    return out.contiguous(), seed


def triton_supports(x, up_b, gate_w, gate_b, up_lora_a, gate_lora_a) -> bool:
    """The generated up-projection kernel takes fp16/bf16/fp32, no LoRA term on the up side (the
    fused epilogue has no low-rank input yet) and, when gated, biases on both halves or neither."""
    return (x.dtype in KERNEL_DTYPES
            and up_lora_a is None and gate_lora_a is None
            and (gate_w is None or (up_b is None) == (gate_b is None)))


def mlp_forward_triton(x, up_w, up_b, gate_w, gate_b, down_w, down_b, down_lora_a, down_lora_b,
                       down_lora_scale, activation, dropout_p, seed) -> Tensor:
    """The forward with its up-projection and activation in one generated Triton kernel (codegen/)."""
    from ..codegen import up_projection  # codegen imports triton lazily: keep it off the import path

    x2d = x.reshape(-1, x.shape[-1])
    if gate_w is not None:  # codegen's gated form: act(x @ w_gate^T + b_gate) * (x @ w^T + b)
        h = up_projection(x2d, up_w, up_b, activation=activation, w_gate=gate_w, b_gate=gate_b)
    else:
        h = up_projection(x2d, up_w, up_b, activation=activation)
    h = seeded_dropout(h, dropout_p, seed)
    out = _proj(h, down_w, down_b, down_lora_a, down_lora_b, down_lora_scale)
    return out.reshape(*x.shape[:-1], down_w.shape[0])


@mlp.register_fake
def _(x, up_w, up_b, gate_w, gate_b, down_w, down_b, *rest):
    return x.new_empty((*x.shape[:-1], down_w.shape[0])), torch.empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op("sparsify::mlp_backward", mutates_args=())
def mlp_backward(
    grad_out: Tensor, tensors: list[Optional[Tensor]], seed: Tensor, lora_scales: list[float],
    activation: str, dropout_p: float, needs_grad: list[bool],
) -> list[Tensor]:
    """Gradients for the 13 tensor inputs of sparsify::mlp (empty where not asked for)."""
    def forward(*ts):
        return mlp_reference(*ts, lora_scales, activation, dropout_p, seed)
    return recompute_vjp(forward, tensors, needs_grad, grad_out)


@mlp_backward.register_fake
def _(grad_out, tensors, seed, lora_scales, activation, dropout_p, needs_grad):
    return placeholder_grads(tensors, needs_grad, grad_out)


def _setup_context(ctx, inputs, output):
    tensors = inputs[:_TENSOR_ARGS]
    ctx.save_for_backward(*tensors, output[1])
    ctx.args = inputs[_TENSOR_ARGS:]


def _backward(ctx, grad_out, _grad_seed):
    *tensors, seed = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:_TENSOR_ARGS]]
    lora_scales, activation, dropout_p = ctx.args
    grads = torch.ops.sparsify.mlp_backward(grad_out, tensors, seed, lora_scales, activation, dropout_p, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None)


mlp.register_autograd(_backward, setup_context=_setup_context)


def mlp_flops(x_shape, up_w_shape, up_b_shape, gate_w_shape, gate_b_shape, down_w_shape, down_b_shape,
              *lora_shapes_and_args, out_shape=None, **kwargs) -> int:
    tokens = 1
    for s in x_shape[:-1]:
        tokens *= s
    d_in, d_ff, d_out = x_shape[-1], up_w_shape[0], down_w_shape[0]
    flops = 2 * tokens * d_ff * d_in * (2 if gate_w_shape is not None else 1) + 2 * tokens * d_out * d_ff
    for a_shape in lora_shapes_and_args[:6]:
        if a_shape is not None:  # each LoRA factor is one more GEMM over the tokens
            flops += 2 * tokens * a_shape[0] * a_shape[1]
    return flops


def mlp_backward_flops(grad_out_shape, tensors_shapes, *args, out_shape=None, **kwargs) -> int:
    """Recompute plus input and weight gradients: three times the forward count."""
    return 3 * mlp_flops(*tensors_shapes)
