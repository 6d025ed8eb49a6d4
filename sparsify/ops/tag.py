"""sparsify::tag: how learned state (a PQ codebook, a router) reaches a compiled graph.

A backend cannot add inputs to a Dynamo graph, so the state is an nn.Parameter registered on the
module it belongs to (where optimizers, state_dict, DDP and FSDP see it), and a forward hook passes
the module's output through this identity op together with the state and the module's path.
Dynamo then lifts the state as an ordinary parameter input; the backend's passes find the tag,
wire the state into the rewritten op by module path, and drop the tag (DESIGN.md, decision 5).
"""
from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("sparsify::tag", mutates_args=())
def tag(x: Tensor, state: list[Tensor], name: str) -> Tensor:
    """Identity on x (a copy: a custom op may not return an alias of its input). `state` are the
    module's tensors of one kind, `name` that kind (e.g. "pq_codebook", "router")."""
    return x.clone()


@tag.register_fake
def _(x, state, name):
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)


def _backward(ctx, grad):
    return grad, None, None


tag.register_autograd(_backward)
