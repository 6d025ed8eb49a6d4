"""What the default backend costs against Inductor alone: whole-model forward + backward time and the bytes saved
for backward, for small Llama and BERT models from configs, compiled by torch.compile (Inductor) and by
torch.compile(backend="sparsify") with its defaults (every region rewritten dense; attention lowered to SDPA).

    python benchmarks/backend_overhead.py            # CPU here, the GPU where there is one
    python benchmarks/backend_overhead.py --quick    # smaller models and fewer repeats

Measured: median wall time of one forward + backward (loss = logits' mean square) after the compile calls, and
bytes the forward saves for backward (saved_tensors_hooks, unique storages). Results:
benchmarks/results/backend_overhead_<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402


def models(quick: bool):
    import transformers
    d, layers, seq = (128, 2, 128) if quick else (512, 4, 512)
    yield "llama", transformers.LlamaConfig(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                                            num_attention_heads=d // 64, num_key_value_heads=max(1, d // 128),
                                            vocab_size=1024, attn_implementation="sdpa"), seq
    yield "bert", transformers.BertConfig(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                                          num_attention_heads=d // 64, vocab_size=1024, hidden_dropout_prob=0.0,
                                          attention_probs_dropout_prob=0.0, attn_implementation="sdpa"), seq


def run(args, device):
    import transformers
    started = time.perf_counter()
    env = _timing.environment(device)
    rows = []
    for name, config, seq in models(args.quick):
        torch.manual_seed(0)
        model = transformers.AutoModel.from_config(config).to(device)
        ids = torch.randint(0, config.vocab_size, (2, seq), device=device)
        for variant, kwargs in (("inductor", {}), ("sparsify (defaults)", {"backend": "sparsify"})):
            torch._dynamo.reset()
            compiled = torch.compile(model, **kwargs)

            def step():
                compiled(input_ids=ids).last_hidden_state.square().mean().backward()
                model.zero_grad(set_to_none=True)
            step()  # compiles
            timing = _timing.time_call(step, device, warmup=args.warmup, min_repeats=args.min_repeats,
                                       max_repeats=args.max_repeats, budget_s=args.budget_s)
            _, saved = _timing.saved_bytes(lambda: compiled(input_ids=ids).last_hidden_state.square().mean())
            rows.append({"model": name, "d_model": config.hidden_size, "layers": config.num_hidden_layers,
                         "seq": seq, "variant": variant, "fwd_bwd_ms": timing["median_ms"],
                         "saved_mib": saved["saved_bytes"] / _timing.MiB})
            print(rows[-1], flush=True)
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["variant"] == "inductor")
        r["time_vs_inductor"] = r["fwd_bwd_ms"] / base["fwd_bwd_ms"]
        r["saved_vs_inductor"] = r["saved_mib"] / base["saved_mib"]
    env = _timing.finish_environment(env, device, started)
    md = "\n".join([f"# The default backend against Inductor alone on {_timing.device_name(device)}", "",
                    "Whole model (from config, batch 2), forward + backward, median wall time; bytes saved for "
                    "backward.", "",
                    _timing.markdown_table(["model", "d_model x layers, seq", "variant", "fwd+bwd ms", "vs Inductor",
                                            "saved MiB", "vs Inductor"],
                                           [[r["model"], f"{r['d_model']} x {r['layers']}, {r['seq']}", r["variant"],
                                             _timing.fmt_ms(r["fwd_bwd_ms"]), f"{r['time_vs_inductor']:.2f}x",
                                             f"{r['saved_mib']:.1f}", f"{r['saved_vs_inductor']:.2f}x"]
                                            for r in rows])])
    stem = args.stem or f"backend_overhead_{_timing.device_slug(device)}"
    print("wrote", *_timing.write_results(args.out_dir, stem, {"environment": env, "rows": rows}, md))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true")
    _timing.add_timing_args(p, warmup_help="untimed calls after the compile", warmup=2, max_repeats=10, budget_s=3.0)
    args = p.parse_args(argv)
    return _timing.run_on_device(args, run)


if __name__ == "__main__":
    main()
