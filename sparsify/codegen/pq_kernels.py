"""Triton kernels for the two product-quantisation ops of SPT (papers.md section 1), generated per spec.

Public API::

    pq_encode_triton(x, codebook) -> codes int32 [B, H, L, M]
    pq_select_triton(q_codes, k_codes, keep, causal, allowed=None) -> (index int32, valid bool) [B, H, Lq, keep]
    PQEncodeSpec, PQSelectSpec, kernel_source(spec), get_pq_kernel(spec)

Both functions return exactly what the CPU references in sparsify/ops/key_select.py return (same codes, same index and
valid tensors); see that module for the semantics. Inputs may have any strides (an HF [B, L, H, D] buffer seen as
[B, H, L, D] is read in place). On CPU tensors they need TRITON_INTERPRET=1 (Triton's interpreter).

pq_select's ``allowed`` is a bool mask of exactly 4 dims broadcastable to [B, H, Lq, Lk] (each of dims 0..2 is 1
or B / H / Lq, dim 3 is Lk): an HF mask [B, 1, Lq, Lk] (sliding window, packed sequences, KV cache), a key-padding
mask [B, 1, 1, Lk], or one per head. Key j is a candidate for query i of head h iff allowed[b, h, i, j] and, when
causal, j <= i + (Lk - Lq) (bottom-right, the ops' one definition: sparsify/ops/causal.py). The kernel reads the
mask in place through its strides (0 on the broadcast dims), one [BLOCK_Q, BLOCK_K] tile per key block. Causality
and the mask are ``tl.constexpr`` switches of one source (CAUSAL, HAS_MASK); the spec holds only the tile form.
check_select_args / check_allowed are the one argument contract of the op (sparsify/ops) and the kernel.

Kernels are generated like the other sparsify.codegen kernels: spec -> string.Template source -> file in
``cache_dir()`` -> importlib, through kernel.py's one cache (``sparsify.codegen.cache_info()`` and
``clear_cache()`` cover them), keyed on the interpreter mode, built lazily on first use. Builtins only
(``tl.full``, ``tl.reduce`` / ``tl.associative_scan`` with combine functions defined in the generated module):
see sparsify/codegen/templates.py and spt_templates.py for why.

pq_encode kernel
----------------
One program per (block of BLOCK_L rows, b * H + h). For each subspace m it accumulates the L1 distance of the
BLOCK_L sub-vectors to all E codewords as a [BLOCK_L, BLOCK_E] tile, one sub-vector dimension at a time (a
sequential sum over d, in fp32, or fp64 for fp64 inputs: the reference's accumulation dtype), then takes the
argmin over e with ties to the lowest e (min distance, then the smallest e whose distance equals it). A NaN
distance counts as the minimum, like torch.argmin. Nothing but the codes is written.

Exactness: the reference sums |x - c| in torch.cdist's order. Both sums are exactly rounded per term but may
round differently in the last bit when a sub-vector is almost equidistant to two codewords (|d1 - d2| within an
ulp); only then can the codes differ. Inputs whose partial sums are exact (e.g. on a dyadic grid) give identical
codes including every exact tie (tested).

pq_select kernel (exact top-`keep` without an [Lq, Lk] buffer)
-------------------------------------------------------------
score(i, j) = #{m : qc[i, m] == kc[j, m]} is an integer in 0..M, so a row's top-`keep` is fixed by a threshold
level. One program per (block of BLOCK_Q query rows, b * H + h), GQA kv head h // (H // Hkv):

  pass 1 (histogram): stream over the key blocks [k0, k0 + BLOCK_K) (causal: only up to the block's last row),
      compute the [BLOCK_Q, BLOCK_K] score tile in registers, set disallowed pairs (out of range, causal j > i,
      allowed False) to -1, and add the per-level counts to a per-row histogram hist[BLOCK_Q, LEVELS]
      (LEVELS = next power of two >= M + 1), kept in registers.
  threshold: at_least[t] = count(score >= t) is a suffix sum of the histogram (n_allowed - prefix sum + hist);
      T = the highest level with at_least[T] >= keep, above = count(score > T) (< keep by the choice of T), and
      take = min(keep - above, hist[T]) keys of level T are needed. A row with fewer than `keep` allowed keys
      has no such level: then T = 0, take = hist[0], i.e. every allowed key is emitted, and the row gets
      total = above + take = #allowed < keep valid slots (in general total = min(keep, #allowed)).
  slot padding: slots [total, keep) get valid = False, index 0; slots [0, total) valid = True.
  pass 2 (emit): stream over the key blocks again in ascending order, recompute the score tile and emit key j
      iff score > T, or score == T and j is among the first `take` level-T keys of the row (the rank among the
      level-T keys is a running count over earlier blocks plus an exclusive prefix sum, tl.associative_scan,
      inside the block). The emitted key's slot is the running number of emitted keys plus the exclusive prefix
      sum of the emit flags in the block: scattered stores of the key index.

This is exactly the reference's ranking (higher score first, lower index on ties): every key above T beats every
key at T, and among the level-T keys the lower indices win. Emitting in ascending key order gives the required
ELL layout (slots sorted by key index, invalid slots last) without a sort. Memory: only the outputs are written;
the score tile, the histogram and a few per-row counters live in registers (O(BLOCK_Q * (BLOCK_K + LEVELS))),
nothing of size Lq x Lk exists anywhere. Work: 2 passes of M compares per (query, key) pair, plus M + 1 level
compares per pair in pass 1 (the histogram); causal skips the key blocks past each query block.

Two tile forms of the same algorithm (PQSelectSpec.vector): loops over the subspaces / levels on 2-D tiles (GPU:
few registers per program), or 3-D tiles reduced in one operation (interpreter: numpy per operation, so few large
operations are much faster). The tests run both under the interpreter and compare them with the reference.
"""

