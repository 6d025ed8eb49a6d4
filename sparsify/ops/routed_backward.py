"""The hand-written backward of sparsify::routed_mlp (ops/routed.py), written once against a grouped-primitives
implementation (ops/routed_grouping.py TORCH_GROUPED, or codegen/grouped_gemm.py's Triton kernels).

Backward (sparsify::routed_mlp_backward, hand-written) and its memory
--------------------------------------------------------------------
Saved for backward: the inputs (x and the parameters, which exist anyway), block_ids (int32 [T, top_k]),
the seed and, by default in training (save_pre, the rewrite's choice unless options.mlp.recompute), each
projection's frozen output u_P = W_P x + b_P over the kept blocks ([T * top_k, fb] in x's dtype, stored by the
forward's up kernel beside its output): top_k / blocks of the dense MLP's pre-activation per projection, and no
up GEMM in backward. With recompute, nothing of size T * F is kept and the up GEMMs run again
(2*T*top_k*fb*d FLOPs per projection). p (the router GEMM, about 1/F of the MLP) and the grouping (a sort of
T*top_k ints) are always recomputed.
    u_P        saved, or recomputed: u_P = W_P x + b_P;  l_P = B_P (A_P x), z_P = g u_P + s_P l_P, h, hd = dropout(h)
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

The 16 tensors and their gradients are addressed by name (ops/operands.py RoutedTensors): `needs` and `grads`
are dicts keyed by field, and the up / gate projections are walked by name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._vjp import _acc_dtype
from .operands import PROJECTIONS, RoutedTensors, projection_fields
from .routed_grouping import (ActGrads, Grouping, act_backward_elementwise, router_probs, sorted_gate,
                              sorted_keep)


def _backward(impl, grad_out, tensors, block_ids, seed, lora_scales, blocks, top_k, gate, activation,
              dropout_p, needs_grad, pre=()) -> list[Tensor]:
    """Gradients of the 16 tensors (RoutedTensors order), empty where not asked for; see the module docstring."""
    ts = RoutedTensors(*tensors)
    needs = ts.grad_needs(needs_grad)
    x, gate_w, down_w, down_a, down_bb = ts.x, ts.gate_w, ts.down_w, ts.down_lora_a, ts.down_lora_b
    names = ("up", "gate") if gate_w is not None else ("up",)  # the projections in front of the activation
    scale = dict(zip(PROJECTIONS, lora_scales))
    d, d_out, d_ff = x.shape[-1], down_w.shape[0], ts.up_w.shape[0]
    fb = d_ff // blocks
    dtype = x.dtype
    acc = _acc_dtype(dtype)
    x2 = x.reshape(-1, d)
    dy = grad_out.reshape(-1, d_out)
    t = x2.shape[0]
    grp = Grouping(block_ids, blocks, ts.neuron_order)
    router_grad = gate == "sigmoid2p" and (needs["router_w"] or needs["router_b"] or needs["x"])
    p = router_probs(x2, ts.router_w, ts.router_b) if gate == "sigmoid2p" else None
    g = None if p is None else sorted_gate(p, block_ids, grp, gate)
    grads: dict[str, Tensor] = {}
    dx = torch.zeros(t, d, dtype=acc, device=x.device) if needs["x"] else None
    dg = torch.zeros(grp.assignments, dtype=acc, device=x.device) if router_grad else None
    if needs["down_b"]:
        grads["down_b"] = dy.sum(0, dtype=acc)
    tok, off, perm = grp.tok, grp.offsets, grp.perm
    a_count = grp.assignments

    saved = dict(zip(names, (p_ if p_ is not None and p_.numel() else None for p_ in pre)))
    need_dh = needs["x"] or any(needs[f] for name in names for f in projection_fields(name)) or router_grad

    if a_count:
        # 1. what the activation reads: u = W x + b as the forward saved it (else recomputed), the LoRA terms
        u, xa, lora_z = {}, {}, {}
        for name in names:
            w, b, la, lb = (getattr(ts, f) for f in projection_fields(name))
            u[name] = saved[name] if saved.get(name) is not None else \
                impl.up(x2, w, tok, off, fb, perm=perm, bias=b, out_dtype=acc)
            if la is not None:
                xa[name] = F.linear(x2, la)
                lora_z[name] = impl.up(xa[name], lb, tok, off, fb, perm=perm, out_dtype=acc) * scale[name]
        dyb = dh_extra = None
        if down_a is not None:  # the down LoRA's share of dh: s A_down^T (B_down^T dy)
            dyb = F.linear(dy, down_bb.t())                                        # [T, r]
            if need_dh:
                dh_extra = impl.up(dyb, down_a.t(), tok, off, fb, perm=perm, out_dtype=acc) * scale["down"]
        dropout = sorted_keep(grp, fb, dropout_p, seed, x.device)  # the forward's mask, drawn again from the seed

        # 2. the elementwise stage: v = W_down^T dy and the activation's backward (one fused kernel where the
        # implementation has it), or, with no gradient through h asked for, only the down side's operands
        common = dict(pre=u["up"], pre_gate=u.get("gate"), perm=perm, row_scale=g, activation=activation,
                      out_dtype=dtype, lora_z=lora_z or None, want_h=down_a is not None)
        if not need_dh:
            r = act_backward_elementwise(None, off, dropout=dropout, **common)
        else:
            wants = dict(want_dg=dg is not None, want_db=any(needs[f"{name}_b"] for name in names),
                         dh_extra=dh_extra)
            r = ActGrads(*impl.act_backward(dy, down_w.t(), tok, off, fb, dropout=dropout, **common, **wants))

        # 3. the GEMMs: down projection (weight, LoRA), then the up / gate projections
        # weight gradients in the weight's dtype: wgrad writes every row once (fp32 sums in the kernel's registers),
        # so no fp32 [F, d] buffer is written, read back and cast
        if needs["down_w"]:  # written through the transposed view: neuron n is a column of W_down
            grads["down_w"] = torch.empty(d_out, d_ff, dtype=down_w.dtype, device=x.device)
            impl.wgrad(r.ghd, dy, tok, off, grads["down_w"].t(), perm=perm)
        if down_a is not None:
            if needs["down_lora_b"]:
                zd = torch.zeros(t, down_a.shape[0], dtype=acc, device=x.device)
                impl.down(r.hd, down_a, tok, off, zd, perm=perm)
                grads["down_lora_b"] = (dy.t().to(acc) @ zd) * scale["down"]
            if needs["down_lora_a"]:
                grads["down_lora_a"] = torch.empty(down_a.shape[0], d_ff, dtype=acc, device=x.device)
                impl.wgrad(r.hd, (dyb.to(acc) * scale["down"]).to(dtype), tok, off, grads["down_lora_a"].t(),
                           perm=perm)
        if need_dh:
            if dg is not None:
                dg += r.dg
            for name in names:
                f_w, f_b, f_la, f_lb = projection_fields(name)
                w, la, lb, s = getattr(ts, f_w), getattr(ts, f_la), getattr(ts, f_lb), scale[name]
                if needs[f_w]:
                    grads[f_w] = impl.wgrad(r.gdz[name], x2, tok, off,
                                            torch.empty(d_ff, d, dtype=w.dtype, device=x.device), perm=perm)
                if needs[f_b]:
                    grads[f_b] = r.db[name]
                if needs["x"]:
                    impl.down(r.gdz[name], w.t(), tok, off, dx, perm=perm)
                if la is not None and (needs[f_la] or needs[f_lb] or needs["x"]):
                    dz_w = r.dz[name]
                    if needs[f_lb]:
                        dlb = torch.empty(d_ff, la.shape[0], dtype=acc, device=x.device)
                        impl.wgrad(dz_w, (xa[name].to(acc) * s).to(dtype), tok, off, dlb, perm=perm)
                        grads[f_lb] = dlb
                    if needs[f_la] or needs["x"]:
                        q = torch.zeros(t, la.shape[0], dtype=acc, device=x.device)
                        impl.down(dz_w, lb.t(), tok, off, q, perm=perm)
                        q = q * s
                        if needs[f_la]:
                            grads[f_la] = q.t() @ x2.to(acc)
                        if needs["x"]:
                            dx += q @ la.to(acc)
    # 5. router
    if router_grad and p is not None:
        dp = torch.zeros_like(p)
        if a_count:
            dp.scatter_(1, block_ids.long(), 2.0 * grp.unsort(dg))
        dlogits = dp * p * (1.0 - p)
        if needs["router_w"]:
            grads["router_w"] = dlogits.t() @ x2.to(dlogits.dtype)
        if needs["router_b"]:
            grads["router_b"] = dlogits.sum(0)
        if needs["x"]:
            dx += (dlogits @ ts.router_w.to(dlogits.dtype)).to(acc)

    if needs["x"]:
        grads["x"] = dx.reshape(x.shape)
    result = []
    for field, tns in zip(ts._fields, ts):
        gr = grads.get(field)
        if not needs[field]:
            result.append(grad_out.new_empty(0))
        elif gr is None:  # asked for but no dependence (e.g. router with gate "none", T == 0)
            result.append(torch.zeros(tns.shape, dtype=tns.dtype, device=tns.device))
        else:
            result.append(gr.to(tns.dtype).reshape(tns.shape).contiguous())
    return result
