"""One attention call, forward + backward: time and memory of dense and SPT sparse variants.

    python benchmarks/bench_attention.py                 # GPU if there is one, else CPU (capped sizes)
    python benchmarks/bench_attention.py --quick         # CPU: n 512/1024, d 64; GPU: the n=4096 targets, fp16
    python benchmarks/bench_attention.py --n 4096 --head-dims 64 --dtypes fp16   # one configuration

Shapes: q, k, v [B, H, n, d], random normal, requires_grad; the gradient of the output is random normal.
Defaults: GPU n in {512 .. 8192}, d in {64, 128}, fp16 and bf16, B=1, H=16; CPU n in {512, 1024, 2048}
(capped by --cpu-max-n), d in {64, 128}, fp32, B=1, H=4. Non-causal unless --causal.

Variants (each is skipped with a printed reason where it cannot run):
  eager                matmul -> softmax (fp32, as Hugging Face's eager attention) -> matmul, plain torch
  sdpa-flash / sdpa-mem-efficient
                       F.scaled_dot_product_attention under torch.nn.attention.sdpa_kernel (GPU);
  sdpa                 on CPU: SDPA with its default backend choice
  flex-token           FlexAttention (torch.compile'd) with the SPT token selection as a BlockMask
                       (128x128 blocks; a block is "full" if every token pair in it is selected, else partial
                       with a mask_mod reading the dense selection). Token-level top-L hits almost every
                       block, so this shows what a block-sparse kernel makes of a token pattern.
  flex-block           FlexAttention with the SPT *block* selection (only if block mode exists)
  sparsify-dense       torch.ops.sparsify.attention (the dense op every attention region becomes)
  spt-token-select     pq_encode(q) + pq_encode(k) + pq_select, keep L = ceil(keep * n): forward only
  spt-token-attn       spt_attention forward + backward on a precomputed selection
  spt-token            selection + spt_attention forward + backward: what one SPT attention call costs
  spt-token-triton-attn / spt-token-triton
                       CUDA only: the Triton kernels of sparsify.codegen.spt_attention called directly
                       (spt_forward / spt_backward), selection from the ops. Reported because the
                       sparsify::spt_attention op has no CUDA kernel registered at the time of writing
                       (the table says whether it has one when run): on CUDA the op runs its torch reference.
  spt-block-select / spt-block-attn / spt-block
                       if sparsify.ops.spt_block exists: pq_encode + torch.ops.sparsify.pq_select_blocks
                       (keep_blocks = ceil(keep * n / block) key blocks of --block-size keys per query block), then
                       torch.ops.sparsify.block_sparse_attention; skipped with the reason (and the ops' schemas)
                       if the module is absent or the calls fail.
  spt-token-exact-select / spt-token-exact / spt-block-exact-select / spt-block-exact
                       score="exact": torch.ops.sparsify.qk_select (top-L of the true q . k, one Q K^T per
                       query chunk, plain torch on every device) + spt_attention, and qk_select_blocks (pooled
                       q . k per block pair) + block_sparse_attention: what the quality-preserving selection costs
  spt-block-triton-attn / spt-block-triton
                       CUDA only: the codegen block-sparse Triton kernels (block_sparse_forward / backward) on
                       the ops' block selection (the op itself may have no CUDA kernel: the table says).
The PQ codebook is k-means on the benchmark's own q/k (sparsify.methods.spt.init_codebook) or random
(--codebook random). q/k are random, so the selection's *quality* means nothing here (see spt_recall.py);
its cost does not depend on the values.

Measures (see _timing.py): a first call (reported apart: it compiles where there is something to compile),
warm-up calls (on CPU none when the first call alone took longer than the timing budget), then repeats; forward and forward+backward are timed in the same calls (median reported);
CUDA: synchronize after the forward and after the backward, peak allocated bytes of one more fwd+bwd
(reset before each case); CPU (and also on CUDA): bytes saved for backward by the forward
(saved_tensors_hooks, unique storages; collected during the first call, or in an extra call for compiled
code), with and without the inputs' own storages.
Results: benchmarks/results/attention_<device>.json / .md, with the device name inside.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import sys
import time
import traceback
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402
import roofline  # noqa: E402  (H200 predictions beside the measurements)

import sparsify  # noqa: E402,F401  (registers torch.ops.sparsify.*)
from sparsify.methods.spt import init_codebook  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
GPU_N = [512, 1024, 2048, 4096, 8192]
CPU_N = [512, 1024, 2048]
TARGET_N = 4096
VARIANTS = ("eager", "sdpa", "flex", "sparsify-dense", "spt-token", "spt-token-triton", "spt-block",
            "spt-block-triton", "spt-exact")
SUBSPACE, CODEWORDS = 8, 16


# ------------------------------------------------------------------------------------------ variants

def eager_attention(q, k, v, scale, causal):
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        n, m = s.shape[-2], s.shape[-1]
        s = s.masked_fill(~torch.ones(n, m, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def sdpa(q, k, v, scale, causal, backend=None):
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def token_select(q, k, codebook, keep, causal):
    qc = torch.ops.sparsify.pq_encode(q.detach(), codebook)
    kc = torch.ops.sparsify.pq_encode(k.detach(), codebook)
    return torch.ops.sparsify.pq_select(qc, kc, keep, causal, None)


def spt_op_attention(q, k, v, index, valid, scale):
    return torch.ops.sparsify.spt_attention(q, k, v, index, valid, None, scale, 0.0)[0]


class _TritonSPT(torch.autograd.Function):
    """Direct use of the codegen Triton kernels (spt_forward / spt_backward) with autograd."""

    @staticmethod
    def forward(ctx, q, k, v, index, valid, scale, causal):
        from sparsify.codegen.spt_attention import spt_forward
        out, lse = spt_forward(q, k, v, index, valid, None, scale, causal=causal)
        ctx.save_for_backward(q, k, v, index, valid, out, lse)
        ctx.scale, ctx.causal = scale, causal
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from sparsify.codegen.spt_attention import spt_backward
        q, k, v, index, valid, out, lse = ctx.saved_tensors
        dq, dk, dv = spt_backward(grad_out.contiguous(), q, k, v, index, valid, None, lse, ctx.scale,
                                  causal=ctx.causal, out=out)
        return dq, dk, dv, None, None, None, None


def cuda_kernel_registered(op: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"))
    except Exception:  # noqa: BLE001
        return False


# ------------------------------------------------------------------------------------------ FlexAttention

def _flex_available() -> Optional[str]:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"torch.nn.attention.flex_attention not importable: {exc}"
    return None


def block_mask_from_dense(selected: torch.Tensor, block: int = 128):
    """BlockMask of a dense bool selection [B, H, n, m]: full blocks where every pair is selected,
    partial blocks (mask_mod reads `selected`) where some are. Returns (block_mask, block density)."""
    from torch.nn.attention.flex_attention import BlockMask
    b, h, n, m = selected.shape
    nq, nk = math.ceil(n / block), math.ceil(m / block)
    padded = torch.zeros(b, h, nq * block, nk * block, dtype=torch.bool, device=selected.device)
    padded[..., :n, :m] = selected
    tiles = padded.view(b, h, nq, block, nk, block)
    any_ = tiles.any(dim=5).any(dim=3)
    # a tile is full if every *in-range* pair is selected (out-of-range pairs never are)
    inrange = torch.zeros(nq * block, nk * block, dtype=torch.bool, device=selected.device)
    inrange[:n, :m] = True
    covered = (tiles | ~inrange.view(nq, block, nk, block)).all(dim=5).all(dim=3)
    full = any_ & covered
    partial = any_ & ~full

    def lists(flags):
        num = flags.sum(-1).to(torch.int32)
        idx = torch.argsort((~flags).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num.contiguous(), idx.contiguous()

    kv_num, kv_idx = lists(partial)
    full_num, full_idx = lists(full)

    def mask_mod(b_, h_, q_idx, kv_idx_):
        return selected[b_, h_, q_idx, kv_idx_]

    try:
        bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                      mask_mod=mask_mod, seq_lengths=(n, m))
    except TypeError:  # older signature without seq_lengths
        bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod)
    density = any_.float().mean().item()
    return bm, density


def B_H_N_N(q, n):  # noqa: N802  bytes of a dense [B, H, n, n] bool
    return q.shape[0] * q.shape[1] * n * n


def dense_from_token_selection(index, valid, n_keys):
    b, h, n, _ = index.shape
    sel = torch.zeros(b, h, n, n_keys + 1, dtype=torch.bool, device=index.device)
    sel.scatter_(-1, torch.where(valid, index.long(), n_keys), True)
    return sel[..., :n_keys].contiguous()


# ------------------------------------------------------------------------------------------ block mode

BLOCK_MODULE = "sparsify.ops.spt_block"


def find_block_mode() -> tuple[bool, str]:
    """(available, reason or description)."""
    try:
        spec = importlib.util.find_spec(BLOCK_MODULE)
    except Exception as exc:  # noqa: BLE001
        spec, err = None, exc
    else:
        err = None
    if spec is None:
        return False, f"{BLOCK_MODULE} does not exist in this checkout" + (f" ({err})" if err else "")
    try:
        importlib.import_module(BLOCK_MODULE)
    except Exception as exc:  # noqa: BLE001
        return False, f"import {BLOCK_MODULE} failed: {type(exc).__name__}: {exc}"
    missing = [n for n in ("pq_select_blocks", "block_sparse_attention") if not hasattr(torch.ops.sparsify, n)]
    if missing:
        return False, f"{BLOCK_MODULE} imported but torch.ops.sparsify has no {', '.join(missing)}"
    return True, "found"


def block_mode_calls(q, k, v, codebook, keep_frac, causal, scale, block):
    """(select(), attend(block_index, block_valid), keep_blocks) for the block-granular SPT ops:
    pq_select_blocks(q_codes, k_codes, keep_blocks, block, causal, allowed) (allowed None here: no mask) and
    block_sparse_attention(q, k, v, block_index, block_valid, block, mask, scale, causal, dropout_p)."""
    nkb = math.ceil(k.shape[2] / block)
    keep_blocks = max(1, min(nkb, math.ceil(keep_frac * nkb)))

    def select():
        qc = torch.ops.sparsify.pq_encode(q.detach(), codebook)
        kc = torch.ops.sparsify.pq_encode(k.detach(), codebook)
        return torch.ops.sparsify.pq_select_blocks(qc, kc, keep_blocks, block, causal, None)

    def attend(block_index, block_valid):
        return torch.ops.sparsify.block_sparse_attention(q, k, v, block_index, block_valid, block, None, scale,
                                                         causal, 0.0)[0]

    return select, attend, keep_blocks


class _TritonBlock(torch.autograd.Function):
    """Direct use of the codegen block-sparse Triton kernels (block_sparse_forward / backward)."""

    @staticmethod
    def forward(ctx, q, k, v, block_index, block_valid, block, scale, causal):
        from sparsify.codegen.spt_attention import block_sparse_forward
        out, lse = block_sparse_forward(q, k, v, block_index, block_valid, block_m=block, block_n=block,
                                        causal=causal, scale=scale)
        ctx.save_for_backward(q, k, v, block_index, block_valid, out, lse)
        ctx.args = (block, scale, causal)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from sparsify.codegen.spt_attention import block_sparse_backward
        q, k, v, block_index, block_valid, out, lse = ctx.saved_tensors
        block, scale, causal = ctx.args
        dq, dk, dv = block_sparse_backward(grad_out.contiguous(), q, k, v, block_index, block_valid, lse,
                                           block_m=block, block_n=block, causal=causal, scale=scale, out=out)
        return dq, dk, dv, None, None, None, None, None


def _schema_text(name):
    try:
        return str(getattr(torch.ops.sparsify, name).default._schema)
    except Exception:  # noqa: BLE001
        return f"sparsify::{name} (no schema)"


# ------------------------------------------------------------------------------------------ measurement

class Case:
    """One variant on one configuration: forward() -> output (or None), backward(output) -> None."""

    def __init__(self, name, forward, backward=None, note="", exclude=(), compiled=False):
        self.name, self.forward, self.backward, self.note = name, forward, backward, note
        self.exclude, self.compiled = exclude, compiled


def measure(case: Case, inputs, device, args) -> dict:
    """first call (reported apart; for eager code it also collects the saved-for-backward bytes), warm-up,
    then repeats timing forward and forward+backward in the same calls; on CUDA one more call for the peak."""
    def clear():
        for t in inputs:
            t.grad = None

    def once():
        return T.fwd_bwd_ms(case.forward, case.backward, clear, device)

    def saved():
        out, info = T.saved_bytes(case.forward, exclude=case.exclude)
        case.backward(out)
        del out
        clear()
        return info

    return {"variant": case.name, "status": "ok", "note": case.note,
            **T.time_fwd_bwd(once, saved, clear, device, args, compiled=case.compiled,
                             with_saved=case.backward is not None)}


def build_cases(q, k, v, grad, cfg, args, device, state) -> list:
    """The variants for one configuration, as Case objects or ("skip", name, reason) tuples."""
    n, d, causal, keep_frac = cfg["n"], cfg["d"], cfg["causal"], cfg["keep_frac"]
    scale = 1.0 / math.sqrt(d)
    keep = cfg["keep"]
    inputs = (q, k, v)

    def bwd(out):
        out.backward(grad)

    cases = []
    want = set(args.variants)

    if "eager" in want:
        cases.append(Case("eager", lambda: eager_attention(q, k, v, scale, causal), bwd, exclude=inputs))
    if "sdpa" in want:
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend
            for label, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                                   ("sdpa-mem-efficient", SDPBackend.EFFICIENT_ATTENTION)):
                cases.append(Case(label, lambda b=backend: sdpa(q, k, v, scale, causal, b), bwd, exclude=inputs))
        else:
            cases.append(Case("sdpa", lambda: sdpa(q, k, v, scale, causal), bwd,
                              note="CPU: SDPA's default backend", exclude=inputs))
    if "sparsify-dense" in want:
        cases.append(Case("sparsify-dense",
                          lambda: torch.ops.sparsify.attention(q, k, v, None, scale, 0.0, causal)[0], bwd,
                          exclude=inputs))

    need_token = want & {"spt-token", "flex", "spt-token-triton"}
    codebook = None
    if need_token or "spt-block" in want:
        if args.codebook == "kmeans":
            codebook = init_codebook([(q.detach(), k.detach())], d, SUBSPACE, CODEWORDS)
        else:
            g = torch.Generator().manual_seed(0)
            codebook = torch.randn(d // SUBSPACE, CODEWORDS, SUBSPACE, generator=g)
        codebook = codebook.to(device=device, dtype=q.dtype)
    index = valid = None
    if need_token:
        index, valid = token_select(q, k, codebook, keep, causal)
        cfg["token_cuda_kernel_registered"] = cuda_kernel_registered("sparsify::spt_attention")
    if "spt-token" in want:
        op_note = "" if device.type != "cuda" or cfg["token_cuda_kernel_registered"] else \
            "op has no CUDA kernel: torch reference on CUDA"
        cases.append(Case("spt-token-select", lambda: token_select(q, k, codebook, keep, causal), None,
                          note="no backward (selection has no gradient)"))
        cases.append(Case("spt-token-attn", lambda: spt_op_attention(q, k, v, index, valid, scale), bwd,
                          note=op_note, exclude=inputs + (index, valid)))

        def spt_total():
            i, m = token_select(q, k, codebook, keep, causal)
            return spt_op_attention(q, k, v, i, m, scale)
        cases.append(Case("spt-token", spt_total, bwd, note=op_note, exclude=inputs))

    if "spt-exact" in want:
        cases.append(Case("spt-token-exact-select", lambda: torch.ops.sparsify.qk_select(q.detach(), k.detach(), keep,
                                                                                          causal, None),
                          None, note="score='exact': top-L of q.k; no backward"))

        def exact_total():
            i, m = torch.ops.sparsify.qk_select(q.detach(), k.detach(), keep, causal, None)
            return spt_op_attention(q, k, v, i, m, scale)
        cases.append(Case("spt-token-exact", exact_total, bwd, note="qk_select + spt_attention", exclude=inputs))
        if state["block_mode"][0]:
            bs = args.block_size
            _, attend, keep_blocks = block_mode_calls(q, k, v, None, keep_frac, causal, scale, bs)

            def exact_blocks():
                return torch.ops.sparsify.qk_select_blocks(q.detach(), k.detach(), keep_blocks, bs, causal, None)
            cases.append(Case("spt-block-exact-select", exact_blocks, None, note="score='exact'; no backward"))
            cases.append(Case("spt-block-exact", lambda: attend(*exact_blocks()), bwd,
                              note=f"qk_select_blocks + block_sparse_attention, block {bs}, {keep_blocks} key blocks",
                              exclude=inputs))

    if "spt-token-triton" in want:
        if device.type != "cuda":
            cases.append(("skip", "spt-token-triton", "CUDA only (Triton kernels called directly)"))
        else:
            try:
                importlib.import_module("sparsify.codegen.spt_attention")
                import triton  # noqa: F401
            except Exception as exc:  # noqa: BLE001
                cases.append(("skip", "spt-token-triton", f"codegen not importable: {exc}"))
            else:
                cases.append(Case("spt-token-triton-attn",
                                  lambda: _TritonSPT.apply(q, k, v, index, valid, scale, causal), bwd,
                                  note="codegen kernels called directly", exclude=inputs + (index, valid)))

                def triton_total():
                    i, m = token_select(q, k, codebook, keep, causal)
                    return _TritonSPT.apply(q, k, v, i, m, scale, causal)
                cases.append(Case("spt-token-triton", triton_total, bwd,
                                  note="op selection + codegen kernels", exclude=inputs))

    block_sel = None
    if "spt-block" in want:
        ok, why = state["block_mode"]
        if not ok:
            cases.append(("skip", "spt-block", why))
        else:
            bs = args.block_size
            try:
                select, attend, keep_blocks = block_mode_calls(q, k, v, codebook, keep_frac, causal, scale, bs)
                block_sel = select()
                cfg["keep_blocks"] = keep_blocks
            except Exception as exc:  # noqa: BLE001
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                cases.append(("skip", "spt-block", f"could not call the block-mode ops ({type(exc).__name__}: {msg}); "
                              f"schemas: {_schema_text('pq_select_blocks')}; {_schema_text('block_sparse_attention')}"))
            else:
                blk_note = f"block {bs}, {keep_blocks} of {math.ceil(n / bs)} key blocks per query block"
                reg = cuda_kernel_registered("sparsify::block_sparse_attention")
                cfg["block_cuda_kernel_registered"] = reg
                op_note = blk_note + ("" if device.type != "cuda" or reg else "; op has no CUDA kernel: torch reference")
                cases.append(Case("spt-block-select", select, None, note="no backward"))
                cases.append(Case("spt-block-attn", lambda: attend(*block_sel), bwd, note=op_note,
                                  exclude=inputs + tuple(block_sel)))
                cases.append(Case("spt-block", lambda: attend(*select()), bwd, note=op_note, exclude=inputs))
                if "spt-block-triton" in want:
                    if device.type != "cuda":
                        cases.append(("skip", "spt-block-triton", "CUDA only (Triton kernels called directly)"))
                    else:
                        cases.append(Case("spt-block-triton-attn",
                                          lambda: _TritonBlock.apply(q, k, v, *block_sel, bs, scale, causal), bwd,
                                          note=blk_note + "; codegen kernels called directly",
                                          exclude=inputs + tuple(block_sel)))
                        cases.append(Case("spt-block-triton",
                                          lambda: _TritonBlock.apply(q, k, v, *select(), bs, scale, causal), bwd,
                                          note=blk_note + "; op selection + codegen kernels", exclude=inputs))

    if "flex" in want:
        reason = _flex_available()
        flex_ok = reason is None and not state.get("flex_skip")
        skip_n = f"n={n} not in --flex-n (each shape compiles its own kernels)" if args.flex_n and n not in args.flex_n \
            else None
        # the BlockMasks are built (and their density reported) even where flex itself cannot run
        bm = bmb = None
        if reason is None:
            try:
                bm, density = block_mask_from_dense(dense_from_token_selection(index, valid, n))
                cfg["flex_token_block_density"] = round(density, 4)
            except Exception as exc:  # noqa: BLE001
                cases.append(("skip", "flex-token", f"BlockMask build failed: {type(exc).__name__}: {exc}"))
            if block_sel is not None:
                try:
                    bs = args.block_size
                    bi, bv = block_sel
                    nkb = math.ceil(n / bs)
                    flags = torch.zeros(*bi.shape[:3], nkb + 1, dtype=torch.bool, device=q.device)
                    flags.scatter_(-1, torch.where(bv, bi.long().clamp(0, nkb), nkb), True)
                    sel_b = flags[..., :nkb].repeat_interleave(bs, 2).repeat_interleave(bs, 3)[..., :n, :n]
                    if causal:
                        sel_b = sel_b & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
                    bmb, dens_b = block_mask_from_dense(sel_b.contiguous(), block=bs)
                    cfg["flex_block_block_density"] = round(dens_b, 4)
                except Exception as exc:  # noqa: BLE001
                    cases.append(("skip", "flex-block", f"BlockMask from the block selection failed: {exc}"))
        for name, mask, label in (("flex-token", bm, "BlockMask 128x128"),
                                  ("flex-block", bmb, f"BlockMask {args.block_size}x{args.block_size}")):
            if name == "flex-block" and block_sel is None:
                continue
            why = reason or state.get("flex_skip") or skip_n
            if why:
                cases.append(("skip", name, why))
            elif mask is not None and flex_ok:
                flex = state["flex_fn"]
                dens = cfg.get("flex_token_block_density" if name == "flex-token" else "flex_block_block_density")
                cases.append(Case(name, lambda m=mask: flex(q, k, v, block_mask=m, scale=scale), bwd,
                                  note=f"{label}, {dens:.0%} of blocks non-empty; its mask_mod reads a resident "
                                       f"[B,H,n,n] bool ({B_H_N_N(q, n) / T.MiB:.0f} MiB, not in its peak above "
                                       "baseline)", exclude=inputs, compiled=True))
    return cases


# ------------------------------------------------------------------------------------------ checks

def _find(results, n, d, dtype, variant):
    for r in results:
        if (r["n"], r["d"], r["dtype"], r["variant"]) == (n, d, dtype, variant) and r["status"] == "ok":
            return r
    return None


def evaluate_checks(results, device, args) -> list:
    """The issue's GPU targets at n=4096, keep=1/8. PASS / FAIL / NOT RUN, with the numbers."""
    checks = []
    combos = sorted({(r["d"], r["dtype"]) for r in results if r["n"] == TARGET_N})
    targets = [
        ("block mode (sparsify ops) fwd+bwd >= 2x faster than SDPA flash", "spt-block", "sdpa-flash", False),
        ("block mode (codegen Triton kernels, direct) fwd+bwd >= 2x faster than SDPA flash", "spt-block-triton",
         "sdpa-flash", False),
        ("token mode (sparsify ops) fwd+bwd >= 2x faster than eager, peak memory <= 1/2 of eager",
         "spt-token", "eager", True),
        ("token mode (codegen Triton kernels, direct) fwd+bwd >= 2x faster than eager, peak <= 1/2 of eager",
         "spt-token-triton", "eager", True),
    ]
    for title, mine, base, with_mem in targets:
        if device.type != "cuda":
            checks.append({"check": title, "result": "NOT RUN", "why": "GPU target; this run is on CPU"})
            continue
        if abs(args.keep - 0.125) > 1e-9:
            checks.append({"check": title, "result": "NOT RUN", "why": f"keep={args.keep}, target is 1/8"})
            continue
        if not combos:
            checks.append({"check": title, "result": "NOT RUN", "why": f"n={TARGET_N} was not measured"})
            continue
        for d, dtype in combos:
            label = f"{title} [n={TARGET_N}, d={d}, {dtype}]"
            a, b = _find(results, TARGET_N, d, dtype, mine), _find(results, TARGET_N, d, dtype, base)
            if a is None or b is None:
                missing = mine if a is None else base
                why = next((r.get("reason", "") for r in results if (r["n"], r["d"], r["dtype"], r["variant"])
                            == (TARGET_N, d, dtype, missing)), "not measured")
                checks.append({"check": label, "result": "NOT RUN", "why": f"{missing}: {why}"})
                continue
            speed = b["fwd_bwd_ms"] / a["fwd_bwd_ms"]
            ok = speed >= 2.0
            detail = f"{base} {b['fwd_bwd_ms']:.3f} ms / {mine} {a['fwd_bwd_ms']:.3f} ms = {speed:.2f}x"
            if with_mem:  # memory the call itself allocates: peak above what was resident before it
                key = "peak_above_baseline_bytes"
                mem = a[key] / b[key]
                ok = ok and mem <= 0.5
                detail += (f"; peak above baseline {mine} {a[key] / T.MiB:.0f} MiB / {base} "
                           f"{b[key] / T.MiB:.0f} MiB = {mem:.2f} (absolute peaks {a['peak_bytes'] / T.MiB:.0f} / "
                           f"{b['peak_bytes'] / T.MiB:.0f} MiB)")
            checks.append({"check": label, "result": "PASS" if ok else "FAIL", "why": detail})
    return checks


