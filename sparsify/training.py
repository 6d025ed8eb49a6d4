"""Training-loop drivers of methods that need the optimizer: MST's MixedSparsity.

    schedule = sparsify.training.MixedSparsity(model, optimizer, options)
    for batch in loader:
        loss = compiled(**batch).loss; loss.backward()
        schedule.step()              # masks the gradients, steps the optimizer (or not, on update steps),
        optimizer.zero_grad()        # re-masks the weights; every delta steps prunes and regrows

What a step does (methods/mst.py holds the rule; this holds the loop):
1. on a topology-update step (every delta steps, before the schedule's end): per layer, the target density from
   the global target (target_sparsity) and the allocation; n_prune = max(n_active * zeta_t, n_active - n_target)
   smallest |w| dropped; n_grow = n_prune - (n_active - n_target) regrown among the inactive weights (those not
   just dropped first) by |dense gradient| and/or uniformly at random, at zero, with their AdamW / Adam moments
   (exp_avg, exp_avg_sq, max_exp_avg_sq) and SGD momentum zeroed: the authors leave AdamW's moments stale.
   torch's Adam keeps one step count per parameter tensor, not per element, so a regrown weight's bias
   correction is its tensor's (its first update is about 0.45 lr instead of lr at the default betas);
2. the gradients are masked (the compiled graph gives dense ones), the optimizer steps unless this is an update
   step and skip_update_step is set (the authors skip it), the weights are re-masked (weight decay and moments
   must not revive a masked weight).

The random draws use one torch.Generator seeded with options.seed and consumed identically on every rank, and
the gradient criterion reads gradients DDP has already averaged: every rank computes the same masks. Masks and
weights change in place, so the compiled graphs never recompile.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from .config import SparsifyConfig
from .methods.mst import MASK, MASK_KIND, drop_fraction, layer_densities, target_sparsity
from .methods.state import modules_with_state
from .steps import _unwrapped

_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


class MixedSparsity:
    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                 options: Union[SparsifyConfig, Mapping[str, Any], None] = None):
        self.config = SparsifyConfig.from_options(options)
        if self.config.linear.method != "mst":
            raise ValueError("sparsify.training.MixedSparsity: options.linear.method must be 'mst', got "
                             f"{self.config.linear.method!r}")
        self.options = self.config.linear
        self.model = _unwrapped(model)
        self.optimizer = optimizer
        self.layers = [(path, module.weight, tensors[MASK]) for path, module, tensors in
                       modules_with_state(self.model, MASK_KIND)]
        if not self.layers:
            raise ValueError("sparsify.training.MixedSparsity: the model has no MST masks; run sparsify.prepare(model, "
                             "..., options=...) with these options first")
        self.shapes = {path: tuple(w.shape) for path, w, _ in self.layers}
        self.generator = torch.Generator().manual_seed(self.options.seed)
        self.steps_done = 0
        self.updates: list[dict] = []  # one record per topology update: step, target, pruned, regrown

    # --- the loop -----------------------------------------------------------------------------------------------
    def step(self) -> None:
        step = self.steps_done
        o = self.options
        update = step > 0 and step % o.delta == 0 and step < o.total_steps
        with torch.no_grad():
            if update:
                self._update_topology(step)
            for _, w, mask in self.layers:
                if w.grad is not None:
                    w.grad.mul_(mask)
        if self.optimizer is not None and not (update and o.skip_update_step):
            self.optimizer.step()
        with torch.no_grad():
            for _, w, mask in self.layers:
                w.mul_(mask)
        self.steps_done += 1

    def densities(self) -> dict[str, float]:
        """Module path -> the share of its weight the mask keeps."""
        return {path: float(mask.float().mean()) for path, _, mask in self.layers}

    def sparsity(self) -> float:
        """The global sparsity over the masked weights."""
        kept = sum(int(mask.sum()) for _, _, mask in self.layers)
        return 1.0 - kept / sum(mask.numel() for _, _, mask in self.layers)

    # --- the topology update ------------------------------------------------------------------------------------
    def _update_topology(self, step: int) -> None:
        o = self.options
        target = target_sparsity(step, o)
        densities = layer_densities({p: (s[0], s[1]) for p, s in self.shapes.items()}, target, o.allocation)
        zeta_t = drop_fraction(step, o)
        record = {"step": step, "target_sparsity": target, "zeta": zeta_t, "pruned": 0, "regrown": 0}
        for path, w, mask in self.layers:
            flat_mask, flat_w = mask.view(-1), w.detach().view(-1)
            n_active = int(flat_mask.sum())
            n_target = int(round(densities[path] * flat_mask.numel()))
            shrink = n_active - n_target  # > 0: the target asks for fewer active weights
            n_prune = min(n_active, max(int(n_active * zeta_t), shrink))
            n_grow = n_prune - shrink
            pruned = self._prune(flat_w, flat_mask, n_prune)
            grown = self._grow(w, flat_mask, pruned, n_grow)
            flat_w[pruned] = 0.0
            flat_w[grown] = 0.0  # regrown weights start at zero
            self._reset_moments(w, grown)
            record["pruned"] += len(pruned)
            record["regrown"] += len(grown)
        self.updates.append(record)

    @staticmethod
    def _prune(flat_w: torch.Tensor, flat_mask: torch.Tensor, n: int) -> torch.Tensor:
        """Drop the n active weights of smallest |w|; their indices."""
        if n <= 0:
            return torch.empty(0, dtype=torch.long, device=flat_w.device)
        active = flat_mask.nonzero().view(-1)
        order = flat_w[active].abs().argsort(stable=True)
        dropped = active[order[:n]]
        flat_mask[dropped] = False
        return dropped

    def _grow(self, w: torch.Tensor, flat_mask: torch.Tensor, just_pruned: torch.Tensor, n: int) -> torch.Tensor:
        """Regrow n inactive weights: by |dense grad|, at random, or 3:1 mixed; among the ones not just pruned
        first, the just pruned only where there are too few others (the layer's count meets its target)."""
        if n <= 0:
            return torch.empty(0, dtype=torch.long, device=flat_mask.device)
        eligible = ~flat_mask
        eligible[just_pruned] = False
        candidates = eligible.nonzero().view(-1)
        chosen = []
        if candidates.numel() < n:  # too few weights were inactive before this update: give some just pruned back
            back = just_pruned[torch.randperm(just_pruned.numel(), generator=self.generator)[: n - candidates.numel()]
                               .to(just_pruned.device)]
            chosen.append(back)
            n = candidates.numel()
        growth = self.options.growth
        grad = w.grad.detach().view(-1) if w.grad is not None else None
        n_grad = 0 if growth == "random" or grad is None else (n if growth == "gradient" else (3 * n) // 4)
        if n_grad:
            top = grad[candidates].abs().argsort(descending=True, stable=True)[:n_grad]
            chosen.append(candidates[top])
            keep = torch.ones(candidates.numel(), dtype=torch.bool, device=candidates.device)
            keep[top] = False
            candidates = candidates[keep]
        n_random = n - n_grad
        if n_random:
            pick = torch.randperm(candidates.numel(), generator=self.generator)[:n_random].to(candidates.device)
            chosen.append(candidates[pick])
        grown = torch.cat(chosen) if chosen else torch.empty(0, dtype=torch.long, device=flat_mask.device)
        flat_mask[grown] = True
        return grown

    def _reset_moments(self, w: torch.Tensor, grown: torch.Tensor) -> None:
        if self.optimizer is None or not len(grown):
            return
        state = self.optimizer.state.get(w, {})
        for key in _MOMENTS:
            buf = state.get(key)
            if isinstance(buf, torch.Tensor) and buf.shape == w.shape:
                buf.view(-1)[grown] = 0

    # --- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done, "generator": self.generator.get_state(), "updates": list(self.updates)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps_done = int(state["steps_done"])
        self.generator.set_state(state["generator"])
        self.updates = list(state.get("updates", []))
