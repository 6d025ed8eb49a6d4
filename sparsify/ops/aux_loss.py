"""sparsify::aux_loss: how a method adds an auxiliary loss without touching the user's training loop
(DESIGN.md decision 6; SPT's codebook loss today, DEFT's density loss next).

    out = aux_loss(y, aux, weight, name)   # forward: a copy of y; backward: y's gradient, and `weight` as aux's

so training on the task loss alone gives the gradient of task_loss + weight * aux, and the model's outputs are
unchanged. Each real call records aux (a copy) under `name` in AUX_LOSSES, which sparsify.aux_losses() reads, for
logging: the last value per name wins; under torch.compile it is recorded when the compiled forward runs.
"""
from __future__ import annotations

import torch
from torch import Tensor

# the last auxiliary value per name (a side effect, for logging only)
AUX_LOSSES: dict[str, Tensor] = {}


@torch.library.custom_op("sparsify::aux_loss", mutates_args=())
def aux_loss(y: Tensor, aux: Tensor, weight: float, name: str) -> Tensor:
    """Returns a copy of y; backward adds weight * d(aux) to the gradient (aux's incoming grad is `weight`).

    So training on task_loss alone gives the gradient of task_loss + weight * aux, without changing the
    model's outputs. Side effect: AUX_LOSSES[name] = aux.detach() on every real (not fake) call, for
    logging; the last value wins. Under torch.compile it runs when the compiled forward runs.
    """
    # a copy: under Inductor `aux` lives in a buffer the compiled graph reuses for later values
    AUX_LOSSES[name] = aux.detach().clone()
    return y.clone()


@aux_loss.register_fake
def _(y, aux, weight, name):
    return torch.empty_like(y)


def _aux_setup_context(ctx, inputs, output):
    _, aux, weight, _ = inputs
    ctx.weight = weight
    ctx.aux_shape, ctx.aux_dtype, ctx.aux_device = aux.shape, aux.dtype, aux.device


def _aux_backward(ctx, grad_y):
    grad_aux = torch.full(ctx.aux_shape, ctx.weight, dtype=ctx.aux_dtype, device=ctx.aux_device)
    return grad_y, grad_aux, None, None


aux_loss.register_autograd(_aux_backward, setup_context=_aux_setup_context)


def aux_losses() -> dict[str, float]:
    """The auxiliary losses the last forward recorded, name (a module path) -> value, for logging."""
    return {name: float(value) for name, value in AUX_LOSSES.items()}
