"""DEFT's real run: all-MiniLM-L6-v2 + peft LoRA on the fortunes topic task, PEFT alone vs PEFT + DEFT (and our
ADA-DEFT reconstruction), paired seeds; test accuracy and the exact-zero activation density of every MLP.

    python benchmarks/deft_finetune.py --variant peft --seed 0 --out benchmarks/results/deft_minilm/peft_s0.json
    python benchmarks/deft_finetune.py --variant deft --weight 10 --seed 0 --out .../deft_w10_s0.json
    python benchmarks/deft_finetune.py --variant ada --weight 10 --seed 0 --out .../ada_w10_s0.json
    python benchmarks/deft_finetune.py --summary benchmarks/results/deft_minilm      # table + plot

LoRA is the paper's: r=8, alpha=16, dropout 0.1 on query and value; the base model is frozen, the linear head
trains. Every variant compiles the same classifier with backend="sparsify": "peft" with mlp.method="deft",
measure_only=True (metrics only, no loss: the baseline), "deft" with the density loss, "ada" with ADA-DEFT
(sparsify.prepare attaches the layer gates first). The density is measured on the test set by the eval graphs
(sparsify.activation_density: exact non-zeros / entries in fp32, padding counted as the authors do; the
documents here have none). Same seed = same split, batch order, head initialisation and LoRA initialisation.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data_fortunes  # noqa: E402
import finetune  # noqa: E402


def lora(encoder: nn.Module, targets: str = "query,value") -> nn.Module:
    from peft import LoraConfig, get_peft_model
    return get_peft_model(encoder, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                              target_modules=[t for t in targets.split(",") if t]))


def options_for(args) -> dict:
    mlp = {"method": "ada_deft" if args.variant == "ada" else "deft", "weight": args.weight, "eps": args.eps,
           "measure_only": args.variant == "peft"}
    if args.variant == "ada":
        mlp.update(gate_weight=args.gate_weight, skip_below=args.skip_below, gate_scale=args.gate_scale)
    options = {"mlp": mlp, "attention": "off"}
    if args.inner:
        options["inner"] = args.inner
    return options


def eval_density(per_layer: dict, key: str = "density") -> dict[str, float]:
    """module path -> the density `key` measured by the eval graphs ("density": exact non-zeros; "density_tau":
    |a| > tau; "surrogate": the loss's a^2 / (a^2 + eps))."""
    return {name.split(":", 1)[1]: round(m[key], 5) for name, m in per_layer.items() if name.startswith("eval:")}


def eager_density(model: nn.Module, dataset, batch: int) -> dict:
    """The exact-zero density of every MLP activation measured in eager (forward hooks on the BERT layers'
    intermediate_act_fn, the authors' tap), both over every position (padding counted: the authors' metric) and
    over the real tokens only; a check of the compiled graphs' metric as well. {"all": {layer: d}, "real": {...}}"""
    counts: dict = {}
    mask_now: list = []

    def hook(name):
        def fn(_module, _inputs, out):
            real = mask_now[0].unsqueeze(-1).expand_as(out).bool()
            nz = out != 0
            c = counts.setdefault(name, [0, 0, 0, 0])
            c[0] += int(nz.sum()); c[1] += nz.numel(); c[2] += int((nz & real).sum()); c[3] += int(real.sum())
        return fn

    handles = [m.intermediate_act_fn.register_forward_hook(hook(name.rsplit(".intermediate", 1)[0]))
               for name, m in model.named_modules() if hasattr(m, "intermediate_act_fn")]
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch):
                ids, mask, _ = (t[start:start + batch] for t in dataset.tensors)
                mask_now[:] = [mask]
                model(ids, mask)
    finally:
        for h in handles:
            h.remove()
        model.train()
    short = {name: name.split("encoder.layer.")[-1] for name in counts}
    return {"all": {f"layer.{short[k]}": round(c[0] / c[1], 5) for k, c in counts.items()},
            "real": {f"layer.{short[k]}": round(c[2] / c[3], 5) for k, c in counts.items()}}


