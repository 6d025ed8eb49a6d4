"""Tests for sparsify.codegen.pq_kernels: Triton kernels of sparsify::pq_encode and sparsify::pq_select.

On CPU the kernels run in Triton's interpreter (set up as in tests/kernels/test_codegen.py: kernels are generated lazily
and keyed on the mode, so setting TRITON_INTERPRET here is enough even if triton was imported earlier). The
reference of pq_encode is the CPU op of sparsify/ops/key_select.py; the reference of pq_select is select_brute_force
below, the op's contract written out directly. Equality is exact (codes, index, valid), on random inputs with
many ties (few codewords), GQA, causal, 4-d allowed masks (sliding window, packed sequences, KV cache, key
padding, per head, broadcast and strided), fully masked rows, odd sizes, strided and int64 inputs, and both tile
forms of the select kernel. The selection kernel's memory does not grow with Lk (no [Lq, Lk] buffer): checked with
tracemalloc (the interpreter's tiles are numpy arrays) and on the generated source. The `gpu` class repeats the
checks on CUDA (fp32 / fp16 / bf16) at realistic sizes, through the registered CUDA kernels too.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tracemalloc  # noqa: E402

import pytest  # noqa: E402
from paths import REPO  # noqa: E402

import sparsify.ops.key_select  # noqa: E402,F401  (registers sparsify::pq_encode / pq_select)
from sparsify.codegen import cache_dir, cache_info  # noqa: E402
from sparsify.codegen.pq_kernels import (  # noqa: E402
    PQEncodeSpec,
    PQSelectSpec,
    get_pq_kernel,
    kernel_key,
    kernel_source,
    pq_encode_triton,
    pq_select_triton,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
# generated kernels go to a temporary cache directory (tests/conftest.py)
pytestmark = [pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"),
              pytest.mark.usefixtures("kernel_cache_dir")]

pq_encode_ref = torch.ops.sparsify.pq_encode


def select_brute_force(q_codes, k_codes, keep, causal, allowed=None):
    """sparsify::pq_select's contract, computed over the whole [B, H, Lq, Lk] score: score = number of matching
    codes; key j is a candidate for query i of head h iff allowed[b, h, i, j] (broadcast) and, when causal,
    j <= i + Lk - Lq; the top `keep` candidates by (score desc, j asc), sorted by ascending j; rows with fewer candidates
    padded with valid False / index 0."""
    b, h, lq, _ = q_codes.shape
    hkv, lk = k_codes.shape[1], k_codes.shape[2]
    qc = q_codes.cpu().long()
    kc = k_codes.cpu().long().repeat_interleave(h // hkv, dim=1)  # query head h reads kv head h // (H // Hkv)
    score = torch.zeros(b, h, lq, lk, dtype=torch.long)
    for sub in range(qc.shape[-1]):
        score += qc[:, :, :, None, sub] == kc[:, :, None, :, sub]
    candidate = torch.ones(b, h, lq, lk, dtype=torch.bool)
    if allowed is not None:
        candidate &= allowed.cpu().expand(b, h, lq, lk)
    if causal:
        candidate &= torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)  # bottom-right (sparsify/ops/causal.py)
    j = torch.arange(lk)
    # one rank value per candidate, unique: higher score first, then lower j; non-candidates below all
    rank = torch.where(candidate, score * lk + (lk - 1 - j), -1)
    top_rank, top_j = rank.topk(keep, dim=-1)
    top_j = torch.where(top_rank >= 0, top_j, lk).sort(dim=-1).values  # padding (lk) sorts last
    valid = top_j < lk
    return torch.where(valid, top_j, 0).to(torch.int32), valid


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _codes(g, b, h, l, m, e, dtype=torch.int32):
    return torch.randint(0, e, (b, h, l, m), generator=g).to(dtype)


def _assert_select_equal(got, want):
    gi, gv = got
    wi, wv = want
    assert gi.dtype == torch.int32 and gv.dtype == torch.bool
    assert gi.shape == wi.shape and gv.shape == wv.shape
    assert torch.equal(gv.cpu(), wv.cpu()), "valid differs"
    assert torch.equal(gi.cpu(), wi.cpu()), "index differs"


# ---------------------------------------------------------------------------------------------
# pq_encode
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m,e,dc,dtype", [
    (4, 16, 8, torch.float32),
    (4, 16, 8, torch.float16),
    (2, 12, 4, torch.float32),    # E not a power of two: padded codewords never win
    (3, 5, 8, torch.float64),     # fp64 accumulation
])
def test_encode_matches_reference(interpreter, m, e, dc, dtype):
    g = _gen(0)
    x = torch.randn(2, 3, 37, m * dc, generator=g).to(dtype)
    cb = torch.randn(m, e, dc, generator=g).to(dtype)
    got = pq_encode_triton(x, cb)
    assert got.dtype == torch.int32 and got.shape == (2, 3, 37, m)
    assert torch.equal(got, pq_encode_ref(x, cb))


def test_encode_strided_input_and_mixed_dtypes(interpreter):
    """An HF [B, L, H, D] buffer seen as [B, H, L, D], a non-contiguous codebook, fp16 x with an fp32 codebook."""
    g = _gen(1)
    x = torch.randn(2, 29, 3, 16, generator=g).transpose(1, 2)
    cb = torch.randn(8, 2, 16, generator=g).permute(1, 2, 0)  # [2, 16, 8], strided
    assert torch.equal(pq_encode_triton(x, cb), pq_encode_ref(x, cb))
    xh = x.half()
    assert torch.equal(pq_encode_triton(xh, cb), pq_encode_ref(xh, cb))


def test_encode_exact_ties_pick_lowest_codeword(interpreter):
    """Values on a dyadic grid make every partial sum exact, so ties are exact in both implementations; with
    duplicated codewords and a tiny grid almost every sub-vector has tied nearest codewords."""
    g = _gen(2)
    x = torch.randint(-4, 5, (1, 2, 50, 8), generator=g).float() / 4
    base = torch.randint(-2, 3, (2, 3, 4), generator=g).float() / 2
    cb = torch.cat([base, base, base.flip(1)], dim=1)  # [2, 9, 4]: every codeword at least twice
    got = pq_encode_triton(x, cb)
    assert torch.equal(got, pq_encode_ref(x, cb))
    # the explicit rule: first minimum of the exact distances
    dist = (x.reshape(1, 2, 50, 2, 1, 4) - cb[None, None, None]).abs().sum(-1)
    assert torch.equal(got.long(), dist.argmin(-1))
    assert got.max() < 3  # ties went to the first copy
    # NaN sub-vectors: torch.argmin ranks NaN first, so all-NaN distances give code 0
    xn = x.clone()
    xn[0, 0, 0, :4] = float("nan")
    assert torch.equal(pq_encode_triton(xn, cb), pq_encode_ref(xn, cb))


def test_encode_empty_and_bad_inputs(interpreter):
    cb = torch.randn(2, 4, 4)
    assert pq_encode_triton(torch.randn(1, 2, 0, 8), cb).shape == (1, 2, 0, 2)
    with pytest.raises(ValueError, match="head dim"):
        pq_encode_triton(torch.randn(1, 1, 3, 7), cb)
    with pytest.raises(ValueError, match="dtype"):
        pq_encode_triton(torch.randn(1, 1, 3, 8).to(torch.int32), cb)


# ---------------------------------------------------------------------------------------------
# pq_select
# ---------------------------------------------------------------------------------------------

SELECT_CASES = [
    # b, h, hkv, lq, lk, m, e, keep, causal, padded
    (2, 2, 2, 70, 83, 3, 3, 5, False, False),
    (2, 4, 2, 70, 83, 3, 3, 17, True, False),   # GQA, causal: early rows have < keep allowed keys
    (2, 4, 1, 45, 50, 2, 2, 9, False, True),    # heavy ties (E = 2), key padding
    (1, 2, 2, 66, 66, 4, 4, 66, True, True),    # keep == Lk: every allowed key, short rows invalid
    (1, 2, 1, 40, 300, 4, 16, 1, False, False),  # keep = 1, several key blocks
    (1, 3, 3, 90, 30, 3, 4, 12, True, True),     # Lq > Lk (bottom-right causal: the first Lq - Lk rows see no key)
]


def _key_padding(g, b, lk):
    """A key-padding mask [B, 1, 1, Lk], batch 0 with a padded prefix (left padding)."""
    keys = torch.rand(b, lk, generator=g) < 0.6
    keys[0, : lk // 3] = False
    return keys[:, None, None, :]


@pytest.mark.parametrize("vector", [True, False], ids=["vector", "loop"])
@pytest.mark.parametrize("case", SELECT_CASES)
def test_select_matches_reference(interpreter, case, vector):
    b, h, hkv, lq, lk, m, e, keep, causal, padded = case
    g = _gen(hash(case) % 1000)
    qc = _codes(g, b, h, lq, m, e)
    kc = _codes(g, b, hkv, lk, m, e)
    allowed = _key_padding(g, b, lk) if padded else None
    # the loop form uses small blocks, so it streams several key blocks and several query blocks
    blocks = {} if vector else dict(block_q=32, block_k=32)
    got = pq_select_triton(qc, kc, keep, causal, allowed, vector=vector, **blocks)
    _assert_select_equal(got, select_brute_force(qc, kc, keep, causal, allowed))


# --- 4-d allowed masks: each builder gives (allowed, Lq) for B = 2, H = 4, Lk = 48 -------------------------------

def _sliding_window(g, b, h, lk):
    """Mistral-style local attention [B, 1, Lq, Lk]: causal and at most 5 keys back, with key padding."""
    i, j = torch.arange(lk)[:, None], torch.arange(lk)[None, :]
    window = (j <= i) & (i - j < 5)
    return window[None, None] & _key_padding(g, b, lk), lk


def _packed_documents(g, b, h, lk):
    """Packed sequences [B, 1, Lq, Lk]: causal within each document (block-diagonal), documents of odd lengths."""
    doc = torch.stack([torch.arange(lk) // 13, torch.bucketize(torch.arange(lk), torch.tensor([3, 4, 30]), right=True)])
    i, j = torch.arange(lk)[:, None], torch.arange(lk)[None, :]
    return ((doc[:, :, None] == doc[:, None, :]) & (j <= i))[:, None], lk


def _kv_cache(g, b, h, lk):
    """A decode / prefill-with-cache step [B, 1, Lq, Lk], Lq = 6 < Lk: query i sits at position Lk - Lq + i
    (bottom-right causal), batch 1 left-padded by 10 keys."""
    lq = 6
    i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    allowed = (j <= i + (lk - lq)).expand(b, 1, lq, lk).clone()
    allowed[1, :, :, :10] = False
    return allowed, lq


def _per_head(g, b, h, lk):
    """A different random mask per (batch, head, query) [B, H, Lq, Lk]."""
    return torch.rand(b, h, lk, lk, generator=g) < 0.4, lk


def _fully_masked_rows(g, b, h, lk):
    """Left padding seen from the queries [B, 1, Lq, Lk]: batch 0's first 7 query rows allow no key at all, batch
    1's row 20 neither."""
    allowed = torch.rand(b, 1, lk, lk, generator=g) < 0.7
    allowed[0, :, :7] = False
    allowed[1, :, 20] = False
    return allowed, lk


