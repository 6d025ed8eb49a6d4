"""Operand packing for the long op signatures: names instead of positions.

sparsify::mlp, sparsify::routed_mlp and their backwards take the MLP's 13 tensors and the LoRA scales in one
schema order. MLPOperands is that order as a NamedTuple, so a pass builds it by name, `*operands` passes it to
the op, and a reader of a call's arguments (prepare's recorder, a backward's needs_input_grad) names what it
reads instead of counting (args[13] was the LoRA scales; needs[k + 6] the LoRA A of projection k).
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
