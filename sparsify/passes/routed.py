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
    # the state fixes the options it was made with: blocks (the router's rows) and block_order (a neuron
    # order exists only for "clustered"); routers fit to another split would route to the wrong neurons
    blocks, d_model = tuple(value(router[0]).shape)
    made_with = {"blocks": blocks, "block_order": "clustered" if len(router) >= 3 else "contiguous"}
    asked = {"blocks": config.blocks, "block_order": config.block_order}
    if made_with != asked:
        return (f"the module's router was prepared with "
                f"{', '.join(f'{k}={v!r}' for k, v in made_with.items())}, options ask for "
                f"{', '.join(f'{k}={v!r}' for k, v in asked.items())}: compile with the options the state was "
                "made with")
    if d_model != region.facts["d_model"]:
        return f"the module's router has shape {(blocks, d_model)}, the MLP's d_model is {region.facts['d_model']}"
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
