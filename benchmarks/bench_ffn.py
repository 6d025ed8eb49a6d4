"""One FFN (MLP block), forward + backward: time and memory of dense and SPT routed variants.

    python benchmarks/bench_ffn.py                  # GPU if there is one, else CPU (capped sizes)
    python benchmarks/bench_ffn.py --quick          # CPU: d 768 / d_ff 3072, 1k and 2k tokens, fp32;
                                                    # GPU: d 2048 / d_ff 8192 (the target case), 4k..16k tokens, fp16
    python benchmarks/bench_ffn.py --sizes 2048x8192 --tokens 8192 --dtypes bf16 --modes full lora

The FFN is y = W2 act(W1 x + b1) + b2 (plain, OPT / BERT style; --activation, default relu as in the SPT
paper's OPT-2048 table), x [T, d] random normal with requires_grad, weights random (std 1/sqrt(fan_in)),
the output gradient random normal. Defaults: GPU sizes 2048x8192 and 768x3072, T in {4096, 8192, 16384},
fp16 and bf16; CPU (capped, fp32) 768x3072 with T in {1024, 2048, 4096} (--quick: {1024, 2048}).

Modes:
  full   every weight and x get gradients (full fine-tuning)
  lora   W1, b1, W2, b2 frozen; LoRA r=16 (alpha 32) on both projections, x and the LoRA factors get
         gradients (the SPT paper's setting); the router (routed variants) is trained in both modes

Variants (each is skipped with a printed reason where it cannot run):
  torch-eager     F.linear -> act -> F.linear in plain torch, eager autograd (the dense baseline)
  inductor        the same function through torch.compile (default backend: Inductor), dynamic=False
  sparsify-mlp    torch.ops.sparsify.mlp (the dense op every MLP region becomes; CUDA: Triton up-projection
                  with fused activation when there is no up-side LoRA; backward recomputes the forward)
  routed-top2     torch.ops.sparsify.routed_mlp, 4 blocks, top-2, gate sigmoid2p, contiguous blocks, router
                  from sparsify.ops.routed_init.init_router (CUDA: generated Triton grouped GEMMs; CPU: the plain-torch
                  per-block implementation)
  routed-top1     the same with top-1 of 4

Measures (see _timing.py): a first call (reported apart: Inductor compiles there), warm-up calls, then repeats
timing forward and forward+backward in the same calls (median reported). CUDA: torch.cuda.synchronize after the
forward and after the backward; peak allocated bytes of one more fwd+bwd (reset before it), absolute and above
what was allocated before the call. CPU and CUDA: bytes the forward saves for backward (saved_tensors_hooks,
unique storages), with and without the storages of x and the parameters. Routed rows also report the block load
(assignments per block of the first call: with random weights the router's choice carries no meaning, only
its balance matters for the time).

Target (GPU only): routed top-2 of 4 fwd+bwd at least 1.7x faster than dense fwd+bwd at d_model 2048, full
fine-tuning; judged against torch-eager, and (a stricter line) against the fastest dense variant measured.
Printed as PASS / FAIL / NOT RUN with the numbers; on CPU always NOT RUN.
Results: benchmarks/results/ffn_<device>.json / .md, with the device name inside.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402
import roofline  # noqa: E402  (H200 predictions beside the measurements)

import sparsify  # noqa: E402,F401  (registers torch.ops.sparsify.*)
from sparsify.ops.mlp import ACTIVATIONS  # noqa: E402
from sparsify.ops.routed_init import init_router  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
VARIANTS = ("torch-eager", "inductor", "sparsify-mlp", "routed-top2", "routed-top1")
DENSE = ("torch-eager", "inductor", "sparsify-mlp")
GPU_SIZES = ["2048x8192", "768x3072"]
CPU_SIZES = ["768x3072"]
GPU_TOKENS = [4096, 8192, 16384]
CPU_TOKENS = [1024, 2048, 4096]
BLOCKS = 4
TARGET_D = 2048
TARGET_SPEEDUP = 1.7


# ------------------------------------------------------------------------------------------ the FFN

class FFN:
    """Weights of one plain FFN (+ optional LoRA factors) and the router of the routed variants."""

    def __init__(self, d: int, d_ff: int, dtype, device, mode: str, rank: int, seed: int):
        g = torch.Generator().manual_seed(seed)

        def rnd(*shape, std):
            return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

        full = mode == "full"
        self.up_w = rnd(d_ff, d, std=d ** -0.5).requires_grad_(full)
        self.up_b = rnd(d_ff, std=0.02).requires_grad_(full)
        self.down_w = rnd(d, d_ff, std=d_ff ** -0.5).requires_grad_(full)
        self.down_b = rnd(d, std=0.02).requires_grad_(full)
        self.lora = None
        self.scale = 1.0
        if mode == "lora":  # peft's init would make B zero; small random B keeps every GEMM non-trivial
            self.scale = 2.0  # alpha / r with alpha = 2 r
            self.lora = [rnd(rank, d, std=d ** -0.5).requires_grad_(), rnd(d_ff, rank, std=0.01).requires_grad_(),
                         rnd(rank, d_ff, std=d_ff ** -0.5).requires_grad_(), rnd(d, rank, std=0.01).requires_grad_()]
        # the router of the routed variants: init_router (block means of W1 rows), trainable in both modes
        rw, rb = init_router(self.up_w.detach(), self.up_b.detach(), None, BLOCKS)
        self.router_w = rw.clone().requires_grad_()
        self.router_b = rb.clone().requires_grad_()

    def params(self) -> list:
        out = [self.up_w, self.up_b, self.down_w, self.down_b]
        if self.lora:
            out += self.lora
        return out

    def all_tensors(self) -> list:
        return self.params() + [self.router_w, self.router_b]

    def lora_args(self) -> tuple:
        """The six LoRA arguments of sparsify::mlp / routed_mlp: (up A, up B, gate A, gate B, down A, down B)."""
        if self.lora is None:
            return (None,) * 6
        a1, b1, a2, b2 = self.lora
        return (a1, b1, None, None, a2, b2)


def torch_ffn(x, up_w, up_b, down_w, down_b, lora, scale: float, activation: str):
    """The dense baseline in plain torch; LoRA in peft's order of operations."""
    act = ACTIVATIONS[activation]
    h = F.linear(x, up_w, up_b)
    if lora is not None:
        h = h + F.linear(F.linear(x, lora[0]), lora[1]) * scale
    h = act(h)
    y = F.linear(h, down_w, down_b)
    if lora is not None:
        y = y + F.linear(F.linear(h, lora[2]), lora[3]) * scale
    return y


