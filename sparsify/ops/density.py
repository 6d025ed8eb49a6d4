"""Activation density: DEFT's surrogate (papers.md section 3) and the exact-zero metric, with sparsify::observe, the
op that records what a compiled forward measured.

    density_per_sample(a, eps, token_mask=None) -> [B]   rho(b) = mean over tokens and features of a^2 / (a^2 + eps)
    density_counts(a, tau, eps, token_mask=None) -> [4]  (non-zeros, sum of a^2/(a^2+eps), |a| <= tau, elements),
                                                         no gradient: what the metrics add up
    y = observe(y, counts, name)                         forward: a copy of y; adds counts to METRICS[name]
    activation_density(reset=False) -> {name: {...}}     the ratios since the last reset, per layer

`a` is the activation output [B, T, F] (or [T, F]: one sample) in the training dtype: the exact-zero count is
taken in that dtype, as the authors measure it (GELU is exactly 0 only where x * Phi(x) underflows). token_mask
[B, T] (nonzero = a real token) leaves padding out of both; None counts every token, as the authors do.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# name (a module path) -> float64 [4] running sums of density_counts (a side effect, for metrics only)
METRICS: dict[str, Tensor] = {}
# name -> the activation and dtype the counts were taken in (exact_zeros() says whether zeros can occur)
METRIC_KINDS: dict[str, tuple] = {}


def _as_batched(a: Tensor) -> Tensor:
    return a.unsqueeze(0) if a.dim() == 2 else a.reshape(a.shape[0], -1, a.shape[-1])


def density_per_sample(a: Tensor, eps: float, token_mask: Optional[Tensor] = None) -> Tensor:
    """[B] fp32: rho(b) = mean over the sample's (real) tokens and the features of a^2 / (a^2 + eps). Its gradient
    is d rho / d a = 2 a eps / (a^2 + eps)^2 / (tokens * features), which autograd derives."""
    a = _as_batched(a).float()
    sq = a * a
    s = sq / (sq + eps)
    per_token = s.mean(dim=-1)  # [B, T]
    if token_mask is None:
        return per_token.mean(dim=-1)
    m = token_mask.reshape(per_token.shape).to(per_token.dtype)
    return (per_token * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)


def density_counts(a: Tensor, tau: float, eps: float, token_mask: Optional[Tensor] = None) -> Tensor:
    """float64 [4]: (non-zero entries, sum of a^2 / (a^2 + eps), entries with |a| <= tau, entries), over the real
    tokens. Detached: metrics, not a loss."""
    with torch.no_grad():
        a = _as_batched(a.detach())
        if token_mask is None:
            keep = None
            elements = torch.scalar_tensor(a.numel(), dtype=torch.float64, device=a.device)
        else:
            keep = token_mask.reshape(a.shape[:-1]).to(torch.bool).unsqueeze(-1)
            elements = keep.sum().to(torch.float64) * a.shape[-1]
        nonzero = a != 0
        small = a.abs() <= tau
        af = a.float()
        s = af * af / (af * af + eps)
        if keep is not None:
            nonzero, small, s = nonzero & keep, small & keep, s * keep
        return torch.stack([nonzero.sum().to(torch.float64), s.sum(dtype=torch.float64),
                            small.sum().to(torch.float64), elements])


@torch.library.custom_op("sparsify::observe", mutates_args=())
def observe(y: Tensor, counts: Tensor, name: str) -> Tensor:
    """A copy of y; adds `counts` to METRICS[name] on every real (not fake) call: the compiled forward's side
    effect, read by activation_density(). Gradient: y's, unchanged (counts get none)."""
    total = METRICS.get(name)
    counts = counts.detach().to(torch.float64)
    METRICS[name] = counts.clone() if total is None or total.device != counts.device else total + counts
    return y.clone()


@observe.register_fake
def _(y, counts, name):
    return torch.empty_like(y)


def _observe_setup_context(ctx, inputs, output):
    ctx.counts_shape, ctx.counts_dtype, ctx.counts_device = inputs[1].shape, inputs[1].dtype, inputs[1].device


def _observe_backward(ctx, grad_y):
    return grad_y, torch.zeros(ctx.counts_shape, dtype=ctx.counts_dtype, device=ctx.counts_device), None


observe.register_autograd(_observe_backward, setup_context=_observe_setup_context)


def exact_zeros(activation: Optional[str], dtype: torch.dtype) -> bool:
    """Whether `activation` in `dtype` gives exact zeros for realistic inputs (|x| <= 10, x != 0): measured on a
    grid in that dtype, not assumed. relu: yes; gelu in fp32 / fp16: yes (x * Phi(x) underflows below about -5.5);
    gelu in bf16 (fp32's exponent range): no; silu: no. Where it is False, the exact density says nothing and the
    |a| <= tau density is the one to read."""
    from ..tables import ACTIVATIONS

    fn = ACTIVATIONS.get(activation or "")
    if fn is None:
        return True  # unknown: measure, do not claim
    x = torch.linspace(-10.0, 10.0, 4001, dtype=torch.float32).to(dtype)
    x = x[x != 0]
    return bool((fn(x) == 0).any())


def activation_density(reset: bool = False) -> dict[str, dict]:
    """Per layer (a module path), what the forwards since the last reset measured: "density" (exact non-zeros /
    entries), "surrogate" (mean a^2 / (a^2 + eps)), "density_tau" (|a| > tau / entries), "entries", and
    "exact_zeros" (whether the activation can be exactly zero in its dtype: if not, read density_tau)."""
    out = {}
    for name, total in list(METRICS.items()):
        nonzero, surrogate, small, entries = (float(v) for v in total.cpu())
        activation, dtype = METRIC_KINDS.get(name, (None, None))
        out[name] = {"density": nonzero / max(entries, 1.0), "surrogate": surrogate / max(entries, 1.0),
                     "density_tau": 1.0 - small / max(entries, 1.0), "entries": int(entries),
                     "exact_zeros": exact_zeros(activation, dtype) if dtype is not None else True}
    if reset:
        METRICS.clear()
    return out
