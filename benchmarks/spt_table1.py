"""The SPT paper's Table 1 layer: one OPT-2048 decoder layer, forward + backward, per block and whole.

    python benchmarks/spt_table1.py            # GPU: full size; CPU: the scaled-down --quick size
    python benchmarks/spt_table1.py --quick    # d=512, 8 heads, d_ff=2048, seq 512, batch 2 (CPU default)

The layer (papers.md section 1): d=2048, 32 heads, d_ff=8192, ReLU, seq 512, batch 16, fp32, LoRA r=16,
causal (OPT is a decoder). It is written by hand here (pre-LayerNorm OPT layer, as transformers'
OPTDecoderLayer for OPT-1.3B/2.7B: h = x + out_proj(attn(q_proj, k_proj, v_proj of LN1(x)));
y = h + fc2(relu(fc1(LN2(h)))), biases on every Linear, no dropout) so that the MHA block and the FFN block
can be called and timed separately, and so that the SPT row can call the sparsify ops directly. This is
simpler and more controllable than instantiating OPTDecoderLayer, whose call signature and mask
preparation change across transformers versions; the arithmetic is the same.

Rows:
  (a) full       every weight trainable (LayerNorms too), eager attention (matmul, causal mask, fp32 softmax,
                 matmul: Hugging Face OPT's eager attention, the paper's baseline)
  (b) LoRA       base weights and LayerNorms frozen; LoRA r=16 (alpha 16, no LoRA dropout) on all six
                 Linears (q, k, v, out, fc1, fc2); eager attention
  (b') LoRA+SDPA the same with F.scaled_dot_product_attention(is_causal=True): a stronger dense baseline,
                 not in the paper
  (c) SPT        LoRA + SPT sparse attention + routed FFN, the sparsify ops called directly:
                     codes = pq_encode(q | k, C); index, valid = pq_select(codes_q, codes_k, L = n/8, causal)
                     out = spt_attention(q, k, v, index, valid); out = aux_loss(out, codebook_loss(q, C) +
                     codebook_loss(k, C), 1e-2)      -- exactly the graph passes/spt.py writes
                 C is a trainable [head_dim/8, 16, 8] codebook, k-means-initialised on the layer's own q/k
                 (sparsify.methods.spt.init_codebook).
                 FFN: torch.ops.sparsify.routed_mlp (sparsify/ops/routed.py) when it exists: 4 contiguous
                 neuron blocks (the paper's split), top-2 per token, gate 2p, LoRA on fc1 / fc2, a trainable
                 router initialised by routed_init.init_router. Where it does not exist, the SPT row runs the dense
                 LoRA FFN and says so ("routed FFN: not implemented yet").
  (c') SPT via backend (default on; --no-backend-row drops it): the (b') layer after sparsify.prepare(...),
                 compiled with torch.compile(backend="sparsify", options={"attention": {"method": "spt", ...},
                 "mlp": {"method": "routed"} where the config has it, "inner": <--backend-inner, default
                 aot_eager>}); whole layer only (blocks are not separable inside one compiled graph). What a user
                 of the backend gets; compile time reported apart; the region report says what was rewritten.

The input x [batch, seq, d] requires grad (a layer inside a model passes gradients down), so all rows
compute dx. Parameter gradients are dropped after each step (no optimizer, no accumulation).
Measures: see _timing.py. GPU: peak allocated bytes per fwd+bwd (reset before each case; parameters
included, as the paper's peak), and the peak above what was allocated before the case. CPU (and GPU too):
bytes saved for backward (unique storages), total and excluding the parameters and x.
Results: benchmarks/results/spt_table1_<device>.json / .md.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402

import sparsify  # noqa: E402
from sparsify.ops.key_select import codebook_loss  # noqa: E402
from sparsify.methods.spt import init_codebook  # noqa: E402

# papers.md section 1, Introduction table (one OPT-2048 layer on the authors' GPU). The paper's numbers,
# reproduced for reference only.
PAPER = {
    "full": {"mha_ms": 59.6, "ffn_ms": 128.8, "layer_ms": 188.4, "mha_gb": 3.2, "ffn_gb": 1.3, "peak_gb": 3.2},
    "lora": {"mha_ms": 52.5, "ffn_ms": 108.5, "layer_ms": 161.0, "mha_gb": 2.6, "ffn_gb": 1.1, "peak_gb": 2.7},
    "spt": {"mha_ms": 54.1, "ffn_ms": 54.9, "layer_ms": 106.0, "mha_gb": 0.9, "ffn_gb": 1.1, "peak_gb": 1.6},
}
FULL_SIZE = dict(d=2048, heads=32, d_ff=8192, seq=512, batch=16)
QUICK_SIZE = dict(d=512, heads=8, d_ff=2048, seq=512, batch=2)
ROUTED_BLOCKS, ROUTED_TOP_K = 4, 2


# ------------------------------------------------------------------------------------------ modules

class LoRALinear(nn.Module):
    """y = base(x) + (x A^T) B^T * alpha / r, base frozen; A Kaiming-uniform, B zero (peft's init)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


class Attention(nn.Module):
    """q, k, v, out projections and one of three attention computations."""

    def __init__(self, d, heads, kind, keep):
        super().__init__()
        self.heads, self.head_dim, self.kind, self.keep = heads, d // heads, kind, keep
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.scale = self.head_dim ** -0.5
        self.codebook = None

    def qkv(self, x):
        b, n, _ = x.shape
        def split(t):
            return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)
        return split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x)
        if self.kind == "eager":
            s = torch.matmul(q, k.transpose(-1, -2)) * self.scale
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            s = s.masked_fill(~causal, float("-inf"))
            o = torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)
        elif self.kind == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        elif self.kind == "spt":
            cb = self.codebook
            keep = max(1, min(n, math.ceil(self.keep * n)))
            qc = torch.ops.sparsify.pq_encode(q, cb)
            kc = torch.ops.sparsify.pq_encode(k, cb)
            index, valid = torch.ops.sparsify.pq_select(qc, kc, keep, True, None)
            o = torch.ops.sparsify.spt_attention(q, k, v, index, valid, None, self.scale, 0.0)[0]
            aux = codebook_loss(q, cb) + codebook_loss(k, cb)
            o = torch.ops.sparsify.aux_loss(o, aux, 1e-2, "spt_table1")
        else:
            raise ValueError(self.kind)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, d))


