"""The "sparsify" torch.compile backend: options -> passes -> inner compiler.

torch.compile(model, backend="sparsify", options={...}) finds this through the
torch_dynamo_backends entry point; sparsify.backend(config) returns the same thing as a callable.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch.fx import GraphModule

from .config import SparsifyConfig
from .debug import Report
from .methods import guess_mode
from .passes.fx_utils import REGION_TAG
from .pipeline import run_passes
from .plan import SparsifyError

# reports of recent compilations, newest last (sparsify.last_report() reads it)
_reports: list = []


def _inner_compile(gm: GraphModule, example_inputs, inner: str) -> Callable:
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)
    if inner == "aot_eager":
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)
    return gm.forward  # "eager": run the rewritten graph as it is


def sparsify_backend(gm: GraphModule, example_inputs, options: Union[SparsifyConfig, Mapping[str, Any], None] = None,
                     mode: Optional[str] = None) -> Callable:
    if mode not in (None, "default"):
        raise ValueError(f"sparsify: torch.compile mode={mode!r} is not supported; pass options= instead")
    config = SparsifyConfig.from_options(options)
    report = run_passes(gm, config, mode=guess_mode(example_inputs), example_inputs=example_inputs)
    _reports.append(report)
    del _reports[:-64]
    return _inner_compile(gm, example_inputs, config.inner)


def backend(config: Union[SparsifyConfig, Mapping[str, Any], None] = None, **options) -> Callable:
    """The backend as a callable: torch.compile(model, backend=sparsify.backend({"inner": "aot_eager"}))."""
    if config is not None and options:
        raise TypeError("sparsify.backend: pass a config or keyword options, not both")
    resolved = SparsifyConfig.from_options(config if config is not None else options)

    def sparsify(gm: GraphModule, example_inputs) -> Callable:
        return sparsify_backend(gm, example_inputs, options=resolved)

    return sparsify


def explain(model: torch.nn.Module, *args, options: Union[SparsifyConfig, Mapping[str, Any], None] = None,
            **kwargs) -> Report:
    """Run Dynamo and the passes on model(*args, **kwargs) and return what was found and decided.

    The call runs once (without autograd) through the rewritten graphs, so an explain that
    succeeds also shows the rewritten model executes. The model itself is not changed.
    """
    report = trace(model, args, kwargs, SparsifyConfig.from_options(options), lambda gm: gm.forward, announce=False)
    print(report)
    return report


def count_flops(model: torch.nn.Module, *args, options: Union[SparsifyConfig, Mapping[str, Any], None] = None,
                **kwargs) -> dict[str, int]:
    """FLOPs of one forward of model(*args, **kwargs) as the backend rewrites it, per op name ("sparsify.spt_attention",
    "aten.mm", ...), counted by torch.utils.flop_counter with the sparsify ops' own formulas (so sparse ops
    count their sparse work, not dense n x n). Runs the rewritten graphs once without autograd; the model is
    not changed. Compare two option sets to see what a method saves; flops_by_block says which block they are."""
    totals: dict[str, int] = {}
    for ops in _flops(model, args, kwargs, options).values():
        for op, n in ops.items():
            totals[op] = totals.get(op, 0) + n
    return totals


def flops_by_block(model: torch.nn.Module, *args, options: Union[SparsifyConfig, Mapping[str, Any], None] = None,
                   **kwargs) -> dict[str, dict[str, int]]:
    """count_flops per kind of block: {"attention": {op: flops}, "mlp": ..., "linear": ..., "other": ...}. A node
    counts for the region it was found in or inserted for (passes/fx_utils.REGION_TAG), whatever op runs it (a
    dense MLP lowered to plain matmuls counts as "mlp"); "other" is everything outside a region (embeddings,
    norms, the attention's own q/k/v projections where the region starts at q, k, v, an LM head)."""
    return _flops(model, args, kwargs, options)


def _flops(model, args, kwargs, options) -> dict[str, dict[str, int]]:
    from torch.utils.flop_counter import FlopCounterMode

    totals: dict[str, dict[str, int]] = {}

    class Counted(torch.fx.Interpreter):
        def run_node(self, node):
            # Dynamo steps aside while a dispatch mode is active: a mode per node (entering one clears its counts)
            counter = FlopCounterMode(display=False)
            with counter:
                result = super().run_node(node)
            kind = totals.setdefault(node.meta.get(REGION_TAG, ("other", ""))[0], {})
            for op, n in counter.get_flop_counts().get("Global", {}).items():
                kind[str(op)] = kind.get(str(op), 0) + int(n)
            return result

    def counted(gm: GraphModule) -> Callable:
        return lambda *graph_args: Counted(gm).run(*graph_args)

    trace(model, args, kwargs, SparsifyConfig.from_options(options), counted)
    return {kind: ops for kind, ops in totals.items() if ops}


def trace(model: torch.nn.Module, args: tuple, kwargs: dict, config: SparsifyConfig, runner,
          announce: bool = True, preparing: Optional[SparsifyConfig] = None) -> Report:
    """Run model(*args, **kwargs) once, without autograd, through Dynamo and the passes; each
    rewritten graph executes as runner(gm) returns. The merged report of all graphs. It runs without autograd, so
    the plan's mode is read from model.training: the plan a training (or inference) run of the model compiles.
    A fresh compile: Dynamo's cache entries are per backend, so this always traces anew, and a
    model compiled in place (model.compile()) is traced through its own forward."""
    reports: list = []

    mode = "train" if model.training else "eval"  # what a training (or inference) run of the model would compile

    def capture(gm: GraphModule, example_inputs) -> Callable:
        reports.append(run_passes(gm, config, announce, mode, preparing, example_inputs))
        return runner(gm)

    with torch.no_grad(), _eager_calls(model):
        try:
            torch.compile(model, backend=capture, dynamic=False)(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as failed:  # Dynamo wraps what a backend raises
            if isinstance(failed.inner_exception, SparsifyError):
                raise failed.inner_exception from None
            raise
    return Report.merged(reports)


@contextlib.contextmanager
def _eager_calls(model: torch.nn.Module):
    """Calls of model and its submodules go to their forward, not to what model.compile() installed
    (nn.Module.compile sets _compiled_call_impl, and that compiled call would never reach trace's backend)."""
    compiled = [(m, m._compiled_call_impl) for m in model.modules() if getattr(m, "_compiled_call_impl", None)]
    for module, _ in compiled:
        module._compiled_call_impl = None
    try:
        yield
    finally:
        for module, call in compiled:
            module._compiled_call_impl = call


def last_report(graphs: int = 1) -> Optional[Report]:
    """The report of the last graph the backend compiled. A model with graph breaks compiles one graph per piece:
    sparsify.explain(model, ...) gives the report of all of them, or last_report(graphs=n) the last n merged
    (64 kept)."""
    if graphs < 1:
        raise ValueError(f"sparsify.last_report: graphs must be >= 1, got {graphs!r}")
    if not _reports:
        return None
    return _reports[-1] if graphs == 1 else Report.merged(_reports[-graphs:])
