"""The pass pipeline: canonicalize -> find regions -> plan -> rewrite.

Each Dynamo graph (one per graph break) goes through run_passes on its own.
"""
from __future__ import annotations

import dataclasses
import itertools
import warnings

from torch.fx import GraphModule

from ..config import SparsifyConfig
from ..debug import Report, dump_graph, dump_report, log, region_reports, single_handlers
from .canonicalize import canonicalize
from .dense import rewrite_dense
from .plan import SparsifyError, plan_regions
from .regions import Region, find_regions
from .routed import ROUTER_KIND, rewrite_routed
from .spt import CODEBOOK_KIND, collect_state, rewrite_spt

_graph_counter = itertools.count()


def run_passes(gm: GraphModule, config: SparsifyConfig, announce: bool = True) -> Report:
    """Rewrite `gm` in place; return what was found and decided. `announce`: warn about requested sparse
    methods that some regions did not get (explain() prints its report instead)."""
    graph_index = next(_graph_counter)
    single_handlers()
    dump_graph(config.dump, graph_index, "before", gm)
    canonical = canonicalize(gm)
    states = collect_state(gm)
    regions = plan_regions(find_regions(gm), config, states)
    rewritten = 0
    for region in regions:
        if region.decision == "spt":
            codebook = states.get((region.module, CODEBOOK_KIND), [None])[0]  # None for score="exact"
            rewrite_spt(gm, region, codebook, config.attention)
            rewritten += 1
        elif region.decision == "routed":
            rewrite_routed(gm, region, states[(region.module, ROUTER_KIND)], config.mlp)
            rewritten += 1
    rewritten += rewrite_dense(gm, regions)
    report = Report(region_reports(regions, graph_index), graphs=1)
    gm.graph.lint()
    gm.recompile()
    if announce:
        warn_not_done(regions, config, graph_index)
    if not regions:
        warnings.warn(f"sparsify: no attention or MLP block found in graph {graph_index}; it runs unchanged",
                      stacklevel=2)
    log.info("graph %d: %d regions, %d rewritten (canonicalized: %s)", graph_index, len(regions), rewritten, canonical)
    dump_report(config.dump, graph_index, report, {"config": dataclasses.asdict(config), "canonicalized": canonical})
    dump_graph(config.dump, graph_index, "after", gm)
    return report


def warn_not_done(regions: list[Region], config: SparsifyConfig, graph_index: int) -> None:
    """One warning per region kind whose requested sparse method some regions of this graph did not get (no
    prepare, below min_seq, a guard): the count and the first reason. A fallback the user does not see is a bug."""
    for kind in ("attention", "mlp"):
        method = getattr(config, kind).method
        if method in ("dense", "off"):
            continue
        of_kind = [r for r in regions if r.kind == kind]
        left = [r for r in of_kind if r.decision == "dense"]
        if left:
            first = left[0]
            warnings.warn(f"sparsify: {kind} method {method!r} was requested, but {len(left)} of {len(of_kind)} "
                          f"{kind} regions in graph {graph_index} stay dense; first: {first.module or '<root>'}: "
                          f"{first.reason}. sparsify.explain(model, ...) or TORCH_LOGS=sparsify lists them all; "
                          f"options strict=True raises instead", stacklevel=3)


__all__ = ["Region", "SparsifyError", "run_passes"]
