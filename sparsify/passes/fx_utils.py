"""Small helpers over Dynamo FX graphs: op kinds, argument access, fake values, module paths.

`kind_of` is the canonicalization the matchers rely on: the many spellings of one operation in a
Dynamo graph (torch.matmul, operator.matmul, Tensor.matmul, torch.bmm; softmax as a function or a
method; dtype casts as .to/.float/.type/.type_as) collapse into one name.
"""
from __future__ import annotations

import operator
import re
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch._dynamo.source import TensorPropertySource
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import guard_scalar

_FUNCTION_KINDS: dict[Any, str] = {
    torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "matmul",
    F.softmax: "softmax", torch.softmax: "softmax",
    F.dropout: "dropout", torch.dropout: "dropout",
    F.linear: "linear", torch.addmm: "addmm",
    F.scaled_dot_product_attention: "sdpa",
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.sub: "sub", torch.sub: "sub",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
    operator.truediv: "div", operator.itruediv: "div", torch.div: "div",
    torch.baddbmm: "baddbmm", torch.topk: "topk", torch.t: "t", torch.chunk: "chunk", torch.split: "split",
    operator.neg: "neg", torch.neg: "neg",
    torch.where: "where", torch.masked_fill: "masked_fill",
    torch.transpose: "transpose", torch.permute: "permute",
    torch.full: "full", torch.arange: "arange", torch.tril: "tril", torch.triu: "triu",
    operator.le: "compare", operator.lt: "compare", operator.ge: "compare", operator.gt: "compare",
    torch.le: "compare", torch.lt: "compare", torch.ge: "compare", torch.gt: "compare",
    operator.getitem: "getitem",
}
_METHOD_KINDS: dict[str, str] = {
    "matmul": "matmul", "bmm": "matmul", "softmax": "softmax",
    "to": "cast", "float": "cast", "half": "cast", "bfloat16": "cast", "type": "cast", "type_as": "cast",
    "contiguous": "cast",
    "add": "add", "add_": "add", "sub": "sub", "mul": "mul", "mul_": "mul", "div": "div", "div_": "div", "neg": "neg",
    "baddbmm": "baddbmm", "topk": "topk", "chunk": "chunk", "split": "split",
    "masked_fill": "masked_fill", "transpose": "transpose", "permute": "permute", "t": "t",
    "view": "view", "reshape": "view", "expand": "expand", "unsqueeze": "unsqueeze",
    "le": "compare", "lt": "compare", "ge": "compare", "gt": "compare", "tril": "tril", "triu": "triu",
}
# element-wise functions an activation may be spelled with (besides add/sub/mul/div/neg/cast)
_POINTWISE = {
    F.gelu, F.relu, torch.relu, F.silu, torch.sigmoid, torch.tanh, torch.erf, torch.exp, torch.pow,
    torch.sqrt, torch.rsqrt, F.sigmoid, F.tanh, F.hardtanh, F.leaky_relu, F.elu, F.mish, F.softplus,
    F.hardswish, F.hardsigmoid, F.relu6, F.celu, F.selu, operator.pow, torch.square, torch.abs,
}
_POINTWISE_METHODS = {"gelu", "relu", "sigmoid", "tanh", "erf", "exp", "pow", "sqrt", "rsqrt", "silu", "square", "abs"}


def kind_of(node: Node) -> Optional[str]:
    if node.op == "call_function":
        if node.target is getattr and len(node.args) == 2 and node.args[1] in ("T", "mT"):
            return "t" if len(shape(node) or ()) == 2 else None  # Falcon's `input @ self.weight.T`
        kind = _FUNCTION_KINDS.get(node.target)
        if kind is None and node.target in _POINTWISE:
            kind = "pointwise"
        return kind
    if node.op == "call_method":
        kind = _METHOD_KINDS.get(node.target)
        if kind is None and node.target in _POINTWISE_METHODS:
            kind = "pointwise"
        return kind
    return None


