"""Tests for sparsify.codegen.pq_kernels: Triton kernels of sparsify::pq_encode and sparsify::pq_select.

On CPU the kernels run in Triton's interpreter (set up as in tests/test_codegen.py: kernels are generated lazily
and keyed on the mode, so setting TRITON_INTERPRET here is enough even if triton was imported earlier). The
reference is the CPU op of sparsify/ops/spt.py; equality is exact (codes, index, valid), on random inputs with
many ties (few codewords), GQA, causal, key padding, odd sizes, strided and int64 inputs, and both tile forms of
the select kernel. The selection kernel's memory does not grow with Lk (no [Lq, Lk] buffer): checked with
tracemalloc (the interpreter's tiles are numpy arrays) and on the generated source. The `gpu` class repeats the
checks on CUDA (fp32 / fp16 / bf16) at realistic sizes, through the registered CUDA kernels too.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import re  # noqa: E402
import tracemalloc  # noqa: E402

import pytest  # noqa: E402

import sparsify.ops.spt  # noqa: E402,F401  (registers sparsify::pq_encode / pq_select)
from sparsify.codegen import cache_dir, cache_info  # noqa: E402
from sparsify.codegen.pq_kernels import (  # noqa: E402
    PQEncodeSpec,
    PQSelectSpec,
    get_pq_kernel,
    kernel_key,
    kernel_source,
    pq_encode_triton,
    pq_select_triton,
    register_cuda_kernels,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
# generated kernels go to a temporary cache directory (tests/conftest.py)
pytestmark = [pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"),
              pytest.mark.usefixtures("kernel_cache_dir")]

pq_encode_ref = torch.ops.sparsify.pq_encode
pq_select_ref = torch.ops.sparsify.pq_select




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
    (1, 3, 3, 90, 30, 3, 4, 12, True, True),     # Lq > Lk (top-left causal: rows >= Lk see every key)
]


@pytest.mark.parametrize("vector", [True, False], ids=["vector", "loop"])
@pytest.mark.parametrize("case", SELECT_CASES)
def test_select_matches_reference(interpreter, case, vector):
    b, h, hkv, lq, lk, m, e, keep, causal, padded = case
    g = _gen(hash(case) % 1000)
    qc = _codes(g, b, h, lq, m, e)
    kc = _codes(g, b, hkv, lk, m, e)
    kv = None
    if padded:
        kv = torch.rand(b, lk, generator=g) < 0.6
        kv[0, : lk // 3] = False  # a padded prefix too
    # the loop form uses small blocks, so it streams several key blocks and several query blocks
    blocks = {} if vector else dict(block_q=32, block_k=32)
    got = pq_select_triton(qc, kc, keep, causal, kv, vector=vector, **blocks)
    _assert_select_equal(got, pq_select_ref(qc, kc, keep, causal, kv))


def test_select_strided_int64_codes_and_all_padding(interpreter):
    g = _gen(5)
    qc = torch.randint(0, 3, (2, 37, 4, 3), generator=g).transpose(1, 2)  # [2, 4, 37, 3] int64, strided
    kc = torch.randint(0, 3, (2, 41, 2, 3), generator=g).transpose(1, 2)
    kv = torch.ones(2, 41, dtype=torch.bool)
    kv[1] = False  # batch 1: no valid key at all -> every slot invalid, index 0
    got = pq_select_triton(qc, kc, 7, False, kv)
    _assert_select_equal(got, pq_select_ref(qc, kc, 7, False, kv))
    assert not got[1][1].any() and not got[0][1].any()
    assert got[1][0].all()


def test_select_ties_resolve_to_lower_key_index(interpreter):
    """All codes equal: every allowed key has score M, so the first `keep` allowed keys are taken."""
    qc = torch.zeros(1, 1, 20, 2, dtype=torch.int32)
    kc = torch.zeros(1, 1, 300, 2, dtype=torch.int32)
    kv = torch.ones(1, 300, dtype=torch.bool)
    kv[0, ::3] = False
    index, valid = pq_select_triton(qc, kc, 10, False, kv, block_k=32)
    want = torch.nonzero(kv[0]).flatten()[:10].to(torch.int32)
    assert valid.all() and torch.equal(index[0, 0], want.expand(20, 10))
    _assert_select_equal((index, valid), pq_select_ref(qc, kc, 10, False, kv))


def test_select_bad_inputs(interpreter):
    qc = torch.zeros(1, 2, 4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="keep"):
        pq_select_triton(qc, qc, 5, False)
    with pytest.raises(ValueError, match="integer"):
        pq_select_triton(qc.float(), qc, 2, False)
    with pytest.raises(ValueError, match="key_valid"):
        pq_select_triton(qc, qc, 2, False, torch.ones(1, 3, dtype=torch.bool))


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
        _assert_select_equal(got, pq_select_ref(qc, kc, keep, False, None))
    growth = peaks[2048] - peaks[256]
    score_growth = 2 * lq * (2048 - 256) * 2  # two heads of int16 [Lq, Lk] scores
    assert growth < score_growth / 4, (peaks, score_growth)


def test_select_source_writes_only_the_outputs():
    """The generated kernel stores only into the index / valid outputs: scores and histograms stay in registers."""
    for vector in (False, True):
        for causal in (False, True):
            src = kernel_source(PQSelectSpec(causal=causal, key_valid=True, vector=vector))
            targets = re.findall(r"tl\.store\(\s*([a-z_]+)", src)
            assert targets and set(targets) <= {"idx_rows", "val_rows"}, targets
            assert "atomic" not in src
            compile(src, "<pq_select>", "exec")


def test_kernel_cache_and_sources(interpreter):
    spec = PQSelectSpec(causal=True, key_valid=False, vector=True)
    k1 = get_pq_kernel(spec)
    hits = cache_info().hits
    assert get_pq_kernel(PQSelectSpec(causal=True, key_valid=False, vector=True)) is k1
    assert cache_info().hits == hits + 1
    assert k1.path.parent == cache_dir() and k1.path.read_text() == k1.source
    assert kernel_key(spec) != kernel_key(PQSelectSpec(causal=False, key_valid=False, vector=True))
    enc = kernel_source(PQEncodeSpec(acc="fp64"))
    assert "tl.float64" in enc and "tl.zeros" not in enc and "tl.sum(" not in enc
    with pytest.raises(ValueError):
        PQSelectSpec(causal=1)
    with pytest.raises(ValueError):
        PQEncodeSpec(acc="fp16")


def test_register_cuda_kernels():
    register_cuda_kernels()
    register_cuda_kernels()  # idempotent
    for name in ("sparsify::pq_encode", "sparsify::pq_select"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")


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
    @pytest.mark.parametrize("causal,padded,hkv", [(False, False, 8), (True, False, 2), (True, True, 4)])
    def test_select(self, causal, padded, hkv, vector):
        g = _gen(11)
        b, h, l, m = 2, 8, 1000, 8
        qc = _codes(g, b, h, l, m, 16)
        kc = _codes(g, b, hkv, l, m, 16)
        kv = (torch.rand(b, l, generator=g) < 0.8) if padded else None
        blocks = dict(block_q=32, block_k=32) if vector else {}
        got = pq_select_triton(qc.cuda(), kc.cuda(), l // 8, causal, None if kv is None else kv.cuda(),
                               vector=vector, **blocks)
        _assert_select_equal(got, pq_select_ref(qc, kc, l // 8, causal, kv))

    def test_registered_ops_dispatch_to_triton(self):
        register_cuda_kernels()
        g = _gen(12)
        x = torch.randn(1, 4, 300, 32, generator=g)
        cb = torch.randn(4, 16, 8, generator=g)
        codes = torch.ops.sparsify.pq_encode(x.cuda(), cb.cuda())
        assert codes.is_cuda and torch.equal(codes.cpu(), pq_encode_ref(x, cb))
        got = torch.ops.sparsify.pq_select(codes, codes, 37, True, None)
        _assert_select_equal(got, pq_select_ref(codes.cpu(), codes.cpu(), 37, True, None))
