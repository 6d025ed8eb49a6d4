"""The shared region finder: attention and MLP blocks in a canonicalized Dynamo graph.

Matching is anchored, not a general subgraph-isomorphism search: every attention block has one
softmax (or one SDPA call) and every MLP block ends in one projection, so each anchor is walked
outwards through the few shapes a block can take (DESIGN.md, decision 1):

    attention = matmul(q, k^T) -> [scale] -> [mask]* -> softmax -> [cast] -> [dropout] -> matmul(., v)
              | scaled_dot_product_attention(q, k, v, ...)
    mlp       = proj_down(dropout(act(proj_up(x))))
              | proj_down(dropout(act(proj_gate(x)) * proj_up(x)))
    proj      = linear(x, W, b) [+ peft LoRA: linear(linear(dropout(x), A), B) * s]

The optional pieces vary by model (which is why a fixed pattern per model would not scale), and each
walk records the facts the rewrite needs. A walk that gets part-way (a softmax over a q.k product, a
linear-act-linear chain) but meets something it cannot represent still yields a region, marked
unsupported with the reason, so the report explains why that block stays dense.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node

from ..tables import ACTIVATIONS
from .fx_utils import (arg, common_module, is_elementwise, kind_of, module_path, module_stack, shape, skip_casts, static_scalar,
                       value)

# the activations the ops implement (their table is the vocabulary); the finder may name more (see
# _REFERENCE_ACTIVATIONS) so that the report says which function a block uses
KNOWN_ACTIVATIONS = tuple(ACTIVATIONS)


class Unsupported(Exception):
    """Raised inside a walk: the block was recognised but holds something the ops cannot express."""


@dataclass
class Projection:
    """One Linear of a region, with its peft LoRA factors when it is wrapped."""
    output: Node            # the value the projection produces (the LoRA add when wrapped)
    x: Node
    weight: Node
    bias: Optional[Node]
    module: str
    lora_a: Optional[Node] = None
    lora_b: Optional[Node] = None
    lora_scale: float = 1.0
    lora_dropout_p: float = 0.0
    lora_hidden: Optional[Node] = None  # lora_A's output A x (what lora_B reads)
    nodes: list = field(default_factory=list)  # nodes that belong to the projection


@dataclass
class Region:
    kind: str                    # "attention", "mlp" or "linear" (one projection)
    module: str                  # module path of the block's weights, e.g. "encoder.layer.3.attention.self"
    output: Node                 # the node whose value the rewritten op replaces
    interior: list               # nodes computed only for this block (erased by a rewrite)
    facts: dict                  # what the rewrite needs and the report shows
    unsupported: Optional[str] = None   # why no rewrite can take this region (None: it can)
    graph_index: int = 0
    decision: str = "pending"    # set by the plan: the rewrite chosen, "dense" or "skipped"
    reason: str = ""
    method: Optional[str] = None  # the registered method that rewrites it (None: it stays as written)
    mode: str = "train"          # the graph's mode the plan was made for ("train" or "eval")


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------

@dataclass
class AttentionFacts:
    q: Node
    k: Node                      # [B, Hkv, Lk, D] (before any GQA repeat)
    v: Node
    additive_masks: list         # float tensors added to the scores
    keep_mask: Optional[Node]    # bool tensor, True = attend
    drop_mask: Optional[Node]    # bool tensor, True = masked out (from masked_fill)
    scale: float
    dropout_p: float
    is_causal: bool              # SDPA's flag
    source: str                  # "eager" (spelled out) or "sdpa"
    k_transposed: bool = False   # k holds k^T (the model built it without a plain transpose)
    # the value a bool mask gives masked scores (masked_fill / where): -inf, or a finite number such as finfo.min,
    # whose rows with every key masked are eager's uniform average (not SDPA's 0); None: not a constant
    mask_fill: Optional[float] = float("-inf")


def _constant(node: Any) -> Optional[float]:
    """A python number (or a symbolic one whose value is static, see fx_utils.static_scalar), or a 0-d
    tensor made by torch.full / torch.tensor of one."""
    scalar = static_scalar(node)
    if scalar is not None:
        return scalar
    if isinstance(node, Node) and kind_of(node) == "full" and shape(node) in ((), None):
        fill = arg(node, 1, "fill_value")
        return float(fill) if isinstance(fill, (int, float)) else None
    if isinstance(node, Node) and node.op == "call_function" and node.target is torch.tensor:
        data = node.args[0] if node.args else None
        return float(data) if isinstance(data, (int, float)) else None
    return None


def _dropout_p(p: Any) -> float:
    scalar = static_scalar(p)
    if scalar is None:
        raise Unsupported(f"the dropout probability ({getattr(p, 'name', p)}) is not a constant")
    return scalar


def _reaches_qk_matmul(node: Any, depth: int = 12) -> bool:
    """Whether `node` is the scores chain: a few scale/mask/cast steps above a matmul."""
    node = skip_casts(node)
    if not isinstance(node, Node) or depth == 0:
        return False
    kind = kind_of(node)
    if kind == "matmul":
        return True
    if kind in ("add", "mul", "div", "where", "masked_fill", "pointwise"):  # pointwise: a score modification
        return any(_reaches_qk_matmul(a, depth - 1) for a in node.args if isinstance(a, Node))
    return False


def _is_last_dim(dim: Any, node: Node) -> bool:
    rank = len(shape(node) or ())
    return dim == -1 or (rank and dim == rank - 1)


def _strip_transpose(kt: Node) -> Optional[Node]:
    """k from k^T when k^T is a transpose of the last two dims."""
    kind = kind_of(kt)
    rank = len(shape(kt) or ())
    if kind == "transpose":
        dims = {d % rank for d in (arg(kt, 1, "dim0"), arg(kt, 2, "dim1"))} if rank else set()
        if dims == {rank - 2, rank - 1}:
            return kt.args[0]
    if kind == "t":
        return kt.args[0]
    return None


def _strip_gqa_repeat(kv: Node) -> tuple[Node, int, list]:
    """HF's repeat_kv: x[:, :, None].expand(B, Hkv, g, L, D).reshape(B, Hkv*g, L, D) -> (x, g)."""
    if kind_of(kv) != "view":
        return kv, 1, []
    expand = kv.args[0]
    if not isinstance(expand, Node) or kind_of(expand) != "expand":
        return kv, 1, []
    base = expand.args[0]
    if not isinstance(base, Node) or kind_of(base) not in ("getitem", "unsqueeze"):
        return kv, 1, []
    source = base.args[0]
    src_shape, exp_shape = shape(source), shape(expand)
    if src_shape is None or exp_shape is None or len(src_shape) != 4 or len(exp_shape) != 5:
        return kv, 1, []
    if (exp_shape[0], exp_shape[1], exp_shape[3], exp_shape[4]) != tuple(src_shape):
        return kv, 1, []
    return source, int(exp_shape[2]), [kv, expand, base]


