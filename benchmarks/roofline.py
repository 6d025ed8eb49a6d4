"""Roofline predictions of H200 time for the FFN variants bench_ffn measures: a MODEL, not a measurement, printed
beside every measurement so the two can be compared when a GPU runs them.

    ffn_roofline_ms(variant, tokens, d_model, d_ff, blocks=4, dtype_bytes=2) -> predicted fwd+bwd ms (full mode)
    attention_roofline_ms(variant, b, h, n, d, keep=1/8, causal=False) -> predicted fwd+bwd ms of one attention

Machine: H200, 790 TFLOP/s dense bf16/fp16, 4.3 TB/s HBM, 4 us per kernel launch (ops/sparse_down.py H200, the
numbers DEFT's inference="auto" uses). Each GEMM (M x N x K) costs max(2 M N K / P, bytes / BW) + one launch, its
bytes its two operands read once and its output written once; each elementwise pass over an [rows, cols] tensor
reads and writes it once, plus one launch. Assumed: a GEMM kernel at peak (the ratio between variants is what the
model is for; absolute times are optimistic), gathers at full bandwidth.

Variants, full fine-tuning, y = W2 act(W1 x + b1) + b2 (x [T, d], W1 [F, d]):
  dense (torch-eager / inductor / sparsify-mlp): 6 GEMMs (up, down; dgrad and wgrad of each), 2 elementwise
      passes over [T, F] (activation and its derivative; Inductor fuses the bias);
  routed-topk as built (ops/routed_backward.py, training's default, no dropout): top_k of `blocks`
      neuron blocks per token: 6 grouped GEMM kernels (one launch each for all blocks) of T*top_k gathered rows x
      F/blocks (the forward's up kernel also stores W x + b, 16-bit, for the backward: no recompute); the down
      projection and dx scatter-add into fp32 [T, d] buffers by atomics (a read and a write of 4 bytes per
      assignment and column, the buffer initialised and cast to 16 bits after); weight gradients written once in
      16 bits; the activation's backward, gate scaling, gate-gradient row sums and bias-gradient column sums in
      the epilogue of the backward's v = dy W_down GEMM (grouped act_bwd kernel), which writes g h and g dz in 16
      bits: 2 16-bit passes over [T*top_k, F/blocks] in all (the stored W x + b, the epilogue's outputs); the
      router GEMM forward and backward; 8 launches of routing (top-k, sort, offsets, gates, both directions);
  routed-topk-recompute (options mlp.recompute=True, the least memory): the same plus the up GEMM again in
      backward, nothing stored;
  routed-topk-dropout (dropout in the MLP, between the activation and the down projection): the built path
      plus the mask: torch's [T, F] uniform draw and its comparison (as sparsify::mlp draws it, forward and again
      in backward from the seed), its gather to the sorted [T*top_k, F/blocks] rows (1 byte each), read in the up
      kernel's and the act_bwd kernel's epilogues.
"""
from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparsify.ops.sparse_down import H200  # noqa: E402


def gemm_s(m: int, n: int, k: int, b: int = 2) -> float:
    return max(2 * m * n * k / H200["flops"], (m * k + k * n + m * n) * b / H200["bytes_per_s"]) + H200["launch_s"]


def passes_s(count: int, rows: int, cols: int, b: int = 2) -> float:
    return count * (2 * rows * cols * b / H200["bytes_per_s"] + H200["launch_s"])


def grouped_s(a: int, n: int, k: int, blocks: int, b: int = 2, out_bytes: int | None = None,
              scatter: bool = False) -> float:
    """One grouped GEMM kernel (codegen/grouped_gemm.py: every block in ONE launch) of `a` gathered rows, split
    evenly over `blocks`, times [k, n] per block: FLOPs 2 a n k; bytes: the gathered rows once (the swizzled grid
    serves a tile row's other N-tiles from L2), each block's weight tile once, the output once in out_bytes, or,
    scattered (down / dx: rows added into [T, n] by fp32 atomics), read and written in fp32 per assignment."""
    out_bytes = b if out_bytes is None else out_bytes
    out = a * n * 8 if scatter else a * n * out_bytes
    moved = a * k * b + blocks * n * k * b + out
    return max(2 * a * n * k / H200["flops"], moved / H200["bytes_per_s"]) + H200["launch_s"]


def grouped_wgrad_s(a: int, fb: int, k: int, blocks: int, b: int = 2) -> float:
    """The per-block weight gradient [fb, k] = l^T r over each block's rows, one launch, written in 16 bits."""
    moved = a * fb * b + a * k * b + blocks * fb * k * b
    return max(2 * a * fb * k / H200["flops"], moved / H200["bytes_per_s"]) + H200["launch_s"]


