"""sparsify.prepare: create the learned state a sparse method needs, where users look for it.

    sparsify.prepare(model, **example_inputs, options={"attention": {"method": "spt"}})
    compiled = torch.compile(model, backend="sparsify", options={"attention": {"method": "spt"}})

prepare() runs the model once through Dynamo and the region finder, and for every attention region
registers a PQ codebook nn.Parameter `sparsify_pq_codebook` on the attention module (so optimizers,
state_dict, PEFT, DDP and FSDP see it) plus a forward hook that tags the module's output with it
(DESIGN.md decision 5). Calling it again, recompiling, or loading a checkpoint never re-initialises
a codebook that exists: to load one, prepare a fresh model, then load_state_dict.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from .config import SparsifyConfig
from .debug import Report, log
from .backend import trace
from .passes.routed import ROUTER_KIND
from .passes.spt import CODEBOOK_KIND

CODEBOOK = "sparsify_pq_codebook"
ROUTER_WEIGHT, ROUTER_BIAS = "sparsify_router_weight", "sparsify_router_bias"
NEURON_ORDER = "sparsify_neuron_order"
_HOOK = "_sparsify_tag_hook"


def _tag_output(module: nn.Module, args, output):
    """Forward hook: route state into the compiled graph (a no-op outside compile). The hook sits
    on the state's owner, or on one of its children when the owner is the compiled root (the
    root's own hooks run outside the traced frame); the tag name then carries the child's path
    below the owner ("router@up"), so the pass can find the owner's path again."""
    if not torch.compiler.is_compiling():
        return None
    first = output[0] if isinstance(output, tuple) else output
    for owner, kind, names, offset in module.__dict__["_sparsify_tags"]:
        name = f"{kind}@{offset}" if offset else kind
        first = torch.ops.sparsify.tag(first, [getattr(owner, n) for n in names], name)
    return (first, *output[1:]) if isinstance(output, tuple) else first


def attach_state(module: nn.Module, kind: str, make_params, hook_child: str = "") -> bool:
    """Register the parameters of one state kind on `module` unless they exist (so recompiles,
    repeated prepares and loaded checkpoints keep them), and its tag hook once (on the submodule
    `hook_child` when given). `make_params()` returns {attribute name: tensor}; it is only called
    when the state is new. True if created."""
    states = module.__dict__.setdefault("_sparsify_states", {})
    created = False
    if kind not in states:
        params = make_params()
        for name, tensor in params.items():
            if hasattr(module, name):
                continue
            if tensor.is_floating_point():  # learned: a parameter (optimizers, DDP, FSDP see it)
                module.register_parameter(name, nn.Parameter(tensor))
            else:  # an index (e.g. the neuron order): a buffer, saved with the checkpoint
                module.register_buffer(name, tensor)
            created = True
        states[kind] = list(params)
    hooked = module.get_submodule(hook_child) if hook_child else module
    tags = hooked.__dict__.setdefault("_sparsify_tags", [])  # a plain list: no submodule registration
    if not any(owner is module and k == kind for owner, k, _, _ in tags):
        tags.append((module, kind, states[kind], hook_child))
    if not hasattr(hooked, _HOOK):
        setattr(hooked, _HOOK, hooked.register_forward_hook(_tag_output))
    return created


class _Recorder(torch.fx.Interpreter):
    """Runs a densely rewritten graph and keeps, per module path, the q and k each
    sparsify::attention call receives and, when mlp_samples is a dict, what fitting a router needs of each
    sparsify::mlp call (_mlp_sample)."""

    def __init__(self, gm, samples, mlp_samples):
        super().__init__(gm)
        self.samples, self.mlp_samples = samples, mlp_samples

    def run_node(self, n):
        result = super().run_node(n)
        if n.op == "call_function" and n.target in (torch.ops.sparsify.attention.default,
                                                     torch.ops.sparsify.mlp.default):
            args = [self.env[a] if isinstance(a, torch.fx.Node) else a for a in n.args]
            path = n.meta.get("sparsify_module", "")
            if n.target is torch.ops.sparsify.attention.default:
                self.samples[path].append((args[0].detach(), args[1].detach()))
            elif self.mlp_samples is not None:
                self.mlp_samples[path] = _mlp_sample(args)
        return result


# tokens of the example batch kept per MLP for fitting its router (enough for a [d + 1] x blocks ridge fit)
_ROUTER_SAMPLE_TOKENS = 8192


def _mlp_sample(args: list) -> dict:
    """What sparsify.prepare needs of one sparsify::mlp call: the projection the activation reads ([F, d], the
    gate projection of a gated MLP, else the up projection: what neuron clustering groups), and sample inputs
    x [T, d] with their activations [T, F] and the down projection (what fit_router fits to)."""
    from .ops.mlp import mlp_hidden

    x, up_w, up_b, gate_w, gate_b, down_w, _, up_lora_a, up_lora_b, gate_lora_a, gate_lora_b = args[:11]
    with torch.no_grad():
        x2d = x.detach().reshape(-1, x.shape[-1])[:_ROUTER_SAMPLE_TOKENS]
        hidden = mlp_hidden(x2d, up_w, up_b, gate_w, gate_b, up_lora_a, up_lora_b, gate_lora_a, gate_lora_b,
                            args[13], args[14])  # lora_scales, activation
    w, b = (gate_w, gate_b) if gate_w is not None else (up_w, up_b)
    return {"weight": w.detach(), "bias": None if b is None else b.detach(), "x": x2d, "hidden": hidden,
            "down_weight": down_w.detach()}


