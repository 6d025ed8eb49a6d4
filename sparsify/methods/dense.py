"""The dense rewrite as a method: each attention region becomes one sparsify::attention call, each MLP region
one sparsify::mlp call, computing exactly what the region computed (passes/dense.py builds the calls).

It is every block's default: the sparse methods start from the same operands, and the tests that compare it
with eager prove the region finder's facts right.
"""
from __future__ import annotations

from ..passes.dense import rewrite_attention, rewrite_mlp
from .base import Method, register


class Dense(Method):
    name = "dense"
    kinds = ("attention", "mlp")
    report_facts = ("kernel",)  # "sdpa": the attention call was lowered to SDPA (passes/lower.py)

    def decision(self, region, options, mode):
        return f"sparsify.{region.kind}"

    def rewrite(self, gm, region, options, states, mode):
        (rewrite_attention if region.kind == "attention" else rewrite_mlp)(gm, region)


DENSE = register(Dense())
