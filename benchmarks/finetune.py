"""Fine-tune all-MiniLM-L6-v2 on the fortunes topic-classification task, dense vs sparse attention.

    python benchmarks/finetune.py --attention dense --seq-len 512 --steps 150 --batch 8 \
        --out benchmarks/results/finetune_minilm_dense.json
    python benchmarks/finetune.py --attention spt --options-json '{"attention": {"keep": 0.125}}' ...

The model is the MiniLM encoder + mean pooling over valid tokens + a linear head (`Classifier`);
the whole wrapper is compiled with torch.compile(model, backend="sparsify", options=...), so the
attention regions of the encoder are rewritten for training and for evaluation alike.
--no-compile runs the plain eager model (the dense reference).

Reported (JSON + a short table): test accuracy, the train-loss curve (summary), time per step
(median after warm-up; the first, compiling step is reported apart), peak memory (CUDA: peak
allocated; CPU: peak process RSS over the run minus RSS before it, sampled by a thread with
psutil), the device, versions, the options and the sparsify report.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # data_fortunes beside this file
import data_fortunes  # noqa: E402


class Classifier(nn.Module):
    """Encoder -> mean of the token states over attention_mask -> linear head (logits)."""

    def __init__(self, encoder: nn.Module, hidden: int, n_labels: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, n_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(self.dropout(pooled))


def build_model(name: str, seed: int):
    """(encoder, tokenizer): "minilm" = the real weights; "tiny" = a 2-layer random BERT with
    MiniLM's tokenizer (smoke tests: fast, same data pipeline)."""
    from sparsify_examples.models import load_minilm, minilm_path

    if name == "minilm":
        return load_minilm(attn_implementation="sdpa")
    if name == "tiny":
        from transformers import AutoTokenizer, BertConfig, BertModel

        tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64, max_position_embeddings=512,
                            attn_implementation="sdpa")
        return BertModel(config, add_pooling_layer=False), tokenizer
    raise ValueError(f"unknown --model {name!r}")


def resolve_options(attention: str, options_json: str | None) -> dict:
    """--attention picks attention.method; --options-json adds to / overrides it (nested merge)."""
    options = {"attention": {"method": attention}}
    extra = json.loads(options_json) if options_json else {}
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(options.get(key), dict):
            options[key] = {**options[key], **value}
        else:
            options[key] = value
    return options


