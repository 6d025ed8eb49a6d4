"""Method state: tensors a method attaches to modules, how they reach a compiled graph, and prepare's bookkeeping.

A backend cannot add inputs to a Dynamo graph, so state (a PQ codebook, a router, a weight mask) is an
nn.Parameter or buffer registered on the module it belongs to (optimizers, state_dict, PEFT, DDP and FSDP see
it), and a forward hook passes the module's output through sparsify::tag together with the state (DESIGN.md
decision 5). Dynamo lifts the state as ordinary inputs; collect_state() finds the tags in each graph, maps
(module path, state kind) -> the state's nodes for the methods' guards and rewrites, and drops the tags.
Because the state is a graph input, not a constant, updating it in place (between steps) never recompiles.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.fx import GraphModule

from ..passes.fx_utils import module_path
from .. import ops  # noqa: F401  (registers sparsify::tag)

_HOOK = "_sparsify_tag_hook"


def _tag_output(module: nn.Module, args, output):
    """Forward hook: route state into the compiled graph (a no-op outside compile). The hook sits
    on the state's owner, or on one of its children when the owner is the module of a traced frame (the
    compiled root, or a layer Dynamo resumed in after a graph break: its own hooks run outside the frame); the tag name then carries the child's path
    below the owner ("router@up"), so the pass can find the owner's path again."""
    if not torch.compiler.is_compiling():
        return None
    first = output[0] if isinstance(output, tuple) else output
    # entries hold the owner's parameter and buffer dicts, not the owner: Dynamo would otherwise name the
    # owner (and every module under it) by this path through the hook's list in frames it resumed in
    for kind, names, offset, params, buffers in module.__dict__["_sparsify_tags"]:
        name = f"{kind}@{offset}" if offset else kind
        first = torch.ops.sparsify.tag(first, [params[n] if n in params else buffers[n] for n in names], name)
    return (first, *output[1:]) if isinstance(output, tuple) else first


def attach_state(module: nn.Module, kind: str, make_params, hook_child: str = "") -> bool:
    """Register the parameters of one state kind on `module` unless they exist (so recompiles,
    repeated prepares and loaded checkpoints keep them), and its tag hook once (on the submodule
    `hook_child` when given). `make_params()` returns {attribute name: tensor}; it is only called
    when the state is new. True if created."""
    states = module.__dict__.setdefault("_sparsify_states", {})
    created = False
    if kind not in states:
        params = make_params()
        for name, tensor in params.items():
            if hasattr(module, name):
                continue
            if tensor.is_floating_point():  # learned: a parameter (optimizers, DDP, FSDP see it)
                module.register_parameter(name, nn.Parameter(tensor))
            else:  # an index (e.g. the neuron order): a buffer, saved with the checkpoint
                module.register_buffer(name, tensor)
            created = True
        states[kind] = list(params)
        module.__dict__.setdefault("_sparsify_hooks", {})[kind] = hook_child  # recorded in the checkpoint
    hooked = module.get_submodule(hook_child) if hook_child else module
    tags = hooked.__dict__.setdefault("_sparsify_tags", [])  # a plain list: no submodule registration
    if not any(params is module._parameters and k == kind for k, _, _, params, _ in tags):
        tags.append((kind, states[kind], hook_child, module._parameters, module._buffers))
    if not hasattr(hooked, _HOOK):
        setattr(hooked, _HOOK, hooked.register_forward_hook(_tag_output))
    return created


def detach_state(module: nn.Module, kind: str) -> None:
    """Remove one state kind from `module`: its tensors and its entry in the tag hooks (the hook stays, a
    no-op without entries)."""
    for name in module.__dict__.get("_sparsify_states", {}).pop(kind, ()):
        if hasattr(module, name):
            delattr(module, name)
    module.__dict__.get("_sparsify_hooks", {}).pop(kind, None)
    for hooked in module.modules():
        tags = hooked.__dict__.get("_sparsify_tags")
        if tags:
            tags[:] = [t for t in tags if not (t[3] is module._parameters and t[0] == kind)]


