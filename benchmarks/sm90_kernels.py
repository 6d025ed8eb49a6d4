"""Every kernel the codegen emits, compiled for Hopper (sm_90) on this machine through its own launcher, at the
shapes that matter: registers, spills, shared memory, wgmma / mma.sync, cp.async / TMA and atomics per kernel.

    python benchmarks/sm90_kernels.py                # all cases -> benchmarks/results/sm90_kernels.{json,md}
    python benchmarks/sm90_kernels.py --quick        # fp16 only, one case per kernel family (the suite's test)

No GPU is needed or used (sparsify/codegen/sm90.py: a driver that reports sm_90, launches replaced by Triton's
warm-up compile). The launchers choose tiles, warps and stages exactly as on a GPU, so these are the kernels a
GPU run would launch; what they cannot say is how fast the kernels are (benchmarks/ on a GPU does).
Shapes: attention head_dim 64 and 128, causal and not, 1024 tokens; MLP d_model 2048, d_ff 8192 (4 blocks for the
routed FFN); MST's block-sparse Linear 768 x 3072 at 32 and 64 blocks; DEFT's sparse projections at d_ff 8192.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the cases compile real (jit) kernels

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

from sparsify.codegen.sm90 import SM90_SHARED_LIMIT, compile_launches, figures  # noqa: E402


def _t(*shape, dtype):
    return torch.randn(*shape).to(dtype)


def cases(dtypes, quick: bool):
    """(family, case name, thunk) for every launcher; each thunk calls the launcher once on CPU tensors."""
    import importlib
    from sparsify.codegen import block_linear, grouped_gemm, pq_kernels, spt_attention, sparse_down, sparse_up
    up_projection = importlib.import_module("sparsify.codegen.up_projection")  # the package exports a function so named

    out = []
    for dt in dtypes:
        n = DT[dt]
        d_model, d_ff, tokens = (256, 1024, 256) if quick else (2048, 8192, 4096)
        acts = ["gelu"] if quick else ["gelu", "silu"]
        for act in acts:
            for gated in ((False,) if quick else (False, True)):
                out.append(("up_projection", f"{n} {act} gated={gated} {d_model}->{d_ff}",
                            lambda act=act, gated=gated, dt=dt: up_projection.up_projection(
                                _t(tokens, d_model, dtype=dt), _t(d_ff, d_model, dtype=dt), _t(d_ff, dtype=dt), act,
                                _t(d_ff, d_model, dtype=dt) if gated else None, _t(d_ff, dtype=dt) if gated else None)))
        # the routed FFN's grouped GEMMs: 4 blocks, top-2 (assignments sorted by block)
        blocks, fb = 4, d_ff // 4
        a = 2 * tokens
        tok = torch.arange(a, dtype=torch.int32) % tokens
        offsets = torch.tensor([0, a // 4, a // 2, 3 * a // 4, a], dtype=torch.int32)
        x = _t(tokens, d_model, dtype=dt)
        # the training forward's kernel: it also stores both projections' outputs for the backward
        out.append(("grouped_up", f"{n} silu gated store_pre {d_model}->{d_ff}/{blocks}",
                    lambda dt=dt, x=x: grouped_gemm.grouped_up(x, _t(d_ff, d_model, dtype=dt), tok, offsets, fb,
                                                               activation="silu", row_scale=torch.rand(a).to(dt),
                                                               gate=(_t(d_ff, d_model, dtype=dt), None, None),
                                                               pre_out=(_t(a, fb, dtype=dt), _t(a, fb, dtype=dt)))))
        # the backward's v GEMM with the activation's backward, gate and bias gradient sums in its epilogue
        out.append(("grouped_act_bwd", f"{n} silu gated {d_model}<-{d_ff}/{blocks}",
                    lambda dt=dt: grouped_gemm.grouped_act_backward(
                        _t(tokens, d_model, dtype=dt), _t(d_model, d_ff, dtype=dt).t(), tok, offsets, fb,
                        pre=_t(a, fb, dtype=dt), pre_gate=_t(a, fb, dtype=dt), row_scale=torch.rand(a),
                        activation="silu", out_dtype=dt, want_dg=True, want_db=True)))
        if not quick:  # dropout: the keep mask read in both epilogues
            keep = (torch.rand(a, fb) > 0.1, 0.1)
            out.append(("grouped_up", f"{n} silu gated dropout {d_model}->{d_ff}/{blocks}",
                        lambda dt=dt, x=x, keep=keep: grouped_gemm.grouped_up(
                            x, _t(d_ff, d_model, dtype=dt), tok, offsets, fb, activation="silu",
                            row_scale=torch.rand(a).to(dt), gate=(_t(d_ff, d_model, dtype=dt), None, None),
                            pre_out=(_t(a, fb, dtype=dt), _t(a, fb, dtype=dt)), dropout=keep)))
            out.append(("grouped_act_bwd", f"{n} silu gated dropout {d_model}<-{d_ff}/{blocks}",
                        lambda dt=dt, keep=keep: grouped_gemm.grouped_act_backward(
                            _t(tokens, d_model, dtype=dt), _t(d_model, d_ff, dtype=dt).t(), tok, offsets, fb,
                            pre=_t(a, fb, dtype=dt), pre_gate=_t(a, fb, dtype=dt), row_scale=torch.rand(a),
                            activation="silu", out_dtype=dt, want_dg=True, want_db=True, dropout=keep)))
        if not quick:  # with LoRA on every side (z and dh get the LoRA terms, dz and hd are written too)
            out.append(("grouped_act_bwd", f"{n} silu gated LoRA {d_model}<-{d_ff}/{blocks}",
                        lambda dt=dt: grouped_gemm.grouped_act_backward(
                            _t(tokens, d_model, dtype=dt), _t(d_model, d_ff, dtype=dt).t(), tok, offsets, fb,
                            pre=_t(a, fb, dtype=dt), pre_gate=_t(a, fb, dtype=dt), row_scale=torch.rand(a),
                            activation="silu", out_dtype=dt, want_dg=True, want_db=True,
                            lora_z={"up": torch.randn(a, fb), "gate": torch.randn(a, fb)},
                            dh_extra=torch.randn(a, fb), want_h=True)))
        out.append(("grouped_down", f"{n} {d_ff}/{blocks}->{d_model}",
                    lambda dt=dt: grouped_gemm.grouped_down(_t(a, fb, dtype=dt), _t(d_model, d_ff, dtype=dt), tok,
                                                            offsets, torch.zeros(tokens, d_model),
                                                            row_scale=torch.rand(a).to(dt))))
        out.append(("grouped_wgrad", f"{n} [{d_ff}, {d_model}]",
                    lambda dt=dt, x=x: grouped_gemm.grouped_wgrad(_t(a, fb, dtype=dt), x, tok, offsets,
                                                                  torch.empty(d_ff, d_model, dtype=dt))))
        # attention: PQ encode / select, token and block kernels
        length = 256 if quick else 1024
        for head_dim in ((64,) if quick else (64, 128)):
            q, k, v = (_t(1, 8, length, head_dim, dtype=dt) for _ in range(3))
            codebook = torch.randn(head_dim // 8, 16, 8).to(dt)
            out.append(("pq_encode", f"{n} d{head_dim}", lambda q=q, cb=codebook: pq_kernels.pq_encode_triton(q, cb)))
            codes = torch.randint(0, 16, (1, 8, length, head_dim // 8), dtype=torch.int32)
            keep = length // 8
            for causal in ((True,) if quick else (False, True)):
                out.append(("pq_select", f"d{head_dim} causal={causal}",
                            lambda c=codes, causal=causal: pq_kernels.pq_select_triton(c, c, keep, causal)))
                index = torch.sort(torch.randint(0, length, (1, 8, length, keep), dtype=torch.int32), -1).values
                valid = torch.ones(1, 8, length, keep, dtype=torch.bool)
                lse = torch.zeros(1, 8, length)
                out.append(("spt_token_fwd", f"{n} d{head_dim} causal={causal}",
                            lambda q=q, k=k, v=v, i=index, va=valid, causal=causal:
                            spt_attention.spt_forward(q, k, v, i, va, causal=causal)))
                out.append(("spt_token_bwd", f"{n} d{head_dim} causal={causal}",
                            lambda q=q, k=k, v=v, i=index, va=valid, causal=causal:
                            spt_attention.spt_backward(q.clone(), q, k, v, i, va, None, lse, causal=causal)))
                if causal and not quick:  # token-mode dropout drawn in-kernel (Philox)
                    out.append(("spt_token_fwd", f"{n} d{head_dim} causal dropout",
                                lambda q=q, k=k, v=v, i=index, va=valid:
                                spt_attention.spt_forward(q, k, v, i, va, causal=True, dropout_p=0.1, seed=7)))
                    out.append(("spt_token_bwd", f"{n} d{head_dim} causal dropout",
                                lambda q=q, k=k, v=v, i=index, va=valid:
                                spt_attention.spt_backward(q.clone(), q, k, v, i, va, None, lse, causal=True,
                                                           dropout_p=0.1, seed=7)))
                nb = length // 64
                bindex, bvalid = spt_attention.dense_block_map(length, length, 64, 64, causal)
                out.append(("block_attention_fwd", f"{n} d{head_dim} causal={causal}",
                            lambda q=q, k=k, v=v, bi=bindex, bv=bvalid, causal=causal:
                            spt_attention.block_sparse_forward(q, k, v, bi, bv, causal=causal)))
                out.append(("block_attention_bwd", f"{n} d{head_dim} causal={causal}",
                            lambda q=q, k=k, v=v, bi=bindex, bv=bvalid, causal=causal:
                            spt_attention.block_sparse_backward(q.clone(), q, k, v, bi, bv, torch.zeros(1, 8, length),
                                                                causal=causal, out=v.clone())))  # as the op calls it
                if causal and not quick:  # dropout drawn in-kernel (Philox)
                    out.append(("block_attention_fwd", f"{n} d{head_dim} causal dropout",
                                lambda q=q, k=k, v=v, bi=bindex, bv=bvalid:
                                spt_attention.block_sparse_forward(q, k, v, bi, bv, causal=True, dropout_p=0.1,
                                                                   seed=12345)))
                    out.append(("block_attention_bwd", f"{n} d{head_dim} causal dropout",
                                lambda q=q, k=k, v=v, bi=bindex, bv=bvalid:
                                spt_attention.block_sparse_backward(q.clone(), q, k, v, bi, bv,
                                                                    torch.zeros(1, 8, length), causal=True,
                                                                    out=v.clone(), dropout_p=0.1, seed=12345)))
                if causal and not quick:  # a padded HF batch: the 4-d additive mask read per visited tile
                    mask = torch.zeros(1, 1, length, length).to(dt)
                    out.append(("block_attention_fwd", f"{n} d{head_dim} causal float mask",
                                lambda q=q, k=k, v=v, bi=bindex, bv=bvalid, m=mask:
                                spt_attention.block_sparse_forward(q, k, v, bi, bv, causal=True, attn_mask=m)))
                    out.append(("block_attention_bwd", f"{n} d{head_dim} causal float mask",
                                lambda q=q, k=k, v=v, bi=bindex, bv=bvalid, m=mask:
                                spt_attention.block_sparse_backward(q.clone(), q, k, v, bi, bv,
                                                                    torch.zeros(1, 8, length), causal=True,
                                                                    out=v.clone(), attn_mask=m)))
                del nb
        # MST's block-sparse Linear
        for side in ((32,) if quick else (32, 64)):
            w = _t(3072, 768, dtype=dt)
            blocks_mask = torch.rand(3072 // side, 768 // side) < 0.25
            x2 = _t(tokens, 768, dtype=dt)
            out.append(("block_mm", f"{n} 768->3072 blocks {side}",
                        lambda w=w, m=blocks_mask, x2=x2: block_linear.block_mm_triton(x2, w, m)))
            out.append(("block_wgrad", f"{n} [3072, 768] blocks {side}",
                        lambda m=blocks_mask, x2=x2, dt=dt: block_linear.block_wgrad_triton(
                            _t(tokens, 3072, dtype=dt), x2, m)))
        # DEFT's activation-sparse projections (decode-sized tiles)
        h = _t(64, d_ff, dtype=dt)
        out.append(("sparse_down", f"{n} {d_ff}->{d_model}",
                    lambda h=h, dt=dt: sparse_down.sparse_down_triton(h, _t(d_model, d_ff, dtype=dt), None)))
        out.append(("sparse_up", f"{n} {d_model}->{d_ff}",
                    lambda h=h, dt=dt: sparse_up.sparse_up_triton(h, _t(64, d_model, dtype=dt),
                                                                  _t(d_ff, d_model, dtype=dt), None)))
    return out


DT = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def collect(quick: bool = False) -> list[dict]:
    dtypes = [torch.float16] if quick else [torch.float16, torch.bfloat16]
    rows = []
    for family, name, thunk in cases(dtypes, quick):
        started = time.perf_counter()
        try:
            with compile_launches() as launches:
                thunk()
            for launch in launches:
                rows.append({"family": family, "case": name, **figures(launch),
                             "compile_s": round(time.perf_counter() - started, 2)})
        except Exception as exc:  # noqa: BLE001  (a kernel that does not compile is a row of the table)
            rows.append({"family": family, "case": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        print(family, name, rows[-1].get("error") or {k: rows[-1][k] for k in
                                                          ("kernel", "registers", "spill_stores", "shared", "wgmma",
                                                           "mma_sync")}, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["# Kernels compiled for sm_90 (H100 / H200) on a machine without a GPU", "",
             "Figures from Triton's compile for GPUTarget('cuda', 90) and ptxas -v: registers per thread, spill "
             f"bytes, shared memory (limit {SM90_SHARED_LIMIT // 1024} KiB per block), tensor-core instructions "
             "(wgmma: Hopper's; mma.sync: the older path), cp.async and TMA copies, atomics (acq_rel: tl.atomic_add's "
             "default). Compiled through each launcher at its GPU choices (benchmarks/sm90_kernels.py); an autotuned "
             "launch has one row per config it may pick (the first of each case being its default). A compile "
             "says nothing of speed.", "",
             _timing.markdown_table(
                 ["family", "case", "kernel", "tiles / flags", "warps", "stages", "registers", "spills", "shared KiB",
                  "wgmma", "mma.sync", "cp.async", "atomics (acq_rel)"],
                 [[r["family"], r["case"], r.get("kernel", "-"),
                   " ".join(f"{k}={v}" for k, v in r.get("constexprs", {}).items()) if "error" not in r else r["error"],
                   r.get("num_warps", "-"), r.get("num_stages", "-"), r.get("registers", "-"),
                   r.get("spill_stores", "-"), round(r["shared"] / 1024, 1) if "shared" in r else "-",
                   r.get("wgmma", "-"), r.get("mma_sync", "-"), r.get("cp_async", "-"),
                   f"{r['atomics']} ({r['atomics_acq_rel']})" if "atomics" in r else "-"] for r in rows])]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out-dir", default=_timing.default_out_dir())
    args = p.parse_args(argv)
    rows = collect(args.quick)
    stem = "sm90_kernels_quick" if args.quick else "sm90_kernels"
    paths = _timing.write_results(args.out_dir, stem, {"target": "sm_90 (compile only)", "rows": rows},
                                  markdown(rows))
    print("wrote", *paths)
    return rows


if __name__ == "__main__":
    main()
