"""SPT sparse attention (papers.md section 1): each attention region becomes

    codes_q = pq_encode(q, C)   codes_k = pq_encode(k, C)            C: the module's PQ codebook
    index, valid = pq_select(codes_q, codes_k, L, causal, key_valid)  top-L keys per query
                 (score="exact": qk_select(q, k, ...) ranks by q . k; no codebook)
    out = spt_attention(q, k, v, index, valid, mask, scale, dropout)  attention on the kept pattern
    out = aux_loss(out, codebook_loss(q, C) + codebook_loss(k, C), w) gradient injection (DESIGN 6)

The codebook is the nn.Parameter sparsify.prepare() registered on the attention module; it reaches
the graph through a sparsify::tag node (DESIGN.md decision 5), which collect_state() removes.
"""
from __future__ import annotations

import math
import operator
from fractions import Fraction
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from ..config import AttentionConfig
from .dense import attention_operands
from .fx_utils import erase_unused, insert_call, module_path, shape, value
from .regions import Region

SPT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CODEBOOK_KIND = "pq_codebook"  # the state kind sparsify.prepare tags attention modules with


def collect_state(gm: GraphModule) -> dict[tuple[str, str], list]:
    """Strip every sparsify::tag node; return (module path, state kind) -> the state placeholders.

    Runs first on every graph: it also records where the traced frame sits in the user's root module
    (frame_root_prefix), so every module_path of this graph, here and in the region finder, is a
    model.named_modules() name even in a frame Dynamo resumed after a graph break."""
    from .fx_utils import frame_root_prefix

    frame_root_prefix(gm)
    states = {}
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in (torch.ops.sparsify.tag, torch.ops.sparsify.tag.default):
            x, state, name = node.args
            # the tag runs in a forward hook of the owning module (or of its child `offset`)
            kind, _, offset = name.partition("@")
            path = module_path(node)
            if offset:
                path = path[: -len(offset)].rstrip(".") if path.endswith(offset) else path
            states[(path, kind)] = list(state)
            node.replace_all_uses_with(x)
            gm.graph.erase_node(node)
    return states


