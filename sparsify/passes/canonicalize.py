"""Canonicalization: rewrite equivalent spellings into the one form the matchers look for.

Only structural rewrites live here; spellings that differ by name only (matmul vs bmm, softmax as a
function or a method, dtype casts) are folded by fx_utils.kind_of.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx import GraphModule

from .fx_utils import erase_unused, insert_call, kind_of, shape


def conv1d_to_linear(gm: GraphModule) -> int:
    """GPT-2's Conv1D: view(addmm(b, view(x, [-1, K]), W), [..., N])  ->  linear(x, W.t(), b).

    Conv1D stores W as [in, out]; linear wants [out, in], hence the transposed view (no copy).
    linear(x, W.t(), b) runs the same addmm, so results are bit-identical. Returns the count.
    """
    rewritten = 0
    for addmm in list(gm.graph.nodes):
        if kind_of(addmm) != "addmm" or len(addmm.args) != 3 or addmm.kwargs:
            continue
        bias, x2d, weight = addmm.args
        if len(shape(weight) or ()) != 2 or len(addmm.users) != 1:
            continue
        out_view = next(iter(addmm.users))
        if kind_of(x2d) != "view" or kind_of(out_view) != "view":
            continue
        x = x2d.args[0]
        x_shape, out_shape = shape(x), shape(out_view)
        if x_shape is None or out_shape is None or x_shape[:-1] != out_shape[:-1]:
            continue
        with gm.graph.inserting_before(out_view):
            weight_t = insert_call(gm.graph, torch.t, (weight,), like=addmm)
            linear = insert_call(gm.graph, F.linear, (x, weight_t, bias), like=addmm)
        out_view.replace_all_uses_with(linear)
        erase_unused([out_view, addmm, x2d])
        rewritten += 1
    return rewritten


def canonicalize(gm: GraphModule) -> dict[str, int]:
    counts = {"conv1d_to_linear": conv1d_to_linear(gm)}
    gm.graph.lint()
    return counts
