"""HSA, MST's hybrid sparse attention (papers.md section 2): a fixed causal sparse pattern during a window of training
steps, computed by the block-sparse attention kernels that skip the empty blocks.

    options = {"linear": {"method": "mst", "total_steps": T}, "attention": {"method": "hsa"}}

The pattern, per query block qb and key block kb (blocks of `block` tokens; causal inside, bottom-right):
    local:    0 <= qb - kb < window / block             (a causal band of window tokens, in whole blocks)
    strided:  kb <= qb and (qb - kb) % (stride / block) == 0
    union:    either (the Sparse Transformer's pair; with window == stride every key is two hops away)
The authors' code applies token patterns ((i - j) mod 128 == 0) as a dense SDPA mask: no speed. A token-level
stride no longer than the block touches every key block, so a block-skipping kernel gains nothing from it; here
the pattern is defined on blocks (window and stride multiples of the block, stride at least two blocks: checked
when the options are made), so every kept block is computed whole and every other one is skipped. The default
(block 64, window = stride = 256) keeps 4 local blocks and every 4th block behind them.

When: `active` "always", or "ultra": MST's ultra-sparse phase (options.linear's warmup_end * total_steps up to
ultra_end * total_steps; MixedSparsity flips a bool buffer beside each attention module, a graph input: no
recompile). Outside it the same op runs every causal block: dense attention.

The graph: per call, the block map [nQB, nKB] is built from the sequence length (hsa_layout: arange arithmetic,
SymInt-safe) and the flag, and sparsify::block_sparse_attention (ops/spt_block.py; Triton kernels on CUDA) takes
it with the region's own mask and causality, so the result is SDPA's with the boolean mask
`pattern_mask(L, ...)` & causal & the model's mask (tests/methods/test_hsa.py holds it to that).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch

from ..config import choice, integer
from ..passes.dense import as_the_model_reads_it, attention_operands
from ..passes.fx_utils import erase_unused, insert_call, shape
from .base import Method, StateKind, register

HSA_KIND = "hsa"
ACTIVE = "sparsify_hsa_active"
HEADS = "sparsify_hsa_heads"  # (heads, head_dim): the FLOP account's attention shape
HSA_STATE = StateKind(HSA_KIND, (ACTIVE, HEADS))


def _multiple_of_block(name: str, default: int, at_least: int):
    def check(value, config, where):
        block = config.block
        if not isinstance(value, int) or isinstance(value, bool) or value < at_least * block or value % block:
            raise ValueError(f"sparsify: {where}={value!r} is not valid; a multiple of block={block} of at least "
                             f"{at_least * block}" + (" (a stride of one block keeps every key block: no block "
                                                      "could be skipped)" if at_least > 1 else ""))
        return value
    return field(default=default, metadata={"check": check})


@dataclass
class HSAOptions:
    """HSA's fields of options.attention (with method="hsa").

    pattern: "union" (local band + strided), "local", "strided"
    block:   the pattern's and the kernel's block of tokens: 16, 32, 64 or 128
    window:  the local band in tokens, a multiple of block
    stride:  the strided pattern's step in tokens, a multiple of block of at least 2 blocks
    active:  "ultra" (MST's ultra-sparse phase, driven by sparsify.training.MixedSparsity) or "always"
    """
    pattern: str = choice("union", "local", "strided")
    block: int = integer(64, low=16, among=(16, 32, 64, 128))
    window: int = _multiple_of_block("window", 256, 1)
    stride: int = _multiple_of_block("stride", 256, 2)
    active: str = choice("ultra", "always")


def block_pattern(nqb: int, nkb: int, pattern: str, window_blocks: int, stride_blocks: int,
                  device=None) -> torch.Tensor:
    """bool [nQB, nKB]: which key blocks each query block keeps (causal at block level; self-attention)."""
    qb = torch.arange(nqb, device=device)[:, None]
    kb = torch.arange(nkb, device=device)[None, :]
    gap = qb - kb
    local = (gap >= 0) & (gap < window_blocks)
    strided = (gap >= 0) & (gap % stride_blocks == 0)
    return {"local": local, "strided": strided, "union": local | strided}[pattern]


def hsa_layout(q: torch.Tensor, active: torch.Tensor, pattern: str, block: int, window: int, stride: int):
    """(block_index, block_valid) [1, 1, nQB, nKB] for block_sparse_attention: slot s is key block s; valid where
    causal at block level and, while `active` (bool [1]) is set, in the pattern."""
    n = -(-q.shape[-2] // block)
    kept = block_pattern(n, n, pattern, window // block, stride // block, q.device)
    causal = block_pattern(n, n, "local", n, 1, q.device)
    valid = causal & (kept | ~active.reshape(()))
    index = torch.arange(n, device=q.device, dtype=torch.int32).expand(n, n)
    return index[None, None], valid[None, None]


def pattern_mask(length: int, options: HSAOptions, device=None) -> torch.Tensor:
    """bool [L, L]: the token mask HSA computes (pattern blocks & token causality), for SDPA comparisons."""
    n = -(-length // options.block)
    blocks = block_pattern(n, n, options.pattern, options.window // options.block, options.stride // options.block,
                           device)
    pos = torch.arange(length, device=device)
    keep = blocks[pos[:, None] // options.block, pos[None, :] // options.block]
    return keep & (pos[None, :] <= pos[:, None])


def pattern_density(length: int, options: HSAOptions) -> float:
    """The share of the causal (query, key) pairs the pattern keeps at sequence length `length`."""
    keep = pattern_mask(length, options)
    return float(keep.sum()) / (length * (length + 1) / 2)


class HSA(Method):
    name = "hsa"
    kinds = ("attention",)
    options = HSAOptions
    state = (HSA_STATE,)
    needs_prepare = True
    report_facts = ("hsa_pattern",)

    def decision(self, region, options, mode):
        return "hsa (block-sparse attention)"

    def guard(self, region, options, states, mode):
        f = region.facts["_match"]
        lq, lk = shape(f.q)[-2], shape(f.k)[-1 if f.k_transposed else -2]
        if bool(lq != lk):  # a KV cache: the pattern is defined for self-attention over one sequence
            return f"query length {lq} differs from key length {lk} (a KV cache): HSA is a training pattern"
        if not region.facts.get("causal"):
            return "not causal attention: HSA's patterns are causal (pretraining decoders)"
        if states.get((region.module, HSA_KIND)) is None:
            return "no HSA state on this module: run sparsify.prepare(model, ..., options=...) with these options first"
        return None

    def rewrite(self, gm, region, options, states, mode):
        f = region.facts["_match"]
        graph = gm.graph
        like = region.output
        active = states[(region.module, HSA_KIND)][0]
        with graph.inserting_before(region.output):
            k, mask, is_causal = attention_operands(graph, region)
            layout = insert_call(graph, hsa_layout, (f.q, active, options.pattern, options.block, options.window,
                                                     options.stride), like=like)
            index = insert_call(graph, operator.getitem, (layout, 0), like=like)
            valid = insert_call(graph, operator.getitem, (layout, 1), like=like)
            call = insert_call(graph, torch.ops.sparsify.block_sparse_attention.default,
                               (f.q, k, f.v, index, valid, options.block, mask, float(f.scale), is_causal,
                                float(f.dropout_p)), like=like)
            out = as_the_model_reads_it(graph, insert_call(graph, operator.getitem, (call, 0), like=like), region)
        region.output.replace_all_uses_with(out)
        erase_unused(region.interior)
        region.facts["hsa_pattern"] = (f"{options.pattern}(block={options.block}, window={options.window}, "
                                       f"stride={options.stride}, active={options.active})")

    def prepare_region(self, ctx, region, options):
        heads, head_dim = region.facts.get("heads") or 0, region.facts.get("head_dim") or 0
        module = ctx.model.get_submodule(region.module)
        device = next(module.parameters(), torch.empty(0)).device
        created = ctx.attach(region, HSA_KIND, lambda: {
            ACTIVE: torch.tensor([options.active == "always"], device=device),
            HEADS: torch.tensor([heads, head_dim], dtype=torch.int64, device=device)},
            ctx.hook_child(region, region.facts.get("q_projection")))
        ctx.decide_prepared(region, HSA_KIND, created, {}, f"pattern {options.pattern}, "
                            f"{'on' if options.active == 'always' else 'off until the ultra-sparse phase'}")


HSA = register(HSA())
