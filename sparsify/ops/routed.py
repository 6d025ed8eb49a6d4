"""sparsify::routed_mlp: the SPT routed FFN (papers.md section 1, "Routed FFN"), a specialisation of sparsify::mlp.

    F neurons are split into `blocks` contiguous blocks of fb = F / blocks neurons, after reordering by
    `neuron_order` (None: identity; ops/routed_init.py cluster_neurons() gives a MoEfication permutation).
    Block i holds the neurons n(i, j) = neuron_order[i * fb + j], j < fb: rows of up_w / up_b / gate_w /
    gate_b / up and gate LoRA B, columns of down_w and of the down LoRA A.

    router    p = sigmoid(x @ router_w^T + router_b)                [T, blocks], fp32 (fp64 for fp64)
    select    the top_k blocks of each token by p, ties -> lower block id      block_ids [T, top_k] int32
    gate      g = 2 p (gate="sigmoid2p", SPT) or g = 1 (gate="none")
    per kept block i of token t:
        pre(P)_i = g * (W_P[n_i] x + b_P[n_i]) + s_P * (B_P[n_i] @ (A_P x))            P in {up, gate}
        h_i      = act(pre(up)_i)                           plain (BERT, GPT-2, OPT)
                 | act(pre(gate)_i) * pre(up)_i             gated (Llama SwiGLU, T5 v1.1)
        h_i      = dropout(h_i)                             mask over [T, F] in block-major order
    y = sum_i [g * W_down[:, n_i] h_i + s_down * B_down @ (A_down[:, n_i] h_i)] + b_down

With gate="none", top_k == blocks and neuron_order None this is sparsify::mlp (dropout included: the same
seeded [T, F] draw). The router learns through g only; the selection has no gradient.

Where the pieces live
---------------------
    ops/routed.py            this op: input checks, the dense-masked reference, the forward, the custom ops
                             (fake kernels, autograd, the CUDA entry points' Triton / torch choice), FLOPs
    ops/routed_grouping.py   routing, the sorted assignment order and the plain-torch grouped primitives
                             (TORCH_GROUPED) the forward and backward run on (ScatterMoE style)
    ops/routed_backward.py   the hand-written backward (what is saved, what is recomputed)
    ops/routed_init.py       state initialisation: cluster_neurons, init_router, fit_router

FLOPs (registered for both ops; 2 per multiply-add; A = T * top_k assignments, fb = F / blocks):
    forward  = 2*A*fb*d*(2 if gated else 1) + 2*A*fb*d_out + 2*T*blocks*d
               + LoRA: up / gate 2*T*r*d + 2*A*fb*r each, down 2*A*fb*r + 2*T*r*d_out
             = top_k / blocks of sparsify::mlp's count (LoRA's A x and B_down z terms excepted) + the router.
    backward = exactly the GEMMs listed in ops/routed_backward.py for the gradients asked for
               (routed_backward_flops). With every gradient needed and no LoRA: 3 * forward - 2*A*fb*d_out
               (recompute 1x, input and weight gradients 2x, less the down GEMM's forward, which is never
               recomputed: its output is not needed); sparsify::mlp's backward counts 3x. With save_pre (the
               forward kept W x + b) the up / gate recompute, 2*A*fb*d each, drops out: 2x forward + router. With frozen base
               weights (LoRA fine-tuning) the weight-gradient GEMMs drop out: recompute + v = W_down^T dy + dx
               (+ LoRA, router) is about 2x (tests/ops/test_routed_ops.py::test_flops_with_lora_and_frozen_base
               checks the exact count).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ._vjp import _acc_dtype, fresh_seed, placeholder_grads
from .mlp import ACTIVATIONS, check_mlp_inputs
from .operands import MLP_OPERANDS, ROUTER_FIELDS, MLPOperands, RoutedTensors, projection_fields
from .routed_backward import _backward
from .routed_grouping import TORCH_GROUPED, Grouping, route, sorted_gate, sorted_keep
from ..tables import KERNEL_DTYPES

GATES = ("sigmoid2p", "none")


def check_routed_inputs(x, up_w, gate_w, down_w, router_w, router_b, neuron_order, blocks, top_k, gate,
                        activation, dropout_p) -> None:
    check_mlp_inputs(x, up_w, gate_w, down_w, activation, dropout_p, op="sparsify::routed_mlp")
    if gate not in GATES:
        raise ValueError(f"sparsify::routed_mlp: unknown gate {gate!r}; known: {GATES}")
    d_ff = up_w.shape[0]
    if blocks < 1 or d_ff % blocks:
        raise ValueError(f"sparsify::routed_mlp: d_ff={d_ff} is not a multiple of blocks={blocks}")
    if not 1 <= top_k <= blocks:
        raise ValueError(f"sparsify::routed_mlp: top_k must be in [1, blocks={blocks}], got {top_k}")
    if tuple(router_w.shape) != (blocks, x.shape[-1]):
        raise ValueError(f"sparsify::routed_mlp: router_w must be [blocks, d] = {(blocks, x.shape[-1])}, "
                         f"got {tuple(router_w.shape)}")
    if router_b is not None and tuple(router_b.shape) != (blocks,):
        raise ValueError(f"sparsify::routed_mlp: router_b must be [blocks] = {(blocks,)}, got {tuple(router_b.shape)}")
    if neuron_order is not None and (tuple(neuron_order.shape) != (d_ff,) or neuron_order.is_floating_point()):
        raise ValueError(f"sparsify::routed_mlp: neuron_order must be an integer [d_ff] = [{d_ff}] permutation, "
                         f"got {neuron_order.dtype} {tuple(neuron_order.shape)}")


# ---------------------------------------------------------------------------------------------
# the dense-masked reference (test oracle)
# ---------------------------------------------------------------------------------------------

def routed_reference(
    x: Tensor, up_w: Tensor, up_b: Optional[Tensor], gate_w: Optional[Tensor], gate_b: Optional[Tensor],
    down_w: Tensor, down_b: Optional[Tensor],
    up_lora_a: Optional[Tensor], up_lora_b: Optional[Tensor],
    gate_lora_a: Optional[Tensor], gate_lora_b: Optional[Tensor],
    down_lora_a: Optional[Tensor], down_lora_b: Optional[Tensor],
    lora_scales: list[float], router_w: Tensor, router_b: Optional[Tensor], neuron_order: Optional[Tensor],
    blocks: int, top_k: int, gate: str, activation: str, dropout_p: float, seed: Tensor,
) -> Tensor:
    """Every block for every token in plain torch (dense GEMMs), unselected blocks masked to zero.
    Differentiable with ordinary autograd (the selection is an integer index: no gradient)."""
    from ._vjp import seeded_dropout

    act = ACTIVATIONS[activation]
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    t = x2.shape[0]
    fb = up_w.shape[0] // blocks
    p, ids = route(x2, router_w, router_b, top_k)
    kept = torch.zeros(t, blocks, dtype=torch.bool, device=x.device).scatter_(1, ids.long(), True)
    g = 2.0 * p if gate == "sigmoid2p" else torch.ones_like(p)
    g_n = (g * kept).repeat_interleave(fb, dim=1).to(x.dtype)              # [T, F], 0 off the kept blocks
    mask_n = kept.repeat_interleave(fb, dim=1).to(x.dtype)
    perm = slice(None) if neuron_order is None else neuron_order.long()

    def pre(w, b, a, bb, s):
        y = g_n * F.linear(x2, w[perm], None if b is None else b[perm])
        if a is not None:
            y = y + F.linear(F.linear(x2, a), bb[perm]) * s
        return y

    up = pre(up_w, up_b, up_lora_a, up_lora_b, lora_scales[0])
    if gate_w is not None:
        h = act(pre(gate_w, gate_b, gate_lora_a, gate_lora_b, lora_scales[1])) * up
    else:
        h = act(up)
    h = seeded_dropout(h * mask_n, dropout_p, seed)
    y = F.linear(g_n * h, down_w[:, perm], down_b)
    if down_lora_a is not None:
        y = y + F.linear(F.linear(h, down_lora_a[:, perm]), down_lora_b) * lora_scales[2]
    return y.reshape(*x.shape[:-1], down_w.shape[0])


# ---------------------------------------------------------------------------------------------
# the forward, written once against a grouped-primitives implementation (backward: ops/routed_backward.py)
# ---------------------------------------------------------------------------------------------

def _forward(impl, x, up_w, up_b, gate_w, gate_b, down_w, down_b, up_lora_a, up_lora_b, gate_lora_a,
             gate_lora_b, down_lora_a, down_lora_b, lora_scales, router_w, router_b, neuron_order, blocks,
             top_k, gate, activation, dropout_p, seed, save_pre=False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, block_ids, pre_up, pre_gate): pre_* are each projection's W x + b over the sorted assignments
    ([A, fb] in x's dtype) when save_pre, for the backward to read instead of recomputing; else empty."""
    d, d_out, d_ff = x.shape[-1], down_w.shape[0], up_w.shape[0]
    fb = d_ff // blocks
    x2 = x.reshape(-1, d)
    acc = _acc_dtype(x.dtype)
    p, ids = route(x2, router_w, router_b, top_k)
    grp = Grouping(ids, blocks, neuron_order)
    g = sorted_gate(p, ids, grp, gate)
    # the fp32 buffer the down kernel scatter-adds into starts as the bias (one pass, not zeros then an add)
    out = (torch.zeros(x2.shape[0], d_out, dtype=acc, device=x.device) if down_b is None
           else down_b.to(acc).expand(x2.shape[0], d_out).clone(memory_format=torch.contiguous_format))
    pre = (x.new_empty((grp.assignments, fb) if save_pre else (0,)),  # two tensors: outputs may not alias
           x.new_empty((grp.assignments, fb) if save_pre and gate_w is not None else (0,)))
    if grp.assignments:
        lora_up = None if up_lora_a is None else (F.linear(x2, up_lora_a), up_lora_b, lora_scales[0])
        gate_args = None
        if gate_w is not None:
            lora_g = None if gate_lora_a is None else (F.linear(x2, gate_lora_a), gate_lora_b, lora_scales[1])
            gate_args = (gate_w, gate_b, lora_g)
        # dropout in the up kernel's epilogue: torch's [T, F] draw (as sparsify::mlp's), read at the sorted rows
        h = impl.up(x2, up_w, grp.tok, grp.offsets, fb, perm=grp.perm, bias=up_b, row_scale=g, lora=lora_up,
                    activation=activation, gate=gate_args, out_dtype=x.dtype, pre_out=pre if save_pre else None,
                    dropout=sorted_keep(grp, fb, dropout_p, seed, x.device))
        impl.down(h, down_w, grp.tok, grp.offsets, out, perm=grp.perm, row_scale=g)
        if down_lora_a is not None:
            z = torch.zeros(x2.shape[0], down_lora_a.shape[0], dtype=acc, device=x.device)
            impl.down(h, down_lora_a, grp.tok, grp.offsets, z, perm=grp.perm)
            out += F.linear(z.to(x.dtype), down_lora_b).to(acc) * lora_scales[2]
    return out.to(x.dtype).reshape(*x.shape[:-1], d_out), ids, *pre


