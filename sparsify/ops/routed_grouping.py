"""The grouped primitives sparsify::routed_mlp runs on (ops/routed.py), in plain torch: routing, grouping,
the per-block GEMMs, and the dropout and activation helpers its forward and backward share.

Execution (ScatterMoE style: indices move, data does not)
--------------------------------------------------------
The T * top_k assignments (token t, slot s) are sorted by block id (a stable argsort, so tokens stay in
order inside a block); tok[a] is the token of sorted assignment a, offsets [blocks + 1] the start of each
block's slice (torch.searchsorted on the sorted ids: on the device, no .item(); torch.bincount is avoided
because its CUDA kernel reads the maximum back to the host). Three grouped primitives do all the GEMMs:

    up(x, W, ...)      Y[a, j]   = epilogue(x[tok[a]] . W[n(blk(a), j)])         [A, fb], sorted order
    down(H, W, out)    out[tok[a], m] += s[a] * sum_j H[a, j] W[m, n(blk(a), j)]  scatter-add
    wgrad(L, R, out)   out[n(i, j), k]  = sum_{a in block i} L[a, j] R[tok[a], k]  per-block weight grads

Two implementations share one forward (ops/routed.py _forward) and one backward (ops/routed_backward.py
_backward) written against them:
  * TORCH_GROUPED (below): per-block torch matmuls over the block's slice; it reads the offsets on the
    host (free on CPU, a sync on CUDA). The CPU kernels and the CUDA fallback use it.
  * sparsify.codegen.grouped_gemm: generated Triton kernels (x rows gathered in the load, g / bias / LoRA /
    activation / gated product fused in the up epilogue, fp32 atomic scatter-add in down), launched on a
    grid sized from T * top_k and blocks only, so nothing is read back. The CUDA kernels use it for
    fp16 / bf16 / fp32 (everything, LoRA on every side included); fp64 and other dtypes fall back.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._vjp import _acc_dtype
from .mlp import ACTIVATIONS


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
           row_scale=None, lora=None, activation=None, gate=None, out_dtype=None, pre_out=None,
           dropout=None) -> Tensor:
        """Y[a, j] = f(x[tok[a]] . w[n(i, j)]) for the assignments a of block i (see module docstring).

        bias [F]; row_scale [A] (the gate g, applied to the frozen part W x + b); lora = (xa [T, r], lb [F, r],
        scale): adds scale * xa[tok] . lb[n]; activation: a name or None (identity); gate = (wg, bg, lora_g):
        the gated form act(pre(wg, bg, lora_g)) * pre(w, bias, lora). pre_out = (u [A, fb], u_gate [A, fb] or
        None): also stores the frozen part W x + b of each projection, before g and LoRA (what the backward
        reads instead of recomputing the GEMM). dropout = (keep [A, fb] bool, p): Y's kept entries scaled by
        1 / (1 - p), the others zero (sorted_keep)."""
        acc = _acc_dtype(x.dtype)
        drop = dropout_scaling(dropout)
        fb = block_size
        out = torch.empty(tok.shape[0], fb, dtype=out_dtype or x.dtype, device=x.device)
        for i, lo, hi in TorchGrouped._slices(offsets):
            if hi == lo:
                continue
            n = _neurons(perm, i, fb)
            t = tok[lo:hi].long()
            xs = x[t]
            s = None if row_scale is None else row_scale[lo:hi].to(acc)[:, None]

            def pre(w_, b_, lora_, saved):
                y = F.linear(xs, w_[n], None if b_ is None else b_[n]).to(acc)
                if saved is not None:
                    saved[lo:hi] = y.to(saved.dtype)
                if s is not None:
                    y = y * s
                if lora_ is not None:
                    xa, lb, sc = lora_
                    y = y + F.linear(xa[t], lb[n]).to(acc) * sc
                return y

            y = pre(w, bias, lora, None if pre_out is None else pre_out[0])
            if gate is not None:
                a = pre(*gate, None if pre_out is None else pre_out[1])
                y = (ACTIVATIONS[activation](a) if activation else a) * y
            elif activation:
                y = ACTIVATIONS[activation](y)
            out[lo:hi] = drop(y, lo, hi).to(out.dtype)
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


    @staticmethod
    def act_backward(dy: Tensor, w: Tensor, tok: Tensor, offsets: Tensor, block_size: int, *, pre: Tensor,
                     pre_gate=None, perm=None, row_scale=None, activation: str, out_dtype, want_dg=False,
                     want_db=False, lora_z=None, dh_extra=None, want_h=False, dropout=None) -> "ActGrads":
        """v = dy . w[n] over the sorted assignments (w: W_down's transpose), then the activation's backward
        (act_backward_elementwise). The plain-torch twin of codegen/grouped_gemm.py's fused act_bwd kernel."""
        v = TorchGrouped.up(dy, w, tok, offsets, block_size, perm=perm, out_dtype=_acc_dtype(dy.dtype))
        return act_backward_elementwise(v, offsets, pre=pre, pre_gate=pre_gate, perm=perm, row_scale=row_scale,
                                        activation=activation, out_dtype=out_dtype, want_dg=want_dg,
                                        want_db=want_db, lora_z=lora_z, dh_extra=dh_extra, want_h=want_h,
                                        dropout=dropout)


TORCH_GROUPED = TorchGrouped()


# ---------------------------------------------------------------------------------------------
# the backward's elementwise stage
# ---------------------------------------------------------------------------------------------

class ActGrads(NamedTuple):
    """What the routed backward's GEMMs read, per sorted assignment [A, fb] (ops/routed_backward.py):
    ghd = g hd (W_down's weight-gradient operand), hd (the down LoRA's, with want_h), gdz = g dz per projection
    (the up / gate weight and input gradients'), dz per projection with LoRA (its factors'), all in the operand
    dtype; dg [A] fp32 = hd . v + sum dz . u (the gate gradient's rows); db per projection [F] fp32 in neuron
    order (the bias gradients)."""
    ghd: Tensor
    hd: Optional[Tensor]
    gdz: dict
    dz: dict
    dg: Optional[Tensor]
    db: Optional[dict]


def act_backward_elementwise(v: Optional[Tensor], offsets: Tensor, *, pre: Tensor, pre_gate=None, perm=None,
                             row_scale=None, activation: str, out_dtype, want_dg=False, want_db=False, lora_z=None,
                             dh_extra=None, want_h=False, dropout=None) -> ActGrads:
    """The activation's backward in torch, from v = W_down^T dy (None: only the forward side, ghd and hd) and
    the forward's u = W x + b (pre, pre_gate):
        z = g u (+ lora_z: s B (A x)),  h = act(z_up) or act(z_gate) z_up,  hd = dropout(h)
        dh = dropout(g v + dh_extra),  dz from dh through the activation,  dg = hd . v + sum dz . u
    dropout: (keep [A, fb] bool, p), the forward's mask (sorted_keep), or None."""
    acc = _acc_dtype(pre.dtype)
    lora_z = lora_z or {}
    scaling = dropout_scaling(dropout)
    g = torch.ones(pre.shape[0], 1, dtype=acc, device=pre.device) if row_scale is None else row_scale.to(acc)[:, None]
    def drop(t):
        return scaling(t, 0, t.shape[0])
    u = {"up": pre.to(acc)} if pre_gate is None else {"up": pre.to(acc), "gate": pre_gate.to(acc)}
    z = {name: u[name] * g + (lora_z[name] if lora_z.get(name) is not None else 0.0) for name in u}
    act_g = ACTIVATIONS[activation](z["gate"]) if pre_gate is not None else None
    h = ACTIVATIONS[activation](z["up"]) if pre_gate is None else act_g * z["up"]
    hd = drop(h)
    dz, dg, db = {}, None, None
    if v is not None:
        dhd = v * g if dh_extra is None else v * g + dh_extra
        dh = drop(dhd)
        if pre_gate is None:
            dz = {"up": _act_backward(activation, dh, z["up"])}
        else:
            dz = {"up": dh * act_g, "gate": _act_backward(activation, dh * z["up"], z["gate"])}
        if want_dg:
            dg = (hd * v).sum(1) + sum((dz[name] * u[name]).sum(1) for name in dz)
    gdz = {name: dz[name] * g for name in dz}
    if want_db:  # a segment sum over each block's rows, then back to neuron order
        db = {}
        for name, value in gdz.items():
            sums = torch.segment_reduce(value, "sum", offsets=offsets.long(), axis=0).reshape(-1)
            db[name] = sums if perm is None else torch.empty_like(sums).index_copy_(0, perm.long(), sums)
    return ActGrads(ghd=(hd * g).to(out_dtype), hd=hd.to(out_dtype) if want_h else None,
                    gdz={name: value.to(out_dtype) for name, value in gdz.items()},
                    dz={name: dz[name].to(out_dtype) for name in dz if lora_z.get(name) is not None},
                    dg=dg, db=db)


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
    if activation == "relu2":  # d/dz relu(z)^2 = 2 relu(z)
        return grad * (2.0 * torch.relu(z))
    raise ValueError(f"sparsify::routed_mlp: unknown activation {activation!r}")


def _keep_mask(rows: int, cols: int, p: float, seed: Tensor, device) -> Tensor:
    """The keep mask of _vjp.seeded_dropout for an [rows, cols] tensor (same generator, same draw)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed.item()))  # seed lives on the CPU: no device sync
    return torch.rand((rows, cols), generator=generator, device=device, dtype=torch.float32) >= p


def sorted_keep(grp: Grouping, fb: int, p: float, seed: Tensor, device) -> Optional[tuple]:
    """The dropout of the dense [T, F] (block-major) hidden state as seeded_dropout draws it, at the sorted
    assignments: (keep [A, fb] bool, p), what the grouped up / act_backward primitives take; None for p = 0."""
    if p <= 0.0:
        return None
    keep = _keep_mask(grp.T, grp.blocks * fb, p, seed, device).view(grp.T, grp.blocks, fb)
    return keep[grp.tok.long(), grp.blk], p


def dropout_scaling(dropout: Optional[tuple]):
    """f(t, lo, hi): rows lo..hi of an [A, fb] tensor t with the (keep, p) dropout applied (identity for None;
    p = 1 drops everything)."""
    if dropout is None:
        return lambda t, lo, hi: t
    keep, p = dropout
    if p >= 1.0:
        return lambda t, lo, hi: t * 0.0
    return lambda t, lo, hi: t * keep[lo:hi].to(t.dtype) / (1.0 - p)

