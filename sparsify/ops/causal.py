"""Causal alignment, defined once for every sparsify:: op and kernel: bottom-right.

    query i of Lq may see key j of Lk  iff  j <= i + (Lk - Lq)

Query i sits at absolute position i + (Lk - Lq): the last query is the last key, as in decoding with a KV cache
(Lq < Lk) and as FlexAttention, flash-attn and transformers' cache masks align it. For Lq == Lk it is SDPA's
is_causal. SDPA's own is_causal with Lq != Lk is top-left (j <= i): the rewrite passes that case to the ops as
an explicit mask, never as the flag (passes/dense.py attention_operands). The Triton kernels spell the same
comparison with the same offset (codegen/pq_kernels.py PQ_CAUSAL, codegen/spt_templates.py *_CAUSAL).
"""
from __future__ import annotations

import torch
from torch import Tensor


def causal_offset(lq: int, lk: int) -> int:
    """Lk - Lq: the absolute position of query 0."""
    return lk - lq


def causal_keep(rows: slice, lq: int, lk: int, device=None) -> Tensor:
    """[rows, Lk] bool: which keys the query rows `rows` (of Lq) may see."""
    qpos = torch.arange(rows.start, rows.stop, device=device) + causal_offset(lq, lk)
    return torch.arange(lk, device=device)[None, :] <= qpos[:, None]


def causal_mask(lq: int, lk: int, device=None) -> Tensor:
    """[Lq, Lk] bool: causal_keep of every row."""
    return causal_keep(slice(0, lq), lq, lk, device)
