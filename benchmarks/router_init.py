"""How well a routed FFN's starting router picks blocks, on all-MiniLM-L6-v2's real MLP inputs (CPU, no training).

    python benchmarks/router_init.py

For each MLP of the model, block order (contiguous / clustered) and router initialisation:
  fit        sparsify.prepare's router: sparsify.ops.routed_init.fit_router on the example batch
  mean-rows  sparsify.ops.routed_init.init_router: each block's mean up-projection row (the earlier default)
the top-2-of-4 routed output (gate none: the selection alone) is compared with the dense MLP output:
  error  = || routed - dense || / || dense || over all tokens
and against the oracle that keeps, per token, the 2 blocks with the largest contribution norm (the best a
router ranking by contribution can do). Calibration: the first 8 of sparsify_examples.models.sample_texts(); evaluation
on the same 8 (in-sample) and on the other 8 (held-out). Results: benchmarks/results/router_init_cpu.json / .md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402

from sparsify_examples.models import load_minilm, sample_texts  # noqa: E402
from sparsify.ops.mlp import ACTIVATIONS  # noqa: E402
from sparsify.ops.routed_init import cluster_neurons, fit_router, init_router  # noqa: E402

BLOCKS, TOP_K = 4, 2


def mlp_inputs(model, tokenizer, texts) -> list[torch.Tensor]:
    """Per layer, the input of the MLP's up projection at every non-padding token: [T, d]."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    captured = {}
    hooks = [layer.intermediate.dense.register_forward_hook(
        lambda mod, args, out, i=i: captured.__setitem__(i, args[0].detach()))
        for i, layer in enumerate(model.encoder.layer)]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    keep = batch["attention_mask"].bool().reshape(-1)
    return [captured[i].reshape(-1, captured[i].shape[-1])[keep] for i in range(len(captured))]


def block_outputs(layer, x, order) -> torch.Tensor:
    """[T, blocks, d]: each block's share of the MLP output (down projection without its bias)."""
    up, down = layer.intermediate.dense, layer.output.dense
    hidden = ACTIVATIONS["gelu"](x @ up.weight.T + up.bias)[:, order]
    w = down.weight[:, order]
    t, f = hidden.shape
    return torch.einsum("tbf,obf->tbo", hidden.view(t, BLOCKS, f // BLOCKS), w.view(-1, BLOCKS, f // BLOCKS))


def selection_error(parts, keep_idx) -> float:
    dense = parts.sum(1)
    mask = torch.zeros(parts.shape[:2]).scatter_(1, keep_idx, 1.0)
    return ((parts * mask[..., None]).sum(1) - dense).norm().item() / dense.norm().item()


def run(args) -> dict:
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    model, tokenizer = load_minilm(attn_implementation="sdpa")
    texts = sample_texts()
    calib = mlp_inputs(model, tokenizer, texts[:8])
    held = mlp_inputs(model, tokenizer, texts[8:])
    rows = []
    with torch.no_grad():
        for li, layer in enumerate(model.encoder.layer):
            up, down = layer.intermediate.dense, layer.output.dense
            for block_order in ("contiguous", "clustered"):
                order = cluster_neurons(up.weight, BLOCKS) if block_order == "clustered" else torch.arange(
                    up.weight.shape[0])
                hidden = ACTIVATIONS["gelu"](calib[li] @ up.weight.T + up.bias)
                routers = {"fit": fit_router(calib[li], hidden, down.weight, order, BLOCKS),
                           "mean-rows": init_router(up.weight, up.bias, order, BLOCKS)}
                for setting, x in (("in-sample", calib[li]), ("held-out", held[li])):
                    parts = block_outputs(layer, x, order)
                    row = {"layer": li, "block_order": block_order, "setting": setting, "tokens": x.shape[0],
                           "oracle": selection_error(parts, parts.norm(dim=-1).topk(TOP_K, -1).indices)}
                    for name, (rw, rb) in routers.items():
                        row[name] = selection_error(parts, (x @ rw.T + rb).topk(TOP_K, -1).indices)
                    rows.append(row)
    env = T.finish_environment(T.environment(torch.device("cpu")), torch.device("cpu"), started)
    return {"benchmark": "router initialisation: top-2 of 4 selection error (router_init.py)", "rows": rows,
            "environment": env}


def render(payload) -> str:
    rows = payload["rows"]
    header = ["block order", "setting", "fit (mean over layers)", "mean-rows", "oracle"]
    summary = []
    for order in ("contiguous", "clustered"):
        for setting in ("in-sample", "held-out"):
            sel = [r for r in rows if r["block_order"] == order and r["setting"] == setting]
            summary.append([order, setting] + [f"{statistics.mean(r[k] for r in sel):.3f}"
                                               for k in ("fit", "mean-rows", "oracle")])
    per_layer = [[r["layer"], r["block_order"], r["setting"], f"{r['fit']:.3f}", f"{r['mean-rows']:.3f}",
                  f"{r['oracle']:.3f}"] for r in rows]
    return "\n".join([
        "# Routed FFN: how well the starting router picks 2 of 4 blocks (all-MiniLM-L6-v2, CPU)",
        "",
        "error = ||routed - dense|| / ||dense|| of the MLP output (down-projection bias left out), gate none, "
        "over the non-padding tokens; fit = sparsify.prepare's fit_router on the first 8 sample sentences, "
        "mean-rows = init_router (each block's mean up-projection row), oracle = per token the 2 blocks with "
        "the largest contribution. held-out = the other 8 sentences.",
        "",
        T.markdown_table(header, summary),
        "",
        "## Per layer",
        "",
        T.markdown_table(["layer", "block order", "setting", "fit", "mean-rows", "oracle"], per_layer),
    ])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=T.default_out_dir())
    p.add_argument("--stem", default="router_init_cpu")
    args = p.parse_args(argv)
    payload = run(args)
    markdown = render(payload)
    print(markdown)
    print("wrote", *T.write_results(args.out_dir, args.stem, payload, markdown))
    return payload


if __name__ == "__main__":
    main()