def _mask_is_causal(mask: Optional[Node], budget: int = 400) -> bool:
    """A mask is causal when it is built by comparing two position ranges (kv_idx <= q_idx, as HF's
    masking utils do) or by tril/triu. Static: looks at how the mask was computed, not its values."""
    if mask is None:
        return False
    seen, stack = set(), [mask]
    while stack and len(seen) < budget:
        node = stack.pop()
        if not isinstance(node, Node) or node in seen:
            continue
        seen.add(node)
        kind = kind_of(node)
        if kind in ("tril", "triu"):
            return True
        if kind == "compare" and all(_derives_from_arange(a) for a in node.args[:2]):
            return True
        stack.extend(a for a in node.all_input_nodes)
    return False


def _derives_from_arange(node: Any, budget: int = 30) -> bool:
    seen, stack = set(), [node]
    while stack and len(seen) < budget:
        n = stack.pop()
        if not isinstance(n, Node) or n in seen:
            continue
        seen.add(n)
        if kind_of(n) == "arange":
            return True
        if n.op == "placeholder":
            continue
        stack.extend(n.all_input_nodes)
    return False


def _walk_scores(softmax: Node, chain: list) -> tuple:
    """From the softmax input back to matmul(q, k^T): returns q, k^T, scale, the masks and the bool mask's fill."""
    scale, additive, keep, drop, fill = 1.0, [], None, None, float("-inf")
    node = softmax.args[0]
    while True:
        node_kind = kind_of(node) if isinstance(node, Node) else None
        chain.append(node)
        if node_kind == "cast":
            node = node.args[0]
        elif node_kind == "matmul":
            return node.args[0], node.args[1], scale, additive, keep, drop, fill
        elif node_kind == "add":
            a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
            scores, term = (a, b) if _reaches_qk_matmul(a) else (b, a)
            if not isinstance(term, Node):
                raise Unsupported(f"a constant ({term!r}) is added to the attention scores")
            if scale != 1.0:  # walking backwards: a scale seen already is applied after this mask
                raise Unsupported("a mask is added before the scale is applied")
            additive.append(term)
            node = scores
        elif node_kind in ("mul", "div"):
            a, b = node.args[0], node.args[1]
            scores, factor = (a, b) if _reaches_qk_matmul(a) else (b, a)
            c = _constant(factor)
            if c is None:
                raise Unsupported(f"the scores are scaled by a tensor ({getattr(factor, 'name', factor)}), not a constant")
            scale = scale * c if node_kind == "mul" else scale / c
            node = scores
        elif node_kind == "where":
            cond, x, y = node.args[:3]
            if _reaches_qk_matmul(x) and not _reaches_qk_matmul(y):
                keep, node, fill = cond, x, _constant(y)
            elif _reaches_qk_matmul(y):
                drop, node, fill = cond, y, _constant(x)
            else:
                raise Unsupported("torch.where over the scores with an unrecognised branch")
            if keep is not None and drop is not None:
                raise Unsupported("two boolean masks on the scores")
        elif node_kind == "masked_fill":
            if drop is not None or keep is not None:
                raise Unsupported("two boolean masks on the scores")
            drop, node, fill = node.args[1], node.args[0], _constant(arg(node, 2, "value"))
        elif node_kind == "pointwise":
            if node.target in (torch.tanh, "tanh"):  # Gemma 2: tanh(scores / cap) * cap
                raise Unsupported("score modification (logit softcapping)")
            raise Unsupported(f"score modification ({getattr(node.target, '__name__', node.target)})")
        else:
            raise Unsupported(f"unexpected {getattr(node, 'target', node)} between q.k^T and softmax")


