"""Summarise several finetune.py runs (seeds x variants) into one table: mean, spread, and the paired
difference to the dense variant.

    python benchmarks/finetune_summary.py benchmarks/results/finetune_minilm_seeds/*.json \
        --stem finetune_minilm_seeds_cpu

Runs are grouped by their sparsify options (the `options` field finetune.py writes); the group whose
options rewrite nothing (attention and mlp "dense") is the baseline. Runs with the same seed see the
same data split, test documents, batch order and head initialisation, so the difference to the baseline
is paired per seed: mean and the per-seed values are reported, not only the two means.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402


def label_of(options: dict | None) -> str:
    """A short name for a run's sparsify options: the non-dense methods with their non-default fields."""
    if not options:
        return "eager"
    parts = []
    for kind in ("attention", "mlp"):
        cfg = dict(options.get(kind) or {})
        method = cfg.pop("method", "dense")
        if method != "dense":
            extra = ",".join(f"{k}={v}" for k, v in sorted(cfg.items()))
            parts.append(f"{kind}={method}" + (f"({extra})" if extra else ""))
    return " + ".join(parts) or "dense"


def _mean_sd(values: list) -> tuple[float, float | None]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(runs: list[dict]) -> dict:
    groups: dict[str, dict[int, dict]] = defaultdict(dict)
    for run in runs:
        label = label_of(run.get("options"))
        if run.get("variant_note"):  # same options, different code (e.g. an earlier initialisation)
            label += f" [{run['variant_note']}]"
        if run["seed"] in groups[label]:
            raise ValueError(f"two runs of {label!r} with seed {run['seed']}")
        groups[label][run["seed"]] = run
    baseline = groups.get("dense", {})
    rows = []
    for label, by_seed in groups.items():
        seeds = sorted(by_seed)
        acc = [by_seed[s]["test_accuracy"] for s in seeds]
        mean, sd = _mean_sd(acc)
        paired = [round(by_seed[s]["test_accuracy"] - baseline[s]["test_accuracy"], 4)
                  for s in seeds if s in baseline] if label != "dense" else []
        rows.append({
            "variant": label, "seeds": seeds, "accuracy": acc, "accuracy_mean": round(mean, 4),
            "accuracy_sd": None if sd is None else round(sd, 4),
            "diff_vs_dense_per_seed": paired,
            "diff_vs_dense_mean": round(statistics.mean(paired), 4) if paired else None,
            "step_median_s": [by_seed[s]["time"]["step_median_s"] for s in seeds],
            "peak_minus_start_mib": [by_seed[s]["memory"]["peak_minus_start_mib"] for s in seeds],
            "n_test": sorted({by_seed[s]["data"]["n_test"] for s in seeds}),
            "device": sorted({by_seed[s]["device"] for s in seeds}),
            "load_avg_1m_start": [by_seed[s].get("host_load_avg_1m", {}).get("start") for s in seeds],
        })
    rows.sort(key=lambda r: (r["variant"] != "dense", r["variant"]))
    first = runs[0]
    setting = {k: first[k] for k in ("model", "finetune", "seq_len", "batch", "steps", "lr")}
    setting["distractor_frac"] = first["data"]["distractor_frac"]
    setting["n_train"], setting["n_test"] = first["data"]["n_train"], first["data"]["n_test"]
    return {"benchmark": "fortunes topic classification, several seeds (finetune_summary)",
            "setting": setting, "variants": rows}


def render(summary: dict, notes: list[str] = ()) -> str:
    s = summary["setting"]
    pct = lambda x: "-" if x is None else f"{100 * x:.2f}"  # noqa: E731
    rows = []
    for r in summary["variants"]:
        rows.append([
            r["variant"], ", ".join(map(str, r["seeds"])), " / ".join(pct(a) for a in r["accuracy"]),
            f"{pct(r['accuracy_mean'])} ± {pct(r['accuracy_sd'])}",
            "-" if r["diff_vs_dense_mean"] is None else
            f"{100 * r['diff_vs_dense_mean']:+.2f} ({', '.join(f'{100 * d:+.2f}' for d in r['diff_vs_dense_per_seed'])})",
            " / ".join(f"{t:.2f}" for t in r["step_median_s"]),
            " / ".join(f"{m:.0f}" for m in r["peak_minus_start_mib"]),
        ])
    header = ["variant", "seeds", "test accuracy % per seed", "mean ± sd", "vs dense, points: mean (per seed)",
              "step median s per seed", "peak RSS - start MiB per seed"]
    lines = [
        f"# {s['model']} on fortunes topics ({s['finetune']} fine-tuning), several seeds",
        "",
        f"seq_len {s['seq_len']} x batch {s['batch']}, {s['steps']} AdamW steps, lr {s['lr']}, distractor fraction "
        f"{s['distractor_frac']}, {s['n_train']} train / {s['n_test']} test documents per seed. Device: "
        f"{', '.join(summary['variants'][0]['device'])}. The same seed gives the same split, test set, batch "
        "order and head initialisation to every variant, so 'vs dense' is a paired difference per seed.",
        "",
        T.markdown_table(header, rows),
        "",
        "Times and memory are CPU measurements on a shared 2-core host (load average at each run's start is in "
        "the JSON): indicative only; the CPU path of the sparse ops is the plain-torch reference.",
    ]
    lines += [""] + [f"- {note}" for note in notes] if notes else []
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="finetune.py JSON results")
    p.add_argument("--out-dir", default=T.default_out_dir())
    p.add_argument("--stem", default="finetune_summary")
    p.add_argument("--note", action="append", default=[], help="a line for the notes under the table (repeatable)")
    args = p.parse_args(argv)
    runs = []
    for path in args.runs:
        with open(path) as f:
            runs.append(json.load(f))
    summary = summarise(runs)
    summary["runs"] = [os.path.relpath(p, args.out_dir) for p in args.runs]
    summary["notes"] = args.note
    markdown = render(summary, args.note)
    paths = T.write_results(args.out_dir, args.stem, summary, markdown)
    print(markdown)
    print("wrote", *paths)
    return summary


if __name__ == "__main__":
    main()