from __future__ import annotations

import dataclasses
from string import Template
from typing import Optional

import torch

from .kernel import GeneratedKernel, KernelSpec, interpret_mode, load_kernel, templates_digest

__all__ = [
    "PQEncodeSpec",
    "PQSelectSpec",
    "kernel_source",
    "kernel_key",
    "get_pq_kernel",
    "pq_encode_triton",
    "pq_select_triton",
]

# --- templates ---------------------------------------------------------------------------

# Combine functions for tl.reduce / tl.associative_scan, decorated in the generated module (so in the mode the
# kernels are built in). Under the interpreter, Triton's own functions replace them: the interpreter recognises
# those by identity and runs numpy (np.sum / np.max / np.min / np.cumsum) instead of element-wise Python.
PQ_REDUCTIONS = '''\
@triton.jit
def _sum_combine(a, b):
    return a + b


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)


if not isinstance(_sum_combine, triton.runtime.jit.JITFunction):  # TRITON_INTERPRET=1
    _sum_combine = tl.standard._sum_combine
    _max_combine = tl.standard._elementwise_max
    _min_combine = tl.standard._elementwise_min
'''

PQ_ENCODE = Template('''\
# Generated by sparsify.codegen.pq_kernels -- do not edit (regenerated from the spec below).
# spec: $spec
# key:  $key
import triton
import triton.language as tl


${reductions}

@triton.jit
def ${name}(
    x_ptr, cb_ptr, out_ptr,
    H, L, M, E,
    s_xb, s_xh, s_xl, s_xd,
    s_cm, s_ce, s_cd,
    s_ob, s_oh, s_ol, s_om,
    DC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    l_ok = offs_l < L
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    x_rows = x_ptr + b * s_xb + h * s_xh + offs_l.to(tl.int64) * s_xl
    o_rows = out_ptr + b * s_ob + h * s_oh + offs_l.to(tl.int64) * s_ol
    for m in range(0, M):
        # L1 distances of the BLOCK_L sub-vectors to the E codewords, summed over d in order
        dist = tl.full((BLOCK_L, BLOCK_E), 0.0, ${acc})
        for d in range(0, DC):
            xv = tl.load(x_rows + (m * DC + d) * s_xd, mask=l_ok, other=0.0).to(${acc})
            cv = tl.load(cb_ptr + m * s_cm + offs_e * s_ce + d * s_cd, mask=e_ok, other=0.0).to(${acc})
            dist += tl.abs(xv[:, None] - cv[None, :])
        # NaN ranks first (as in torch.argmin); padded codewords last
        dist = tl.where(dist != dist, -1.0, dist)
        dist = tl.where(e_ok[None, :], dist, float("inf"))
        dmin = tl.reduce(dist, 1, _min_combine)
        code = tl.where(dist == dmin[:, None], offs_e[None, :], BLOCK_E)
        code = tl.reduce(code, 1, _min_combine)  # lowest e among the minima
        tl.store(o_rows + m * s_om, code.to(tl.int32), mask=l_ok)
''')

