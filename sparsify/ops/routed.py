"""sparsify::routed_mlp: the SPT routed FFN (papers.md section 1, "Routed FFN"), a specialisation of sparsify::mlp.

    F neurons are split into `blocks` contiguous blocks of fb = F / blocks neurons, after reordering by
    `neuron_order` (None: identity; cluster_neurons() gives a MoEfication permutation). Block i holds the
    neurons n(i, j) = neuron_order[i * fb + j], j < fb: rows of up_w / up_b / gate_w / gate_b / up and gate
    LoRA B, columns of down_w and of the down LoRA A.

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

Execution (ScatterMoE style: indices move, data does not)
--------------------------------------------------------
The T * top_k assignments (token t, slot s) are sorted by block id (a stable argsort, so tokens stay in
order inside a block); tok[a] is the token of sorted assignment a, offsets [blocks + 1] the start of each
block's slice (torch.searchsorted on the sorted ids: on the device, no .item(); torch.bincount is avoided
because its CUDA kernel reads the maximum back to the host). Three grouped primitives do all the GEMMs:

    up(x, W, ...)      Y[a, j]   = epilogue(x[tok[a]] . W[n(blk(a), j)])         [A, fb], sorted order
    down(H, W, out)    out[tok[a], m] += s[a] * sum_j H[a, j] W[m, n(blk(a), j)]  scatter-add
    wgrad(L, R, out)   out[n(i, j), k]  = sum_{a in block i} L[a, j] R[tok[a], k]  per-block weight grads

Two implementations share one forward and one backward written against them (_forward / _backward):
  * TORCH_GROUPED (below): per-block torch matmuls over the block's slice; it reads the offsets on the
    host (free on CPU, a sync on CUDA). The CPU kernels and the CUDA fallback use it.
  * sparsify.codegen.grouped_gemm: generated Triton kernels (x rows gathered in the load, g / bias / LoRA /
    activation / gated product fused in the up epilogue, fp32 atomic scatter-add in down), launched on a
    grid sized from T * top_k and blocks only, so nothing is read back. The CUDA kernels use it for
    fp16 / bf16 / fp32 (everything, LoRA on every side included); fp64 and other dtypes fall back.

Backward (sparsify::routed_mlp_backward, hand-written) and its memory
--------------------------------------------------------------------
Saved for backward: the inputs (x and the parameters, which exist anyway), block_ids (int32 [T, top_k])
and the seed: per token d * sizeof(x) + 4 * top_k bytes of activations. Everything else is recomputed:
p (router GEMM, 2*T*blocks*d FLOPs: about 1/F of the MLP), the grouping (a sort of T*top_k ints) and the
pre-activations (the up GEMMs). Saving the pre-activations instead would cost T * top_k * fb (x2 when
gated) values per layer, that is top_k/blocks of the dense MLP's hidden activation, for saving
(1 or 2) * 2*T*top_k*fb*d FLOPs; SPT's goal is memory, and the dense ops checkpoint the same way.
    recompute  u_P = W_P x + b_P, l_P = B_P (A_P x), z_P = g u_P + s_P l_P, h, hd = dropout(h)
    down       v = W_down^T dy (per block);  dhd = g v + s_down A_down^T (B_down^T dy)
               dW_down[:, n] = sum_a g hd dy^T;  db_down = sum_t dy;  dg += hd . v
               LoRA: Z = A_down hd (scatter), dB_down = s dy^T Z, dA_down[:, n] = s sum_a (dy B_down) hd^T
    dropout    dh = dhd * keep / (1 - p)      (the same seeded mask)
    activation plain dz_up = act'(z_up) dh;   gated dz_up = dh act(z_gate), dz_gate = act'(z_gate) dh z_up
    up, gate   dg += dz . u;  dW[n] = sum_a g dz x^T;  db[n] = sum_a g dz;  dx += sum_a g W[n]^T dz
               LoRA: dB[n] = s sum_a dz (A x)^T;  Q = sum_a B[n]^T dz;  dx += s Q A;  dA = s Q^T x
    router     dp = 2 dg (sigmoid2p), dlogits = dp p (1 - p);  dW_r = dlogits^T x, db_r = sum dlogits,
               dx += dlogits W_r
Only the gradients asked for are computed (frozen base weights skip their wgrad GEMMs).

FLOPs (registered for both ops; 2 per multiply-add; A = T * top_k assignments, fb = F / blocks):
    forward  = 2*A*fb*d*(2 if gated else 1) + 2*A*fb*d_out + 2*T*blocks*d
               + LoRA: up / gate 2*T*r*d + 2*A*fb*r each, down 2*A*fb*r + 2*T*r*d_out
             = top_k / blocks of sparsify::mlp's count (LoRA's A x and B_down z terms excepted) + the router.
    backward = exactly the GEMMs listed above for the gradients asked for (routed_backward_flops). With
               every gradient needed and no LoRA: 3 * forward - 2*A*fb*d_out (recompute 1x, input and weight
               gradients 2x, less the down GEMM's forward, which is never recomputed: its output is not
               needed); sparsify::mlp's backward counts 3x. With frozen base weights (LoRA fine-tuning) the
               weight-gradient GEMMs drop out: recompute + v = W_down^T dy + dx (+ LoRA, router) is about 2x
               (tests/ops/test_routed_ops.py::test_flops_with_lora_and_frozen_base checks the exact count).
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
from ..tables import KERNEL_DTYPES

GATES = ("sigmoid2p", "none")
_TENSOR_ARGS = 13   # x, up_w, up_b, gate_w, gate_b, down_w, down_b, six LoRA factors (sparsify::mlp's)
_ALL_TENSORS = 16   # ... then router_w, router_b, neuron_order


# ---------------------------------------------------------------------------------------------
# routing and grouping (shared by every path)
# ---------------------------------------------------------------------------------------------

def router_probs(x2: Tensor, router_w: Tensor, router_b: Optional[Tensor]) -> Tensor:
    """p = sigmoid(x2 @ router_w^T + router_b) [T, blocks], in fp32 (fp64 when x or the router is fp64)."""
    acc = _acc_dtype(torch.promote_types(x2.dtype, router_w.dtype))
    return torch.sigmoid(F.linear(x2.to(acc), router_w.to(acc), None if router_b is None else router_b.to(acc)))


def route(x2: Tensor, router_w: Tensor, router_b: Optional[Tensor], top_k: int) -> tuple[Tensor, Tensor]:
    """(p [T, blocks], block_ids [T, top_k] int32): the top_k blocks by p, highest first, ties to the lower
    block id (a stable descending sort keeps equal p in id order)."""
    p = router_probs(x2, router_w, router_b)
    ids = torch.sort(p, dim=-1, descending=True, stable=True).indices[:, :top_k]
    return p, ids.to(torch.int32)


def sorted_gate(p: Tensor, block_ids: Tensor, grp: "Grouping", gate: str) -> Optional[Tensor]:
    """g of each sorted assignment ([A], p's dtype): 2 p (gate "sigmoid2p") or None (gate "none": g = 1)."""
    if gate == "none":
        return None
    return 2.0 * p.gather(1, block_ids.long()).reshape(-1)[grp.order]


class Grouping:
    """The sorted assignment order of a routing: everything on the routing's device, nothing read back.

    tok [A] int32       token of sorted assignment a (A = T * top_k)
    order [A] int64     flat assignment index (t * top_k + slot) of sorted assignment a
    blk [A] int64       block of sorted assignment a (non-decreasing)
    offsets [nb+1] int32  block i's assignments are [offsets[i], offsets[i + 1])
    perm [F] or None    neuron order (int64), None for identity
    """

    def __init__(self, block_ids: Tensor, blocks: int, neuron_order: Optional[Tensor]):
        self.T, self.top_k = block_ids.shape
        self.blocks = blocks
        flat = block_ids.reshape(-1).long()
        self.order = torch.argsort(flat, stable=True)
        self.blk = flat[self.order]
        self.tok = torch.div(self.order, self.top_k, rounding_mode="floor").to(torch.int32)
        bounds = torch.arange(blocks + 1, device=flat.device, dtype=flat.dtype)
        self.offsets = torch.searchsorted(self.blk, bounds).to(torch.int32)
        self.perm = None if neuron_order is None else neuron_order.long()

    @property
    def assignments(self) -> int:
        return self.T * self.top_k

    def unsort(self, values: Tensor) -> Tensor:
        """[A, ...] in sorted order -> [T, top_k, ...] in the block_ids layout."""
        out = torch.empty_like(values)
        out[self.order] = values
        return out.reshape(self.T, self.top_k, *values.shape[1:])


def _neurons(grp_perm: Optional[Tensor], i: int, fb: int) -> Tensor | slice:
    if grp_perm is None:
        return slice(i * fb, (i + 1) * fb)
    return grp_perm[i * fb:(i + 1) * fb]


class TorchGrouped:
    """The grouped primitives in plain torch: one matmul per block over its slice of sorted assignments.

    Reads `offsets` on the host (a device sync on CUDA: this is the CPU / fallback implementation).
    Epilogues are computed in the accumulation dtype, like the Triton kernels' fp32 epilogues.
    """

    name = "torch"

    @staticmethod
    def _slices(offsets: Tensor):
        bounds = offsets.tolist()
        return [(i, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]

    @staticmethod
    def up(x: Tensor, w: Tensor, tok: Tensor, offsets: Tensor, block_size: int, *, perm=None, bias=None,
           row_scale=None, lora=None, activation=None, gate=None, out_dtype=None) -> Tensor:
        """Y[a, j] = f(x[tok[a]] . w[n(i, j)]) for the assignments a of block i (see module docstring).

        bias [F]; row_scale [A] (the gate g, applied to the frozen part W x + b); lora = (xa [T, r], lb [F, r],
        scale): adds scale * xa[tok] . lb[n]; activation: a name or None (identity); gate = (wg, bg, lora_g):
        the gated form act(pre(wg, bg, lora_g)) * pre(w, bias, lora)."""
        acc = _acc_dtype(x.dtype)
        fb = block_size
        out = torch.empty(tok.shape[0], fb, dtype=out_dtype or x.dtype, device=x.device)
        for i, lo, hi in TorchGrouped._slices(offsets):
            if hi == lo:
                continue
            n = _neurons(perm, i, fb)
            t = tok[lo:hi].long()
            xs = x[t]
            s = None if row_scale is None else row_scale[lo:hi].to(acc)[:, None]

            def pre(w_, b_, lora_):
                y = F.linear(xs, w_[n], None if b_ is None else b_[n]).to(acc)
                if s is not None:
                    y = y * s
                if lora_ is not None:
                    xa, lb, sc = lora_
                    y = y + F.linear(xa[t], lb[n]).to(acc) * sc
                return y

            y = pre(w, bias, lora)
            if gate is not None:
                a = pre(*gate)
                y = (ACTIVATIONS[activation](a) if activation else a) * y
            elif activation:
                y = ACTIVATIONS[activation](y)
            out[lo:hi] = y.to(out.dtype)
        return out

    @staticmethod
    def down(h: Tensor, w: Tensor, tok: Tensor, offsets: Tensor, out: Tensor, *, perm=None,
             row_scale=None) -> Tensor:
        """out[tok[a], m] += s[a] * sum_j h[a, j] w[m, n(i, j)] (in place, returns out)."""
        fb = h.shape[1]
        for i, lo, hi in TorchGrouped._slices(offsets):
            if hi == lo:
                continue
            n = _neurons(perm, i, fb)
            y = F.linear(h[lo:hi], w[:, n]).to(out.dtype)
            if row_scale is not None:
                y = y * row_scale[lo:hi].to(out.dtype)[:, None]
            out.index_add_(0, tok[lo:hi].long(), y)
        return out

    @staticmethod
    def wgrad(l: Tensor, r: Tensor, tok: Tensor, offsets: Tensor, out: Tensor, *, perm=None) -> Tensor:
        """out[n(i, j), k] = sum_{a in block i} l[a, j] r[tok[a], k] (every neuron row written; a view is
        written through)."""
        fb = l.shape[1]
        for i, lo, hi in TorchGrouped._slices(offsets):
            n = _neurons(perm, i, fb)
            out[n] = (l[lo:hi].t() @ r[tok[lo:hi].long()]).to(out.dtype)
        return out


TORCH_GROUPED = TorchGrouped()


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _act_backward(activation: str, grad: Tensor, z: Tensor) -> Tensor:
    """d act(z) / dz * grad, with the formulas torch's autograd uses."""
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, z, approximate="none")
    if activation == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, z, approximate="tanh")
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, z, 0)
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, z)
    if activation == "quick_gelu":  # d/dz z * sigmoid(1.702 z)
        s = torch.sigmoid(1.702 * z)
        return grad * (s + 1.702 * z * s * (1.0 - s))
    raise ValueError(f"sparsify::routed_mlp: unknown activation {activation!r}")


