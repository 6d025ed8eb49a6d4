"""Tests for sparsify.codegen.spt_attention: token-granular (SPT, ELL) and block-granular
sparse attention kernels, forward and backward.

On CPU the kernels run in Triton's interpreter (set up as in tests/kernels/test_codegen.py:
kernels are generated lazily and keyed on the mode, so setting TRITON_INTERPRET here
is enough even though `import sparsify` imported triton already). References are
plain torch, in float64 from the same (already rounded) inputs:

* token kernel: a gather-based reference (autograd for the gradients) and SDPA with
  the equivalent dense boolean mask;
* block kernel: masked dense attention with the block map expanded to a token mask,
  and plain SDPA when every block is selected.

Shapes are tiny and deliberately not multiples of the block sizes. The `gpu` class
repeats the checks on CUDA in fp16 / bf16 at realistic sizes.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from paths import REPO, TESTS  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sparsify.codegen import cache_dir, cache_info, clear_cache  # noqa: E402
from sparsify.codegen.spt_attention import (  # noqa: E402
    block_sparse_backward,
    block_sparse_forward,
    dense_block_map,
    spt_backward,
    spt_forward,
)
from sparsify.codegen.spt_attention_source import (  # noqa: E402
    BlockSparseSpec,
    TokenSparseSpec,
    get_spt_kernel,
    kernel_key,
    kernel_source,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
ROOT = REPO


# generated kernels go to a temporary cache directory (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("kernel_cache_dir")


# --- inputs ------------------------------------------------------------------------------------

def make_qkv(B, H, Hkv, Lq, Lk, D, Dv, dtype, device="cpu", seed=0):
    """q / k / v as [B, L, heads, D] buffers seen as [B, heads, L, D] (the Hugging Face
    layout after .transpose(1, 2)): every kernel reads through non-trivial strides."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, Lk, Hkv, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    v = torch.randn(B, Lk, Hkv, Dv, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    return q, k, v


def random_slots(B, H, Lq, Lk, keep, causal, seed=0, drop=0.2, empty_rows=(), keep_diagonal=False):
    """SPT-like selections: `keep` distinct keys per row among the allowed ones; rows with
    fewer allowed keys (early causal rows) get invalid slots, some slots are switched off
    at random, and `empty_rows` keep nothing. Invalid slots hold garbage indices, some
    of them out of range, which the kernels must ignore. `keep_diagonal`: slot 0 always
    holds key i + Lk - Lq (every row keeps >= 1 key: SDPA gives no NaN)."""
    g = torch.Generator().manual_seed(seed)
    score = torch.rand(B, H, Lq, Lk, generator=g)
    if causal:
        allowed = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
        score = score.masked_fill(~allowed, -1.0)
    if keep_diagonal:
        score[..., torch.arange(Lq), torch.arange(Lq) + (Lk - Lq)] = 2.0
    top, index = score.topk(keep, dim=-1)
    valid = (top >= 0) & (torch.rand(B, H, Lq, keep, generator=g) >= drop)
    if keep_diagonal:
        valid[..., 0] = True
    for r in empty_rows:
        valid[:, :, r] = False
    garbage = torch.randint(-3, Lk + 3, index.shape, generator=g)
    index = torch.where(valid, index, garbage)
    return index.to(torch.int32), valid