def ffn_roofline_ms(variant: str, tokens: int, d: int, f: int, blocks: int = 4, b: int = 2) -> float:
    t = tokens
    if variant in ("torch-eager", "inductor", "sparsify-mlp", "dense"):
        s = 2 * (gemm_s(t, f, d, b) + gemm_s(t, d, f, b)) + gemm_s(f, d, t, b) + gemm_s(d, f, t, b)
        return (s + passes_s(2, t, f, b)) * 1e3
    if variant.startswith("routed-top"):
        top_k = int(variant.split("top")[1].split("-")[0])
        recompute, dropout = variant.endswith("-recompute"), variant.endswith("-dropout")
        a, fb = t * top_k, f // blocks
        up = grouped_s(a, fb, d, blocks, b)                    # forward up (W x + b stored beside it)
        down = grouped_s(a, d, fb, blocks, b, scatter=True)    # forward down, scatter-added into fp32 [T, d]
        bwd = (grouped_s(a, fb, d, blocks, b)                  # v = dy W2 with the act_bwd epilogue
               + grouped_wgrad_s(a, fb, d, blocks, b)          # wgrad of down
               + grouped_s(a, d, fb, blocks, b, scatter=True)  # dgrad of up: dx, scatter-added into fp32
               + grouped_wgrad_s(a, fb, d, blocks, b))         # wgrad of up
        router = 3 * gemm_s(t, blocks, d, b)                   # router forward, its dx and weight gradient
        # routing: top-k, the block sort and offsets, the gate per assignment, forward and backward (small
        # tensors: launches); the fp32 [T, d] buffers of down and dx: initialised (bias / zeros) and cast to 16 bits
        routing = 8 * H200["launch_s"] + 2 * (passes_s(1, t, d, 4) / 2 + passes_s(1, t, d, 3))
        s = up + down + bwd + router + routing
        if dropout:  # twice: the draw [T, F] (fp32 write, compare: read it, write 1 byte), gather, epilogue read
            draw = (t * f * (4 + 4 + 1) + t * f + 2 * a * fb) / H200["bytes_per_s"] + 3 * H200["launch_s"]
            s += 2 * draw
        if recompute:
            s += up + passes_s(1, a, fb, b)  # the recompute GEMM, the epilogue's outputs
        else:
            s += passes_s(2, a, fb, b)       # the stored W x + b, the epilogue's outputs
        return s * 1e3
    raise ValueError(f"no roofline for variant {variant!r}")


# H200 fp32 on CUDA cores (no tensor cores): the SPT token kernels' dot products (they gather other keys per query
# row, so they have no tile product: tests/kernels/test_sm90_all.py)
H200_CUDA_CORE_FLOPS = 67e12


def attention_roofline_ms(variant: str, b: int, h: int, n: int, d: int, keep: float = 0.125,
                          causal: bool = False, block: int = 64, b_bytes: int = 2) -> float:
    """Predicted H200 fwd+bwd ms of one attention call [b, h, n, d] (a MODEL, not a measurement):
      sdpa (flash): 4 d FLOPs per (query, key) pair forward, 2.5x that backward (flash's recompute), on tensor
      cores; q, k, v, o, their gradients moved once;
      spt-block: the same per pair of the kept key blocks (ceil(keep * n / block) per query block) + the selection
      (PQ encode of q and k: d/8 subspaces x 16 codewords x 8 dims each; block scores from code histograms:
      (n/block)^2 x d/8 x 16 products) + 4 launches;
      spt-token: keep * n keys per query on CUDA cores (no tile product) + the PQ encode and top-L selection
      (n^2 x d/8 code comparisons on CUDA cores).
    Causal halves the pairs. Assumed: every kernel at its unit's peak, so absolute times are optimistic; the ratio
    between variants is what the model is for."""
    P, BW, L = H200["flops"], H200["bytes_per_s"], H200["launch_s"]
    pairs = b * h * n * (n + 1) / 2 if causal else b * h * n * n
    io = 8 * b * h * n * d * b_bytes / BW  # q, k, v, o and their gradients
    flash = 3.5 * 4 * d * pairs / P
    if variant in ("sdpa", "sdpa-flash"):
        return (flash + io + 2 * L) * 1e3
    encode = 2 * (2 * b * h * n * (d // 8) * 16 * 8) / P
    if variant.startswith("spt-block"):
        nb = -(-n // block)
        kept = min(nb, math.ceil(keep * nb)) / nb
        select = 2 * b * h * nb * nb * (d // 8) * 16 / P
        return (flash * kept + io + encode + select + 4 * L) * 1e3
    if variant.startswith("spt-token"):
        token = 3.5 * 4 * d * pairs * keep / H200_CUDA_CORE_FLOPS
        select = b * h * n * n * (d // 8) / H200_CUDA_CORE_FLOPS
        return (token + io + encode + select + 4 * L) * 1e3
    raise ValueError(f"no attention roofline for variant {variant!r}")


if __name__ == "__main__":
    for t in (4096, 16384):
        dense = ffn_roofline_ms("dense", t, 2048, 8192)
        print(f"T={t}: dense {dense:.3f} ms", end="")
        for v in ("routed-top2", "routed-top2-recompute", "routed-top2-dropout", "routed-top1"):
            ms = ffn_roofline_ms(v, t, 2048, 8192)
            print(f" | {v} {ms:.3f} ms ({dense / ms:.2f}x)", end="")
        print()
    for n in (4096, 16384):
        sdpa = attention_roofline_ms("sdpa", 1, 16, n, 128)
        print(f"attention n={n} d=128 keep 1/8: sdpa {sdpa:.3f} ms", end="")
        for v in ("spt-block", "spt-token"):
            ms = attention_roofline_ms(v, 1, 16, n, 128)
            print(f" | {v} {ms:.3f} ms ({sdpa / ms:.2f}x)", end="")
        print()