def _keep_mask(rows: int, cols: int, p: float, seed: Tensor, device) -> Tensor:
    """The keep mask of _vjp.seeded_dropout for an [rows, cols] tensor (same generator, same draw)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed.item()))  # seed lives on the CPU: no device sync
    return torch.rand((rows, cols), generator=generator, device=device, dtype=torch.float32) >= p


def _sorted_dropout(h: Tensor, grp: Grouping, fb: int, p: float, seed: Tensor) -> Tensor:
    """seeded_dropout of the dense [T, F] (block-major) hidden state, applied to its kept rows h [A, fb]."""
    if p <= 0.0:
        return h
    if p >= 1.0:
        return h * 0.0
    keep = _keep_mask(grp.T, grp.blocks * fb, p, seed, h.device).view(grp.T, grp.blocks, fb)
    keep = keep[grp.tok.long(), grp.blk]
    return h * keep.to(h.dtype) / (1.0 - p)


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
# forward and backward, written once against a grouped-primitives implementation
# ---------------------------------------------------------------------------------------------

def _forward(impl, x, up_w, up_b, gate_w, gate_b, down_w, down_b, up_lora_a, up_lora_b, gate_lora_a,
             gate_lora_b, down_lora_a, down_lora_b, lora_scales, router_w, router_b, neuron_order, blocks,
             top_k, gate, activation, dropout_p, seed) -> tuple[Tensor, Tensor]:
    d, d_out, d_ff = x.shape[-1], down_w.shape[0], up_w.shape[0]
    fb = d_ff // blocks
    x2 = x.reshape(-1, d)
    acc = _acc_dtype(x.dtype)
    p, ids = route(x2, router_w, router_b, top_k)
    grp = Grouping(ids, blocks, neuron_order)
    g = sorted_gate(p, ids, grp, gate)
    out = torch.zeros(x2.shape[0], d_out, dtype=acc, device=x.device)
    if down_b is not None:
        out += down_b.to(acc)
    if grp.assignments:
        lora_up = None if up_lora_a is None else (F.linear(x2, up_lora_a), up_lora_b, lora_scales[0])
        gate_args = None
        if gate_w is not None:
            lora_g = None if gate_lora_a is None else (F.linear(x2, gate_lora_a), gate_lora_b, lora_scales[1])
            gate_args = (gate_w, gate_b, lora_g)
        h = impl.up(x2, up_w, grp.tok, grp.offsets, fb, perm=grp.perm, bias=up_b, row_scale=g, lora=lora_up,
                    activation=activation, gate=gate_args, out_dtype=x.dtype)
        h = _sorted_dropout(h, grp, fb, dropout_p, seed)
        impl.down(h, down_w, grp.tok, grp.offsets, out, perm=grp.perm, row_scale=g)
        if down_lora_a is not None:
            z = torch.zeros(x2.shape[0], down_lora_a.shape[0], dtype=acc, device=x.device)
            impl.down(h, down_lora_a, grp.tok, grp.offsets, z, perm=grp.perm)
            out += F.linear(z.to(x.dtype), down_lora_b).to(acc) * lora_scales[2]
    return out.to(x.dtype).reshape(*x.shape[:-1], d_out), ids


def _backward(impl, grad_out, tensors, block_ids, seed, lora_scales, blocks, top_k, gate, activation,
              dropout_p, needs) -> list[Tensor]:
    (x, up_w, up_b, gate_w, gate_b, down_w, down_b, up_a, up_bb, gate_a, gate_bb, down_a, down_bb,
     router_w, router_b, neuron_order) = tensors
    needs = [bool(n) and t is not None for n, t in zip(needs, tensors)]
    needs[15] = False  # neuron_order: an index
    n_x, n_uw, n_ub, n_gw, n_gb, n_dw, n_db, n_ua, n_ubb, n_ga, n_gbb, n_da, n_dbb, n_rw, n_rb = needs[:15]
    d, d_out, d_ff = x.shape[-1], down_w.shape[0], up_w.shape[0]
    fb = d_ff // blocks
    dtype = x.dtype
    acc = _acc_dtype(dtype)
    x2 = x.reshape(-1, d)
    dy = grad_out.reshape(-1, d_out)
    t = x2.shape[0]
    grp = Grouping(block_ids, blocks, neuron_order)
    router_grad = gate == "sigmoid2p" and (n_rw or n_rb or n_x)
    p = router_probs(x2, router_w, router_b) if gate == "sigmoid2p" else None
    g = None if p is None else sorted_gate(p, block_ids, grp, gate)
    grads: list[Optional[Tensor]] = [None] * _ALL_TENSORS
    dx = torch.zeros(t, d, dtype=acc, device=x.device) if n_x else None
    dg = torch.zeros(grp.assignments, dtype=acc, device=x.device) if router_grad else None
    if n_db:
        grads[6] = dy.sum(0, dtype=acc)
    tok, off, perm = grp.tok, grp.offsets, grp.perm
    a_count = grp.assignments

    def scaled(v):  # g * v per sorted row (g = 1 for gate "none")
        return v if g is None else v * g[:, None].to(v.dtype)

    # 1. recompute the pre-activations (fp32 buffers for half inputs)
    def recompute(w, b, la, lb, s):
        u = impl.up(x2, w, tok, off, fb, perm=perm, bias=b, out_dtype=acc)
        xa = None
        z = scaled(u)
        if la is not None:
            xa = F.linear(x2, la)
            z = z + impl.up(xa, lb, tok, off, fb, perm=perm, out_dtype=acc) * s
        return u, z, xa

    if a_count:
        u_up, z_up, xa_up = recompute(up_w, up_b, up_a, up_bb, lora_scales[0])
        if gate_w is not None:
            u_g, z_g, xa_g = recompute(gate_w, gate_b, gate_a, gate_bb, lora_scales[1])
            act_g = ACTIVATIONS[activation](z_g)
            h = act_g * z_up
        else:
            h = ACTIVATIONS[activation](z_up)
        hd = _sorted_dropout(h, grp, fb, dropout_p, seed)

        # 2. down projection
        need_dh = n_x or n_uw or n_ub or n_gw or n_gb or n_ua or n_ubb or n_ga or n_gbb or router_grad
        hd_w = hd.to(dtype)
        if n_dw:  # written through the transposed view: neuron n is a column of W_down
            grads[5] = torch.empty(d_out, d_ff, dtype=acc, device=x.device)
            impl.wgrad(scaled(hd).to(dtype), dy, tok, off, grads[5].t(), perm=perm)
        dhd = None
        if need_dh:
            v = impl.up(dy, down_w.t(), tok, off, fb, perm=perm, out_dtype=acc)
            if dg is not None:
                dg += (hd * v).sum(1)
            dhd = scaled(v)
        if down_a is not None:
            dyb = F.linear(dy, down_bb.t())                                        # [T, r]
            if need_dh:
                dhd = dhd + impl.up(dyb, down_a.t(), tok, off, fb, perm=perm, out_dtype=acc) * lora_scales[2]
            if n_dbb:
                z = torch.zeros(t, down_a.shape[0], dtype=acc, device=x.device)
                impl.down(hd_w, down_a, tok, off, z, perm=perm)
                grads[12] = (dy.t().to(acc) @ z) * lora_scales[2]
            if n_da:
                grads[11] = torch.empty(down_a.shape[0], d_ff, dtype=acc, device=x.device)
                impl.wgrad(hd_w, (dyb.to(acc) * lora_scales[2]).to(dtype), tok, off, grads[11].t(), perm=perm)

        # 3. dropout, activation
        if need_dh:
            dh = _sorted_dropout(dhd, grp, fb, dropout_p, seed)
            if gate_w is not None:
                dz_up = dh * act_g
                dz_g = _act_backward(activation, dh * z_up, z_g)
                projections = [(dz_up, u_up, xa_up, up_w, up_a, up_bb, lora_scales[0], 1),
                               (dz_g, u_g, xa_g, gate_w, gate_a, gate_bb, lora_scales[1], 3)]
            else:
                dz_up = _act_backward(activation, dh, z_up)
                projections = [(dz_up, u_up, xa_up, up_w, up_a, up_bb, lora_scales[0], 1)]

            # 4. up / gate projections
            for dz, u, xa, w, la, lb, s, k in projections:
                n_w, n_b, n_la, n_lb = needs[k], needs[k + 1], needs[k + 6], needs[k + 7]
                if dg is not None:
                    dg += (dz * u).sum(1)
                gdz = scaled(dz)
                gdz_w = gdz.to(dtype)
                if n_w:
                    dw = torch.empty(d_ff, d, dtype=acc, device=x.device)
                    grads[k] = impl.wgrad(gdz_w, x2, tok, off, dw, perm=perm)
                if n_b:
                    db = torch.zeros(blocks, fb, dtype=acc, device=x.device).index_add_(0, grp.blk, gdz)
                    db = db.reshape(-1)
                    if perm is not None:
                        db = torch.empty_like(db).index_copy_(0, perm, db)
                    grads[k + 1] = db
                if n_x:
                    impl.down(gdz_w, w.t(), tok, off, dx, perm=perm)
                if la is not None and (n_la or n_lb or n_x):
                    dz_w = dz.to(dtype)
                    if n_lb:
                        dlb = torch.empty(d_ff, la.shape[0], dtype=acc, device=x.device)
                        impl.wgrad(dz_w, (xa.to(acc) * s).to(dtype), tok, off, dlb, perm=perm)
                        grads[k + 7] = dlb
                    if n_la or n_x:
                        q = torch.zeros(t, la.shape[0], dtype=acc, device=x.device)
                        impl.down(dz_w, lb.t(), tok, off, q, perm=perm)
                        q = q * s
                        if n_la:
                            grads[k + 6] = q.t() @ x2.to(acc)
                        if n_x:
                            dx += q @ la.to(acc)
    else:  # T == 0: only zero gradients
        pass

    # 5. router
    if router_grad and p is not None:
        dp = torch.zeros_like(p)
        if a_count:
            dp.scatter_(1, block_ids.long(), 2.0 * grp.unsort(dg))
        dlogits = dp * p * (1.0 - p)
        if n_rw:
            grads[13] = dlogits.t() @ x2.to(dlogits.dtype)
        if n_rb:
            grads[14] = dlogits.sum(0)
        if n_x:
            dx += (dlogits @ router_w.to(dlogits.dtype)).to(acc)

    if n_x:
        grads[0] = dx.reshape(x.shape)
    result = []
    for gr, tns, need in zip(grads, tensors, needs):
        if not need:
            result.append(grad_out.new_empty(0))
        elif gr is None:  # asked for but no dependence (e.g. router with gate "none", T == 0)
            result.append(torch.zeros(tns.shape, dtype=tns.dtype, device=tns.device))
        else:
            result.append(gr.to(tns.dtype).reshape(tns.shape).contiguous())
    return result


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
    blocks: int, top_k: int, gate: str, activation: str, dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out [..., d_out], block_ids [T, top_k] int32, seed); the seed replays dropout in backward."""
    check_routed_inputs(x, up_w, gate_w, down_w, router_w, router_b, neuron_order, blocks, top_k, gate,
                        activation, dropout_p)
    seed = _fresh(dropout_p)
    out, ids = _forward(TORCH_GROUPED, x, up_w, up_b, gate_w, gate_b, down_w, down_b, up_lora_a, up_lora_b,
                        gate_lora_a, gate_lora_b, down_lora_a, down_lora_b, lora_scales, router_w, router_b,
                        neuron_order, blocks, top_k, gate, activation, dropout_p, seed)
    return out.contiguous(), ids, seed


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
                              seed) -> tuple[Tensor, Tensor]:
    """The forward on the generated Triton grouped GEMMs (sparsify.codegen.grouped_gemm): (out, block_ids).
    CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. No host sync (nothing is read back)."""
    return _forward(_triton_impl(), x, up_w, up_b, gate_w, gate_b, down_w, down_b, up_lora_a, up_lora_b,
                    gate_lora_a, gate_lora_b, down_lora_a, down_lora_b, lora_scales, router_w, router_b,
                    neuron_order, blocks, top_k, gate, activation, dropout_p, seed)


