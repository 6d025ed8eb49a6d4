"""Grouped GEMM kernels for the routed FFN (sparsify::routed_mlp, papers.md section 1), generated per spec.

Public API::

    GroupedGemmSpec, kernel_source(spec), kernel_key(spec), get_grouped_kernel(spec)
    grouped_up(x, w, tok, offsets, block_size, *, perm=None, bias=None, row_scale=None, lora=None,
               activation=None, gate=None, out_dtype=None) -> Y [A, block_size]
    grouped_down(h, w, tok, offsets, out, *, perm=None, row_scale=None) -> out   (fp32 out, scatter-added)
    grouped_wgrad(l, r, tok, offsets, out, *, perm=None) -> out                  (per-block weight gradients)
    TRITON_GROUPED   # the three above as one "grouped primitives" object, like ops/routed_grouping.py TORCH_GROUPED

The routing is given as indices (ScatterMoE style: data is never permuted or copied):
    tok [A] int32       token of each assignment, assignments sorted by block (A = T * top_k)
    offsets [NB+1] int32  block i owns assignments [offsets[i], offsets[i+1])   (on the device)
    perm [F] or None    neuron order: neuron j of block i is perm[i * fb + j] (None: i * fb + j)
Semantics (the torch reference is sparsify.ops.routed_grouping.TorchGrouped, with the same signatures):
    up     Y[a, j] = f(x[tok[a]] . w[n(i, j)])          w [F, K] (nn.Linear rows = neurons), any strides
           f: pre = s[a] * (acc + bias[n]) + lora_scale * (xa[tok[a]] . lb[n]), then the activation; gated:
           act(pre_gate) * pre_up with a second accumulator fed by the same x tile.
    down   out[tok[a], m] += s[a] * sum_j h[a, j] w[m, n(i, j)]       w [M, F] (columns = neurons)
    wgrad  out[n(i, j), k] = sum_{a in block i} l[a, j] r[tok[a], k]  out [F, K] (any strides: a transposed
           view of a [K, F] gradient is written in place)

Kernels
-------
up / down / act_bwd: a 1-d grid of (cdiv(A, BLOCK_M) + NB) M-tiles x the output columns' N-tiles, in grouped order
(GROUP_M M-tiles walk the N-tiles together: a tile row's gathered rows are read once and reused from L2, each
weight tile serves GROUP_M M-tiles; TILE_LOOKUP). Block i owns ceil(count_i / BLOCK_M)
consecutive M-tiles after those of blocks < i; sum_i ceil(count_i / BLOCK_M) <= cdiv(A, BLOCK_M) + NB, so
the grid is an upper bound known from A and NB alone. Each program scans the NB offsets (NB scalar loads) to
find its block and row range; spare programs find none, run zero K iterations and store nothing. Hence no
count ever reaches the host: no sync, and the launch is CUDA-graph friendly. x rows are gathered through
tok inside the load (no gathered copy of x); weight rows / columns through perm. The up epilogue (fp32)
applies bias, the gate g, the LoRA term (a second, rank-r K loop: xa = x A^T is computed densely
beforehand, [T, r]), the activation and the gated product, and stores [A, fb] in sorted order. down
multiplies by g and scatter-adds rows into an fp32 [T, M] buffer with tl.atomic_add (a token's top_k
blocks land in the same row); the caller initialises it (with the bias: added once) and casts at the end.
Summation order across a token's blocks is therefore not deterministic on a GPU.
wgrad: grid (NB * cdiv(fb, BLOCK_N), cdiv(K, BLOCK_K)); each program loops over its block's assignment
slice (bounds loaded from offsets: again no host count) and writes its tile of neuron rows (zeros for an
empty block).

Dtypes: operands fp16 / bf16 / fp32 (the spec dtype; loads are cast to it so fp32 intermediates can be fed
back), fp32 accumulation, fp32 tf32-free products for fp32 (input_precision="ieee"). Tile sizes are
autotuned on a GPU among a few configs per kind (_GPU_TILES, every one compiled for sm_90 without spills): down's
timing runs restore its output (it accumulates onto the bias), act_bwd's zero its row / column sums again; not
timed on hardware yet. Built lazily, builtins only, keyed on TRITON_INTERPRET like every
sparsify.codegen kernel (see templates.py); bf16 tl.dot is inexact in the interpreter, test fp32 / fp16.
"""
from __future__ import annotations

import dataclasses
from string import Template

import torch

from . import templates as _T
from .spt_templates import REDUCTIONS  # tl.reduce's combine functions, defined per mode in the generated module
from ..tables import KERNEL_DTYPES as SUPPORTED_DTYPES
from .kernel import GeneratedKernel, KernelSpec, load_kernel, size_bucket, templates_digest, tile_configs

__all__ = [
    "GroupedGemmSpec",
    "kernel_source",
    "kernel_key",
    "get_grouped_kernel",
    "grouped_up",
    "grouped_down",
    "grouped_wgrad",
    "grouped_act_backward",
    "TRITON_GROUPED",
]

KINDS = ("up", "down", "wgrad", "act_bwd")
UP_ACTIVATIONS = ("none",) + tuple(_T.ACTIVATIONS)


