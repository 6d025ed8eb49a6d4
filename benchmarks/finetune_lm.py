"""Causal-LM fine-tuning of SmolLM2-135M on held-out fortunes: dense vs SPT routed FFN.

    python benchmarks/finetune_lm.py                                   # dense and routed, full fine-tuning
    python benchmarks/finetune_lm.py --variants dense routed routed-clustered --steps 30 --seq-len 128 --batch 4
    python benchmarks/finetune_lm.py --lora 16                         # peft LoRA r=16 on every Linear
    python benchmarks/finetune_lm.py --variants custom --options-json '{"mlp": {"method": "routed", "top_k": 1}}'

Model: SmolLM2-135M-Instruct (sparsify_examples.models.load_smollm2: a LlamaForCausalLM, 30 layers, SwiGLU MLPs with
d_ff 1536), or "tiny" (2 random Llama layers with MiniLM's tokenizer: smoke tests only).

Data (offline, real text): the Debian fortunes of benchmarks/data_fortunes.py's categories, split *by fortune*
with its split_fortunes (seeded, 20% held out; duplicates and cross-category repeats removed). Each split is
shuffled, tokenized without special tokens, joined with the EOS token between fortunes, and cut into
seq_len-token windows: the training stream cycles through the train fortunes; evaluation uses the first
--n-eval windows of the held-out stream. No padding, so every position is a real token.

Per variant (each in its own process by default, so CPU RSS peaks do not carry over):
  1. fresh model; --lora R wraps it with peft (r=R, alpha 2R, every Linear of the decoder)
  2. sparsify.prepare(model, input_ids=..., labels=..., options=...) when the options create learned state
     (routed FFN routers, SPT codebooks) -- BEFORE the optimizer is built, so the routers are trained
  3. compiled = torch.compile(model, backend="sparsify", options=options)
  4. held-out perplexity before (compiled model, eval mode, no grad), --steps AdamW steps, perplexity after
Variants: dense ({"mlp": {"method": "dense"}}), routed ({"mlp": {"method": "routed", "blocks": 4, "top_k": 2}}),
routed-clustered (the same with "block_order": "clustered"), routed-top1 (top_k 1), custom (--options-json).
The dense variant also reports the eager (uncompiled) perplexity of the loaded model: a check that the
compiled dense model starts from the same place.

Reported: held-out perplexity before / after (exp of the mean token NLL over all n_eval * (seq_len - 1)
predicted tokens), train loss (first / last 10%), time per step (median after --warmup-steps; the first,
compiling step apart), peak memory (CUDA: torch.cuda.max_memory_allocated; CPU: process RSS sampled by a
thread, peak minus start: see finetune.PeakMemory), the sparsify report summary (regions found / rewritten).
On CPU the routed op runs its plain-torch per-block implementation (no Triton): CPU times say little about
GPU speed. Results: benchmarks/results/finetune_lm_<model>[_lora<R>]_<device>.json / .md.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402
import data_fortunes  # noqa: E402
from finetune import PeakMemory, report_summary, timed_step  # noqa: E402

VARIANTS = {
    "dense": {"mlp": {"method": "dense"}},
    "routed": {"mlp": {"method": "routed", "blocks": 4, "top_k": 2}},
    "routed-clustered": {"mlp": {"method": "routed", "blocks": 4, "top_k": 2, "block_order": "clustered"}},
    "routed-top1": {"mlp": {"method": "routed", "blocks": 4, "top_k": 1}},
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------ data

def separator_id(tokenizer) -> int:
    for tid in (tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither an EOS nor a SEP token to separate fortunes")


def _stream(tokenizer, texts: list, seed: int, sep: int) -> list:
    texts = list(texts)
    random.Random(seed).shuffle(texts)
    ids = tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]
    out: list = []
    for t in ids:
        out.extend(t)
        out.append(sep)
    return out


def _windows(stream: list, seq_len: int, n: int, cycle: bool) -> torch.Tensor:
    per = len(stream) // seq_len
    if per == 0:
        raise ValueError(f"only {len(stream)} tokens: not one window of {seq_len}")
    if n > per and not cycle:
        raise ValueError(f"only {per} held-out windows of {seq_len} tokens, asked for {n}")
    rows = [stream[(i % per) * seq_len:(i % per + 1) * seq_len] for i in range(n)]
    return torch.tensor(rows, dtype=torch.long)


def load_lm_data(tokenizer, seq_len: int, n_train: int, n_eval: int, seed: int = 0,
                 categories=data_fortunes.DEFAULT_CATEGORIES) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train [n_train, seq_len], eval [n_eval, seq_len], info) from the fortunes, split by fortune."""
    if not data_fortunes.fortunes_available():
        raise data_fortunes.FortunesMissing(f"no fortunes: {data_fortunes.INSTALL_HINT}")
    splits = data_fortunes.split_fortunes(list(categories), seed)
    train_texts = [t for c in categories for t in splits[c][0]]
    test_texts = [t for c in categories for t in splits[c][1]]
    assert not set(train_texts) & set(test_texts), "a fortune on both sides of the split"
    sep = separator_id(tokenizer)
    train_stream = _stream(tokenizer, train_texts, seed, sep)
    test_stream = _stream(tokenizer, test_texts, seed + 1, sep)
    train = _windows(train_stream, seq_len, n_train, cycle=True)
    held = _windows(test_stream, seq_len, n_eval, cycle=False)
    info = {"categories": list(categories), "train_fortunes": len(train_texts), "heldout_fortunes": len(test_texts),
            "train_stream_tokens": len(train_stream), "heldout_stream_tokens": len(test_stream),
            "train_windows_distinct": len(train_stream) // seq_len,
            "train_windows_used": n_train, "eval_windows": n_eval, "separator_id": sep,
            "epochs_over_train": round(n_train / max(1, len(train_stream) // seq_len), 3)}
    return train, held, info


# ------------------------------------------------------------------------------------------ model

def build_model(name: str, seed: int):
    """(model, tokenizer, description)."""
    if name == "smollm2":
        from sparsify_examples.models import load_smollm2

        model, tok = load_smollm2(attn_implementation="sdpa")
        return model, tok, "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)"
    if name == "tiny":
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from sparsify_examples.models import minilm_path

        tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=True)
        cfg._attn_implementation = "sdpa"
        return LlamaForCausalLM(cfg).eval(), tok, "tiny random Llama (smoke)"
    raise ValueError(f"unknown --model {name!r}")


def add_lora(model, r: int, targets: list):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets,
                                            task_type="CAUSAL_LM"))