# ------------------------------------------------------------------------------------------ measurement

class Case:
    def __init__(self, name, forward, note="", compiled=False, routed_top_k=None):
        self.name, self.forward, self.note, self.compiled = name, forward, note, compiled
        self.routed_top_k = routed_top_k


def measure(case: Case, x, ffn: FFN, grad, device, args) -> dict:
    """First call (for eager code it also collects the saved-for-backward bytes), warm-up, then repeats timing
    forward and forward+backward in the same calls; on CUDA one more call for the peak."""
    leaves = [x] + ffn.all_tensors()
    exclude = leaves

    def clear():
        for t in leaves:
            t.grad = None

    def output(res):
        return res[0] if isinstance(res, (tuple, list)) else res

    def once():
        return T.fwd_bwd_ms(lambda: output(case.forward()), lambda out: out.backward(grad), clear, device)

    def saved():
        res, info = T.saved_bytes(case.forward, exclude=exclude)
        output(res).backward(grad)
        if case.routed_top_k is not None:
            info["block_load"] = block_load(res[1])
        del res
        clear()
        return info

    return {"variant": case.name, "status": "ok", "note": case.note,
            **T.time_fwd_bwd(once, saved, clear, device, args, compiled=case.compiled)}


def block_load(block_ids: torch.Tensor) -> dict:
    counts = torch.bincount(block_ids.reshape(-1).long().cpu(), minlength=BLOCKS).tolist()
    mean = sum(counts) / len(counts)
    return {"assignments_per_block": counts, "max_over_mean": round(max(counts) / mean, 3) if mean else None}