def routed_mlp_backward_triton(grad_out, tensors, block_ids, seed, lora_scales, blocks, top_k, gate, activation,
                               dropout_p, needs_grad) -> list[Tensor]:
    """The hand-written backward on the Triton grouped GEMMs (same contract as sparsify::routed_mlp_backward)."""
    return _backward(_triton_impl(), grad_out, tensors, block_ids, seed, lora_scales, blocks, top_k, gate,
                     activation, dropout_p, needs_grad)


def routed_mlp_cuda(x, up_w, up_b, gate_w, gate_b, down_w, down_b, up_lora_a, up_lora_b, gate_lora_a, gate_lora_b,
      down_lora_a, down_lora_b, lora_scales, router_w, router_b, neuron_order, blocks, top_k, gate, activation,
      dropout_p):
    check_routed_inputs(x, up_w, gate_w, down_w, router_w, router_b, neuron_order, blocks, top_k, gate,
                        activation, dropout_p)
    seed = _fresh(dropout_p)
    args = (x, up_w, up_b, gate_w, gate_b, down_w, down_b, up_lora_a, up_lora_b, gate_lora_a, gate_lora_b,
            down_lora_a, down_lora_b, lora_scales, router_w, router_b, neuron_order, blocks, top_k, gate,
            activation, dropout_p, seed)
    tensors = (up_w, up_b, gate_w, gate_b, down_w, down_b, up_lora_a, up_lora_b, gate_lora_a, gate_lora_b,
               down_lora_a, down_lora_b)
    impl = _triton_impl() if triton_supports(x, *tensors) else TORCH_GROUPED
    out, ids = _forward(impl, *args)
    return out.contiguous(), ids, seed


