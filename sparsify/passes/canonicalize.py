"""Canonicalization: rewrite equivalent spellings into the one form the matchers look for.

Only structural rewrites live here; spellings that differ by name only (matmul vs bmm, softmax as a
function or a method, dtype casts) are folded by fx_utils.kind_of.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from .fx_utils import (arg, erase_unused, fake_mode_of, insert_call, is_elementwise, kind_of, shape, skip_casts,
                       static_scalar, value)


def positional_linear_args(gm: GraphModule) -> int:
    """linear(x, weight=W, bias=b) (I-BERT's quantised Linear) -> linear(x, W, b): the matchers read
    a linear's operands by position. Same call, same values. Returns the count."""
    rewritten = 0
    for linear in gm.graph.nodes:
        if kind_of(linear) != "linear" or not linear.kwargs:
            continue
        operands = [arg(linear, i, name) for i, name in enumerate(("input", "weight", "bias"))]
        if operands[0] is None or operands[1] is None or set(linear.kwargs) - {"input", "weight", "bias"}:
            continue
        linear.args, linear.kwargs = tuple(operands), {}
        rewritten += 1
    return rewritten


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


def matmul_to_linear(gm: GraphModule) -> int:
    """Falcon's FalconLinear: `x @ w.T` [+ b] (or matmul(x, w.t())) -> linear(x, w[, b]).

    linear without a bias runs the same matmul(x, w.t()), bit-identical; a bias add that only
    this product feeds is folded in (linear then adds it in the GEMM). Returns the count."""
    rewritten = 0
    for mm in list(gm.graph.nodes):
        if kind_of(mm) != "matmul" or len(mm.args) != 2 or mm.kwargs:
            continue
        x, wt = mm.args
        if not isinstance(wt, Node) or kind_of(wt) not in ("t", "transpose") or len(shape(wt) or ()) != 2:
            continue
        if len(shape(x) or ()) < 2:
            continue
        weight = wt.args[0]
        bias, out = None, mm
        users = list(mm.users)
        if len(users) == 1 and kind_of(users[0]) == "add" and len(users[0].args) == 2 and not users[0].kwargs:
            other = users[0].args[1] if users[0].args[0] is mm else users[0].args[0]
            if (isinstance(other, Node) and len(shape(other) or ()) == 1 and shape(other)[0] == shape(wt)[1]
                    and shape(users[0]) == shape(mm)):
                bias, out = other, users[0]
        with gm.graph.inserting_before(out):
            linear = insert_call(gm.graph, F.linear, (x, weight, bias), like=mm)
        out.replace_all_uses_with(linear)
        erase_unused([out, mm, wt])
        rewritten += 1
    return rewritten


def _feeds_gated_product(a: Node, b: Node, budget: int = 40) -> bool:
    """Whether a mul reads both `a` (through element-wise steps: the activation) and `b`."""
    seen, stack = set(), [a]
    while stack and len(seen) < budget:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if kind_of(user) == "mul" and any(skip_casts(x) is b or x is b for x in user.args[:2]) and node is not b:
                return True
            if is_elementwise(user):
                stack.append(user)
    return False


def _cast_to(graph, node: Node, dtype: torch.dtype, like: Node) -> Node:
    """node.to(dtype) as a call_method node with its fake value recorded (as insert_call does for functions)."""
    cast = graph.call_method("to", (node, dtype))
    if "nn_module_stack" in like.meta:
        cast.meta["nn_module_stack"] = like.meta["nn_module_stack"]
    mode = fake_mode_of(graph)
    if mode is not None:
        with mode:
            cast.meta["example_value"] = value(node).to(dtype)
    return cast


def split_fused_projections(gm: GraphModule) -> int:
    """Phi-3's gate_up_proj / ModernBERT's Wi: linear(x, W, b).chunk(2, dim=-1) feeding act(a) * b
    -> two linears on the weight's halves, linear(x, W[:F], b[:F]) and linear(x, W[F:], b[F:]).

    Each output element is the same dot product, so the values are those of the fused GEMM; the
    halves are views of W, so gradients flow into the fused parameter. A peft LoRA on the fused layer
    (W x + s B (A x)) splits the same way: each half keeps the shared A x and takes its half of B's rows.
    Only done when the two parts meet in a gated product (a fused q/k/v projection stays one GEMM).
    Returns the count."""
    from .regions import as_projection  # the LoRA-sum shape the region finder reads

    rewritten = 0
    for split in list(gm.graph.nodes):
        if kind_of(split) not in ("chunk", "split") or not isinstance(split.args[0], Node):
            continue
        fused = split.args[0]
        proj = as_projection(fused)
        if proj is None or len(fused.users) != 1:
            continue
        inner = [n for n in proj.nodes if n is not fused]
        if any(u not in proj.nodes for n in inner for u in n.users if n is not proj.lora_hidden):
            continue  # a part of the fused projection is read elsewhere: leave it whole
        out_features = (shape(proj.weight) or (None,))[0]
        rank = len(shape(fused) or ())
        if kind_of(split) == "chunk":
            parts, dim = arg(split, 1, "chunks"), arg(split, 2, "dim", 0)
            if parts != 2 or not isinstance(out_features, int) or out_features % 2:
                continue
            sizes = [out_features // 2] * 2
        else:
            size, dim = arg(split, 1, "split_size"), arg(split, 2, "dim", 0)
            sizes = list(size) if isinstance(size, (list, tuple)) else (
                [size, out_features - size] if isinstance(size, int) and out_features == 2 * size else None)
            if not sizes or len(sizes) != 2 or not all(isinstance(n, int) for n in sizes):
                continue
        if dim not in (-1, rank - 1):
            continue
        getitems = {u.args[1]: u for u in split.users if kind_of(u) == "getitem" and isinstance(u.args[1], int)}
        if len(getitems) != 2 or len(split.users) != 2 or set(getitems) != {0, 1}:
            continue
        first, second = getitems[0], getitems[1]
        if not (_feeds_gated_product(first, second) or _feeds_gated_product(second, first)):
            continue
        casts = [n for n in proj.nodes if kind_of(n) == "cast"]  # peft's cast of the sum back to the base dtype
        start = 0
        for index, size in enumerate(sizes):
            part = getitems[index]
            with gm.graph.inserting_before(part):
                w = insert_call(gm.graph, torch.narrow, (proj.weight, 0, start, size), like=fused)
                b = None if proj.bias is None else insert_call(gm.graph, torch.narrow, (proj.bias, 0, start, size),
                                                               like=fused)
                new = insert_call(gm.graph, F.linear, (proj.x, w, b), like=fused)
                if proj.lora_a is not None:  # + s * linear(A x, B[half])
                    lb = insert_call(gm.graph, torch.narrow, (proj.lora_b, 0, start, size), like=fused)
                    lora = insert_call(gm.graph, F.linear, (proj.lora_hidden, lb), like=fused)
                    lora = insert_call(gm.graph, operator.mul, (lora, proj.lora_scale), like=fused)
                    new = insert_call(gm.graph, operator.add, (new, lora), like=fused)
                dtype = getattr(value(fused), "dtype", None)
                if casts and dtype is not None and getattr(value(new), "dtype", dtype) != dtype:
                    new = _cast_to(gm.graph, new, dtype, like=fused)
            part.replace_all_uses_with(new)
            start += size
        erase_unused([first, second, split] + list(reversed(proj.nodes)))
        rewritten += 1
    return rewritten


def canonicalize(gm: GraphModule) -> dict[str, int]:
    counts = {"positional_linear_args": positional_linear_args(gm), "conv1d_to_linear": conv1d_to_linear(gm), "matmul_to_linear": matmul_to_linear(gm),
              "split_fused_projections": split_fused_projections(gm),
              "unfold_batched_heads": unfold_batched_heads(gm)}
    gm.graph.lint()
    return counts


# ----------------------------------------------------------------------------------------------
# 3-d attention (heads folded into the batch: Bloom, DeBERTa) -> the 4-d form the finder reads
# ----------------------------------------------------------------------------------------------

def _heads_of_split(view: Node, folded: Node) -> Optional[int]:
    """H when `view` turns the 3-d `folded` [B*H, m, n] into [B, H, m, n] (a split of dim 0)."""
    out, src = shape(view), shape(folded)
    if kind_of(view) != "view" or out is None or src is None or len(out) != 4 or len(src) != 3:
        return None
    heads = out[1]
    if not isinstance(heads, int) or tuple(out[2:]) != tuple(src[1:]) or out[0] * heads != src[0]:
        return None
    return heads


def _unflatten(graph, node: Node, heads: int, like: Node) -> Node:
    """[B*H, ...] -> [B, H, ...]; a tensor that was itself flattened from that 4-d form is used as it is."""
    source = node.args[0] if kind_of(node) == "view" and isinstance(node.args[0], Node) else None
    node_shape = shape(node)
    if source is not None and len(shape(source) or ()) == 4 and shape(source)[1] == heads \
            and tuple(shape(source)[2:]) == tuple(node_shape[1:]):
        return source
    if kind_of(node) == "transpose" and len(node_shape) == 3:  # k^T: unflatten k, keep the transpose
        dims = {d % 3 for d in (arg(node, 1, "dim0"), arg(node, 2, "dim1"))}
        if dims == {1, 2}:
            inner = _unflatten(graph, node.args[0], heads, like)
            return insert_call(graph, torch.transpose, (inner, -1, -2), like=like)
    if node_shape[0] == 1:  # broadcast over every (batch, head)
        return insert_call(graph, torch.unsqueeze, (node, 0), like=like)
    return insert_call(graph, torch.unflatten, (node, 0, (-1, heads)), like=like)


def _unfold_scores(graph, node: Node, heads: int, like: Node) -> Optional[Node]:
    """The 4-d spelling of a 3-d scores expression: bmm, baddbmm (alpha * q k^T + beta * bias),
    plus additive terms, scalar scales and casts. None when `node` is something else."""
    if len(node.users) != 1:
        return None
    kind = kind_of(node)
    if kind == "matmul" and len(node.args) == 2 and len(shape(node.args[0]) or ()) == 3:
        q, kt = (_unflatten(graph, a, heads, like) for a in node.args)
        return insert_call(graph, torch.matmul, (q, kt), like=like)
    if kind == "baddbmm":
        bias, q, kt = (arg(node, i, n) for i, n in enumerate(("input", "batch1", "batch2")))
        if node.op == "call_method":
            bias, q, kt = node.args[0], arg(node, 1, "batch1"), arg(node, 2, "batch2")
        beta, alpha = static_scalar(node.kwargs.get("beta", 1.0)), static_scalar(node.kwargs.get("alpha", 1.0))
        if beta is None or alpha is None or len(shape(bias) or ()) != 3:
            return None
        scores = insert_call(graph, torch.matmul, (_unflatten(graph, q, heads, like), _unflatten(graph, kt, heads, like)),
                             like=like)
        if alpha != 1.0:
            scores = insert_call(graph, operator.mul, (scores, alpha), like=like)
        if beta == 0.0:  # baddbmm ignores the input when beta is 0
            return scores
        term = _unflatten(graph, bias, heads, like)
        if beta != 1.0:
            term = insert_call(graph, operator.mul, (term, beta), like=like)
        return insert_call(graph, operator.add, (scores, term), like=like)
    if kind == "add" and len(node.args) == 2 and all(isinstance(a, Node) for a in node.args):
        for scores, term in (node.args, node.args[::-1]):
            if len(shape(term) or ()) == 3:
                unfolded = _unfold_scores(graph, scores, heads, like)
                if unfolded is not None:
                    return insert_call(graph, operator.add, (unfolded, _unflatten(graph, term, heads, like)), like=like)
        return None
    if kind in ("mul", "div") and len(node.args) == 2 and isinstance(node.args[0], Node) \
            and static_scalar(node.args[1]) is not None:
        unfolded = _unfold_scores(graph, node.args[0], heads, like)
        return None if unfolded is None else insert_call(graph, node.target, (unfolded, node.args[1]), like=like)
    return None


def _reaches_softmax(node: Node, budget: int = 12) -> bool:
    for _ in range(budget):
        users = list(node.users)
        if len(users) != 1:
            return False
        node = users[0]
        if kind_of(node) == "softmax":
            return True
        if kind_of(node) not in ("add", "mul", "div", "where", "masked_fill", "cast", "pointwise", "view"):
            return False
    return False


def _probs_from_softmax(node: Node, budget: int = 6) -> bool:
    for _ in range(budget):
        if kind_of(node) == "softmax":
            return True
        if kind_of(node) not in ("cast", "dropout") or not isinstance(node.args[0], Node):
            return False
        node = node.args[0]
    return False


def _erase_dead_chain(node: Node) -> None:
    """Erase `node` and, upwards, the 3-d nodes that only it used (the folded product chain)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n.users or n.op != "call_function" and n.op != "call_method":
            continue
        if kind_of(n) not in ("view", "matmul", "baddbmm", "add", "mul", "div", "cast", "transpose"):
            continue
        inputs = list(n.all_input_nodes)
        n.graph.erase_node(n)
        stack.extend(inputs)


def unfold_batched_heads(gm: GraphModule) -> int:
    """Bloom / DeBERTa compute attention with heads folded into the batch:
        scores = view(baddbmm(alibi, q3, k3^T, beta, alpha) | bmm(q3, k3^T), [B, H, m, n]) ... softmax ...
        out3   = bmm(view(probs, [B*H, m, n]), v3)
    Both products are rewritten in 4-d (a bmm over B*H matrices is a matmul over [B, H] of them, the
    same dot products), the alibi term becoming an additive [B, H, 1, n] term:
        scores = matmul(q, k^T) * alpha + beta * alibi;   out3 = flatten(matmul(probs, v), 0, 1)
    Only products that feed / are fed by a softmax are touched. Returns the number of products."""
    rewritten, graph = 0, gm.graph
    for view in list(graph.nodes):
        if kind_of(view) != "view" or not isinstance(view.args[0], Node) or view not in graph.nodes:
            continue
        folded = view.args[0]
        heads = _heads_of_split(view, folded)
        if heads is None or not _reaches_softmax(view):
            continue
        with graph.inserting_before(view):
            unfolded = _unfold_scores(graph, folded, heads, view)
        if unfolded is None:
            continue
        view.replace_all_uses_with(unfolded)
        _erase_dead_chain(view)
        rewritten += 1
    for bmm in list(graph.nodes):
        if kind_of(bmm) != "matmul" or len(bmm.args) != 2 or bmm not in graph.nodes:
            continue
        probs3, v3 = bmm.args
        if not isinstance(probs3, Node) or kind_of(probs3) != "view" or len(shape(v3) or ()) != 3:
            continue
        probs = probs3.args[0]
        p_shape = shape(probs)
        if not isinstance(probs, Node) or p_shape is None or len(p_shape) != 4 or not isinstance(p_shape[1], int):
            continue
        if tuple(shape(probs3)) != (p_shape[0] * p_shape[1], *p_shape[2:]) or not _probs_from_softmax(probs):
            continue
        with graph.inserting_before(bmm):
            v = _unflatten(graph, v3, p_shape[1], bmm)
            out = insert_call(graph, torch.matmul, (probs, v), like=bmm)
            flat = insert_call(graph, torch.flatten, (out, 0, 1), like=bmm)
        bmm.replace_all_uses_with(flat)
        erase_unused([bmm, probs3])
        rewritten += 1
    return rewritten