# --- spec ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GroupedGemmSpec(KernelSpec):
    """Every choice that changes a grouped kernel's source. Fields that do not apply to a kind must keep
    their defaults (so equal kernels have equal specs)."""

    family = "grouped"

    kind: str
    dtype: torch.dtype = torch.float16
    permuted: bool = False       # neuron order given (perm gather) or identity
    row_scale: bool = False      # up / down: per-assignment factor g
    activation: str = "none"     # up only
    gated: bool = False          # up only: a second (gate) accumulator, out = act(gate) * up
    bias: bool = False           # up only
    gate_bias: bool = False      # up, gated only
    lora: bool = False           # up only: + scale * xa[tok] . lb[n]
    gate_lora: bool = False      # up, gated only
    store_pre: bool = False      # up only: also store W x + b of each projection (before g and LoRA) for backward
    # act_bwd (the backward's v = dy . W_down[:, n] with the activation's backward in its epilogue) uses
    # activation, gated and row_scale as up does, and:
    want_dg: bool = False        # act_bwd: accumulate the gate gradient's row sums (row_scale needed)
    bias_grad: bool = False      # act_bwd: accumulate the up (and gate) bias gradients as column sums
    down_lora: bool = False      # act_bwd: dh gets the down LoRA's term, and hd is written for its gradients
    dropout: bool = False        # up / act_bwd: h (and dh) times a keep mask [A, fb] / (1 - p), read in the epilogue
    # (lora / gate_lora on act_bwd: z gets the LoRA term of that projection, and dz is written for its factors)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"GroupedGemmSpec.kind must be one of {KINDS}, got {self.kind!r}")
        super().__post_init__()
        if self.activation not in UP_ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.activation!r}; expected one of {UP_ACTIVATIONS}")
        up_only = (self.bias, self.gate_bias, self.store_pre)
        if self.kind != "up" and any(up_only):
            raise ValueError("GroupedGemmSpec: bias / gate_bias / store_pre apply to kind 'up' only")
        if self.kind not in ("up", "act_bwd") and (self.lora or self.gate_lora):
            raise ValueError("GroupedGemmSpec: lora / gate_lora apply to kinds 'up' and 'act_bwd' only")
        if self.kind not in ("up", "act_bwd") and (self.activation != "none" or self.gated):
            raise ValueError("GroupedGemmSpec: activation / gated apply to kinds 'up' and 'act_bwd' only")
        if self.kind not in ("up", "act_bwd") and self.dropout:
            raise ValueError("GroupedGemmSpec: dropout applies to kinds 'up' and 'act_bwd' only")
        if self.kind != "act_bwd" and (self.want_dg or self.bias_grad or self.down_lora):
            raise ValueError("GroupedGemmSpec: want_dg / bias_grad / down_lora apply to kind 'act_bwd' only")
        if self.kind == "act_bwd" and (self.activation == "none" or (self.want_dg and not self.row_scale)):
            raise ValueError("GroupedGemmSpec: act_bwd needs an activation, and want_dg a row_scale (the gate)")
        if self.kind == "wgrad" and self.row_scale:
            raise ValueError("GroupedGemmSpec: wgrad takes no row_scale (scale its input instead)")
        if (self.gate_bias or self.gate_lora) and not self.gated:
            raise ValueError("GroupedGemmSpec: gate_bias / gate_lora need gated=True")
        if self.gated and self.activation == "none":
            raise ValueError("GroupedGemmSpec: a gated up-projection needs an activation")

    @property
    def kernel_name(self) -> str:
        parts = ["grouped", self.kind]
        if self.kind in ("up", "act_bwd"):
            parts.append(self.activation)
            parts += [flag for flag in ("gated", "bias", "gate_bias", "lora", "gate_lora", "store_pre", "want_dg",
                                        "bias_grad", "down_lora", "dropout") if getattr(self, flag)]
        if self.row_scale:
            parts.append("scaled")
        if self.permuted:
            parts.append("perm")
        parts.append(self.dtype_name)
        return "_".join(parts) + "_kernel"


# --- templates -------------------------------------------------------------------------------

HEADER = Template('''\
# Generated by sparsify.codegen.grouped_gemm -- do not edit (regenerated from the spec below).
# spec: $spec
# key:  $key
import triton
import triton.language as tl


''')

# Finds the block and the row range of M-tile pid_m without any host-side count (module docstring).
TILE_LOOKUP = Template('''\
    # grouped order (Triton's matmul swizzle) on a 1-d grid of M_TILES x N_TILES programs: GROUP_M consecutive
    # M-tiles walk every N-tile together, so a tile row's gathered rows are read from memory once and served from
    # L2 to its other N-tiles, and each weight tile is reused by GROUP_M M-tiles while it is in L2. The tile counts
    # come from the tile sizes here, not from the launcher, so an autotuned launch may pick any BLOCK_M / BLOCK_N.
    M_TILES = (A + BLOCK_M - 1) // BLOCK_M + NB
    N_TILES = ($n_extent + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)
    in_group = GROUP_M * N_TILES
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(M_TILES - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    zero = pid_m * 0
    blk = zero - 1
    row0 = zero
    row_end = zero
    tiles_before = zero
    for i in range(0, NB):
        start = tl.load(off_ptr + i)
        end = tl.load(off_ptr + i + 1)
        n_tiles = (end - start + BLOCK_M - 1) // BLOCK_M
        hit = (pid_m >= tiles_before) & (pid_m < tiles_before + n_tiles)
        blk = tl.where(hit, i, blk)
        row0 = tl.where(hit, start + (pid_m - tiles_before) * BLOCK_M, row0)
        row_end = tl.where(hit, end, row_end)
        tiles_before += n_tiles
    active = blk >= 0
    blk = tl.maximum(blk, 0)  # a spare program addresses block 0 but loads and stores nothing
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
''')

NEURON_IDENTITY = Template("    $dst = (blk * FB + $j).to(tl.int64)\n")
NEURON_PERM = Template("    $dst = tl.load(perm_ptr + blk * FB + $j, mask=$mask, other=0).to(tl.int64)\n")

UP_MAINLOOP = '''\
@triton.jit
def $name(
    $params,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
$tile_lookup
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # neuron index inside the block
    mask_n = offs_n < FB
$neuron
    offs_k = tl.arange(0, BLOCK_K)
    # the gather of x rows by token happens here, in the load: x is never copied
    tokens = tl.load(tok_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    x_ptrs = x_ptr + tokens[:, None] * s_xm + offs_k[None, :] * s_xk
    w_ptrs = w_ptr + neuron[None, :] * s_wn + offs_k[:, None] * s_wk
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
${gate_init}    k_hi = tl.where(active, K, 0)
    for k0 in range(0, k_hi, BLOCK_K):
        k_mask = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & k_mask[None, :], other=0.0).to($dt)
        wt = tl.load(w_ptrs, mask=k_mask[:, None] & mask_n[None, :], other=0.0).to($dt)
        acc += tl.dot(xt, wt$dot_kwargs)
${gate_dot}        x_ptrs += BLOCK_K * s_xk
        w_ptrs += BLOCK_K * s_wk
${gate_advance}
'''
UP_KERNEL = Template(UP_MAINLOOP + '''\
    # ---- epilogue (fp32) ----
${epilogue}
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * s_ym + offs_n[None, :] * s_yn
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
''')