@routed_mlp.register_fake
def _(x, up_w, up_b, gate_w, gate_b, down_w, down_b, up_lora_a, up_lora_b, gate_lora_a, gate_lora_b,
      down_lora_a, down_lora_b, lora_scales, router_w, router_b, neuron_order, blocks, top_k, gate, activation,
      dropout_p):
    t = math.prod(x.shape[:-1])
    return (x.new_empty((*x.shape[:-1], down_w.shape[0])),
            x.new_empty((t, top_k), dtype=torch.int32),
            torch.empty((), dtype=torch.int64, device="cpu"))


@torch.library.custom_op("sparsify::routed_mlp_backward", mutates_args=())
def routed_mlp_backward(
    grad_out: Tensor, tensors: list[Optional[Tensor]], block_ids: Tensor, seed: Tensor, lora_scales: list[float],
    blocks: int, top_k: int, gate: str, activation: str, dropout_p: float, needs_grad: list[bool],
) -> list[Tensor]:
    """Gradients for the 16 tensor inputs of sparsify::routed_mlp (13 of sparsify::mlp, router_w, router_b,
    neuron_order), empty where not asked for (neuron_order: always)."""
    return _backward(TORCH_GROUPED, grad_out, tensors, block_ids, seed, lora_scales, blocks, top_k, gate,
                     activation, dropout_p, needs_grad)


