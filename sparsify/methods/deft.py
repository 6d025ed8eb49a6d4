"""DEFT, density-efficient fine-tuning (papers.md section 3): a loss that drives the MLP activations to exact
zeros, and the per-layer density metrics.

    options={"mlp": {"method": "deft", "weight": 1.0}}

Training graphs: every selected MLP keeps its computation as written (Inductor compiles it) and gains a tap on
its activation output a (after the nonlinearity, before the down projection; for gated MLPs the activated gate
branch before the multiply): rho_l(b) = mean over tokens and features of a^2 / (a^2 + eps) per sample b, and
the loss weight * mean over samples and layers of rho, reaches the gradient through the shared auxiliary-loss
op (ops/aux_loss.py): the model's outputs are unchanged, task_loss.backward() gives the gradient of
task_loss + weight * L_density. Layers are averaged per stack (the module path with its layer index as "*":
T5's encoder and decoder are two stacks, each weighted 1, as the authors sum them). The stacks are counted per
compiled graph: a graph break between the layers of one stack makes each graph average its own layers.

Every graph (train and eval) also records the exact-zero density of each tapped activation in its dtype, the
surrogate, and the |a| <= tau density (sparsify::observe; sparsify.activation_density() reads them, the
between-steps adapter logs them). measure_only=True records without the loss (the PEFT baseline).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import Node

from ..config import boolean, choice, integer, patterns, real
from ..passes.fx_utils import erase_unused, insert_call, shape, value
from .base import Method, register

DEFT_NAME = "deft"


def _optional_fraction(value, config, where):
    return None if value is None else _FRACTION(value, config, where)


_FRACTION = real(0.0, low=0.0, high=1.0).metadata["check"]

# "auto"'s switch density when options.mlp.switch_density is None. CPU: None, never sparse: measured by
# benchmarks/deft_inference.py (benchmarks/results/deft_inference_cpu.md), the CPU path (a gather and a matmul per
# token tile) did not beat dense consistently at any density. CUDA: per layer, from the H200 roofline
# (ops/sparse_down.py modelled_switch: a prediction; no GPU has run the kernels yet).
AUTO_SWITCH = {"cpu": None}


@dataclass
class DeftOptions:
    """DEFT's fields of options.mlp (with method="deft").

    weight:       lambda, the density loss's weight, a real >= 0 (the authors: 1.0)
    eps:          the surrogate's epsilon, a real > 0 (1e-7)
    layers:       fnmatch patterns of the MLP module paths to tap (empty: every MLP)
    measure_only: record the metrics, add no loss (the PEFT baseline)
    mask_padding: leave padding tokens out of loss and metrics (needs the graph's attention_mask input); False
                  reproduces the authors, who count them
    tau:          the |a| <= tau threshold of the near-zero density, reported beside the exact one (activations
                  such as SiLU are never exactly zero), a real >= 0
    inference:    eval graphs' down projections: "dense" (as written), "sparse" (sparsify::sparse_down: only the
                  non-zero activations are read; exact), or "auto": sparse where this layer's density measured in
                  training (sparsify.activation_density, this process) is at most the switch density
    switch_density: the density at or below which "auto" takes the sparse path, a real in [0, 1]; None (the
                  default): the device's switch density, AUTO_SWITCH (measured on CPU, modelled for the H200 by
                  benchmarks/deft_inference.py)
    block_t:      tokens per tile sharing one union of active neurons in the sparse path (16..256, a power of 2)
    """
    weight: float = real(1.0, low=0.0)
    eps: float = real(1e-7, low=0.0, low_open=True)
    layers: tuple = patterns(())
    measure_only: bool = boolean(False)
    mask_padding: bool = boolean(False)
    tau: float = real(1e-3, low=0.0)
    inference: str = choice("dense", "sparse", "auto")
    switch_density: Optional[float] = field(default=None, metadata={"check": _optional_fraction})
    block_t: int = integer(16, low=16, among=(16, 32, 64, 128, 256))


def stack_of(module: str) -> str:
    """The stack a layer belongs to: its module path with numeric components as "*"
    ("encoder.block.3.layer.1.DenseReluDense" -> "encoder.block.*.layer.1.DenseReluDense")."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", module)


def metric_name(mode: str, module: str) -> str:
    return f"{mode}:{module}"


def _token_mask(graph, a: Node) -> Optional[Node]:
    """The graph's attention_mask input when it is [B, T] for an activation [B, T, F] (nonzero = a real token)."""
    a_shape = shape(a)
    if a_shape is None or len(a_shape) != 3:
        return None
    for node in graph.nodes:
        if node.op != "placeholder" or "attention_mask" not in node.name:
            continue
        m = shape(node)
        if m is not None and len(m) == 2 and tuple(m) == tuple(a_shape[:2]):
            return node
    return None


def stack_share(rho: torch.Tensor, scale: float) -> torch.Tensor:
    """This layer's share of its stack's loss term: the mean over samples of rho, over the stack's layer count."""
    return rho.mean() * scale


