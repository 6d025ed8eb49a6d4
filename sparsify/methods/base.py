"""The method protocol and its registry.

A method is what a region may be rewritten into. It is one subclass of Method in one file under
sparsify/methods/, registered with register(); the pipeline (sparsify/pipeline.py), the plan, prepare, the
report and the checkpoint code find everything they need of it here, so adding a method edits no other file.

    class Toy(Method):
        name, kinds = "toy", ("mlp",)              # the report's decision name; the region kinds it rewrites
        options = ToyOptions                       # a dataclass of checked fields: they join options.mlp, flat
        report_facts = ("toy_scale",)              # region facts its report rows show
        state = (StateKind("toy_scale", ("sparsify_toy_scale",)),)  # tensors prepare attaches to modules

        def guard(self, region, options, states, mode): ...     # why this region cannot take it (None: it can)
        def rewrite(self, gm, region, options, states, mode): ...  # replace the region's nodes by op calls
        def prepare_region(self, ctx, region, options): ...      # sparsify.prepare: attach the region's state
        def between_steps(self, model, options, step): ...      # optional: work between optimizer steps
        # optional too: skip_reason (a filter of its own), reads_only (a tap: computation left as written),
        # planned (facts over all of a graph's regions), metrics (log entries per step)

    register(Toy())

`mode` is "train" for a graph autograd may run through (grad mode on and some input requires grad) and
"eval" otherwise; Dynamo compiles the two separately, so a method may plan them differently (DEFT: a loss in
training, skipping zeros in inference) and the report shows the mode of every row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

from ..config import SECTIONS, add_options, remove_options

MODES = ("train", "eval")


@dataclass(frozen=True)
class StateKind:
    """Learned state a method attaches to a module (sparsify.prepare): its tensors' attribute names, in the order
    the sparsify::tag passes them into the graph, and how to read back the options the tensors were made with
    (a state fixes them: the guards and the checkpoint record compare the same)."""
    name: str
    tensors: tuple
    made_with: Callable[[Mapping[str, torch.Tensor]], dict] = lambda tensors: {}


class Method:
    """The protocol (see the module docstring). Every hook has a default, so a method overrides what it needs."""
    name: str = ""
    kinds: tuple = ()
    options: Optional[type] = None
    report_facts: tuple = ()
    state: tuple = ()
    # whether sparsify.prepare must run first (the guard then explains a module without state)
    needs_prepare: bool = False

    def decision(self, region, options, mode: str) -> str:
        """The report's name of what this region became (the dense rewrite: "sparsify.attention")."""
        return self.name

    def skip_reason(self, region, options) -> Optional[str]:
        """Why the options leave this region out (a module filter of the method's own, say): it is then skipped,
        not warned about. None: it is the method's to take."""
        return None

    def reads_only(self, region, options, mode: str) -> bool:
        """Whether the method leaves the region's computation as written and only reads values of it (DEFT's
        tap): then a region the ops cannot compute (region.unsupported, e.g. active LoRA dropout) still takes it."""
        return False

    def planned(self, regions: list, options, mode: str) -> None:
        """Called once per graph after the plan, with the regions this method will rewrite, before any rewrite:
        for facts that depend on all of them (DEFT: the layers per stack)."""

    def guard(self, region, options, states: dict, mode: str) -> Optional[str]:
        """Why this region cannot take the method (None: it can). `states`: (module path, state kind) -> the
        state's graph nodes, as the sparsify::tag nodes brought them (methods.state.collect_state)."""
        return None

    def rewrite(self, gm: torch.fx.GraphModule, region, options, states: dict, mode: str) -> None:
        raise NotImplementedError(f"method {self.name!r} has no rewrite")

    # --- sparsify.prepare --------------------------------------------------------------------------------------
    def wants_samples(self, options) -> bool:
        """Whether prepare's example call should record what this method's regions compute (record_sample)."""
        return False

    def record_sample(self, kind: str, args: list):
        """What prepare keeps of one dense op call (sparsify::attention / sparsify::mlp) of a region of `kind`:
        its evaluated arguments in the op's schema order. The samples of a module reach prepare_region."""
        return None

    def prepare_region(self, ctx, region, options) -> None:
        """Attach the state this region needs (ctx.attach) and say what was done (ctx.decide)."""

    def finish_prepare(self, ctx, options) -> None:
        """After every region was prepared: one warning for what several regions share, say."""

    # --- training ----------------------------------------------------------------------------------------------
    def between_steps(self, model: torch.nn.Module, options, step: int) -> None:
        """Work between optimizer steps (sparsify.BetweenSteps calls it): in-place updates of the state tensors
        only, never new Python values the graph would bake in, so the compiled model does not recompile."""

    def metrics(self, options, reset: bool = True) -> dict:
        """What the method measured since the last reset, as flat name -> float log entries (the between-steps
        adapter logs them once per optimizer step). Empty: nothing to log."""
        return {}

    @property
    def has_metrics(self) -> bool:
        return type(self).metrics is not Method.metrics

    @property
    def has_prepare(self) -> bool:
        return type(self).prepare_region is not Method.prepare_region

    @property
    def has_schedule(self) -> bool:
        return type(self).between_steps is not Method.between_steps


