"""MST's real run: pretrain a small GPT-2 from config on WordNet's glosses (bytes), dense vs MST, same steps, data
and seed; validation loss curves, training FLOPs, wall-clock.

    python benchmarks/mst_pretrain.py --variant dense --out benchmarks/results/mst_gpt2/dense.json
    python benchmarks/mst_pretrain.py --variant mst --out benchmarks/results/mst_gpt2/mst.json
    python benchmarks/mst_pretrain.py --summary benchmarks/results/mst_gpt2         # table + loss-curve plot

dense: torch.compile(model) (Inductor, what a user runs today). mst: torch.compile(model, backend="sparsify",
options={"linear": {"method": "mst", ...}}) with every Linear masked (the tied LM head included, as the authors
do), sparsify.training.MixedSparsity around the optimizer. Both: AdamW (betas 0.9, 0.95, weight decay 0.1), a
linear warm-up then cosine learning rate, gradient clipping at 1.0 (after the masks for MST), no dropout.

FLOPs: the dense model's training FLOPs are 3x one forward's (torch.utils.flop_counter on the eager model);
MST's are those minus what its masks save over the masked projections (MixedSparsity.flops(): forward and
backward at each step's density, plus the dense weight gradient on topology-update steps). That is the paper's
accounting: in the unstructured mode the masked matmuls actually run dense, so MST's wall-clock is not lower.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data_wordnet  # noqa: E402


def build(args):
    import transformers
    torch.manual_seed(args.seed)
    config = transformers.GPT2Config(vocab_size=256, n_positions=args.seq, n_embd=args.d_model, n_layer=args.layers,
                                     n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(config)


def mst_options(args) -> dict:
    return {"linear": {"method": "mst", "total_steps": args.steps, "delta": args.delta,
                       "warmup_end": args.warmup_end, "ultra_end": args.ultra_end,
                       "warmup_sparsity": args.sparsity, "ultra_sparsity": args.sparsity,
                       "restore_sparsity": args.restore_sparsity, "seed": args.seed,
                       "dense_tied_head": args.dense_head, "zeta": args.zeta,
                       "block": tuple(args.block) if args.block else None},
            "attention": ({"method": "hsa", "block": args.hsa[0], "window": args.hsa[1], "stride": args.hsa[2]}
                          if args.hsa else "off"),
            "mlp": "off", "inner": args.inner}


def lr_at(step: int, args) -> float:
    warm = max(1, int(0.05 * args.steps))
    if step < warm:
        return args.lr * (step + 1) / warm
    progress = (step - warm) / max(1, args.steps - warm)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def forward_flops(args, ids) -> int:
    """One forward's FLOPs of the model, counted on an eager-attention copy: the flop counter has no formula for
    CPU SDPA's kernel, so counting the SDPA model would leave the attention scores out."""
    from torch.utils.flop_counter import FlopCounterMode
    model = build(args)
    model.config._attn_implementation = "eager"
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    return counter.get_total_flops()


