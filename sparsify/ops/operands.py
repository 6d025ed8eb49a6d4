"""Operand packing for the long op signatures: names instead of positions.

sparsify::mlp, sparsify::routed_mlp and their backwards take the MLP's 13 tensors and the LoRA scales in one
schema order. MLPOperands is that order as a NamedTuple, so a pass builds it by name, `*operands` passes it to
the op, and a reader of a call's arguments (prepare's recorder, a backward's needs_input_grad) names what it
reads instead of counting (args[13] was the LoRA scales; needs[k + 6] the LoRA A of projection k).

RoutedTensors is the `tensors` list of sparsify::routed_mlp_backward: the MLP's 13 tensors, then the router
and the neuron order (16, without the LoRA scales), named the way ops/routed.py names its arguments.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

PROJECTIONS = ("up", "gate", "down")


class MLPOperands(NamedTuple):
    x: Any
    up_weight: Any
    up_bias: Optional[Any]
    gate_weight: Optional[Any]
    gate_bias: Optional[Any]
    down_weight: Any
    down_bias: Optional[Any]
    up_lora_a: Optional[Any]
    up_lora_b: Optional[Any]
    gate_lora_a: Optional[Any]
    gate_lora_b: Optional[Any]
    down_lora_a: Optional[Any]
    down_lora_b: Optional[Any]
    lora_scales: Any  # [up, gate, down] floats

    @classmethod
    def of(cls, values) -> "MLPOperands":
        """The operands at the head of an op call's arguments (or of its backward's needs_input_grad flags)."""
        return cls(*list(values)[:len(cls._fields)])

    def projection(self, name: str) -> tuple:
        """(weight, bias, lora_a, lora_b) of projection `name` ("up", "gate" or "down")."""
        return (getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias"),
                getattr(self, f"{name}_lora_a"), getattr(self, f"{name}_lora_b"))

    def lora_scale(self, name: str) -> float:
        return self.lora_scales[PROJECTIONS.index(name)]


MLP_OPERANDS = len(MLPOperands._fields)  # the activation name follows them in every MLP op's schema


ROUTER_FIELDS = ("router_w", "router_b", "neuron_order")  # after lora_scales in sparsify::routed_mlp's schema


class RoutedTensors(NamedTuple):
    """The 16 tensors of sparsify::routed_mlp, in the order of its backward's `tensors` list (and of the
    gradients it returns). A field may hold anything per tensor: the tensor, its shape, a needs flag."""
    x: Any
    up_w: Any
    up_b: Optional[Any]
    gate_w: Optional[Any]
    gate_b: Optional[Any]
    down_w: Any
    down_b: Optional[Any]
    up_lora_a: Optional[Any]
    up_lora_b: Optional[Any]
    gate_lora_a: Optional[Any]
    gate_lora_b: Optional[Any]
    down_lora_a: Optional[Any]
    down_lora_b: Optional[Any]
    router_w: Any
    router_b: Optional[Any]
    neuron_order: Optional[Any]

    @classmethod
    def of_call(cls, values) -> "RoutedTensors":
        """The tensors among sparsify::routed_mlp's leading arguments (x .. down_lora_b, lora_scales, router_w,
        router_b, neuron_order), or the matching needs_input_grad flags: lora_scales is left out."""
        values = list(values)
        *mlp_tensors, _lora_scales = MLPOperands.of(values)
        return cls(*mlp_tensors, *values[MLP_OPERANDS:MLP_OPERANDS + len(ROUTER_FIELDS)])

    def call_order(self, lora_scales) -> tuple:
        """Back to sparsify::routed_mlp's argument order, lora_scales in its place (before the router)."""
        mlp = tuple(getattr(self, f) for f in self._fields if f not in ROUTER_FIELDS)
        return (*mlp, lora_scales, *(getattr(self, f) for f in ROUTER_FIELDS))

    def grad_needs(self, needs_grad) -> dict[str, bool]:
        """Which gradients to compute, by field: asked for (needs_grad, in field order; missing flags: no) and
        the tensor present; never the neuron order (an index)."""
        flags = list(needs_grad) + [False] * (len(self._fields) - len(needs_grad))
        needs = {f: bool(n) and t is not None for f, t, n in zip(self._fields, self, flags)}
        needs["neuron_order"] = False
        return needs


def projection_fields(name: str) -> tuple[str, str, str, str]:
    """RoutedTensors' field names (weight, bias, LoRA A, LoRA B) of projection `name` ("up", "gate" or "down")."""
    return f"{name}_w", f"{name}_b", f"{name}_lora_a", f"{name}_lora_b"