class RoutedFFN(nn.Module):
    """SPT's routed FFN over two LoRALinear layers: torch.ops.sparsify.routed_mlp, ReLU, 4 contiguous blocks,
    top-2, gate 2p; the router (blocks x d, + bias) is trainable, initialised by sparsify.ops.routed_init.init_router."""

    def __init__(self, fc1: "LoRALinear", fc2: "LoRALinear", blocks=ROUTED_BLOCKS, top_k=ROUTED_TOP_K):
        super().__init__()
        from sparsify.ops.routed_init import init_router
        self.fc1, self.fc2, self.blocks, self.top_k = fc1, fc2, blocks, top_k
        router_w, router_b = init_router(fc1.base.weight, fc1.base.bias, None, blocks)
        self.router_w, self.router_b = nn.Parameter(router_w), nn.Parameter(router_b)

    def forward(self, h):
        f1, f2 = self.fc1, self.fc2
        return torch.ops.sparsify.routed_mlp(
            h, f1.base.weight, f1.base.bias, None, None, f2.base.weight, f2.base.bias,
            f1.lora_A, f1.lora_B, None, None, f2.lora_A, f2.lora_B, [f1.scaling, f1.scaling, f2.scaling],
            self.router_w, self.router_b, None, self.blocks, self.top_k, "sigmoid2p", "relu", 0.0,
            torch.is_grad_enabled())[0]  # save the up outputs for backward when training (the backend's default)