def routed_mlp_backward_cuda(grad_out, tensors, block_ids, seed, lora_scales, blocks, top_k, gate, activation, dropout_p, needs_grad):
    impl = _triton_impl() if triton_supports(tensors[0], grad_out, *tensors[1:15]) else TORCH_GROUPED
    return _backward(impl, grad_out, tensors, block_ids, seed, lora_scales, blocks, top_k, gate, activation,
                     dropout_p, needs_grad)


def _effective_needs(tensors, needs_grad) -> list[bool]:
    needs = [bool(n) and t is not None for n, t in zip(needs_grad, tensors)]
    needs += [False] * (len(tensors) - len(needs))
    needs[15] = False
    return needs


@routed_mlp_backward.register_fake
def _(grad_out, tensors, block_ids, seed, lora_scales, blocks, top_k, gate, activation, dropout_p, needs_grad):
    return placeholder_grads(tensors, _effective_needs(tensors, needs_grad), grad_out)


def _setup_context(ctx, inputs, output):
    tensors = list(inputs[:_TENSOR_ARGS]) + list(inputs[_TENSOR_ARGS + 1:_TENSOR_ARGS + 4])
    _, block_ids, seed = output
    ctx.save_for_backward(*tensors, block_ids, seed)
    ctx.mark_non_differentiable(block_ids)
    ctx.lora_scales = inputs[_TENSOR_ARGS]
    ctx.args = inputs[_TENSOR_ARGS + 4:]  # blocks, top_k, gate, activation, dropout_p


