"""The pass pipeline: canonicalize -> collect state -> find regions -> plan -> each region's method rewrites it.

Each Dynamo graph (one per graph break, one per mode) goes through run_passes on its own.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import warnings
from typing import Optional

from torch.fx import GraphModule

from .config import SECTIONS, SparsifyConfig
from .debug import (Report, dump_graph, dump_report, log, new_graph_breaks, region_reports, single_handlers,
                    unmatched_reports)
from .methods import method_for, report_facts
from .methods.state import collect_state
from .passes.canonicalize import canonicalize
from .passes.fx_utils import REAL_VALUE, REGION_TAG, kind_of
from .passes.lower import lower_dense_attention, lower_dense_mlp
from .passes.regions import PRODUCTS, Region, find_regions, unmatched_blocks
from .plan import SparsifyError, plan_regions

_graph_counter = itertools.count()


def run_passes(gm: GraphModule, config: SparsifyConfig, announce: bool = True, mode: str = "train",
               preparing: Optional[SparsifyConfig] = None, example_inputs: Optional[list] = None) -> Report:
    """Rewrite `gm` in place; return what was found and decided. `announce`: warn about requested sparse
    methods that some regions did not get (explain() prints its report instead). `mode`: "train" or "eval"
    (methods/base.py guess_mode), which the methods may plan differently. `preparing`: sparsify.prepare's trace
    (its config asks the dense rewrite of every block, whose op calls it records; projections a linear method
    would own are planned, not rewritten, so the method's prepare_region sees them). `example_inputs`: the real
    tensors Dynamo compiles the graph for; a method may read a state's value at compile time (fx_utils.real_value:
    ADA-DEFT's layer gates decide which layers an eval graph skips)."""
    graph_index = next(_graph_counter)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, example in zip(placeholders, example_inputs or ()):
        node.meta[REAL_VALUE] = example
    single_handlers()
    dump_graph(config.dump, graph_index, "before", gm)
    canonical = canonicalize(gm)
    states = collect_state(gm)
    found = find_regions(gm, linear=config.linear.method != "off")
    has_products = any(kind_of(node) in PRODUCTS for node in gm.graph.nodes)
    unmatched = [(kind, path, cls) for kind, path, cls in unmatched_blocks(gm, found)
                 if not any(fnmatch.fnmatchcase(path, p) for p in config.exclude)]
    regions = plan_regions(found, config, states, mode, preparing)
    rewritten = 0
    # which block each node computes (count_flops by block reads it): linear regions first, so an MLP's or an
    # attention's own projections count for the block
    for region in sorted(regions, key=lambda r: r.kind != "linear"):
        for node in [*region.interior, region.output]:
            node.meta[REGION_TAG] = (region.kind, region.module)
    for region in regions:
        if region.method is not None and not (preparing is not None and region.kind == "linear"):
            kind = region.kind
            before = set(gm.graph.nodes)
            method_for(kind, region.method).rewrite(gm, region, getattr(config, kind), states, mode)
            for node in gm.graph.nodes:
                if node not in before:
                    node.meta[REGION_TAG] = (region.kind, region.module)
            rewritten += 1
    if preparing is None:  # prepare records the dense op's arguments: it keeps the op
        lowered = {"attention": lower_dense_attention(gm), "mlp": lower_dense_mlp(gm)}
        for region in regions:
            if region.module in lowered.get(region.kind, ()):
                region.facts["kernel"] = "sdpa" if region.kind == "attention" else "torch"
    report = Report(region_reports(regions, graph_index, report_facts), graphs=1,
                    unmatched=unmatched_reports(unmatched, graph_index, mode),
                    graph_breaks=new_graph_breaks(announce))
    for node in placeholders:  # real tensors stay out of the graph Inductor caches
        node.meta.pop(REAL_VALUE, None)
    gm.graph.lint()
    gm.recompile()
    if announce:
        warn_not_done(regions, config, graph_index, unmatched)
    if not regions and has_products:  # a graph piece with no matrix product (a graph break's tail) is not news
        warnings.warn(f"sparsify: no attention or MLP block found in graph {graph_index}; it runs unchanged",
                      stacklevel=2)
    log.info("graph %d (%s): %d regions, %d rewritten (canonicalized: %s)", graph_index, mode, len(regions),
             rewritten, canonical)
    dump_report(config.dump, graph_index, report, {"config": dataclasses.asdict(config), "mode": mode,
                                                   "canonicalized": canonical})
    dump_graph(config.dump, graph_index, "after", gm)
    return report


def warn_not_done(regions: list[Region], config: SparsifyConfig, graph_index: int, unmatched=()) -> None:
    """One warning per region kind whose requested sparse method some regions of this graph did not get (no
    prepare, below min_seq, a guard): the count and the first reason; and one per kind for the modules named
    like its blocks in which no region was found (strict raises). A fallback the user does not see is a bug."""
    for kind in SECTIONS:
        method = getattr(config, kind).method
        if method in ("dense", "off"):
            continue
        missed = [(path, cls) for k, path, cls in unmatched if k == kind]
        if missed:
            shown = ", ".join(f"{path or '<root>'} ({cls})" for path, cls in missed[:3])
            message = (f"sparsify: {kind} method {method!r} was requested, but {len(missed)} module(s) named like "
                       f"{kind} blocks in graph {graph_index} matched no {kind} pattern and run as written: {shown}"
                       f"{', ...' if len(missed) > 3 else ''}. sparsify.explain(model, ...) lists them")
            if config.strict:
                raise SparsifyError(message.replace("sparsify:", "sparsify (strict):", 1))
            warnings.warn(message, stacklevel=3)
        of_kind = [r for r in regions if r.kind == kind]
        left = [r for r in of_kind if r.decision == "dense"]
        if left:
            first = left[0]
            warnings.warn(f"sparsify: {kind} method {method!r} was requested, but {len(left)} of {len(of_kind)} "
                          f"{kind} regions in graph {graph_index} stay dense; first: {first.module or '<root>'}: "
                          f"{first.reason}. sparsify.explain(model, ...) or TORCH_LOGS=sparsify lists them all; "
                          f"options strict=True raises instead", stacklevel=3)