class OPTLayer(nn.Module):
    """Pre-LN OPT decoder layer: mha(x) = x + attn(LN1 x); ffn(h) = h + fc2(relu(fc1(LN2 h)))."""

    def __init__(self, d, heads, d_ff, kind="eager", keep=0.125):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.self_attn = Attention(d, heads, kind, keep)
        self.final_layer_norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, d_ff), nn.Linear(d_ff, d)
        self.routed = None  # a RoutedFFN replaces fc1 -> relu -> fc2 when set

    def mha(self, x):
        return x + self.self_attn(self.self_attn_layer_norm(x))

    def ffn(self, h):
        if self.routed is not None:
            return h + self.routed(self.final_layer_norm(h))
        return h + self.fc2(torch.relu(self.fc1(self.final_layer_norm(h))))

    def forward(self, x):
        return self.ffn(self.mha(x))


def apply_lora(layer: OPTLayer, r: int, alpha: float) -> OPTLayer:
    for p in layer.parameters():
        p.requires_grad_(False)
    att = layer.self_attn
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        setattr(att, name, LoRALinear(getattr(att, name), r, alpha))
    layer.fc1 = LoRALinear(layer.fc1, r, alpha)
    layer.fc2 = LoRALinear(layer.fc2, r, alpha)
    return layer


def build(row: str, size: dict, args, device, state_dict=None) -> OPTLayer:
    kind = {"full": "eager", "lora": "eager", "lora_sdpa": "sdpa", "spt": "spt", "spt_backend": "sdpa"}[row]
    torch.manual_seed(args.seed)
    layer = OPTLayer(size["d"], size["heads"], size["d_ff"], kind=kind, keep=args.keep).to(device)
    if state_dict is not None:  # the same base weights in every row
        layer.load_state_dict(state_dict)
    if row != "full":
        apply_lora(layer, args.rank, args.alpha)
    layer.train()
    return layer


def attach_codebook(layer: OPTLayer, x: torch.Tensor):
    """k-means codebook on this layer's q/k for x (sparsify.methods.spt.init_codebook), as a trainable parameter."""
    att = layer.self_attn
    with torch.no_grad():
        q, k, _ = att.qkv(layer.self_attn_layer_norm(x))
    cb = init_codebook([(q, k)], att.head_dim, 8, 16).to(device=x.device, dtype=x.dtype)
    att.codebook = nn.Parameter(cb)


def routed_ffn_status() -> tuple[bool, str]:
    """(available, line to print): sparsify.ops.routed importable and torch.ops.sparsify.routed_mlp registered."""
    try:
        if importlib.util.find_spec("sparsify.ops.routed") is None:
            raise ImportError("no module sparsify.ops.routed")
        importlib.import_module("sparsify.ops.routed")
        if not hasattr(torch.ops.sparsify, "routed_mlp"):
            raise ImportError("sparsify.ops.routed has no sparsify::routed_mlp op")
    except Exception as exc:  # noqa: BLE001
        return False, (f"routed FFN: not implemented yet ({type(exc).__name__}: {exc}); the SPT row runs the dense "
                       "LoRA FFN, labelled")
    return True, (f"routed FFN: sparsify::routed_mlp ({ROUTED_BLOCKS} contiguous blocks, top-{ROUTED_TOP_K}, gate 2p, "
                  "LoRA on fc1/fc2)")


def backend_supports_routed() -> bool:
    import dataclasses
    from sparsify.config import MLPConfig
    field = {f.name: f for f in dataclasses.fields(MLPConfig)}["method"]
    return "routed" in field.metadata.get("choices", ())


# ------------------------------------------------------------------------------------------ measurement

def measure_block(fn, layer, x, grad, device, args) -> dict:
    params = [p for p in layer.parameters()]

    def clear():
        x.grad = None
        for p in params:
            p.grad = None

    def step():
        out = fn(x)
        out.backward(grad)
        clear()

    res = {}
    T.sync(device)
    t0 = time.perf_counter()
    step()
    T.sync(device)
    res["first_call_s"] = round(time.perf_counter() - t0, 3)
    t = T.time_call(step, device, warmup=args.warmup, min_repeats=args.min_repeats, max_repeats=args.max_repeats,
                    budget_s=args.budget_s)
    res["ms"], res["timing"] = t["median_ms"], t
    if device.type == "cuda":
        res.update(T.cuda_peak(step, device))
    try:
        out, saved = T.saved_bytes(lambda: fn(x), exclude=params + [x])
        out.backward(grad)
        del out
        res.update(saved)
    except Exception as exc:  # noqa: BLE001  (e.g. a compiled graph that refuses saved-tensor hooks)
        res["saved_error"] = f"{type(exc).__name__}: {exc}"[:300]
    clear()
    return res