# The [BLOCK_Q, BLOCK_K] score tile of key block k0, -1 where the pair is not allowed (both passes).
# "loop" form (GPU): M compare-and-add steps on 2-D tiles, the code columns re-read from L1.
PQ_SCORE_LOOP = '''\
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < Lk
        k_rows = k_base + offs_k.to(tl.int64) * s_kl
        score = tl.full((BLOCK_Q, BLOCK_K), 0, tl.int32)
        for m in range(0, M):
            qm = tl.load(q_rows + m * s_qm, mask=q_ok, other=-1).to(tl.int32)
            km = tl.load(k_rows + m * s_km, mask=k_ok, other=-2).to(tl.int32)
            score += (qm[:, None] == km[None, :]).to(tl.int32)
        allowed = q_ok[:, None] & k_ok[None, :]
        if CAUSAL:
            allowed = allowed & (offs_k[None, :] <= offs_q[:, None] + (Lk - Lq))  # bottom-right: j <= i + Lk - Lq
        if HAS_MASK:  # the mask tile, read only where the pair is still allowed (in range, causal)
            mv = tl.load(mask_rows[:, None] + offs_k.to(tl.int64)[None, :] * s_mk, mask=allowed, other=0)
            allowed = allowed & (mv != 0)
        score = tl.where(allowed, score, -1)
'''

# "vector" form (interpreter): one [BLOCK_Q, BLOCK_K, BLOCK_M] compare and a reduction over the subspaces, so
# that the interpreter runs a handful of large numpy operations per key block instead of ~10 * M small ones.
# Padded subspaces read -1 (queries) and -2 (keys): they never match.
PQ_SCORE_VECTOR = '''\
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < Lk
        kt = tl.load(k_base + offs_k.to(tl.int64)[:, None] * s_kl + offs_m[None, :] * s_km,
                     mask=k_ok[:, None] & m_ok[None, :], other=-2).to(tl.int32)
        score = tl.reduce((qt[:, None, :] == kt[None, :, :]).to(tl.int32), 2, _sum_combine)
        allowed = q_ok[:, None] & k_ok[None, :]
        if CAUSAL:
            allowed = allowed & (offs_k[None, :] <= offs_q[:, None] + (Lk - Lq))  # bottom-right: j <= i + Lk - Lq
        if HAS_MASK:  # the mask tile, read only where the pair is still allowed (in range, causal)
            mv = tl.load(mask_rows[:, None] + offs_k.to(tl.int64)[None, :] * s_mk, mask=allowed, other=0)
            allowed = allowed & (mv != 0)
        score = tl.where(allowed, score, -1)
'''

PQ_QTILE_VECTOR = '''\
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    qt = tl.load(q_rows[:, None] + offs_m[None, :] * s_qm, mask=q_ok[:, None] & m_ok[None, :],
                 other=-1).to(tl.int32)
'''

PQ_HIST_LOOP = '''\
        for lvl in range(0, M + 1):
            cnt = tl.reduce((score == lvl).to(tl.int32), 1, _sum_combine)
            hist = tl.where(offs_lv[None, :] == lvl, hist + cnt[:, None], hist)
'''

# score -1 (not allowed) matches no level
PQ_HIST_VECTOR = '''\
        hist += tl.reduce((score[:, :, None] == offs_lv[None, None, :]).to(tl.int32), 1, _sum_combine)
'''