_REGISTRY: dict[tuple[str, str], Method] = {}  # (region kind, method name) -> method


def register(method: Method) -> Method:
    """Put `method` on the registry: its name becomes a valid `method` of each of its kinds' options sections,
    its options' fields join those sections. Returns the method (so a module can keep `SPT = register(SPT())`)."""
    if not method.name or not method.kinds:
        raise ValueError(f"sparsify: a method needs a name and its region kinds; got {method.name!r}, {method.kinds!r}")
    for kind in method.kinds:
        if kind not in SECTIONS:
            raise ValueError(f"sparsify: method {method.name!r}: unknown region kind {kind!r}; kinds: {sorted(SECTIONS)}")
        if (kind, method.name) in _REGISTRY or method.name == "off":
            raise ValueError(f"sparsify: a {kind} method named {method.name!r} is already registered")
    for kind in method.kinds:
        section = SECTIONS[kind]
        if method.options is not None:
            add_options(section, method.options, method.name)
        if method.name != section.default_method:
            section.methods = (*section.methods, method.name)
        _REGISTRY[(kind, method.name)] = method
    return method


def unregister(name: str) -> None:
    """Take the method off the registry again (tests register toy methods for their own duration)."""
    for kind, section in SECTIONS.items():
        if _REGISTRY.pop((kind, name), None) is not None:
            section.methods = tuple(m for m in section.methods if m != name)
            remove_options(section, name)


def method_for(kind: str, name: str) -> Optional[Method]:
    """The method a section's `method` names (None for "off")."""
    return _REGISTRY.get((kind, name))


def methods_in(config) -> list[tuple[str, Method, object]]:
    """(kind, method, that kind's options section) for every section of `config` whose method is not "off"."""
    used = []
    for kind in SECTIONS:
        section = getattr(config, kind)
        method = method_for(kind, section.method)
        if method is not None:
            used.append((kind, method, section))
    return used


def state_kinds() -> dict[str, StateKind]:
    """Every registered method's state kinds, by name."""
    return {s.name: s for method in _REGISTRY.values() for s in method.state}


def report_facts(kind: str) -> tuple:
    """The region facts report rows of `kind` may show: every registered method's own facts of that kind."""
    return tuple(dict.fromkeys(f for (k, _), m in _REGISTRY.items() if k == kind for f in m.report_facts))


def guess_mode(example_inputs) -> str:
    """ "train" when autograd may run through the graph being compiled, else "eval" (see the module docstring)."""
    needs_grad = any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
    return "train" if torch.is_grad_enabled() and needs_grad else "eval"