def run_row(row, size, args, device, base_state, x, grad, state) -> dict:
    layer = build(row, size, args, device, base_state)
    info = {"row": row, "trainable_params": sum(p.numel() for p in layer.parameters() if p.requires_grad)}
    if row == "spt":
        attach_codebook(layer, x.detach())
        if state["routed"]:
            layer.routed = RoutedFFN(layer.fc1, layer.fc2)
            info["ffn_impl"] = f"routed FFN (sparsify::routed_mlp, {ROUTED_BLOCKS} blocks, top-{ROUTED_TOP_K})"
        else:
            info["ffn_impl"] = "dense LoRA (routed FFN not implemented yet)"
        info["trainable_params"] = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    blocks = {"mha": layer.mha, "ffn": layer.ffn, "layer": layer}
    if row == "spt_backend":
        options = {"attention": {"method": "spt", "keep": args.keep, "min_seq": 1}, "inner": args.backend_inner}
        if state["routed"] and backend_supports_routed():
            options["mlp"] = {"method": "routed", "blocks": ROUTED_BLOCKS, "top_k": ROUTED_TOP_K}
        info["options"] = options
        # compiled inside a one-child wrapper: the FFN's region belongs to the layer module itself, and the
        # state a prepared module carries reaches the graph through that module's forward hook, which Dynamo
        # puts in a graph of its own when the module is the compile root (seen on torch 2.13: the FFN then
        # stays dense, "no router on this module")
        model = nn.Sequential(layer)
        t0 = time.perf_counter()
        sparsify.prepare(model, x.detach(), options=options)
        compiled = torch.compile(model, backend="sparsify", options=options)
        out = compiled(x)
        out.backward(grad)
        x.grad = None
        layer.zero_grad(set_to_none=True)
        T.sync(device)
        info["compile_s"] = round(time.perf_counter() - t0, 1)
        info["regions"] = [str(r) for r in sparsify.explain(model, x.detach(), options=options).regions]
        info["ffn_impl"] = "as the backend rewrote it (see regions)"
        blocks = {"layer": compiled}
    # one x, reused: every block sees the same input; the FFN block gets mha(x) as its input
    for name, fn in blocks.items():
        inp = x
        if name == "ffn":
            with torch.no_grad():
                inp = layer.mha(x).detach().requires_grad_(True)
        try:
            info[name] = measure_block(fn, layer, inp, grad, device, args)
        except Exception as exc:  # noqa: BLE001
            info[name] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:400]}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        r = info[name]
        mem = (f"peak {T.fmt_mib(r.get('peak_bytes'))} MiB" if device.type == "cuda" else
               f"saved {T.fmt_mib(r.get('saved_bytes'))} MiB (excl. params/x {T.fmt_mib(r.get('saved_excl_bytes'))})")
        print(f"  {row:12s} {name:6s} " + (f"ERROR {r['error']}" if "error" in r else
                                           f"{T.fmt_ms(r['ms']):>8s} ms  {mem}"))
    del layer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return info


# ------------------------------------------------------------------------------------------ main

