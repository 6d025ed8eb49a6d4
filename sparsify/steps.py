"""Work between optimizer steps: the methods' schedules (MST's phases and mask updates, say), without recompiling.

    steps = sparsify.BetweenSteps(model, options)       # the same options as torch.compile's
    for batch in loader:
        model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
        steps.step()                                    # each scheduled method's between_steps, under no_grad

    trainer.add_callback(steps.trainer_callback())      # the HF Trainer calls it at every step's end

A method's between_steps may only change its state tensors in place (masks, codebooks, a phase counter held in
a tensor): they are inputs of the compiled graphs (methods/state.py), so new values reach the next step
without a recompile, whereas a Python number the rewrite read would be baked into the graph. The recompile
count over steps is a test (tests/methods/test_methods_toy.py).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Union

import torch
from torch import nn

from .config import SparsifyConfig
from .methods import methods_in

log = logging.getLogger("sparsify")  # TORCH_LOGS=sparsify shows it (debug.py registers the name)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The user's module under torch.compile's wrapper and DDP/FSDP-style `.module` wrappers."""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module) and type(model).__name__ in (
                "DistributedDataParallel", "DataParallel", "FullyShardedDataParallel"):
            model = model.module
        else:
            return model


class BetweenSteps:
    """Calls every configured method's between_steps(model, options, step) after each optimizer step, and
    collects the methods' metrics of that step's forwards (last_metrics; logged, and added to the HF Trainer's
    logs by trainer_callback)."""

    def __init__(self, model: nn.Module, options: Union[SparsifyConfig, Mapping[str, Any], None] = None):
        self.model = _unwrapped(model)
        self.config = SparsifyConfig.from_options(options)
        self.scheduled = [(kind, method, section) for kind, method, section in methods_in(self.config)
                          if method.has_schedule]
        self.measuring = [(kind, method, section) for kind, method, section in methods_in(self.config)
                          if method.has_metrics]
        self.steps_done = 0
        self.last_metrics: dict[str, float] = {}

    def step(self) -> None:
        self.steps_done += 1
        with torch.no_grad():
            for _, method, section in self.scheduled:
                method.between_steps(self.model, section, self.steps_done)
        metrics = {}
        for _, method, section in self.measuring:
            metrics.update(method.metrics(section, reset=True))
        self.last_metrics = metrics
        if metrics:
            log.info("step %d: %s", self.steps_done, ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps_done = int(state["steps_done"])

    def trainer_callback(self):
        """A transformers.TrainerCallback that calls step() at the end of every optimizer step and adds the last
        step's metrics to the Trainer's logs (so they reach its loggers: console, TensorBoard, W&B)."""
        from transformers import TrainerCallback

        steps = self

        class SparsifyStepsCallback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                steps.step()
                return control

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs is not None:
                    logs.update(steps.last_metrics)
                return control

        return SparsifyStepsCallback()

    def __repr__(self) -> str:
        names = [f"{kind}:{method.name}" for kind, method, _ in dict.fromkeys(self.scheduled + self.measuring)]
        return f"BetweenSteps({names or 'nothing scheduled'}, steps_done={self.steps_done})"