# ---------------------------------------------------------------------------------------------
# the ops
# ---------------------------------------------------------------------------------------------

def _fresh(dropout_p: float) -> Tensor:
    return fresh_seed() if dropout_p > 0 else torch.zeros((), dtype=torch.int64)


@torch.library.custom_op("sparsify::routed_mlp", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def routed_mlp(
    x: Tensor, up_w: Tensor, up_b: Optional[Tensor], gate_w: Optional[Tensor], gate_b: Optional[Tensor],
    down_w: Tensor, down_b: Optional[Tensor],
    up_lora_a: Optional[Tensor], up_lora_b: Optional[Tensor],
    gate_lora_a: Optional[Tensor], gate_lora_b: Optional[Tensor],
    down_lora_a: Optional[Tensor], down_lora_b: Optional[Tensor],
    lora_scales: list[float], router_w: Tensor, router_b: Tensor, neuron_order: Optional[Tensor],
    blocks: int, top_k: int, gate: str, activation: str, dropout_p: float, save_pre: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out [..., d_out], block_ids [T, top_k] int32, seed, pre_up, pre_gate); the seed replays dropout
    in backward; pre_up / pre_gate [T * top_k, fb] (x's dtype, sorted by block) are W x + b of the up / gate
    projection, saved for backward when save_pre (else empty: the backward recomputes them)."""
    check_routed_inputs(x, up_w, gate_w, down_w, router_w, router_b, neuron_order, blocks, top_k, gate,
                        activation, dropout_p)
    seed = _fresh(dropout_p)
    out, ids, pre_up, pre_gate = _forward(
        TORCH_GROUPED, x, up_w, up_b, gate_w, gate_b, down_w, down_b, up_lora_a, up_lora_b, gate_lora_a,
        gate_lora_b, down_lora_a, down_lora_b, lora_scales, router_w, router_b, neuron_order, blocks, top_k, gate,
        activation, dropout_p, seed, save_pre)
    return out.contiguous(), ids, seed, pre_up, pre_gate


def triton_supports(x: Tensor, *tensors: Optional[Tensor]) -> bool:
    """The generated grouped kernels take fp16 / bf16 / fp32 with every floating tensor in x's dtype (LoRA on
    every side, biases, gated or not, any neuron order): anything else runs the torch grouped path."""
    if x.dtype not in KERNEL_DTYPES:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return all(t is None or not t.is_floating_point() or t.dtype == x.dtype for t in tensors)


def _triton_impl():
    from ..codegen import grouped_gemm  # triton is imported lazily: keep it off the import path

    return grouped_gemm.TRITON_GROUPED


def routed_mlp_forward_triton(x, up_w, up_b, gate_w, gate_b, down_w, down_b, up_lora_a, up_lora_b, gate_lora_a,
                              gate_lora_b, down_lora_a, down_lora_b, lora_scales, router_w, router_b,
                              neuron_order, blocks, top_k, gate, activation, dropout_p,
                              seed, save_pre=False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward on the generated Triton grouped GEMMs (sparsify.codegen.grouped_gemm): (out, block_ids,
    pre_up, pre_gate). CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. No host sync (nothing is read back)."""
    return _forward(_triton_impl(), x, up_w, up_b, gate_w, gate_b, down_w, down_b, up_lora_a, up_lora_b,
                    gate_lora_a, gate_lora_b, down_lora_a, down_lora_b, lora_scales, router_w, router_b,
                    neuron_order, blocks, top_k, gate, activation, dropout_p, seed, save_pre)


def routed_mlp_backward_triton(grad_out, tensors, block_ids, seed, lora_scales, blocks, top_k, gate, activation,
                               dropout_p, needs_grad, pre=()) -> list[Tensor]:
    """The hand-written backward on the Triton grouped GEMMs (same contract as sparsify::routed_mlp_backward)."""
    return _backward(_triton_impl(), grad_out, tensors, block_ids, seed, lora_scales, blocks, top_k, gate,
                     activation, dropout_p, needs_grad, pre)


def routed_mlp_cuda(x, up_w, up_b, gate_w, gate_b, down_w, down_b, up_lora_a, up_lora_b, gate_lora_a, gate_lora_b,
      down_lora_a, down_lora_b, lora_scales, router_w, router_b, neuron_order, blocks, top_k, gate, activation,
      dropout_p, save_pre=False):
    check_routed_inputs(x, up_w, gate_w, down_w, router_w, router_b, neuron_order, blocks, top_k, gate,
                        activation, dropout_p)
    seed = _fresh(dropout_p)
    args = (x, up_w, up_b, gate_w, gate_b, down_w, down_b, up_lora_a, up_lora_b, gate_lora_a, gate_lora_b,
            down_lora_a, down_lora_b, lora_scales, router_w, router_b, neuron_order, blocks, top_k, gate,
            activation, dropout_p, seed, save_pre)
    tensors = (up_w, up_b, gate_w, gate_b, down_w, down_b, up_lora_a, up_lora_b, gate_lora_a, gate_lora_b,
               down_lora_a, down_lora_b)
    impl = _triton_impl() if triton_supports(x, *tensors) else TORCH_GROUPED
    out, ids, pre_up, pre_gate = _forward(impl, *args)
    return out.contiguous(), ids, seed, pre_up, pre_gate


@routed_mlp.register_fake
def _(x, up_w, up_b, gate_w, gate_b, down_w, down_b, up_lora_a, up_lora_b, gate_lora_a, gate_lora_b,
      down_lora_a, down_lora_b, lora_scales, router_w, router_b, neuron_order, blocks, top_k, gate, activation,
      dropout_p, save_pre=False):
    t = math.prod(x.shape[:-1])
    fb = up_w.shape[0] // blocks
    return (x.new_empty((*x.shape[:-1], down_w.shape[0])),
            x.new_empty((t, top_k), dtype=torch.int32),
            torch.empty((), dtype=torch.int64, device="cpu"),
            x.new_empty((t * top_k, fb) if save_pre else (0,)),
            x.new_empty((t * top_k, fb) if save_pre and gate_w is not None else (0,)))


@torch.library.custom_op("sparsify::routed_mlp_backward", mutates_args=())
def routed_mlp_backward(
    grad_out: Tensor, tensors: list[Optional[Tensor]], block_ids: Tensor, seed: Tensor, lora_scales: list[float],
    blocks: int, top_k: int, gate: str, activation: str, dropout_p: float, needs_grad: list[bool],
    pre: list[Tensor],
) -> list[Tensor]:
    """Gradients for the 16 tensor inputs of sparsify::routed_mlp (13 of sparsify::mlp, router_w, router_b,
    neuron_order), empty where not asked for (neuron_order: always). pre: the forward's (pre_up, pre_gate),
    empty tensors where it saved none (then the up / gate GEMMs are recomputed)."""
    return _backward(TORCH_GROUPED, grad_out, tensors, block_ids, seed, lora_scales, blocks, top_k, gate,
                     activation, dropout_p, needs_grad, pre)


def routed_mlp_backward_cuda(grad_out, tensors, block_ids, seed, lora_scales, blocks, top_k, gate, activation,
                             dropout_p, needs_grad, pre):
    ts = RoutedTensors(*tensors)
    floating = (getattr(ts, f) for f in ts._fields if f not in ("x", "neuron_order"))
    impl = _triton_impl() if triton_supports(ts.x, grad_out, *floating) else TORCH_GROUPED
    return _backward(impl, grad_out, tensors, block_ids, seed, lora_scales, blocks, top_k, gate, activation,
                     dropout_p, needs_grad, pre)


def _need_flags(tensors, needs_grad) -> list[bool]:
    """RoutedTensors.grad_needs as a list in the `tensors` order (what the backward op's schema takes)."""
    needs = RoutedTensors(*tensors).grad_needs(needs_grad)
    return [needs[f] for f in RoutedTensors._fields]


@routed_mlp_backward.register_fake
def _(grad_out, tensors, block_ids, seed, lora_scales, blocks, top_k, gate, activation, dropout_p, needs_grad, pre):
    return placeholder_grads(tensors, _need_flags(tensors, needs_grad), grad_out)


def _setup_context(ctx, inputs, output):
    tensors = RoutedTensors.of_call(inputs)
    _, block_ids, seed, pre_up, pre_gate = output
    ctx.save_for_backward(*tensors, block_ids, seed, pre_up, pre_gate)
    ctx.mark_non_differentiable(block_ids, pre_up, pre_gate)
    ctx.lora_scales = MLPOperands.of(inputs).lora_scales
    # blocks, top_k, gate, activation, dropout_p (save_pre, when given, is not the backward's)
    ctx.args = inputs[MLP_OPERANDS + len(ROUTER_FIELDS):][:5]


def _autograd_backward(ctx, grad_out, _grad_ids, _grad_seed, _grad_pre_up, _grad_pre_gate):
    *tensors, block_ids, seed, pre_up, pre_gate = ctx.saved_tensors
    needs = _need_flags(tensors, RoutedTensors.of_call(ctx.needs_input_grad))
    grads = torch.ops.sparsify.routed_mlp_backward(grad_out.contiguous(), tensors, block_ids, seed,
                                                   ctx.lora_scales, *ctx.args, needs, [pre_up, pre_gate])
    g = RoutedTensors(*(gr if need else None for gr, need in zip(grads, needs)))
    # lora_scales has no gradient, nor do blocks, top_k, gate, activation, dropout_p, save_pre
    return (*g.call_order(None), None, None, None, None, None, None)


routed_mlp.register_autograd(_autograd_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# FLOP formulas
# ---------------------------------------------------------------------------------------------

def _dims(x_shape, up_w_shape, down_w_shape, blocks, top_k):
    tokens = math.prod(x_shape[:-1])
    return tokens, tokens * top_k, up_w_shape[0] // blocks, x_shape[-1], down_w_shape[0]


def routed_flops(x_shape, up_w_shape, up_b_shape, gate_w_shape, gate_b_shape, down_w_shape, down_b_shape,
                 up_a, up_b, gate_a, gate_b, down_a, down_b, lora_scales, router_w_shape, router_b_shape,
                 neuron_order_shape, blocks, top_k, gate, activation, dropout_p, save_pre=False, out_shape=None,
                 **kwargs) -> int:
    """Forward: the kept blocks' GEMMs, the router and the LoRA terms (see the module docstring)."""
    t, a, fb, d, d_out = _dims(x_shape, up_w_shape, down_w_shape, blocks, top_k)
    flops = 2 * a * fb * d * (2 if gate_w_shape is not None else 1) + 2 * a * fb * d_out + 2 * t * blocks * d
    for la in (up_a, gate_a):
        if la is not None:  # x @ A^T over every token, then B on the kept blocks only
            flops += 2 * t * la[0] * d + 2 * a * fb * la[0]
    if down_a is not None:  # A on the kept blocks, then B over every token
        flops += 2 * a * fb * down_a[0] + 2 * t * down_a[0] * d_out
    return flops


def routed_backward_flops(grad_out_shape, tensors_shapes, block_ids_shape, seed_shape, lora_scales, blocks, top_k,
                          gate, activation, dropout_p, needs_grad, pre_shapes=(), out_shape=None, **kwargs) -> int:
    """Exactly the GEMMs _backward (ops/routed_backward.py) runs for the gradients asked for (2 per multiply-add):
    the up / gate GEMMs are recomputed only where the forward saved no pre-activation (pre_shapes empty)."""
    shapes = RoutedTensors(*tensors_shapes)
    needs = shapes.grad_needs(needs_grad)
    t, a, fb, d, d_out = _dims(shapes.x, shapes.up_w, shapes.down_w, blocks, top_k)
    router_grad = gate == "sigmoid2p" and (needs["router_w"] or needs["router_b"] or needs["x"])
    flops = 2 * t * blocks * d if gate == "sigmoid2p" else 0          # recompute p
    names = ("up", "gate") if shapes.gate_w is not None else ("up",)
    saved = [bool(pre_shapes) and math.prod(pre_shapes[i]) > 0 for i in range(len(names))]
    for name, was_saved in zip(names, saved):                           # recompute u (and the LoRA part)
        if not was_saved:
            flops += 2 * a * fb * d
        la = getattr(shapes, f"{name}_lora_a")
        if la is not None:
            flops += 2 * t * la[0] * d + 2 * a * fb * la[0]
    need_dh = needs["x"] or router_grad or any(needs[f] for name in names for f in projection_fields(name))
    if needs["down_w"]:
        flops += 2 * a * fb * d_out                                     # dW_down
    if need_dh:
        flops += 2 * a * fb * d_out                                     # v = W_down^T dy
    if shapes.down_lora_a is not None:
        r = shapes.down_lora_a[0]
        if need_dh or needs["down_lora_a"]:
            flops += 2 * t * d_out * r                                  # dy @ B_down
        if need_dh:
            flops += 2 * a * fb * r                                     # A_down^T (dy B)
        if needs["down_lora_b"]:
            flops += 2 * a * fb * r + 2 * t * d_out * r                 # Z = A_down hd, dB_down
        if needs["down_lora_a"]:
            flops += 2 * a * fb * r                                     # dA_down
    if need_dh:
        for name in names:
            f_w, _, f_la, f_lb = projection_fields(name)
            if needs[f_w]:
                flops += 2 * a * fb * d                                 # dW
            if needs["x"]:
                flops += 2 * a * fb * d                                 # dx
            la = getattr(shapes, f_la)
            if la is not None:
                r = la[0]
                if needs[f_lb]:
                    flops += 2 * a * fb * r                             # dB
                if needs[f_la] or needs["x"]:
                    flops += 2 * a * fb * r                             # Q = B^T dz
                if needs[f_la]:
                    flops += 2 * t * r * d                              # dA
                if needs["x"]:
                    flops += 2 * t * r * d                              # dx += Q A
    if router_grad:
        flops += 2 * t * blocks * d * (int(needs["router_w"]) + int(needs["x"]))  # dW_r, dx += dlogits W_r
    return flops


register_flop_formula(torch.ops.sparsify.routed_mlp)(routed_flops)
register_flop_formula(torch.ops.sparsify.routed_mlp_backward)(routed_backward_flops)