ROW_LABELS = {
    "full": "(a) full fine-tune (eager attn)",
    "lora": "(b) LoRA r=16 (eager attn)",
    "lora_sdpa": "(b') LoRA r=16 + SDPA [not in paper]",
    "spt": "(c) SPT: LoRA + sparse attn + routed FFN*",
    "spt_backend": "(c') SPT via sparsify backend",
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="scaled-down layer (CPU default)")
    p.add_argument("--full", action="store_true", help="full size even on CPU (slow)")
    for k_ in ("d", "heads", "d_ff", "seq", "batch"):
        p.add_argument(f"--{k_.replace('_', '-')}", type=int, dest=k_, help=f"override {k_}")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--keep", type=float, default=0.125)
    p.add_argument("--rows", nargs="+", default=["full", "lora", "lora_sdpa", "spt", "spt_backend"],
                   choices=list(ROW_LABELS))
    p.add_argument("--no-backend-row", action="store_true", help="drop row (c')")
    p.add_argument("--backend-inner", default="aot_eager", choices=["aot_eager", "inductor", "eager"])
    T.add_timing_args(p, warmup_help="warm-up calls after the first call", warmup=2, max_repeats=10, budget_s=3.0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    return T.run_on_device(parse_args(argv), run)


def run(args, device) -> dict:
    started = time.perf_counter()
    gpu = device.type == "cuda"
    quick = args.quick or (not gpu and not args.full)
    size = dict(QUICK_SIZE if quick else FULL_SIZE)
    for k_ in size:
        if getattr(args, k_) is not None:
            size[k_] = getattr(args, k_)
    scale_label = "full size (paper)" if size == FULL_SIZE else ("scaled down (--quick)" if size == QUICK_SIZE
                                                                else "custom size")
    rows = [r for r in args.rows if not (r == "spt_backend" and args.no_backend_row)]
    env = T.environment(device)
    env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32 if gpu else None
    print(f"device: {env['device_name']}  torch {env['torch']}")
    print(f"layer: {scale_label}: {size}, fp32, LoRA r={args.rank}, keep={args.keep}, causal")
    routed_ok, ffn_status = routed_ffn_status()
    print(ffn_status)

    torch.manual_seed(args.seed)
    base_state = OPTLayer(size["d"], size["heads"], size["d_ff"]).state_dict()  # on CPU: not in any GPU peak
    x = torch.randn(size["batch"], size["seq"], size["d"], device=device, requires_grad=True)
    grad = torch.randn_like(x)
    state = {"routed": routed_ok}
    infos = []
    for row in rows:
        print(f"\n== {ROW_LABELS[row]}")
        try:
            infos.append(run_row(row, size, args, device, base_state, x, grad, state))
        except Exception as exc:  # noqa: BLE001
            msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:400]
            print(f"  {row}: NOT RUN: {msg}")
            infos.append({"row": row, "error": msg})
        torch._dynamo.reset()

    env = T.finish_environment(env, device, started)
    payload = {
        "benchmark": "spt_table1",
        "environment": env,
        "size": size,
        "size_label": scale_label,
        "settings": {k_: v_ for k_, v_ in vars(args).items() if k_ != "out_dir"},
        "routed_ffn": ffn_status,
        "routed_ffn_available": routed_ok,
        "measures": {
            "time": "median wall ms of fwd+bwd (x.requires_grad, random output gradient) after warm-up"
                    + (", torch.cuda.synchronize around each" if gpu else ""),
            "memory": ("peak_bytes: torch.cuda.max_memory_allocated over one fwd+bwd (reset before; parameters "
                       "included); " if gpu else "")
                      + "saved_bytes: bytes saved for backward (unique storages); saved_excl_bytes: without the "
                        "parameters' and the input's storages",
        },
        "paper": PAPER,
        "rows": infos,
    }
    md = render_markdown(payload, gpu)
    print("\n" + md)
    stem = args.stem or f"spt_table1_{T.device_slug(device)}"
    paths = T.write_results(args.out_dir, stem, payload, md)
    print(f"\nwrote {paths[0]} and {paths[1]} ({env['wall_s']} s)")
    return payload


def _mem(r, gpu):
    if "error" in r or not r:
        return "-"
    return T.fmt_mib(r.get("peak_bytes") if gpu else r.get("saved_excl_bytes"))