def token_reference(q, k, v, index, valid, mask, scale, causal):
    """Gather-based attention over the kept slots (float64, autograd-able): rows keeping
    nothing give out 0 / lse -inf, like the kernel."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    idx = index.long()
    ok = valid & (idx >= 0) & (idx < Lk)
    if causal:
        ok = ok & (idx <= torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq))
    idx = torch.where(ok, idx, 0)
    bi = torch.arange(B, device=q.device)[:, None, None, None]
    hi = torch.arange(H, device=q.device)[None, :, None, None]
    kg, vg = kr[bi, hi, idx], vr[bi, hi, idx]  # [B, H, Lq, keep, D]
    s = torch.einsum("bhid,bhisd->bhis", q, kg) * scale
    if mask is not None:
        s = s + mask.expand(B, H, Lq, Lk).gather(3, idx)
    s = s.masked_fill(~ok, float("-inf"))
    return _safe_softmax_out(s, vg, "bhis,bhise->bhie")


def _safe_softmax_out(s, v, eq):
    """softmax(s) @ v over the last dim, max-subtracted (as the kernels and SDPA: with
    fp32 scores near finfo.min, exp(s - logsumexp) would not be normalised)."""
    has = (s > float("-inf")).any(-1, keepdim=True)
    s2 = torch.where(has, s, 0.0)  # avoids NaN values *and* NaN gradients on empty rows
    m = s2.amax(-1, keepdim=True).detach()
    e = torch.exp(s2 - m)
    total = e.sum(-1, keepdim=True)
    p = e / total * has
    out = torch.einsum(eq, p, v)
    lse = m + torch.log(total)
    return out, torch.where(has, lse, float("-inf")).squeeze(-1)


def dense_reference(q, k, v, allowed, scale, mask=None):
    """Masked dense attention (float64): `allowed` [B, H, Lq, Lk] bool."""
    G = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = q @ kr.transpose(-1, -2) * scale
    if mask is not None:
        s = s + mask
    s = s.masked_fill(~allowed, float("-inf"))
    return _safe_softmax_out(s, vr, "bhij,bhje->bhie")


def slots_to_dense(index, valid, Lk, causal):
    """The boolean [B, H, Lq, Lk] mask equivalent to a (duplicate-free) slot selection."""
    B, H, Lq, _ = index.shape
    ok = valid & (index >= 0) & (index < Lk)
    dense = torch.zeros(B, H, Lq, Lk, dtype=torch.bool, device=index.device)
    b, h, i, s = ok.nonzero(as_tuple=True)
    dense[b, h, i, index[b, h, i, s].long()] = True
    if causal:
        dense &= torch.ones(Lq, Lk, dtype=torch.bool, device=index.device).tril(Lk - Lq)
    return dense


def grads_of(fn, inputs, grad_out):
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    out, lse = fn(*leaves)
    out.backward(grad_out.double())
    return out, lse, [t.grad for t in leaves]


def assert_close(x, ref, dtype, what=""):
    x, ref = x.double(), ref.double()
    if dtype == torch.float32:
        torch.testing.assert_close(x, ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{what}: {m}")
    else:  # 16-bit rounding of inputs to the dots / outputs: relative to the magnitude
        tol = (3e-2 if dtype == torch.bfloat16 else 1e-2) * max(1.0, ref.abs().max().item())
        torch.testing.assert_close(x, ref, atol=tol, rtol=2e-2, msg=lambda m: f"{what}: {m}")


def assert_lse(lse, ref, dtype):
    # -inf must match exactly (empty rows), finite entries within tolerance
    assert torch.equal(torch.isinf(lse), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert_close(lse[fin], ref[fin], torch.float32 if dtype == torch.float32 else torch.float16, "lse")


# --- token kernel ------------------------------------------------------------------------------

TOKEN_CASES = {
    # name: (B, H, Hkv, Lq, Lk, D, Dv, keep, causal, mask kind)
    "gqa-causal": (1, 2, 1, 37, 37, 16, 16, 5, True, None),
    "mha-addmask": (2, 2, 2, 23, 40, 16, 16, 5, False, "broadcast"),
    "gqa-causal-fullmask-dv": (1, 2, 1, 20, 33, 24, 16, 5, True, "full"),
}


def _token_mask(kind, B, H, Lq, Lk, dtype, seed=1):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    if kind == "broadcast":  # HF-style [B, 1, 1, Lk] padding mask with -inf and finfo.min entries
        m = torch.zeros(B, 1, 1, Lk)
        m[..., -3:] = torch.finfo(torch.float32).min
        m[..., 2] = float("-inf")
        return m
    return torch.randn(B, H, Lq, Lk, generator=g).to(dtype)  # e.g. a learned bias


@needs_triton
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=("fp32", "fp16"))
@pytest.mark.parametrize("case", list(TOKEN_CASES), ids=list(TOKEN_CASES))
def test_token_matches_gather_reference(interpreter, case, dtype):
    B, H, Hkv, Lq, Lk, D, Dv, keep, causal, mask_kind = TOKEN_CASES[case]
    q, k, v = make_qkv(B, H, Hkv, Lq, Lk, D, Dv, dtype)
    index, valid = random_slots(B, H, Lq, Lk, keep, causal, empty_rows=(3,))
    mask = _token_mask(mask_kind, B, H, Lq, Lk, dtype)
    scale = 0.3
    # block_k=4 < keep: the online softmax runs over two slot chunks, the second partial
    out, lse = spt_forward(q, k, v, index, valid, mask, scale, causal=causal, block_m=8, block_k=4)
    assert out.dtype == dtype and out.shape == (B, H, Lq, Dv) and lse.dtype == torch.float32

    g = torch.Generator().manual_seed(7)
    do = torch.randn(B, H, Lq, Dv, generator=g).to(dtype)
    with_mask_grad = mask_kind == "full"
    inputs = [q, k, v] + ([mask] if with_mask_grad else [])

    def ref_fn(q_, k_, v_, m_=None):
        m = m_ if m_ is not None else (None if mask is None else mask.double())
        return token_reference(q_, k_, v_, index, valid, m, scale, causal)

    ref_out, ref_lse, ref_grads = grads_of(ref_fn, inputs, do)
    assert_close(out, ref_out, dtype, "out")
    assert_lse(lse, ref_lse, dtype)
    assert torch.all(out[:, :, 3] == 0) and torch.all(lse[:, :, 3] == float("-inf"))  # the empty row

    # backward: D_i recomputed in-kernel, and D_i from the forward output
    for extra in (dict(), dict(out=out)):
        grads = spt_backward(do, q, k, v, index, valid, mask, lse, scale, causal=causal,
                             mask_grad=with_mask_grad, block_m=16, block_k=4, **extra)
        assert len(grads) == len(ref_grads)
        for name, got, ref in zip(("dq", "dk", "dv", "dmask"), grads, ref_grads):
            assert got.shape == ref.shape
            assert torch.isfinite(got).all(), name
            assert_close(got, ref, dtype, name)
        assert torch.all(grads[0][:, :, 3] == 0)  # empty row: no gradient


@needs_triton
@pytest.mark.parametrize("causal", (False, True))
def test_token_matches_sdpa_with_equivalent_mask(interpreter, causal):
    B, H, Hkv, L, D, keep = 2, 2, 1, 29, 16, 5
    q, k, v = make_qkv(B, H, Hkv, L, L, D, D, torch.float32, seed=3)
    index, valid = random_slots(B, H, L, L, keep, causal, seed=4, drop=0.3, keep_diagonal=True)
    mask = torch.randn(1, 1, L, L, generator=torch.Generator().manual_seed(5))
    # HF-style padding of the first keys with finfo.min: with causal, rows 0..2 keep only such
    # keys, whose fp32 scores are all absorbed to finfo.min: SDPA (math, fp32) averages them
    mask[..., :3] = torch.finfo(torch.float32).min
    allowed = slots_to_dense(index, valid, L, causal)
    assert allowed.any(-1).all()
    attn_mask = torch.where(allowed, mask, float("-inf"))
    do = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(6))

    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=attn_mask, enable_gqa=True)
    ref.backward(do)

    out, lse = spt_forward(q, k, v, index, valid, mask, causal=causal, block_k=4)
    torch.testing.assert_close(out, ref.detach(), atol=1e-4, rtol=1e-4)
    dq, dk, dv = spt_backward(do, q, k, v, index, valid, mask, lse, causal=causal, block_k=4)
    for got, want in ((dq, qq.grad), (dk, kk.grad), (dv, vv.grad)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@needs_triton
def test_token_keep_all_equals_dense_sdpa(interpreter):
    """index = every key, all valid: plain (causal) attention."""
    B, H, Hkv, L, D = 1, 2, 1, 21, 16
    q, k, v = make_qkv(B, H, Hkv, L, L, D, D, torch.float32, seed=8)
    index = torch.arange(L, dtype=torch.int32).expand(1, 1, L, L)  # broadcast over B, H
    out, lse = spt_forward(q, k, v, index, None, None, causal=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    dense_lse = torch.logsumexp((q @ k.transpose(-1, -2) * D ** -0.5).masked_fill(
        ~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf")), -1)
    torch.testing.assert_close(lse, dense_lse, atol=1e-5, rtol=1e-5)


@needs_triton
def test_token_all_rows_empty_and_bool_mask(interpreter):
    B, H, L, D, keep = 1, 2, 9, 16, 3
    q, k, v = make_qkv(B, H, H, L, L, D, D, torch.float32, seed=9)
    index = torch.randint(0, L, (B, H, L, keep), dtype=torch.int32)
    out, lse = spt_forward(q, k, v, index, torch.zeros(B, H, L, keep, dtype=torch.bool), None)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    dq, dk, dv = spt_backward(torch.ones_like(out), q, k, v, index, torch.zeros(B, H, L, keep, dtype=torch.bool),
                              None, lse)
    assert not dq.any() and not dk.any() and not dv.any()
    # a bool mask (True = attend) that forbids every key: the same, no NaN
    out, lse = spt_forward(q, k, v, index, None, torch.zeros(L, L, dtype=torch.bool))
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


# --- block kernel ------------------------------------------------------------------------------

BM = BN = 16


def block_map_to_dense(block_index, block_valid, Lq, Lk, causal, kpm, bm=BM, bn=BN):
    """Token-level boolean mask [B, H, Lq, Lk] of a block selection (+ causal, key padding)."""
    B, H, nqb, kb = block_index.shape
    nkb = -(-Lk // bn)
    idx = block_index.long()
    ok = block_valid & (idx >= 0) & (idx < nkb)
    sel = torch.zeros(B, H, nqb, nkb + 1, dtype=torch.bool)
    sel.scatter_(3, torch.where(ok, idx, nkb), ok)  # invalid entries land in a spare column
    sel = sel[..., :nkb]
    dense = sel.repeat_interleave(bm, 2)[:, :, :Lq].repeat_interleave(bn, 3)[..., :Lk]
    if causal:
        dense = dense & torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
    if kpm is not None:
        dense = dense & kpm[:, None, None, :]
    return dense


def random_block_map(B, H, Lq, Lk, kb, causal, seed, bm=BM, bn=BN):
    """kb distinct key blocks per query block (allowed ones first), some switched off."""
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-Lq // bm), -(-Lk // bn)
    score = torch.rand(B, H, nqb, nkb, generator=g)
    _, allowed = dense_block_map(Lq, Lk, bm, bn, causal)
    score = score.masked_fill(~allowed, -1.0)
    top, index = score.topk(kb, dim=-1)
    valid = (top >= 0) & (torch.rand(B, H, nqb, kb, generator=g) > 0.2)
    index = torch.where(valid, index, torch.randint(-2, nkb + 2, index.shape, generator=g))
    return index.to(torch.int32), valid


BLOCK_CASES = {
    # name: (B, H, Hkv, Lq, Lk, D, Dv, causal, key padding)
    "gqa-causal": (1, 2, 1, 40, 40, 16, 16, True, False),
    "mha-kpm": (2, 2, 2, 33, 45, 16, 16, False, True),
    "gqa-causal-kvcache-kpm-d24": (2, 2, 1, 20, 45, 24, 16, True, True),
}


@needs_triton
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=("fp32", "fp16"))
@pytest.mark.parametrize("case", list(BLOCK_CASES), ids=list(BLOCK_CASES))
def test_block_random_selection_matches_masked_reference(interpreter, case, dtype):
    B, H, Hkv, Lq, Lk, D, Dv, causal, use_kpm = BLOCK_CASES[case]
    q, k, v = make_qkv(B, H, Hkv, Lq, Lk, D, Dv, dtype, seed=11)
    block_index, block_valid = random_block_map(B, H, Lq, Lk, kb=2, causal=causal, seed=12)
    kpm = None
    if use_kpm:  # HF attention_mask style (1 = attend), left padding on batch 1
        kpm = torch.ones(B, Lk, dtype=torch.long)
        kpm[-1, :7] = 0
    kpm_bool = None if kpm is None else kpm.bool()
    allowed = block_map_to_dense(block_index, block_valid, Lq, Lk, causal, kpm_bool)
    scale = D ** -0.5
    kw = dict(block_m=BM, block_n=BN, causal=causal, key_padding_mask=kpm)
    out, lse = block_sparse_forward(q, k, v, block_index, block_valid, **kw)

    do = torch.randn(B, H, Lq, Dv, generator=torch.Generator().manual_seed(13)).to(dtype)
    ref_out, ref_lse, ref_grads = grads_of(lambda *t: dense_reference(*t, allowed, scale), [q, k, v], do)
    assert_close(out, ref_out, dtype, "out")
    assert_lse(lse, ref_lse, dtype)
    for extra in (dict(), dict(out=out)):
        grads = block_sparse_backward(do, q, k, v, block_index, block_valid, lse, **kw, **extra)
        for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
            assert got.dtype == dtype and got.shape == ref.shape
            assert_close(got, ref, dtype, name)


@needs_triton
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=("fp32", "fp16"))
@pytest.mark.parametrize("causal", (False, True))
def test_block_all_selected_equals_sdpa(interpreter, causal, dtype):
    B, H, Hkv, L, D = 1, 2, 1, 40, 16
    q, k, v = make_qkv(B, H, Hkv, L, L, D, D, dtype, seed=14)
    block_index, block_valid = dense_block_map(L, L, BM, BN, causal)
    kw = dict(block_m=BM, block_n=BN, causal=causal)
    out, lse = block_sparse_forward(q, k, v, block_index, block_valid, **kw)
    do = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(15)).to(dtype)

    qq, kk, vv = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, enable_gqa=True)
    ref.backward(do.double())
    assert_close(out, ref, dtype, "out")
    dq, dk, dv = block_sparse_backward(do, q, k, v, block_index, block_valid, lse, **kw)
    for name, got, want in (("dq", dq, qq.grad), ("dk", dk, kk.grad), ("dv", dv, vv.grad)):
        assert_close(got, want, dtype, name)


@needs_triton
def test_block_kernels_autotuned_reset_their_accumulators(autotune_timer, monkeypatch):
    """The GPU path's triton.autotune over the block kernels' tiles, driven under the interpreter by a stand-in
    timer that runs each config three times (tests/conftest.py autotune_timer): the backward's dK / dV accumulate
    atomically from zero, so without reset_to_zero the timing runs would add into them. The tuned choice is the
    last config (16 x 16 tiles on a 32 x 32 map)."""
    import sparsify.codegen.spt_attention as spt_attention

    timed = autotune_timer
    monkeypatch.setattr(spt_attention, "_block_tile_candidates",
                        lambda head_dim, bm, bn, backward, interpret=False: [(bm, bn, 4, 1), (16, 16, 4, 1)])
    B, H, Hkv, Lq, Lk, D = 1, 2, 1, 40, 45, 16
    q, k, v = make_qkv(B, H, Hkv, Lq, Lk, D, D, torch.float32, seed=19)
    block_index, block_valid = random_block_map(B, H, Lq, Lk, 1, True, 20, bm=32, bn=32)
    allowed = block_map_to_dense(block_index, block_valid, Lq, Lk, True, None, bm=32, bn=32)
    kw = dict(block_m=32, block_n=32, causal=True)
    out, lse = block_sparse_forward(q, k, v, block_index, block_valid, **kw)
    do = torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(21))
    ref_out, ref_lse, ref_grads = grads_of(lambda *t: dense_reference(*t, allowed, D ** -0.5), [q, k, v], do)
    assert_close(out, ref_out, torch.float32, "out")
    assert_lse(lse, ref_lse, torch.float32)
    grads = block_sparse_backward(do, q, k, v, block_index, block_valid, lse, out=out, **kw)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(got, ref, torch.float32, name)
    assert len(timed) == 4  # forward and backward each timed both configs


@needs_triton
def test_block_tiles_smaller_than_map_blocks(interpreter):
    """Kernel tiles of 16 x 16 walking a 32 x 32 block map (what the GPU defaults do for
    large head dims): same result as map-sized tiles."""
    B, H, Hkv, Lq, Lk, D = 1, 2, 1, 40, 45, 16
    q, k, v = make_qkv(B, H, Hkv, Lq, Lk, D, D, torch.float32, seed=16)
    block_index, block_valid = random_block_map(B, H, Lq, Lk, 1, True, 17, bm=32, bn=32)
    allowed = block_map_to_dense(block_index, block_valid, Lq, Lk, True, None, bm=32, bn=32)
    kw = dict(block_m=32, block_n=32, causal=True, tile_m=16, tile_n=16)
    out, lse = block_sparse_forward(q, k, v, block_index, block_valid, **kw)
    do = torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(18))
    ref_out, ref_lse, ref_grads = grads_of(lambda *t: dense_reference(*t, allowed, D ** -0.5), [q, k, v], do)
    assert_close(out, ref_out, torch.float32, "out")
    assert_lse(lse, ref_lse, torch.float32)
    grads = block_sparse_backward(do, q, k, v, block_index, block_valid, lse, **kw)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(got, ref, torch.float32, name)


def test_dense_block_map():
    idx, val = dense_block_map(40, 40, 16, 16, causal=False)
    assert idx.dtype == torch.int32 and idx.shape == (3, 3) and val.all()
    idx, val = dense_block_map(40, 40, 16, 16, causal=True)
    assert val.tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # KV cache: 8 new queries after 40 cached keys see every key block
    _, val = dense_block_map(8, 48, 16, 16, causal=True)
    assert val.all()


# --- generation and caching ----------------------------------------------------------------------

@needs_triton
def test_kernel_cache(interpreter):
    clear_cache()
    spec = TokenSparseSpec(head_dim=16, v_head_dim=16, dtype=torch.float32, causal=True, block_m=8, block_k=4)
    k1 = get_spt_kernel(spec)
    assert cache_info().generated == 1
    assert get_spt_kernel(TokenSparseSpec(16, 16, torch.float32, causal=True, block_m=8, block_k=4)) is k1
    assert cache_info().hits == 1 and cache_info().generated == 1
    assert k1.path == cache_dir() / f"{kernel_key(spec)}.py"
    assert k1.path.read_text() == kernel_source(spec) == k1.source

    # launches with the same spec reuse it; nothing is regenerated
    q, k, v = make_qkv(1, 2, 1, 9, 9, 16, 16, torch.float32)
    index, valid = random_slots(1, 2, 9, 9, 3, True)
    spt_forward(q, k, v, index, valid, None, causal=True, block_m=8, block_k=4)
    spt_forward(q, k, v, index, valid, None, causal=True, block_m=8, block_k=4)
    info = cache_info()
    assert (info.hits, info.generated, info.entries) == (3, 1, 1)

    block = BlockSparseSpec(16, 16, torch.float32, block_m=16, block_n=16)
    assert kernel_key(block) != kernel_key(spec)
    assert get_spt_kernel(block) is not k1 and cache_info().generated == 2


def _uses_only_builtins(src):
    # jit helpers of triton.language.standard break interpreted kernels (see spt_templates.py)
    for helper in ("tl.sum(", "tl.max(", "tl.zeros(", "tl.sigmoid(", "tl.cdiv(", "tl.softmax("):
        assert helper not in src, helper
    assert src.count("tl.standard.") == 2  # only in the interpreter's combine-function switch


def test_token_source_is_specialised():
    base = TokenSparseSpec(head_dim=64, v_head_dim=64)
    plain = kernel_source(base)
    causal = kernel_source(TokenSparseSpec(64, 64, causal=True))
    masked = kernel_source(TokenSparseSpec(64, 64, mask="additive", mask_grad=True))
    delta = kernel_source(TokenSparseSpec(64, 64, precomputed_delta=True))
    # the causal test sits in every slot loop (fwd, in-kernel D_i pass, bwd), nowhere else
    assert "(Lk - Lq)" not in plain and causal.count("(Lk - Lq)") == causal.count("for s0 in range") == 3
    assert "mask_ptr" not in plain and "mask_ptr" in masked
    assert "ds_ptr" not in plain and "tl.store(ds_rows" in masked
    # in-kernel D_i pass (three slot loops: fwd, D_i, bwd) vs loading D_i
    assert plain.count("for s0 in range") == 3 and delta.count("for s0 in range") == 2
    assert "delta_ptr" in delta and "delta_ptr" not in plain
    assert len({kernel_key(TokenSparseSpec(64, 64, **kw)) for kw in (
        {}, dict(causal=True), dict(mask="additive"), dict(block_k=32), dict(dtype=torch.bfloat16))}) == 5
    for src in (plain, causal, masked, delta):
        _uses_only_builtins(src)
        compile(src, "<generated>", "exec")
        # no runtime branch inside the kernels (module level: the REDUCTIONS mode switch)
        assert not any(line.startswith(" ") and line.strip().startswith("if ") for line in src.splitlines())


def test_block_source_is_specialised():
    plain = kernel_source(BlockSparseSpec(64, 64))
    full = kernel_source(BlockSparseSpec(64, 64, causal=True, key_padding=True))
    fp32 = kernel_source(BlockSparseSpec(64, 64, dtype=torch.float32))
    assert "(Lk - Lq)" not in plain and "(Lk - Lq)" in full
    assert "kpm_ptr" not in plain and "kpm_ptr" in full
    assert 'input_precision="ieee"' in fp32 and "input_precision" not in plain
    assert "tl.atomic_add" in plain and "tl.dot" in plain
    for src in (plain, full, fp32):
        _uses_only_builtins(src)
        compile(src, "<generated>", "exec")
        # no runtime branch: the loops run over the compacted selection's tiles (what lets Triton pipeline them)
        assert not any(line.startswith(" ") and line.strip().startswith("if ") for line in src.splitlines())


def _ptr_type(name, dtype):
    elem = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    if name in ("idx_ptr", "bidx_ptr", "bcnt_ptr"):
        return "*i32"
    if name in ("valid_ptr", "bval_ptr", "kpm_ptr"):
        return "*u8"
    if name in ("lse_ptr", "delta_ptr", "dk_ptr", "dv_ptr", "ds_ptr", "mask_ptr"):
        return "*fp32"
    return "*" + elem


SM90_SPECS = {
    "token-fp16": TokenSparseSpec(64, 64, torch.float16, causal=True, mask="additive", mask_grad=True,
                                  block_m=8, block_k=16),
    "block-bf16": BlockSparseSpec(128, 128, torch.bfloat16, causal=True, key_padding=True, tile_m=64, tile_n=32),
}


def compile_for_sm90(spec_id: str) -> None:
    """Ahead-of-time compile of both kernels of SM90_SPECS[spec_id] for an H100 target (run in a fresh process
    without the interpreter: this module turns TRITON_INTERPRET on at import, and triton >= 3.9's gluon import
    asserts when the real frontend runs in an interpreter-mode process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = SM90_SPECS[spec_id]
    kernels = get_spt_kernel(spec)
    blocks = dict(BLOCK_D=spec.block_d, BLOCK_DV=spec.block_dv, HEAD_DIM=spec.head_dim, V_HEAD_DIM=spec.v_head_dim)
    if isinstance(spec, TokenSparseSpec):
        blocks.update(BLOCK_M=spec.block_m, BLOCK_K=spec.block_k)
    else:
        blocks.update(MAP_M=spec.block_m, BLOCK_N=spec.block_n, TILE_M=spec.tile_m, TILE_N=spec.tile_n)
    for fn in (kernels.entry("fwd"), kernels.entry("bwd")):
        sig = {
            a: "constexpr" if a in blocks else _ptr_type(a, spec.dtype) if a.endswith("_ptr")
            else "fp32" if a == "sm_scale" else "i32"
            for a in fn.arg_names
        }
        out = triton.compile(ASTSource(fn, sig, constexprs=blocks), target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": 4})
        assert "ttgir" in out.asm
    print("sm90 ok")


@needs_triton
@pytest.mark.wide  # the default suite compiles every family, with ptxas figures, in tests/kernels/test_sm90_all.py
@pytest.mark.parametrize("spec_id", sorted(SM90_SPECS))
def test_compiles_for_sm90_without_a_gpu(tmp_path, spec_id):
    """The real (non-interpreter) frontend accepts both kernels (ahead-of-time compile for
    an H100 target): catches what the interpreter lets through (dot dtypes, branches)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no ASTSource/GPUTarget")
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "TRITON_INTERPRET": "0", "SPARSIFY_CACHE_DIR": str(tmp_path),
           "PYTHONWARNINGS": "ignore"}
    script = f"import sys; sys.path[:0] = [{here!r}, {TESTS!r}]; import test_spt_kernels as t; t.compile_for_sm90({spec_id!r})"
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    if run.returncode != 0 and "ptxas" in run.stderr.lower():  # only a missing CUDA toolchain is tolerated
        pytest.skip(f"no usable ptxas: {run.stderr[-500:]}")
    assert run.returncode == 0 and "sm90 ok" in run.stdout, run.stderr[-3000:]


@needs_triton
def test_interpreter_works_when_triton_was_imported_first(tmp_path):
    """triton.language imported (compiled mode) before TRITON_INTERPRET=1: the kernels' reductions
    (tl.reduce with triton's combine functions) must still run interpreted."""
    script = tmp_path / "late.py"
    script.write_text(
        "import os, torch, triton, triton.language as tl\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from sparsify.codegen.spt_attention import spt_forward, block_sparse_forward, dense_block_map\n"
        "import torch.nn.functional as F\n"
        "q, k, v = torch.randn(1, 2, 18, 16), torch.randn(1, 2, 18, 16), torch.randn(1, 2, 18, 16)\n"
        "ref = F.scaled_dot_product_attention(q, k, v)\n"
        "idx = torch.arange(18, dtype=torch.int32).expand(1, 2, 18, 18)\n"
        "out, _ = spt_forward(q, k, v, idx, None, None)\n"
        "torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)\n"
        "bi, bv = dense_block_map(18, 18, 16, 16)\n"
        "out, _ = block_sparse_forward(q, k, v, bi, bv, block_m=16, block_n=16)\n"
        "torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)\n"
    )
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    subprocess.run([sys.executable, str(script)], check=True, cwd=ROOT, env=env, timeout=120)


# --- validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (TokenSparseSpec, dict(head_dim=64, v_head_dim=64, dtype=torch.float64)),
        (TokenSparseSpec, dict(head_dim=0, v_head_dim=64)),
        (TokenSparseSpec, dict(head_dim=64, v_head_dim=512)),
        (TokenSparseSpec, dict(head_dim=64, v_head_dim=64, block_k=12)),
        (TokenSparseSpec, dict(head_dim=64, v_head_dim=64, mask="bool")),
        (TokenSparseSpec, dict(head_dim=64, v_head_dim=64, mask_grad=True)),
        (TokenSparseSpec, dict(head_dim=64, v_head_dim=64, causal=1)),
        (BlockSparseSpec, dict(head_dim=64, v_head_dim=64, block_m=8)),
        (BlockSparseSpec, dict(head_dim=64, v_head_dim=64, block_n=48)),
        (BlockSparseSpec, dict(head_dim=64, v_head_dim=64, block_m=32, tile_m=64)),
        (BlockSparseSpec, dict(head_dim=64, v_head_dim=64, tile_n=8)),
    ],
)
def test_specs_reject_bad_fields(cls, kwargs):
    with pytest.raises(ValueError):
        cls(**kwargs)


def test_inputs_are_validated():
    q, k, v = make_qkv(1, 4, 2, 8, 8, 16, 16, torch.float32)
    idx = torch.zeros(1, 4, 8, 2, dtype=torch.int32)
    lse = torch.zeros(1, 4, 8)
    cases = [
        (lambda: spt_forward(q.double(), k.double(), v.double(), idx), "dtype"),
        (lambda: spt_forward(q, k.half(), v, idx), "dtype"),
        (lambda: spt_forward(q, k[:, :, :, :8], v, idx), "k has shape"),
        (lambda: spt_forward(q, k, v[:, :, :5], idx), "v has shape"),
        (lambda: spt_forward(q, k[:, :1].expand(1, 3, 8, 16), v[:, :1].expand(1, 3, 8, 16), idx), "multiple"),
        (lambda: spt_forward(q[0], k, v, idx), "4-D"),
        (lambda: spt_forward(q, k, v, idx.float()), "index has dtype"),
        (lambda: spt_forward(q, k, v, torch.zeros(1, 4, 7, 2, dtype=torch.int32)), "not broadcastable"),
        (lambda: spt_forward(q, k, v, idx, idx), "valid has dtype"),
        (lambda: spt_forward(q, k, v, idx, None, torch.zeros(3, 8)), "mask has shape"),
        (lambda: spt_forward(q, k, v, idx, None, torch.zeros(8, 8, dtype=torch.int32)), "mask must be"),
        (lambda: spt_forward(torch.randn(1, 1, 8, 300), torch.randn(1, 1, 8, 300), torch.randn(1, 1, 8, 300),
                             torch.zeros(1, 1, 8, 2, dtype=torch.int32)), "head dim"),
        (lambda: spt_backward(torch.zeros(1, 4, 8, 15), q, k, v, idx, None, None, lse), "grad_out"),
        (lambda: spt_backward(torch.zeros(1, 4, 8, 16), q, k, v, idx, None, None, lse.half()), "lse"),
        (lambda: spt_backward(torch.zeros(1, 4, 8, 16), q, k, v, idx, None, None, lse, mask_grad=True), "mask_grad"),
        (lambda: block_sparse_forward(q, k, v, idx, block_m=24, block_n=16), "block_m"),
        (lambda: block_sparse_forward(q, k, v, torch.zeros(1, 4, 3, 1, dtype=torch.int32), block_m=16,
                                      block_n=16), "block_index has shape"),
        (lambda: block_sparse_forward(q, k, v, torch.zeros(1, 1, dtype=torch.int32), block_m=16, block_n=16,
                                      key_padding_mask=torch.ones(2, 9)), "key_padding_mask"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()


# --- real GPU ---------------------------------------------------------------------------------------

def _gpu_close(got, ref, dtype, what):
    """Max error relative to the reference's magnitude (16-bit inputs, fp32 accumulation)."""
    tol = 2e-2 if dtype == torch.float16 else 5e-2
    err = (got.float() - ref.float()).abs().max().item()
    scale = max(1e-3, ref.float().abs().max().item())
    assert err <= tol * scale, f"{what}: max err {err:.3g} vs max |ref| {scale:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCuda:
    N = 1024

    @pytest.fixture(autouse=True)
    def _compiled(self, monkeypatch):
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # compiled kernels, not the interpreter

    @pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("fp16", "bf16"))
    @pytest.mark.parametrize("D", (64, 128))
    def test_token(self, dtype, D):
        B, H, Hkv, L = 1, 4, 2, self.N
        keep = L // 8
        q, k, v = make_qkv(B, H, Hkv, L, L, D, D, dtype, device="cuda", seed=21)
        index, valid = random_slots(B, H, L, L, keep, True, seed=22, empty_rows=(5,))
        index, valid = index.cuda(), valid.cuda()
        mask = torch.zeros(B, 1, 1, L, device="cuda")
        mask[..., :4] = torch.finfo(torch.float32).min  # padded keys
        out, lse = spt_forward(q, k, v, index, valid, mask, causal=True)
        do = torch.randn(B, H, L, D, device="cuda").to(dtype)
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = token_reference(*leaves, index, valid, mask, D ** -0.5, True)
        ref_out.backward(do.float())
        _gpu_close(out, ref_out, dtype, "out")
        fin = torch.isfinite(ref_lse)
        assert torch.equal(fin, torch.isfinite(lse))
        _gpu_close(lse[fin], ref_lse[fin], dtype, "lse")
        for extra in (dict(), dict(out=out)):
            grads = spt_backward(do, q, k, v, index, valid, mask, lse, causal=True, **extra)
            for name, got, leaf in zip(("dq", "dk", "dv"), grads, leaves):
                assert got.dtype == dtype
                _gpu_close(got, leaf.grad, dtype, name)

    @pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("fp16", "bf16"))
    @pytest.mark.parametrize("D", (64, 128))
    def test_block(self, dtype, D):
        B, H, Hkv, L = 2, 4, 2, self.N
        bm = bn = 64
        q, k, v = make_qkv(B, H, Hkv, L, L, D, D, dtype, device="cuda", seed=23)
        do = torch.randn(B, H, L, D, device="cuda").to(dtype)
        # every block selected == SDPA (causal)
        bi, bv = dense_block_map(L, L, bm, bn, causal=True, device="cuda")
        kw = dict(block_m=bm, block_n=bn, causal=True)
        out, lse = block_sparse_forward(q, k, v, bi, bv, **kw)
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
        ref.backward(do.float())
        _gpu_close(out, ref, dtype, "out (dense)")
        for name, got, leaf in zip(("dq", "dk", "dv"), block_sparse_backward(do, q, k, v, bi, bv, lse, **kw), leaves):
            _gpu_close(got, leaf.grad, dtype, name + " (dense)")

        # random selection of 1/4 of the key blocks + key padding, vs masked dense attention
        block_index, block_valid = random_block_map(B, H, L, L, L // bn // 4, True, 24, bm, bn)
        kpm = torch.ones(B, L, dtype=torch.bool)
        kpm[1, :100] = False
        allowed = block_map_to_dense(block_index, block_valid, L, L, True, kpm, bm, bn).cuda()
        block_index, block_valid, kpm = block_index.cuda(), block_valid.cuda(), kpm.cuda()
        kw["key_padding_mask"] = kpm
        out, lse = block_sparse_forward(q, k, v, block_index, block_valid, **kw)
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = dense_reference(*leaves, allowed, D ** -0.5)
        ref_out.backward(do.float())
        _gpu_close(out, ref_out, dtype, "out")
        for extra in (dict(), dict(out=out)):
            grads = block_sparse_backward(do, q, k, v, block_index, block_valid, lse, **kw, **extra)
            for name, got, leaf in zip(("dq", "dk", "dv"), grads, leaves):
                _gpu_close(got, leaf.grad, dtype, name)


def test_block_backward_cuda_path_reads_the_saved_output(interpreter):
    """The op's CUDA registration (run here under the interpreter on CPU tensors) hands the forward's output to the
    kernel (D_i from rowsum(dO * O)); its gradients equal the reference's."""
    from sparsify.ops.cuda import _block_sparse_attention_backward_cuda
    from sparsify.ops.spt_block import block_sparse_attention_backward_reference, block_sparse_attention_reference
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=g) for _ in range(3))
    n = 2
    index = torch.arange(n, dtype=torch.int32).expand(n, n)[None, None]
    valid = torch.ones(1, 1, n, n, dtype=torch.bool)
    out, lse, seed = block_sparse_attention_reference(q, k, v, index, valid, 16, None, 0.25, True, 0.0)
    do = torch.randn(out.shape, generator=g)
    needs = [True, True, True, False]
    want = block_sparse_attention_backward_reference(do, q, k, v, index, valid, 16, None, lse, seed, 0.25, True, 0.0,
                                                     needs)
    got = _block_sparse_attention_backward_cuda(do, q, k, v, index, valid, 16, None, lse, seed, 0.25, True, 0.0,
                                                needs, out)
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _hf_padding_mask(B, Lq, Lk, float_mask, pad_rows):
    """A padded HF batch's 4-d mask [B, 1, Lq, Lk] (causal, bottom-right, batch 1 left-padded by 5): additive
    finfo.min or bool True = attend; pad_rows: the padded query rows see nothing allowed (every key masked)."""
    keep = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq).expand(B, 1, Lq, Lk).clone()
    keep[1, :, :, :5] = False
    if pad_rows:  # left-padded queries of eager attention: rows 0-2 of batch 1 see no key at all
        keep[1, :, :3, :] = False
    if not float_mask:
        return keep
    return torch.zeros(B, 1, Lq, Lk).masked_fill(~keep, torch.finfo(torch.float32).min)