def _autograd_backward(ctx, grad_out, _grad_ids, _grad_seed):
    *tensors, block_ids, seed = ctx.saved_tensors
    ni = ctx.needs_input_grad
    needs = list(ni[:_TENSOR_ARGS]) + list(ni[_TENSOR_ARGS + 1:_TENSOR_ARGS + 4])
    needs = _effective_needs(tensors, needs)
    grads = torch.ops.sparsify.routed_mlp_backward(grad_out.contiguous(), tensors, block_ids, seed,
                                                   ctx.lora_scales, *ctx.args, needs)
    g = [gr if need else None for gr, need in zip(grads, needs)]
    return (*g[:_TENSOR_ARGS], None, *g[_TENSOR_ARGS:_ALL_TENSORS], None, None, None, None, None)


routed_mlp.register_autograd(_autograd_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# FLOP formulas
# ---------------------------------------------------------------------------------------------

def _dims(x_shape, up_w_shape, down_w_shape, blocks, top_k):
    tokens = math.prod(x_shape[:-1])
    return tokens, tokens * top_k, up_w_shape[0] // blocks, x_shape[-1], down_w_shape[0]


def routed_flops(x_shape, up_w_shape, up_b_shape, gate_w_shape, gate_b_shape, down_w_shape, down_b_shape,
                 up_a, up_b, gate_a, gate_b, down_a, down_b, lora_scales, router_w_shape, router_b_shape,
                 neuron_order_shape, blocks, top_k, gate, activation, dropout_p, out_shape=None, **kwargs) -> int:
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
                          gate, activation, dropout_p, needs_grad, out_shape=None, **kwargs) -> int:
    """Exactly the GEMMs _backward runs for the gradients asked for (2 per multiply-add)."""
    (x_s, uw_s, ub_s, gw_s, gb_s, dw_s, db_s, ua_s, ubb_s, ga_s, gbb_s, da_s, dbb_s, rw_s, rb_s, _) = tensors_shapes
    needs = [bool(n) and s is not None for n, s in zip(needs_grad, tensors_shapes)]
    needs += [False] * (16 - len(needs))
    t, a, fb, d, d_out = _dims(x_s, uw_s, dw_s, blocks, top_k)
    router_grad = gate == "sigmoid2p" and (needs[13] or needs[14] or needs[0])
    flops = 2 * t * blocks * d if gate == "sigmoid2p" else 0          # recompute p
    projections = [(uw_s, ua_s, 1)] + ([(gw_s, ga_s, 3)] if gw_s is not None else [])
    for _, la, _k in projections:                                       # recompute u (and the LoRA part)
        flops += 2 * a * fb * d
        if la is not None:
            flops += 2 * t * la[0] * d + 2 * a * fb * la[0]
    need_dh = needs[0] or router_grad or any(needs[k] for k in (1, 2, 3, 4, 7, 8, 9, 10))
    if needs[5]:
        flops += 2 * a * fb * d_out                                     # dW_down
    if need_dh:
        flops += 2 * a * fb * d_out                                     # v = W_down^T dy
    if da_s is not None:
        r = da_s[0]
        if need_dh or needs[11]:
            flops += 2 * t * d_out * r                                  # dy @ B_down
        if need_dh:
            flops += 2 * a * fb * r                                     # A_down^T (dy B)
        if needs[12]:
            flops += 2 * a * fb * r + 2 * t * d_out * r                 # Z = A_down hd, dB_down
        if needs[11]:
            flops += 2 * a * fb * r                                     # dA_down
    if need_dh:
        for _, la, k in projections:
            if needs[k]:
                flops += 2 * a * fb * d                                 # dW
            if needs[0]:
                flops += 2 * a * fb * d                                 # dx
            if la is not None:
                r = la[0]
                if needs[k + 7]:
                    flops += 2 * a * fb * r                             # dB
                if needs[k + 6] or needs[0]:
                    flops += 2 * a * fb * r                             # Q = B^T dz
                if needs[k + 6]:
                    flops += 2 * t * r * d                              # dA
                if needs[0]:
                    flops += 2 * t * r * d                              # dx += Q A
    if router_grad:
        flops += 2 * t * blocks * d * (int(needs[13]) + int(needs[0]))  # dW_r, dx += dlogits W_r
    return flops