def run(args) -> dict:
    import sparsify

    if args.threads:
        torch.set_num_threads(args.threads)
    train, val = data_wordnet.byte_splits(args.seed)
    model = build(args)
    gen = torch.Generator().manual_seed(args.seed)
    val_gen = torch.Generator().manual_seed(10_000 + args.seed)
    val_batches = [data_wordnet.batches(val, args.batch, args.seq, val_gen) for _ in range(args.val_batches)]
    tokens = args.batch * args.seq
    dense_step_flops = 3 * forward_flops(args, val_batches[0][:, :-1])
    torch._dynamo.reset()
    if args.variant == "mst":
        options = mst_options(args)
        sparsify.prepare(model, input_ids=val_batches[0][:2, :-1], options=options)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="sparsify", options=options)
    else:
        options = None
        compiled = torch.compile(model, backend=args.inner)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = sparsify.training.MixedSparsity(model, optimizer, options, tokens_per_step=tokens,
                                               seq_len=args.seq) \
        if args.variant == "mst" else None

    def validate() -> float:
        model.eval()
        with torch.no_grad():
            losses = [compiled(input_ids=b[:, :-1], labels=b[:, :-1]).loss.item() for b in val_batches]
        model.train()
        return statistics.mean(losses)

    curve, train_losses, step_times = [], [], []
    started = time.perf_counter()
    for step in range(args.steps):
        if step % args.eval_every == 0:
            curve.append({"step": step, "val_loss": round(validate(), 4),
                          "sparsity": round(schedule.sparsity(), 4) if schedule else 0.0})
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        b = data_wordnet.batches(train, args.batch, args.seq, gen)
        t0 = time.perf_counter()
        loss = compiled(input_ids=b[:, :-1], labels=b[:, :-1]).loss
        loss.backward()
        if schedule is not None:
            update = schedule.before_optimizer()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if not (update and schedule.options.skip_update_step):
                optimizer.step()
            schedule.after_optimizer()
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
        train_losses.append(loss.item())
        if args.log_every and step % args.log_every == 0:
            print(f"step {step:5d} loss {train_losses[-1]:.4f} {step_times[-1]:.3f} s", file=sys.stderr, flush=True)
    curve.append({"step": args.steps, "val_loss": round(validate(), 4),
                  "sparsity": round(schedule.sparsity(), 4) if schedule else 0.0})
    wall = time.perf_counter() - started
    total_dense = dense_step_flops * args.steps
    if schedule is not None:
        f = schedule.flops()
        total = total_dense - (f["dense_model"] - f["mst_total"])
        masked = {"dense": f["dense_model"], "mst": f["mst_total"], "dense_over_mst": f["dense_over_mst"]}
    else:
        total, masked = total_dense, None
    return {
        "benchmark": "MST real run: GPT-2 from config on WordNet glosses (bytes)",
        "variant": args.variant, "options": options, "seed": args.seed,
        "model": {"layers": args.layers, "d_model": args.d_model, "heads": args.heads, "vocab": 256, "seq": args.seq,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "steps": args.steps, "batch": args.batch, "lr": args.lr, "tokens_per_step": tokens,
        "data": {"train_bytes": int(train.numel()), "val_bytes": int(val.numel()),
                 "val_tokens": args.val_batches * tokens},
        "val_curve": curve, "final_val_loss": curve[-1]["val_loss"],
        "train_loss_every_10pct": [round(statistics.mean(train_losses[i:i + max(1, args.steps // 10)]), 4)
                                   for i in range(0, args.steps, max(1, args.steps // 10))],
        "training_flops": total, "dense_training_flops": total_dense, "dense_over_this": total_dense / total,
        "flops_counted": "eager-attention forward x 3" + (" less MixedSparsity's attention saving (HSA)"
                                                           if args.hsa else ""),
        "attention_density": schedule.flops().get("attention_density") if schedule else None,
        "masked_projection_flops": masked,
        "topology_updates": len(schedule.updates) if schedule else 0,
        "wall_clock_s": round(wall, 1), "step_median_s": round(statistics.median(step_times[5:] or step_times), 4),
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "load_avg_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
    }


def label(r: dict) -> str:
    if r["variant"] != "mst":
        return r["variant"]
    o, a = r["options"]["linear"], r["options"].get("attention")
    extra = (f", {o['block'][0]}x{o['block'][1]} blocks" if o.get("block") else "") + (
        f", HSA {a['pattern'] if 'pattern' in a else 'union'} w{a['window']} s{a['stride']}"
        if isinstance(a, dict) else "") + (", dense head" if o.get("dense_tied_head") else "") + (
        f", delta {o['delta']}" if o.get("delta", 100) != 100 else "") + (
        f", zeta {o['zeta']:g}" if o.get("zeta", 0.3) != 0.3 else "")
    return (f"mst ({o['warmup_sparsity']:g} by {o['warmup_end']:g}, {o['ultra_sparsity']:g} to {o['ultra_end']:g}, "
            f"{o['restore_sparsity']:g} at the end{extra})")


def recount(path: str) -> None:
    """Recompute a result's whole-model FLOPs with the eager-attention count (results written before the count
    included attention): the dense step's FLOPs depend only on the model's shape; MST's saving over its masked
    projections is the run's own record."""
    r = json.load(open(path))
    m = r["model"]
    args = parse_args(["--layers", str(m["layers"]), "--d-model", str(m["d_model"]), "--heads", str(m["heads"]),
                       "--seq", str(m["seq"]), "--batch", str(r["batch"])])
    ids = torch.zeros((r["batch"], m["seq"]), dtype=torch.long)
    total_dense = 3 * forward_flops(args, ids) * r["steps"]
    saved = (r["masked_projection_flops"]["dense"] - r["masked_projection_flops"]["mst"]) \
        if r.get("masked_projection_flops") else 0.0
    r.update(training_flops=total_dense - saved, dense_training_flops=total_dense,
             dense_over_this=total_dense / (total_dense - saved), flops_counted="eager-attention forward x 3")
    with open(path, "w") as fh:
        json.dump(r, fh, indent=2)


def summary(folder: str) -> str:
    runs = {label(r): r for r in (json.load(open(os.path.join(folder, f)))
                                  for f in sorted(os.listdir(folder)) if f.endswith(".json"))}
    dense = runs.get("dense")
    first = next(iter(runs.values()))
    m = first["model"]
    lines = [f"# MST real run: GPT-2 ({m['layers']} layers, d {m['d_model']}, {m['parameters']:,} parameters, byte "
             f"vocabulary) on WordNet glosses ({first['device']})", "",
             f"{first['steps']} AdamW steps of {first['tokens_per_step']} tokens, seed {first['seed']}; validation: "
             f"{first['data']['val_tokens']} held-out tokens (glosses not in training).", "",
             "| variant | final val loss | vs dense | training FLOPs | dense / this | MixedSparsity account (projections, + attention with HSA): dense / MST | "
             "wall-clock s | step median s |", "|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        vs = f"{100 * (r['final_val_loss'] / dense['final_val_loss'] - 1):+.2f} %" if dense and r is not dense else "-"
        masked = f"{r['masked_projection_flops']['dense_over_mst']:.2f}x" if r.get("masked_projection_flops") else "-"
        lines.append(f"| {name} | {r['final_val_loss']:.4f} | {vs} | {r['training_flops']:.3e} | "
                     f"{r['dense_over_this']:.2f}x | {masked} | {r['wall_clock_s']} | {r['step_median_s']} |")
    plot = os.path.join(folder, "val_loss.png")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        colors = {}
        for name, r in runs.items():
            (line,) = ax.plot([c["step"] for c in r["val_curve"]], [c["val_loss"] for c in r["val_curve"]], label=name)
            colors[name] = line.get_color()
        msts = [(name, r) for name, r in runs.items() if r["variant"] == "mst"]
        if msts:
            ax2 = ax.twinx()
            for name, r in msts:  # each run's sparsity in its loss curve's colour
                ax2.plot([c["step"] for c in r["val_curve"]], [c["sparsity"] for c in r["val_curve"]], linestyle=":",
                         color=colors[name])
            ax2.set_ylabel("MST sparsity (dotted)")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats / byte)")
        # the first tenth of the run falls from ln(256): start the axis after it, where the runs differ
        later = [c["val_loss"] for r in runs.values() for c in r["val_curve"] if c["step"] >= first["steps"] // 10]
        if later:
            ax.set_ylim(0.98 * min(later), 1.02 * max(later))
        ax.legend(fontsize=6, loc="upper right")
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        lines += ["", f"Plot: {os.path.basename(plot)}."]
    except ImportError:
        lines += ["", "(matplotlib not installed: no plot)"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=["dense", "mst"], default="mst")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--delta", type=int, default=100)
    p.add_argument("--zeta", type=float, default=0.3, help="MST: the drop fraction's start (cosine-annealed)")
    p.add_argument("--dense-head", action="store_true",
                   help="MST: keep the LM head tied to the byte embedding dense (the authors mask it)")
    p.add_argument("--sparsity", type=float, default=0.9, help="MST: warm-up and ultra-sparse target")
    p.add_argument("--restore-sparsity", type=float, default=0.5)
    p.add_argument("--warmup-end", type=float, default=0.25)
    p.add_argument("--ultra-end", type=float, default=0.75)
    p.add_argument("--block", type=int, nargs=2, default=None, metavar=("ROWS", "COLS"),
                   help="MST block mode (default: unstructured, the paper's)")
    p.add_argument("--hsa", type=int, nargs=3, default=None, metavar=("BLOCK", "WINDOW", "STRIDE"),
                   help="hybrid sparse attention in the ultra-sparse phase (default: dense attention)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager"],
                   help="the compiler: dense's torch.compile backend, MST's options.inner")
    p.add_argument("--out", default=None)
    p.add_argument("--summary", default=None, metavar="FOLDER")
    p.add_argument("--recount", default=None, metavar="JSON", help="recompute a result's whole-model FLOPs; no run")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.recount:
        recount(args.recount)
        return None
    if args.summary:
        text = summary(args.summary)
        with open(os.path.join(args.summary, "summary.md"), "w") as fh:
            fh.write(text)
        print(text)
        return text
    result = run(args)
    print(json.dumps({k: result[k] for k in ("variant", "final_val_loss", "dense_over_this", "wall_clock_s")}))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
