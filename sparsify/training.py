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
from .methods.hsa import ACTIVE, HEADS, HSA_KIND, pattern_density
from .methods.mst import (BLOCKS, BLOCKS_KIND, GRAD_BLOCKS, MASK, MASK_KIND, drop_fraction, layer_densities,
                          target_sparsity)
from .methods.state import modules_with_state
from .steps import _unwrapped

_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


class _Layer:
    """One masked weight. `mask` is bool, in the weight's own layout: the weight's shape (unstructured) or one
    entry per block [R, C] (block mode; `grad_blocks` alike). The topology update works on units (an element, or
    a block of br x bc), scored by the sum of |w| or |grad| over the unit."""

    def __init__(self, path: str, weight: nn.Parameter, mask: torch.Tensor, grad_blocks: Optional[torch.Tensor]):
        self.path, self.weight, self.mask, self.grad_blocks = path, weight, mask, grad_blocks
        self.unit = (weight.shape[0] // mask.shape[0], weight.shape[1] // mask.shape[1])
        self.unit_size = self.unit[0] * self.unit[1]

    def unit_scores(self, t: torch.Tensor) -> torch.Tensor:
        """|t| summed per unit, flat (the mask's order)."""
        if self.unit_size == 1:
            return t.detach().abs().reshape(-1)
        (r, c), (br, bc) = self.mask.shape, self.unit
        return t.detach().abs().reshape(r, br, c, bc).sum(dim=(1, 3)).reshape(-1)

    def elements(self, units: torch.Tensor) -> torch.Tensor:
        """A bool of the mask's shape as one of the weight's shape."""
        if self.unit_size == 1:
            return units
        return units.repeat_interleave(self.unit[0], 0).repeat_interleave(self.unit[1], 1)

    def apply_mask(self, t: torch.Tensor) -> None:
        """t (the weight or its gradient) *= the mask, in place."""
        if self.unit_size == 1:
            t.mul_(self.mask)
        else:
            (r, c), (br, bc) = self.mask.shape, self.unit
            t.view(r, br, c, bc).mul_(self.mask[:, None, :, None])

    def kept(self) -> int:
        return int(self.mask.sum()) * self.unit_size


class MixedSparsity:
    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                 options: Union[SparsifyConfig, Mapping[str, Any], None] = None, tokens_per_step: Optional[int] = None,
                 seq_len: Optional[int] = None):
        self.config = SparsifyConfig.from_options(options)
        if self.config.linear.method != "mst":
            raise ValueError("sparsify.training.MixedSparsity: options.linear.method must be 'mst', got "
                             f"{self.config.linear.method!r}")
        self.options = self.config.linear
        self.model = _unwrapped(model)
        self.optimizer = optimizer
        self.layers = [_Layer(path, module.weight, tensors[MASK], None)
                       for path, module, tensors in modules_with_state(self.model, MASK_KIND)]
        self.layers += [_Layer(path, module.weight, tensors[BLOCKS], tensors[GRAD_BLOCKS])
                        for path, module, tensors in modules_with_state(self.model, BLOCKS_KIND)]
        if not self.layers:
            raise ValueError("sparsify.training.MixedSparsity: the model has no MST masks; run sparsify.prepare(model, "
                             "..., options=...) with these options first")
        self.shapes = {layer.path: tuple(layer.weight.shape) for layer in self.layers}
        self.generator = torch.Generator().manual_seed(self.options.seed)
        self.steps_done = 0
        self.updates: list[dict] = []  # one record per topology update: step, target, pruned, regrown
        self.tokens_per_step, self.seq_len = tokens_per_step, seq_len
        # HSA (options.attention.method "hsa"): the attention modules' on/off flags and (heads, head_dim)
        self.hsa = self.config.attention if self.config.attention.method == "hsa" else None
        self.attention = [(path, tensors[ACTIVE], tuple(int(v) for v in tensors[HEADS]))
                          for path, _, tensors in modules_with_state(self.model, HSA_KIND)] if self.hsa else []
        self.flop_totals = {"forward": 0.0, "backward": 0.0, "dense_gradient": 0.0, "dense_model": 0.0, "steps": 0,
                            "tokens": 0, "attention_forward": 0.0, "attention_dense_forward": 0.0}
        self._between_steps()

    # --- the loop -----------------------------------------------------------------------------------------------
    def step(self, tokens: Optional[int] = None, seq_len: Optional[int] = None) -> None:
        """After backward: update the topology (on update steps), mask the gradients, step the optimizer (unless
        skipped), re-mask the weights. `tokens`: this step's tokens, `seq_len` its sequence length (attention), for
        the FLOP account (defaults: the constructor's tokens_per_step and seq_len)."""
        update = self.before_optimizer(tokens, seq_len)
        if self.optimizer is not None and not (update and self.options.skip_update_step):
            self.optimizer.step()
        self.after_optimizer()

    def before_optimizer(self, tokens: Optional[int] = None, seq_len: Optional[int] = None) -> bool:
        """The part before the optimizer step (the HF Trainer's on_pre_optimizer_step); True on an update step."""
        step = self.steps_done
        update = self.is_update_step(step)
        with torch.no_grad():
            self._account(tokens if tokens is not None else self.tokens_per_step, update, seq_len)
            if update:
                self._update_topology(step)
            for layer in self.layers:
                if layer.weight.grad is not None:
                    layer.apply_mask(layer.weight.grad)
        return update

    def after_optimizer(self) -> None:
        """The part after it (the HF Trainer's on_optimizer_step): masked weights back to exactly zero."""
        with torch.no_grad():
            for layer in self.layers:
                layer.apply_mask(layer.weight)
        self.steps_done += 1
        self._between_steps()

    def is_update_step(self, step: int) -> bool:
        o = self.options
        return step > 0 and step % o.delta == 0 and step < o.total_steps

    def hsa_active(self, step: int) -> bool:
        """Whether HSA's pattern applies at `step`: always, or inside MST's ultra-sparse phase."""
        if self.hsa is None:
            return False
        if self.hsa.active == "always":
            return True
        o = self.options
        return o.warmup_end * o.total_steps <= step < o.ultra_end * o.total_steps

    def _between_steps(self) -> None:
        """Set what the next forward and backward read (in place: graph inputs, no recompile). Block mode: the weight
        gradient of every block on a topology-update step (the growth criterion reads it), of the kept blocks only
        otherwise. HSA: the pattern's flag for the next step's phase."""
        dense = self.is_update_step(self.steps_done)
        active = self.hsa_active(self.steps_done)
        with torch.no_grad():
            for layer in self.layers:
                if layer.grad_blocks is not None:
                    layer.grad_blocks.fill_(True) if dense else layer.grad_blocks.copy_(layer.mask)
            for _, flag, _ in self.attention:
                flag.fill_(active)

    def trainer_callback(self):
        """A transformers.TrainerCallback running before_optimizer / after_optimizer around the Trainer's optimizer
        step. The Trainer always steps its optimizer: skip_update_step cannot be honoured there (warned once)."""
        import warnings
        from transformers import TrainerCallback

        schedule = self
        if self.options.skip_update_step:
            warnings.warn("sparsify.training.MixedSparsity: under the HF Trainer the optimizer steps on topology-update "
                          "steps too (options.linear.skip_update_step=True cannot be honoured there)", stacklevel=2)

        class MixedSparsityCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
                if schedule.optimizer is None:
                    schedule.optimizer = optimizer  # the Trainer builds it: the moments of regrown weights are reset

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                schedule.before_optimizer()

            def on_optimizer_step(self, args, state, control, **kwargs):
                schedule.after_optimizer()

        return MixedSparsityCallback()

    # --- FLOPs, the paper's accounting -------------------------------------------------------------------------
    def _account(self, tokens: Optional[int], update: bool, seq_len: Optional[int] = None) -> None:
        """Per step, the paper's accounting. Masked projections: forward 2 T N d, backward twice that (input and
        weight gradients at the mask's density), plus the dense weight gradient's remainder 2 T N (1 - d) on update
        steps; the dense model: 3 * 2 T N. Attention (with HSA and a known sequence length L): forward 4 H D per
        visible (query, key) pair, L (L + 1) / 2 causal pairs per sequence times the pattern's density while it is
        active, backward twice the forward; the dense model: 3 times the dense causal forward. In the unstructured
        mode the matmuls actually run dense: these are the FLOPs a sparse kernel would run, as the paper counts;
        the block mode and HSA's kernels skip them."""
        per_token = {"forward": 0.0, "backward": 0.0, "dense_gradient": 0.0, "dense_model": 0.0}
        for layer in self.layers:
            n, kept = layer.weight.numel(), float(layer.kept())
            per_token["forward"] += 2 * kept
            per_token["backward"] += 4 * kept
            per_token["dense_gradient"] += 2 * (n - kept) if update else 0.0
            per_token["dense_model"] += 6 * n
        seq_len = seq_len or self.seq_len
        if self.attention and seq_len:
            density = pattern_density(seq_len, self.hsa) if self.hsa_active(self.steps_done) else 1.0
            pairs_per_token = (seq_len + 1) / 2  # L (L + 1) / 2 causal pairs per sequence of L tokens
            dense_fwd = sum(4 * heads * head_dim * pairs_per_token for _, _, (heads, head_dim) in self.attention)
            per_token["attention_forward"] = dense_fwd * density
            per_token["attention_dense_forward"] = dense_fwd
            per_token["forward"] += dense_fwd * density
            per_token["backward"] += 2 * dense_fwd * density
            per_token["dense_model"] += 3 * dense_fwd
        scale = float(tokens) if tokens else 1.0
        for key, value in per_token.items():
            self.flop_totals[key] += value * scale
        self.flop_totals["steps"] += 1
        self.flop_totals["tokens"] += int(tokens or 0)

    def flops(self) -> dict:
        """Totals so far (per token where no token counts were given), and the ratio of the dense model's training
        FLOPs to MST's over the masked projections."""
        t = dict(self.flop_totals)
        sparse = t["forward"] + t["backward"] + t["dense_gradient"]
        t["mst_total"] = sparse
        t["dense_over_mst"] = t["dense_model"] / sparse if sparse else None
        dense_attention = t.pop("attention_dense_forward")
        t["attention_density"] = t.pop("attention_forward") / dense_attention if dense_attention else None
        t["unit"] = "FLOPs" if self.tokens_per_step or t["tokens"] else "FLOPs per token (summed over steps)"
        return t

    def densities(self) -> dict[str, float]:
        """Module path -> the share of its weight the mask keeps."""
        return {layer.path: float(layer.mask.float().mean()) for layer in self.layers}

    def sparsity(self) -> float:
        """The global sparsity over the masked weights."""
        return 1.0 - sum(layer.kept() for layer in self.layers) / sum(layer.weight.numel() for layer in self.layers)

    # --- the topology update ------------------------------------------------------------------------------------
    def _update_topology(self, step: int) -> None:
        o = self.options
        target = target_sparsity(step, o)
        densities = layer_densities({p: (s[0], s[1]) for p, s in self.shapes.items()}, target, o.allocation)
        zeta_t = drop_fraction(step, o)
        record = {"step": step, "target_sparsity": target, "zeta": zeta_t, "pruned": 0, "regrown": 0}
        for layer in self.layers:
            w, flat_mask = layer.weight, layer.mask.view(-1)
            n_active = int(flat_mask.sum())
            n_target = int(round(densities[layer.path] * flat_mask.numel()))
            shrink = n_active - n_target  # > 0: the target asks for fewer active units
            n_prune = min(n_active, max(int(n_active * zeta_t), shrink))
            n_grow = n_prune - shrink
            pruned = self._prune(layer.unit_scores(w), flat_mask, n_prune)
            grad = None if w.grad is None else layer.unit_scores(w.grad)
            grown = self._grow(grad, flat_mask, pruned, n_grow)
            changed = torch.zeros_like(flat_mask)
            changed[pruned] = True
            changed[grown] = True
            w.detach()[layer.elements(changed.view(layer.mask.shape))] = 0.0  # pruned: zero; regrown: start at zero
            regrown = torch.zeros_like(flat_mask)
            regrown[grown] = True
            self._reset_moments(w, layer.elements(regrown.view(layer.mask.shape)))
            record["pruned"] += len(pruned) * layer.unit_size
            record["regrown"] += len(grown) * layer.unit_size
        self.updates.append(record)

    @staticmethod
    def _prune(scores: torch.Tensor, flat_mask: torch.Tensor, n: int) -> torch.Tensor:
        """Drop the n active units of smallest |w|; their indices."""
        if n <= 0:
            return torch.empty(0, dtype=torch.long, device=scores.device)
        active = flat_mask.nonzero().view(-1)
        order = scores[active].argsort(stable=True)
        dropped = active[order[:n]]
        flat_mask[dropped] = False
        return dropped

    def _grow(self, grad: Optional[torch.Tensor], flat_mask: torch.Tensor, just_pruned: torch.Tensor,
              n: int) -> torch.Tensor:
        """Regrow n inactive units: by |dense grad| (`grad`: the units' scores), at random, or 3:1 mixed; among the
        ones not just pruned first, the just pruned only where there are too few others (the layer's count meets
        its target)."""
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
        n_grad = 0 if growth == "random" or grad is None else (n if growth == "gradient" else (3 * n) // 4)
        if n_grad:
            top = grad[candidates].argsort(descending=True, stable=True)[:n_grad]
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
        """Zero the optimizer moments of the regrown weights (`grown`: a bool of w's shape)."""
        if self.optimizer is None:
            return
        state = self.optimizer.state.get(w, {})
        for key in _MOMENTS:
            buf = state.get(key)
            if isinstance(buf, torch.Tensor) and buf.shape == w.shape:
                buf[grown] = 0

    # --- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done, "generator": self.generator.get_state(), "updates": list(self.updates),
                "flop_totals": dict(self.flop_totals)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps_done = int(state["steps_done"])
        self.generator.set_state(state["generator"])
        self.updates = list(state.get("updates", []))
        self.flop_totals.update(state.get("flop_totals", {}))
