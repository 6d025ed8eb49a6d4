"""SPT routed FFN (papers.md section 1): each MLP region becomes one sparsify::routed_mlp call that
runs every token through top_k of `blocks` neuron blocks chosen by the module's learned router.

The router (weight, bias) and, for block_order="clustered", the neuron order are the tensors
sparsify.prepare() registered on the MLP module; they reach the graph through a sparsify::tag
node of kind "router" (DESIGN.md decision 5).
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import GraphModule

from ..config import boolean, choice, integer
from ..passes.dense import mlp_operands
from ..passes.fx_utils import erase_unused, insert_call, value
from ..passes.regions import Region
from ..tables import KERNEL_DTYPES
from .base import Method, StateKind, register

log = logging.getLogger("sparsify")  # debug.log: the methods sit below the reporting layer

ROUTER_KIND = "router"
ROUTED_DTYPES = KERNEL_DTYPES  # the routed FFN's kernels
# the router state's tensors (module attributes and checkpoint key suffixes), in the order the tag passes them
ROUTER_WEIGHT, ROUTER_BIAS = "sparsify_router_weight", "sparsify_router_bias"
NEURON_ORDER = "sparsify_neuron_order"  # only for block_order="clustered"


@dataclass
class RoutedOptions:
    """The routed FFN's fields of options.mlp (with method="routed").

    blocks:      neuron blocks the FFN's hidden dimension is split into, an int >= 1 (d_ff must
                 divide: checked per model when the plan is made)
    top_k:       blocks each token runs through, an int in [1, blocks]
    gate:        "sigmoid2p" (SPT: the kept blocks' frozen path is scaled by 2p, which is how the
                 router learns) or "none" (equals the dense FFN when top_k == blocks)
    block_order: "contiguous" (SPT) or "clustered" (MoEfication: neurons grouped by balanced
                 k-means on their up-projection rows)
    recompute:   False (default): training saves each kept block's up (and gate) projection output, top_k /
                 blocks of the dense MLP's pre-activation, so the backward runs no up GEMM again; True:
                 save only the inputs and recompute them in backward (one more grouped GEMM per projection,
                 for the least memory)
    """
    blocks: int = integer(4, low=1)
    top_k: int = integer(2, low=1, high="blocks")  # checked after blocks (fields run in order)
    gate: str = choice("sigmoid2p", "none")
    block_order: str = choice("contiguous", "clustered")
    recompute: bool = boolean(False)


def _router_made_with(tensors) -> dict:
    return {"blocks": int(tensors[ROUTER_WEIGHT].shape[0]),
            "block_order": "clustered" if NEURON_ORDER in tensors else "contiguous"}


ROUTER_STATE = StateKind(ROUTER_KIND, (ROUTER_WEIGHT, ROUTER_BIAS, NEURON_ORDER), _router_made_with)


class Routed(Method):
    name = "routed"
    kinds = ("mlp",)
    options = RoutedOptions
    report_facts = ("backward",)  # what training keeps for backward (options.mlp.recompute)
    state = (ROUTER_STATE,)
    needs_prepare = True

    def guard(self, region, options, states, mode):
        return routed_guard(region, options, states)

    def rewrite(self, gm, region, options, states, mode):
        rewrite_routed(gm, region, states[(region.module, ROUTER_KIND)], options, mode)

    # --- prepare: a router per MLP, fit to the example call's activations ---------------------------------------
    def wants_samples(self, options):
        return True  # MLP activations are only recorded for fitting routers: no [tokens, d_ff] copies otherwise

    def record_sample(self, kind, args):
        return mlp_sample(args)

    def prepare_region(self, ctx, region, options):
        from ..ops.routed_init import cluster_neurons, fit_router

        d_ff = region.facts.get("d_ff")
        samples = ctx.samples_of(self, region)
        if not d_ff or d_ff % options.blocks or not samples:
            ctx.decide(region, "dense", f"d_ff {d_ff} is not divisible by blocks={options.blocks}: no router attached"
                       if samples else "no sample of this MLP in the example call")
            return
        sample = max(samples, key=lambda sm: sm["x"].numel())  # a layer may run on no tokens (an empty modality)
        if sample["x"].numel() == 0:
            ctx.decide(region, "dense", "no token reached this MLP in the example call: no router to fit; prepare "
                                        "with inputs that reach it")
            return

        def make_router():
            up_w = sample["weight"]
            if options.block_order == "clustered":
                order = cluster_neurons(up_w.float(), options.blocks)
            else:
                order = torch.arange(up_w.shape[0], device=up_w.device)
            router_w, router_b = fit_router(sample["x"], sample["hidden"], sample["down_weight"], order,
                                            options.blocks)
            params = {ROUTER_WEIGHT: router_w.to(up_w.dtype), ROUTER_BIAS: router_b.to(up_w.dtype)}
            if options.block_order == "clustered":
                params[NEURON_ORDER] = order
            return params

        # a frame's own module runs its hooks outside the frame: tag from its up projection
        created = ctx.attach(region, ROUTER_KIND, make_router, ctx.hook_child(region, region.facts.get("up")))
        if created:
            log.info("prepare: router (%d blocks, %s) on %s", options.blocks, options.block_order, region.module)
        ctx.decide_prepared(region, ROUTER_KIND, created, {"blocks": options.blocks, "block_order": options.block_order},
                            f"{options.blocks} blocks, {options.block_order}, fit on {sample['x'].shape[0]} tokens")


def routed_guard(region: Region, options: RoutedOptions, states: dict) -> Optional[str]:
    """Why this MLP region cannot take the routed FFN (None: it can)."""
    d_ff = region.facts.get("d_ff")
    if not d_ff or d_ff % options.blocks:
        return f"d_ff {d_ff} is not divisible by blocks={options.blocks}"
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
    asked = {"blocks": options.blocks, "block_order": options.block_order}
    if made_with != asked:
        return (f"the module's router was prepared with "
                f"{', '.join(f'{k}={v!r}' for k, v in made_with.items())}, options ask for "
                f"{', '.join(f'{k}={v!r}' for k, v in asked.items())}: compile with the options the state was "
                "made with")
    if d_model != region.facts["d_model"]:
        return f"the module's router has shape {(blocks, d_model)}, the MLP's d_model is {region.facts['d_model']}"
    return None


def rewrite_routed(gm: GraphModule, region: Region, router: list, options: RoutedOptions, mode: str = "train") -> None:
    graph = gm.graph
    save_pre = mode == "train" and not options.recompute  # an inference graph has no backward to save for
    router_w, router_b = router[0], router[1]
    neuron_order = router[2] if options.block_order == "clustered" else None
    with graph.inserting_before(region.output):
        args = (*mlp_operands(region), router_w, router_b, neuron_order, options.blocks, options.top_k,
                options.gate, region.facts["activation"], float(region.facts["dropout_p"]), save_pre)
        call = insert_call(graph, torch.ops.sparsify.routed_mlp.default, args, like=region.output)
        call.meta["sparsify_module"] = region.module
        if mode == "train":
            region.facts["backward"] = "saves up outputs" if save_pre else "recomputes up outputs"
        out = insert_call(graph, operator.getitem, (call, 0), like=region.output)
    region.output.replace_all_uses_with(out)
    erase_unused(region.interior)


# tokens of the example batch kept per MLP for fitting its router (enough for a [d + 1] x blocks ridge fit)
_ROUTER_SAMPLE_TOKENS = 8192


def mlp_sample(args: list) -> dict:
    """What sparsify.prepare needs of one sparsify::mlp call: the projection the activation reads ([F, d], the
    gate projection of a gated MLP, else the up projection: what neuron clustering groups), and sample inputs
    x [T, d] with their activations [T, F] and the down projection (what fit_router fits to)."""
    from ..ops.mlp import mlp_hidden
    from ..ops.operands import MLP_OPERANDS, MLPOperands

    mlp = MLPOperands.of(args)
    activation = args[MLP_OPERANDS]  # the activation name follows the operands
    with torch.no_grad():
        x2d = mlp.x.detach().reshape(-1, mlp.x.shape[-1])[:_ROUTER_SAMPLE_TOKENS]
        hidden = mlp_hidden(x2d, mlp.up_weight, mlp.up_bias, mlp.gate_weight, mlp.gate_bias, mlp.up_lora_a,
                            mlp.up_lora_b, mlp.gate_lora_a, mlp.gate_lora_b, mlp.lora_scales, activation)
    w, b = (mlp.gate_weight, mlp.gate_bias) if mlp.gate_weight is not None else (mlp.up_weight, mlp.up_bias)
    return {"weight": w.detach(), "bias": None if b is None else b.detach(), "x": x2d, "hidden": hidden,
            "down_weight": mlp.down_weight.detach()}


ROUTED = register(Routed())