def match_attention_softmax(softmax: Node) -> Optional[Region]:
    """An eager (spelled-out) attention block around this softmax, or None if it is not one."""
    if not _reaches_qk_matmul(softmax.args[0]):
        return None
    module = module_path(softmax)
    chain: list = [softmax]
    try:
        if not _is_last_dim(arg(softmax, 1, "dim"), softmax):
            raise Unsupported("softmax is not over the key dimension")
        q, kt, scale, additive, keep, drop, fill = _walk_scores(softmax, chain)
        # forward: softmax -> [cast] -> [dropout] -> matmul(p, v)
        probs, dropout_p = softmax, 0.0
        while True:
            users = list(probs.users)
            if len(users) != 1:
                raise Unsupported("the attention probabilities are used outside the block "
                                  "(output_attentions=True?)")
            user = users[0]
            user_kind = kind_of(user)
            chain.append(user)
            if user_kind == "cast":
                probs = user
            elif user_kind == "dropout":
                training = arg(user, 2, "training", True)
                dropout_p = _dropout_p(arg(user, 1, "p", 0.5)) if training else 0.0
                probs = user
            elif user_kind == "matmul" and user.args[0] is probs:
                output, v = user, user.args[1]
                break
            else:
                raise Unsupported(f"unexpected {user.target} between softmax and the value product")
        k = _strip_transpose(kt)
        interior = [n for n in chain if isinstance(n, Node)]
        if k is not None:
            interior.append(kt)
        facts = AttentionFacts(q, k if k is not None else kt, v, additive, keep, drop, scale, dropout_p,
                               False, "eager", k_transposed=k is None, mask_fill=fill)
        return _attention_region(facts, output, interior, module)
    except Unsupported as why:
        return Region("attention", module, softmax, [], {"source": "eager"}, unsupported=str(why))