# The routed backward's elementwise work in the epilogue of v = dy . W_down[:, n] (acc): with u = W x + b as the
# forward stored it and z = g u, h = act(z) (gated: h = act(g u_gate) * g u), dh = g v, it writes g h (the down
# weight gradient's operand) and g dz per projection (the up / gate weight and input gradients' operand) in the
# operand dtype, and accumulates in fp32 the gate gradient's row sums h . v + dz . u and the bias gradients'
# column sums g dz (relaxed atomics: a sum, nothing reads it before the kernel ends). No [A, fb] fp32 pass.
ACT_BWD_KERNEL = Template(UP_MAINLOOP + '''\
    # ---- backward epilogue (fp32): acc = v ----
    tile = mask_m[:, None] & mask_n[None, :]
    at = offs_m[:, None].to(tl.int64) * FB + offs_n[None, :]  # the [A, fb] contiguous buffers
    u = tl.load(pre_ptr + at, mask=tile, other=0.0).to(tl.float32)
${epilogue}
''')

GATE_INIT = ("    wg_ptrs = wg_ptr + neuron[None, :] * s_gn + offs_k[:, None] * s_gk\n"
             "    acc_g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)\n")
GATE_DOT = Template(
    "        # the gate GEMM reuses the x tile: one gathered load feeds both accumulators\n"
    "        wgt = tl.load(wg_ptrs, mask=k_mask[:, None] & mask_n[None, :], other=0.0).to($dt)\n"
    "        acc_g += tl.dot(xt, wgt$dot_kwargs)\n")
GATE_ADVANCE = "        wg_ptrs += BLOCK_K * s_gk\n"

BIAS = Template("    $acc += tl.load($ptr + neuron, mask=mask_n, other=0.0).to(tl.float32)[None, :]\n")
# the frozen part W x + b, stored beside Y (same [A, fb] layout) so the backward needs no recompute GEMM
STORE_PRE = Template("    tl.store($ptr + offs_m[:, None].to(tl.int64) * s_ym + offs_n[None, :] * s_yn, "
                     "$acc.to($ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])\n")
ROW_SCALE_LOAD = "    g = tl.load(g_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)\n"
# dropout: the keep mask [A, fb] (uint8, the sorted rows of torch's [T, F] draw: ops/routed_grouping.py
# sorted_keep) and keep_scale = 1 / (1 - p) (0 when p = 1)
DROPOUT_KEEP = ("    keep = tl.load(keep_ptr + offs_m[:, None].to(tl.int64) * FB + offs_n[None, :], "
                "mask=mask_m[:, None] & mask_n[None, :], other=0) != 0\n")
DROPOUT_APPLY = Template("    $v = tl.where(keep, $v * keep_scale, 0.0)\n")
ROW_SCALE = Template("    $acc = $acc * g[:, None]\n")
# rank-r LoRA term: (A x)[tok] . B[n] over r, BLOCK_K at a time (tl.dot needs K >= 16: masked padding)
LORA = Template('''\
    lacc_$p = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    r_hi_$p = tl.where(active, R_$p, 0)
    for r0 in range(0, r_hi_$p, BLOCK_K):
        r_mask = offs_k < R_$p - r0
        at = tl.load(xa_${p}_ptr + tokens[:, None] * s_${p}am + (r0 + offs_k)[None, :] * s_${p}ak,
                     mask=mask_m[:, None] & r_mask[None, :], other=0.0).to($dt)
        bt = tl.load(lb_${p}_ptr + neuron[None, :] * s_${p}bn + (r0 + offs_k)[:, None] * s_${p}bk,
                     mask=r_mask[:, None] & mask_n[None, :], other=0.0).to($dt)
        lacc_$p += tl.dot(at, bt$dot_kwargs)
    $acc += lora_scale_$p * lacc_$p
''')

DOWN_KERNEL = Template('''\
@triton.jit
def $name(
    $params,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
$tile_lookup
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output column
    mask_n = offs_n < M
    offs_k = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + offs_m[:, None].to(tl.int64) * s_hm
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    k_hi = tl.where(active, FB, 0)
    for k0 in range(0, k_hi, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < FB
$neuron_k
        ht = tl.load(h_rows + kk[None, :] * s_hk, mask=mask_m[:, None] & k_mask[None, :], other=0.0).to($dt)
        wt = tl.load(w_ptr + nk[:, None] * s_wk + offs_n[None, :] * s_wm,
                     mask=k_mask[:, None] & mask_n[None, :], other=0.0).to($dt)
        acc += tl.dot(ht, wt$dot_kwargs)
$scale
    # scatter-add back in token order: a token's top_k blocks meet in the same fp32 row (relaxed: the sum needs
    # atomicity, not ordering; nothing reads out before the kernel ends)
    tokens = tl.load(tok_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    tl.atomic_add(out_ptr + tokens[:, None] * s_om + offs_n[None, :] * s_on, acc,
                  mask=mask_m[:, None] & mask_n[None, :], sem="relaxed")
''')

WGRAD_KERNEL = Template('''\
@triton.jit
def $name(
    $params,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_A: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    N_TILES = (FB + BLOCK_N - 1) // BLOCK_N
    blk = pid // N_TILES
    offs_n = (pid % N_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)  # neuron index inside the block
    mask_n = offs_n < FB
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_a = tl.arange(0, BLOCK_A)
    # this block's slice of the sorted assignments, read on the device
    start = tl.load(off_ptr + blk)
    end = tl.load(off_ptr + blk + 1)
    acc = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float32)
    for a0 in range(start, end, BLOCK_A):
        rows = a0 + offs_a
        mask_a = rows < end
        lt = tl.load(l_ptr + rows[None, :].to(tl.int64) * s_lm + offs_n[:, None] * s_lk,
                     mask=mask_n[:, None] & mask_a[None, :], other=0.0).to($dt)
        tokens = tl.load(tok_ptr + rows, mask=mask_a, other=0).to(tl.int64)
        rt = tl.load(r_ptr + tokens[:, None] * s_rm + offs_k[None, :] * s_rk,
                     mask=mask_a[:, None] & mask_k[None, :], other=0.0).to($dt)
        acc += tl.dot(lt, rt$dot_kwargs)
$neuron
    o_ptrs = out_ptr + neuron[:, None] * s_on + offs_k[None, :].to(tl.int64) * s_ok
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])
''')