def spt_guard(region: Region, config: AttentionConfig, states: dict) -> Optional[str]:
    """Why this attention region cannot take SPT (None: it can)."""
    facts = region.facts
    f = facts.get("_match")
    if not 0.0 < config.keep <= 1.0:
        return f"keep={config.keep} is outside (0, 1]"
    head_dim = facts.get("head_dim")
    if config.score == "codes" and (not head_dim or head_dim % config.subspace_dim):
        return f"head_dim {head_dim} is not a multiple of subspace_dim {config.subspace_dim}"
    if value(f.q).dtype not in SPT_DTYPES:
        return f"dtype {value(f.q).dtype} has no SPT kernel (supported: fp16, bf16, fp32)"
    k_shape = shape(f.k)
    seq = k_shape[-1] if f.k_transposed else k_shape[-2]
    if isinstance(seq, torch.SymInt):  # dynamic length: decide on the length that was traced
        seq = seq.node.hint if seq.node.hint is not None else config.min_seq
    if seq < config.min_seq:
        return f"sequence length {seq} is below min_seq={config.min_seq}"
    if config.granularity == "block" and config.block_size not in (16, 32, 64, 128):
        return f"block_size={config.block_size} is not one of 16, 32, 64, 128"
    if config.score == "exact":
        return None  # ranks by q . k: no codebook to check
    if (region.module, CODEBOOK_KIND) not in states:
        return ("no PQ codebook on this module: call sparsify.prepare(model, *example_inputs, "
                "options=...) before torch.compile")
    cb = value(states[(region.module, CODEBOOK_KIND)][0])
    expected = (head_dim // config.subspace_dim, config.codewords, config.subspace_dim)
    if tuple(cb.shape) != expected:
        return f"the module's codebook has shape {tuple(cb.shape)}, options ask for {expected}"
    return None


def key_valid_from_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[batch, lk] bool: keys any query may attend to, read off the mask's last query row.

    HF's padding masks mask keys (every row alike) and their causal masks allow all keys in the last
    row, so the last row is the key-padding mask; the full mask is still applied to every kept
    score by spt_attention, so a mask of another shape costs selection quality, never correctness.
    """
    batch, lq, lk = q.shape[0], q.shape[-2], k.shape[-2]
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    last_row = allowed.expand(*allowed.shape[:-2], lq, lk)[..., -1, :]
    while last_row.dim() > 2:
        last_row = last_row.any(dim=1)
    return last_row.expand(batch, lk)


def spt_codebook_aux(q: torch.Tensor, k: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    from ..ops.spt import codebook_loss
    return codebook_loss(q, codebook) + codebook_loss(k, codebook)


def rewrite_spt(gm: GraphModule, region: Region, codebook: Optional[Node], config: AttentionConfig) -> None:
    """Replace the region by selection + sparse attention; `codebook` is None for score="exact"."""
    f = region.facts["_match"]
    graph = gm.graph
    like = region.output
    exact = config.score == "exact"
    with graph.inserting_before(region.output):
        k, mask = attention_operands(graph, region)
        # what the selection ranks: q and k themselves ("exact"), or their PQ codes
        if exact:
            rank_q, rank_k = f.q, k
        else:
            rank_q = insert_call(graph, torch.ops.sparsify.pq_encode.default, (f.q, codebook), like=like)
            rank_k = insert_call(graph, torch.ops.sparsify.pq_encode.default, (k, codebook), like=like)
        key_valid = None
        if mask is not None:
            key_valid = insert_call(graph, key_valid_from_mask, (mask, f.q, k), like=like)
        causal = bool(region.facts["causal"])
        if config.granularity == "block":  # per query block, the key blocks with the best PQ score
            block = config.block_size
            keep = _keep_count(graph, k, config.keep, like, block)
            select = torch.ops.sparsify.qk_select_blocks if exact else torch.ops.sparsify.pq_select_blocks
            selected = insert_call(graph, select.default,
                                   (rank_q, rank_k, keep, block, causal, key_valid), like=like)
            args = (f.q, k, f.v, _item(graph, selected, 0, like), _item(graph, selected, 1, like), block, mask,
                    float(f.scale), causal, float(f.dropout_p))
            call = insert_call(graph, torch.ops.sparsify.block_sparse_attention.default, args, like=like)
        else:  # per query, the L keys with the most matching codes (or the highest q . k)
            keep = _keep_count(graph, k, config.keep, like)
            select = torch.ops.sparsify.qk_select if exact else torch.ops.sparsify.pq_select
            selected = insert_call(graph, select.default,
                                   (rank_q, rank_k, keep, causal, key_valid), like=like)
            args = (f.q, k, f.v, _item(graph, selected, 0, like), _item(graph, selected, 1, like), mask,
                    float(f.scale), float(f.dropout_p))
            call = insert_call(graph, torch.ops.sparsify.spt_attention.default, args, like=like)
        call.meta["sparsify_module"] = region.module
        out = _item(graph, call, 0, like)
        if config.codebook_loss > 0 and not exact:
            aux = insert_call(graph, spt_codebook_aux, (f.q, k, codebook), like=like)
            out = insert_call(graph, torch.ops.sparsify.aux_loss.default,
                              (out, aux, float(config.codebook_loss), region.module), like=like)
    region.output.replace_all_uses_with(out)
    erase_unused(region.interior)
    unit = "blocks" if config.granularity == "block" else "keys"
    region.facts[f"keep_{unit}"] = keep if isinstance(keep, int) else f"ceil({config.keep:g}*n_{unit})"
    # what ranks the keys: few PQ subspaces make a coarse score (README: recall at head_dim 32)
    region.facts["score"] = "exact" if exact else f"codes({value(codebook).shape[0]} subspaces)"


def _item(graph, node: Node, index: int, like: Node) -> Node:
    return insert_call(graph, operator.getitem, (node, index), like=like)


def _keep_count(graph, k: Node, keep: float, like: Node, block: int = 1):
    """ceil(keep * n) for n = Lk keys, or n = ceil(Lk / block) key blocks: an int for a static
    length, else SymInt arithmetic in the graph (keep as a fraction num/den: exact integer math)."""
    lk = shape(k)[-2]
    if isinstance(lk, int):
        n = -(-lk // block)
        return max(1, min(n, math.ceil(keep * n)))
    ratio = Fraction(keep).limit_denominator(4096)
    size = insert_call(graph, torch.ops.aten.sym_size.int, (k, 2), like=like)
    if block > 1:
        padded = insert_call(graph, operator.add, (size, block - 1), like=like)
        size = insert_call(graph, operator.floordiv, (padded, block), like=like)
    scaled = insert_call(graph, operator.mul, (size, ratio.numerator), like=like)
    rounded_up = insert_call(graph, operator.add, (scaled, ratio.denominator - 1), like=like)
    return insert_call(graph, operator.floordiv, (rounded_up, ratio.denominator), like=like)