PQ_SELECT = Template('''\
# Generated by sparsify.codegen.pq_kernels -- do not edit (regenerated from the spec below).
# spec: $spec
# key:  $key
import triton
import triton.language as tl


${reductions}

@triton.jit
def ${name}(
    qc_ptr, kc_ptr, mask_ptr, idx_ptr, val_ptr,
    H, GROUP, Lq, Lk, M, KEEP,
    s_qb, s_qh, s_ql, s_qm,
    s_kb, s_kh, s_kl, s_km,
    s_mb, s_mh, s_mq, s_mk,
    s_ib, s_ih, s_il, s_is,
    s_ab, s_ah, s_al, s_as,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, LEVELS: tl.constexpr,
    BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP  # GQA: query head h reads kv head h // (H // Hkv)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < Lq
    q_rows = qc_ptr + b * s_qb + h * s_qh + offs_q.to(tl.int64) * s_ql
    k_base = kc_ptr + b * s_kb + hk * s_kh
    offs_lv = tl.arange(0, LEVELS)
    if HAS_MASK:  # row pointers of the allowed mask (strides 0 on its broadcast dims)
        mask_rows = mask_ptr + b * s_mb + h * s_mh + offs_q.to(tl.int64) * s_mq
    if CAUSAL:  # key blocks past the last query row of this block hold no allowed key
        k_end = tl.maximum(tl.minimum(Lk, (pid_q + 1) * BLOCK_Q + (Lk - Lq)), 0)
    else:
        k_end = Lk
${qtile}
    # pass 1: per-row histogram of the scores of the allowed keys over the levels 0..M
    hist = tl.full((BLOCK_Q, LEVELS), 0, tl.int32)
    for k0 in range(0, k_end, BLOCK_K):
${score}
${hist}
    # threshold level T: the highest level with count(score >= T) >= KEEP (suffix sums of the histogram)
    cum = tl.associative_scan(hist, 1, _sum_combine)           # count(score <= t)
    n_allowed = tl.reduce(hist, 1, _sum_combine)
    at_least = n_allowed[:, None] - cum + hist                 # count(score >= t)
    thr = tl.reduce(tl.where(at_least >= KEEP, offs_lv[None, :], 0), 1, _max_combine)
    # rows with fewer than KEEP allowed keys have no such level: T = 0, and every allowed key is emitted
    above = tl.reduce(tl.where(offs_lv[None, :] > thr[:, None], hist, 0), 1, _sum_combine)
    h_thr = tl.reduce(tl.where(offs_lv[None, :] == thr[:, None], hist, 0), 1, _sum_combine)
    take = tl.minimum(KEEP - above, h_thr)
    total = above + take  # = min(KEEP, allowed keys)

    # slots [total, KEEP): valid False, index 0; slots [0, total): valid True (indices from pass 2)
    idx_rows = idx_ptr + b * s_ib + h * s_ih + offs_q.to(tl.int64) * s_il
    val_rows = val_ptr + b * s_ab + h * s_ah + offs_q.to(tl.int64) * s_al
    for s0 in range(0, KEEP, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        in_row = q_ok[:, None] & (offs_s < KEEP)[None, :]
        ok = offs_s[None, :] < total[:, None]
        tl.store(val_rows[:, None] + offs_s[None, :] * s_as, ok.to(tl.uint8), mask=in_row)
        tl.store(idx_rows[:, None] + offs_s[None, :] * s_is, tl.full((BLOCK_Q, BLOCK_S), 0, tl.int32),
                 mask=in_row & (ok == 0))

    # pass 2: emit the keys above T and the first `take` keys at T, in ascending key order
    seen = tl.full((BLOCK_Q,), 0, tl.int32)     # level-T keys met so far
    emitted = tl.full((BLOCK_Q,), 0, tl.int32)  # keys emitted so far = next free slot
    for k0 in range(0, k_end, BLOCK_K):
${score}
        at_thr = (score == thr[:, None]).to(tl.int32)
        rank = seen[:, None] + tl.associative_scan(at_thr, 1, _sum_combine) - at_thr
        emit = (score > thr[:, None]) | ((at_thr != 0) & (rank < take[:, None]))
        e32 = emit.to(tl.int32)
        pos = emitted[:, None] + tl.associative_scan(e32, 1, _sum_combine) - e32
        tl.store(idx_rows[:, None] + pos.to(tl.int64) * s_is, tl.full((BLOCK_Q, BLOCK_K), 0, tl.int32)
                 + offs_k[None, :], mask=emit)
        seen += tl.reduce(at_thr, 1, _sum_combine)
        emitted += tl.reduce(e32, 1, _sum_combine)
''')


# --- specs -------------------------------------------------------------------------------

