"""MST speed: the block-sparse Linear (forward + backward) against the dense Linear at 0 / 50 / 75 / 90 % block
sparsity, and HSA's block-sparse attention against SDPA (and FlexAttention with the same BlockMask), each with an
H200 roofline prediction.

    python benchmarks/mst_speed.py            # CPU here (fp32), the GPU where there is one (bf16)
    python benchmarks/mst_speed.py --quick    # fewer, smaller cases (the smoke test)

What is measured (median wall time of one forward + backward, _timing.time_call):
- Linear: x [T, K] -> [T, N], GPT-2 small's MLP shapes. Dense: F.linear (CPU: MKL; CUDA: cuBLAS), the weight's
  dense gradient. Sparse: sparsify::block_sparse_linear with a random block mask at the sparsity (CPU: the op's
  gather per block row; CUDA: the Triton kernels), grad_blocks = the mask (a step between topology updates).
- Attention: causal self-attention [B, H, L, D]. SDPA (is_causal=True: the fastest dense path torch picks:
  flash on a GPU); sparsify::block_sparse_attention with HSA's default union pattern (on CUDA the block kernel;
  on CPU the op's reference, which does the DENSE work and masks: a correctness path, not a sparse kernel);
  FlexAttention compiled with the BlockMask of the same pattern where it compiles on this device.
The roofline is a prediction, not a measurement: H200 790 TFLOP/s bf16 dense, 4.3 TB/s, 4 us per launch; a
sparse kernel is assumed to run its kept FLOPs at the dense kernel's efficiency (so the predicted speed-up is the
upper bound 1 / density, less the launches and the bytes that do not shrink).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

import sparsify  # noqa: E402,F401  (registers the ops)
from sparsify.methods.hsa import HSAOptions, block_pattern, pattern_density  # noqa: E402
from sparsify.ops.sparse_down import H200  # noqa: E402

LINEARS = {"c_fc 768->3072": (768, 3072), "c_proj 3072->768": (3072, 768)}  # (K in, N out)
GPU_TOKENS = 8192  # the tokens of a GPU run (16 x 512): also predicted for a CPU run's shapes


def linear_roofline_ms(tokens: int, k: int, n: int, density: float, bytes_per: int = 2) -> tuple[float, float]:
    """(dense, sparse) ms of forward + backward on an H200 (prediction). FLOPs 6 T N K (x density); bytes: x, W,
    y and their gradients once each (W and dW x density); launches 3 (the block lists are kept per mask between
    topology updates: codegen/block_linear.py block_lists)."""
    P, BW, L = H200["flops"], H200["bytes_per_s"], H200["launch_s"]

    def one(d, launches):
        flops = 6 * tokens * n * k * d
        moved = (3 * tokens * k + 3 * tokens * n + 3 * n * k * d) * bytes_per
        return max(flops / P, moved / BW) + launches * L
    return one(1.0, 3) * 1e3, one(density, 3) * 1e3


def attention_roofline_ms(b: int, h: int, length: int, d: int, density: float) -> tuple[float, float]:
    """(dense causal, sparse) ms of forward + backward on an H200 (prediction): 4 H D FLOPs per kept pair forward,
    2.5x that backward (flash's recompute), pairs L (L + 1) / 2 x density."""
    P, L = H200["flops"], H200["launch_s"]
    pairs = b * h * length * (length + 1) / 2
    one = lambda dens: 3.5 * 4 * d * pairs * dens / P + 2 * L  # noqa: E731
    return one(1.0) * 1e3, one(density) * 1e3


def bench_linear(args, device, dtype, gen):
    rows = []
    tokens = args.tokens
    for name, (k, n) in LINEARS.items():
        for block in args.blocks:
            for sparsity in args.sparsities:
                x = torch.randn(tokens, k, generator=gen).to(device, dtype).requires_grad_(True)
                w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(device, dtype).requires_grad_(True)
                blocks = (torch.rand(n // block, k // block, generator=gen) >= sparsity).to(device)
                dy = torch.randn(tokens, n, generator=gen).to(device, dtype)

                def dense():
                    F.linear(x, w).backward(dy)
                    x.grad = w.grad = None

                def sparse():
                    torch.ops.sparsify.block_sparse_linear(x, w, None, blocks, blocks).backward(dy)
                    x.grad = w.grad = None
                kw = dict(warmup=args.warmup, min_repeats=args.min_repeats, max_repeats=args.max_repeats,
                          budget_s=args.budget_s)
                t_dense = _timing.time_call(dense, device, **kw)["median_ms"]
                t_sparse = _timing.time_call(sparse, device, **kw)["median_ms"]
                density = float(blocks.float().mean())
                pred_dense, pred_sparse = linear_roofline_ms(tokens, k, n, density)
                big_dense, big_sparse = linear_roofline_ms(GPU_TOKENS, k, n, density)
                rows.append({"shape": name, "tokens": tokens, "block": block, "sparsity": sparsity,
                             "density": round(density, 3), "dense_ms": t_dense, "sparse_ms": t_sparse,
                             "speedup": t_dense / t_sparse, "h200_dense_ms": pred_dense, "h200_sparse_ms": pred_sparse,
                             "h200_speedup": pred_dense / pred_sparse,
                             f"h200_speedup_t{GPU_TOKENS}": big_dense / big_sparse})
                print(f"linear {name} T={tokens} block={block} sparsity={sparsity}: dense {t_dense:.2f} ms, "
                      f"sparse {t_sparse:.2f} ms ({t_dense / t_sparse:.2f}x); H200 roofline "
                      f"{pred_dense / pred_sparse:.2f}x", flush=True)
    return rows


def _flex(q, k, v, options: HSAOptions):
    """FlexAttention with the BlockMask of HSA's pattern (compiled), or None where it does not build here."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    bq = options.block

    def mask_mod(b, h, qi, ki):
        gap = qi // bq - ki // bq
        local = gap < options.window // bq
        strided = gap % (options.stride // bq) == 0
        keep = local | strided if options.pattern == "union" else (local if options.pattern == "local" else strided)
        return (ki <= qi) & keep
    length = q.shape[-2]
    block_mask = create_block_mask(mask_mod, None, None, length, length, device=str(q.device), BLOCK_SIZE=bq)
    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, block_mask=block_mask)


def bench_attention(args, device, dtype, gen):
    rows = []
    options = HSAOptions()
    b, h, d = args.batch, args.heads, 64
    for length in args.lengths:
        q, k, v = (torch.randn(b, h, length, d, generator=gen).to(device, dtype).requires_grad_(True)
                   for _ in range(3))
        dy = torch.randn(b, h, length, d, generator=gen).to(device, dtype)
        n = -(-length // options.block)
        kept = block_pattern(n, n, options.pattern, options.window // options.block, options.stride // options.block,
                             device)
        index = torch.arange(n, device=device, dtype=torch.int32).expand(n, n)[None, None]
        valid = kept[None, None]
        scale = d ** -0.5

        def clear():
            q.grad = k.grad = v.grad = None

        def sdpa():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dy)
            clear()

        def ours():
            out = torch.ops.sparsify.block_sparse_attention(q, k, v, index, valid, options.block, None, scale, True,
                                                            0.0)[0]
            out.backward(dy)
            clear()
        kw = dict(warmup=args.warmup, min_repeats=args.min_repeats, max_repeats=args.max_repeats,
                  budget_s=args.budget_s)
        row = {"B": b, "H": h, "L": length, "D": d, "pattern": f"{options.pattern} block {options.block} window "
               f"{options.window} stride {options.stride}",
               "block_density": round(float(kept.float().sum()) / (n * (n + 1) / 2), 3),
               "pair_density": round(pattern_density(length, options), 3),
               "sdpa_ms": _timing.time_call(sdpa, device, **kw)["median_ms"],
               "hsa_ms": _timing.time_call(ours, device, **kw)["median_ms"],
               "hsa_path": "Triton block kernel" if device.type == "cuda" else "CPU reference (dense work, masked)"}
        with torch.no_grad():  # forward only: FlexAttention has no CPU backward
            row["sdpa_fwd_ms"] = _timing.time_call(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                                   device, **kw)["median_ms"]
            row["hsa_fwd_ms"] = _timing.time_call(lambda: torch.ops.sparsify.block_sparse_attention(
                q, k, v, index, valid, options.block, None, scale, True, 0.0), device, **kw)["median_ms"]
        for key, needs_grad in (("flex_fwd_ms", False), ("flex_ms", True)):
            try:
                with torch.set_grad_enabled(needs_grad):
                    flex = _flex(*(t.detach().requires_grad_(needs_grad) for t in (q, k, v)), options)

                    def flex_fn():
                        out = flex()
                        if needs_grad:
                            out.backward(dy)
                    row[key] = _timing.time_call(flex_fn, device, **kw)["median_ms"]
            except Exception as exc:  # noqa: BLE001  (FlexAttention's support is device-dependent: say why)
                row[key] = None
                row[key.replace("_ms", "_error")] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        pred_dense, pred_sparse = attention_roofline_ms(b, h, length, d, row["block_density"])
        row.update(h200_sdpa_ms=pred_dense, h200_hsa_ms=pred_sparse, h200_speedup=pred_dense / pred_sparse)
        rows.append(row)
        print(f"attention L={length}: sdpa {row['sdpa_ms']:.2f} ms, hsa {row['hsa_ms']:.2f} ms ({row['hsa_path']}), "
              f"flex {row.get('flex_ms')} ms; blocks kept {row['block_density']}; H200 roofline "
              f"{row['h200_speedup']:.2f}x", flush=True)
    return rows


def run(args, device):
    started = time.perf_counter()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(args.seed)
    env = _timing.environment(device)
    linear = bench_linear(args, device, dtype, gen)
    attention = bench_attention(args, device, dtype, gen)
    env = _timing.finish_environment(env, device, started)
    md = [f"# MST speed on {_timing.device_name(device)} ({dtype})", "",
          "Median forward + backward wall time. H200 columns: a roofline PREDICTION (benchmarks/mst_speed.py "
          "docstring), not a measurement.", "",
          "## Block-sparse Linear vs dense", "",
          _timing.markdown_table(["shape", "tokens", "block", "sparsity", "dense ms", "block-sparse ms", "speed-up",
                                  "H200 predicted speed-up (these tokens)", f"H200 predicted ({GPU_TOKENS} tokens)"],
                                 [[r["shape"], r["tokens"], r["block"], f"{r['sparsity']:.0%}", _timing.fmt_ms(r["dense_ms"]),
                                   _timing.fmt_ms(r["sparse_ms"]), f"{r['speedup']:.2f}x", f"{r['h200_speedup']:.2f}x",
                                   f"{r[f'h200_speedup_t{GPU_TOKENS}']:.2f}x"] for r in linear]), "",
          "## HSA (union pattern) vs SDPA", "",
          _timing.markdown_table(["B x H x L x D", "blocks kept", "pairs kept", "SDPA fwd / fwd+bwd ms",
                                  "HSA op fwd / fwd+bwd ms", "HSA path", "FlexAttention fwd / fwd+bwd ms",
                                  "H200 predicted speed-up"],
                                 [[f"{r['B']}x{r['H']}x{r['L']}x{r['D']}", r["block_density"], r["pair_density"],
                                   f"{_timing.fmt_ms(r['sdpa_fwd_ms'])} / {_timing.fmt_ms(r['sdpa_ms'])}",
                                   f"{_timing.fmt_ms(r['hsa_fwd_ms'])} / {_timing.fmt_ms(r['hsa_ms'])}", r["hsa_path"],
                                   f"{_timing.fmt_ms(r.get('flex_fwd_ms'))} / "
                                   + (_timing.fmt_ms(r["flex_ms"]) if r.get("flex_ms") else
                                      "n/a (" + r.get("flex_error", "-") + ")"),
                                   f"{r['h200_speedup']:.2f}x"] for r in attention])]
    stem = args.stem or f"mst_speed_{_timing.device_slug(device)}"
    paths = _timing.write_results(args.out_dir, stem, {"environment": env, "linear": linear, "attention": attention},
                                  "\n".join(md))
    print("wrote", *paths)
    return linear, attention


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="small shapes, few cases (the smoke test)")
    _timing.add_timing_args(p, warmup_help="untimed calls per case", warmup=2, max_repeats=10, budget_s=1.0)
    args = p.parse_args(argv)
    gpu = _timing.pick_device(args.device).type == "cuda"
    args.tokens = 256 if args.quick else (GPU_TOKENS if gpu else 2048)
    args.blocks = [32] if args.quick else [32, 64]
    args.sparsities = [0.5, 0.9] if args.quick else [0.0, 0.5, 0.75, 0.9]
    args.lengths = [256] if args.quick else ([1024, 4096] if gpu else [1024, 2048])
    args.batch, args.heads = (1, 2) if args.quick else ((8, 12) if gpu else (1, 4))
    if args.quick:
        global LINEARS
        LINEARS = {"c_fc 128->512": (128, 512)}
    return _timing.run_on_device(args, run)


if __name__ == "__main__":
    main()