# activation value and derivative of the fp32 tile $z into $a and $d (torch's formulas: relu'(0) = 0)
ACTIVATION_GRADS = {
    "gelu": Template("    cdf_$z = 0.5 * (1.0 + tl.math.erf($z * 0.7071067811865476))\n"
                     "    $a = $z * cdf_$z\n"
                     "    $d = cdf_$z + $z * 0.3989422804014327 * tl.exp(-0.5 * $z * $z)\n"),
    "gelu_tanh": Template("    in_$z = 0.7978845608028654 * ($z + 0.044715 * $z * $z * $z)\n"
                          "    th_$z = 1.0 - 2.0 / (tl.exp(2.0 * in_$z) + 1.0)\n"
                          "    $a = 0.5 * $z * (1.0 + th_$z)\n"
                          "    $d = 0.5 * (1.0 + th_$z) + 0.5 * $z * (1.0 - th_$z * th_$z) * 0.7978845608028654 * "
                          "(1.0 + 0.134145 * $z * $z)\n"),
    "relu": Template("    $a = tl.maximum($z, 0.0)\n    $d = tl.where($z > 0.0, 1.0, 0.0)\n"),
    "silu": Template("    sg_$z = 1.0 / (1.0 + tl.exp(-$z))\n    $a = $z * sg_$z\n"
                     "    $d = sg_$z * (1.0 + $z * (1.0 - sg_$z))\n"),
    "quick_gelu": Template("    sg_$z = 1.0 / (1.0 + tl.exp(-1.702 * $z))\n    $a = $z * sg_$z\n"
                           "    $d = sg_$z + 1.702 * $z * sg_$z * (1.0 - sg_$z)\n"),
    "relu2": Template("    $a = tl.where($z > 0.0, $z * $z, 0.0)\n    $d = tl.where($z > 0.0, 2.0 * $z, 0.0)\n"),
}
# act_bwd epilogue lines (fp32 tiles; u, ug: the stored W x + b; acc: v); the optional ones by spec flag
ACT_BWD_LOAD = Template("    $dst = tl.load($ptr + at, mask=tile, other=0.0).to(tl.float32)\n")
ACT_BWD_STORE = Template("    tl.store($ptr + at, ($v).to($ptr.dtype.element_ty), mask=tile)\n")
ACT_BWD_DG = Template(
    "    tl.atomic_add(dg_ptr + offs_m, tl.reduce($terms, 1, _sum_combine), mask=mask_m, sem=\"relaxed\")\n")
ACT_BWD_DB = Template(
    "    tl.atomic_add($ptr + neuron, tl.reduce(tl.where(tile, $v, 0.0), 0, _sum_combine), mask=mask_n, "
    "sem=\"relaxed\")\n")


_TEMPLATE_DIGEST = None  # computed on first use (after every template above is defined)


def _grouped_digest() -> str:
    global _TEMPLATE_DIGEST
    if _TEMPLATE_DIGEST is None:  # the activation snippets come from templates.py: its templates count too
        _TEMPLATE_DIGEST = templates_digest(vars(_T), globals())
    return _TEMPLATE_DIGEST


def _check_spec(spec):
    if not isinstance(spec, GroupedGemmSpec):
        raise ValueError(f"expected a GroupedGemmSpec, got {type(spec).__name__}")


def kernel_key(spec: GroupedGemmSpec) -> str:
    _check_spec(spec)
    return spec.key(_grouped_digest())


def _neuron(spec, dst, j, mask, indent=""):
    t = NEURON_PERM if spec.permuted else NEURON_IDENTITY
    line = t.substitute(dst=dst, j=j, mask=mask)
    return indent + line


def _up_source(spec: GroupedGemmSpec, dot_kwargs: str, dt: str) -> str:
    params = ["x_ptr", "w_ptr"]
    if spec.gated:
        params.append("wg_ptr")
    if spec.bias:
        params.append("b_ptr")
    if spec.gate_bias:
        params.append("bg_ptr")
    if spec.row_scale:
        params.append("g_ptr")
    for p, on in (("u", spec.lora), ("g", spec.gate_lora)):
        if on:
            params += [f"xa_{p}_ptr", f"lb_{p}_ptr"]
    if spec.store_pre:
        params += ["pre_ptr"] + (["pre_g_ptr"] if spec.gated else [])
    if spec.dropout:
        params += ["keep_ptr", "keep_scale"]
    if spec.permuted:
        params.append("perm_ptr")
    params += ["tok_ptr", "off_ptr", "y_ptr", "A", "NB", "FB", "K"]
    params += ["s_xm", "s_xk", "s_wn", "s_wk"]
    if spec.gated:
        params += ["s_gn", "s_gk"]
    for p, on in (("u", spec.lora), ("g", spec.gate_lora)):
        if on:
            params += [f"R_{p}", f"lora_scale_{p}", f"s_{p}am", f"s_{p}ak", f"s_{p}bn", f"s_{p}bk"]
    params += ["s_ym", "s_yn"]

    epi = ""
    if spec.bias:
        epi += BIAS.substitute(acc="acc", ptr="b_ptr")
    if spec.gate_bias:
        epi += BIAS.substitute(acc="acc_g", ptr="bg_ptr")
    if spec.store_pre:
        epi += STORE_PRE.substitute(ptr="pre_ptr", acc="acc")
        if spec.gated:
            epi += STORE_PRE.substitute(ptr="pre_g_ptr", acc="acc_g")
    if spec.row_scale:
        epi += ROW_SCALE_LOAD + ROW_SCALE.substitute(acc="acc")
        if spec.gated:
            epi += ROW_SCALE.substitute(acc="acc_g")
    if spec.lora:
        epi += LORA.substitute(p="u", acc="acc", dt=dt, dot_kwargs=dot_kwargs)
    if spec.gate_lora:
        epi += LORA.substitute(p="g", acc="acc_g", dt=dt, dot_kwargs=dot_kwargs)
    if spec.gated:
        epi += _T.ACTIVATIONS[spec.activation].substitute(v="acc_g") + "    out = acc_g * acc\n"
    elif spec.activation != "none":
        epi += _T.ACTIVATIONS[spec.activation].substitute(v="acc") + "    out = acc\n"
    else:
        epi += "    out = acc\n"
    if spec.dropout:
        epi += DROPOUT_KEEP + DROPOUT_APPLY.substitute(v="out")
    return _on_up_mainloop(UP_KERNEL, spec, params, dot_kwargs, dt, epi, gate_gemm=spec.gated)