_ACC_NAMES = {torch.float32: "fp32", torch.float64: "fp64"}
_ACC_TL = {"fp32": "tl.float32", "fp64": "tl.float64"}
ENCODE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class PQEncodeSpec(KernelSpec):
    """pq_encode kernel: ``acc`` is the distance accumulation dtype ("fp32", or "fp64" for fp64 inputs)."""

    family = "pq"
    acc: str = "fp32"

    def __post_init__(self):
        if self.acc not in _ACC_TL:
            raise ValueError(f"PQEncodeSpec.acc must be one of {tuple(_ACC_TL)}, got {self.acc!r}")
        super().__post_init__()

    @property
    def kernel_name(self) -> str:
        return f"pq_encode_{self.acc}_kernel"


@dataclasses.dataclass(frozen=True)
class PQSelectSpec(KernelSpec):
    """pq_select kernel's tile form: ``vector=False`` ("loop", the GPU default) computes scores and histogram with
    loops over the M subspaces / M + 1 levels on 2-D register tiles; ``vector=True`` (the interpreter default) uses
    3-D tiles [BLOCK_Q, BLOCK_K, BLOCK_M] and [BLOCK_Q, BLOCK_K, LEVELS] instead (few large numpy operations). Both
    give identical results; the tests run both under the interpreter. Causality (bottom-right, j <= i + Lk - Lq)
    and the allowed mask are ``tl.constexpr`` arguments (CAUSAL, HAS_MASK) of the one source: Triton compiles a
    specialisation per value."""

    family = "pq"
    vector: bool = False

    @property
    def kernel_name(self) -> str:
        return "pq_select_vector_kernel" if self.vector else "pq_select_kernel"


_TEMPLATE_DIGEST = templates_digest({k: v for k, v in globals().items() if k.startswith("PQ_")})


def _check_spec(spec):
    if not isinstance(spec, (PQEncodeSpec, PQSelectSpec)):
        raise ValueError(f"expected a PQEncodeSpec or PQSelectSpec, got {type(spec).__name__}")


def kernel_key(spec) -> str:
    """Cache key (sha256 hex) of a spec's kernel."""
    _check_spec(spec)
    return spec.key(_TEMPLATE_DIGEST)


def kernel_source(spec) -> str:
    """The Triton source generated for ``spec`` (pure: no file, no triton import)."""
    _check_spec(spec)
    if isinstance(spec, PQEncodeSpec):
        return PQ_ENCODE.substitute(reductions=PQ_REDUCTIONS, spec=spec.canonical(), key=kernel_key(spec),
                                    name=spec.kernel_name, acc=_ACC_TL[spec.acc])
    return PQ_SELECT.substitute(reductions=PQ_REDUCTIONS, spec=spec.canonical(), key=kernel_key(spec),
                                name=spec.kernel_name, score=PQ_SCORE_VECTOR if spec.vector else PQ_SCORE_LOOP,
                                qtile=PQ_QTILE_VECTOR if spec.vector else "",
                                hist=PQ_HIST_VECTOR if spec.vector else PQ_HIST_LOOP)


def get_pq_kernel(spec) -> GeneratedKernel:
    """The kernel for ``spec``: generated, written and imported on first use, then served from the one kernel
    cache (kernel.py), keyed on (key, interpreter mode)."""
    _check_spec(spec)
    return load_kernel(spec, lambda: kernel_source(spec), _TEMPLATE_DIGEST)


# --- launchers -----------------------------------------------------------------------------

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _check_grid(bh: int):
    if bh > 65535:
        raise ValueError(f"B * H = {bh} exceeds the grid limit 65535")