def needs_prepare(options: dict) -> bool:
    return options.get("mlp", {}).get("method") == "routed" or options.get("attention", {}).get("method") == "spt"


def perplexity(model, data: torch.Tensor, batch: int, device) -> dict:
    """exp(mean NLL) over every predicted token of `data` (no padding), eval mode, no grad."""
    was_training = model.training
    model.eval()
    total, count, times = 0.0, 0, []
    with torch.no_grad():
        for start in range(0, len(data), batch):
            ids = data[start:start + batch].to(device)
            T.sync(device)
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            T.sync(device)
            times.append(time.perf_counter() - t0)
            n = ids.shape[0] * (ids.shape[1] - 1)  # HF shifts labels: seq_len - 1 predictions per row
            total += loss.float().item() * n
            count += n
    model.train(was_training)
    nll = total / count
    return {"ppl": round(math.exp(nll), 4), "nll": round(nll, 5), "tokens": count,
            "first_batch_s": round(times[0], 3),
            "batch_median_s": round(statistics.median(times[1:] or times), 4)}


# ------------------------------------------------------------------------------------------ one variant

def run_variant(name: str, options: dict, base_model, tokenizer, train, held, args, device) -> dict:
    import sparsify

    torch.manual_seed(args.seed)
    model = copy.deepcopy(base_model) if args.copy_model else base_model
    if args.lora:
        model = add_lora(model, args.lora, args.lora_targets)
    model.to(device)
    options = {**options, "inner": args.inner}
    result = {"variant": name, "options": options}

    eager_ref = None
    if options.get("mlp", {}).get("method", "dense") == "dense" and args.eager_reference:
        eager_ref = perplexity(model, held, args.eval_batch, device)
        result["ppl_eager_before"] = eager_ref
        print(f"[{name}] eager perplexity {eager_ref['ppl']:.3f}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    prepare_report = None
    if needs_prepare(options):
        torch._dynamo.reset()
        example = train[:args.batch].to(device)
        prepare_report = sparsify.prepare(model, input_ids=example, labels=example, options=options)
        torch._dynamo.reset()
    result["prepare_s"] = round(time.perf_counter() - t0, 2) if prepare_report is not None else None
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sparsify", options=options)

    t0 = time.perf_counter()
    result["ppl_before"] = perplexity(compiled, held, args.eval_batch, device)
    result["ppl_before"]["wall_s (incl. compile)"] = round(time.perf_counter() - t0, 2)
    print(f"[{name}] perplexity before {result['ppl_before']['ppl']:.3f} "
          f"({result['ppl_before']['wall_s (incl. compile)']} s incl. compile)", file=sys.stderr, flush=True)
    eval_report = sparsify.last_report()

    params = [p for p in model.parameters() if p.requires_grad]
    router_params = [p for n, p in model.named_parameters() if "sparsify_router" in n and p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    compiled.train()

    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=gen)
    losses, step_times, first_step_s, train_report = [], [], None, None
    with PeakMemory(device) as memory:
        for step in range(args.steps):
            ids = train[order[(step * args.batch + torch.arange(args.batch)) % len(train)]].to(device)
            loss, elapsed = timed_step(lambda: compiled(input_ids=ids, labels=ids).loss, optimizer, device)
            losses.append(loss)
            if step == 0:
                first_step_s = elapsed
                train_report = sparsify.last_report()
            if step >= args.warmup_steps:
                step_times.append(elapsed)
            if args.log_every and (step % args.log_every == 0 or step == args.steps - 1):
                print(f"[{name}] step {step:4d}  loss {losses[-1]:.4f}  {elapsed:.3f} s", file=sys.stderr,
                      flush=True)
            if step == args.warmup_steps - 1 and step < args.steps - 1:
                memory.restart_peak()

    t0 = time.perf_counter()
    result["ppl_after"] = perplexity(compiled, held, args.eval_batch, device)
    result["ppl_after"]["wall_s"] = round(time.perf_counter() - t0, 2)
    print(f"[{name}] perplexity after {result['ppl_after']['ppl']:.3f}", file=sys.stderr, flush=True)
    if not math.isfinite(losses[-1]):
        result["warning"] = "non-finite training loss"
    tail = max(1, len(losses) // 10)
    result.update({
        "train_loss": {"first": round(losses[0], 4), "mean_first_10pct": round(statistics.mean(losses[:tail]), 4),
                       "mean_last_10pct": round(statistics.mean(losses[-tail:]), 4),
                       "all": [round(v, 4) for v in losses]},
        "time": {"step_median_s": round(statistics.median(step_times), 4) if step_times else None,
                 "step_min_s": round(min(step_times), 4) if step_times else None,
                 "step_max_s": round(max(step_times), 4) if step_times else None,
                 "timed_steps": len(step_times), "warmup_steps": args.warmup_steps,
                 "first_step_s (incl. compile)": round(first_step_s, 2)},
        "memory": memory.result(),
        "trainable_params": sum(p.numel() for p in params),
        "router_params": sum(p.numel() for p in router_params),
        "sparsify_report": {"prepare": report_summary(prepare_report), "train": report_summary(train_report),
                            "eval": report_summary(eval_report)},
    })
    return result


# ------------------------------------------------------------------------------------------ main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    p.add_argument("--variants", nargs="+", default=["dense", "routed"], choices=[*VARIANTS, "custom"])
    p.add_argument("--options-json", default=None, help="the options of the 'custom' variant")
    p.add_argument("--lora", type=int, default=0, metavar="R", help="peft LoRA rank (0: full fine-tuning)")
    p.add_argument("--lora-targets", nargs="+", default=LORA_TARGETS)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=None, help="default: 5e-5 full fine-tuning, 5e-4 LoRA")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the timing")
    p.add_argument("--n-eval", type=int, default=32, help="held-out windows of seq_len tokens")
    p.add_argument("--eval-batch", type=int, default=0, help="0: same as --batch")
    p.add_argument("--categories", default=",".join(data_fortunes.DEFAULT_CATEGORIES))
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"],
                   help="sparsify's inner compiler (options['inner'])")
    p.add_argument("--eager-reference", action=argparse.BooleanOptionalAction, default=True,
                   help="dense variant: also the eager perplexity of the loaded model")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="run each variant in its own process (CPU RSS peaks do not carry over)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--out-dir", default=T.default_out_dir())
    p.add_argument("--stem", default=None, help="default finetune_lm_<model>[_lora<R>]_<device>")
    p.add_argument("--part-out", default=None, help=argparse.SUPPRESS)  # child process: write its variants here
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 5e-4 if args.lora else 5e-5
    args.eval_batch = args.eval_batch or args.batch
    args.copy_model = len(args.variants) > 1
    if "custom" in args.variants and not args.options_json:
        p.error("--variants custom needs --options-json")
    return args


