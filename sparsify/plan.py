"""The plan: for every region found, the decision (which method rewrites it, or why none) from the options, the
registered methods' guards and the graph's mode ("train" or "eval", see methods/base.py).

Ownership, when several methods apply to one model: every region belongs to the method its kind's section names
(options.attention, options.mlp, options.linear). Attention regions hold no projections (q, k and v come in as
inputs), so attention and linear methods never meet. An MLP region holds its projections: when a linear method
rewrites them, the dense MLP rewrite yields (the MLP stays as written, its projections are the linear method's);
a sparse MLP method and a linear method claiming the same projection is a conflict, raised at once naming both.
"""
from __future__ import annotations

import fnmatch
from typing import Optional

from .config import SparsifyConfig
from .methods import method_for
from .passes.regions import Region


class SparsifyError(RuntimeError):
    """Raised in strict mode when a region cannot be rewritten, and always when two methods claim one node;
    names the module."""


def plan_regions(regions: list[Region], config: SparsifyConfig, states: dict, mode: str = "train",
                 preparing: Optional[SparsifyConfig] = None) -> list[Region]:
    """`preparing`: the user's options when this is the plan of sparsify.prepare's example call (made with the
    dense rewrite of every block, `config`): no guard is asked (the state they check is what prepare is about to
    make), and the projections' owners are resolved as the user's options will resolve them."""
    for region in regions:
        section = getattr(config, region.kind)
        method = method_for(region.kind, section.method)
        region.mode = mode
        if method is not None and region.unsupported and method.reads_only(region, section, mode):
            region.unsupported = None  # the method leaves the computation as written: what the ops lack is moot
        if not region.unsupported and method is not None and preparing is None:
            region.unsupported = method.guard(region, section, states, mode)
        pattern = next((p for p in config.exclude if fnmatch.fnmatchcase(region.module, p)), None)
        own_skip = None if method is None else method.skip_reason(region, section)
        if pattern is not None:
            region.decision, region.reason = "skipped", f"excluded by options.exclude pattern {pattern!r}"
        elif method is None:
            region.decision, region.reason = "skipped", f"options.{region.kind}.method is 'off'"
        elif own_skip is not None:
            region.decision, region.reason = "skipped", own_skip
        elif region.unsupported:
            region.decision, region.reason = "dense", region.unsupported
            if config.strict:
                raise SparsifyError(f"sparsify (strict): cannot rewrite the {region.kind} block of module "
                                    f"'{region.module or '<root>'}': {region.unsupported}")
        else:
            region.method = method.name
            region.decision, region.reason = method.decision(region, section, mode), ""
    _resolve_projection_owners(regions, preparing or config)
    for kind in {r.kind for r in regions}:
        section = getattr(config, kind)
        method = method_for(kind, section.method)
        mine = [r for r in regions if r.kind == kind and method is not None and r.method == method.name]
        if mine:
            method.planned(mine, section, mode)
    return regions


def _resolve_projection_owners(regions: list[Region], requested: SparsifyConfig) -> None:
    """The rule of the module docstring. A conflict is between what was requested, whatever the guards said: a
    routed MLP without its router yet, or a projection whose mask is not prepared yet, still claims its nodes."""
    claims = [r for r in regions if r.kind == "linear" and r.decision != "skipped"]
    blocks = [r for r in regions if r.kind != "linear" and r.decision != "skipped"]
    inside = {id(block): {block.output, *block.interior} for block in blocks}
    for linear in claims:
        for block in blocks:
            if block.decision == "skipped" or linear.output not in inside[id(block)]:
                continue
            asked = getattr(requested, block.kind).method
            asked_method = method_for(block.kind, asked)
            reads_only = asked_method is not None and asked_method.reads_only(block, getattr(requested, block.kind),
                                                                            block.mode)
            if asked not in ("dense", "off") and not reads_only:  # a tap (DEFT) leaves the projections as they are
                raise SparsifyError(
                    f"sparsify: the projection '{linear.module or '<root>'}' is claimed by {block.kind} method "
                    f"{asked!r} (module '{block.module or '<root>'}') and by linear method "
                    f"{requested.linear.method!r}; choose one: set options.{block.kind}.method to 'dense' or 'off', "
                    "or exclude the modules of one of them with options.exclude")
            if linear.method is not None and block.method is not None:  # the dense block rewrite yields
                block.method = None
                block.decision, block.reason = "skipped", (f"its projections belong to linear method "
                                                           f"{linear.method!r} (the dense {block.kind} rewrite yields)")