def _on_up_mainloop(template: Template, spec: GroupedGemmSpec, params: list, dot_kwargs: str, dt: str,
                    epilogue: str, gate_gemm: bool) -> str:
    """A kernel built on UP_MAINLOOP (up, act_bwd): the gathered-rows GEMM, a second (gate) accumulator fed by the
    same x tile when gate_gemm, then `epilogue`."""
    return template.substitute(
        name=spec.kernel_name,
        params=",\n    ".join(params),
        tile_lookup=TILE_LOOKUP.substitute(n_extent="FB").rstrip("\n"),
        neuron=_neuron(spec, "neuron", "offs_n", "mask_n").rstrip("\n"),
        dt=dt,
        dot_kwargs=dot_kwargs,
        gate_init=GATE_INIT if gate_gemm else "",
        gate_dot=GATE_DOT.substitute(dt=dt, dot_kwargs=dot_kwargs) if gate_gemm else "",
        gate_advance=GATE_ADVANCE if gate_gemm else "",
        epilogue=epilogue.rstrip("\n"),
    )


def _act_bwd_source(spec: GroupedGemmSpec, dot_kwargs: str, dt: str) -> str:
    gated = spec.gated
    params = ["x_ptr", "w_ptr", "pre_ptr"] + (["pre_g_ptr"] if gated else [])
    if spec.row_scale:
        params.append("g_ptr")
    params += (["lz_ptr"] if spec.lora else []) + (["lz_g_ptr"] if spec.gate_lora else [])
    params += ["e_ptr"] if spec.down_lora else []
    params += ["ghd_ptr", "gdz_ptr"] + (["gdz_g_ptr"] if gated else [])
    params += (["hd_ptr"] if spec.down_lora else []) + (["dz_ptr"] if spec.lora else [])
    params += ["dz_g_ptr"] if spec.gate_lora else []
    if spec.want_dg:
        params.append("dg_ptr")
    if spec.bias_grad:
        params += ["db_ptr"] + (["db_g_ptr"] if gated else [])
    if spec.dropout:
        params += ["keep_ptr", "keep_scale"]
    if spec.permuted:
        params.append("perm_ptr")
    params += ["tok_ptr", "off_ptr", "A", "NB", "FB", "K", "s_xm", "s_xk", "s_wn", "s_wk"]

    load, store = ACT_BWD_LOAD.substitute, ACT_BWD_STORE.substitute
    grads = ACTIVATION_GRADS[spec.activation]
    epi = ROW_SCALE_LOAD if spec.row_scale else "    g = tl.full((BLOCK_M,), 1.0, tl.float32)\n"
    epi += "    zu = u * g[:, None]\n"
    if spec.lora:
        epi += load(dst="lz", ptr="lz_ptr") + "    zu += lz\n"
    if gated:
        epi += load(dst="ug", ptr="pre_g_ptr") + "    zg = ug * g[:, None]\n"
        if spec.gate_lora:
            epi += load(dst="lzg", ptr="lz_g_ptr") + "    zg += lzg\n"
        epi += grads.substitute(z="zg", a="a_g", d="d_g") + "    hd = a_g * zu\n"
    else:
        epi += grads.substitute(z="zu", a="hd", d="d_u")
    epi += "    dh = acc * g[:, None]\n"
    if spec.down_lora:
        epi += load(dst="e", ptr="e_ptr") + "    dh += e\n"
    if spec.dropout:  # hd = dropout(h), dh = dropout(g v + e): one mask for both
        epi += "    keep = tl.load(keep_ptr + at, mask=tile, other=0) != 0\n"
        epi += DROPOUT_APPLY.substitute(v="hd") + DROPOUT_APPLY.substitute(v="dh")
    if gated:
        epi += "    dzu = dh * a_g\n    dzg = d_g * dh * zu\n"
    else:
        epi += "    dzu = d_u * dh\n"
    epi += store(ptr="ghd_ptr", v="hd * g[:, None]")
    if spec.down_lora:
        epi += store(ptr="hd_ptr", v="hd")
    epi += "    gdz = dzu * g[:, None]\n" + store(ptr="gdz_ptr", v="gdz")
    if spec.lora:
        epi += store(ptr="dz_ptr", v="dzu")
    if gated:
        epi += "    gdz_g = dzg * g[:, None]\n" + store(ptr="gdz_g_ptr", v="gdz_g")
        if spec.gate_lora:
            epi += store(ptr="dz_g_ptr", v="dzg")
    if spec.want_dg:  # hd . v + dz_up . u_up (+ dz_gate . u_gate)
        epi += ACT_BWD_DG.substitute(terms="hd * acc + dzu * u" + (" + dzg * ug" if gated else ""))
    if spec.bias_grad:
        epi += ACT_BWD_DB.substitute(ptr="db_ptr", v="gdz")
        if gated:
            epi += ACT_BWD_DB.substitute(ptr="db_g_ptr", v="gdz_g")
    # one GEMM (v); a gated MLP's two projections only differ in the epilogue
    return _on_up_mainloop(ACT_BWD_KERNEL, spec, params, dot_kwargs, dt, epi, gate_gemm=False)


def _down_source(spec: GroupedGemmSpec, dot_kwargs: str, dt: str) -> str:
    params = ["h_ptr", "w_ptr"]
    if spec.row_scale:
        params.append("g_ptr")
    if spec.permuted:
        params.append("perm_ptr")
    params += ["tok_ptr", "off_ptr", "out_ptr", "A", "NB", "FB", "M", "s_hm", "s_hk", "s_wm", "s_wk",
               "s_om", "s_on"]
    scale = (ROW_SCALE_LOAD + ROW_SCALE.substitute(acc="acc")) if spec.row_scale else ""
    return DOWN_KERNEL.substitute(
        name=spec.kernel_name,
        params=",\n    ".join(params),
        tile_lookup=TILE_LOOKUP.substitute(n_extent="M").rstrip("\n"),
        neuron_k=_neuron(spec, "nk", "kk", "k_mask", indent="    ").rstrip("\n"),
        dt=dt,
        dot_kwargs=dot_kwargs,
        scale=scale.rstrip("\n"),
    )


def _wgrad_source(spec: GroupedGemmSpec, dot_kwargs: str, dt: str) -> str:
    params = ["l_ptr", "r_ptr"]
    if spec.permuted:
        params.append("perm_ptr")
    params += ["tok_ptr", "off_ptr", "out_ptr", "FB", "K", "s_lm", "s_lk", "s_rm", "s_rk",
               "s_on", "s_ok"]
    return WGRAD_KERNEL.substitute(
        name=spec.kernel_name,
        params=",\n    ".join(params),
        neuron=_neuron(spec, "neuron", "offs_n", "mask_n").rstrip("\n"),
        dt=dt,
        dot_kwargs=dot_kwargs,
    )