def useful_gflop(variant: str, tokens: int, d: int, d_ff: int, mode: str, rank: int) -> float:
    """FLOPs of the math fwd+bwd (2 per multiply-add), recomputation not counted: forward 4 T d F (dense) or
    top_k / blocks of it + the router; backward twice the forward GEMMs whose gradients are needed
    (full: dx and dW; lora: dx only, + the LoRA factors). Identical for the three dense variants."""
    frac = 1.0
    router = 0
    if variant.startswith("routed"):
        frac = int(variant[-1]) / BLOCKS
        router = 2 * tokens * BLOCKS * d * 3  # logits, dW_r, dx
    base_fwd = 4 * tokens * d * d_ff * frac
    bwd = 2 * base_fwd if mode == "full" else base_fwd  # lora: frozen weights skip the wgrad GEMMs
    lora = 0
    if mode == "lora":  # two projections, each x@A (T r d_in) and (.)@B (T r d_out); fwd + 2x bwd
        lora = 3 * (2 * tokens * rank * (d + d_ff) + 2 * tokens * rank * (d_ff * frac + d))
    return (base_fwd + bwd + router + lora) / 1e9


def build_cases(x, ffn: FFN, args, device, cfg) -> list:
    act = args.activation
    la = ffn.lora_args()
    cases = []
    want = set(args.variants)
    lora_list = ffn.lora

    def dense_fn(x_, up_w, up_b, down_w, down_b, *lora):
        return torch_ffn(x_, up_w, up_b, down_w, down_b, list(lora) if lora else None, ffn.scale, act)

    dense_args = (x, ffn.up_w, ffn.up_b, ffn.down_w, ffn.down_b, *(lora_list or ()))
    if "torch-eager" in want:
        cases.append(Case("torch-eager", lambda: dense_fn(*dense_args), note="F.linear chain, eager autograd"))
    if "inductor" in want:
        compiled = torch.compile(dense_fn, dynamic=False)
        cases.append(Case("inductor", lambda: compiled(*dense_args), compiled=True,
                          note="torch.compile(default backend) of the same function"))
    if "sparsify-mlp" in want:
        note = "torch.ops.sparsify.mlp"
        if device.type == "cuda":
            note += "; Triton up-projection" if lora_list is None else "; up-side LoRA: torch reference forward"
        cases.append(Case("sparsify-mlp", lambda: torch.ops.sparsify.mlp(
            x, ffn.up_w, ffn.up_b, None, None, ffn.down_w, ffn.down_b, *la, [ffn.scale] * 3, act, 0.0),
            note=note))
    for k in (2, 1):
        name = f"routed-top{k}"
        if name not in want:
            continue
        impl = "CPU: plain-torch per-block GEMMs"
        if device.type == "cuda":
            from sparsify.ops.routed import triton_supports
            impl = ("generated Triton grouped GEMMs" if triton_supports(x, *ffn.params()) else
                    "torch per-block fallback (Triton unavailable for this dtype)")
        cases.append(Case(name, lambda k=k: torch.ops.sparsify.routed_mlp(
            x, ffn.up_w, ffn.up_b, None, None, ffn.down_w, ffn.down_b, *la, [ffn.scale] * 3,
            ffn.router_w, ffn.router_b, None, BLOCKS, k, "sigmoid2p", act, 0.0, True),
            note=f"top-{k} of {BLOCKS}, sigmoid2p, init_router, up outputs saved for backward; {impl}",
            routed_top_k=k))
    return cases


# ------------------------------------------------------------------------------------------ checks

def _find(results, key, variant):
    for r in results:
        if _key(r) == key and r["variant"] == variant and r["status"] == "ok":
            return r
    return None


def _key(r):
    return (r["d_model"], r["d_ff"], r["tokens"], r["dtype"], r["mode"])