register_flop_formula(torch.ops.sparsify.routed_mlp)(routed_flops)
register_flop_formula(torch.ops.sparsify.routed_mlp_backward)(routed_backward_flops)


# ---------------------------------------------------------------------------------------------
# MoEfication: neuron clustering and an initial router
# ---------------------------------------------------------------------------------------------

def _balanced_assign(sim: Tensor, capacity: int) -> Tensor:
    """Each row (neuron) to one column (cluster), every column taking exactly `capacity` rows, greedily by
    similarity: every unassigned neuron proposes to its most similar non-full cluster, each cluster accepts
    its most similar proposers up to its remaining room; repeat (at most `clusters` rounds, since every round
    fills a cluster or places every proposer)."""
    n, k = sim.shape
    assign = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((k,), capacity, dtype=torch.long)
    while True:
        free = (assign < 0).nonzero().squeeze(1)
        if free.numel() == 0:
            return assign
        s = sim[free].masked_fill((room == 0)[None, :], float("-inf"))
        best_sim, best = s.max(dim=1)
        # proposers grouped by cluster, most similar first (ties: lower neuron index)
        by_sim = torch.sort(best_sim, descending=True, stable=True).indices
        by_cluster = by_sim[torch.sort(best[by_sim], stable=True).indices]
        cl = best[by_cluster]
        first = torch.searchsorted(cl, cl, right=False)
        rank = torch.arange(cl.numel()) - first
        accept = rank < room[cl]
        assign[free[by_cluster[accept]]] = cl[accept]
        room -= torch.bincount(cl[accept], minlength=k)


