"""The dense rewrite: each planned region becomes one sparsify::attention or sparsify::mlp call.

The op computes exactly what the region computed, so this pass is where the region finder's facts
are proven right (tests compare against eager); the sparse methods replace these calls with theirs.
"""
from __future__ import annotations

import math
import operator

import torch
from torch.fx import GraphModule

from .. import ops  # noqa: F401  (registers torch.ops.sparsify.*)
from ..ops.operands import MLPOperands
from .fx_utils import erase_unused, insert_call, shape, value
from .regions import Region


def as_the_model_reads_it(graph, out, region: Region):
    """The sparse attention ops return SDPA's memory layout ([B, Lq, H, Dv] under a [B, H, Lq, Dv] shape:
    ops/spt.py attention_output). A model whose attention output was contiguous and that calls .view on it
    (a bmm-style merge of heads) needs it contiguous: copy there, nowhere else (transpose / reshape take any)."""
    original = value(region.output)
    viewed = any(u.op == "call_method" and u.target == "view" or u.target is torch.Tensor.view
                 for u in region.output.users)
    if viewed and isinstance(original, torch.Tensor) and original.is_contiguous():
        return insert_call(graph, torch.Tensor.contiguous, (out,), like=region.output)
    return out


def attention_operands(graph, region: Region):
    """(k, mask, is_causal) in the form the attention ops take, inserted at the current insertion point:
    k as [B, Hkv, Lk, D], all masks folded into one (additive terms summed; bool: True = keep), and the ops'
    causal flag (bottom-right, ops/causal.py). SDPA's is_causal is top-left: where the lengths differ it becomes
    an explicit mask, so the ops' flag never has to mean SDPA's."""
    f = region.facts["_match"]
    k = f.k
    if f.k_transposed:  # the model multiplied by a k^T it did not get from a transpose
        k = insert_call(graph, torch.transpose, (k, -1, -2), like=region.output)
    mask = None
    for term in f.additive_masks:  # T5: position bias + padding mask, summed once here
        mask = term if mask is None else insert_call(graph, operator.add, (mask, term), like=region.output)
    if f.keep_mask is not None:
        mask = f.keep_mask
    elif f.drop_mask is not None:
        mask = insert_call(graph, torch.logical_not, (f.drop_mask,), like=region.output)
    if (f.keep_mask is not None or f.drop_mask is not None) and math.isfinite(f.mask_fill):
        # a finite fill (finfo.min): a row with every key masked is eager's uniform average, which the additive
        # fp32 finfo.min reproduces (scores + it round to it); a bool mask would give SDPA's 0 there
        mask = insert_call(graph, finite_fill_mask, (mask,), like=region.output)
    is_causal = bool(f.is_causal)
    if is_causal:
        lq, lk = shape(f.q)[-2], shape(k)[-2]
        # bool() of a symbolic comparison installs a shape guard: another length recompiles with its own plan
        if bool(lq != lk):
            mask = insert_call(graph, sdpa_top_left_causal, (f.q, k), like=region.output)  # SDPA: no mask with it
            is_causal = False
    return k, mask, is_causal


def sdpa_top_left_causal(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[1, 1, Lq, Lk] bool: SDPA's is_causal when Lq != Lk (top-left: key j <= query i)."""
    return torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()[None, None]


def finite_fill_mask(keep: torch.Tensor) -> torch.Tensor:
    """bool keep mask -> additive fp32 mask: 0 where kept, finfo(float32).min where masked."""
    return torch.zeros(keep.shape, dtype=torch.float32, device=keep.device).masked_fill(
        ~keep, torch.finfo(torch.float32).min)


def rewrite_attention(gm: GraphModule, region: Region) -> None:
    f = region.facts["_match"]
    graph = gm.graph
    with graph.inserting_before(region.output):
        k, mask, is_causal = attention_operands(graph, region)
        call = insert_call(graph, torch.ops.sparsify.attention.default,
                           (f.q, k, f.v, mask, float(f.scale), float(f.dropout_p), is_causal),
                           like=region.output)
        call.meta["sparsify_module"] = region.module
        out = insert_call(graph, operator.getitem, (call, 0), like=region.output)
    region.output.replace_all_uses_with(out)
    erase_unused(region.interior)


def mlp_operands(region: Region) -> MLPOperands:
    """The 13 tensor operands and the LoRA scales of the MLP ops, in their schema order."""
    up, gate, down = region.facts["_match"]

    def lora(p):
        return (p.lora_a, p.lora_b) if p is not None and p.lora_a is not None else (None, None)

    def lora_scale(p):
        return float(p.lora_scale) if p is not None and p.lora_a is not None else 1.0

    return MLPOperands(
        x=up.x, up_weight=up.weight, up_bias=up.bias,
        gate_weight=gate.weight if gate else None, gate_bias=gate.bias if gate else None,
        down_weight=down.weight, down_bias=down.bias,
        up_lora_a=lora(up)[0], up_lora_b=lora(up)[1], gate_lora_a=lora(gate)[0], gate_lora_b=lora(gate)[1],
        down_lora_a=lora(down)[0], down_lora_b=lora(down)[1],
        lora_scales=[lora_scale(up), lora_scale(gate), lora_scale(down)],
    )


def rewrite_mlp(gm: GraphModule, region: Region) -> None:
    graph = gm.graph
    with graph.inserting_before(region.output):
        args = (*mlp_operands(region), region.facts["activation"], float(region.facts["dropout_p"]))
        call = insert_call(graph, torch.ops.sparsify.mlp.default, args, like=region.output)
        call.meta["sparsify_module"] = region.module
        out = insert_call(graph, operator.getitem, (call, 0), like=region.output)
    region.output.replace_all_uses_with(out)
    erase_unused(region.interior)