def match_attention_sdpa(node: Node) -> Region:
    q, k, v = (arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    mask = arg(node, 3, "attn_mask")
    dropout_p = static_scalar(arg(node, 4, "dropout_p", 0.0) or 0.0)
    is_causal = bool(arg(node, 5, "is_causal", False))
    scale = arg(node, 6, "scale")
    scale = 1.0 / math.sqrt(shape(q)[-1]) if scale is None else _constant(scale)
    if scale is None or dropout_p is None:
        what = "scale" if scale is None else "dropout_p"
        return Region("attention", module_path(node), node, [], {"source": "sdpa"},
                      unsupported=f"SDPA's {what} is not a constant")
    keep = mask if mask is not None and value(mask).dtype == torch.bool else None
    additive = [mask] if mask is not None and keep is None else []
    facts = AttentionFacts(q, k, v, additive, keep, None, scale, dropout_p, is_causal, "sdpa")
    return _attention_region(facts, node, [node], module_path(node))


def _attention_region(f: AttentionFacts, output: Node, interior: list, module: str) -> Region:
    unsupported = None
    q_shape = shape(f.q)
    k, k_groups, k_repeat = _strip_gqa_repeat(f.k)
    v, v_groups, v_repeat = _strip_gqa_repeat(f.v)
    if k_groups == v_groups and k_groups > 1:
        f.k, f.v = k, v
        interior = interior + k_repeat + v_repeat
    if q_shape is None or len(q_shape) != 4 or len(shape(f.k) or ()) != 4:
        unsupported = f"q/k are not 4-d [batch, heads, seq, head_dim] (q shape {q_shape})"
    masks = [m for m in (f.keep_mask, f.drop_mask) if m is not None]
    if masks and f.mask_fill is None:
        unsupported = "masked scores are set to a tensor, not a constant"
    elif masks and math.isfinite(f.mask_fill) and f.mask_fill > -1e4:
        unsupported = f"masked scores are set to {f.mask_fill:g}, not a large negative number"
    if f.additive_masks and masks:
        unsupported = unsupported or "both an additive and a boolean mask"
    for m in f.additive_masks:
        if value(m) is not None and value(m).dtype == torch.bool:
            unsupported = unsupported or "a boolean tensor is added to the scores"
    all_masks = f.additive_masks + masks
    causal = f.is_causal or any(_mask_is_causal(m) for m in all_masks)
    mask_kind = ("is_causal" if f.is_causal and not all_masks else
                 "additive" if f.additive_masks else "boolean" if masks else "none")
    heads = q_shape[1] if q_shape and len(q_shape) == 4 else None
    kv_heads = (shape(f.k) or (None, None))[1]
    facts = {
        "source": f.source, "scale": f.scale, "mask": mask_kind, "dropout_p": f.dropout_p,
        "causal": causal, "is_causal": f.is_causal, "heads": heads, "kv_heads": kv_heads,
        "gqa_groups": (heads // kv_heads) if heads and kv_heads else None,
        "head_dim": q_shape[-1] if q_shape else None,
        "additive_mask_terms": len(f.additive_masks),
        "q_projection": _producing_projection(f.q),
        "_match": f,
    }
    if heads and kv_heads and heads % kv_heads:
        unsupported = unsupported or f"{heads} query heads do not divide into {kv_heads} key/value heads"
    # every interior node but the output must feed only the block, or erasing it would break the graph
    inside = set(interior)
    for n in interior:
        if n is not output and any(u not in inside for u in n.users):
            if n in (f.k, f.v):
                continue
            unsupported = unsupported or f"intermediate {n.name} is used outside the block"
    return Region("attention", module, output, interior, facts, unsupported=unsupported)


def _producing_projection(q: Node, max_nodes: int = 64) -> Optional[str]:
    """Module path of the nearest Linear upstream of q (breadth-first over the inputs): where state for
    an attention module compiled as the root can be tagged, since a root's own hooks run outside the
    traced frame (sparsify.prepare)."""
    seen, frontier = set(), [q]
    while frontier and len(seen) < max_nodes:
        node = frontier.pop(0)
        if node in seen or not isinstance(node, Node):
            continue
        seen.add(node)
        if kind_of(node) == "linear":
            return module_path(node) or None
        frontier.extend(n for n in node.all_input_nodes if n not in seen)
    return None


# ----------------------------------------------------------------------------------------------
# MLP
# ----------------------------------------------------------------------------------------------

def as_projection(node: Any) -> Optional[Projection]:
    """A Linear (possibly peft-LoRA-wrapped) whose value is `node`, else None."""
    if not isinstance(node, Node):
        return None
    casts = []
    while kind_of(node) == "cast":  # peft casts the LoRA sum back to the base dtype
        casts.append(node)
        node = node.args[0]
    if kind_of(node) == "linear":
        return Projection(node, node.args[0], node.args[1], arg(node, 2, "bias"), _weight_module(node),
                          nodes=[node] + casts)
    if kind_of(node) == "add" and len(node.args) == 2:
        for base, lora in (node.args, node.args[::-1]):
            if isinstance(base, Node) and kind_of(base) == "linear":
                proj = _lora_branch(base, lora)
                if proj is not None:
                    proj.output = casts[0] if casts else node
                    proj.nodes += [node] + casts
                    return proj
    return None


def _lora_branch(base: Node, lora: Any) -> Optional[Projection]:
    """peft: result + lora_B(lora_A(dropout(x))) * scaling, with x the base layer's input."""
    if not isinstance(lora, Node) or kind_of(lora) != "mul":
        return None
    b_out, scaling = lora.args
    if isinstance(b_out, (int, float)):
        b_out, scaling = scaling, b_out
    if not isinstance(scaling, (int, float)) or kind_of(b_out) != "linear":
        return None
    a_out = b_out.args[0]
    if kind_of(a_out) != "linear":
        return None
    x_in, dropout_p, nodes = skip_casts(a_out.args[0]), 0.0, [lora, b_out, a_out]
    if kind_of(x_in) == "dropout":
        if arg(x_in, 2, "training", True):
            dropout_p = static_scalar(arg(x_in, 1, "p", 0.5))
            if dropout_p is None:
                return None
        nodes.append(x_in)
        x_in = skip_casts(x_in.args[0])
    if x_in is not skip_casts(base.args[0]):
        return None
    return Projection(base, base.args[0], base.args[1], arg(base, 2, "bias"), _weight_module(base),
                      lora_a=a_out.args[1], lora_b=b_out.args[1], lora_scale=float(scaling),
                      lora_dropout_p=dropout_p, lora_hidden=a_out, nodes=[base] + nodes)


def _weight_module(linear: Node) -> str:
    path = module_path(linear)
    return path[: -len(".base_layer")] if path.endswith(".base_layer") else path


_PROBE = torch.linspace(-8.0, 8.0, 2001, dtype=torch.float64)
_REFERENCE_ACTIVATIONS = ACTIVATIONS  # what a spelled-out activation is probed against (sparsify/tables.py)


def _is_scalar_node(node: Node) -> bool:
    """A node holding a python number (a SymFloat under dynamic=True), not a tensor."""
    return not isinstance(value(node), torch.Tensor) and static_scalar(node) is not None


def _autograd_function(node: Node) -> Optional[Node]:
    """getitem(autograd_function_apply(fwd, bwd, x), 0) -- a custom autograd.Function of one tensor, as
    Dynamo records it in train mode (Bloom's GeLUFunction): the apply node, else None."""
    if kind_of(node) != "getitem" or node.args[1] != 0 or not isinstance(node.args[0], Node):
        return None
    apply = node.args[0]
    if apply.op != "call_function" or apply.target is not torch.ops.higher_order.autograd_function_apply:
        return None
    tensors = [a for a in apply.args[2:] if isinstance(a, Node)]
    return apply if len(tensors) == 1 and len(apply.users) == 1 else None


def _activation_chain(top: Node) -> tuple[Projection, Node, list]:
    """The element-wise nodes between a projection and `top`: (projection, the projection's value
    the chain reads, the chain's nodes)."""
    interior, frontier, stack, seen = [], [], [top], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        proj = as_projection(node)
        if proj is not None and node is not top:
            frontier.append((proj, node))
            continue
        if node is not top and _is_scalar_node(node):
            continue  # a symbolic constant (dynamic=True): read by identify_activation
        apply = _autograd_function(node)
        if apply is not None:
            interior += [node, apply]
            stack.extend(a for a in apply.args[2:] if isinstance(a, Node))
            continue
        if not is_elementwise(node):
            raise Unsupported(f"{getattr(node, 'target', node)} is not an element-wise activation step")
        interior.append(node)
        stack.extend(node.all_input_nodes)
        if len(interior) > 40:
            raise Unsupported("activation spans too many nodes")
    if len({node for _, node in frontier}) != 1:
        raise Unsupported("the activation reads more than one projection")
    return frontier[0][0], frontier[0][1], interior


def identify_activation(proj_out: Node, interior: list) -> Optional[str]:
    """Name the function the interior nodes compute of proj_out: read one call directly, else
    evaluate the nodes on a float64 probe and compare with each known activation (this is how
    GPT-2's and T5's spelled-out tanh-GELU are recognised without a per-model pattern). A probe
    match must hold for the gradient too: a custom autograd.Function (Bloom's GeLUFunction) brings its
    own backward, which the rewrite replaces by the activation's true derivative."""
    if len(interior) == 1:
        node = interior[0]
        if node.target is F.gelu or node.target == "gelu":
            return "gelu_tanh" if arg(node, 1, "approximate", "none") == "tanh" else "gelu"
        if node.target in (F.relu, torch.relu, "relu"):
            return "relu"
        if node.target is F.silu or node.target == "silu":
            return "silu"
    gm = proj_out.graph.owning_module
    sub, root = Graph(), torch.nn.Module()
    env = {proj_out: sub.placeholder("x")}

    def operand(n: Node):
        if n not in env:
            if n.op == "get_attr":  # an autograd.Function's forward / backward graphs
                setattr(root, n.target, getattr(gm, n.target))
                env[n] = sub.get_attr(n.target)
            else:
                env[n] = static_scalar(n)  # a symbolic constant (dynamic=True), guarded
        return env[n]

    order = {n: i for i, n in enumerate(proj_out.graph.nodes)}
    for node in sorted(interior, key=order.__getitem__):
        env[node] = sub.node_copy(node, operand)
    sub.output(env[max(interior, key=order.__getitem__)])
    probe = _PROBE.clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            probe_out = GraphModule(root, sub)(probe)
            (probe_grad,) = torch.autograd.grad(probe_out.sum(), probe)
    except Exception:  # a node that does not run on a float64 vector: unknown activation
        return None
    for name, fn in _REFERENCE_ACTIVATIONS.items():
        reference = _PROBE.clone().requires_grad_(True)
        with torch.enable_grad():
            expected = fn(reference)
            (expected_grad,) = torch.autograd.grad(expected.sum(), reference)
        if (probe_out.shape == _PROBE.shape
                and torch.allclose(probe_out.detach().to(torch.float64), expected.detach(), atol=1e-5, rtol=1e-4)
                and torch.allclose(probe_grad.to(torch.float64), expected_grad, atol=1e-5, rtol=1e-4)):
            return name
    return None


def match_mlp(down: Projection) -> Optional[Region]:
    """An MLP ending in the projection `down`, or None when its input is not an activation."""
    h = down.x
    dropout_p, pre = 0.0, []
    while isinstance(h, Node) and kind_of(h) in ("cast", "dropout"):
        if kind_of(h) == "dropout" and arg(h, 2, "training", True):
            dropout_p = static_scalar(arg(h, 1, "p", 0.5))
        pre.append(h)
        h = h.args[0]
    if (not isinstance(h, Node) or as_projection(h) is not None
            or not (is_elementwise(h) or _autograd_function(h) is not None)):
        return None  # linear -> linear (no activation) or not element-wise: not an MLP
    gate, up, act_nodes, gated_mul = None, None, None, None
    if kind_of(h) == "mul" and all(isinstance(a, Node) for a in h.args[:2]):
        for a, b in (h.args[:2], h.args[1::-1]):
            candidate_up = as_projection(b)
            if candidate_up is None or as_projection(a) is not None:
                continue
            try:
                candidate_gate, act_input, nodes = _activation_chain(a)
            except Unsupported:
                continue
            if candidate_gate.output is candidate_up.output:
                continue  # x * f(x) of one projection (CLIP's quick_gelu): an activation, not a gate
            if skip_casts(candidate_gate.x) is skip_casts(candidate_up.x):
                gate, up, act_nodes, gated_mul, act_out = candidate_gate, candidate_up, nodes, h, a
                break
    if gate is None:
        act_out = h
        try:
            up, act_input, act_nodes = _activation_chain(h)
        except Unsupported:
            return None  # e.g. a norm or residual sum before a Linear: not an MLP
    d_in, d_out = (shape(up.weight) or (None, None))[1], (shape(down.weight) or (None,))[0]
    if d_in is not None and d_out is not None and d_in != d_out:
        return None  # a transformer FFN returns to d_model (the residual); e.g. pooler -> classifier does not
    projections = [p for p in (up, gate, down) if p is not None]
    module = common_module([p.module for p in projections])
    activation = identify_activation(act_input, act_nodes)
    interior = act_nodes + pre + [n for p in projections for n in p.nodes] + ([gated_mul] if gated_mul else [])
    interior = list(dict.fromkeys(interior))
    facts = {
        "activation": activation, "gated": gate is not None, "dropout_p": dropout_p,
        "bias": down.bias is not None or up.bias is not None,
        "up": up.module, "gate": gate.module if gate else None, "down": down.module,
        "d_model": (shape(up.weight) or (None, None))[1], "d_ff": (shape(up.weight) or (None,))[0],
        "lora": any(p.lora_a is not None for p in projections),
        "_match": (up, gate, down),
        # the activation's output (gated: the activated gate branch, before the multiply): what DEFT taps
        "_activation_out": act_out,
        "_gated_mul": gated_mul,  # gated: act(gate(x)) * up(x), the down projection's input
    }
    unsupported = None
    if activation is None:
        unsupported = "activation not recognised (known: " + ", ".join(KNOWN_ACTIVATIONS) + ")"
    elif activation not in KNOWN_ACTIVATIONS:
        unsupported = (f"activation {activation} is recognised but the sparsify ops do not implement it "
                       "(they implement: " + ", ".join(KNOWN_ACTIVATIONS) + ")")
    elif dropout_p is None:
        unsupported = "the dropout probability before the down projection is not a constant"
    elif any(p.lora_dropout_p > 0 for p in projections):
        unsupported = "LoRA dropout is active (training with lora_dropout > 0)"
    elif gate is not None and skip_casts(gate.x) is not skip_casts(up.x):
        unsupported = "gate and up projections read different inputs"
    elif any(p.lora_a is not None and skip_casts(p.x) is not p.x for p in projections):
        unsupported = "a LoRA projection casts its input"
    inside = set(interior)
    for n in interior:
        if n is not down.output and any(u not in inside for u in n.users):
            unsupported = unsupported or f"intermediate {n.name} is used outside the block"
    return Region("mlp", module, down.output, interior, facts, unsupported=unsupported)


# ----------------------------------------------------------------------------------------------
# the finder
# ----------------------------------------------------------------------------------------------

def match_moe_router(topk: Node) -> Optional[Region]:
    """A mixture-of-experts router: topk over softmax / sigmoid of a Linear's logits (Mixtral, Qwen2-MoE).
    The layer is reported, never rewritten: the sparsify ops compute one MLP for every token."""
    node, steps = topk.args[0], 0
    while isinstance(node, Node) and steps < 8 and as_projection(node) is None:
        if kind_of(node) not in ("cast", "softmax", "pointwise", "add", "view"):
            return None
        node, steps = node.args[0], steps + 1
    router = as_projection(node) if isinstance(node, Node) else None
    if router is None:
        return None
    experts = (shape(router.weight) or (None,))[0]
    top_k = arg(topk, 1, "k")
    module = module_path(topk)
    if module == router.module and "." in module:  # the router is its own module (transformers 5): the layer is its parent
        module = module.rsplit(".", 1)[0]
    facts = {"experts": experts, "top_k": top_k, "router": router.module}
    return Region("mlp", module, topk, [], facts,
                  unsupported=f"mixture-of-experts layer ({experts} experts, top-{top_k} routing): left as written")


def find_regions(gm: GraphModule, linear: bool = False) -> list[Region]:
    """Every attention and MLP region in the graph, in graph order; with `linear`, every projection too (after
    the blocks: a projection inside an MLP region is in both, and the plan says who owns it)."""
    projections = {}
    for node in gm.graph.nodes:
        proj = as_projection(node)
        if proj is not None and proj.output is node:
            projections[node] = proj
    # nodes inside a larger projection (a LoRA sum's base linear, lora_A, lora_B) anchor nothing
    members = {n for p in projections.values() for n in p.nodes if n is not p.output}
    regions, claimed = [], set()
    for node in gm.graph.nodes:
        kind = kind_of(node)
        region = None
        if kind == "softmax":
            region = match_attention_softmax(node)
        elif kind == "sdpa":
            region = match_attention_sdpa(node)
        elif kind == "topk":
            region = match_moe_router(node)
        elif node in projections and node not in members:
            region = match_mlp(projections[node])
        if region is not None and region.output not in claimed:
            claimed.add(region.output)
            regions.append(region)
    for moe in [r for r in regions if "experts" in r.facts]:
        inside = [r for r in regions if r.kind == "mlp" and "experts" not in r.facts
                  and r.module.startswith(moe.module + "." if moe.module else "") and _reads_routing(r, moe.output)]
        if inside:
            moe.unsupported = (f"mixture-of-experts layer ({moe.facts['experts']} experts, top-{moe.facts['top_k']} "
                               f"routing): the routing is left as written; {len(inside)} expert MLP(s) are regions "
                               "of their own")
    if linear:
        regions += [linear_region(p) for node, p in projections.items() if node not in members]
    return regions


# module class names that say "attention block" / "MLP block" (the names transformers' families use). Used only to
# tell the user about blocks the matchers did not recognise: a match never depends on a name.
ATTENTION_NAMES = ("Attention",)
MLP_SUFFIXES = ("MLP", "Mlp", "FeedForward", "FFN", "Ffn", "FF", "Intermediate", "DenseActDense",
                "DenseGatedActDense", "MoE", "Moe", "MoeBlock", "Experts")
PRODUCTS = {"linear", "matmul", "addmm", "baddbmm", "sdpa"}  # node kinds that multiply matrices
# convolutions: a feed-forward written with Conv1d (VITS, SAM3's text encoder) is a block no MLP matcher takes
_CONVOLUTIONS = {torch.conv1d, torch.conv2d, torch.nn.functional.conv1d, torch.nn.functional.conv2d}


def block_kind(class_name: str) -> Optional[str]:
    if any(name in class_name for name in ATTENTION_NAMES):
        return "attention"
    return "mlp" if class_name.endswith(MLP_SUFFIXES) else None


def unmatched_blocks(gm: GraphModule, regions: list[Region]) -> list[tuple[str, str, str]]:
    """[(kind, module path, class name)] of the modules named like attention or MLP blocks (block_kind) that ran
    matrix products in this graph and hold no region of their kind, inside or around them: the blocks the
    matchers did not recognise, which run unchanged whatever method was asked. Outermost block of a kind only
    (BertAttention, not also its BertSelfAttention)."""
    blocks: dict[tuple[str, str], str] = {}
    for node in gm.graph.nodes:
        if kind_of(node) not in PRODUCTS and not (node.op == "call_function" and node.target in _CONVOLUTIONS):
            continue
        seen_kinds = set()
        for path, cls in module_stack(node):
            kind = block_kind(cls)
            if kind is not None and kind not in seen_kinds:
                seen_kinds.add(kind)
                blocks.setdefault((kind, path), cls)

    def related(a: str, b: str) -> bool:
        return a == b or not a or not b or a.startswith(b + ".") or b.startswith(a + ".")

    return [(kind, path, cls) for (kind, path), cls in blocks.items()
            if not any(r.kind == kind and related(r.module, path) for r in regions)]


def linear_region(proj: Projection) -> Region:
    """One projection as a region: a Linear, GPT-2's Conv1D (a linear after canonicalize) or a peft LoRA Linear."""
    w = value(proj.weight)
    facts = {"_match": proj, "out_features": int(w.shape[0]), "in_features": int(w.shape[1]),
             "bias": proj.bias is not None, "lora": proj.lora_a is not None,
             # the module stores the weight [in, out] and the graph reads its transpose (GPT-2's Conv1D)
             "weight_transposed": kind_of(proj.weight) == "t"}
    interior = [n for n in proj.nodes if n is not proj.output]
    return Region("linear", proj.module, proj.output, interior, facts)


def _reads_routing(region: Region, topk: Node, budget: int = 60) -> bool:
    """Whether the MLP's input is selected by the router's choice (an expert, not a shared MLP)."""
    up = region.facts["_match"][0]
    seen, stack = set(), [up.x]
    while stack and len(seen) < budget:
        n = stack.pop()
        if not isinstance(n, Node) or n in seen:
            continue
        if n is topk:
            return True
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False