def kmeans_codebook(vectors: torch.Tensor, codewords: int, iterations: int = 12,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Lloyd's k-means (L2) on [N, d_c] sub-vectors -> [codewords, d_c], seeded from a random sample.

    L2 k-means rather than the L1 used for encoding: the centroid update is a plain mean, and the
    codebook is trained further by the codebook loss anyway.
    """
    n = vectors.shape[0]
    centers = vectors[torch.randperm(n, generator=generator)[:codewords]].clone()
    if centers.shape[0] < codewords:  # fewer samples than codewords: pad with perturbed copies
        extra = centers[torch.randint(0, max(1, centers.shape[0]), (codewords - centers.shape[0],), generator=generator)]
        centers = torch.cat([centers, extra + 1e-3 * torch.randn(extra.shape, generator=generator)])
    for _ in range(iterations):
        assign = torch.cdist(vectors, centers).argmin(dim=1)
        sums = torch.zeros_like(centers).index_add_(0, assign, vectors)
        counts = torch.bincount(assign, minlength=codewords).unsqueeze(1)
        centers = torch.where(counts > 0, sums / counts.clamp(min=1), centers)
    return centers


def init_codebook(samples: list, head_dim: int, subspace_dim: int, codewords: int,
                  max_vectors: int = 16384, seed: int = 0) -> torch.Tensor:
    """A [M, E, d_c] codebook from k-means on the sub-vectors of the recorded q and k (shared, as
    the codebook is: papers.md), per subspace."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.cat([t.reshape(-1, head_dim).float().cpu() for pair in samples for t in pair])
    if rows.shape[0] > max_vectors:
        rows = rows[torch.randperm(rows.shape[0], generator=generator)[:max_vectors]]
    subspaces = rows.reshape(rows.shape[0], head_dim // subspace_dim, subspace_dim)
    return torch.stack([kmeans_codebook(subspaces[:, m], codewords, generator=generator)
                        for m in range(subspaces.shape[1])])


def prepare(model: nn.Module, *args, options: Union[SparsifyConfig, Mapping[str, Any], None] = None,
            **kwargs) -> Report:
    """Attach the state the configured methods need; return the region report of the example call.

    The example call (model(*args, **kwargs)) provides the q/k that initialise each codebook by
    k-means; it runs without gradients and leaves the model's parameters unchanged.
    """
    config = SparsifyConfig.from_options(options)
    # trace with the dense rewrite: it exposes q and k of every attention region by module path
    tracing = dataclasses.replace(config, attention=dataclasses.replace(config.attention, method="dense"),
                                  mlp=dataclasses.replace(config.mlp, method="dense"), inner="eager", strict=False)
    samples: dict = defaultdict(list)
    # MLP activations are only needed to fit routers: no [tokens, d_ff] copies otherwise
    mlp_samples: Optional[dict] = {} if config.mlp.method == "routed" else None
    report = trace(model, args, kwargs, tracing, lambda gm: _Recorder(gm, samples, mlp_samples).run)

    if config.attention.method == "spt" and config.attention.score == "codes":  # "exact" needs no state
        attention = config.attention
        for region in report.by_kind("attention"):
            head_dim = region.facts.get("head_dim")
            if region.decision == "dense" or not head_dim or head_dim % attention.subspace_dim:
                continue  # the pass will report why; nothing to attach
            module = model.get_submodule(region.module)
            weight = next(module.parameters(), None)

            def make_codebook(samples=samples[region.module], head_dim=head_dim, weight=weight):
                codebook = init_codebook(samples, head_dim, attention.subspace_dim, attention.codewords)
                if weight is not None:
                    codebook = codebook.to(device=weight.device, dtype=weight.dtype)
                return {CODEBOOK: codebook}

            # the compiled root's own hooks run outside the traced frame: tag from its q projection
            hook_child = (region.facts.get("q_projection") or "") if region.module == "" else ""
            if attach_state(module, CODEBOOK_KIND, make_codebook, hook_child):
                log.info("prepare: PQ codebook on %s (k-means on %d q/k samples)", region.module,
                         len(samples[region.module]))
    if config.mlp.method == "routed":
        _attach_routers(model, report, config, mlp_samples)
    return report


def _attach_routers(model: nn.Module, report: Report, config: SparsifyConfig, mlp_samples: dict) -> None:
    from .ops.routed import cluster_neurons, fit_router

    mlp = config.mlp
    for region in report.by_kind("mlp"):
        d_ff = region.facts.get("d_ff")
        if region.decision == "dense" or not d_ff or d_ff % mlp.blocks or region.module not in mlp_samples:
            continue  # the pass will report why; nothing to attach
        module = model.get_submodule(region.module)
        sample = mlp_samples[region.module]

        def make_router(sample=sample):
            up_w = sample["weight"]
            if mlp.block_order == "clustered":
                order = cluster_neurons(up_w.float(), mlp.blocks)
            else:
                order = torch.arange(up_w.shape[0], device=up_w.device)
            router_w, router_b = fit_router(sample["x"], sample["hidden"], sample["down_weight"], order, mlp.blocks)
            params = {ROUTER_WEIGHT: router_w.to(up_w.dtype), ROUTER_BIAS: router_b.to(up_w.dtype)}
            if mlp.block_order == "clustered":
                params[NEURON_ORDER] = order
            return params

        # the compiled root's own hooks run outside the traced frame: tag from its up projection
        hook_child = region.facts.get("up", "") if region.module == "" else ""
        if attach_state(module, ROUTER_KIND, make_router, hook_child):
            log.info("prepare: router (%d blocks, %s) on %s", mlp.blocks, mlp.block_order, region.module)
