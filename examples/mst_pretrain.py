"""MST example: pretrain a small GPT-2 from its config with mixed sparsity training and hybrid sparse attention, and
print what was rewritten and the FLOP account against the dense model.

    python examples/mst_pretrain.py                 # 60 steps on the embedded sentences, CPU, about a minute
    python examples/mst_pretrain.py --unstructured  # the paper's unstructured masks instead of 16 x 16 blocks

The model is built from a config (no download); the text is the package's sample sentences as bytes. The run is
far too short to say anything about quality: benchmarks/mst_pretrain.py is the real run.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import sparsify  # noqa: E402
from sparsify_examples.models import sample_texts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--unstructured", action="store_true")
    parser.add_argument("--inner", choices=["inductor", "aot_eager"], default="aot_eager")
    args = parser.parse_args()

    data = torch.tensor(list(" ".join(sample_texts()).encode()), dtype=torch.long)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=256, n_positions=args.seq, n_embd=64, n_layer=2, n_head=4,
                                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    model = transformers.GPT2LMHeadModel(config)
    options = {"linear": {"method": "mst", "total_steps": args.steps, "delta": 10, "warmup_end": 0.25,
                          "ultra_end": 0.75, "block": None if args.unstructured else (16, 16)},
               "attention": {"method": "hsa", "block": 16, "window": 16, "stride": 32}, "mlp": "off",
               "inner": args.inner}
    batch_size = 4

    def batch(step):
        g = torch.Generator().manual_seed(step)
        starts = torch.randint(0, data.numel() - args.seq - 1, (batch_size,), generator=g)
        return torch.stack([data[s:s + args.seq] for s in starts.tolist()])

    sparsify.prepare(model, input_ids=batch(0), options=options)
    compiled = torch.compile(model, backend="sparsify", options=options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    schedule = sparsify.training.MixedSparsity(compiled, optimizer, options, tokens_per_step=batch_size * args.seq,
                                               seq_len=args.seq)
    for step in range(args.steps):
        ids = batch(step)
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:  # what was rewritten and why (explain prints the match table)
            sparsify.explain(model, input_ids=ids, options=options)
            print()
        if step % 10 == 0 or step == args.steps - 1:
            phase = "HSA on" if schedule.hsa_active(step) else "dense attention"
            print(f"step {step:3d}  loss {loss.item():.3f}  weight sparsity {schedule.sparsity():.2f}  {phase}")
    flops = schedule.flops()
    print(f"\ntraining FLOPs: MST {flops['mst_total']:.3e} (forward {flops['forward']:.3e}, backward "
          f"{flops['backward']:.3e}, dense gradients on update steps {flops['dense_gradient']:.3e}), dense model "
          f"{flops['dense_model']:.3e}: {flops['dense_over_mst']:.2f}x fewer; attention density "
          f"{flops['attention_density']:.2f}")


if __name__ == "__main__":
    main()