@needs_triton
@pytest.mark.parametrize("mask_kind", ["bool", "float", "float-broadcast-2d", "float-absorbed-rows",
                                       "float-needs-grad"])
def test_block_kernel_takes_a_mask_tensor(interpreter, mask_kind):
    """The op's CUDA registrations (run here under the interpreter on CPU tensors) with a mask tensor: the kernel
    reads a mask tile per visited key tile (a padded HF batch no longer sends the op to its reference); forward and
    backward equal the reference's. Rows whose every key carries finfo.min, and a float mask that needs a gradient,
    take the reference in backward (the kernel's lse cannot renormalise them / it has no mask gradient)."""
    from sparsify.ops.cuda import _block_sparse_attention_backward_cuda, _block_sparse_attention_cuda
    from sparsify.ops.spt_block import block_sparse_attention_backward_reference, block_sparse_attention_reference
    B, H, Lq, Lk, D, blk = 2, 2, 40, 45, 16, 16
    q, k, v = make_qkv(B, H, 1, Lq, Lk, D, D, torch.float32, seed=31)
    index, valid = random_block_map(B, H, Lq, Lk, kb=2, causal=True, seed=32, bm=blk, bn=blk)
    if mask_kind == "float-broadcast-2d":  # an additive bias shared by batch and heads (ALiBi-like), no -inf
        mask = -0.1 * (torch.arange(Lk)[None, :] - torch.arange(Lq)[:, None]).abs().float()
    else:
        mask = _hf_padding_mask(B, Lq, Lk, mask_kind != "bool", pad_rows=mask_kind == "float-absorbed-rows")
    from sparsify.codegen import cache_info

    def launches():
        info = cache_info()
        return info.hits + info.misses

    args = (index, valid, blk, mask, D ** -0.5, True, 0.0)
    before = launches()
    got_out, got_lse, seed = _block_sparse_attention_cuda(q, k, v, *args)
    assert launches() > before  # the kernel ran, not the reference
    want_out, want_lse, _ = block_sparse_attention_reference(q, k, v, *args)
    torch.testing.assert_close(got_out, want_out, atol=1e-4, rtol=1e-4)
    finite = want_lse.isfinite() & (want_lse > -1e30)
    torch.testing.assert_close(got_lse[finite], want_lse[finite], atol=1e-4, rtol=1e-4)
    do = torch.randn(got_out.shape, generator=torch.Generator().manual_seed(33))
    needs = [True, True, True, mask_kind == "float-needs-grad"]
    back = (index, valid, blk, mask, want_lse, seed, D ** -0.5, True, 0.0, needs)
    want = block_sparse_attention_backward_reference(do, q, k, v, *back)
    before = launches()
    got = _block_sparse_attention_backward_cuda(do, q, k, v, *back, got_out)
    assert (launches() > before) == (mask_kind in ("bool", "float", "float-broadcast-2d"))
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), got, want):
        if needs[("dq", "dk", "dv", "dmask").index(name)]:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)


