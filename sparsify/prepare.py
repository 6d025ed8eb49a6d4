"""sparsify.prepare: create the learned state a sparse method needs, where users look for it.

    sparsify.prepare(model, **example_inputs, options={"attention": {"method": "spt"}})
    compiled = torch.compile(model, backend="sparsify", options={"attention": {"method": "spt"}})

prepare() runs the model once through Dynamo and the region finder, and for every attention region
registers a PQ codebook nn.Parameter `sparsify_pq_codebook` on the attention module (so optimizers,
state_dict, PEFT, DDP and FSDP see it) plus a forward hook that tags the module's output with it
(DESIGN.md decision 5); routed MLPs get `sparsify_router_weight/bias` (and `sparsify_neuron_order`).
Calling it again or recompiling never re-initialises state that exists. What was attached, and the
options it was made with, is recorded on model.config.sparsify (config.json after save_pretrained):
prepare on a model reloaded with from_pretrained loads the state from its checkpoint instead of
initialising it (sparsify.load_state does the same explicitly; sparsify/checkpoint.py).
"""
from __future__ import annotations

import dataclasses
import warnings
from collections import defaultdict
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from .config import SparsifyConfig
from .debug import Report, log
from .backend import trace
from .checkpoint import (CODEBOOK, NEURON_ORDER, ROUTER_BIAS, ROUTER_WEIGHT, checkpoint_of, load_state,
                         module_states, read_state_tensors, record_state, state_options)
from .passes.fx_utils import ROOT_PREFIX
from .passes.routed import ROUTER_KIND
from .passes.spt import CODEBOOK_KIND

_HOOK = "_sparsify_tag_hook"


def _tag_output(module: nn.Module, args, output):
    """Forward hook: route state into the compiled graph (a no-op outside compile). The hook sits
    on the state's owner, or on one of its children when the owner is the module of a traced frame (the
    compiled root, or a layer Dynamo resumed in after a graph break: its own hooks run outside the frame); the tag name then carries the child's path
    below the owner ("router@up"), so the pass can find the owner's path again."""
    if not torch.compiler.is_compiling():
        return None
    first = output[0] if isinstance(output, tuple) else output
    # entries hold the owner's parameter and buffer dicts, not the owner: Dynamo would otherwise name the
    # owner (and every module under it) by this path through the hook's list in frames it resumed in
    for kind, names, offset, params, buffers in module.__dict__["_sparsify_tags"]:
        name = f"{kind}@{offset}" if offset else kind
        first = torch.ops.sparsify.tag(first, [params[n] if n in params else buffers[n] for n in names], name)
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
        module.__dict__.setdefault("_sparsify_hooks", {})[kind] = hook_child  # recorded in the checkpoint
    hooked = module.get_submodule(hook_child) if hook_child else module
    tags = hooked.__dict__.setdefault("_sparsify_tags", [])  # a plain list: no submodule registration
    if not any(params is module._parameters and k == kind for k, _, _, params, _ in tags):
        tags.append((kind, states[kind], hook_child, module._parameters, module._buffers))
    if not hasattr(hooked, _HOOK):
        setattr(hooked, _HOOK, hooked.register_forward_hook(_tag_output))
    return created


