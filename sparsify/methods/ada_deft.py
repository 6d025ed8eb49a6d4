"""ADA-DEFT, reconstructed: DEFT plus a learned gate per MLP layer that lets inference skip whole MLPs.

    sparsify.prepare(model, **batch, options={"mlp": {"method": "ada_deft"}})   # a gate per MLP (value 1)
    compiled = torch.compile(model, backend="sparsify", options={"mlp": {"method": "ada_deft"}})

The authors publish no code and no exact form for ADA-DEFT ("learns layer-wise weights and, at inference, skips
MLP blocks according to them", papers.md section 3). This is OUR reconstruction, not theirs:

- each selected MLP gets a scalar parameter s_l (the module attribute sparsify_ada_gate_logit, 0 at prepare);
  its gate g_l = 2 * sigmoid(gate_scale * s_l) is exactly 1 at the start (the model is unchanged until training
  moves it) and scales the MLP's output: y_l = g_l * MLP_l(x). gate_scale (10) is there because an optimizer
  such as Adam moves a scalar by about lr per step: at lr 5e-4 an unscaled logit moves 0.2 in 400 steps, and
  the gate could not leave 1 within a fine-tuning run;
- training adds DEFT's density loss unchanged and a gate penalty gate_weight * mean_l g_l (per stack, like
  the density term) through the shared auxiliary-loss op: layers the task can do without drift to small gates;
- eval graphs skip every MLP whose gate is below skip_below (its output is zero: in a residual block only the
  skip connection remains; neither projection runs) and scale the others by their gate. The skip set is read
  from the gates' values when the eval graph is compiled (fx_utils.real_value) and shown in the report: train
  more and call torch._dynamo.reset() before evaluating again, or the eval graph keeps the old skip set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import real
from ..passes.fx_utils import erase_unused, insert_call, real_value, shape
from .base import StateKind, register
from .deft import Deft, DeftOptions, metric_name

ADA_NAME = "ada_deft"
GATE_KIND = "ada_gate"
GATE_LOGIT = "sparsify_ada_gate_logit"
GATE_STATE = StateKind(GATE_KIND, (GATE_LOGIT,))


@dataclass
class AdaDeftOptions(DeftOptions):
    """ADA-DEFT's fields of options.mlp (with method="ada_deft"), besides DEFT's.

    gate_weight: the gate penalty's weight (mean over a stack's layers of g_l), a real >= 0
    skip_below:  eval graphs skip an MLP whose gate g_l = 2 sigmoid(gate_scale s_l) is below this, a real in
                 [0, 2] (0: never skip)
    gate_scale:  how fast the gate moves with its logit, a real > 0
    """
    gate_weight: float = real(0.05, low=0.0)
    skip_below: float = real(0.5, low=0.0, high=2.0)
    gate_scale: float = real(10.0, low=0.0, low_open=True)


def layer_gate(logit: torch.Tensor, scale: float) -> torch.Tensor:
    """g = 2 sigmoid(scale * s): 1 at s = 0, in (0, 2)."""
    return 2.0 * torch.sigmoid(logit * scale)


def gate_values(model: torch.nn.Module, gate_scale: float = AdaDeftOptions.gate_scale) -> dict[str, float]:
    """Module path -> the current gate g_l of every MLP ADA-DEFT prepared (what eval would skip below)."""
    from .state import modules_with_state
    return {path: float(layer_gate(tensors[GATE_LOGIT].detach(), gate_scale)) for path, _, tensors in
            modules_with_state(model, GATE_KIND)}


def _gated(out: torch.Tensor, logit: torch.Tensor, gate_scale: float) -> torch.Tensor:
    return out * layer_gate(logit, gate_scale).to(out.dtype)


def _gate_share(logit: torch.Tensor, gate_scale: float, share: float) -> torch.Tensor:
    return layer_gate(logit, gate_scale) * share


class AdaDeft(Deft):
    name = ADA_NAME
    options = AdaDeftOptions
    state = (GATE_STATE,)
    needs_prepare = True
    report_facts = Deft.report_facts + ("gate",)

    def decision(self, region, options, mode):
        if mode == "train" and not options.measure_only:
            return "ada_deft (density + gate loss)"
        return "ada_deft (gated)"

    def guard(self, region, options, states, mode):
        if states.get((region.module, GATE_KIND)) is None:
            return "no layer gate on this MLP: run sparsify.prepare(model, ..., options=...) with these options first"
        return super().guard(region, options, states, mode)

    def prepare_region(self, ctx, region, options):
        if options.inference != "dense":
            super().prepare_region(ctx, region, options)  # DEFT's W^T rows for the sparse down projection
        weight = getattr(ctx.model.get_submodule(region.facts["up"]), "weight", None)
        dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
        device = weight.device if isinstance(weight, torch.Tensor) else None

        def make_gate():
            return {GATE_LOGIT: torch.zeros((), dtype=dtype, device=device)}

        created = ctx.attach(region, GATE_KIND, make_gate, ctx.hook_child(region, region.facts.get("up")))
        ctx.decide_prepared(region, GATE_KIND, created, {}, "gate 1 (logit 0)")

    def rewrite(self, gm, region, options, states, mode):
        logit = states[(region.module, GATE_KIND)][0]
        if mode == "eval":
            reason = self._skip(region, options, logit)
            if reason is not None and reason.startswith("skipped"):
                region.facts["gate"] = reason
                region.decision = "ada_deft (skipped)"
                self._skip_region(gm, region)
                return
            region.facts["gate"] = reason
        # DEFT: tap (+ loss in training, + sparse inference); the gate scales what the model reads after the tap
        out = super().rewrite(gm, region, options, states, mode)
        graph = gm.graph
        users = list(out.users)
        with graph.inserting_after(out):
            gated = insert_call(graph, _gated, (out, logit, float(options.gate_scale)), like=region.output)
            if mode == "train" and not options.measure_only:
                with graph.inserting_after(gated):
                    share = insert_call(graph, _gate_share, (logit, float(options.gate_scale),
                                                             1.0 / region.facts["_stack_layers"]), like=gated)
                with graph.inserting_after(share):
                    gated_out = insert_call(graph, torch.ops.sparsify.aux_loss.default,
                                            (gated, share, float(options.gate_weight),
                                             metric_name(mode, region.module) + "#gate"), like=gated)
            else:
                gated_out = gated
        for user in users:
            user.replace_input_with(out, gated_out)
        if mode == "train":
            region.facts["gate"] = f"learned (2 sigmoid({options.gate_scale:g} logit))"

    @staticmethod
    def _skip(region, options, logit) -> Optional[str]:
        real = real_value(logit)
        if real is None:
            return "kept (the gate's value is not known when compiling)"
        g = float(layer_gate(real.detach().float(), options.gate_scale))
        if options.skip_below > 0 and g < options.skip_below:
            return f"skipped (gate {g:.3f} < skip_below {options.skip_below:g})"
        return f"kept (gate {g:.3f})"

    @staticmethod
    def _skip_region(gm, region) -> None:
        """The MLP's output becomes zeros shaped like its input (a transformer FFN returns to d_model); nothing of
        it runs."""
        up = region.facts["_match"][0]
        graph = gm.graph
        if shape(up.x) != shape(region.output):
            region.facts["gate"] += ", but the output's shape differs from the input's: not skipped"
            region.decision = "ada_deft (gated)"
            return
        with graph.inserting_before(region.output):
            zeros = insert_call(graph, torch.zeros_like, (up.x,), like=region.output)
        region.output.replace_all_uses_with(zeros)
        erase_unused([region.output, *region.interior])
        region.output = zeros


ADA_DEFT = register(AdaDeft())