def run(args) -> dict:
    import sparsify

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    encoder, tokenizer = finetune.build_model(args.model, args.seed)
    train_set, test_set, labels = data_fortunes.load_splits(
        tokenizer, args.seq_len, args.steps * args.batch, args.n_test, args.seed,
        distractor_frac=args.distractor_frac, examples=args.examples)
    torch.manual_seed(args.seed)  # LoRA and head initialisation: the same for every variant of a seed
    model = finetune.Classifier(lora(encoder, args.lora_targets), encoder.config.hidden_size, len(labels))
    model.train()
    options = options_for(args)
    torch._dynamo.reset()
    if args.variant == "ada":
        ids, mask = (t[: args.batch] for t in train_set.tensors[:2])
        sparsify.prepare(model, ids, mask, options=options)
        torch._dynamo.reset()
    compiled = torch.compile(model, backend="sparsify", options=options)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scheduler = lr_schedule(optimizer, args.schedule, args.warmup, args.steps)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_set), generator=gen)
    train_density, losses, step_times = [], [], []
    sparsify.activation_density(reset=True)
    for step in range(args.steps):
        idx = order[step * args.batch:(step + 1) * args.batch]
        ids, mask, y = (t[idx] for t in train_set.tensors)
        t0 = time.perf_counter()
        loss = loss_fn(compiled(ids, mask), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step_times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        measured = sparsify.activation_density(reset=True)
        train_density.append(statistics.mean(m["density"] for m in measured.values()))
        if args.log_every and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"step {step:4d} loss {losses[-1]:.4f} density {train_density[-1]:.4f} {step_times[-1]:.2f} s",
                  file=sys.stderr, flush=True)
    gates = None
    if args.variant == "ada":
        from sparsify.methods.ada_deft import gate_values
        gates = {k: round(v, 4) for k, v in gate_values(model, args.gate_scale).items()}
    model.eval()
    torch._dynamo.reset()  # the eval graph is compiled from the trained gates
    accuracy, eval_s = finetune.evaluate(compiled, test_set, args.batch, torch.device("cpu"))
    report = sparsify.last_report()
    model.eval()
    measured = sparsify.activation_density(reset=True)
    per_layer = eval_density(measured)
    per_layer_tau, per_layer_surrogate = eval_density(measured, "density_tau"), eval_density(measured, "surrogate")
    eager = eager_density(model, test_set, args.batch)
    flops = sparsify.count_flops(model, *test_set.tensors[:2], options=options) if args.variant == "ada" else None
    dense_flops = (sparsify.count_flops(model, *test_set.tensors[:2], options={**options, "mlp": {"method": "dense"}})
                   if args.variant == "ada" else None)
    sweep = []
    if args.variant == "ada":  # what skipping saves and costs at other thresholds (the trained gates stay)
        for threshold in [float(t) for t in args.skip_sweep.split(",") if t]:
            swept = {**options, "mlp": {**options["mlp"], "skip_below": threshold}}
            torch._dynamo.reset()
            acc, _ = finetune.evaluate(torch.compile(model, backend="sparsify", options=swept), test_set, args.batch,
                                       torch.device("cpu"))
            rows = sparsify.last_report().regions
            model.eval()
            f = sparsify.count_flops(model, *test_set.tensors[:2], options=swept)
            sweep.append({"skip_below": threshold, "test_accuracy": round(acc, 4),
                          "skipped": [r.module for r in rows if r.decision == "ada_deft (skipped)"],
                          "eval_forward_flops": sum(f.values())})
        sparsify.activation_density(reset=True)
    tail = max(1, len(losses) // 10)
    return {
        "benchmark": "DEFT real run: all-MiniLM-L6-v2 + LoRA, fortunes topics",
        "variant": args.variant, "options": options, "seed": args.seed,
        "lora": f"r=8, alpha=16, dropout 0.1 on {args.lora_targets.replace(',', '/')}; base frozen; linear head trained",
        "seq_len": args.seq_len, "batch": args.batch, "steps": args.steps, "lr": args.lr,
        "schedule": args.schedule if args.schedule == "constant" else f"linear, {args.warmup:g} warm-up",
        "data": {"categories": labels, "n_train": len(train_set), "n_test": len(test_set),
                 "distractor_frac": args.distractor_frac, "examples": args.examples,
                 "real_token_fraction": round(float(train_set.tensors[1].float().mean()), 4)},
        "eager_density_all_positions": eager["all"],
        "eager_density_all_positions_mean": round(statistics.mean(eager["all"].values()), 5),
        "eager_density_real_tokens": eager["real"],
        "eager_density_real_tokens_mean": round(statistics.mean(eager["real"].values()), 5),
        "test_accuracy": round(accuracy, 4),
        "eval_density_per_layer": per_layer,
        "eval_density_mean": round(statistics.mean(per_layer.values()), 5) if per_layer else None,
        "eval_density_tau_per_layer (|a| > 1e-3)": per_layer_tau,
        "eval_density_tau_mean": round(statistics.mean(per_layer_tau.values()), 5) if per_layer_tau else None,
        "eval_surrogate_mean": round(statistics.mean(per_layer_surrogate.values()), 5) if per_layer_surrogate else None,
        "train_density_every_10pct": [round(statistics.mean(train_density[i:i + tail]), 5)
                                      for i in range(0, len(train_density), tail)],
        "train_loss_every_10pct": [round(statistics.mean(losses[i:i + tail]), 4) for i in range(0, len(losses), tail)],
        "ada_gates": gates,
        "ada_skipped": [r.module for r in report.regions if r.decision == "ada_deft (skipped)"] if report else None,
        "eval_forward_flops": sum(flops.values()) if flops else None,
        "ada_skip_sweep": sweep,
        "eval_forward_flops_all_mlps": sum(dense_flops.values()) if dense_flops else None,
        "step_median_s": round(statistics.median(step_times[3:] or step_times), 3),
        "eval_batch_median_s": round(eval_s, 4),
        "device": finetune.device_name(torch.device("cpu")),
        "torch": torch.__version__,
    }


def lr_schedule(optimizer, kind: str, warmup: float, steps: int):
    """constant, or the authors' GLUE schedule: linear warm-up over `warmup` of the steps, then linear decay to 0."""
    import transformers
    if kind == "constant":
        return transformers.get_constant_schedule(optimizer)
    return transformers.get_linear_schedule_with_warmup(optimizer, max(1, round(warmup * steps)), steps)


def summary(folder: str) -> str:
    """A markdown table over the JSON files in `folder` (paired by seed and length against "peft") and a plot of the
    per-layer density (mean over seeds) of each variant, saved as density_per_layer.png beside them."""
    runs = [json.load(open(os.path.join(folder, f))) for f in sorted(os.listdir(folder)) if f.endswith(".json")]
    schedule = lambda r: r.get("schedule", "constant")  # runs from before the option were constant
    several_lengths = len({r["steps"] for r in runs}) > 1
    several_schedules = len({schedule(r) for r in runs}) > 1
    label = lambda r: (r["variant"] + ("" if r["variant"] == "peft" else f" (weight {r['options']['mlp']['weight']:g})")
                       + (f", {r['steps']} steps" if several_lengths else "")
                       + (f", lr {schedule(r)}" if several_schedules else ""))
    run_key = lambda r: (r["seed"], r["steps"], schedule(r))
    groups: dict[str, list] = {}
    for r in runs:
        groups.setdefault(label(r), []).append(r)
    # a run is paired with the PEFT run of its seed, length and schedule
    base = {run_key(r): r for r in runs if r["variant"] == "peft"}
    first = runs[0]
    lines = [f"# DEFT real run: all-MiniLM-L6-v2 + LoRA on fortunes topics ({first['device']})", "",
             f"seq_len {first['seq_len']} x batch {first['batch']}, "
             f"{' / '.join(str(s) for s in sorted({r['steps'] for r in runs}))} AdamW steps, lr {first['lr']} "
             f"({' / '.join(sorted({schedule(r) for r in runs}))}), "
             f"{first['data']['n_train']} train / {first['data']['n_test']} test documents, "
             f"{len(first['data']['categories'])} classes. LoRA {first['lora']}. Density: exact non-zeros of the "
             "MLP activations (GELU, fp32) on the test set, mean over the 6 layers.", "",
             "| variant | seeds | accuracy % per seed | mean | vs peft, points | density per seed | mean density | "
             "density vs peft | |a| > 1e-3 density (mean) | skipped MLPs (ada) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        acc = [100 * r["test_accuracy"] for r in rs]
        dens = [r["eval_density_mean"] for r in rs]
        paired = [(100 * (r["test_accuracy"] - base[run_key(r)]["test_accuracy"]),
                   r["eval_density_mean"] / base[run_key(r)]["eval_density_mean"] - 1)
                  for r in rs if run_key(r) in base]
        compared = paired and rs[0]["variant"] != "peft"
        vs_acc = f"{statistics.mean(p[0] for p in paired):+.2f}" if compared else "-"
        vs_den = f"{100 * statistics.mean(p[1] for p in paired):+.1f} %" if compared else "-"
        skipped = " / ".join(str(len(r["ada_skipped"] or [])) for r in rs) if rs[0]["variant"] == "ada" else "-"
        taus = [r["eval_density_tau_mean"] for r in rs if r.get("eval_density_tau_mean") is not None]
        tau = f"{statistics.mean(taus):.4f} ({len(taus)} seeds)" if taus else "-"
        lines.append(f"| {name} | {', '.join(str(r['seed']) for r in rs)} | {' / '.join(f'{a:.2f}' for a in acc)} | "
                     f"{statistics.mean(acc):.2f} | {vs_acc} | {' / '.join(f'{d:.4f}' for d in dens)} | "
                     f"{statistics.mean(dens):.4f} | {vs_den} | {tau} | {skipped} |")
    adas = [r for r in runs if r["variant"] == "ada" and r.get("ada_skip_sweep")]
    if adas:
        lines += ["", "ADA-DEFT (our reconstruction): eval at other skip thresholds, the trained gates unchanged "
                  f"({len(adas)} seeds: {', '.join(str(r['seed']) for r in sorted(adas, key=lambda r: r['seed']))}); "
                  "accuracy vs PEFT is paired by seed; FLOPs: one eval forward over the test set.", "",
                  "| skip_below | MLPs skipped per seed | accuracy % per seed | mean vs peft, points | eval FLOPs vs all MLPs kept |",
                  "|---|---|---|---|---|"]
        adas = sorted(adas, key=lambda r: r["seed"])
        thresholds = [e["skip_below"] for e in adas[0]["ada_skip_sweep"]]
        for i, th in enumerate(thresholds):
            entries = [r["ada_skip_sweep"][i] for r in adas]
            paired = [100 * (e["test_accuracy"] - base[run_key(r)]["test_accuracy"])
                      for e, r in zip(entries, adas) if run_key(r) in base]
            flops = statistics.mean(e["eval_forward_flops"] / r["eval_forward_flops_all_mlps"] for e, r in zip(entries, adas))
            lines.append(f"| {th:g} | {' / '.join(str(len(e['skipped'])) for e in entries)} | "
                         f"{' / '.join(format(100 * e['test_accuracy'], '.2f') for e in entries)} | "
                         f"{statistics.mean(paired):+.2f} | {100 * (flops - 1):+.1f} % |" if paired else "")
    plot = os.path.join(folder, "density_per_layer.png")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, rs in groups.items():
            layers = sorted(rs[0]["eval_density_per_layer"], key=lambda m: [int(t) if t.isdigit() else t for t in m.split(".")])
            means = [statistics.mean(r["eval_density_per_layer"][m] for r in rs) for m in layers]
            ax.plot(range(len(layers)), means, marker="o", label=f"{name} ({len(rs)} seeds)")
        ax.set_xlabel("MLP layer")
        ax.set_ylabel("activation density (exact non-zeros)")
        ax.set_title("all-MiniLM-L6-v2 + LoRA, fortunes topics: test-set density")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        lines += ["", f"Plot: {os.path.basename(plot)} (density per layer, mean over seeds)."]
    except ImportError:
        lines += ["", "(matplotlib not installed: no plot)"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=["peft", "deft", "ada"], default="deft")
    p.add_argument("--weight", type=float, default=1.0, help="DEFT's lambda (the authors: 1.0)")
    p.add_argument("--eps", type=float, default=1e-7)
    p.add_argument("--gate-weight", type=float, default=0.05, help="ADA-DEFT: the gate penalty's weight")
    p.add_argument("--gate-scale", type=float, default=10.0, help="ADA-DEFT: g = 2 sigmoid(scale * logit)")
    p.add_argument("--skip-below", type=float, default=0.5, help="ADA-DEFT: eval skips MLPs with gate below this")
    p.add_argument("--skip-sweep", default="0.6,0.7,0.8,0.9", help="ADA-DEFT: also evaluate at these thresholds")
    p.add_argument("--model", default="minilm", choices=["minilm", "tiny"])
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--schedule", choices=["constant", "linear"], default="constant",
                   help="linear: the authors' (linear warm-up over --warmup of the steps, then linear decay to 0)")
    p.add_argument("--warmup", type=float, default=0.06, help="fraction of the steps warming up (linear schedule)")
    p.add_argument("--lora-targets", default="query,value",
                   help="peft target_modules, comma-separated (the paper: query,value; e.g. add intermediate.dense, "
                        "the MLP's up projection)")
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--examples", choices=["documents", "single"], default="documents",
                   help="documents: fortunes of one topic filling seq_len; single: one fortune per example padded "
                        "to seq_len (the GLUE shape the authors ran: padding counted in loss and density)")
    p.add_argument("--distractor-frac", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--inner", default=None, help="the backend's inner compiler (default: Inductor)")
    p.add_argument("--out", default=None)
    p.add_argument("--summary", default=None, metavar="FOLDER", help="write FOLDER/summary.md and the plot; no run")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.summary:
        text = summary(args.summary)
        with open(os.path.join(args.summary, "summary.md"), "w") as fh:
            fh.write(text)
        print(text)
        return text
    result = run(args)
    print(json.dumps({k: result[k] for k in ("variant", "seed", "test_accuracy", "eval_density_mean", "ada_skipped")}))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