@needs_triton
@pytest.mark.parametrize("mask_kind", [None, "float"])
def test_block_kernel_dropout_is_the_reference_draw(interpreter, mask_kind):
    """Dropout in the block kernels: drawn in-kernel (Philox at each pair's offset), the same draw as the op's
    reference (ops/_vjp.py philox_dropout_scale), so the CUDA registrations' forward and backward equal the
    reference's under one seed, and the kernel, not the reference, ran."""
    from sparsify.codegen import cache_info
    from sparsify.ops.cuda import _block_sparse_attention_backward_cuda, _block_sparse_attention_cuda
    from sparsify.ops.spt_block import block_sparse_attention_backward_reference, block_sparse_attention_reference
    B, H, Lq, Lk, D, blk, p = 2, 2, 40, 45, 16, 16, 0.3
    q, k, v = make_qkv(B, H, 1, Lq, Lk, D, D, torch.float32, seed=41)
    index, valid = random_block_map(B, H, Lq, Lk, kb=2, causal=True, seed=42, bm=blk, bn=blk)
    mask = None if mask_kind is None else _hf_padding_mask(B, Lq, Lk, True, pad_rows=False)
    args = (index, valid, blk, mask, D ** -0.5, True, p)
    before = cache_info().hits + cache_info().misses
    torch.manual_seed(5)  # each draws its seed from the global RNG: the same one
    got_out, got_lse, seed = _block_sparse_attention_cuda(q, k, v, *args)
    assert cache_info().hits + cache_info().misses > before
    torch.manual_seed(5)
    want_out, want_lse, want_seed = block_sparse_attention_reference(q, k, v, *args)
    assert int(seed) == int(want_seed) != 0
    torch.testing.assert_close(got_out, want_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-4, rtol=1e-4)
    do = torch.randn(got_out.shape, generator=torch.Generator().manual_seed(43))
    needs = [True, True, True, False]
    back = (index, valid, blk, mask, want_lse, seed, D ** -0.5, True, p, needs)
    want = block_sparse_attention_backward_reference(do, q, k, v, *back)
    before = cache_info().hits + cache_info().misses
    got = _block_sparse_attention_backward_cuda(do, q, k, v, *back, got_out)
    assert cache_info().hits + cache_info().misses > before
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
    # and the draw matters: without dropout the output differs
    no_drop = block_sparse_attention_reference(q, k, v, index, valid, blk, mask, D ** -0.5, True, 0.0)[0]
    assert not torch.allclose(want_out, no_drop)