def add_lora(encoder: nn.Module, r: int) -> nn.Module:
    """peft LoRA on the attention query/value projections; the rest of the encoder is frozen."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(encoder, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                              target_modules=["query", "value"]))


class PeakMemory:
    """Peak memory of the training loop.

    CUDA: torch.cuda.max_memory_allocated (reset at start) - the tensors torch allocated.
    CPU: process RSS sampled every `interval` s by a thread; peak minus the RSS at start.  torch's
    CPU allocator is malloc, invisible to tracemalloc, so RSS is the honest measure; it includes
    allocator caching and compile-time memory, and a short spike between samples can be missed.
    """

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval = device, interval
        self.peak = self.base = 0
        self.warmup_peak = None  # peak up to restart_peak(): includes compilation
        self._stop = threading.Event()
        self._thread = None

    @property
    def measure(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated"
        return f"psutil process RSS, peak minus start, sampled every {self.interval * 1000:g} ms"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import psutil

            proc = psutil.Process()
            self.base = self.peak = proc.memory_info().rss

            def sample():
                while not self._stop.wait(self.interval):
                    self.peak = max(self.peak, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def _current(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self.peak

    def restart_peak(self) -> None:
        """Forget the peak so far (the warm-up, with compilation); the start level is kept."""
        self.warmup_peak = self._current()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil

            self.peak = psutil.Process().memory_info().rss

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
        return False

    def result(self) -> dict:
        mib = 1024 ** 2
        out = {"measure": self.measure, "peak_mib": round(self.peak / mib, 1),
               "start_mib": round(self.base / mib, 1), "peak_minus_start_mib": round((self.peak - self.base) / mib, 1)}
        if self.warmup_peak is not None:
            out["scope"] = "timed training steps (after warm-up); start = before the first step"
            out["warmup_peak_minus_start_mib (incl. compile)"] = round((self.warmup_peak - self.base) / mib, 1)
        else:
            out["scope"] = "all training steps, including the first (compiling) one"
        return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def report_summary(report) -> dict | None:
    if report is None:
        return None
    decisions: dict = {}
    for r in report.regions:
        key = f"{r.kind}:{r.decision}"
        decisions[key] = decisions.get(key, 0) + 1
    return {"graphs": report.graphs, "regions": len(report.regions), "rewritten": len(report.rewritten),
            "decisions": decisions, "table": report.table().splitlines()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_step(compute_loss, optimizer, device: torch.device) -> tuple[float, float]:
    """One optimizer step on compute_loss(): (loss value, seconds from forward to the optimizer step's end)."""
    _sync(device)
    t0 = time.perf_counter()
    loss = compute_loss()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    _sync(device)
    elapsed = time.perf_counter() - t0
    return loss.item(), elapsed


def evaluate(model, dataset, batch: int, device: torch.device) -> tuple[float, float]:
    """(accuracy, seconds per batch) over `dataset`, in eval mode without grad."""
    model.eval()
    correct, times = 0, []
    with torch.no_grad():
        for start in range(0, len(dataset), batch):
            ids, mask, labels = (t[start:start + batch].to(device) for t in dataset.tensors)
            _sync(device)
            t0 = time.perf_counter()
            logits = model(ids, mask)
            _sync(device)
            times.append(time.perf_counter() - t0)
            correct += (logits.argmax(-1) == labels).sum().item()
    model.train()
    # the first batch may compile (eval mode / no_grad trace anew): leave it out when we can
    steady = times[1:] or times
    return correct / len(dataset), statistics.median(steady)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attention", default="dense", help="attention.method of the sparsify options (dense, spt, ...)")
    p.add_argument("--options-json", default=None, help="extra sparsify options, merged over --attention")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile(backend='sparsify') the classifier (--no-compile: plain eager)")
    p.add_argument("--model", default="minilm", choices=["minilm", "tiny"])
    p.add_argument("--lora", type=int, default=0, metavar="R", help="LoRA rank on query/value (0: full fine-tuning)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the timing")
    p.add_argument("--n-train", type=int, default=0, help="train documents (0: steps * batch, one epoch)")
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--eval-batch", type=int, default=0, help="0: same as --batch")
    p.add_argument("--categories", default=",".join(data_fortunes.DEFAULT_CATEGORIES))
    p.add_argument("--distractor-frac", type=float, default=0.0,
                   help="fraction of each document drawn from mixed-topic fortunes (harder task)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--log-every", type=int, default=10, help="print loss and step time every N steps (0: quiet)")
    p.add_argument("--out", default=None, help="JSON result file")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    categories = [c for c in args.categories.split(",") if c]
    n_train = args.n_train or args.steps * args.batch
    encoder, tokenizer = build_model(args.model, args.seed)
    t0 = time.perf_counter()
    train_set, test_set, labels = data_fortunes.load_splits(
        tokenizer, args.seq_len, n_train, args.n_test, args.seed, categories=categories,
        distractor_frac=args.distractor_frac)
    data_s = time.perf_counter() - t0

    if args.lora:
        encoder = add_lora(encoder, args.lora)
    model = Classifier(encoder, encoder.config.hidden_size, len(labels)).to(device)
    model.train()  # load_minilm returns eval mode; fine-tuning uses BERT's dropout
    loss_fn = nn.CrossEntropyLoss()

    options = resolve_options(args.attention, args.options_json) if args.compile else None
    if args.compile:
        import sparsify  # noqa: F401  (registers the backend and its ops)

        torch._dynamo.reset()  # no cache entries from an earlier run in this process
        # methods with learned state (SPT codebooks, routers) create it from one example batch;
        # before the optimizer is built, so it optimises the new parameters too
        example = train_set.tensors
        sparsify.prepare(model, example[0][: args.batch].to(device), example[1][: args.batch].to(device),
                         options=options)
        torch._dynamo.reset()
        step_model = torch.compile(model, backend="sparsify", options=options)
    else:
        step_model = model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    # a seeded permutation per epoch, so the batch order is reproducible
    gen = torch.Generator().manual_seed(args.seed)
    load_start = _load_avg()
    order = torch.empty(0, dtype=torch.long)
    losses, step_times, first_step_s = [], [], None
    train_report = None
    with PeakMemory(device) as memory:
        for step in range(args.steps):
            if len(order) < args.batch:
                order = torch.cat([order, torch.randperm(len(train_set), generator=gen)])
            idx, order = order[:args.batch], order[args.batch:]
            ids, mask, y = (t[idx].to(device) for t in train_set.tensors)
            loss, elapsed = timed_step(lambda: loss_fn(step_model(ids, mask), y), optimizer, device)
            losses.append(loss)
            if step == 0:
                first_step_s = elapsed
                if args.compile:
                    train_report = _last_report()
            if step >= args.warmup_steps:
                step_times.append(elapsed)
            if args.log_every and (step % args.log_every == 0 or step == args.steps - 1):
                print(f"step {step:5d}  loss {losses[-1]:.4f}  {elapsed:.3f} s", file=sys.stderr, flush=True)
            if step == args.warmup_steps - 1 and step < args.steps - 1:
                memory.restart_peak()  # peak memory of the steady state, not of compilation
    eval_batch = args.eval_batch or args.batch
    accuracy, eval_batch_s = evaluate(step_model, test_set, eval_batch, device)
    eval_report = _last_report() if args.compile else None

    tail = max(1, len(losses) // 10)
    result = {
        "benchmark": "fortunes topic classification (finetune)",
        "model": "all-MiniLM-L6-v2" if args.model == "minilm" else "tiny random BERT (smoke)",
        "finetune": f"lora r={args.lora} (query,value)" if args.lora else "full",
        "attention": args.attention if args.compile else "eager (no compile)",
        "compile": args.compile,
        "options": options,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "steps": args.steps,
        "lr": args.lr,
        "seed": args.seed,
        "data": {"categories": labels, "n_train": len(train_set), "n_test": len(test_set),
                 "distractor_frac": args.distractor_frac,
                 "fortunes_per_split": data_fortunes.describe(categories, args.seed),
                 "build_s": round(data_s, 2)},
        "test_accuracy": round(accuracy, 4),
        "chance_accuracy": round(1 / len(labels), 4),
        "train_loss": {"first": round(losses[0], 4),
                       "mean_first_10pct": round(statistics.mean(losses[:tail]), 4),
                       "mean_last_10pct": round(statistics.mean(losses[-tail:]), 4),
                       "every_10pct": [round(statistics.mean(losses[i:i + tail]), 4)
                                       for i in range(0, len(losses), tail)]},
        "time": {"step_median_s": round(statistics.median(step_times), 4) if step_times else None,
                 "step_p90_s": round(sorted(step_times)[int(0.9 * (len(step_times) - 1))], 4) if step_times else None,
                 "timed_steps": len(step_times), "warmup_steps": args.warmup_steps,
                 "first_step_s (incl. compile)": round(first_step_s, 2),
                 "eval_batch_median_s": round(eval_batch_s, 4), "eval_batch": eval_batch},
        "memory": memory.result(),
        "device": device_name(device),
        # CPU timings are only comparable on an otherwise idle host: keep the load next to them
        "host_load_avg_1m": {"start": load_start, "end": _load_avg()},
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "sparsify_report": {"train": report_summary(train_report), "eval": report_summary(eval_report)},
        "trainable_params": sum(p.numel() for p in params),
    }
    return result


def _last_report():
    import sparsify

    return sparsify.last_report()


def _load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not available on this platform
        return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def print_table(result: dict) -> None:
    rep = result["sparsify_report"]["train"]
    rows = [
        ("attention", str(result["attention"])), ("seq_len x batch", f"{result['seq_len']} x {result['batch']}"),
        ("steps", str(result["steps"])), ("test accuracy", f"{result['test_accuracy']:.4f} "
                                          f"(chance {result['chance_accuracy']:.3f}, n={result['data']['n_test']})"),
        ("train loss first -> last 10%", f"{result['train_loss']['mean_first_10pct']:.3f} -> "
                                         f"{result['train_loss']['mean_last_10pct']:.3f}"),
        ("step median", f"{result['time']['step_median_s']} s"),
        ("first step (compile)", f"{result['time']['first_step_s (incl. compile)']} s"),
        ("peak memory", f"{result['memory']['peak_minus_start_mib']} MiB ({result['memory']['measure']})"),
        ("device", result["device"]),
        ("regions rewritten", f"{rep['rewritten']}/{rep['regions']} {rep['decisions']}" if rep else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