def evaluate_checks(results, device) -> list:
    title = (f"routed top-2 of {BLOCKS} fwd+bwd >= {TARGET_SPEEDUP}x faster than dense fwd+bwd "
             f"(d_model {TARGET_D}, full fine-tuning)")
    if device.type != "cuda":
        return [{"check": title, "result": "NOT RUN", "why": "GPU target; this run is on CPU"}]
    keys = sorted({_key(r) for r in results if r["d_model"] == TARGET_D and r["mode"] == "full"})
    if not keys:
        return [{"check": title, "result": "NOT RUN", "why": f"d_model {TARGET_D} with mode full was not measured"}]
    checks = []
    for key in keys:
        d, d_ff, tokens, dtype, _ = key
        label = f"d={d} d_ff={d_ff} T={tokens} {dtype}"
        mine = _find(results, key, "routed-top2")
        if mine is None:
            why = next((r.get("reason", "") for r in results if _key(r) == key and r["variant"] == "routed-top2"),
                       "not measured")
            checks.append({"check": f"{title} vs torch-eager [{label}]", "result": "NOT RUN",
                           "why": f"routed-top2: {why}"})
            continue
        base = _find(results, key, "torch-eager")
        if base is None:
            checks.append({"check": f"{title} vs torch-eager [{label}]", "result": "NOT RUN",
                           "why": "torch-eager not measured"})
        else:
            s = base["fwd_bwd_ms"] / mine["fwd_bwd_ms"]
            checks.append({"check": f"{title} vs torch-eager [{label}]",
                           "result": "PASS" if s >= TARGET_SPEEDUP else "FAIL",
                           "why": f"torch-eager {base['fwd_bwd_ms']:.3f} ms / routed-top2 "
                                  f"{mine['fwd_bwd_ms']:.3f} ms = {s:.2f}x"})
        dense = [r for r in (_find(results, key, v) for v in DENSE) if r is not None]
        if dense:
            best = min(dense, key=lambda r: r["fwd_bwd_ms"])
            s = best["fwd_bwd_ms"] / mine["fwd_bwd_ms"]
            checks.append({"check": f"{title} vs the fastest dense variant [{label}]",
                           "result": "PASS" if s >= TARGET_SPEEDUP else "FAIL",
                           "why": f"{best['variant']} {best['fwd_bwd_ms']:.3f} ms / routed-top2 "
                                  f"{mine['fwd_bwd_ms']:.3f} ms = {s:.2f}x"})
    return checks


