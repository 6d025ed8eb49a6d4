"""SPT routed FFN (papers.md section 1): each MLP region becomes one sparsify::routed_mlp call that
runs every token through top_k of `blocks` neuron blocks chosen by the module's learned router.

The router (weight, bias) and, for block_order="clustered", the neuron order are the tensors
sparsify.prepare() registered on the MLP module; they reach the graph through a sparsify::tag
node of kind "router" (DESIGN.md decision 5).
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch.fx import GraphModule

from ..config import MLPConfig
from .dense import mlp_operands
from .fx_utils import erase_unused, insert_call, value
from .regions import Region

ROUTER_KIND = "router"
ROUTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def routed_guard(region: Region, config: MLPConfig, states: dict) -> Optional[str]:
    """Why this MLP region cannot take the routed FFN (None: it can)."""
    d_ff = region.facts.get("d_ff")
    if not d_ff or d_ff % config.blocks:
        return f"d_ff {d_ff} is not divisible by blocks={config.blocks}"
    up = region.facts["_match"][0]
    if value(up.x).dtype not in ROUTED_DTYPES:
        return f"dtype {value(up.x).dtype} has no routed-FFN kernel (supported: fp16, bf16, fp32)"
    router = states.get((region.module, ROUTER_KIND))
    if router is None:
        return ("no router on this module: call sparsify.prepare(model, *example_inputs, options=...) "
                "before torch.compile")
    if tuple(value(router[0]).shape) != (config.blocks, region.facts["d_model"]):
        return (f"the module's router has shape {tuple(value(router[0]).shape)}, options ask for "
                f"{(config.blocks, region.facts['d_model'])}")
    if config.block_order == "clustered" and len(router) < 3:
        return "block_order='clustered' but the module was prepared without a neuron order"
    return None


def rewrite_routed(gm: GraphModule, region: Region, router: list, config: MLPConfig) -> None:
    graph = gm.graph
    router_w, router_b = router[0], router[1]
    neuron_order = router[2] if config.block_order == "clustered" else None
    with graph.inserting_before(region.output):
        args = (*mlp_operands(region), router_w, router_b, neuron_order, config.blocks, config.top_k,
                config.gate, region.facts["activation"], float(region.facts["dropout_p"]))
        call = insert_call(graph, torch.ops.sparsify.routed_mlp.default, args, like=region.output)
        call.meta["sparsify_module"] = region.module
        out = insert_call(graph, operator.getitem, (call, 0), like=region.output)
    region.output.replace_all_uses_with(out)
    erase_unused(region.interior)