def detach_state(module: nn.Module, kind: str) -> None:
    """Remove one state kind from `module`: its tensors and its entry in the tag hooks (the hook stays, a
    no-op without entries)."""
    for name in module.__dict__.get("_sparsify_states", {}).pop(kind, ()):
        if hasattr(module, name):
            delattr(module, name)
    module.__dict__.get("_sparsify_hooks", {}).pop(kind, None)
    for hooked in module.modules():
        tags = hooked.__dict__.get("_sparsify_tags")
        if tags:
            tags[:] = [t for t in tags if not (t[3] is module._parameters and t[0] == kind)]


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
    """Attach the state the configured methods need; return the region report of the example call, whose
    decisions say what prepare did per region ("prepared: pq_codebook" / "prepared: router", with the reason
    saying whether it was initialised, loaded from the checkpoint or kept; "dense" with why not).

    The example call (model(*args, **kwargs)) provides the q/k that initialise each codebook by
    k-means; it runs without gradients and leaves the model's parameters unchanged. A model reloaded
    with from_pretrained gets its saved state back from its checkpoint first (model.config.sparsify).
    """
    config = SparsifyConfig.from_options(options)
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):  # torch.compile(model)'s wrapper
        model = model._orig_mod
    restored = _restore_saved_state(model)
    # trace with the dense rewrite: it exposes q and k of every attention region by module path
    tracing = dataclasses.replace(config, attention=dataclasses.replace(config.attention, method="dense"),
                                  mlp=dataclasses.replace(config.mlp, method="dense"), inner="eager", strict=False)
    samples: dict = defaultdict(list)
    # MLP activations are only needed to fit routers: no [tokens, d_ff] copies otherwise
    mlp_samples: Optional[dict] = {} if config.mlp.method == "routed" else None
    frame_roots = {""}  # modules some traced frame belongs to (the root; a layer Dynamo resumed in)

    def record(gm):
        frame_roots.add(gm.meta.get(ROOT_PREFIX, ""))
        return _Recorder(gm, samples, mlp_samples).run

    report = trace(model, args, kwargs, tracing, record)
    if not report.regions:
        warnings.warn(f"sparsify.prepare: no attention or MLP block found in {type(model).__name__}: nothing "
                      "was prepared", stacklevel=2)

    few_samples: list = []  # (module, sub-vectors, codewords) where k-means has fewer samples than codewords
    if config.attention.method == "spt" and config.attention.score == "codes":  # "exact" needs no state
        attention = config.attention
        for region in report.by_kind("attention"):
            head_dim = region.facts.get("head_dim")
            if region.decision in ("dense", "skipped"):
                continue  # unsupported (reason kept) or excluded: nothing to attach
            if not head_dim or head_dim % attention.subspace_dim:
                _decide(region, "dense", f"head_dim {head_dim} is not a multiple of subspace_dim "
                                         f"{attention.subspace_dim}: no codebook attached")
                continue
            module = model.get_submodule(region.module)
            weight = next(module.parameters(), None)
            vectors = sum(t.numel() // head_dim for pair in samples[region.module] for t in pair)

            def make_codebook(samples=samples[region.module], head_dim=head_dim, weight=weight):
                codebook = init_codebook(samples, head_dim, attention.subspace_dim, attention.codewords)
                if weight is not None:
                    codebook = codebook.to(device=weight.device, dtype=weight.dtype)
                return {CODEBOOK: codebook}

            # a frame's own module runs its hooks outside the frame: tag from its q projection
            hook_child = _below(region.facts.get("q_projection"), region.module) if region.module in frame_roots else ""
            created = attach_state(module, CODEBOOK_KIND, make_codebook, hook_child)
            if created:
                log.info("prepare: PQ codebook on %s (k-means on %d q/k sub-vectors)", region.module, vectors)
                if vectors < attention.codewords:
                    few_samples.append((region.module or "<root>", vectors, attention.codewords))
            _decide_prepared(region, module, CODEBOOK_KIND, created, restored,
                             {"subspace_dim": attention.subspace_dim, "codewords": attention.codewords},
                             f"k-means on {vectors} q/k sub-vectors")
    elif config.attention.method == "spt":
        for region in report.by_kind("attention"):
            if region.decision not in ("dense", "skipped"):
                _decide(region, "prepared: nothing needed", "score='exact' ranks keys by q.k: no codebook")
    if few_samples:
        module, vectors, codewords = few_samples[0]
        warnings.warn(f"sparsify.prepare: the example batch gives {module} only {vectors} q/k sub-vectors per "
                      f"subspace for codewords={codewords} ({len(few_samples)} module(s) alike): k-means pads the "
                      "codebook with near-copies of them, so several codewords start as duplicates; pass a larger "
                      "example batch or fewer codewords", stacklevel=2)
    if config.mlp.method == "routed":
        _attach_routers(model, report, config, mlp_samples, restored, frame_roots)
    record_state(model)
    return report


def _below(child: Optional[str], module: str) -> str:
    """`child`'s path relative to `module` ("" when it is not below it)."""
    if not child or not module:
        return child or ""
    return child[len(module) + 1:] if child.startswith(module + ".") else ""


def _decide(region, decision: str, reason: str) -> None:
    region.decision, region.reason = decision, reason


def _decide_prepared(region, module: nn.Module, kind: str, created: bool, restored: set, asked: dict,
                     how: str) -> None:
    """The report row of a region prepare attached (or found) state for: "prepared: <kind>" and where the
    state came from, or "dense" when the state the module already has was made with other options (prepare
    never re-initialises state: the compiled region will stay dense for the same reason, routed_guard)."""
    tensors = {n: getattr(module, n) for n in module.__dict__["_sparsify_states"][kind] if hasattr(module, n)}
    made_with = state_options(kind, tensors)
    differs = {k: (made_with[k], v) for k, v in asked.items() if made_with.get(k) != v}
    if differs:
        prepared = ", ".join(f"{k}={was!r}" for k, (was, _) in differs.items())
        wanted = ", ".join(f"{k}={now!r}" for k, (_, now) in differs.items())
        reason = (f"the module's {kind} was prepared with {prepared}, options ask for {wanted}; prepare keeps "
                  "existing state, so compile with the options it was made with")
        warnings.warn(f"sparsify.prepare: {region.module or '<root>'}: {reason}", stacklevel=3)
        _decide(region, "dense", reason)
    elif created:
        _decide(region, f"prepared: {kind}", f"new: {how}")
    elif (region.module, kind) in restored:
        _decide(region, f"prepared: {kind}", "loaded from the model's checkpoint")
    else:
        _decide(region, f"prepared: {kind}", "kept the state the module already has")


def _restore_saved_state(model: nn.Module) -> set:
    """Load the state model.config.sparsify lists (a model reloaded with from_pretrained, which drops
    the state tensors) from the model's checkpoint, for the modules that lack it. Returns the
    (module path, kind) pairs loaded; warns once when the record names state it cannot find."""
    record = getattr(getattr(model, "config", None), "sparsify", None) or {}
    wanted = {(path, kind) for kind, modules in record.get("state", {}).items() for path in modules}
    missing = wanted - set(module_states(model))
    if not missing:
        return set()
    checkpoint = checkpoint_of(model)
    loaded = set(load_state(model, checkpoint, only_missing=True)) if checkpoint is not None else set()
    if loaded:
        log.warning("sparsify.prepare: loaded the method state of %d module(s) from %s (model.config.sparsify) "
                    "instead of initialising it", len(loaded), checkpoint)
    if missing - loaded:
        path, kind = sorted(missing - loaded)[0]
        warnings.warn(f"sparsify.prepare: model.config.sparsify says {len(missing - loaded)} module(s) had method "
                      f"state (first: {kind} on {path or '<root>'}) that is not in "
                      f"{checkpoint or 'a local checkpoint of the model'}; it is initialised anew. To load it: "
                      "sparsify.load_state(model, <save_pretrained directory, weights file or state dict>)",
                      stacklevel=3)
    return loaded


def _attach_routers(model: nn.Module, report: Report, config: SparsifyConfig, mlp_samples: dict,
                    restored: set, frame_roots: set) -> None:
    from .ops.routed import cluster_neurons, fit_router

    mlp = config.mlp
    for region in report.by_kind("mlp"):
        d_ff = region.facts.get("d_ff")
        if region.decision in ("dense", "skipped"):
            continue  # unsupported (reason kept) or excluded: nothing to attach
        if not d_ff or d_ff % mlp.blocks or region.module not in mlp_samples:
            _decide(region, "dense", f"d_ff {d_ff} is not divisible by blocks={mlp.blocks}: no router attached"
                    if region.module in mlp_samples else "no sample of this MLP in the example call")
            continue
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

        # a frame's own module runs its hooks outside the frame: tag from its up projection
        hook_child = _below(region.facts.get("up"), region.module) if region.module in frame_roots else ""
        created = attach_state(module, ROUTER_KIND, make_router, hook_child)
        if created:
            log.info("prepare: router (%d blocks, %s) on %s", mlp.blocks, mlp.block_order, region.module)
        _decide_prepared(region, module, ROUTER_KIND, created, restored,
                         {"blocks": mlp.blocks, "block_order": mlp.block_order},
                         f"{mlp.blocks} blocks, {mlp.block_order}, fit on {sample['x'].shape[0]} tokens")