# ------------------------------------------------------------------------------------------ main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--sizes", nargs="+", help="d_model x d_ff, e.g. 2048x8192 (default: GPU 2048x8192 768x3072, "
                                               "CPU 768x3072)")
    p.add_argument("--tokens", type=int, nargs="+", help="tokens T (default: GPU 4096 8192 16384, CPU 1024 2048 "
                                                         "4096; --quick CPU 1024 2048)")
    p.add_argument("--cpu-max-tokens", type=int, default=4096, help="CPU cap on T (default 4096)")
    p.add_argument("--cpu-max-d", type=int, default=1024, help="CPU cap on d_model (default 1024)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default: GPU fp16 bf16, CPU fp32")
    p.add_argument("--modes", nargs="+", choices=["full", "lora"], default=["full"])
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (mode lora)")
    p.add_argument("--activation", default="relu", choices=sorted(ACTIVATIONS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--quick", action="store_true",
                   help="CPU: 768x3072, T 1024 2048; GPU: 2048x8192 (the target case), T 4096 8192 16384, fp16")
    T.add_timing_args(p, warmup_help="warm-up calls after the first call (default: GPU 3, CPU 1)",
                      stem_help="result file name without extension (default ffn_<device>)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    return T.run_on_device(parse_args(argv), run)


def _sizes(args, gpu) -> tuple[list, list]:
    sizes = args.sizes or (([GPU_SIZES[0]] if args.quick else GPU_SIZES) if gpu else CPU_SIZES)
    parsed = []
    for s in sizes:
        d, f = (int(v) for v in s.lower().split("x"))
        if f % BLOCKS:
            raise SystemExit(f"d_ff={f} is not a multiple of {BLOCKS} blocks")
        parsed.append((d, f))
    capped = []
    if not gpu:
        capped = [f"{d}x{f}" for d, f in parsed if d > args.cpu_max_d]
        parsed = [(d, f) for d, f in parsed if d <= args.cpu_max_d]
    return parsed, capped


def run(args, device) -> dict:
    started = time.perf_counter()
    gpu = device.type == "cuda"
    if args.warmup is None:
        args.warmup = 3 if gpu else 1
    sizes, capped_sizes = _sizes(args, gpu)
    if args.tokens is None:
        args.tokens = GPU_TOKENS if gpu else ([1024, 2048] if args.quick else CPU_TOKENS)
    capped_tokens = [] if gpu else [t for t in args.tokens if t > args.cpu_max_tokens]
    if not gpu:
        args.tokens = [t for t in args.tokens if t <= args.cpu_max_tokens]
    if gpu and args.quick and args.dtypes is None:
        args.dtypes = ["fp16"]
    dtypes = [DTYPES[x] for x in (args.dtypes or (["fp16", "bf16"] if gpu else ["fp32"]))]
    env = T.environment(device)
    print(f"device: {env['device_name']}  torch {env['torch']}")
    caps = []
    if capped_sizes:
        caps.append(f"sizes {capped_sizes} dropped (CPU cap --cpu-max-d {args.cpu_max_d})")
    if capped_tokens:
        caps.append(f"T={capped_tokens} dropped (CPU cap --cpu-max-tokens {args.cpu_max_tokens})")
    for c in caps:
        print("CPU: " + c)
    if not gpu:
        print("CPU run: capped sizes, fp32; timings on a shared CPU are indicative only; the routed op runs its "
              "plain-torch per-block implementation (no Triton)")

    results, configs = [], []
    for mode in args.modes:
        for dtype in dtypes:
            for d, d_ff in sizes:
                for tokens in args.tokens:
                    cfg = {"d_model": d, "d_ff": d_ff, "tokens": tokens, "dtype": DTYPE_NAMES[dtype], "mode": mode,
                           "activation": args.activation, "blocks": BLOCKS,
                           "rank": args.rank if mode == "lora" else None}
                    print(f"\n== d={d} d_ff={d_ff} T={tokens} {cfg['dtype']} mode={mode} act={args.activation}")
                    torch._dynamo.reset()  # each shape compiles anew (dynamic=False); never hit the recompile limit
                    try:
                        torch.manual_seed(args.seed)
                        ffn = FFN(d, d_ff, dtype, device, mode, args.rank, args.seed)
                        x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
                        grad = torch.randn(tokens, d, device=device, dtype=dtype)
                        cases = build_cases(x, ffn, args, device, cfg)
                    except Exception as exc:  # noqa: BLE001
                        if not T.is_oom(exc):
                            raise
                        results.append({**cfg, "variant": "all", "status": "oom", "reason": str(exc)[:300]})
                        continue
                    for case in cases:
                        try:
                            r = measure(case, x, ffn, grad, device, args)
                        except Exception as exc:  # noqa: BLE001
                            msg = f"{type(exc).__name__}: " + (str(exc).strip().splitlines() or [""])[0]
                            status = "oom" if T.is_oom(exc) else "error"
                            if status == "error" and os.environ.get("BENCH_TRACEBACK"):
                                traceback.print_exc()
                            print(f"  {case.name:14s} {status.upper()}: {msg[:300]}")
                            results.append({**cfg, "variant": case.name, "status": status, "reason": msg[:500]})
                            for t in [x] + ffn.all_tensors():
                                t.grad = None
                            if gpu:
                                torch.cuda.empty_cache()
                            continue
                        r = {**cfg, **r, "useful_gflop": round(useful_gflop(case.name, tokens, d, d_ff, mode,
                                                                            args.rank), 3)}
                        if mode == "full":  # the H200 prediction beside the measurement (benchmarks/roofline.py)
                            r["h200_roofline_ms"] = roofline.ffn_roofline_ms(case.name, tokens, d, d_ff, BLOCKS)
                        results.append(r)
                        mem = (f"peak {T.fmt_mib(r['peak_bytes'])} MiB" if gpu else
                               f"saved {T.fmt_mib(r.get('saved_bytes'))} MiB")
                        load = f" load {r['block_load']['assignments_per_block']}" if "block_load" in r else ""
                        print(f"  {case.name:14s} fwd {T.fmt_ms(r['fwd_ms']):>8s} ms  fwd+bwd "
                              f"{T.fmt_ms(r['fwd_bwd_ms']):>8s} ms  {mem}{load}  (first call {r['first_call_s']} s)")
                    configs.append(cfg)
                    del x, grad, ffn, cases
                    if gpu:
                        torch.cuda.empty_cache()

    add_ratios(results)
    checks = evaluate_checks(results, device)
    print(f"\nchecks (GPU target: routed top-2 >= {TARGET_SPEEDUP}x dense fwd+bwd at d_model {TARGET_D}):")
    for c in checks:
        print(f"  {c['result']:8s} {c['check']}: {c['why']}")

    env = T.finish_environment(env, device, started)
    payload = {
        "benchmark": "bench_ffn",
        "environment": env,
        "settings": {k: v for k, v in vars(args).items() if k != "out_dir"},
        "cpu_caps": caps,
        "measures": {
            "time": "median wall ms of repeats after warm-up" + (", torch.cuda.synchronize around each" if gpu else ""),
            "memory": ("peak_bytes: torch.cuda.max_memory_allocated over one fwd+bwd, reset before it (x, weights, "
                       "router and the gradients included); peak_above_baseline_bytes: that peak minus what was "
                       "allocated just before the call; " if gpu else "")
                      + "saved_bytes: bytes saved for backward by the forward (saved_tensors_hooks, unique storages); "
                        "saved_excl_bytes: without the storages of x and the parameters",
            "useful_gflop": "FLOPs of the math fwd+bwd (2 per multiply-add), recomputation not counted",
            "baseline": "torch-eager: F.linear -> act -> F.linear, eager autograd",
        },
        "configs": configs,
        "results": results,
        "checks": checks,
    }
    md = render_markdown(payload, gpu)
    print("\n" + T.text_table(_header(gpu), list(_rows(results, gpu))))
    stem = args.stem or f"ffn_{T.device_slug(device)}"
    paths = T.write_results(args.out_dir, stem, payload, md)
    print(f"\nwrote {paths[0]} and {paths[1]} ({env['wall_s']} s)")
    return payload


def add_ratios(results):
    for r in results:
        if r["status"] != "ok":
            continue
        for base in ("torch-eager", "inductor"):
            b = _find(results, _key(r), base)
            if b is not None:
                r[f"speedup_vs_{base}"] = b["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        if gf := r.get("useful_gflop"):
            r["useful_tflops"] = gf / r["fwd_bwd_ms"]  # GFLOP / ms = TFLOP/s


def _header(gpu):
    mem = ["peak MiB", "peak above baseline MiB", "saved MiB", "saved excl. x/params MiB"] if gpu else \
        ["saved MiB", "saved excl. x/params MiB"]
    return ["d", "d_ff", "T", "dtype", "mode", "variant", "fwd ms", "fwd+bwd ms", *mem,
            "vs torch-eager", "vs inductor", "useful TFLOP/s", "H200 roofline ms (prediction)", "block load", "note"]


def _rows(results, gpu):
    for r in results:
        head = [r["d_model"], r["d_ff"], r["tokens"], r["dtype"], r["mode"], r["variant"]]
        if r["status"] != "ok":
            yield [*head, r["status"].upper(), "", *([""] * (4 if gpu else 2)), "", "", "", "", "",
                   (r.get("reason") or "")[:100]]
            continue
        mem = [T.fmt_mib(r.get("saved_bytes")), T.fmt_mib(r.get("saved_excl_bytes"))]
        if gpu:
            mem = [T.fmt_mib(r.get("peak_bytes")), T.fmt_mib(r.get("peak_above_baseline_bytes"))] + mem
        if "saved_error" in r:
            mem[-2:] = ["n/a", "n/a"]
        ratios = [f"{r[k]:.2f}x" if k in r else "-" for k in ("speedup_vs_torch-eager", "speedup_vs_inductor")]
        load = r.get("block_load")
        yield [*head, T.fmt_ms(r["fwd_ms"]), T.fmt_ms(r["fwd_bwd_ms"]), *mem, *ratios,
               f"{r['useful_tflops']:.3f}" if "useful_tflops" in r else "-",
               f"{r['h200_roofline_ms']:.3f}" if "h200_roofline_ms" in r else "-",
               "/".join(str(c) for c in load["assignments_per_block"]) if load else "", r.get("note", "")]


def roofline_note(configs) -> str:
    """The model's dense / routed ratios for the measured full-mode shapes, the recompute and dropout paths included."""
    parts = []
    for cfg in configs:
        if cfg["mode"] != "full":
            continue
        t, d, f = cfg["tokens"], cfg["d_model"], cfg["d_ff"]
        dense = roofline.ffn_roofline_ms("dense", t, d, f, BLOCKS)
        ratios = ", ".join(f"{v} {dense / roofline.ffn_roofline_ms(v, t, d, f, BLOCKS):.2f}x"
                           for v in ("routed-top2", "routed-top2-recompute", "routed-top2-dropout", "routed-top1"))
        parts.append(f"d {d} x {f}, T {t}: dense {dense:.3f} ms; {ratios}")
    return "; ".join(dict.fromkeys(parts)) or "-"


def render_markdown(payload, gpu):
    env = payload["environment"]
    s = payload["settings"]
    lines = [f"# FFN fwd+bwd benchmark — {'GPU' if gpu else 'CPU'}: {env['device_name']}", ""]
    if not gpu:
        lines += ["**CPU run** — capped sizes (d_model <= "
                  f"{s['cpu_max_d']}, T <= {s['cpu_max_tokens']}; measured: T {', '.join(map(str, s['tokens']))}"
                  f"{' (--quick)' if s['quick'] else ''}), fp32, {env['torch_threads']} torch thread(s) on a shared "
                  "2-core machine: "
                  "timings are indicative only and say nothing about GPU speed. On CPU the routed op runs its "
                  "plain-torch per-block implementation (one torch GEMM per block over the block's gathered rows, "
                  "no Triton), and Inductor generates C++ rather than Triton. Memory is the bytes the forward saves "
                  "for backward (saved_tensors_hooks, unique storages), not a peak. The GPU target is NOT RUN here.",
                  ""]
        if payload["cpu_caps"]:
            lines += ["Capped: " + "; ".join(payload["cpu_caps"]) + ".", ""]
    lines += [f"torch {env['torch']}, triton {env.get('triton')}, {env['date_utc']} UTC, wall {env['wall_s']} s"
              + (f", load average at start/end {env.get('loadavg_at_start')} / {env.get('loadavg_at_end')}"
                 if not gpu else f", CUDA {env.get('cuda')}"), "",
              f"FFN: y = W2 {s['activation']}(W1 x + b1) + b2, random weights, x [T, d] random normal. Modes: "
              f"{', '.join(s['modes'])} (full: all weights and x get gradients; lora: base frozen, LoRA r={s['rank']} "
              "on both projections). Routed: 4 blocks, gate sigmoid2p, contiguous blocks, router from init_router "
              "(trained in both modes). Time: " + payload["measures"]["time"] + ". Memory: "
              + payload["measures"]["memory"] + ". Useful TFLOP/s: " + payload["measures"]["useful_gflop"]
              + " / fwd+bwd time. Block load: assignments per block in the first call.", "",
              T.markdown_table(_header(gpu), _rows(payload["results"], gpu)), "",
              "H200 roofline (benchmarks/roofline.py, a model): " + roofline_note(payload["configs"]), "",
              "## Check (GPU target)", "",
              T.markdown_table(["result", "check", "numbers / reason"],
                               [[c["result"], c["check"], c["why"]] for c in payload["checks"]])]
    errs = [r for r in payload["results"] if r.get("saved_error")]
    if errs:
        lines += ["", "Saved-bytes not measured for compiled code where the hooks were refused: "
                  + "; ".join(f"{r['variant']} T={r['tokens']}: {r['saved_error'][:120]}" for r in errs[:3])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
