"""The main example: compile a real pretrained model with backend="sparsify" and compare with eager.

    python examples/quickstart.py                    # all-MiniLM-L6-v2 (BERT, 22.7M), offline
    python examples/quickstart.py --model smollm2    # SmolLM2-135M-Instruct (Llama, from GGUF)

Part 1 prints the match table (every attention and MLP block, where it lives, what it became) and
how the compiled model's outputs and gradients compare with eager PyTorch (the dense backbone).
Part 2 turns on the sparse methods on a longer batch: SPT attention (each query keeps 1/8 of the
keys) and the routed FFN (each token runs through 2 of 4 neuron blocks), shows the new table, the
forward FLOPs against dense (sparsify.flops_by_block) and one training step.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import sparsify  # noqa: E402
from sparsify_examples.models import load_minilm, load_smollm2, sample_texts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    parser.add_argument("--inner", choices=["inductor", "aot_eager"], default="inductor",
                        help="compiler for everything after the sparsify passes")
    args = parser.parse_args()

    load = load_minilm if args.model == "minilm" else load_smollm2
    model, tokenizer = load(attn_implementation="sdpa")
    batch = tokenizer(sample_texts()[:8], padding=True, return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    print(f"model: {args.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"batch {tuple(batch['input_ids'].shape)} (padded)\n")

    # what the backend finds and does, before compiling for real
    report = sparsify.explain(model, **inputs)
    print()

    def logits(out):
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    def median_s(fn, calls=5):
        """Median wall time of `calls` calls after the ones already made: one call is mostly noise (caches,
        allocator, thread pools warming up) and reads as a slowdown that is not there."""
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    compiled = torch.compile(model, backend="sparsify", options={"inner": args.inner})
    with torch.no_grad():
        reference = logits(model(**inputs))
        start = time.perf_counter()
        first = logits(compiled(**inputs))
        compile_s = time.perf_counter() - start
        out = logits(compiled(**inputs))
        eager_s = median_s(lambda: model(**inputs))
        compiled_s = median_s(lambda: compiled(**inputs))

    # one backward through the compiled graph: parameter gradients against eager's
    model.zero_grad(set_to_none=True)
    logits(model(**inputs)).float().square().mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    logits(compiled(**inputs)).float().square().mean().backward()
    grad_error = max((p.grad - eager_grads[n]).abs().max().item()
                     for n, p in model.named_parameters() if n in eager_grads and p.grad is not None)

    mask = batch["attention_mask"].bool()
    error = (out - reference)[mask].abs().max().item()
    print("compiled vs eager (CPU, fp32, padded positions excluded):")
    print(f"  max |output difference|   {error:.2e}")
    print(f"  max |gradient difference| {grad_error:.2e}")
    print(f"  regions rewritten         {len(report.rewritten)} of {len(report.regions)}")
    print(f"  first call (compile)      {compile_s:.1f} s")
    print(f"  forward, eager / compiled {eager_s * 1e3:.0f} ms / {compiled_s * 1e3:.0f} ms, median of 5 calls "
          "(dense backbone: same FLOPs as eager; the sparse methods are where speed comes from)")
    assert torch.equal(first, out)
    if error > 1e-4 or grad_error > 1e-4:
        raise SystemExit(f"compiled model disagrees with eager: {error:.2e} / {grad_error:.2e}")
    sparse_methods(model, tokenizer, logits, args)


def sparse_methods(model, tokenizer, logits, args) -> None:
    """Part 2: SPT attention + routed FFN on 2 x 256 tokens, where attention sparsity pays."""
    text = " ".join(sample_texts())
    batch = tokenizer([text, text[len(text) // 3:]], truncation=True, max_length=256, padding="max_length",
                      return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    # score "exact": rank keys by q.k (the PQ codes' recall is low at MiniLM's head_dim 32; see README)
    options = {"attention": {"method": "spt", "keep": 0.125, "score": "exact"},
               "mlp": {"method": "routed", "blocks": 4, "top_k": 2}, "inner": args.inner}
    print(f"\nsparse methods on a batch of {tuple(inputs['input_ids'].shape)}: {options}\n")
    sparsify.prepare(model, **inputs, options=options)  # the routers: new parameters, before any optimizer
    sparsify.explain(model, **inputs, options=options)

    # FLOPs per kind of block, whatever op runs it (a dense MLP runs as plain matmuls, a routed one as our op)
    dense_flops = sparsify.flops_by_block(model, **inputs)
    sparse_flops = sparsify.flops_by_block(model, **inputs, options=options)

    def gflops(by_block, kind=None):
        return sum(n for k, ops in by_block.items() if kind in (None, k) for n in ops.values()) / 1e9
    print("\nforward GFLOPs (torch.utils.flop_counter, the sparse ops' own formulas):")
    print(f"  attention  dense {gflops(dense_flops, 'attention'):.2f} -> sparse "
          f"{gflops(sparse_flops, 'attention'):.2f} (selection included)")
    print(f"  MLP        dense {gflops(dense_flops, 'mlp'):.2f} -> routed {gflops(sparse_flops, 'mlp'):.2f} "
          "(router included)")
    print(f"  whole model {gflops(dense_flops):.2f} -> {gflops(sparse_flops):.2f}")

    compiled = torch.compile(model, backend="sparsify", options=options)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    start = time.perf_counter()
    loss = logits(compiled(**inputs)).float().square().mean()
    loss.backward()
    optimizer.step()
    print(f"\none training step through the sparse graph: loss {loss.item():.4f}, "
          f"{time.perf_counter() - start:.1f} s including compilation (CPU runs the ops' torch references)")
    if not (sparse_flops.get("attention", {}).get("sparsify.spt_attention")
            and sparse_flops.get("mlp", {}).get("sparsify.routed_mlp")):
        raise SystemExit("the sparse methods were not applied: see the table above")


if __name__ == "__main__":
    main()
