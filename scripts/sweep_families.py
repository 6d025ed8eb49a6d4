"""The sweep over transformers' model registry: a tiny model of every model type, checked against eager.

    python scripts/sweep_families.py                       # every model type, 2 processes
    python scripts/sweep_families.py --types mistral,qwen2 --jobs 1
    python scripts/sweep_families.py --modes train --impls sdpa --time-box 30   # a narrower, faster matrix
    python scripts/sweep_families.py --resume              # keep the types already in the json, run the rest
    python scripts/sweep_families.py --resume --rerun a,b  # the same, running types a and b again
    python scripts/sweep_families.py --render --note "..." # rewrite docs/families.md from the json, running nothing

Writes docs/families.md (model type x check table, summary counts, every failure with its detail, the types
that could not be built and why) and benchmarks/results/sweep_families.json (every result), both rewritten
after each model type, so an interrupted sweep leaves a valid partial table. What each check means and how
blocks are counted: tests/sweep.py. Each model type runs in a worker process with a soft time box (checks not
started within --time-box seconds are "timeout") and a hard limit (the worker is killed at 3 x the time box +
60 s and the type's unfinished checks are "error").
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import multiprocessing as mp
import os
import sys
import time
from multiprocessing.connection import wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

LETTER = {"pass": "P", "FAIL": "F", "unsupported-build": "U", "error": "E", "timeout": "T"}


def _worker(conn, time_box, modes, impls, checks):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings
    warnings.simplefilter("ignore")
    import torch
    torch.set_num_threads(1)
    import logging
    logging.disable(logging.WARNING)
    import sweep
    while True:
        model_type = conn.recv()
        if model_type is None:
            return
        try:
            record = sweep.run_type(model_type, time_box, modes, impls, checks)
        except BaseException as exc:  # run_type catches per check; this is the sweep's own bug
            record = {"type": model_type, "seconds": 0.0, "model_class": None,
                      "results": {"*": {"status": "error", "detail": f"{type(exc).__name__}: {exc}"[:300]}}}
        conn.send(record)


def run(types, jobs, time_box, modes, impls, checks, on_record):
    ctx = mp.get_context("spawn")
    hard_limit = 3 * time_box + 60
    pending = collections.deque(types)
    workers = {}  # connection -> [process, model type or None, started at]

    def start_worker():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, time_box, modes, impls, checks), daemon=True)
        proc.start()
        workers[parent] = [proc, None, 0.0]

    for _ in range(min(jobs, len(pending))):
        start_worker()
    while workers:
        for conn, state in list(workers.items()):
            if state[1] is None:
                if pending:
                    state[1], state[2] = pending.popleft(), time.time()
                    conn.send(state[1])
                else:
                    conn.send(None)
                    state[0].join(10)
                    del workers[conn]
        ready = wait(list(workers), timeout=2.0)
        for conn in ready:
            proc, model_type, _ = workers[conn]
            try:
                record = conn.recv()
            except EOFError:  # the worker died (a crash inside a model or out of memory)
                record = _lost(model_type, f"worker exited with code {proc.exitcode}", modes, impls, checks)
                del workers[conn]
                start_worker()
            else:
                workers[conn][1] = None
            on_record(record)
        for conn, (proc, model_type, started) in list(workers.items()):
            if model_type is not None and time.time() - started > hard_limit and conn not in ready:
                proc.kill()
                proc.join(10)
                del workers[conn]
                on_record(_lost(model_type, f"killed after {hard_limit:.0f} s", modes, impls, checks))
                if pending:
                    start_worker()


def _lost(model_type, why, modes, impls, checks):
    results = {f"{m}/{i}/{c}": {"status": "error", "detail": why} for m in modes for i in impls for c in checks}
    return {"type": model_type, "seconds": None, "model_class": None, "results": results}


def cell(record, check, combos):
    statuses = [record["results"].get(f"{combo}/{check}", {}).get("status") for combo in combos]
    if "*" in record["results"]:
        statuses = [record["results"]["*"]["status"]] * len(combos)
    if len(set(statuses)) == 1:
        return statuses[0] or "-"
    return " ".join(LETTER.get(s, "-") for s in statuses)


def built(record):
    return any(r["status"] != "unsupported-build" for r in record["results"].values())


def markdown(records, meta, combos, checks):
    import torch
    import transformers
    ran = [r for r in records if built(r)]
    not_built = [r for r in records if not built(r)]
    lines = [
        "# Families: a sweep over transformers' model registry",
        "",
        f"Generated {meta['date']} by `{meta['command']}`: transformers {transformers.__version__}, "
        f"torch {torch.__version__}, {meta['jobs']} process(es), {meta['elapsed_s']:.0f} s wall.",
        *([meta["note"], ""] if meta.get("note") else []),
        f"Matrix: modes {', '.join(meta['modes'])}; attn implementations {', '.join(meta['impls'])}; "
        f"checks {', '.join(meta['checks'])}; time box {meta['time_box_s']:.0f} s per model type.",
        "What the checks are and how blocks are counted: tests/sweep.py (and `pytest -m sweep tests/e2e/test_sweep.py`).",
        "",
        f"Each model type is a tiny `AutoModel.from_config` (2 layers, hidden 64, 4 heads, vocab 128, dropout 0),"
        f" called with 2 x 8 input_ids right-padded on the last row. Per check, a cell is one word when every"
        f" combination agrees, else one letter per combination in the order {', '.join(combos)}"
        f" (P pass, F FAIL, E error, U unsupported-build, T timeout). benchmarks/results/sweep_families.json"
        f" has each result's detail; for a pass, how many regions took the method (a pass where none did"
        f" compared eager with eager: the summary's last column counts the passes where every region did).",
        "",
        "## Summary",
        "",
        f"- model types in the registry (with a base model): {meta['registry']}; swept: {len(records)}"
        + ("" if len(records) >= meta["registry"] else f" (partial: {meta['registry'] - len(records)} not run)"),
        f"- built and ran eagerly on text inputs (some combination): {len(ran)}; not built: {len(not_built)}",
        "",
        "| check | all pass | some FAIL | some error | some timeout | pass with the method on every region |",
        "|---|---|---|---|---|---|",
    ]
    for check in checks:
        statuses = [[r["results"].get(f"{c}/{check}", {}) for c in combos] for r in ran]
        all_pass = sum(all(s.get("status") == "pass" for s in row) for row in statuses)
        fails = sum(any(s.get("status") == "FAIL" for s in row) for row in statuses)
        errors = sum(any(s.get("status") == "error" for s in row) for row in statuses)
        timeouts = sum(any(s.get("status") == "timeout" for s in row) for row in statuses)
        full = sum(all(s.get("status") == "pass" and _full(s.get("detail", "")) for s in row) for row in statuses)
        lines.append(f"| {check} | {all_pass} | {fails} | {errors} | {timeouts} | {full if check != 'blocks' else '-'} |")
    lines += ["", "## Results", "", "| model type | model class | " + " | ".join(checks) + " | seconds |",
              "|---" * (len(checks) + 3) + "|"]
    for r in ran:
        lines.append(f"| {r['type']} | {r['model_class'] or ''} | "
                     + " | ".join(cell(r, c, combos) for c in checks) + f" | {r['seconds']} |")
    lines += ["", "## Failures and errors", ""]
    for r in ran:
        for key, res in r["results"].items():
            if res["status"] in ("FAIL", "error"):
                lines.append(f"- {r['type']} {key}: {res['status']}: {res['detail']}".replace("|", "/"))
    lines += ["", "## Not built (the model type needs inputs or settings the sweep does not make)", ""]
    by_reason = collections.defaultdict(list)
    for r in not_built:
        detail = next(iter(r["results"].values()))["detail"] if r["results"] else "no checks"
        by_reason[detail[:160]].append(r["type"])
    for reason, names in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"- {reason.replace('|', '/')}: {', '.join(sorted(names))}")
    return "\n".join(lines) + "\n"


def _full(detail):
    head = detail.split(";")[0].split(" ")[0]
    if "/" not in head:
        return False
    took, total = head.split("/")
    return took == total and total != "0"


def main(argv=None):
    import sweep
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="", help="comma-separated model types (default: all in the registry)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--time-box", type=float, default=60.0, help="seconds per model type before checks time out")
    parser.add_argument("--modes", default=",".join(sweep.MODES))
    parser.add_argument("--impls", default=",".join(sweep.IMPLS))
    parser.add_argument("--checks", default=",".join(sweep.CHECKS))
    parser.add_argument("--resume", action="store_true", help="keep the types already in --json and run the rest")
    parser.add_argument("--rerun", default="", help="with --resume: comma-separated types to run again (after a fix)")
    parser.add_argument("--render", action="store_true", help="only rewrite --md from --json (runs nothing)")
    parser.add_argument("--note", default=None, help="a sentence for the table's header (why a sweep is partial)")
    parser.add_argument("--md", default=os.path.join(ROOT, "docs", "families.md"))
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "sweep_families.json"))
    args = parser.parse_args(argv)
    registry = sweep.model_types()
    types = [t for t in args.types.split(",") if t] or registry
    unknown = sorted(set(types) - set(registry))
    if unknown:
        parser.error(f"unknown model type(s) {unknown}")
    modes, impls, checks = (tuple(x for x in v.split(",") if x) for v in (args.modes, args.impls, args.checks))
    for name, values, valid in (("modes", modes, sweep.MODES), ("impls", impls, sweep.IMPLS),
                                ("checks", checks, sweep.CHECKS)):
        if not values or set(values) - set(valid):
            parser.error(f"--{name} takes a comma-separated subset of {list(valid)}")
    combos = [f"{m}/{i}" for m in modes for i in impls]

    if args.render:
        with open(args.json) as fh:
            saved = json.load(fh)
        meta = saved["meta"]
        if args.note is not None:
            meta["note"] = args.note
        with open(args.json, "w") as fh:
            json.dump(saved, fh, indent=1)
        combos = [f"{m}/{i}" for m in meta["modes"] for i in meta["impls"]]
        with open(args.md, "w") as fh:
            fh.write(markdown(saved["records"], meta, combos, meta["checks"]))
        print(f"wrote {args.md} from {args.json}")
        return

    records = {}
    previous = {}
    if args.resume and os.path.exists(args.json):
        with open(args.json) as fh:
            previous = json.load(fh)
        records = {r["type"]: r for r in previous.get("records", [])}
    for t in (t for t in args.rerun.split(",") if t):
        if t not in registry:
            parser.error(f"--rerun: unknown model type {t!r}")
        records.pop(t, None)
    todo = [t for t in types if t not in records]
    start = time.time()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python scripts/sweep_families.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "jobs": args.jobs, "registry": len(registry), "modes": modes, "impls": impls, "checks": checks,
            "time_box_s": args.time_box, "elapsed_s": previous.get("meta", {}).get("elapsed_s", 0.0),
            "note": args.note}
    base_elapsed = meta["elapsed_s"]

    def on_record(record):
        records[record["type"]] = record
        meta["elapsed_s"] = base_elapsed + time.time() - start
        ordered = [records[t] for t in registry if t in records]
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "records": ordered}, fh, indent=1)
        with open(args.md, "w") as fh:
            fh.write(markdown(ordered, meta, combos, checks))
        statuses = collections.Counter(r["status"] for r in record["results"].values())
        print(f"[{len(records)}/{len(types)} {meta['elapsed_s']:.0f} s] {record['type']}: "
              + ", ".join(f"{n} {s}" for s, n in statuses.items()), flush=True)

    run(todo, args.jobs, args.time_box, modes, impls, checks, on_record)
    print(f"wrote {args.md} and {args.json} ({meta['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
