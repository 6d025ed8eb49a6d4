"""MST, mixed sparsity training (papers.md section 2): dynamic sparse weights on every Linear through three phases.

    options = {"linear": {"method": "mst", "total_steps": T}}
    sparsify.prepare(model, **example_batch, options=options)      # a mask buffer beside every selected weight
    compiled = torch.compile(model, backend="sparsify", options=options)
    schedule = sparsify.training.MixedSparsity(model, optimizer, options)
    for step ...: loss.backward(); schedule.step(); optimizer.zero_grad()     # masks grads, steps, prunes, regrows

The graph: each selected projection computes with w * mask (a bool buffer sparsify_mst_mask beside the weight,
in state_dict; a graph input, so mask and phase changes never recompile) through a straight-through product,
so the backward gives the weight's DENSE gradient: the growth criterion of the topology update (the authors
collect it with a hook on update steps). MixedSparsity masks the gradient before the optimizer step and
re-masks the weight after it, so masked weights stay exactly zero; in this unstructured mode the matmuls are
dense (the FLOPs a block-sparse kernel would skip are counted, not skipped).

The schedule (ours: the authors' code has no phases, only a {step: sparsity} staircase): the target sparsity
rises linearly from 0 to warmup_sparsity over the warm-up (the first warmup_end of total_steps), moves linearly
to ultra_sparsity over the first tenth of the ultra-sparse phase and holds it until ultra_end, then falls
linearly to restore_sparsity at total_steps: every change is spread over the topology updates, no jump.
Per-layer targets: Erdos-Renyi (density proportional to (n_in + n_out) / (n_in * n_out), scaled to the global
target, layers past 1 made dense and the scale solved again) or uniform.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import boolean, choice, integer, real
from ..passes.fx_utils import insert_call, value
from .base import Method, StateKind, register

MST_NAME = "mst"
MASK_KIND = "mst_mask"
MASK = "sparsify_mst_mask"
MASK_STATE = StateKind(MASK_KIND, (MASK,))
# block mode: a bool mask per block (the module's weight layout) and the blocks the next backward's weight
# gradient computes (MixedSparsity sets them: all on the step before a topology update, the mask otherwise)
BLOCKS_KIND = "mst_blocks"
BLOCKS = "sparsify_mst_blocks"
GRAD_BLOCKS = "sparsify_mst_grad_blocks"
BLOCKS_STATE = StateKind(BLOCKS_KIND, (BLOCKS, GRAD_BLOCKS))


def _block(value, config, where):
    """None (unstructured, the paper's) or (rows, cols) of a block of F.linear's [out, in] weight, each a tl.dot
    tile side."""
    from ..codegen.block_linear import BLOCK_SIDES
    if value is None:
        return None
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v in BLOCK_SIDES for v in value)):
        raise ValueError(f"sparsify: {where}={value!r} is not valid; None (unstructured) or a pair (rows, cols) of "
                         f"block sides, each one of {list(BLOCK_SIDES)}, e.g. (32, 32)")
    return tuple(value)


def _after(field_name: str):
    """A real in (config.<field_name>, 1]: the phase boundaries' order, checked when the options are made."""
    fraction = real(0.5, low=0.0, high=1.0).metadata["check"]

    def check(value, config, where):
        low = getattr(config, field_name)
        value = fraction(value, config, where)
        if not value > low:
            raise ValueError(f"sparsify: {where}={value!r} is not valid: it must be > {field_name}={low!r} "
                             "(phases in order: warm-up, ultra-sparse, restoration)")
        return value
    return field(default=0.75, metadata={"check": check})


@dataclass
class MSTOptions:
    """MST's fields of options.linear (with method="mst").

    total_steps:      the training run's optimizer steps (the schedule's length), an int >= 1
    warmup_end:       where the warm-up (dense -> warmup_sparsity) ends, a fraction of total_steps in (0, 1]
    ultra_end:        where the ultra-sparse phase ends and restoration begins, a fraction > warmup_end
    warmup_sparsity:  the global sparsity reached at the end of the warm-up, a real in [0, 1)
    ultra_sparsity:   the global sparsity held in the ultra-sparse phase, a real in [0, 1)
    restore_sparsity: the global sparsity at total_steps, a real in [0, 1)
    delta:            steps between topology updates (the authors: 100), an int >= 1
    zeta:             the drop fraction's start (cosine-annealed to 0 at ultra_end), a real in [0, 1]
    growth:           "mixed" (3 of 4 regrown by |dense gradient|, 1 of 4 uniformly at random), "gradient", "random"
    allocation:       per-layer sparsity: "erdos_renyi" or "uniform"
    dense_tied_head:  keep a head whose weight is tied to an input embedding dense (the authors mask it)
    skip_update_step: skip the optimizer step on topology-update steps (the authors do)
    seed:             the topology updates' random draws (one generator, the same on every rank), an int >= 0
    block:            None: unstructured masks (the paper's; the matmuls stay dense, the FLOPs are counted); or
                      (rows, cols) of F.linear's [out, in] weight, sides in 16..128, e.g. (32, 32): masks of whole
                      blocks, computed by the block-sparse kernels that skip the empty ones (ops/block_linear.py).
                      Every masked weight's sides must be multiples (sparsify.prepare names one that is not)
    """
    total_steps: int = integer(1000, low=1)
    warmup_end: float = real(0.25, low=0.0, high=1.0, low_open=True)
    ultra_end: float = _after("warmup_end")
    warmup_sparsity: float = real(0.9, low=0.0, high=0.999)
    ultra_sparsity: float = real(0.9, low=0.0, high=0.999)
    restore_sparsity: float = real(0.5, low=0.0, high=0.999)
    delta: int = integer(100, low=1)
    zeta: float = real(0.3, low=0.0, high=1.0)
    growth: str = choice("mixed", "gradient", "random")
    allocation: str = choice("erdos_renyi", "uniform")
    dense_tied_head: bool = boolean(False)
    skip_update_step: bool = boolean(True)
    seed: int = integer(0, low=0)
    block: Optional[tuple] = field(default=None, metadata={"check": _block})


def target_sparsity(step: int, o: MSTOptions) -> float:
    """The global target sparsity at `step` (module docstring: piecewise linear, three phases)."""
    t = min(max(step / o.total_steps, 0.0), 1.0)
    if t <= o.warmup_end:
        return o.warmup_sparsity * t / o.warmup_end
    ramp_end = o.warmup_end + 0.1 * (o.ultra_end - o.warmup_end)
    if t <= ramp_end:
        return o.warmup_sparsity + (o.ultra_sparsity - o.warmup_sparsity) * (t - o.warmup_end) / (ramp_end - o.warmup_end)
    if t <= o.ultra_end:
        return o.ultra_sparsity
    if o.ultra_end >= 1.0:
        return o.ultra_sparsity
    return o.ultra_sparsity + (o.restore_sparsity - o.ultra_sparsity) * (t - o.ultra_end) / (1.0 - o.ultra_end)


def drop_fraction(step: int, o: MSTOptions) -> float:
    """zeta_t = zeta / 2 * (1 + cos(pi t / T_end)), T_end = the end of the ultra-sparse phase."""
    t_end = max(1, int(o.ultra_end * o.total_steps))
    return 0.0 if step >= t_end else o.zeta / 2 * (1 + math.cos(math.pi * step / t_end))


def layer_densities(shapes: dict, sparsity: float, allocation: str) -> dict:
    """Per layer (name -> (n_out, n_in)) the density that makes the global sparsity `sparsity`: uniform, or
    Erdos-Renyi with the layers it would push past 1 made dense and the scale solved again over the rest."""
    if allocation == "uniform" or sparsity == 0.0:
        return {name: 1.0 - sparsity for name in shapes}
    sizes = {name: n_out * n_in for name, (n_out, n_in) in shapes.items()}
    er = {name: (n_out + n_in) / (n_out * n_in) for name, (n_out, n_in) in shapes.items()}
    dense: set = set()
    while True:
        budget = (1.0 - sparsity) * sum(sizes.values()) - sum(sizes[n] for n in dense)
        scale = budget / sum(er[n] * sizes[n] for n in shapes if n not in dense)
        over = {n for n in shapes if n not in dense and scale * er[n] > 1.0}
        if not over:
            return {n: 1.0 if n in dense else scale * er[n] for n in shapes}
        dense |= over


def straight_through(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """weight * mask forward; the gradient reaches every entry of weight (the dense gradient growth reads)."""
    return weight + (weight * mask - weight).detach()


class MST(Method):
    name = MST_NAME
    kinds = ("linear",)
    options = MSTOptions
    state = (MASK_STATE, BLOCKS_STATE)
    needs_prepare = True
    report_facts = ("mst_density", "mst_block")

    def decision(self, region, options, mode):
        return "mst (masked weight)" if options.block is None else "mst (block-sparse linear)"

    def guard(self, region, options, states, mode):
        if region.facts.get("lora"):
            return "a LoRA-wrapped projection: MST masks plain weights (pretraining), not adapters"
        kind = MASK_KIND if options.block is None else BLOCKS_KIND
        if states.get((region.module, kind)) is None:
            other = "block" if kind == MASK_KIND else "unstructured"
            made = " (it was prepared with " + other + " masks)" if states.get(
                (region.module, BLOCKS_KIND if kind == MASK_KIND else MASK_KIND)) is not None else ""
            return (f"no {'block ' if options.block else ''}mask on this projection{made}: run "
                    "sparsify.prepare(model, ..., options=...) with these options first")
        if options.block is not None:
            blocks = value(states[(region.module, kind)][0])
            out_in = tuple(value(region.facts["_match"].weight).shape)  # the graph's weight is F.linear's [out, in]
            want = _blocks_shape(out_in, options.block, False)
            if want is not None and region.facts.get("weight_transposed"):
                want = want[::-1]  # the masks are in the module's layout, [in, out] for a Conv1D
            if tuple(blocks.shape) != want:
                return (f"the module's block mask has shape {tuple(blocks.shape)}, options.linear.block="
                        f"{options.block} asks for {want}")
        return None

    def rewrite(self, gm, region, options, states, mode):
        proj = region.facts["_match"]
        graph = gm.graph
        transposed = region.facts.get("weight_transposed")  # Conv1D: the module's weight and masks are [in, out]
        with graph.inserting_before(region.output):
            if options.block is None:
                mask = states[(region.module, MASK_KIND)][0]
                if transposed:
                    mask = insert_call(graph, torch.t, (mask,), like=region.output)
                weight = insert_call(graph, straight_through, (proj.weight, mask), like=region.output)
                out = insert_call(graph, F.linear, (proj.x, weight, proj.bias), like=region.output)
            else:
                blocks, grad_blocks = states[(region.module, BLOCKS_KIND)]
                if transposed:  # the graph's weight is already F.linear's [out, in] view; the masks follow it
                    blocks, grad_blocks = (insert_call(graph, torch.t, (t,), like=region.output)
                                           for t in (blocks, grad_blocks))
                out = insert_call(graph, torch.ops.sparsify.block_sparse_linear.default,
                                  (proj.x, proj.weight, proj.bias, blocks, grad_blocks), like=region.output)
        region.output.replace_all_uses_with(out)
        region.facts["mst_density"] = "the mask's (MixedSparsity.densities())"
        if options.block is not None:
            region.facts["mst_block"] = "x".join(map(str, options.block))

    # --- prepare: one mask per weight, all ones (the warm-up starts dense) ---------------------------------------
    def prepare_region(self, ctx, region, options):
        module = ctx.model.get_submodule(region.module)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter):
            ctx.decide(region, "dense", "no weight parameter on the projection's module")
            return
        if options.dense_tied_head and _tied_to_an_embedding(ctx.model, weight):
            ctx.decide(region, "dense", "dense_tied_head=True: its weight is an input embedding's")
            return
        if options.block is None:
            created = ctx.attach(region, MASK_KIND, lambda: {MASK: torch.ones_like(weight, dtype=torch.bool)})
            ctx.decide_prepared(region, MASK_KIND, created, {}, "all ones (the warm-up starts dense)")
            return
        shape = _blocks_shape(tuple(weight.shape), options.block, region.facts.get("weight_transposed"))
        if shape is None:
            out_in = tuple(weight.shape)[::-1] if region.facts.get("weight_transposed") else tuple(weight.shape)
            raise ValueError(f"sparsify: options.linear.block={options.block} does not divide the weight [out, in] = "
                             f"{list(out_in)} of {region.module or '<root>'}: choose block sides that divide every "
                             "masked weight, or leave this one out (options.exclude, or dense_tied_head=True for "
                             "a head tied to the embedding)")
        created = ctx.attach(region, BLOCKS_KIND, lambda: {
            BLOCKS: torch.ones(shape, dtype=torch.bool, device=weight.device),
            GRAD_BLOCKS: torch.ones(shape, dtype=torch.bool, device=weight.device)})
        ctx.decide_prepared(region, BLOCKS_KIND, created, {}, f"all {shape[0]}x{shape[1]} blocks of "
                            f"{options.block[0]}x{options.block[1]} on (the warm-up starts dense)")


def _blocks_shape(weight_shape: tuple, block: tuple, transposed) -> Optional[tuple]:
    """The block mask's shape in the module's weight layout ([in, out] for a Conv1D), or None where `block`
    (F.linear's (rows, cols)) does not divide the weight."""
    rows, cols = (block[1], block[0]) if transposed else block
    n, k = weight_shape
    return None if n % rows or k % cols else (n // rows, k // cols)


def _tied_to_an_embedding(model: torch.nn.Module, weight: torch.Tensor) -> bool:
    return any(isinstance(m, torch.nn.Embedding) and m.weight is weight for m in model.modules())


MST = register(MST())