PHILOX_CHECK = '''
import torch, triton, triton.language as tl
from sparsify.ops._vjp import philox_uniform

@triton.jit
def draw(out_ptr, seed, base, N: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, N), tl.rand(seed, base + tl.arange(0, N).to(tl.int64)))

for seed in (0, 7, 2**40 + 5, 2**62 - 3):
    for base in (0, 1000, 2**33 + 17):
        out = torch.empty(256)
        draw[(1,)](out, seed, base, N=256)
        assert torch.equal(out, philox_uniform(seed, base + torch.arange(256, dtype=torch.int64))), (seed, base)
print("philox ok")
'''


@needs_triton
def test_reference_dropout_draw_is_triton_rand_bit_for_bit():
    """ops/_vjp.py philox_uniform, the reference's dropout draw, against Triton's own tl.rand (in a fresh process
    under the interpreter: triton.language's @jit helpers are decorated in the mode of its first import), offsets
    past 2^32 included: the kernels' in-kernel Philox is tl.rand written out, so the three agree."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", PHILOX_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "philox ok" in run.stdout, run.stderr[-2000:]


@needs_triton
@pytest.mark.parametrize("with_mask", [False, True])
def test_token_kernel_dropout_is_the_reference_draw(interpreter, with_mask):
    """Token mode's dropout in the kernels (Philox at each kept slot's offset in [B, H, Lq, keep]): the CUDA
    registrations' forward and backward equal the op's reference under one seed, and the kernels ran."""
    from sparsify.codegen import cache_info
    from sparsify.ops.cuda import _spt_attention_backward_cuda, _spt_attention_cuda
    from sparsify.ops.spt import spt_attention_backward_reference, spt_attention_reference
    B, H, Lq, Lk, D, keep, p = 2, 2, 12, 20, 16, 6, 0.3
    q, k, v = make_qkv(B, H, 1, Lq, Lk, D, D, torch.float32, seed=51)
    g = torch.Generator().manual_seed(52)
    index = torch.randint(0, Lk, (B, H, Lq, keep), generator=g, dtype=torch.int32)
    valid = torch.rand(B, H, Lq, keep, generator=g) > 0.2
    mask = torch.randn(B, 1, Lq, Lk, generator=g) if with_mask else None
    args = (index, valid, mask, D ** -0.5, p)

    def launches():
        return cache_info().hits + cache_info().misses

    before = launches()
    torch.manual_seed(5)  # each draws its seed from the global RNG: the same one
    got_out, got_lse, seed = _spt_attention_cuda(q, k, v, *args)
    assert launches() > before
    torch.manual_seed(5)
    want_out, want_lse, want_seed = spt_attention_reference(q, k, v, *args)
    assert int(seed) == int(want_seed) != 0
    torch.testing.assert_close(got_out, want_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-4, rtol=1e-4)
    do = torch.randn(got_out.shape, generator=g)
    needs = [True, True, True, with_mask]
    back = (index, valid, mask, want_lse, seed, D ** -0.5, p, needs)
    want = spt_attention_backward_reference(do, q, k, v, *back)
    before = launches()
    got = _spt_attention_backward_cuda(do, q, k, v, *back)
    assert launches() > before
    for name, a, b, need in zip(("dq", "dk", "dv", "dmask"), got, want, needs):
        if need:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
    no_drop = spt_attention_reference(q, k, v, index, valid, mask, D ** -0.5, 0.0)[0]
    assert not torch.allclose(want_out, no_drop)
