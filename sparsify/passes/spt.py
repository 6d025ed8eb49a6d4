"""SPT sparse attention (papers.md section 1): each attention region becomes

    codes_q = pq_encode(q, C)   codes_k = pq_encode(k, C)            C: the module's PQ codebook
    index, valid = pq_select(codes_q, codes_k, L, is_causal, allowed)  top-L keys per query
                 (score="exact": qk_select(q, k, ...) ranks by q . k; no codebook)
    out = spt_attention(q, k, v, index, valid, mask, scale, dropout)  attention on the kept pattern
    out = aux_loss(out, codebook_loss(q, C) + codebook_loss(k, C), w) gradient injection (DESIGN 6)

The codebook is the nn.Parameter sparsify.prepare() registered on the attention module; it reaches
the graph through a sparsify::tag node (DESIGN.md decision 5), which collect_state() removes.

Masks keep their full meaning: the selection is given the region's whole mask as `allowed` [B, H|1, Lq, Lk]
(allowed_from_mask), row by row, and the attention op adds or applies the same mask to every kept score. So
padding, causal masks aligned bottom-right (KV-cache decoding, prefix tuning), sliding windows and the
block-diagonal masks of packed sequences all hold exactly; `is_causal` is only SDPA's own flag (top-left, as
SDPA computes it). Causality read off how a mask was built is a report fact, never applied a second time.
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
    head_dim = facts.get("head_dim")
    if config.score == "codes" and (not head_dim or head_dim % config.subspace_dim):
        return f"head_dim {head_dim} is not a multiple of subspace_dim {config.subspace_dim}"
    if value(f.q).dtype not in SPT_DTYPES:
        return f"dtype {value(f.q).dtype} has no SPT kernel (supported: fp16, bf16, fp32)"
    k_shape = shape(f.k)
    seq = k_shape[-1] if f.k_transposed else k_shape[-2]
    # a dynamic length is compared symbolically: bool() installs a shape guard, so a later call on the other
    # side of min_seq recompiles with its own plan (the plan never depends on the order of lengths)
    if bool(seq < config.min_seq):
        return f"sequence length {seq} is below min_seq={config.min_seq}"
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


# An additive mask entry at or below this masks its key: eager's exp() of such a score relative to any row
# with an unmasked key is exactly 0 in every float dtype (HF uses finfo.min; older models -1e4 or -1e9).
MASKED_BELOW = -1e4


def allowed_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B|1, H|1, Lq|1, Lk] bool, the selection's `allowed`: where the region's mask lets query i see key j.

    bool masks as they are (a row with no key gives 0, as SDPA). A float mask's row that masks every key with
    a finite value is softmax over equally shifted scores in eager (the uniform average for finfo.min, e.g.
    left-padding rows): every key stays a candidate there, and the attention adds the mask in full, as eager.
    """
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.dtype == torch.bool:
        return mask
    allowed = mask > MASKED_BELOW
    return allowed | ~allowed.any(dim=-1, keepdim=True)


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
        allowed = None if mask is None else insert_call(graph, allowed_from_mask, (mask,), like=like)
        is_causal = bool(f.is_causal)  # SDPA's flag; a causal mask is in `allowed` and `mask`
        if config.granularity == "block":  # per query block, the key blocks with the best PQ score
            block = config.block_size
            keep = _keep_count(graph, k, config.keep, like, block)
            select = torch.ops.sparsify.qk_select_blocks if exact else torch.ops.sparsify.pq_select_blocks
            selected = insert_call(graph, select.default,
                                   (rank_q, rank_k, keep, block, is_causal, allowed), like=like)
            args = (f.q, k, f.v, _item(graph, selected, 0, like), _item(graph, selected, 1, like), block, mask,
                    float(f.scale), is_causal, float(f.dropout_p))
            call = insert_call(graph, torch.ops.sparsify.block_sparse_attention.default, args, like=like)
        else:  # per query, the L keys with the most matching codes (or the highest q . k)
            keep = _keep_count(graph, k, config.keep, like)
            select = torch.ops.sparsify.qk_select if exact else torch.ops.sparsify.pq_select
            selected = insert_call(graph, select.default,
                                   (rank_q, rank_k, keep, is_causal, allowed), like=like)
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
