"""DEFT inference: where reading only the non-zero activations pays. Measures the MLP's down projection (and the
whole MLP) dense against sparsify::sparse_down, over densities, token counts and sparsity patterns, and models
the same cases on an H200 with a roofline; prints the switch density (the largest density at which the sparse
path is faster) of each case.

    python benchmarks/deft_inference.py                 # CPU here (fp32: the CPU path), a GPU where there is one (fp16)
    python benchmarks/deft_inference.py --quick         # fewer cases (the smoke test)

Patterns of the non-zero activations at density d (the share of non-zero entries of h [T, F]):
- "neuron": a fixed set of d*F neurons is active for every token (dead neurons: the best case; the union of a
  tile's active neurons is d);
- "iid": each entry is non-zero with probability d, independently (the worst case: the union over a tile of
  block_t tokens is 1 - (1 - d)^block_t, close to 1 already at d = 0.25 for block_t = 16).
Real DEFT activations lie between the two; the union density of each case is in the table.

What is measured: the median wall time of F.linear(h, w, b) against torch.ops.sparsify.sparse_down(h, w, b,
block_t) (CPU: the op's reference, a gather + matmul per tile; CUDA: its Triton kernel), and of the whole MLP
(up projection + GELU + down) with the dense or the sparse down projection. The roofline (H200: 790 TFLOP/s
fp16 dense, 4.3 TB/s; 4 us per kernel launch; the assumptions are in sparsify/ops/sparse_down.py roofline_ms,
which DEFT's inference="auto" uses on CUDA) is a prediction, not a measurement. W is stored as W^T rows for the sparse path (sparsify.prepare does that); dense reads the usual
row-major W.
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

from sparsify.ops.sparse_down import H200, roofline_ms  # noqa: E402  (the model "auto" uses on CUDA)
SHAPES = {"minilm": (384, 1536), "bert-base": (768, 3072), "llama-1b": (2048, 8192)}  # (d_model, d_ff)


def activations(tokens: int, d_ff: int, density: float, pattern: str, dtype, device, gen) -> torch.Tensor:
    """h [tokens, d_ff], GELU-like positive values, non-zero at `density` in the given pattern."""
    h = torch.rand((tokens, d_ff), generator=gen, device="cpu").add_(0.05)
    if pattern == "neuron":
        keep = torch.zeros(d_ff, dtype=torch.bool)
        keep[torch.randperm(d_ff, generator=gen)[: round(density * d_ff)]] = True
        h = h * keep
    else:
        h = h * (torch.rand((tokens, d_ff), generator=gen) < density)
    return h.to(device=device, dtype=dtype)


def union_density(h: torch.Tensor, block_t: int) -> float:
    from sparsify.codegen.sparse_down import active_neurons
    _, counts = active_neurons(h, block_t)
    return float(counts.float().mean()) / h.shape[1]


def switch_density(rows: list, key: str) -> float | None:
    """The largest grid density at which the sparse time (key) beats the dense one; None: never."""
    wins = [r["density"] for r in rows if r[key + "_sparse_ms"] < r[key + "_dense_ms"]]
    return max(wins) if wins else None


def run(args, device) -> dict:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(args.seed)
    import sparsify  # noqa: F401  (the ops)

    cases = []
    shapes = ["minilm"] if args.quick else list(args.shapes.split(","))
    densities = [1.0, 0.5, 0.1] if args.quick else [float(d) for d in args.densities.split(",")]
    token_counts = [1, 16] if args.quick else [int(t) for t in args.tokens.split(",")]
    for shape_name in shapes:
        d_model, d_ff = SHAPES[shape_name]
        w_up = torch.randn((d_ff, d_model), generator=gen).div_(d_model ** 0.5).to(device, dtype)
        w = torch.randn((d_model, d_ff), generator=gen).div_(d_ff ** 0.5).to(device, dtype)
        w_rows = w.t().contiguous().t()  # the same W stored as W^T rows (what sparsify.prepare does)
        b = torch.zeros(d_model, device=device, dtype=dtype)
        for tokens in token_counts:
            x = torch.randn((tokens, d_model), generator=gen).to(device, dtype)
            for pattern in ("neuron", "iid"):
                rows = []
                for density in densities:
                    h = activations(tokens, d_ff, density, pattern, dtype, device, gen)
                    union = union_density(h, args.block_t)
                    timing = dict(warmup=2, min_repeats=args.min_repeats, max_repeats=args.max_repeats,
                                  budget_s=args.budget_s)
                    down_dense = _timing.time_call(lambda: F.linear(h, w, b), device, **timing)["median_ms"]
                    down_sparse = _timing.time_call(lambda: torch.ops.sparsify.sparse_down(h, w_rows, b, args.block_t),
                                                    device, **timing)["median_ms"]
                    up = _timing.time_call(lambda: F.gelu(F.linear(x, w_up)), device, **timing)["median_ms"]
                    err = (torch.ops.sparsify.sparse_down(h, w_rows, b, args.block_t).float()
                           - F.linear(h, w, b).float()).abs().max().item()
                    r_dense, r_sparse = roofline_ms(tokens, d_model, d_ff, union, args.block_t)
                    _, r_sparse_t = roofline_ms(tokens, d_model, d_ff, union, args.block_t, layout="row_major")
                    rows.append({"density": density, "union": round(union, 4),
                                 "down_dense_ms": round(down_dense, 4), "down_sparse_ms": round(down_sparse, 4),
                                 "mlp_dense_ms": round(up + down_dense, 4), "mlp_sparse_ms": round(up + down_sparse, 4),
                                 "max_abs_err": err,
                                 "h200_dense_ms": round(r_dense, 5), "h200_sparse_ms": round(r_sparse, 5),
                                 "h200_row_major_dense_ms": round(r_dense, 5),
                                 "h200_row_major_sparse_ms": round(r_sparse_t, 5)})
                cases.append({"shape": shape_name, "d_model": d_model, "d_ff": d_ff, "tokens": tokens,
                              "pattern": pattern, "rows": rows,
                              "switch_measured_down": switch_density(rows, "down"),
                              "switch_measured_mlp": switch_density(rows, "mlp"),
                              "switch_h200_rows": switch_density(rows, "h200"),
                              "switch_h200_row_major": switch_density(rows, "h200_row_major")})
                print(f"{shape_name} T={tokens} {pattern}: switch measured {cases[-1]['switch_measured_down']}, "
                      f"H200 model {cases[-1]['switch_h200_rows']} (row-major W: "
                      f"{cases[-1]['switch_h200_row_major']})", file=sys.stderr, flush=True)
    return {"benchmark": "DEFT sparse inference (sparsify::sparse_down) vs dense", "dtype": str(dtype),
            "block_t": args.block_t, "device": _timing.device_name(device), "roofline": H200, "cases": cases}


def markdown(result: dict) -> str:
    lines = [f"# DEFT sparse inference vs dense ({result['device']}, {result['dtype']}, block_t {result['block_t']})",
             "", "Measured: median wall time of the down projection (F.linear vs sparsify::sparse_down) and of the "
             "whole MLP (up + GELU + down). H200 columns: the roofline model of benchmarks/deft_inference.py "
             "(a prediction, not a measurement). Switch = the largest density of the grid where sparse is faster.",
             "", "| shape | tokens | pattern | density | union | down dense ms | down sparse ms | MLP dense ms | "
             "MLP sparse ms | H200 dense us | H200 sparse us (W^T rows) | H200 sparse us (row-major W) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        for r in c["rows"]:
            lines.append(f"| {c['shape']} | {c['tokens']} | {c['pattern']} | {r['density']:g} | {r['union']:.3f} | "
                         f"{r['down_dense_ms']:.4f} | {r['down_sparse_ms']:.4f} | {r['mlp_dense_ms']:.4f} | "
                         f"{r['mlp_sparse_ms']:.4f} | {1e3 * r['h200_dense_ms']:.2f} | {1e3 * r['h200_sparse_ms']:.2f} | "
                         f"{1e3 * r['h200_row_major_sparse_ms']:.2f} |")
    lines += ["", "| shape | tokens | pattern | switch, measured (down) | switch, measured (MLP) | "
              "switch, H200 model (W^T rows) | switch, H200 model (row-major W) |", "|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        lines.append(f"| {c['shape']} | {c['tokens']} | {c['pattern']} | {c['switch_measured_down']} | "
                     f"{c['switch_measured_mlp']} | {c['switch_h200_rows']} | {c['switch_h200_row_major']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--shapes", default="minilm,bert-base,llama-1b")
    p.add_argument("--tokens", default="1,16,64,1024")
    p.add_argument("--densities", default="1.0,0.93,0.75,0.5,0.25,0.1,0.05",
                   help="0.93: what the DEFT real run reached (benchmarks/results/deft_minilm)")
    p.add_argument("--block-t", type=int, default=16)
    _timing.add_timing_args(p, warmup_help="untimed calls per case", warmup=2, max_repeats=20, budget_s=0.3)
    args = p.parse_args(argv)
    started = time.perf_counter()
    result = _timing.run_on_device(args, run)
    device = _timing.pick_device(args.device)
    result["environment"] = _timing.finish_environment(_timing.environment(device), device, started)
    stem = args.stem or f"deft_inference_{_timing.device_slug(device)}{'_quick' if args.quick else ''}"
    paths = _timing.write_results(args.out_dir, stem, result, markdown(result))
    print(markdown(result))
    print("wrote", *paths)
    return result


if __name__ == "__main__":
    main()