def pq_encode_triton(x: torch.Tensor, codebook: torch.Tensor, *, block_l: Optional[int] = None) -> torch.Tensor:
    """PQ codes of x [B, H, L, D] under codebook [M, E, dc]: int32 [B, H, L, M] (L1 nearest, lowest e on ties).
    Same result as sparsify::pq_encode's reference (module docstring: exactness)."""
    if x.dim() != 4 or codebook.dim() != 3:
        raise ValueError(f"pq_encode_triton expects x [B,H,L,D] and codebook [M,E,dc]; got {tuple(x.shape)}, "
                         f"{tuple(codebook.shape)}")
    m, e, dc = codebook.shape
    if x.shape[-1] != m * dc:
        raise ValueError(f"pq_encode_triton: head dim {x.shape[-1]} != M * dc = {m} * {dc}")
    for name, t in (("x", x), ("codebook", codebook)):
        if t.dtype not in ENCODE_DTYPES:
            raise ValueError(f"pq_encode_triton: unsupported {name} dtype {t.dtype}")
    if codebook.device != x.device:
        raise ValueError(f"codebook is on {codebook.device}, x on {x.device}")
    b, h, l, _ = x.shape
    out = torch.empty((b, h, l, m), dtype=torch.int32, device=x.device)
    if out.numel() == 0:
        return out
    if e == 0:
        raise ValueError("pq_encode_triton: empty codebook")
    _check_grid(b * h)
    acc = torch.promote_types(torch.promote_types(x.dtype, codebook.dtype), torch.float32)
    kernel = get_pq_kernel(PQEncodeSpec(acc=_ACC_NAMES[acc]))
    kernel.check_device(x)
    block_e = max(2, _next_pow2(e))
    if block_l is None:
        block_l = 128 if kernel.interpret else max(16, min(128, 4096 // block_e))
    kernel.launch(
        (_cdiv(l, block_l), b * h),
        x_ptr=x, cb_ptr=codebook, out_ptr=out, H=h, L=l, M=m, E=e,
        s_xb=x.stride(0), s_xh=x.stride(1), s_xl=x.stride(2), s_xd=x.stride(3),
        s_cm=codebook.stride(0), s_ce=codebook.stride(1), s_cd=codebook.stride(2),
        s_ob=out.stride(0), s_oh=out.stride(1), s_ol=out.stride(2), s_om=out.stride(3),
        DC=dc, BLOCK_L=block_l, BLOCK_E=block_e,
    )
    return out


# GPU launch defaults of the select kernel (loop form). With 4 warps the [64, 64] tiles need 255 registers and
# spill (ptxas for sm_90: ~640 bytes of spill stores with a mask, ~550 without); with 8 warps they fit (255 / 247
# registers, no spills) at the same number of resident warps per SM. From ptxas reports, not yet timed.
SELECT_GPU_DEFAULTS = dict(block_q=64, block_k=64, num_warps=8)


def check_allowed(op: str, allowed, b: int, h: int, lq: int, lk: int, device=None) -> None:
    """The selection ops' ``allowed`` mask (None, or bool with 4 dims broadcastable to [B, H, Lq, Lk]: each of dims
    0..2 is 1 or B / H / Lq, dim 3 is Lk). One definition for the ops (sparsify/ops) and these kernels."""
    if allowed is None:
        return
    full = (b, h, lq, lk)
    if not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool or allowed.dim() != 4 \
            or allowed.shape[3] != lk or any(n not in (1, f) for n, f in zip(allowed.shape[:3], full[:3])):
        got = (f"{allowed.dtype} {tuple(allowed.shape)}" if isinstance(allowed, torch.Tensor)
               else type(allowed).__name__)
        raise ValueError(f"{op}: allowed must be a bool mask broadcastable to [B, H, Lq, Lk] = {full} with 4 dims "
                         f"(dims 0..2 each 1 or B / H / Lq, dim 3 = Lk; e.g. [B, 1, Lq, Lk] or [B, 1, 1, Lk]), "
                         f"got {got}")
    if device is not None and allowed.device != device:
        raise ValueError(f"{op}: allowed is on {allowed.device}, the codes on {device}")


def check_select_args(op: str, q_codes, k_codes, keep, allowed) -> None:
    """The arguments of pq_select (the op and this kernel): codes [B, H, Lq, M] / [B, Hkv, Lk, M] integer, GQA
    H % Hkv == 0, 1 <= keep <= Lk, and the allowed mask; each message names the argument and what is valid."""
    if q_codes.dim() != 4 or k_codes.dim() != 4:
        raise ValueError(f"{op} expects codes [B,H,L,M]; got {tuple(q_codes.shape)}, {tuple(k_codes.shape)}")
    b, h, lq, m = q_codes.shape
    if k_codes.shape[0] != b or k_codes.shape[-1] != m or h % k_codes.shape[1] != 0:
        raise ValueError(f"{op}: incompatible code shapes {tuple(q_codes.shape)} and {tuple(k_codes.shape)} "
                         f"(need equal B and M, H % Hkv == 0)")
    if q_codes.is_floating_point() or k_codes.is_floating_point():
        raise ValueError(f"{op}: codes must be integer tensors, got {q_codes.dtype}, {k_codes.dtype}")
    if m >= 2**15:
        raise ValueError(f"{op}: M={m} overflows the int16 score of the reference")
    lk = k_codes.shape[2]
    if not 1 <= keep <= lk:
        raise ValueError(f"{op}: keep must be in [1, Lk={lk}], got {keep}")
    if k_codes.device != q_codes.device:
        raise ValueError(f"{op}: k_codes is on {k_codes.device}, q_codes on {q_codes.device}")
    check_allowed(op, allowed, b, h, lq, lk, q_codes.device)


def pq_select_triton(
    q_codes: torch.Tensor, k_codes: torch.Tensor, keep: int, causal: bool,
    allowed: Optional[torch.Tensor] = None, *, block_q: Optional[int] = None, block_k: Optional[int] = None,
    vector: Optional[bool] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`keep` keys per query row by code matches, exactly as sparsify::pq_select's reference:
    (index int32, valid bool), both [B, H, Lq, keep] (algorithm: module docstring). ``allowed`` (bool, 4 dims
    broadcastable to [B, H, Lq, Lk]) limits each query's candidates, on top of causal (bottom-right: j <= i + Lk - Lq).

    block_q / block_k (powers of two) and vector (tile form, see PQSelectSpec) default per mode: 64 / 64 / loop
    on a GPU (8 warps: SELECT_GPU_DEFAULTS), 64 / 256 / vector under the interpreter."""
    check_select_args("pq_select_triton", q_codes, k_codes, keep, allowed)
    b, h, lq, m = q_codes.shape
    hkv, lk = k_codes.shape[1], k_codes.shape[2]
    index = torch.empty((b, h, lq, keep), dtype=torch.int32, device=q_codes.device)
    valid = torch.empty((b, h, lq, keep), dtype=torch.bool, device=q_codes.device)
    if index.numel() == 0:
        return index, valid
    _check_grid(b * h)
    if vector is None:
        vector = interpret_mode()
    kernel = get_pq_kernel(PQSelectSpec(vector=bool(vector)))
    kernel.check_device(q_codes)
    if block_q is None:
        block_q = SELECT_GPU_DEFAULTS["block_q"]
    if block_k is None:
        block_k = 256 if kernel.interpret else SELECT_GPU_DEFAULTS["block_k"]
    if allowed is not None:
        # a view, no copy: the broadcast dims get stride 0, so the kernel indexes the mask as [B, H, Lq, Lk]
        mask = allowed.expand(b, h, lq, lk).view(torch.uint8)
        mask_strides = mask.stride()
    else:
        mask, mask_strides = index, (0, 0, 0, 0)  # a dummy pointer, never read
    val8 = valid.view(torch.uint8)
    kernel.launch(
        (_cdiv(lq, block_q), b * h), num_warps=SELECT_GPU_DEFAULTS["num_warps"],
        qc_ptr=q_codes, kc_ptr=k_codes, mask_ptr=mask, idx_ptr=index, val_ptr=val8,
        H=h, GROUP=h // hkv, Lq=lq, Lk=lk, M=m, KEEP=keep,
        s_qb=q_codes.stride(0), s_qh=q_codes.stride(1), s_ql=q_codes.stride(2), s_qm=q_codes.stride(3),
        s_kb=k_codes.stride(0), s_kh=k_codes.stride(1), s_kl=k_codes.stride(2), s_km=k_codes.stride(3),
        s_mb=mask_strides[0], s_mh=mask_strides[1], s_mq=mask_strides[2], s_mk=mask_strides[3],
        s_ib=index.stride(0), s_ih=index.stride(1), s_il=index.stride(2), s_is=index.stride(3),
        s_ab=val8.stride(0), s_ah=val8.stride(1), s_al=val8.stride(2), s_as=val8.stride(3),
        BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_S=min(64, max(2, _next_pow2(keep))),
        LEVELS=max(2, _next_pow2(m + 1)), BLOCK_M=max(2, _next_pow2(m)),
        CAUSAL=bool(causal), HAS_MASK=allowed is not None,
    )
    return index, valid