def cluster_neurons(up_w: Tensor, blocks: int, iterations: int = 10, seed: int = 0) -> Tensor:
    """MoEfication's neuron split: balanced k-means of the rows of up_w [F, d] into `blocks` groups of F / blocks
    neurons. Returns the permutation (LongTensor [F], block-major: block i = out[i*F/blocks:(i+1)*F/blocks],
    neurons ascending inside a block) to pass as neuron_order.

    Rows are L2-normalised and compared by cosine similarity (spherical k-means: a neuron's direction decides
    which inputs excite it, its norm mostly its scale); centroids start at `blocks` distinct rows drawn with
    `seed`, then alternate balanced assignment (_balanced_assign) and mean-of-members updates. Deterministic.
    For a gated MLP pass the gate projection (the rows whose activation decides whether a neuron fires)."""
    d_ff = up_w.shape[0]
    if blocks < 1 or d_ff % blocks:
        raise ValueError(f"cluster_neurons: d_ff={d_ff} is not a multiple of blocks={blocks}")
    with torch.no_grad():
        rows = F.normalize(up_w.detach().to("cpu", torch.float64), dim=1)
        gen = torch.Generator().manual_seed(seed)
        centroids = rows[torch.randperm(d_ff, generator=gen)[:blocks]]
        assign = None
        for _ in range(max(1, iterations)):
            new = _balanced_assign(rows @ centroids.t(), d_ff // blocks)
            if assign is not None and torch.equal(new, assign):
                break
            assign = new
            sums = torch.zeros(blocks, rows.shape[1], dtype=rows.dtype).index_add_(0, assign, rows)
            centroids = F.normalize(sums, dim=1)
        order = torch.sort(assign * d_ff + torch.arange(d_ff)).indices  # block-major, ascending inside
    return order.to(up_w.device)


def init_router(up_w: Tensor, up_b: Optional[Tensor], neuron_order: Optional[Tensor], blocks: int,
                scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """A starting router: (router_w [blocks, d], router_b [blocks]) in up_w's dtype and device.

    Row i is the mean of block i's up-projection rows minus the mean of all rows (same for the bias), times
    `scale`. So logit_i(x) = scale * (mean pre-activation of block i's neurons - mean over all neurons):
      * tokens go to the blocks whose neurons they excite most on average (the ranking of the blocks is the
        ranking of their mean pre-activations; the centring subtracts the same value from every block of a
        token, so it does not change the selection);
      * the logits are centred across blocks, so p = sigmoid(logit) stays around 1/2 and the SPT gate
        g = 2p around 1 while blocks are about equally excited: at initialisation the routed MLP is close to
        the dense MLP restricted to the kept blocks (no rescaling of their outputs); `scale` < 1 keeps g
        even closer to 1, and training moves the router from there.
    A mean over fb neurons is small unless the block's neurons agree (which clustering makes them do), so
    logits are O(1) without extra normalisation. For a gated MLP pass the gate projection."""
    d_ff, d = up_w.shape
    if blocks < 1 or d_ff % blocks:
        raise ValueError(f"init_router: d_ff={d_ff} is not a multiple of blocks={blocks}")
    with torch.no_grad():
        order = slice(None) if neuron_order is None else neuron_order.long()
        w = up_w.detach().to(torch.float64)[order].reshape(blocks, d_ff // blocks, d).mean(1)
        router_w = (w - w.mean(0, keepdim=True)) * scale
        if up_b is not None:
            b = up_b.detach().to(torch.float64)[order].reshape(blocks, -1).mean(1)
            router_b = (b - b.mean()) * scale
        else:
            router_b = torch.zeros(blocks, dtype=torch.float64, device=up_w.device)
    return router_w.to(up_w.dtype), router_b.to(up_w.dtype)


def fit_router(x: Tensor, hidden: Tensor, down_w: Tensor, neuron_order: Optional[Tensor], blocks: int,
               logit_std: float = 0.05, ridge: float = 1e-3) -> tuple[Tensor, Tensor]:
    """A router fitted on sample tokens: (router_w [blocks, d], router_b [blocks]) in down_w's dtype and device.

    x [T, d] are the MLP's inputs, hidden [T, F] its activations (after the activation and the gated product,
    before the down projection), down_w [d_out, F]. Block i's contribution to a token's output is
    c_i = || hidden[:, block i] @ down_w[:, block i]^T ||; its log, centred per token over the blocks, is the
    target a ridge regression on [x, 1] fits. So the router ranks blocks by their predicted share of the output
    (what top-k routing should keep), from the start. The logits are then scaled to a standard deviation of
    `logit_std` over the samples: ranking does not depend on the scale, and small logits keep p = sigmoid near
    1/2, so the SPT gate 2p starts near 1 (the kept blocks' outputs unscaled) where the sigmoid's slope is
    largest (the router learns fastest). Computed in float64."""
    tokens, d_ff = hidden.shape
    if blocks < 1 or d_ff % blocks:
        raise ValueError(f"fit_router: d_ff={d_ff} is not a multiple of blocks={blocks}")
    with torch.no_grad():
        order = torch.arange(d_ff, device=hidden.device) if neuron_order is None else neuron_order.long()
        h = hidden.detach().to(torch.float64)[:, order].reshape(tokens, blocks, d_ff // blocks)
        w = down_w.detach().to(torch.float64)[:, order].reshape(-1, blocks, d_ff // blocks)
        contrib = torch.einsum("tbf,obf->tbo", h, w).norm(dim=-1)                      # [T, blocks]
        target = contrib.clamp_min(1e-12).log()
        target = target - target.mean(1, keepdim=True)
        xs = torch.cat([x.detach().to(torch.float64).reshape(tokens, -1),
                        torch.ones(tokens, 1, dtype=torch.float64, device=x.device)], dim=1)
        gram = xs.T @ xs
        gram += ridge * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype,
                                                                              device=gram.device)
        coef = torch.linalg.solve(gram, xs.T @ target)                                  # [d + 1, blocks]
        logits = xs @ coef
        coef = coef * (logit_std / logits.std().clamp_min(1e-12))
    return coef[:-1].T.contiguous().to(down_w.dtype), coef[-1].contiguous().to(down_w.dtype)