_TL_DTYPES = {torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16", torch.float32: "tl.float32"}


def kernel_source(spec: GroupedGemmSpec) -> str:
    """The Triton source generated for ``spec`` (pure: no file, no triton import)."""
    key = kernel_key(spec)
    dot_kwargs = _T.DOT_KWARGS_FP32 if spec.dtype == torch.float32 else ""
    dt = _TL_DTYPES[spec.dtype]
    body = {"up": _up_source, "down": _down_source, "wgrad": _wgrad_source,
            "act_bwd": _act_bwd_source}[spec.kind](spec, dot_kwargs, dt)
    if spec.kind == "act_bwd":  # its row / column sums: tl.reduce with combine functions of the kernel's mode
        body = REDUCTIONS + "\n\n" + body
    return HEADER.substitute(spec=spec.canonical(), key=key) + body


# --- the kernel (kernel.py's loader and one cache) ---------------------------------------------

def get_grouped_kernel(spec: GroupedGemmSpec) -> GeneratedKernel:
    """Generated, written and imported on first use, then served from the one kernel cache (kernel.py)."""
    _check_spec(spec)
    return load_kernel(spec, lambda: kernel_source(spec), _grouped_digest())


# --- launch ----------------------------------------------------------------------------------

# Tile configs (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages; wgrad: BLOCK_A, BLOCK_N, BLOCK_K, ...) a GPU launch
# picks from with triton.autotune (kernel.py launch_tuned), once per (kernel, shape, token-count bucket). The first of
# each kind is the default (SPARSIFY_AUTOTUNE=0 pins it). Every config compiles for sm_90 without spills
# (benchmarks/results/sm90_kernels.md); act_bwd runs 8 warps: at 4 its gated epilogue's live tiles spill.
_GPU_TILES = {
    "up": ((64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 64, 4, 3)),
    "down": ((64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 64, 4, 3)),
    # act_bwd's epilogue holds v, u (and u_gate) and their products live at once: 128-row or -column tiles spill
    "act_bwd": ((64, 64, 32, 8, 3), (64, 64, 64, 8, 3), (64, 64, 32, 8, 4), (32, 64, 64, 4, 3)),
    "wgrad": ((64, 64, 32, 4, 3), (32, 128, 64, 4, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4)),
}
# the interpreter runs one 16-wide config (tl.dot's minimum): few programs are what makes it fast
_INTERPRET_TILES = ((16, 16, 16, 1, 1),)
_TILE_NAMES = {"wgrad": ("BLOCK_A", "BLOCK_N", "BLOCK_K")}


def _tile_configs(kind: str, interpret: bool) -> tuple:
    return tile_configs(_INTERPRET_TILES if interpret else _GPU_TILES[kind],
                        _TILE_NAMES.get(kind, ("BLOCK_M", "BLOCK_N", "BLOCK_K")))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


GROUP_M = 8  # M-tiles that walk the N-tiles together (TILE_LOOKUP's grouped order)


def _launch_grouped(kernel, kind: str, a: int, nb: int, n: int, key: tuple, reset=(), restore=(), **args):
    """An up / down / act_bwd launch: a 1-d grid of cdiv(A, BLOCK_M) + NB M-tiles (an upper bound of every block's
    tiles, known without reading the counts) times cdiv(n, BLOCK_N) N-tiles, at the tuned config; the kernel
    derives the same counts from A, NB and the tile sizes."""
    def grid(meta):
        return ((_cdiv(a, meta["BLOCK_M"]) + nb) * _cdiv(n, meta["BLOCK_N"]),)
    kernel.launch_tuned(grid, _tile_configs(kind, kernel.interpret), key=key, bucket=size_bucket(a), reset=reset,
                        restore=restore, A=a, NB=nb, GROUP_M=GROUP_M, **args)


def _check(name, t, device, dims=None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-d, got shape {tuple(t.shape)}")


def _index(name, t, n, device):
    _check(name, t, device, 1)
    if t.numel() != n or t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer vector of {n} entries, got {t.dtype} {tuple(t.shape)}")
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()


def _routing(tok, offsets, perm, d_ff, device):
    a = tok.numel()
    nb = offsets.numel() - 1
    tok = _index("tok", tok, a, device)
    offsets = _index("offsets", offsets, nb + 1, device)
    if perm is not None:
        perm = _index("perm", perm, d_ff, device)
    return a, nb, tok, offsets, perm


def _dtype_of(*tensors) -> torch.dtype:
    dtype = tensors[0].dtype
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}; expected one of {tuple(str(d) for d in SUPPORTED_DTYPES)}")
    return dtype




def _dropout_args(dropout, a, fb, device):
    """The kernels' dropout operands from (keep [A, fb] bool, p): the mask as uint8 and 1 / (1 - p)."""
    keep, p = dropout
    _check("keep", keep, device, 2)
    if tuple(keep.shape) != (a, fb) or keep.dtype != torch.bool:
        raise ValueError(f"dropout keep mask must be bool [{a}, {fb}], got {keep.dtype} {tuple(keep.shape)}")
    return dict(keep_ptr=keep.contiguous().view(torch.uint8), keep_scale=0.0 if p >= 1.0 else 1.0 / (1.0 - p))


def grouped_up(x, w, tok, offsets, block_size, *, perm=None, bias=None, row_scale=None, lora=None,
               activation=None, gate=None, out_dtype=None, pre_out=None, dropout=None):
    """Grouped up-projection over the sorted assignments: Y [A, block_size] (see the module docstring).

    x [T, K]; w [F, K] (F = NB * block_size, any strides); bias [F]; row_scale [A] (g); lora = (xa [T, r],
    lb [F, r], scale); activation: a name or None; gate = (wg [F, K], bg [F] or None, lora_g or None);
    out_dtype: Y's dtype (default x's); pre_out = (u [A, block_size], u_gate or None), contiguous: also stores
    each projection's W x + b there (before g and LoRA); dropout = (keep [A, block_size] bool, p): Y's kept entries
    scaled by 1 / (1 - p), the others zero. The operand dtype is x's (fp16 / bf16 / fp32)."""
    _check("x", x, x.device, 2)
    _check("w", w, x.device, 2)
    T, K = x.shape
    d_ff = w.shape[0]
    fb = int(block_size)
    a, nb, tok, offsets, perm = _routing(tok, offsets, perm, d_ff, x.device)
    if w.shape[1] != K or fb < 1 or d_ff != nb * fb:
        raise ValueError(f"grouped_up: w {tuple(w.shape)} does not match x {tuple(x.shape)}, {nb} blocks of {fb}")
    dtype = _dtype_of(x)
    gated = gate is not None
    wg, bg, lora_g = gate if gated else (None, None, None)
    act = activation or "none"
    spec = GroupedGemmSpec(kind="up", dtype=dtype, permuted=perm is not None, row_scale=row_scale is not None,
                           activation=act, gated=gated, bias=bias is not None, gate_bias=bg is not None,
                           lora=lora is not None, gate_lora=lora_g is not None, store_pre=pre_out is not None,
                           dropout=dropout is not None)
    y = torch.empty(a, fb, dtype=out_dtype or x.dtype, device=x.device)
    if pre_out is not None:
        for t in pre_out[:1 + gated]:
            _check("pre_out", t, x.device, 2)
            if tuple(t.shape) != (a, fb) or not t.is_contiguous():
                raise ValueError(f"grouped_up: pre_out must be contiguous [{a}, {fb}], got {tuple(t.shape)}")
    if a == 0 or fb == 0:
        return y
    kernel = get_grouped_kernel(spec)
    kernel.check_device(x)
    args = dict(x_ptr=x, w_ptr=w, tok_ptr=tok, off_ptr=offsets, y_ptr=y, FB=fb, K=K,
                s_xm=x.stride(0), s_xk=x.stride(1), s_wn=w.stride(0), s_wk=w.stride(1),
                s_ym=y.stride(0), s_yn=y.stride(1))
    if gated:
        if tuple(wg.shape) != tuple(w.shape):
            raise ValueError(f"grouped_up: gate weight {tuple(wg.shape)} differs from {tuple(w.shape)}")
        args.update(wg_ptr=wg, s_gn=wg.stride(0), s_gk=wg.stride(1))
    if bias is not None:
        args["b_ptr"] = bias.contiguous()
    if bg is not None:
        args["bg_ptr"] = bg.contiguous()
    if row_scale is not None:
        args["g_ptr"] = row_scale.contiguous()
    for p, lo in (("u", lora), ("g", lora_g)):
        if lo is not None:
            xa, lb, scale = lo
            args.update({f"xa_{p}_ptr": xa, f"lb_{p}_ptr": lb, f"R_{p}": xa.shape[1],
                         f"lora_scale_{p}": float(scale), f"s_{p}am": xa.stride(0), f"s_{p}ak": xa.stride(1),
                         f"s_{p}bn": lb.stride(0), f"s_{p}bk": lb.stride(1)})
    if pre_out is not None:
        args["pre_ptr"] = pre_out[0]
        if gated:
            args["pre_g_ptr"] = pre_out[1]
    if dropout is not None:
        args.update(_dropout_args(dropout, a, fb, x.device))
    if perm is not None:
        args["perm_ptr"] = perm
    _launch_grouped(kernel, "up", a, nb, fb, ("FB", "K"), **args)
    return y


def grouped_down(h, w, tok, offsets, out, *, perm=None, row_scale=None):
    """out[tok[a], m] += row_scale[a] * sum_j h[a, j] w[m, n(i, j)]: h [A, fb], w [M, F] (any strides),
    out fp32 [T, M] (any strides), updated in place and returned."""
    _check("h", h, h.device, 2)
    _check("w", w, h.device, 2)
    _check("out", out, h.device, 2)
    a, fb = h.shape
    m, d_ff = w.shape
    a_, nb, tok, offsets, perm = _routing(tok, offsets, perm, d_ff, h.device)
    if a_ != a or d_ff != nb * fb or out.shape[1] != m:
        raise ValueError(f"grouped_down: h {tuple(h.shape)}, w {tuple(w.shape)}, out {tuple(out.shape)} and "
                         f"{nb} blocks / {a_} assignments do not match")
    if out.dtype != torch.float32:
        raise ValueError(f"grouped_down: out must be fp32 (atomic accumulation), got {out.dtype}")
    dtype = _dtype_of(h)
    if a == 0 or m == 0:
        return out
    spec = GroupedGemmSpec(kind="down", dtype=dtype, permuted=perm is not None, row_scale=row_scale is not None)
    kernel = get_grouped_kernel(spec)
    kernel.check_device(h)
    args = dict(h_ptr=h, w_ptr=w, tok_ptr=tok, off_ptr=offsets, out_ptr=out, FB=fb, M=m,
                s_hm=h.stride(0), s_hk=h.stride(1), s_wm=w.stride(0), s_wk=w.stride(1),
                s_om=out.stride(0), s_on=out.stride(1))
    if row_scale is not None:
        args["g_ptr"] = row_scale.contiguous()
    if perm is not None:
        args["perm_ptr"] = perm
    # out accumulates onto its value (the bias, other blocks' rows): the autotuner's timing runs must restore it
    _launch_grouped(kernel, "down", a, nb, m, ("FB", "M"), restore=("out_ptr",), **args)
    return out


def grouped_wgrad(l, r, tok, offsets, out, *, perm=None):
    """out[n(i, j), k] = sum_{a in block i} l[a, j] r[tok[a], k]: l [A, fb], r [T, K], out [F, K] (any strides,
    every row written: zeros for an empty block). Returns out."""
    _check("l", l, l.device, 2)
    _check("r", r, l.device, 2)
    _check("out", out, l.device, 2)
    a, fb = l.shape
    K = r.shape[1]
    d_ff = out.shape[0]
    a_, nb, tok, offsets, perm = _routing(tok, offsets, perm, d_ff, l.device)
    if a_ != a or d_ff != nb * fb or out.shape[1] != K:
        raise ValueError(f"grouped_wgrad: l {tuple(l.shape)}, r {tuple(r.shape)}, out {tuple(out.shape)} and "
                         f"{nb} blocks / {a_} assignments do not match")
    dtype = _dtype_of(l)
    if d_ff == 0 or K == 0:
        return out
    spec = GroupedGemmSpec(kind="wgrad", dtype=dtype, permuted=perm is not None)
    kernel = get_grouped_kernel(spec)
    kernel.check_device(l)
    args = dict(l_ptr=l, r_ptr=r, tok_ptr=tok, off_ptr=offsets, out_ptr=out, FB=fb, K=K,
                s_lm=l.stride(0), s_lk=l.stride(1), s_rm=r.stride(0), s_rk=r.stride(1),
                s_on=out.stride(0), s_ok=out.stride(1))
    if perm is not None:
        args["perm_ptr"] = perm
    def grid(meta):
        return (nb * _cdiv(fb, meta["BLOCK_N"]), _cdiv(K, meta["BLOCK_K"]))
    # every output row is written (no accumulation): timing runs need nothing restored
    kernel.launch_tuned(grid, _tile_configs("wgrad", kernel.interpret), key=("FB", "K"), bucket=size_bucket(a),
                        **args)
    return out


def grouped_act_backward(dy, w, tok, offsets, block_size, *, pre, pre_gate=None, perm=None, row_scale=None,
                         activation, out_dtype, want_dg=False, want_db=False, lora_z=None, dh_extra=None,
                         want_h=False, dropout=None):
    """The routed backward's v = dy . w[n] (w [F, M]: W_down's transpose, any strides) with the activation's
    backward fused in the epilogue (ACT_BWD_KERNEL); same contract as ops/routed_grouping.py
    TorchGrouped.act_backward: (g hd, hd or None, {name: g dz}, {name: dz} for the LoRA projections, dg or None,
    {name: db} or None), the fields of its ActGrads. pre / pre_gate: the forward's W x + b [A, block_size];
    lora_z: the up / gate LoRA terms s B (A x) [A, block_size]; dh_extra: the down LoRA's share of dh; dropout =
    (keep [A, block_size] bool, p): the forward's mask, applied to h and dh in the epilogue."""
    _check("dy", dy, dy.device, 2)
    _check("w", w, dy.device, 2)
    T, K = dy.shape
    d_ff = w.shape[0]
    fb = int(block_size)
    a, nb, tok, offsets, perm = _routing(tok, offsets, perm, d_ff, dy.device)
    if w.shape[1] != K or d_ff != nb * fb:
        raise ValueError(f"grouped_act_backward: w {tuple(w.shape)} does not match dy {tuple(dy.shape)}, {nb} "
                         f"blocks of {fb}")
    if want_dg and row_scale is None:
        raise ValueError("grouped_act_backward: the gate gradient (want_dg) needs row_scale")
    if want_h and dh_extra is None:  # the kernel writes hd for the down LoRA, which always brings its dh term
        raise ValueError("grouped_act_backward: want_h (hd for the down LoRA) comes with dh_extra")
    gated = pre_gate is not None
    lora_z = lora_z or {}
    operands = {"pre": pre, "pre_g": pre_gate, "lz": lora_z.get("up"), "lz_g": lora_z.get("gate"), "e": dh_extra}
    for name, t in operands.items():
        if t is not None:
            _check(name, t, dy.device, 2)
            if tuple(t.shape) != (a, fb):
                raise ValueError(f"grouped_act_backward: {name} must be [{a}, {fb}], got {tuple(t.shape)}")
    operands = {name: None if t is None else t.contiguous() for name, t in operands.items()}
    dtype = _dtype_of(dy)
    names = ("up", "gate") if gated else ("up",)

    def buffer():
        return torch.empty(a, fb, dtype=out_dtype, device=dy.device)

    ghd, hd = buffer(), buffer() if want_h else None
    gdz = {name: buffer() for name in names}
    dz = {name: buffer() for name in names if lora_z.get(name) is not None}
    dg = torch.zeros(a, dtype=torch.float32, device=dy.device) if want_dg else None
    db = {name: torch.zeros(d_ff, dtype=torch.float32, device=dy.device) for name in names} if want_db else None
    out = (ghd, hd, gdz, dz, dg, db)
    if a == 0 or fb == 0:
        return out
    spec = GroupedGemmSpec(kind="act_bwd", dtype=dtype, permuted=perm is not None, row_scale=row_scale is not None,
                           activation=activation, gated=gated, want_dg=want_dg, bias_grad=want_db,
                           lora="up" in dz, gate_lora="gate" in dz, down_lora=dh_extra is not None,
                           dropout=dropout is not None)
    kernel = get_grouped_kernel(spec)
    kernel.check_device(dy)
    args = dict(x_ptr=dy, w_ptr=w, pre_ptr=operands["pre"], ghd_ptr=ghd, gdz_ptr=gdz["up"], tok_ptr=tok,
                off_ptr=offsets, FB=fb, K=K, s_xm=dy.stride(0), s_xk=dy.stride(1), s_wn=w.stride(0),
                s_wk=w.stride(1))
    if gated:
        args.update(pre_g_ptr=operands["pre_g"], gdz_g_ptr=gdz["gate"])
    if row_scale is not None:
        args["g_ptr"] = row_scale.contiguous()
    if spec.lora:
        args.update(lz_ptr=operands["lz"], dz_ptr=dz["up"])
    if spec.gate_lora:
        args.update(lz_g_ptr=operands["lz_g"], dz_g_ptr=dz["gate"])
    if spec.down_lora:
        args.update(e_ptr=operands["e"], hd_ptr=hd)
    if want_dg:
        args["dg_ptr"] = dg
    if want_db:
        args["db_ptr"] = db["up"]
        if gated:
            args["db_g_ptr"] = db["gate"]
    if dropout is not None:
        args.update(_dropout_args(dropout, a, fb, dy.device))
    if perm is not None:
        args["perm_ptr"] = perm
    # the row and column sums accumulate from zero: the autotuner's timing runs zero them again
    sums = [name for name in ("dg_ptr", "db_ptr", "db_g_ptr") if name in args]
    _launch_grouped(kernel, "act_bwd", a, nb, fb, ("FB", "K"), reset=sums, **args)
    return out


class _TritonGrouped:
    """The grouped primitives of sparsify/ops/routed_grouping.py on these kernels (same signatures as TorchGrouped)."""

    name = "triton"
    up = staticmethod(grouped_up)
    down = staticmethod(grouped_down)
    wgrad = staticmethod(grouped_wgrad)
    act_backward = staticmethod(grouped_act_backward)


TRITON_GROUPED = _TritonGrouped()