def _broadcast_batch_strided(g, b, h, lk):
    """One mask [1, 1, Lq, Lk] for every batch, stored transposed (strides (.., 1, Lq)): read through strides."""
    return (torch.rand(lk, lk, generator=g) < 0.5).t()[None, None], lk


def _no_mask(g, b, h, lk):
    return None, 17


MASKS = [_sliding_window, _packed_documents, _kv_cache, _per_head, _fully_masked_rows, _broadcast_batch_strided,
         _no_mask]


@pytest.mark.parametrize("vector", [True, False], ids=["vector", "loop"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("make_mask", MASKS, ids=lambda f: f.__name__.lstrip("_"))
def test_select_with_allowed_mask(interpreter, make_mask, causal, vector):
    """Each query row gets its own candidates from a 4-d mask (GQA H = 4, Hkv = 2), on top of (bottom-right) causal.
    Rows with fewer than `keep` candidates (or none) are padded: valid False, index 0, no duplicates."""
    b, h, hkv, lk, m, keep = 2, 4, 2, 48, 3, 6
    g = _gen(MASKS.index(make_mask))
    allowed, lq = make_mask(g, b, h, lk)
    qc = _codes(g, b, h, lq, m, 3)
    kc = _codes(g, b, hkv, lk, m, 3)
    # the loop form uses small blocks: several query and key blocks, a mask tile per (query block, key block)
    blocks = {} if vector else dict(block_q=16, block_k=16)
    index, valid = got = pq_select_triton(qc, kc, keep, causal, allowed, vector=vector, **blocks)
    want = select_brute_force(qc, kc, keep, causal, allowed)
    _assert_select_equal(got, want)
    # every selected key is a candidate of its own row (the bug this contract fixes: one key row for every query)
    cand = torch.ones(b, h, lq, lk, dtype=torch.bool) if allowed is None else allowed.expand(b, h, lq, lk)
    if causal:
        cand = cand & torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    assert cand.gather(-1, index.long())[valid].all()
    assert torch.equal(valid.sum(-1), cand.sum(-1).clamp(max=keep))
    assert (index[~valid] == 0).all()
    if make_mask is _fully_masked_rows:
        assert not valid[0, :, :7].any() and not valid[1, :, 20].any()


def test_select_allowed_mask_is_per_query_not_last_row(interpreter):
    """A sliding window read as the old [B, Lk] key mask (its last query row) would leave query 0 without keys:
    with the 4-d mask each query keeps its own window."""
    lk = 20
    i, j = torch.arange(lk)[:, None], torch.arange(lk)[None, :]
    window = ((j <= i) & (i - j < 4))[None, None]
    codes = torch.zeros(1, 1, lk, 2, dtype=torch.int32)
    index, valid = pq_select_triton(codes, codes, 4, True, window)
    assert valid[0, 0, 0].tolist() == [True, False, False, False] and index[0, 0, 0, 0] == 0
    assert index[0, 0, 10].tolist() == [7, 8, 9, 10] and valid[0, 0, 10].all()
    _assert_select_equal((index, valid), select_brute_force(codes, codes, 4, True, window))


def test_select_strided_int64_codes_and_all_padding(interpreter):
    g = _gen(5)
    qc = torch.randint(0, 3, (2, 37, 4, 3), generator=g).transpose(1, 2)  # [2, 4, 37, 3] int64, strided
    kc = torch.randint(0, 3, (2, 41, 2, 3), generator=g).transpose(1, 2)
    keys = torch.ones(2, 1, 1, 41, dtype=torch.bool)
    keys[1] = False  # batch 1: no valid key at all -> every slot invalid, index 0
    got = pq_select_triton(qc, kc, 7, False, keys)
    _assert_select_equal(got, select_brute_force(qc, kc, 7, False, keys))
    assert not got[1][1].any() and got[1][0].all()
    assert (got[0][1].cpu() == 0).all()


def test_select_ties_resolve_to_lower_key_index(interpreter):
    """All codes equal: every allowed key has score M, so the first `keep` allowed keys are taken."""
    qc = torch.zeros(1, 1, 20, 2, dtype=torch.int32)
    kc = torch.zeros(1, 1, 300, 2, dtype=torch.int32)
    keys = torch.ones(1, 300, dtype=torch.bool)
    keys[0, ::3] = False
    index, valid = pq_select_triton(qc, kc, 10, False, keys[:, None, None], block_k=32)
    want = torch.nonzero(keys[0]).flatten()[:10].to(torch.int32)
    assert valid.all() and torch.equal(index[0, 0], want.expand(20, 10))
    _assert_select_equal((index, valid), select_brute_force(qc, kc, 10, False, keys[:, None, None]))


def test_select_bad_inputs(interpreter):
    qc = torch.zeros(1, 2, 4, 2, dtype=torch.int32)
    kc = torch.zeros(1, 1, 3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="keep"):
        pq_select_triton(qc, kc, 5, False)
    with pytest.raises(ValueError, match="integer"):
        pq_select_triton(qc.float(), kc, 2, False)
    with pytest.raises(ValueError, match="allowed must be a bool mask .* got torch.float32"):
        pq_select_triton(qc, kc, 2, False, torch.ones(1, 1, 4, 3))
    for shape in [(1, 3),           # the old [B, Lk] key mask
                  (1, 4, 3),        # 3 dims
                  (1, 1, 1, 1, 3),  # 5 dims
                  (1, 1, 4, 2),     # dim 3 != Lk
                  (1, 1, 2, 3),     # dim 2 neither 1 nor Lq
                  (2, 1, 1, 3),     # dim 0 neither 1 nor B
                  ]:
        with pytest.raises(ValueError, match=r"allowed must be a bool mask broadcastable to \[B, H, Lq, Lk\]"):
            pq_select_triton(qc, kc, 2, False, torch.ones(shape, dtype=torch.bool))
    # dim 1 indexes the query heads: Hkv (1 here) is fine only as a broadcast 1, and H = 2 works
    for h_dim in (1, 2):
        pq_select_triton(qc, kc, 2, False, torch.ones(1, h_dim, 4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"allowed must be a bool mask broadcastable to \[B, H, Lq, Lk\]"):
        pq_select_triton(qc, kc, 2, False, torch.ones(1, 3, 4, 3, dtype=torch.bool))


def test_select_memory_does_not_grow_with_lk(interpreter):
    """No [Lq, Lk] buffer: the kernel's working set (the interpreter's numpy tiles, traced by tracemalloc) is the
    same for Lk = 256 and Lk = 2048, while the reference's int16 score alone would grow by Lq * 1792 * 2 bytes per
    head. Results are still exact at Lk = 2048."""
    g = _gen(6)
    lq, m, keep = 64, 16, 64
    qc = _codes(g, 1, 2, lq, m, 16)
    peaks = {}
    for lk in (256, 2048):
        kc = _codes(g, 1, 2, lk, m, 16)
        pq_select_triton(qc[:, :, :4], kc[:, :, :4], 2, False)  # build / warm the kernel outside the trace
        tracemalloc.start()
        try:
            got = pq_select_triton(qc, kc, keep, False)
            peaks[lk] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        _assert_select_equal(got, select_brute_force(qc, kc, keep, False, None))
    growth = peaks[2048] - peaks[256]
    score_growth = 2 * lq * (2048 - 256) * 2  # two heads of int16 [Lq, Lk] scores
    assert growth < score_growth / 4, (peaks, score_growth)


def _enclosing_branch(lines, i):
    """The nearest line above lines[i] with a smaller indent (the block statement lines[i] sits in)."""
    indent = len(lines[i]) - len(lines[i].lstrip())
    for line in reversed(lines[:i]):
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            return line.strip()
    return ""


def test_select_source_writes_only_the_outputs():
    """The generated kernel stores only into the index / valid outputs: scores and histograms stay in registers.
    The mask and causality are constexpr switches: the mask is read only inside ``if HAS_MASK:`` (so without a
    mask it is not read at all), as a [BLOCK_Q, BLOCK_K] tile through its 4 strides."""
    for vector in (False, True):
        src = kernel_source(PQSelectSpec(vector=vector))
        targets = re.findall(r"tl\.store\(\s*([a-z_]+)", src)
        assert targets and set(targets) <= {"idx_rows", "val_rows"}, targets
        assert "atomic" not in src
        compile(src, "<pq_select>", "exec")
        assert "mask_rows[:, None] + offs_k.to(tl.int64)[None, :] * s_mk" in src
        lines = src.splitlines()
        mask_lines = [i for i, line in enumerate(lines) if "mask_rows" in line or "mask_ptr +" in line]
        assert mask_lines and all(_enclosing_branch(lines, i).startswith("if HAS_MASK:") for i in mask_lines)
        assert "CAUSAL: tl.constexpr" in src and "HAS_MASK: tl.constexpr" in src


def test_kernel_cache_and_sources(interpreter):
    spec = PQSelectSpec(vector=True)
    k1 = get_pq_kernel(spec)
    hits = cache_info().hits
    assert get_pq_kernel(PQSelectSpec(vector=True)) is k1
    assert cache_info().hits == hits + 1
    assert k1.path.parent == cache_dir() and k1.path.read_text() == k1.source
    assert kernel_key(spec) != kernel_key(PQSelectSpec(vector=False))
    assert kernel_key(spec) != kernel_key(PQEncodeSpec())
    enc = kernel_source(PQEncodeSpec(acc="fp64"))
    assert "tl.float64" in enc and "tl.zeros" not in enc and "tl.sum(" not in enc
    with pytest.raises(ValueError, match="PQSelectSpec.vector must be a bool"):
        PQSelectSpec(vector=1)
    with pytest.raises(ValueError):
        PQEncodeSpec(acc="fp16")


# Compiles the masked causal select kernel (loop form, the GPU's) for sm_90 at the wrapper's GPU launch defaults and
# prints ptxas' registers / spills. In a fresh process: this module imports triton in interpreter mode.
SM90_SCRIPT = """
import os, re, subprocess, sys, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from sparsify.codegen.pq_kernels import PQSelectSpec, SELECT_GPU_DEFAULTS, get_pq_kernel
kernel = get_pq_kernel(PQSelectSpec(vector=False))
assert not kernel.interpret
consts = dict(BLOCK_Q=SELECT_GPU_DEFAULTS["block_q"], BLOCK_K=SELECT_GPU_DEFAULTS["block_k"], BLOCK_S=64,
              LEVELS=16, BLOCK_M=8, CAUSAL=True, HAS_MASK=True)  # keep >= 64, M = 8, causal and masked
ptrs = dict(qc_ptr="*i32", kc_ptr="*i32", mask_ptr="*u8", idx_ptr="*i32", val_ptr="*u8")
sig = {a: "constexpr" if a in consts else ptrs.get(a, "i32") for a in kernel.fn.arg_names}
out = triton.compile(ASTSource(kernel.fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                     options={"num_warps": SELECT_GPU_DEFAULTS["num_warps"]})
with tempfile.TemporaryDirectory() as d:
    ptx = os.path.join(d, "k.ptx")
    open(ptx, "w").write(out.asm["ptx"])
    log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=" + sm_arch_from_capability(90), ptx,
                          "-o", ptx + ".o"], capture_output=True, text=True).stderr
print("registers", re.search(r"Used (\\d+) registers", log).group(1),
      "spill_stores", re.search(r"(\\d+) bytes spill stores", log).group(1),
      "spill_loads", re.search(r"(\\d+) bytes spill loads", log).group(1))
"""


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_select_compiles_for_sm90_without_spills(tmp_path):
    """The real (non-interpreter) frontend accepts the masked select kernel for an H100 target, and at the GPU
    launch defaults (SELECT_GPU_DEFAULTS) ptxas fits it in registers: no spill stores or loads (4 warps spill)."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend")
    root = REPO
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["SPARSIFY_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", SM90_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    if run.returncode != 0 and "ptxas" in run.stderr.lower():
        pytest.skip(f"no usable ptxas: {run.stderr[-500:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    found = re.search(r"registers (\d+) spill_stores (\d+) spill_loads (\d+)", run.stdout)
    assert found, run.stdout
    stores, loads = map(int, found.groups()[1:])
    assert stores == 0 and loads == 0, run.stdout


def test_every_op_with_a_kernel_has_its_cuda_registration():
    """sparsify/ops/cuda.py registers every CUDA implementation when sparsify.ops is imported (one place; codegen
    registers nothing)."""
    for name in ("sparsify::pq_encode", "sparsify::pq_select", "sparsify::mlp", "sparsify::routed_mlp",
                 "sparsify::routed_mlp_backward", "sparsify::spt_attention", "sparsify::spt_attention_backward",
                 "sparsify::block_sparse_attention", "sparsify::block_sparse_attention_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
class TestGPU:
    """Compiled kernels on CUDA, compared with the CPU reference (the CUDA dispatch of the ops may be these very
    kernels once registered, so the reference runs on CPU copies)."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_encode(self, dtype):
        g = _gen(10)
        x = torch.randn(2, 8, 1024, 64, generator=g).to(dtype)
        cb = torch.randn(8, 16, 8, generator=g).to(dtype)
        got = pq_encode_triton(x.cuda(), cb.cuda())
        want = pq_encode_ref(x, cb)
        # exact apart from sub-vectors equidistant to two codewords within an ulp (module docstring)
        assert (got.cpu() != want).float().mean().item() < 1e-5
        xq = torch.randint(-8, 9, (2, 8, 512, 64), generator=g).to(dtype) / 4
        cq = torch.randint(-4, 5, (8, 16, 8), generator=g).to(dtype) / 2
        assert torch.equal(pq_encode_triton(xq.cuda(), cq.cuda()).cpu(), pq_encode_ref(xq, cq))

    @pytest.mark.parametrize("vector", [False, True])
    @pytest.mark.parametrize("causal,mask,hkv", [(False, None, 8), (True, None, 2), (True, "padding", 4),
                                                 (True, "window", 2), (False, "per_head", 8)])
    def test_select(self, causal, mask, hkv, vector):
        g = _gen(11)
        b, h, l, m = 2, 8, 1000, 8
        qc = _codes(g, b, h, l, m, 16)
        kc = _codes(g, b, hkv, l, m, 16)
        keys = torch.rand(b, 1, 1, l, generator=g) < 0.8
        i, j = torch.arange(l)[:, None], torch.arange(l)[None, :]
        allowed = {None: None, "padding": keys,
                   "window": ((j <= i) & (i - j < 300))[None, None] & keys,  # [B, 1, L, L]
                   "per_head": torch.rand(b, h, l, l, generator=g) < 0.5}[mask]
        blocks = dict(block_q=32, block_k=32) if vector else {}
        got = pq_select_triton(qc.cuda(), kc.cuda(), l // 8, causal, None if allowed is None else allowed.cuda(),
                               vector=vector, **blocks)
        _assert_select_equal(got, select_brute_force(qc, kc, l // 8, causal, allowed))

    def test_registered_ops_dispatch_to_triton(self):
        g = _gen(12)
        x = torch.randn(1, 4, 300, 32, generator=g)
        cb = torch.randn(4, 16, 8, generator=g)
        codes = torch.ops.sparsify.pq_encode(x.cuda(), cb.cuda())
        assert codes.is_cuda and torch.equal(codes.cpu(), pq_encode_ref(x, cb))
        got = torch.ops.sparsify.pq_select(codes, codes, 37, True, None)
        _assert_select_equal(got, select_brute_force(codes.cpu(), codes.cpu(), 37, True, None))
        window = torch.ones(300, 300, dtype=torch.bool, device="cuda").tril().triu(-50)  # 51 keys back
        got = torch.ops.sparsify.pq_select(codes, codes, 37, True, window[None, None])
        _assert_select_equal(got, select_brute_force(codes.cpu(), codes.cpu(), 37, True, window[None, None]))