def collect_state(gm: GraphModule) -> dict[tuple[str, str], list]:
    """Strip every sparsify::tag node; return (module path, state kind) -> the state placeholders.

    Runs first on every graph: it also records where the traced frame sits in the user's root module
    (frame_root_prefix), so every module_path of this graph, here and in the region finder, is a
    model.named_modules() name even in a frame Dynamo resumed after a graph break."""
    from ..passes.fx_utils import frame_root_prefix

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


@dataclass
class PrepareContext:
    """What sparsify.prepare gives a method's prepare_region: the model, the example call's samples of each
    module (method.record_sample), the state loaded from a checkpoint, and the modules some traced frame
    belongs to (their own hooks run outside the frame: the tag hook goes on a child, see attach_state)."""
    model: nn.Module
    samples: dict                   # (method name, module path) -> [record_sample(...) of each call]
    restored: set = field(default_factory=set)       # (module path, state kind) loaded from the checkpoint
    frame_roots: set = field(default_factory=set)    # module paths of traced frames' roots
    notes: dict = field(default_factory=dict)        # a method's own notes across its regions (finish_prepare)

    def samples_of(self, method, region) -> list:
        return self.samples.get((method.name, region.module), [])

    def hook_child(self, region, child: Optional[str]) -> str:
        """Where the tag hook goes for `region`: on the module itself, or, when it is a traced frame's root, on its
        child `child` (a full module path, e.g. the q projection: its hook runs inside the frame)."""
        return below(child, region.module) if region.module in self.frame_roots else ""

    def attach(self, region, kind: str, make_params, hook_child: str = "") -> bool:
        return attach_state(self.model.get_submodule(region.module), kind, make_params, hook_child)

    def decide(self, region, decision: str, reason: str) -> None:
        region.decision, region.reason = decision, reason

    def decide_prepared(self, region, kind: str, created: bool, asked: dict, how: str) -> None:
        """The report row of a region prepare attached (or found) state for: "prepared: <kind>" and where the
        state came from, or "dense" when the state the module already has was made with other options (prepare
        never re-initialises state: the compiled region stays dense for the same reason, the method's guard)."""
        from .base import state_kinds
        module = self.model.get_submodule(region.module)
        tensors = {n: getattr(module, n) for n in module.__dict__["_sparsify_states"][kind] if hasattr(module, n)}
        made_with = state_kinds()[kind].made_with(tensors)
        differs = {k: (made_with[k], v) for k, v in asked.items() if made_with.get(k) != v}
        if differs:
            prepared = ", ".join(f"{k}={was!r}" for k, (was, _) in differs.items())
            wanted = ", ".join(f"{k}={now!r}" for k, (_, now) in differs.items())
            reason = (f"the module's {kind} was prepared with {prepared}, options ask for {wanted}; prepare keeps "
                      "existing state, so compile with the options it was made with")
            warnings.warn(f"sparsify.prepare: {region.module or '<root>'}: {reason}", stacklevel=4)
            self.decide(region, "dense", reason)
        elif created:
            self.decide(region, f"prepared: {kind}", f"new: {how}")
        elif (region.module, kind) in self.restored:
            self.decide(region, f"prepared: {kind}", "loaded from the model's checkpoint")
        else:
            self.decide(region, f"prepared: {kind}", "kept the state the module already has")


def below(child: Optional[str], module: str) -> str:
    """`child`'s path relative to `module` ("" when it is not below it)."""
    if not child or not module:
        return child or ""
    return child[len(module) + 1:] if child.startswith(module + ".") else ""


def modules_with_state(model: nn.Module, kind: str):
    """(module path, module, {tensor name: tensor}) of every module holding state `kind` (for between_steps)."""
    for path, module in model.named_modules():
        names = module.__dict__.get("_sparsify_states", {}).get(kind)
        if names is not None:
            yield path, module, {n: getattr(module, n) for n in names if hasattr(module, n)}
