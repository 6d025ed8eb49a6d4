"""Lowering: the dense sparsify::attention calls the plan left become torch's scaled_dot_product_attention where its
semantics are the op's, so the default backend runs what the model itself would (flash / memory-efficient /
cuDNN on a GPU, the fused flash kernel on a CPU), forward and backward, instead of the op's n x n reference; the
dense sparsify::mlp calls become the plain linear / activation / linear they stand for (lower_dense_mlp), which
Inductor fuses, plans and saves for backward as it does the model alone (the op saves only its inputs and
recomputes the up projection in backward: 1.2x Inductor's time on CPU before this pass).

    graph -> regions -> plan -> rewrites (methods) -> lower_dense_attention, lower_dense_mlp -> Inductor

Why a pass and not the op's kernel: SDPA's backward needs what its forward saved (the log-sum-exp), which an
opaque custom op cannot hand to autograd without recomputing the forward; as plain aten calls in the graph,
AOTAutograd differentiates them as it does the model's own SDPA. sparsify::attention stays the region's op in
sparsify.prepare's trace (prepare records its arguments) and wherever SDPA differs from it:
  - is_causal with Lq != Lk (the op aligns bottom-right, SDPA top-left),
  - a float mask of another dtype than q (a fp32 finfo.min mask on fp16 scores: casting it would turn eager's
    uniform row into SDPA's zero row),
  - a float mask and is_causal together with a mask SDPA cannot fold (none: a causal bool is folded in below).
SDPA gives 0 for a row with every key masked, as the op does (torch >= 2.5's safe softmax; tests/ops/test_ops.py
holds the two equal on such rows). Dropout draws differ (SDPA's generator, not the op's seed); its rate and
scaling are the same.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import GraphModule

from ..ops.mlp import _proj, mlp_hidden
from .fx_utils import REGION_TAG, insert_call, value

LOWERED = "sparsify_lowered"  # node meta: what a dense attention call became ("sdpa")


def sdpa_applies(q, k, v, mask, is_causal) -> bool:
    """Whether F.scaled_dot_product_attention computes sparsify::attention's result for these (fake) inputs."""
    if any(t is None for t in (q, k, v)) or q.dim() != 4:
        return False
    if is_causal and q.shape[-2] != k.shape[-2]:
        return False
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        return False
    return True


def sdpa_attention(q, k, v, mask, scale: float, dropout_p: float, is_causal: bool):
    """sparsify::attention's output through SDPA (GQA by enable_gqa; a causal flag with a mask folded into it)."""
    if is_causal and mask is not None:
        lq, lk = q.shape[-2], k.shape[-2]
        causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        mask = mask & causal if mask.dtype == torch.bool else mask.masked_fill(~causal, float("-inf"))
        is_causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def lower_dense_attention(gm: GraphModule) -> set:
    """Replace each sparsify::attention call whose inputs SDPA covers; returns the module paths lowered."""
    lowered = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.sparsify.attention.default:
            continue
        q, k, v, mask, scale, dropout_p, is_causal = node.args
        if not sdpa_applies(value(q), value(k), value(v), value(mask) if mask is not None else None, is_causal):
            continue
        users = list(node.users)
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in users):
            continue  # something reads the dropout seed: keep the op
        with gm.graph.inserting_before(node):
            out = insert_call(gm.graph, sdpa_attention, node.args, like=users[0] if users else node)
        out.meta[LOWERED] = "sdpa"
        out.meta["sparsify_module"] = node.meta.get("sparsify_module", "")
        if REGION_TAG in node.meta:
            out.meta[REGION_TAG] = node.meta[REGION_TAG]
        for user in users:
            user.replace_all_uses_with(out)
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        lowered.add(out.meta["sparsify_module"])
    return lowered


def dense_mlp(x, up_w, up_b, gate_w, gate_b, down_w, down_b, up_lora_a, up_lora_b, gate_lora_a, gate_lora_b,
              down_lora_a, down_lora_b, lora_scales, activation: str, dropout_p: float):
    """sparsify::mlp's output as plain torch calls (its reference, with torch's dropout: the rate and scaling are
    the op's, the draw is torch's generator, as the model's own dropout would be)."""
    h = mlp_hidden(x, up_w, up_b, gate_w, gate_b, up_lora_a, up_lora_b, gate_lora_a, gate_lora_b, lora_scales,
                   activation)
    if dropout_p > 0:
        h = F.dropout(h, dropout_p, training=True)
    return _proj(h, down_w, down_b, down_lora_a, down_lora_b, lora_scales[2])


def lower_dense_mlp(gm: GraphModule) -> set:
    """Replace each sparsify::mlp call whose dropout seed nothing reads; returns the module paths lowered."""
    lowered = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.sparsify.mlp.default:
            continue
        users = list(node.users)
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in users):
            continue  # something reads the dropout seed: keep the op
        with gm.graph.inserting_before(node):
            out = insert_call(gm.graph, dense_mlp, node.args, like=users[0] if users else node)
        out.meta[LOWERED] = "torch"
        out.meta["sparsify_module"] = node.meta.get("sparsify_module", "")
        if REGION_TAG in node.meta:
            out.meta[REGION_TAG] = node.meta[REGION_TAG]
        for user in users:
            user.replace_all_uses_with(out)
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        lowered.add(out.meta["sparsify_module"])
    return lowered
