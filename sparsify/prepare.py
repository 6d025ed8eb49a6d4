"""sparsify.prepare: create the learned state a sparse method needs, where users look for it.

    sparsify.prepare(model, **example_inputs, options={"attention": {"method": "spt"}})
    compiled = torch.compile(model, backend="sparsify", options={"attention": {"method": "spt"}})

prepare() runs the model once through Dynamo and the region finder, and for every attention region
registers a PQ codebook nn.Parameter `sparsify_pq_codebook` on the attention module (so optimizers,
state_dict, PEFT, DDP and FSDP see it) plus a forward hook that tags the module's output with it
(DESIGN.md decision 5); routed MLPs get `sparsify_router_weight/bias` (and `sparsify_neuron_order`).
Calling it again or recompiling never re-initialises state that exists. What was attached, and the
options it was made with, is recorded on model.config.sparsify (config.json after save_pretrained):
prepare on a model reloaded with from_pretrained loads the state from its checkpoint instead of
initialising it (sparsify.load_state does the same explicitly; sparsify/checkpoint.py).
"""
from __future__ import annotations

import dataclasses
import warnings
from collections import defaultdict
from typing import Any, Mapping, Union

import torch
from torch import nn

from .backend import trace
from .checkpoint import checkpoint_of, load_state, module_states, record_state
from .config import SparsifyConfig
from .debug import Report, log
from .methods import methods_in
from .methods.state import PrepareContext
from .passes.fx_utils import ROOT_PREFIX

# the dense ops prepare's example call records, by region kind (methods' record_sample reads their arguments)
_DENSE_OPS = {torch.ops.sparsify.attention.default: "attention", torch.ops.sparsify.mlp.default: "mlp"}


class _Recorder(torch.fx.Interpreter):
    """Runs a densely rewritten graph and hands each sparsify::attention / sparsify::mlp call's evaluated arguments
    to the methods that asked for samples of that kind (`wanting`: kind -> [method]), per module path."""

    def __init__(self, gm, samples: dict, wanting: dict):
        super().__init__(gm)
        self.samples, self.wanting = samples, wanting

    def run_node(self, n):
        result = super().run_node(n)
        kind = _DENSE_OPS.get(n.target) if n.op == "call_function" else None
        if kind in self.wanting:
            args = [self.env[a] if isinstance(a, torch.fx.Node) else a for a in n.args]
            path = n.meta.get("sparsify_module", "")
            for method in self.wanting[kind]:
                self.samples[(method.name, path)].append(method.record_sample(kind, args))
        return result


def prepare(model: nn.Module, *args, options: Union[SparsifyConfig, Mapping[str, Any], None] = None,
            **kwargs) -> Report:
    """Attach the state the configured methods need; return the region report of the example call, whose
    decisions say what prepare did per region ("prepared: pq_codebook" / "prepared: router", with the reason
    saying whether it was initialised, loaded from the checkpoint or kept; "dense" with why not).

    The example call (model(*args, **kwargs)) provides what each method initialises its state from (the q/k of
    every attention region for SPT's k-means codebooks, MLP activations for routers); it runs without gradients
    and leaves the model's parameters unchanged. A model reloaded with from_pretrained gets its saved state back
    from its checkpoint first (model.config.sparsify).
    """
    config = SparsifyConfig.from_options(options)
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):  # torch.compile(model)'s wrapper
        model = model._orig_mod
    restored = _restore_saved_state(model)
    # trace with the dense rewrite of every block: it exposes each block's operands by module path (projections a
    # linear method asks for are planned, not rewritten: pipeline.run_passes(preparing=config))
    dense = {kind: dataclasses.replace(getattr(config, kind), method="dense") for kind in ("attention", "mlp")}
    tracing = dataclasses.replace(config, **dense, inner="eager", strict=False)
    used = methods_in(config)
    wanting: dict = defaultdict(list)
    for kind, method, section in used:
        if method.wants_samples(section):
            wanting[kind].append(method)
    samples: dict = defaultdict(list)
    ctx = PrepareContext(model, samples, restored, frame_roots={""})

    def record(gm):
        ctx.frame_roots.add(gm.meta.get(ROOT_PREFIX, ""))
        return _Recorder(gm, samples, wanting).run

    report = trace(model, args, kwargs, tracing, record, preparing=config)
    if not report.regions:
        warnings.warn(f"sparsify.prepare: no attention or MLP block found in {type(model).__name__}: nothing "
                      "was prepared", stacklevel=2)
    for kind, method, section in used:
        if not method.has_prepare:
            continue  # nothing to prepare (the dense rewrite)
        for region in report.by_kind(kind):
            if region.decision in ("dense", "skipped"):
                continue  # unsupported (reason kept) or excluded: nothing to attach
            method.prepare_region(ctx, region, section)
        method.finish_prepare(ctx, section)
    record_state(model)
    return report


def _restore_saved_state(model: nn.Module) -> set:
    """Load the state model.config.sparsify lists (a model reloaded with from_pretrained, which drops
    the state tensors) from the model's checkpoint, for the modules that lack it. Returns the
    (module path, kind) pairs loaded; warns once when the record names state it cannot find."""
    record = getattr(getattr(model, "config", None), "sparsify", None) or {}
    wanted = {(path, kind) for kind, modules in record.get("state", {}).items() for path in modules}
    missing = wanted - set(module_states(model))
    if not missing:
        return set()
    checkpoint = checkpoint_of(model)
    loaded = set(load_state(model, checkpoint, only_missing=True)) if checkpoint is not None else set()
    if loaded:
        log.warning("sparsify.prepare: loaded the method state of %d module(s) from %s (model.config.sparsify) "
                    "instead of initialising it", len(loaded), checkpoint)
    if missing - loaded:
        path, kind = sorted(missing - loaded)[0]
        warnings.warn(f"sparsify.prepare: model.config.sparsify says {len(missing - loaded)} module(s) had method "
                      f"state (first: {kind} on {path or '<root>'}) that is not in "
                      f"{checkpoint or 'a local checkpoint of the model'}; it is initialised anew. To load it: "
                      "sparsify.load_state(model, <save_pretrained directory, weights file or state dict>)",
                      stacklevel=3)
    return loaded