def is_elementwise(node: Node) -> bool:
    return kind_of(node) in {"pointwise", "add", "sub", "mul", "div", "neg", "cast"}


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """A call's argument by position or keyword (Dynamo keeps whichever the model's source used)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def value(node: Any) -> Any:
    """The fake tensor (or python value) Dynamo recorded for a node."""
    if isinstance(node, Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


# node.meta key of a placeholder's real tensor while the passes run (pipeline.run_passes sets and removes it)
REAL_VALUE = "sparsify_real_value"
# node.meta key: (region kind, module path) of the block a node computes, set by pipeline.run_passes on each
# region's nodes and on what its rewrite inserts; backend.flops_by_block attributes FLOPs by it
REGION_TAG = "sparsify_region"


def real_value(node: Any) -> Optional[torch.Tensor]:
    """The real tensor a placeholder holds in the call being compiled (a parameter's current value), or None when
    the node is not a placeholder the backend was given an input for."""
    if isinstance(node, Node):
        v = node.meta.get(REAL_VALUE)
        return v if isinstance(v, torch.Tensor) and not isinstance(v, torch._subclasses.FakeTensor) else None
    return None


def shape(node: Any) -> Optional[tuple]:
    v = value(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def dtype(node: Any) -> Optional[torch.dtype]:
    v = value(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def static_scalar(node: Any) -> Optional[float]:
    """The value of a python-number operand: a number, or a graph node holding a SymFloat / SymInt.

    Under dynamic=True Dynamo lifts float attributes (GPT-2's `self.scaling`, `math.pi`) to graph inputs,
    so a scale arrives as a symbolic float. Its value is read with a guard (torch recompiles if the
    attribute changes), but only when no tensor size enters the expression: specialising on a sequence
    length would turn a dynamic graph into a static one. None when the value is not such a scalar."""
    if isinstance(node, bool):
        return None
    if isinstance(node, (int, float)):
        return float(node)
    v = value(node) if isinstance(node, Node) else node
    if isinstance(v, bool) or not isinstance(v, (int, float, torch.SymInt, torch.SymFloat)):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    expr = v.node.expr
    if getattr(expr, "is_number", False):
        return float(expr)
    shape_env = v.node.shape_env
    for symbol in expr.free_symbols:
        sources = shape_env.var_to_sources.get(symbol, [])
        if not sources or any(isinstance(s, TensorPropertySource) for s in sources):
            return None  # an unbacked value (data-dependent) or one derived from a tensor size
    return float(guard_scalar(v))


def skip_casts(node: Any) -> Any:
    while isinstance(node, Node) and kind_of(node) == "cast":
        node = node.args[0]
    return node


_ROOT = re.compile(r"^L\[[^\]]+\](\[[^\]]+\])*\.?")
ROOT_PREFIX = "sparsify_root_prefix"  # gm.meta key: the frame's module path in the user's root (frame_root_prefix)


def module_path(node: Node) -> str:
    """Module path of the innermost module a node ran in, from the user's root module."""
    stack = module_stack(node)
    return stack[-1][0] if stack else _frame_prefix(node)


def module_stack(node: Node) -> list[tuple[str, str]]:
    """[(path, class name)] of the modules a node ran in, outermost first, paths from the user's root module.

    nn_module_stack paths are relative to the frame Dynamo traced; after a graph break inside a
    layer that frame is the layer (L['self'] is encoder.layer.0), so the frame's own path in the
    root, which frame_root_prefix recorded on the graph, goes in front."""
    prefix = _frame_prefix(node)
    out = []
    for path, cls in (node.meta.get("nn_module_stack") or {}).values():
        path = _ROOT.sub("", path)
        path = path.replace(".__dict__['_modules']", "").replace("__dict__['_modules']", "")  # peft wrappers
        path = re.sub(r"\[(\d+)\]", r".\1", path)  # "layers[0]" -> "layers.0"
        path = re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", path)  # "lora_A['default']" -> "lora_A.default"
        path = path.lstrip(".")
        name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1].rstrip("'>")
        out.append((f"{prefix}.{path}" if prefix and path else (prefix or path), name))
    return out


def _frame_prefix(node: Node) -> str:
    owner = node.graph.owning_module
    return owner.meta.get(ROOT_PREFIX, "") if owner is not None else ""


def frame_root_prefix(gm) -> str:
    """Called from a backend while Dynamo compiles gm: the module path, in the user's root module, of the
    module whose frame Dynamo traced (its L['self']), or "" when that is the root itself or unknown.

    The root is the outermost module whose call is on the Python stack below Dynamo's entry point
    (torch.compile's wrapper), found by walking the callers' frames. When the frame belongs to a
    submodule, an identity guard on it is added: Dynamo would otherwise reuse this graph for every
    layer of the same class (their parameters are graph inputs), and the paths baked into it
    (state, exclude patterns, the report) would name the first layer for all of them."""
    import sys

    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx() if hasattr(InstructionTranslator, "current_tx") else None
    base = tx.f_locals.get("self") if tx is not None else None
    if not isinstance(base, torch.nn.Module):
        return ""
    root, frame = None, sys._getframe(1)
    while frame is not None and not frame.f_code.co_filename.endswith("eval_frame.py"):
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            owner = frame.f_locals.get("self")
            if isinstance(owner, torch.nn.Module) and not isinstance(owner, torch._dynamo.eval_frame.OptimizedModule):
                root = owner
        frame = frame.f_back
    if root is None or root is base:
        return ""
    path = next((name for name, module in root.named_modules(remove_duplicate=False) if module is base), None)
    if path is None:
        return ""
    from torch._dynamo.guards import GuardBuilder
    from torch._dynamo.source import LocalSource

    tx.output.guards.add(LocalSource("self").make_guard(GuardBuilder.ID_MATCH))
    gm.meta[ROOT_PREFIX] = path
    return path


def common_module(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    prefix = []
    for segment in zip(*parts):
        if len(set(segment)) != 1:
            break
        prefix.append(segment[0])
    return ".".join(prefix)


def fake_mode_of(graph: Graph):
    for node in graph.nodes:
        v = value(node)
        if isinstance(v, torch._subclasses.FakeTensor):
            return v.fake_mode
    return None


def insert_call(graph: Graph, target: Callable, args: tuple, kwargs: Optional[dict] = None,
                like: Optional[Node] = None) -> Node:
    """Insert a call_function node at the current insertion point and record its fake value,
    so later passes (and Inductor) see the same metadata Dynamo would have produced."""
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    if like is not None and "nn_module_stack" in like.meta:
        node.meta["nn_module_stack"] = like.meta["nn_module_stack"]
    mode = fake_mode_of(graph)
    if mode is not None:
        fake_args = torch.fx.node.map_arg(args, value)
        fake_kwargs = torch.fx.node.map_arg(kwargs, value)
        with mode:
            node.meta["example_value"] = target(*fake_args, **fake_kwargs)
    return node


def erase_unused(nodes) -> None:
    """Erase the given nodes once nothing uses them (repeat: one may use another)."""
    pending = set(nodes)
    changed = True
    while changed:
        changed = False
        for node in list(pending):
            if not node.users:
                node.graph.erase_node(node)
                pending.discard(node)
                changed = True
