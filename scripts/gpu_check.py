"""The one-call GPU check: everything a lent GPU should run, as ONE command of at most about 8 minutes.

    python scripts/gpu_check.py                 # on the GPU machine: CUDA tests, then every speed target
    python scripts/gpu_check.py --tiny          # tiny shapes (what the suite runs on CPU, so the script never
                                                # fails for the first time on the GPU)

Steps, each a subprocess with its own time cap (a step that overruns is recorded as such and the next one runs;
the caps add up to 480 s):
  1. the CUDA tests (`pytest -m gpu`), time-capped;
  2. attention: SDPA (flash on a GPU) against SPT token and block kernels at n 4096, keep 1/8 (bench_attention);
  3. FFN: dense (eager, Inductor) against routed top-2 / top-1 at d_model 2048, 4k and 16k tokens (bench_ffn);
  4. the SPT Table-1 layer (spt_table1);
  5. MST: the block-sparse Linear against cuBLAS and HSA against SDPA, with the H200 roofline (mst_speed);
  6. DEFT: the activation-sparse down projection against dense, with its roofline (deft_inference);
  7. torch.profiler's top kernels of one routed-FFN step and one block-attention step, and the tiles the autotuner
     picked for them (tuned_configs.json).
Everything lands in benchmarks/results/gpu_check_<device>/ (each benchmark's JSON + markdown, the profiles, and
summary.json / summary.md naming the device, each step's status, time and files). Commit that folder.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)


def steps(tiny: bool, out: str) -> list[tuple[str, list[str], int]]:
    """(name, argv, time cap in seconds) per step; `tiny`: the CPU smoke shapes."""
    py = sys.executable
    if tiny:
        return [
            ("cuda tests", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                            os.path.join(ROOT, "tests", "kernels", "test_block_linear_kernel.py")], 120),
            ("attention", [py, os.path.join(BENCH, "bench_attention.py"), "--n", "128", "--head-dims", "32",
                           "--variants", "sdpa", "spt-block", "--out-dir", out, "--max-repeats", "2",
                           "--budget-s", "0.05"], 180),
            ("ffn", [py, os.path.join(BENCH, "bench_ffn.py"), "--sizes", "128x512", "--tokens", "128",
                     "--variants", "torch-eager", "routed-top2", "--out-dir", out, "--max-repeats", "2",
                     "--budget-s", "0.05"], 180),
            ("mst", [py, os.path.join(BENCH, "mst_speed.py"), "--quick", "--out-dir", out, "--max-repeats", "2",
                     "--budget-s", "0.05"], 180),
            ("profile", [py, os.path.abspath(__file__), "--profile-only", "--tiny", "--out", out], 120),
        ]
    return [
        ("cuda tests", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", os.path.join(ROOT, "tests")],
         120),
        ("attention", [py, os.path.join(BENCH, "bench_attention.py"), "--n", "4096", "--head-dims", "64", "128",
                       "--dtypes", "bf16", "--variants", "sdpa", "flex", "spt-token-triton", "spt-block-triton",
                       "--out-dir", out], 80),
        ("ffn", [py, os.path.join(BENCH, "bench_ffn.py"), "--sizes", "2048x8192", "--tokens", "4096", "16384",
                 "--dtypes", "bf16", "--variants", "torch-eager", "inductor", "routed-top2", "routed-top1",
                 "--out-dir", out], 90),
        ("spt table 1", [py, os.path.join(BENCH, "spt_table1.py"), "--out-dir", out], 60),
        ("mst", [py, os.path.join(BENCH, "mst_speed.py"), "--out-dir", out], 60),
        ("deft", [py, os.path.join(BENCH, "deft_inference.py"), "--quick", "--out-dir", out], 30),
        ("profile", [py, os.path.abspath(__file__), "--profile-only", "--out", out], 40),
    ]


def profile(out: str, tiny: bool) -> dict:
    """Top kernels (self time) of one routed-FFN forward + backward and one block-attention forward + backward."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    import sparsify  # noqa: F401  (the ops)

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    results = {}

    def run(name, fn):
        fn()  # warm up (compiles, autotunes)
        with torch_profile(activities=activities) as prof:
            fn()
            if cuda:
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by=sort, row_limit=12)
        with open(os.path.join(out, f"profile_{name}.txt"), "w") as f:
            f.write(table)
        results[name] = table.splitlines()[:16]

    t, d, f = (128, 64, 256) if tiny else (8192, 2048, 8192)

    def weight(*shape):
        return (torch.randn(*shape, device=device) * shape[-1] ** -0.5).to(dtype).requires_grad_(True)
    x = torch.randn(t, d, device=device, dtype=dtype, requires_grad=True)
    up_w, up_b, down_w, down_b = weight(f, d), weight(f), weight(d, f), weight(d)
    router_w, router_b = weight(4, d), torch.zeros(4, device=device, dtype=dtype)

    def routed_step():  # top-2 of 4 blocks, the SPT setting
        out_, _ = torch.ops.sparsify.routed_mlp(x, up_w, up_b, None, None, down_w, down_b, *(None,) * 6,
                                                [1.0, 1.0, 1.0], router_w, router_b, None, 4, 2, "sigmoid2p",
                                                "relu", 0.0, True)[:2]
        out_.sum().backward()
    run("routed_ffn", routed_step)
    n, hd = (128, 32) if tiny else (4096, 64)
    q, k, v = (torch.randn(1, 8, n, hd, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    from sparsify.methods.hsa import HSAOptions, block_pattern
    o = HSAOptions(block=64 if not tiny else 32, window=256 if not tiny else 32, stride=256 if not tiny else 64)
    nb = -(-n // o.block)
    valid = block_pattern(nb, nb, o.pattern, o.window // o.block, o.stride // o.block, device)[None, None]
    index = torch.arange(nb, device=device, dtype=torch.int32).expand(nb, nb)[None, None]

    def attention_step():
        out_, _, _ = torch.ops.sparsify.block_sparse_attention(q, k, v, index, valid, o.block, None, hd ** -0.5,
                                                               True, 0.0)
        out_.sum().backward()
    run("block_attention", attention_step)
    from sparsify.codegen import tuned_configs  # what the autotuner picked for these shapes (empty on CPU)
    results["tuned_configs"] = tuned_configs()
    with open(os.path.join(out, "tuned_configs.json"), "w") as f:
        json.dump(results["tuned_configs"], f, indent=1)
    return results


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU smoke run of the suite)")
    p.add_argument("--out", help="result folder (default benchmarks/results/gpu_check_<device>)")
    p.add_argument("--only", nargs="+", help="run only these steps (by name)")
    p.add_argument("--profile-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch
    import _timing

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or os.path.join(BENCH, "results", f"gpu_check_{_timing.device_slug(device)}")
    os.makedirs(out, exist_ok=True)
    if args.profile_only:
        return profile(out, args.tiny)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, BENCH, os.environ.get("PYTHONPATH")) if p)}
    summary = {"device": _timing.device_name(device), "torch": torch.__version__, "tiny": args.tiny, "steps": []}
    started = time.perf_counter()
    for name, cmd, cap in steps(args.tiny, out):
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=cap)
            status = "ok" if run.returncode == 0 else f"failed (exit {run.returncode})"
            log = run.stdout + run.stderr
        except subprocess.TimeoutExpired as expired:
            status = f"stopped at its {cap} s cap"
            log = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else \
                str(expired.stdout or "")
        with open(os.path.join(out, f"log_{name.replace(' ', '_')}.txt"), "w") as f:
            f.write(log)
        summary["steps"].append({"step": name, "status": status, "seconds": round(time.perf_counter() - t0, 1),
                                 "tail": log.strip().splitlines()[-3:]})
        print(f"{name}: {status} ({summary['steps'][-1]['seconds']} s)", flush=True)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["files"] = sorted(os.listdir(out))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [f"# GPU check on {summary['device']} (torch {summary['torch']}{', tiny shapes' if args.tiny else ''})",
             "", f"{summary['seconds']} s in all.", "",
             _timing.markdown_table(["step", "status", "seconds", "last lines"],
                                    [[s["step"], s["status"], s["seconds"], " / ".join(s["tail"])[-300:]]
                                     for s in summary["steps"]]),
             "", "Files: " + ", ".join(summary["files"])]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return summary


if __name__ == "__main__":
    main()