def render_markdown(payload, gpu) -> str:
    env, size = payload["environment"], payload["size"]
    mem_name = "peak MiB" if gpu else "saved-for-bwd MiB (excl. params, x)"
    out = [f"# SPT Table 1 layer — {'GPU' if gpu else 'CPU'}: {env['device_name']}", ""]
    if not gpu:
        out += ["**CPU run, scaled down** — not comparable in absolute terms with the paper's GPU numbers; "
                "compare ratios between rows. Timings on a shared CPU are indicative only. Memory here is the "
                "bytes the forward saves for backward (activations kept), not a peak.", ""]
    out += [f"Layer: {payload['size_label']} d={size['d']}, heads={size['heads']}, d_ff={size['d_ff']}, "
            f"seq={size['seq']}, batch={size['batch']}, fp32, causal, ReLU, LoRA r={payload['settings']['rank']}, "
            f"keep={payload['settings']['keep']}. torch {env['torch']}, {env['date_utc']} UTC, wall {env['wall_s']} s"
            + (f", load average start/end {env.get('loadavg_at_start')} / {env.get('loadavg_at_end')}" if not gpu
               else f", CUDA {env.get('cuda')}, TF32 matmul {env.get('tf32_matmul')}") + ".", "",
            f"Time: {payload['measures']['time']}. Memory: {payload['measures']['memory']}.", "",
            f"{payload['routed_ffn']}.", "", "## Ours", ""]
    rows = []
    full = next((r for r in payload["rows"] if r["row"] == "full" and "error" not in r), None)
    for r in payload["rows"]:
        label = ROW_LABELS[r["row"]]
        if "error" in r:
            rows.append([label, "NOT RUN: " + r["error"], "", "", "", "", "", "", ""])
            continue
        mha, ffn, lay = r.get("mha", {}), r.get("ffn", {}), r.get("layer", {})

        def ms(b):
            return "ERROR" if "error" in b else (T.fmt_ms(b.get("ms")) if b else "-")
        ratio_t = (f"{lay['ms'] / full['layer']['ms']:.2f}" if full and "ms" in lay and "ms" in full.get("layer", {})
                   else "-")
        key = "peak_bytes" if gpu else "saved_excl_bytes"
        ratio_m = (f"{lay[key] / full['layer'][key]:.2f}" if full and lay.get(key) and full.get("layer", {}).get(key)
                   else "-")
        rows.append([label, ms(mha), ms(ffn), ms(lay), _mem(mha, gpu), _mem(ffn, gpu), _mem(lay, gpu),
                     ratio_t, ratio_m])
    out.append(T.markdown_table(["row", "MHA ms", "FFN ms", "layer ms", f"MHA {mem_name}", f"FFN {mem_name}",
                                 f"layer {mem_name}", "layer time / full", "layer mem / full"], rows))
    spt = next((r for r in payload["rows"] if r["row"] == "spt"), {})
    out += ["", f"\\* SPT row FFN: {spt.get('ffn_impl', payload['routed_ffn'])}.", "",
            "Row (c) runs the ops eagerly, so autograd keeps every intermediate of the PQ codebook loss (the "
            "[tokens*heads, M, 16] distance and assignment tensors of q and of k). Under the backend, row (c'), the "
            "codebook loss's incoming gradient is the constant weight injected by sparsify::aux_loss, so AOTAutograd "
            "can compute that part of the backward inside the forward and keep only its results: compare memory "
            "with (c') for what a backend user gets.", ""]
    for r in payload["rows"]:
        if r.get("regions"):
            out += [f"(c') options {r.get('options')}; compiled in {r.get('compile_s')} s (prepare + compile + "
                    "first step); regions: " + "; ".join(r["regions"]), ""]
        for b in ("mha", "ffn", "layer"):
            if isinstance(r.get(b), dict) and "error" in r[b]:
                out += [f"{ROW_LABELS[r['row']]} {b}: ERROR {r[b]['error']}", ""]
    out += ["## The paper's numbers (SPT, arXiv 2312.10365, Introduction table; GPU, full size) — for reference, "
            "not measured here", ""]
    p = payload["paper"]
    out.append(T.markdown_table(
        ["paper row", "MHA ms", "FFN ms", "total ms", "MHA GB", "FFN GB", "peak GB", "total / full", "peak / full"],
        [[name, v["mha_ms"], v["ffn_ms"], v["layer_ms"], v["mha_gb"], v["ffn_gb"], v["peak_gb"],
          f"{v['layer_ms'] / p['full']['layer_ms']:.2f}", f"{v['peak_gb'] / p['full']['peak_gb']:.2f}"]
         for name, v in p.items()]))
    return "\n".join(out)


if __name__ == "__main__":
    main()