# ------------------------------------------------------------------------------------------ main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--n", type=int, nargs="+", help="sequence lengths (default: GPU 512..8192, CPU 512..2048)")
    p.add_argument("--cpu-max-n", type=int, default=2048, help="CPU cap on n (default 2048)")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default: GPU fp16 bf16, CPU fp32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, help="default: GPU 16, CPU 4")
    p.add_argument("--keep", type=float, default=0.125, help="fraction of keys kept per query (L = ceil(keep*n))")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--codebook", choices=["kmeans", "random"], default="kmeans")
    p.add_argument("--block-size", type=int, default=64, help="block mode: query/key block size")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--flex-n", type=int, nargs="*", default=None,
                   help="run FlexAttention only at these n (each shape compiles fwd+bwd kernels; default on GPU: "
                        "1024 and 4096; '--flex-n' with no value: every n)")
    p.add_argument("--quick", action="store_true",
                   help="small sweep: CPU n in {512, 1024}, d=64; GPU n=4096 (the target case), d 64 and 128, fp16")
    T.add_timing_args(p, warmup_help="warm-up calls after the first call (default: GPU 2, CPU 1)",
                      stem_help="result file name without extension (default attention_<device>)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    return T.run_on_device(parse_args(argv), run)


def run(args, device) -> dict:
    started = time.perf_counter()
    gpu = device.type == "cuda"
    if args.warmup is None:
        args.warmup = 2 if gpu else 1
    if args.n is None:
        args.n = ([TARGET_N] if args.quick else GPU_N) if gpu else ([512, 1024] if args.quick else CPU_N)
    if args.flex_n is None:  # each flex shape compiles fwd+bwd kernels (tens of seconds): two n by default
        args.flex_n = [1024, TARGET_N] if gpu else []
    if gpu and args.quick and args.dtypes is None:
        args.dtypes = ["fp16"]
    capped = [n for n in args.n if n > args.cpu_max_n] if not gpu else []
    if capped:
        print(f"CPU: n={capped} dropped (cap --cpu-max-n {args.cpu_max_n})")
        args.n = [n for n in args.n if n <= args.cpu_max_n]
    if args.quick and not gpu and args.head_dims == [64, 128]:
        args.head_dims = [64]
    dtypes = [DTYPES[x] for x in (args.dtypes or (["fp16", "bf16"] if gpu else ["fp32"]))]
    heads = args.heads or (16 if gpu else 4)
    env = T.environment(device)
    print(f"device: {env['device_name']}  torch {env['torch']}")
    if not gpu:
        print("CPU run: timings on a shared CPU are indicative only; memory = bytes saved for backward")

    state = {"block_mode": find_block_mode()}
    print(f"block mode: {'found' if state['block_mode'][0] else 'NOT RUN: ' + state['block_mode'][1]}")
    if "flex" in args.variants and not _flex_available():
        from torch.nn.attention.flex_attention import flex_attention
        state["flex_fn"] = torch.compile(flex_attention, dynamic=False)

    results, configs = [], []
    for dtype in dtypes:
        for d in args.head_dims:
            for n in args.n:
                torch.manual_seed(args.seed)
                keep = max(1, min(n, math.ceil(args.keep * n)))
                cfg = {"n": n, "d": d, "dtype": DTYPE_NAMES[dtype], "B": args.batch, "H": heads,
                       "causal": args.causal, "keep_frac": args.keep, "keep": keep}
                shape = (args.batch, heads, n, d)
                q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
                grad = torch.randn(shape, device=device, dtype=dtype)
                print(f"\n== n={n} d={d} {cfg['dtype']} B={args.batch} H={heads} keep={keep} "
                      f"causal={args.causal}")
                torch._dynamo.reset()  # flex recompiles per shape; never hit the recompile limit
                try:
                    cases = build_cases(q, k, v, grad, cfg, args, device, state)
                except Exception as exc:  # noqa: BLE001
                    if not T.is_oom(exc):
                        raise
                    cases = [("skip", "all", f"OOM while preparing: {exc}")]
                for case in cases:
                    if isinstance(case, tuple):
                        _, name, reason = case
                        print(f"  {name:22s} NOT RUN: {reason}")
                        results.append({**cfg, "variant": name, "status": "skipped", "reason": reason})
                        continue
                    try:
                        r = measure(case, (q, k, v), device, args)
                    except Exception as exc:  # noqa: BLE001
                        msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                        status = "oom" if T.is_oom(exc) else "error"
                        if case.name.startswith("flex") and "CPU" in msg:
                            state["flex_skip"] = msg  # the same on every later CPU config: do not retry
                            status = "skipped"
                        if status == "error" and os.environ.get("BENCH_TRACEBACK"):
                            traceback.print_exc()
                        print(f"  {case.name:22s} {status.upper()}: {msg[:300]}")
                        results.append({**cfg, "variant": case.name, "status": status, "reason": msg[:500]})
                        for t in (q, k, v):
                            t.grad = None
                        if gpu:
                            torch.cuda.empty_cache()
                        continue
                    r = {**cfg, **r}
                    results.append(r)
                    mem = (f"peak {T.fmt_mib(r['peak_bytes'])} MiB" if gpu else
                           f"saved {T.fmt_mib(r.get('saved_bytes'))} MiB")
                    print(f"  {case.name:22s} fwd {T.fmt_ms(r['fwd_ms']):>8s} ms  fwd+bwd "
                          f"{T.fmt_ms(r['fwd_bwd_ms']):>8s} ms  {mem}  {r['note']}")
                configs.append(cfg)
                del q, k, v, grad
                if gpu:
                    torch.cuda.empty_cache()

    add_ratios(results)
    checks = evaluate_checks(results, device, args)
    print("\nchecks (issue targets, GPU, n=4096, keep=1/8):")
    for c in checks:
        print(f"  {c['result']:8s} {c['check']}: {c['why']}")

    env = T.finish_environment(env, device, started)
    payload = {
        "benchmark": "bench_attention",
        "environment": env,
        "settings": {k_: v_ for k_, v_ in vars(args).items() if k_ not in ("out_dir",)},
        "measures": {
            "time": "median wall ms of repeats after warm-up" + (", torch.cuda.synchronize around each" if gpu else ""),
            "memory": ("peak_bytes: torch.cuda.max_memory_allocated over one fwd+bwd, reset before each case "
                       "(includes everything resident: q/k/v, the precomputed selections and BlockMasks of the "
                       "configuration); peak_above_baseline_bytes: that peak minus what was allocated just before the "
                       "call, i.e. what the call itself needs (gradients included) -- the memory check uses this"
                       if gpu else "")
                      + ("; " if gpu else "") + "saved_bytes: bytes saved for backward by the forward "
                      "(saved_tensors_hooks, unique storages); saved_excl_bytes: without the inputs' storages",
            "baseline": "eager (matmul-softmax-matmul) and SDPA" + (" flash / mem-efficient" if gpu else " (CPU default)"),
        },
        "block_mode": {"available": state["block_mode"][0], "reason": state["block_mode"][1]},
        "configs": configs,
        "results": results,
        "checks": checks,
    }
    md = render_markdown(payload, gpu)
    print("\n" + render_text(results, gpu))
    stem = args.stem or f"attention_{T.device_slug(device)}"
    paths = T.write_results(args.out_dir, stem, payload, md)
    print(f"\nwrote {paths[0]} and {paths[1]} ({env['wall_s']} s)")
    return payload


def add_ratios(results):
    for r in results:
        if r["status"] != "ok":
            continue
        for base in ("eager", "sdpa-flash", "sdpa"):
            b = _find(results, r["n"], r["d"], r["dtype"], base)
            if b is not None:
                r[f"speedup_vs_{base}"] = b["fwd_bwd_ms"] / r["fwd_bwd_ms"]


def _rows(results, gpu):
    for r in results:
        if r["status"] != "ok":
            yield [r["n"], r["d"], r["dtype"], r["variant"], r["status"].upper(), "", "", "", "",
                   *([""] if gpu else []), (r.get("reason") or "")[:90]]
            continue
        if gpu:
            mem = [T.fmt_mib(r.get("peak_bytes")), T.fmt_mib(r.get("peak_above_baseline_bytes")),
                   T.fmt_mib(r.get("saved_bytes"))]
        else:
            mem = [T.fmt_mib(r.get("saved_bytes")), T.fmt_mib(r.get("saved_excl_bytes"))]
        sp = r.get("speedup_vs_eager") if not r["variant"].endswith("-select") else None
        yield [r["n"], r["d"], r["dtype"], r["variant"], T.fmt_ms(r["fwd_ms"]), T.fmt_ms(r["fwd_bwd_ms"]),
               *mem, f"{sp:.2f}x" if sp else "-", r.get("note", "")]


def _header(gpu):
    mem = ["peak MiB", "peak above baseline MiB", "saved MiB"] if gpu else ["saved MiB", "saved excl. q/k/v MiB"]
    return ["n", "d", "dtype", "variant", "fwd ms", "fwd+bwd ms", *mem, "vs eager (fwd+bwd)", "note"]


def render_text(results, gpu):
    return T.text_table(_header(gpu), list(_rows(results, gpu)))


def roofline_note(configs) -> str:
    """The model's fwd+bwd ms of SDPA flash and the SPT block / token kernels for the measured shapes (batch, heads,
    keep, causality as run; the GPU's shapes are what it is for)."""
    parts = []
    for c in configs:
        shape = (c["B"], c["H"], c["n"], c["d"], c["keep_frac"], bool(c["causal"]))
        sdpa = roofline.attention_roofline_ms("sdpa", *shape)
        ratios = ", ".join(f"{v} {sdpa / roofline.attention_roofline_ms(v, *shape):.2f}x"
                           for v in ("spt-block", "spt-token"))
        parts.append(f"n {c['n']} d {c['d']}: sdpa {sdpa:.3f} ms; {ratios}")
    return "; ".join(dict.fromkeys(parts)) or "-"


def render_markdown(payload, gpu):
    env = payload["environment"]
    s = payload["settings"]
    lines = [f"# Attention fwd+bwd benchmark — {'GPU' if gpu else 'CPU'}: {env['device_name']}", ""]
    if not gpu:
        lines += ["**CPU run** (reduced sizes; a shared 2-core machine, so timings are indicative only). "
                  "Memory is the bytes the forward saves for backward (saved_tensors_hooks, unique storages), "
                  "not a peak. The issue's targets are GPU targets and are NOT RUN here.", ""]
    lines += [f"torch {env['torch']}, triton {env.get('triton')}, {env['date_utc']} UTC, wall {env['wall_s']} s"
              + (f", load average at start/end {env.get('loadavg_at_start')} / {env.get('loadavg_at_end')}"
                 if not gpu else f", CUDA {env.get('cuda')}"), "",
              f"B={s['batch']}, H={s['heads'] or ('16' if gpu else '4')}, keep={s['keep']} (L = ceil(keep*n)), "
              f"causal={s['causal']}, codebook={s['codebook']} (M=d/8 subspaces, 16 codewords), random q/k/v. "
              f"Time: {payload['measures']['time']}. Memory: {payload['measures']['memory']}.", "",
              f"Block mode: {'found' if payload['block_mode']['available'] else 'NOT RUN — ' + payload['block_mode']['reason']}.",
              ""]
    flags = {c.get("token_cuda_kernel_registered") for c in payload["configs"] if "token_cuda_kernel_registered" in c}
    if gpu and flags:
        lines += [f"sparsify::spt_attention has a CUDA kernel registered: {flags == {True}} "
                  "(if False, the spt-token rows run the op's torch reference on CUDA).", ""]
    for key, what in (("flex_token_block_density", "Token selection as a 128x128 BlockMask"),
                      ("flex_block_block_density", f"Block selection as a {s['block_size']}x{s['block_size']} BlockMask")):
        dens = [(c["n"], c["d"], c["dtype"], c[key]) for c in payload["configs"] if key in c]
        if dens:
            lines += [f"{what} — fraction of blocks that are non-empty (what a block-sparse kernel must visit): "
                      + ", ".join(f"n={n} d={d} {t}: {x:.0%}" for n, d, t, x in dens), ""]
    lines += [T.markdown_table(_header(gpu), _rows(payload["results"], gpu)), "",
              "H200 roofline (benchmarks/roofline.py, a model, not a measurement): " + roofline_note(payload["configs"]),
              "", "## Checks (issue targets)", ""]
    lines += [T.markdown_table(["result", "check", "numbers / reason"],
                               [[c["result"], c["check"], c["why"]] for c in payload["checks"]])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