class Deft(Method):
    name = DEFT_NAME
    kinds = ("mlp",)
    options = DeftOptions
    report_facts = ("stack", "exact_zeros", "padding", "inference", "inference_up")

    def decision(self, region, options, mode):
        if mode == "train" and not options.measure_only:
            return "deft (density loss)"
        return "deft (measure)"

    def reads_only(self, region, options, mode) -> bool:
        return True  # a tap: the MLP's computation stays as written, so regions the ops cannot compute still take it

    def skip_reason(self, region, options) -> Optional[str]:
        if options.layers and not any(_fnmatch(region.module, p) for p in options.layers):
            return f"not matched by options.mlp.layers {list(options.layers)}"
        return None

    def guard(self, region, options, states, mode):
        if region.facts.get("_activation_out") is None:
            return "no activation output to tap (a mixture-of-experts router, not an MLP)"
        if options.mask_padding and _token_mask(region.output.graph, region.facts["_activation_out"]) is None:
            return ("mask_padding=True, but this graph has no attention_mask input of shape [B, T] matching the "
                    "activation: pass attention_mask to the model, or set mask_padding=False (padding counted)")
        return None

    def planned(self, regions, options, mode):
        stacks: dict[str, int] = {}
        for region in regions:
            stacks[stack_of(region.module)] = stacks.get(stack_of(region.module), 0) + 1
        for region in regions:
            region.facts["stack"] = stack_of(region.module)
            region.facts["_stack_layers"] = stacks[region.facts["stack"]]

    def rewrite(self, gm, region, options, states, mode):
        from ..ops.density import METRIC_KINDS, density_counts, density_per_sample, exact_zeros

        graph = gm.graph
        a = region.facts["_activation_out"]
        like = region.output
        token_mask = _token_mask(graph, a) if options.mask_padding else None
        name = metric_name(mode, region.module)
        a_value = value(a)
        METRIC_KINDS[name] = (region.facts.get("activation"), a_value.dtype if a_value is not None else None)
        region.facts["exact_zeros"] = ("yes" if a_value is None or exact_zeros(region.facts.get("activation"), a_value.dtype)
                                       else f"never in {a_value.dtype} (read density_tau)")
        region.facts["padding"] = "masked" if token_mask is not None else "counted"
        if mode == "eval":
            region.facts["inference"] = self._inference_path(gm, region, options, mode)
            if not region.facts["inference"].startswith("sparse"):
                region.facts["inference_up"] = "dense (as the down projection)"
            elif region.facts["gated"]:
                region.facts["inference_up"] = self._sparse_up(gm, region, options)
            else:  # the zeros come from the up projection itself: only a learned (inexact) predictor could skip it
                region.facts["inference_up"] = "dense (not gated: no exact predictor of the activation's zeros)"
        users = [u for u in region.output.users]
        with graph.inserting_before(region.output.next):  # in order, right after the MLP output
            counts = insert_call(graph, density_counts, (a, float(options.tau), float(options.eps), token_mask),
                                 like=like)
            if mode == "train" and not options.measure_only:
                rho = insert_call(graph, density_per_sample, (a, float(options.eps), token_mask), like=like)
                share = insert_call(graph, stack_share, (rho, 1.0 / region.facts["_stack_layers"]), like=like)
                share = insert_call(graph, torch.ops.sparsify.observe.default, (share, counts, name), like=like)
                out = insert_call(graph, torch.ops.sparsify.aux_loss.default,
                                  (region.output, share, float(options.weight), name), like=like)
            else:
                out = insert_call(graph, torch.ops.sparsify.observe.default, (region.output, counts, name), like=like)
        for user in users:
            user.replace_input_with(region.output, out)
        return out  # what the model now reads in place of the MLP's output (ADA-DEFT gates it)

    def _inference_path(self, gm, region, options, mode) -> str:
        """Rewrite the down projection into sparsify::sparse_down where the options and the layer allow; the
        report's "inference" fact says which path the layer took and why."""
        from ..ops.density import activation_density

        down = region.facts["_match"][2]
        if options.inference == "dense":
            return "dense (options.mlp.inference='dense')"
        if options.inference == "auto":
            measured = activation_density().get(metric_name("train", region.module))
            if measured is None:
                return "dense (auto: no training density measured for this layer in this process)"
            switch, source = options.switch_density, "switch_density"
            if switch is None:
                switch, source = self._device_switch(region, down, options)
                if switch is None:
                    return source
            if measured["density"] > switch:
                return f"dense (auto: density {measured['density']:.2f} > {source} {switch:g})"
        if down.lora_a is not None:
            return "dense (the down projection has a LoRA adapter: merge it first, peft's merge_and_unload)"
        if region.facts.get("dropout_p"):
            return "dense (dropout before the down projection is active)"
        graph = gm.graph
        weight = value(down.weight)
        layout = ("W^T rows" if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.stride(0) == 1
                  else "row-major W: strided gathers; sparsify.prepare with these options stores W^T rows")
        with graph.inserting_before(down.output):
            new = insert_call(graph, torch.ops.sparsify.sparse_down.default,
                              (down.x, down.weight, down.bias, int(options.block_t)), like=down.output)
        new.meta["sparsify_module"] = region.module
        down.output.replace_all_uses_with(new)
        erase_unused([down.output, *down.nodes])
        if region.output is down.output:
            region.output = new
        return f"sparse (block_t={options.block_t}, {layout})"

    @staticmethod
    def _sparse_up(gm, region, options) -> str:
        """A gated MLP: act(gate(x)) * up(x) becomes sparsify::sparse_up, which reads only the up projection's rows
        of the neurons the gate keeps (the gate's zeros are exact zeros of the product: an exact predictor)."""
        up, mul, g = region.facts["_match"][0], region.facts.get("_gated_mul"), region.facts["_activation_out"]
        if mul is None or set(mul.args[:2]) != {g, up.output}:
            return "dense (the gate multiply is not act(gate) * up as a plain product)"
        if up.lora_a is not None:
            return "dense (the up projection has a LoRA adapter: merge it first, peft's merge_and_unload)"
        dtypes = {getattr(value(n), "dtype", None) for n in (g, up.x, up.weight)}
        if len(dtypes) != 1:
            return f"dense (gate, input and weight dtypes differ: {sorted(map(str, dtypes))})"
        graph = gm.graph
        with graph.inserting_before(mul):
            new = insert_call(graph, torch.ops.sparsify.sparse_up.default,
                              (g, up.x, up.weight, up.bias, int(options.block_t)), like=mul)
        new.meta["sparsify_module"] = region.module
        mul.replace_all_uses_with(new)
        erase_unused([mul, up.output, *up.nodes])
        return f"sparse (block_t={options.block_t}: only the rows of the neurons the gate keeps)"

    @staticmethod
    def _device_switch(region, down, options):
        """(switch density, where it comes from), or (None, the report's reason) where the device never pays."""
        from ..ops.sparse_down import modelled_switch
        weight, h = value(down.weight), value(down.x)
        device = weight.device.type if isinstance(weight, torch.Tensor) else "cpu"
        if device != "cuda":
            return None, (f"dense (auto: on {device} the sparse path did not beat dense consistently at any density "
                          "measured, benchmarks/deft_inference.py; set switch_density to force a threshold)")
        tokens = 1
        for d in (h.shape[:-1] if isinstance(h, torch.Tensor) else ()):
            tokens *= int(d) if isinstance(d, int) else 16  # a dynamic size: model a 16-token tile
        rows = weight.dim() == 2 and weight.stride(0) == 1
        switch = modelled_switch(tokens, region.facts["d_model"], region.facts["d_ff"], options.block_t,
                                 weight.element_size(), "rows" if rows else "row_major")
        return switch, f"the H200 roofline's switch for {tokens} tokens (a prediction)"

    def prepare_region(self, ctx, region, options):
        """inference "sparse" / "auto": store the down projection's weight as W^T rows (a [N, F] parameter with
        strides (1, N): the same values, shape and Parameter object), so the sparse kernel's gather of a neuron's
        weights is one contiguous row. Dense matmuls read either layout."""
        if options.inference == "dense":
            ctx.decide(region, "dense", "inference='dense': nothing to prepare")
            return
        down = ctx.model.get_submodule(region.facts["down"])
        down = getattr(down, "base_layer", down)  # peft's wrapper
        weight = getattr(down, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 2:
            ctx.decide(region, "dense", "the down projection has no 2-d weight parameter")
            return
        if type(down).__name__ == "Conv1D":  # GPT-2's [F, N] weight, contiguous: W^T rows already
            if not weight.is_contiguous():
                with torch.no_grad():
                    weight.data = weight.detach().contiguous()
        elif weight.stride(0) != 1:
            with torch.no_grad():
                weight.data = weight.detach().t().contiguous().t()
        ctx.decide(region, "prepared: W^T rows", f"down projection {region.facts['down']} stored as W^T rows "
                   "(strides (1, N)) for the sparse kernel")

    def metrics(self, options, reset: bool = True) -> dict:
        from ..ops.density import activation_density
        return density_log(activation_density(reset=reset))


def density_log(per_layer: dict) -> dict[str, float]:
    """Flat log entries: per layer, per stack (mean over its layers) and overall, per mode."""
    logs, stacks = {}, {}
    for name, m in per_layer.items():
        mode, module = name.split(":", 1)
        logs[f"deft/{mode}/density/{module}"] = m["density"]
        stacks.setdefault((mode, stack_of(module)), []).append(m)
    for (mode, stack), ms in stacks.items():
        for key in ("density", "surrogate", "density_tau"):
            logs[f"deft/{mode}/{key}/{stack}"] = sum(m[key] for m in ms) / len(ms)
    by_mode = {}
    for name, m in per_layer.items():
        by_mode.setdefault(name.split(":", 1)[0], []).append(m)
    for mode, ms in by_mode.items():
        logs[f"deft/{mode}/density"] = sum(m["density"] for m in ms) / len(ms)
    return logs


def _fnmatch(name: str, pattern: str) -> bool:
    import fnmatch
    return fnmatch.fnmatchcase(name, pattern)


DEFT = register(Deft())
