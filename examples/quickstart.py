"""The main example: compile a real pretrained model with backend="sparsify" and compare with eager.

    python examples/quickstart.py                    # all-MiniLM-L6-v2 (BERT, 22.7M), offline
    python examples/quickstart.py --model smollm2    # SmolLM2-135M-Instruct (Llama, from GGUF)

Prints the match table (every attention and MLP block, where it lives, what it became) and how
the compiled model's outputs and gradients compare with eager PyTorch.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import sparsify  # noqa: E402
from sparsify.models import load_minilm, load_smollm2, sample_texts  # noqa: E402


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

    with torch.no_grad():
        start = time.perf_counter()
        reference = logits(model(**inputs))
        eager_s = time.perf_counter() - start

    compiled = torch.compile(model, backend="sparsify", options={"inner": args.inner})
    with torch.no_grad():
        start = time.perf_counter()
        first = logits(compiled(**inputs))
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        out = logits(compiled(**inputs))
        compiled_s = time.perf_counter() - start

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
    print(f"  forward, eager / compiled {eager_s * 1e3:.0f} ms / {compiled_s * 1e3:.0f} ms "
          "(dense backbone: same FLOPs as eager; the sparse methods are where speed comes from)")
    assert torch.equal(first, out)
    if error > 1e-4 or grad_error > 1e-4:
        raise SystemExit(f"compiled model disagrees with eager: {error:.2e} / {grad_error:.2e}")


if __name__ == "__main__":
    main()