def variant_options(name: str, args) -> dict:
    if name == "custom":
        return json.loads(args.options_json)
    return copy.deepcopy(VARIANTS[name])


def _run_children(argv: list, args) -> tuple[list, dict | None]:
    """Each variant in its own process (same arguments, one variant, results through a temp file)."""
    results, results_meta = [], None
    for name in args.variants:
        with tempfile.TemporaryDirectory() as tmp:
            part = os.path.join(tmp, "part.json")
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--variants", name, "--no-isolate",
                   "--part-out", part]
            print(f"== variant {name}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd)
            if proc.returncode != 0 or not os.path.exists(part):
                results.append({"variant": name, "status": "error",
                                "reason": f"child process exited with {proc.returncode}"})
                continue
            with open(part) as fh:
                child = json.load(fh)
            for r in child["variants"]:
                r["process_wall_s"] = round(time.perf_counter() - t0, 1)
            results.extend(child["variants"])
            results_meta = child
    return results, results_meta


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = T.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    env = T.environment(device)

    if args.isolate and len(args.variants) > 1 and args.part_out is None:
        variants, child = _run_children(argv, args)
        data_info = child["data"] if child else None
        model_desc = child["model"] if child else args.model
    else:
        import sparsify  # noqa: F401  (registers the backend)

        t0 = time.perf_counter()
        base, tok, model_desc = build_model(args.model, args.seed)
        load_s = time.perf_counter() - t0
        categories = [c for c in args.categories.split(",") if c]
        train, held, data_info = load_lm_data(tok, args.seq_len, args.steps * args.batch, args.n_eval, args.seed,
                                              categories)
        data_info["model_load_s"] = round(load_s, 1)
        variants = []
        for name in args.variants:
            print(f"== variant {name}", flush=True)
            try:
                variants.append(run_variant(name, variant_options(name, args), base, tok, train, held, args, device))
            except Exception as exc:  # noqa: BLE001  (report it, go on with the next variant)
                import traceback

                traceback.print_exc()
                variants.append({"variant": name, "status": "error", "reason": f"{type(exc).__name__}: {exc}"[:500]})
    payload = {
        "benchmark": "finetune_lm: causal-LM fine-tuning on held-out fortunes",
        "model": model_desc,
        "finetune": f"peft LoRA r={args.lora} alpha={2 * args.lora} on {','.join(args.lora_targets)}" if args.lora
        else "full",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out_dir", "part_out", "copy_model")},
        "data": data_info,
        "environment": T.finish_environment(env, device, started),
        "variants": variants,
    }
    if args.part_out:
        with open(args.part_out, "w") as fh:
            json.dump(payload, fh, default=str)
        return payload
    md = render_markdown(payload, device)
    print("\n" + md)
    stem = args.stem or f"finetune_lm_{args.model}{f'_lora{args.lora}' if args.lora else ''}_{T.device_slug(device)}"
    paths = T.write_results(args.out_dir, stem, payload, md)
    print(f"\nwrote {paths[0]} and {paths[1]}")
    return payload


def _loss_ends(losses: list) -> str:
    """Mean train loss of the first and of the last quarter of the steps (single-batch losses are noisy)."""
    q = max(1, len(losses) // 4)
    return f"{statistics.mean(losses[:q]):.3f} -> {statistics.mean(losses[-q:]):.3f}"


def _mem(r) -> str:
    m = r.get("memory")
    return f"{m['peak_minus_start_mib']:.0f}" if m else "-"


def render_markdown(payload: dict, device) -> str:
    gpu = device.type == "cuda"
    s, env, data = payload["settings"], payload["environment"], payload["data"] or {}
    lines = [f"# Causal-LM fine-tuning, {payload['model']} — {'GPU' if gpu else 'CPU'}: {env['device_name']}", ""]
    if not gpu:
        lines += ["**CPU run.** On CPU the routed FFN runs the plain-torch per-block implementation of "
                  "sparsify::routed_mlp (one torch GEMM per block over gathered rows, no Triton), and Inductor "
                  "generates C++: the CPU times below say little about GPU speed (the GPU path uses the generated "
                  "Triton grouped GEMMs). The machine is a shared 2-core host with other jobs running, so times are "
                  "indicative only. Peak memory is process RSS (psutil, sampled), peak minus start, not an "
                  "allocator peak.", ""]
    lines += [f"Fine-tuning: {payload['finetune']}; seq_len {s['seq_len']} x batch {s['batch']}, {s['steps']} AdamW "
              f"steps, lr {s['lr']}, weight decay {s['weight_decay']}, seed {s['seed']}; sparsify inner compiler "
              f"{s['inner']}. torch {env['torch']}, {env['date_utc']} UTC"
              + (f", load average at start/end {env.get('loadavg_at_start')} / {env.get('loadavg_at_end')}"
                 if not gpu else "") + ".", "",
              f"Data: fortunes {', '.join(data.get('categories', []))}; split by fortune "
              f"({data.get('train_fortunes')} train / {data.get('heldout_fortunes')} held-out fortunes); "
              f"perplexity on {data.get('eval_windows')} held-out windows of {s['seq_len']} tokens "
              f"({data.get('eval_windows', 0) * (s['seq_len'] - 1)} predicted tokens); training used "
              f"{data.get('train_windows_used')} windows ({data.get('epochs_over_train')} epochs of the train stream).",
              ""]
    header = ["variant", "options (mlp)", "ppl before", "ppl after", "train loss first 25% -> last 25% of steps",
              "step median s", "first step s (compile)", "peak mem MiB" + ("" if gpu else " (RSS)"),
              "trainable params", "regions rewritten (train graph)"]
    rows = []
    for r in payload["variants"]:
        if r.get("status") == "error":
            rows.append([r["variant"], "ERROR", r.get("reason", "")[:120], "", "", "", "", "", "", ""])
            continue
        rep = r["sparsify_report"]["train"]
        dec = ", ".join(f"{k} {v}" for k, v in sorted(rep["decisions"].items())) if rep else "-"
        before = f"{r['ppl_before']['ppl']:.2f}"
        if "ppl_eager_before" in r:
            before += f" (eager {r['ppl_eager_before']['ppl']:.2f})"
        rows.append([r["variant"], json.dumps(r["options"].get("mlp", {})), before, f"{r['ppl_after']['ppl']:.2f}",
                     _loss_ends(r["train_loss"]["all"]),
                     f"{r['time']['step_median_s']}", f"{r['time']['first_step_s (incl. compile)']}", _mem(r),
                     f"{r['trainable_params']:,}" + (f" (routers {r['router_params']:,})" if r["router_params"] else ""),
                     f"{rep['rewritten']}/{rep['regions']}: {dec}" if rep else "-"])
    lines += [T.markdown_table(header, rows), ""]
    lines += ["Perplexity: exp(mean next-token NLL) on the held-out windows, the compiled model in eval mode "
              "without grad (\"before\" = after sparsify.prepare, before any step: for routed variants this is the "
              "routed model with its initial routers; \"eager\" = the uncompiled loaded model). Step time: median "
              f"over the steps after the first {s['warmup_steps']}. Peak memory: "
              + ("torch.cuda.max_memory_allocated over the timed steps" if gpu else
                 "process RSS over the timed steps, peak minus RSS before the first step") + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
