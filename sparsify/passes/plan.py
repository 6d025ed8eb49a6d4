"""The plan: for every region found, the decision (which rewrite, or why none) from config + guards."""
from __future__ import annotations

import fnmatch

from ..config import SparsifyConfig
from .regions import Region
from .routed import routed_guard
from .spt import spt_guard

# decision names of the rewrites this package ships, by (region kind, method)
REWRITES = {
    ("attention", "dense"): "sparsify.attention",
    ("attention", "spt"): "spt",
    ("mlp", "dense"): "sparsify.mlp",
    ("mlp", "routed"): "routed",
}


class SparsifyError(RuntimeError):
    """Raised in strict mode when a region cannot be rewritten; names the module."""


def _method_guard(region: Region, config: SparsifyConfig, states: dict):
    """The chosen method's own conditions, beyond what every rewrite needs."""
    if region.kind == "attention" and config.attention.method == "spt":
        return spt_guard(region, config.attention, states)
    if region.kind == "mlp" and config.mlp.method == "routed":
        return routed_guard(region, config.mlp, states)
    return None


def plan_regions(regions: list[Region], config: SparsifyConfig, states: dict) -> list[Region]:
    for region in regions:
        method = getattr(config, region.kind).method
        if not region.unsupported and method != "off":
            region.unsupported = _method_guard(region, config, states)
        pattern = next((p for p in config.exclude if fnmatch.fnmatchcase(region.module, p)), None)
        if pattern is not None:
            region.decision, region.reason = "skipped", f"excluded by options.exclude pattern {pattern!r}"
        elif method == "off":
            region.decision, region.reason = "skipped", f"options.{region.kind}.method is 'off'"
        elif region.unsupported:
            region.decision, region.reason = "dense", region.unsupported
            if config.strict:
                raise SparsifyError(f"sparsify (strict): cannot rewrite the {region.kind} block of module "
                                    f"'{region.module or '<root>'}': {region.unsupported}")
        else:
            region.decision, region.reason = REWRITES[(region.kind, method)], ""
    return regions
