"""Tests for the SPT ops (sparsify/ops/key_select.py, sparsify/ops/spt.py): pq_encode, pq_select,
spt_attention (+ backward), codebook_loss, aux_loss, selection_recall, FLOP formulas.

What is checked:
  * torch.library.opcheck on every op (schema, fake kernel, autograd registration, AOT dispatch);
  * pq_encode / pq_select against brute-force loops, deterministic ties, short rows masked (no duplicates),
    with `allowed` masks of every broadcast shape (key padding, per row, per head, shared over the batch) and
    the structured ones of real models (sliding window, packed sequences, KV-cache decode aligned bottom-right);
  * spt_attention == SDPA with a boolean mask allowing exactly the selected pairs (plus the float mask),
    forward and gradients, over hypothesis-drawn shapes, GQA, causal, selection masks and dtypes;
  * keep == Lk equals dense attention (sparsify::attention and SDPA), forward and gradients, also when the
    structured mask is the selection's `allowed` and the attention's mask;
  * float64 gradcheck through the registered autograd (GQA, float mask with grad, invalid slots, causal, dropout);
  * dropout: drop rate, seeded replay in backward, reproducibility;
  * codebook loss value and gradient flow; aux_loss gradient injection == task + weight * aux in eager;
  * memory: bytes saved for backward, measured with saved_tensors_hooks, against eager attention;
  * FLOP formulas under FlopCounterMode; a torch.compile(aot_eager) smoke test.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import sparsify.ops  # noqa: F401  (registers sparsify::attention, the dense op)
import sparsify.ops.key_select as key_select
import sparsify.ops.aux_loss as aux_loss_ops
from sparsify.ops._vjp import philox_dropout_scale
from op_inputs import (HYP, RANDOM_ALLOWED, STRUCTURED_ALLOWED, allowed_at, gen as _gen, opcheck_ok as _ok,
                       qkv as _qkv, randn as _randn, random_allowed, structured_allowed)

pq_encode = torch.ops.sparsify.pq_encode
pq_select = torch.ops.sparsify.pq_select
spt_attention = torch.ops.sparsify.spt_attention
spt_backward = torch.ops.sparsify.spt_attention_backward
aux_loss = torch.ops.sparsify.aux_loss


def _random_pattern(g, b, h, hkv, lq, lk, keep, causal, m=2, e=4, allowed=None):
    """index / valid from pq_select over random codes (few codewords, so many ties)."""
    qc = torch.randint(0, e, (b, h, lq, m), generator=g, dtype=torch.int32)
    kc = torch.randint(0, e, (b, hkv, lk, m), generator=g, dtype=torch.int32)
    return pq_select(qc, kc, keep, causal, allowed)


def allowed_mask(index, valid, lk):
    """[B, H, Lq, Lk] bool: True exactly at the selected (valid) pairs."""
    out = torch.zeros(*index.shape[:-1], lk + 1, dtype=torch.bool)
    out.scatter_(-1, torch.where(valid, index.long(), lk), True)
    return out[..., :lk]


def sdpa_on_pattern(q, k, v, index, valid, mask, scale):
    """SDPA over repeated KV heads with a mask allowing exactly the selected pairs (float mask added)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    allowed = allowed_mask(index, valid, k.shape[2])
    if mask is None:
        attn_mask = allowed
    elif mask.dtype == torch.bool:
        attn_mask = allowed & mask
    else:
        attn_mask = mask.expand(allowed.shape).masked_fill(~allowed, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def sparse_reference(q, k, v, index, valid, mask, scale, dropout_p, seed):
    """Independent plain-torch autograd reference on the kept slots, with the same seeded dropout draw."""
    b, h, lq, d = q.shape
    groups = h // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    idx = index.long()
    kg = torch.stack([k[bi, hi][idx[bi, hi]] for bi in range(b) for hi in range(h)]).reshape(*idx.shape, d)
    vg = torch.stack([v[bi, hi][idx[bi, hi]] for bi in range(b) for hi in range(h)]).reshape(*idx.shape, -1)
    s = (q.unsqueeze(-2) * kg).sum(-1) * scale
    if mask is not None:
        mg = mask.expand(b, h, lq, k.shape[2]).gather(-1, idx)
        s = s.masked_fill(~mg, float("-inf")) if mask.dtype == torch.bool else s + mg
    s = s.masked_fill(~valid, float("-inf"))
    empty = torch.isneginf(s).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    drop = philox_dropout_scale(p.shape, p.dtype, p.device, dropout_p, seed)  # the op's (and kernels') draw
    p = p if drop is None else p * drop
    return (p.unsqueeze(-1) * vg).sum(-2)


# ---------------------------------------------------------------------------------------------
# 1. opcheck
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_pq_encode(requires_grad):
    g = _gen(0)
    x = _randn(g, 2, 3, 5, 16, requires_grad=requires_grad)
    cb = _randn(g, 2, 16, 8, requires_grad=requires_grad)
    assert _ok(torch.library.opcheck(pq_encode.default, (x, cb)))
    xt = _randn(g, 2, 5, 3, 16).transpose(1, 2)  # HF [B, L, H, D] view
    assert _ok(torch.library.opcheck(pq_encode.default, (xt, _randn(g, 4, 8, 4))))


@pytest.mark.parametrize("h,hkv,causal,allowed_kind", [(2, 2, False, None), (4, 2, True, "rows"), (4, 1, True, "keys"),
                                                      (4, 2, False, "heads"), (2, 1, True, "shared")])
def test_opcheck_pq_select(h, hkv, causal, allowed_kind):
    g = _gen(1)
    qc = torch.randint(0, 4, (2, h, 5, 2), generator=g, dtype=torch.int32)
    kc = torch.randint(0, 4, (2, hkv, 7, 2), generator=g, dtype=torch.int32)
    allowed = random_allowed(g, allowed_kind, 2, h, 5, 7)
    assert _ok(torch.library.opcheck(pq_select.default, (qc, kc, 3, causal, allowed)))


SPT_OPCHECK_CASES = {
    "plain": dict(h=2, hkv=2, causal=False, mask=None),
    "gqa_causal": dict(h=4, hkv=2, causal=True, mask=None),
    "float_mask_grad": dict(h=4, hkv=1, causal=False, mask="float"),
    "bool_mask": dict(h=2, hkv=1, causal=True, mask="bool"),
}


def _spt_case(g, h, hkv, causal, mask, b=2, lq=5, lk=6, d=8, keep=3, dtype=torch.float32, requires_grad=True):
    q, k, v = _qkv(g, b, h, hkv, lq, lk, d, dv=4, dtype=dtype, requires_grad=requires_grad)
    index, valid = _random_pattern(g, b, h, hkv, lq, lk, keep, causal)
    if mask == "float":
        m = _randn(g, 1, h, lq, lk, dtype=dtype, requires_grad=requires_grad)
    elif mask == "bool":
        m = torch.rand(b, 1, lq, lk, generator=g) < 0.7
    else:
        m = None
    return q, k, v, index, valid, m


@pytest.mark.parametrize("case", list(SPT_OPCHECK_CASES))
def test_opcheck_spt_attention(case):
    args = _spt_case(_gen(2), **SPT_OPCHECK_CASES[case])
    assert _ok(torch.library.opcheck(spt_attention.default, (*args, 0.35, 0.0)))


def test_opcheck_spt_attention_non_contiguous():
    g = _gen(3)
    q = _randn(g, 2, 5, 4, 8).transpose(1, 2).requires_grad_()
    k = _randn(g, 2, 6, 2, 8).transpose(1, 2).requires_grad_()
    v = _randn(g, 2, 6, 2, 8).transpose(1, 2).requires_grad_()
    index, valid = _random_pattern(g, 2, 4, 2, 5, 6, 4, True)
    assert _ok(torch.library.opcheck(spt_attention.default, (q, k, v, index, valid, None, 0.3, 0.0)))


def test_opcheck_spt_attention_backward():
    g = _gen(4)
    q, k, v, index, valid, m = _spt_case(g, 4, 2, True, "float", requires_grad=False)
    out, lse, seed = spt_attention(q, k, v, index, valid, m, 0.5, 0.0)
    grad_out = torch.randn_like(out)
    for needs in ([True, True, True, True], [True, False, True, False], [False, False, False, True]):
        assert _ok(torch.library.opcheck(spt_backward.default,
                                         (grad_out, q, k, v, index, valid, m, lse, seed, 0.5, 0.0, needs)))


def test_opcheck_aux_loss():
    g = _gen(5)
    y = _randn(g, 3, 4, requires_grad=True)
    aux = _randn(g).abs().requires_grad_()
    assert _ok(torch.library.opcheck(aux_loss.default, (y, aux, 0.01, "opcheck")))


# ---------------------------------------------------------------------------------------------
# 2. pq_encode and pq_select against brute force
# ---------------------------------------------------------------------------------------------

def brute_encode(x, cb):
    m, e, dc = cb.shape
    sub = x.double().reshape(*x.shape[:-1], m, 1, dc)
    return (sub - cb.double()).abs().sum(-1).argmin(-1).to(torch.int32)


@given(seed=st.integers(0, 2**16), dc=st.sampled_from([4, 8]), m=st.integers(1, 3), e=st.sampled_from([2, 16]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
@settings(max_examples=25, **HYP)
def test_pq_encode_matches_brute_force(seed, dc, m, e, dtype):
    g = _gen(seed)
    x = _randn(g, 2, 3, 7, m * dc, dtype=dtype)
    cb = _randn(g, m, e, dc)
    codes = pq_encode(x, cb)
    assert codes.dtype == torch.int32 and codes.shape == (2, 3, 7, m)
    assert torch.equal(codes, brute_encode(x.float(), cb))  # half inputs: the codes of their fp32 upcast


def test_pq_encode_ties_pick_lowest_codeword():
    cb = torch.zeros(1, 4, 8)
    cb[0, 1] = 2.0  # x = 1 is at L1 distance 8 from codeword 0 (zeros) and codeword 1 (twos)
    cb[0, 2] = 2.0
    cb[0, 3] = 5.0
    x = torch.ones(1, 1, 2, 8)
    assert pq_encode(x, cb).flatten().tolist() == [0, 0]
    x2 = torch.full((1, 1, 1, 8), 2.0)  # exactly on codewords 1 and 2
    assert pq_encode(x2, cb).flatten().tolist() == [1]


def test_pq_encode_no_gradient_needed():
    x = torch.randn(1, 2, 3, 8, requires_grad=True)
    cb = torch.randn(1, 4, 8, requires_grad=True)
    codes = pq_encode(x, cb)
    assert not codes.requires_grad and codes.grad_fn is None


def code_matches(qi, kj):
    return int((qi == kj).sum())


def brute_select(qc, kc, keep, causal, allowed, score_of=code_matches):
    """Per query row: the candidate keys (allowed[b, h, i, j] broadcast, and j <= i + Lk - Lq if causal: the ops'
    bottom-right alignment, sparsify/ops/causal.py) ranked by
    score_of(query row, key row), ties to the lower index."""
    b, h, lq, _ = qc.shape
    hkv, lk = kc.shape[1], kc.shape[2]
    full = allowed_at(allowed, b, h, lq, lk)
    index = torch.zeros(b, h, lq, keep, dtype=torch.int32)
    valid = torch.zeros(b, h, lq, keep, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hkv)
            for i in range(lq):
                cands = [j for j in range(lk) if (not causal or j <= i + lk - lq) and bool(full[bi, hi, i, j])]
                score = {j: score_of(qc[bi, hi, i], kc[bi, kh, j]) for j in cands}
                chosen = sorted(sorted(cands, key=lambda j: (-score[j], j))[:keep])
                index[bi, hi, i, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
                valid[bi, hi, i, :len(chosen)] = True
    return index, valid


@given(seed=st.integers(0, 2**16), lq=st.integers(1, 12), lk=st.integers(1, 12), data=st.data(),
       groups=st.sampled_from([1, 2]), hkv=st.sampled_from([1, 2]), causal=st.booleans(),
       allowed_kind=st.sampled_from(RANDOM_ALLOWED), m=st.integers(1, 3), e=st.sampled_from([2, 4, 16]))
@settings(max_examples=40, **HYP)
def test_pq_select_matches_brute_force(seed, lq, lk, data, groups, hkv, causal, allowed_kind, m, e):
    g = _gen(seed)
    keep = data.draw(st.integers(1, lk))
    b, h = 2, hkv * groups
    qc = torch.randint(0, e, (b, h, lq, m), generator=g, dtype=torch.int32)
    kc = torch.randint(0, e, (b, hkv, lk, m), generator=g, dtype=torch.int32)
    allowed = random_allowed(g, allowed_kind, b, h, lq, lk)
    index, valid = pq_select(qc, kc, keep, causal, allowed)
    want_index, want_valid = brute_select(qc, kc, keep, causal, allowed)
    assert index.dtype == torch.int32 and valid.dtype == torch.bool
    assert torch.equal(valid, want_valid)
    assert torch.equal(index, want_index)


STRUCTURED_SHAPES = {"window": (10, 10), "packed": (11, 11), "kv_cache": (4, 11)}  # kind -> (Lq, Lk)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", STRUCTURED_ALLOWED)
def test_pq_select_structured_masks_match_brute_force(kind, causal):
    """Sliding window, packed sequences, KV-cache decode (bottom-right): every kept key allowed, row by row.
    causal=True adds the ops' causal j <= i + Lk - Lq (bottom-right, sparsify/ops/causal.py) on top of the mask
    (for the KV cache it is the mask's own alignment, so it removes nothing)."""
    g = _gen(30)
    lq, lk = STRUCTURED_SHAPES[kind]
    b, h, hkv, keep = 2, 4, 2, 4
    qc = torch.randint(0, 3, (b, h, lq, 2), generator=g, dtype=torch.int32)
    kc = torch.randint(0, 3, (b, hkv, lk, 2), generator=g, dtype=torch.int32)
    allowed = structured_allowed(kind, b, lq, lk)
    index, valid = pq_select(qc, kc, keep, causal, allowed)
    want_index, want_valid = brute_select(qc, kc, keep, causal, allowed)
    assert torch.equal(valid, want_valid) and torch.equal(index, want_index)
    # and, independently of the brute force: every kept key is allowed, and short rows keep all they may
    kept = allowed_mask(index, valid, lk)
    visible = allowed.expand(b, h, lq, lk) & (torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq) if causal else True)
    assert not (kept & ~visible).any()
    assert torch.equal(valid.sum(-1), visible.sum(-1).clamp(max=keep))


def test_pq_select_ties_are_deterministic_lowest_index():
    qc = torch.zeros(1, 2, 6, 2, dtype=torch.int32)
    kc = torch.zeros(1, 1, 10, 2, dtype=torch.int32)  # every key scores M: all tied
    kc[0, 0, 7] = 1  # key 7 matches nothing: ranked last
    kv = torch.ones(1, 1, 1, 10, dtype=torch.bool)  # key padding: [B, 1, 1, Lk]
    kv[..., 1] = False
    index, valid = pq_select(qc, kc, 4, False, kv)
    assert valid.all()
    assert (index == torch.tensor([0, 2, 3, 4], dtype=torch.int32)).all()
    again = pq_select(qc, kc, 4, False, kv)
    assert torch.equal(again[0], index) and torch.equal(again[1], valid)
    # a higher score beats a lower index
    kc2 = torch.zeros(1, 1, 10, 2, dtype=torch.int32)
    kc2[0, 0, :8] = 1
    index2, _ = pq_select(qc, kc2, 3, False, None)
    assert index2[0, 0, 0].tolist() == [0, 8, 9]  # keys 8, 9 score 2, then the lowest-index score-0 key (ELL order)


def test_pq_select_short_rows_masked_not_duplicated():
    g = _gen(6)
    lq = lk = 9
    keep = 4
    index, valid = _random_pattern(g, 2, 4, 2, lq, lk, keep, causal=True)
    counts = valid.sum(-1)
    want = torch.clamp(torch.arange(lq) + 1, max=keep)  # causal row i has i + 1 allowed keys
    assert torch.equal(counts, want.expand_as(counts))
    assert torch.all(index[~valid] == 0)
    for row_i, row_v in zip(index.reshape(-1, keep), valid.reshape(-1, keep)):
        kept = row_i[row_v].tolist()
        assert len(set(kept)) == len(kept)  # never a duplicate key
        assert kept == sorted(kept)  # ELL order
    assert torch.all(index <= torch.arange(lq).view(1, 1, lq, 1))  # causal
    # all keys padded for one batch: nothing valid there
    kv = torch.ones(2, 1, 1, lk, dtype=torch.bool)
    kv[1] = False
    _, valid2 = _random_pattern(g, 2, 4, 2, lq, lk, keep, causal=False, allowed=kv)
    assert valid2[0].all() and not valid2[1].any()
    # one query row of one head with nothing allowed (a per-head mask): only that row is empty
    rows = torch.ones(2, 4, lq, lk, dtype=torch.bool)
    rows[0, 3, 5] = False
    _, valid3 = _random_pattern(g, 2, 4, 2, lq, lk, keep, causal=False, allowed=rows)
    assert valid3.sum() == valid3.numel() - keep and not valid3[0, 3, 5].any()


def test_pq_select_bad_inputs():
    qc = torch.zeros(1, 2, 3, 2, dtype=torch.int32)
    kc = torch.zeros(1, 2, 5, 2, dtype=torch.int32)
    for keep in (0, 6):
        with pytest.raises(ValueError, match="keep"):
            pq_select(qc, kc, keep, False, None)
    with pytest.raises(ValueError, match="H % Hkv"):
        pq_select(qc, torch.zeros(1, 3, 5, 2, dtype=torch.int32), 2, False, None)
    with pytest.raises(ValueError, match="integer"):
        pq_select(qc.float(), kc, 2, False, None)
    bad_allowed = [torch.ones(1, 5, dtype=torch.bool),            # the old [B, Lk] key-padding form
                   torch.ones(1, 1, 1, 4, dtype=torch.bool),      # wrong Lk
                   torch.ones(1, 1, 2, 5, dtype=torch.bool),      # Lq neither 1 nor 3
                   torch.ones(1, 3, 1, 5, dtype=torch.bool),      # H neither 1 nor 2
                   torch.ones(2, 1, 1, 5, dtype=torch.bool),      # B = 2, the batch is 1
                   torch.ones(1, 1, 3, 5),                        # not bool
                   torch.ones(1, 1, 1, 3, 5, dtype=torch.bool)]   # 5 dims
    for allowed in bad_allowed:
        with pytest.raises(ValueError, match="allowed must be a bool mask broadcastable to \\[B, H, Lq, Lk\\]"):
            pq_select(qc, kc, 2, False, allowed)
    with pytest.raises(ValueError, match="M \\* dc"):
        pq_encode(torch.zeros(1, 1, 2, 12), torch.zeros(2, 4, 8))


# ---------------------------------------------------------------------------------------------
# 3. spt_attention == SDPA on the selected pattern (hypothesis)
# ---------------------------------------------------------------------------------------------

TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
}


@given(seed=st.integers(0, 2**16), lq=st.integers(1, 12), lk=st.integers(1, 12), data=st.data(),
       d=st.sampled_from([8, 16]), dc=st.sampled_from([4, 8]), dv=st.sampled_from([None, 8]),
       groups=st.sampled_from([1, 2]), hkv=st.sampled_from([1, 2]), causal=st.booleans(),
       allowed_kind=st.sampled_from(RANDOM_ALLOWED), mask_kind=st.sampled_from([None, "bool", "float"]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
@settings(max_examples=60, **HYP)
def test_spt_attention_matches_sdpa_on_pattern(seed, lq, lk, data, d, dc, dv, groups, hkv, causal,
                                               allowed_kind, mask_kind, dtype):
    g = _gen(seed)
    keep = data.draw(st.integers(1, lk))
    b, h = 2, hkv * groups
    q, k, v = _qkv(g, b, h, hkv, lq, lk, d, dv=dv, dtype=dtype)
    cb = _randn(g, d // dc, 4, dc)
    allowed = random_allowed(g, allowed_kind, b, h, lq, lk)
    index, valid = pq_select(pq_encode(q, cb), pq_encode(k, cb), keep, causal, allowed)
    if mask_kind == "bool":
        mask = torch.rand(b, 1, lq, lk, generator=g) < 0.8
    elif mask_kind == "float":
        mask = _randn(g, 1, h, lq, lk, dtype=dtype, requires_grad=True)
    else:
        mask = None
    scale = 1.0 / math.sqrt(d)
    out, lse, _ = spt_attention(q, k, v, index, valid, mask, scale, 0.0)
    assert out.dtype == dtype and out.shape == (b, h, lq, dv or d)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not lse.requires_grad
    assert torch.isfinite(out).all()
    # the reference in fp64 for every dtype: SDPA's own half-precision rounding is not the subject here
    up = [t.detach().double().requires_grad_(t.requires_grad) for t in (q, k, v)]
    mask_up = mask.detach().double().requires_grad_() if mask_kind == "float" else mask
    ref = sdpa_on_pattern(*up, index, valid, mask_up, scale)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    if dtype not in (torch.float32, torch.float64):
        return
    grad_out = _randn(g, *out.shape, dtype=dtype)
    leaves = [q, k, v] + ([mask] if mask_kind == "float" else [])
    ref_leaves = up + ([mask_up] if mask_kind == "float" else [])
    got = torch.autograd.grad(out, leaves, grad_out)
    want = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    for a, w in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), w, **TOL[dtype])


@pytest.mark.parametrize("causal,mask_kind,hkv", [(False, None, 2), (True, None, 1), (False, "float", 2),
                                                  (True, "float", 1), (True, "bool", 2)])
def test_keep_all_equals_dense_attention(causal, mask_kind, hkv):
    """keep == Lk selects every allowed key: the result is dense attention, forward and gradients."""
    g = _gen(7)
    b, h, lq, lk, d = 2, 4, 7, 7, 16
    q, k, v = _qkv(g, b, h, hkv, lq, lk, d)
    cb = _randn(g, 2, 16, 8)
    index, valid = pq_select(pq_encode(q, cb), pq_encode(k, cb), lk, causal, None)
    if mask_kind == "float":
        mask = _randn(g, b, 1, lq, lk, requires_grad=True)
    elif mask_kind == "bool":
        mask = torch.rand(b, 1, lq, lk, generator=g) < 0.7
    else:
        mask = None
    out, _, _ = spt_attention(q, k, v, index, valid, mask, 0.25, 0.0)
    dense, _ = torch.ops.sparsify.attention(q, k, v, mask, 0.25, 0.0, causal)
    kr, vr = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
    sdpa = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, is_causal=causal, scale=0.25) \
        if not (causal and mask is not None) else None
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, dense, **tol)
    if sdpa is not None:
        torch.testing.assert_close(out, sdpa, **tol)
    leaves = [q, k, v] + ([mask] if mask_kind == "float" else [])
    grad_out = torch.randn_like(out)
    for a, w in zip(torch.autograd.grad(out, leaves, grad_out), torch.autograd.grad(dense, leaves, grad_out)):
        torch.testing.assert_close(a, w, **tol)


@pytest.mark.parametrize("score", ["pq", "exact"])
@pytest.mark.parametrize("kind", STRUCTURED_ALLOWED)
def test_keep_all_with_structured_mask_equals_dense_attention(kind, score):
    """keep == Lk with the region's mask as `allowed` (and as the attention mask): every allowed key of every row
    is kept, so SPT equals dense attention on sliding windows, packed sequences and a KV-cache decode (whose
    bottom-right causality lives only in the mask: causal=False, SDPA's is_causal would be top-left)."""
    g = _gen(31)
    lq, lk = STRUCTURED_SHAPES[kind]
    b, h, hkv, d = 2, 4, 2, 16
    q, k, v = _qkv(g, b, h, hkv, lq, lk, d)
    mask = structured_allowed(kind, b, lq, lk)
    if score == "pq":
        cb = _randn(g, 2, 16, 8)
        index, valid = pq_select(pq_encode(q, cb), pq_encode(k, cb), lk, False, mask)
    else:
        index, valid = torch.ops.sparsify.qk_select(q.detach(), k.detach(), lk, False, mask)
    assert torch.equal(allowed_mask(index, valid, lk), mask.expand(b, h, lq, lk))  # exactly the allowed pairs
    scale = d ** -0.5
    out, _, _ = spt_attention(q, k, v, index, valid, mask, scale, 0.0)
    dense, _ = torch.ops.sparsify.attention(q, k, v, mask, scale, 0.0, False)
    kr, vr = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
    sdpa = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, scale=scale)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, dense, **tol)
    torch.testing.assert_close(out, sdpa, **tol)
    grad_out = torch.randn_like(out)
    for a, w in zip(torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(dense, (q, k, v), grad_out)):
        torch.testing.assert_close(a, w, **tol)


def test_rows_with_nothing_valid_give_zero_and_no_nan():
    g = _gen(8)
    q, k, v = _qkv(g, 2, 2, 1, 4, 5, 8)
    kv = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    kv[1] = False
    index, valid = _random_pattern(g, 2, 2, 1, 4, 5, 2, False, allowed=kv)
    mask = torch.zeros(1, 1, 4, 5)
    mask[..., 2, :] = float("-inf")  # row 2 of batch 0: every kept key masked by the float mask
    mask.requires_grad_()
    out, lse, _ = spt_attention(q, k, v, index, valid, mask, 0.5, 0.0)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    assert torch.equal(out[0, :, 2], torch.zeros_like(out[0, :, 2])) and torch.isneginf(lse[0, :, 2]).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v, mask))
    assert all(torch.isfinite(t).all() for t in grads)
    assert torch.equal(grads[0][1], torch.zeros_like(grads[0][1]))


def test_row_chunking_gives_identical_results(monkeypatch):
    """The references process query rows in chunks; tiny chunks must not change any result."""
    g = _gen(22)
    q, k, v = _qkv(g, 2, 4, 2, 9, 9, 16, dtype=torch.float64)
    cb = _randn(g, 2, 4, 8)
    mask = _randn(g, 1, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    allowed = torch.rand(2, 4, 9, 9, generator=g) < 0.7  # per head and row: each chunk takes its own rows
    allowed[1, ..., -3:] = False

    def run():
        torch.manual_seed(5)
        index, valid = pq_select(pq_encode(q, cb), pq_encode(k, cb), 4, True, allowed)
        out, lse, _ = spt_attention(q, k, v, index, valid, mask, 0.3, 0.2)
        return (index, valid, out, lse, *torch.autograd.grad(out.sum(), (q, k, v, mask)))

    whole = run()
    monkeypatch.setattr(key_select, "_CHUNK_ELEMS", 64)  # a few rows per chunk
    assert len(list(key_select._row_chunks(9, 2 * 4 * 4 * 16))) == 9
    for a, b in zip(run(), whole):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_spt_attention_bad_inputs():
    g = _gen(9)
    q, k, v, index, valid, _ = _spt_case(g, 2, 2, False, None, requires_grad=False)
    with pytest.raises(ValueError, match="valid"):
        spt_attention(q, k, v, index, valid.int(), None, 1.0, 0.0)
    with pytest.raises(ValueError, match="index"):
        spt_attention(q, k, v, index[:, :1], valid[:, :1], None, 1.0, 0.0)
    with pytest.raises(ValueError, match="mask"):
        spt_attention(q, k, v, index, valid, torch.zeros(3, 1, 1, 1), 1.0, 0.0)
    with pytest.raises(ValueError, match="dropout_p"):
        spt_attention(q, k, v, index, valid, None, 1.0, 1.5)


# ---------------------------------------------------------------------------------------------
# 4. gradcheck (float64, through the registered autograd and spt_attention_backward)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("h,hkv,causal,mask_kind,mask_shape,dropout_p", [
    (2, 2, False, None, None, 0.0),
    (4, 2, True, None, None, 0.0),                 # GQA + causal: invalid slots in the first rows
    (4, 1, False, "float", (1, 4, 5, 6), 0.0),     # per-head bias with grad (T5 style), GQA
    (4, 2, True, "float", (2, 1, 1, 6), 0.0),      # padding-like additive mask with grad
    (2, 1, False, "float", (5, 6), 0.0),           # 2-d mask broadcast over batch and heads
    (4, 2, True, "bool", (2, 1, 5, 6), 0.0),
    (4, 2, True, "float", (1, 4, 5, 6), 0.3),      # dropout, replayed from the seed
])
def test_gradcheck_spt_attention(h, hkv, causal, mask_kind, mask_shape, dropout_p):
    g = _gen(10)
    b, lq, lk, keep = 2, 5, 6, 3
    q, k, v = _qkv(g, b, h, hkv, lq, lk, 4, dv=3, dtype=torch.float64)
    kv = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    kv[1, ..., -4:] = False  # padding: 2 allowed keys < keep, so invalid slots even without causal
    index, valid = _random_pattern(g, b, h, hkv, lq, lk, keep, causal, allowed=kv)
    assert not valid.all()
    if mask_kind == "float":
        mask = _randn(g, *mask_shape, dtype=torch.float64, requires_grad=True)
    elif mask_kind == "bool":
        mask = torch.rand(mask_shape, generator=g) < 0.7
    else:
        mask = None

    def fn(q, k, v, *m):
        torch.manual_seed(0)  # the same dropout seed on every call
        return spt_attention(q, k, v, index, valid, m[0] if m else mask, 0.7, dropout_p)[0]

    inputs = (q, k, v) + ((mask,) if mask_kind == "float" else ())
    assert torch.autograd.gradcheck(fn, inputs)


def test_double_backward_is_a_clear_error():
    g = _gen(11)
    q, k, v, index, valid, _ = _spt_case(g, 2, 2, False, None, dtype=torch.float64)
    out, _, _ = spt_attention(q, k, v, index, valid, None, 0.5, 0.0)
    (gq,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="spt_attention_backward"):
        torch.autograd.grad(gq.sum(), q)


# ---------------------------------------------------------------------------------------------
# 5. dropout
# ---------------------------------------------------------------------------------------------

P = 0.5


def test_spt_dropout_rate():
    """q = 0 gives uniform probs 1/keep over the kept slots; with v = I each output at a kept key is one
    (dropped or rescaled) probability."""
    b, h, lq, lk, keep = 2, 2, 32, 32, 8
    q = torch.zeros(b, h, lq, 8)
    k = torch.randn(b, h, lk, 8)
    v = torch.eye(lk).expand(b, h, lk, lk).contiguous()
    index, valid = _random_pattern(_gen(12), b, h, h, lq, lk, keep, False)
    assert valid.all()
    torch.manual_seed(0)
    out, _, seed = spt_attention(q, k, v, index, valid, None, 1.0, P)
    assert seed.dtype == torch.int64 and seed.device.type == "cpu"
    at_kept = out.gather(-1, index.long())
    kept_value = 1.0 / keep / (1 - P)
    dropped = at_kept == 0
    assert torch.all(dropped | torch.isclose(at_kept, torch.tensor(kept_value)))
    off_pattern = out.sum(-1) - at_kept.sum(-1)
    assert torch.allclose(off_pattern, torch.zeros_like(off_pattern))
    sigma = math.sqrt(P * (1 - P) / at_kept.numel())
    assert P - 6 * sigma < dropped.float().mean().item() < P + 6 * sigma


def test_spt_dropout_backward_replays_forward_mask():
    g = _gen(13)
    q, k, v, index, valid, mask = _spt_case(g, 4, 2, True, "float", dtype=torch.float64)
    torch.manual_seed(1)
    out, _, seed = spt_attention(q, k, v, index, valid, mask, 0.4, P)
    ref = sparse_reference(q, k, v, index, valid, mask, 0.4, P, seed)
    torch.testing.assert_close(out, ref)
    no_drop, _, _ = spt_attention(q, k, v, index, valid, mask, 0.4, 0.0)
    assert not torch.allclose(out, no_drop)
    grad_out = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v, mask), grad_out),
                         torch.autograd.grad(ref, (q, k, v, mask), grad_out)):
        torch.testing.assert_close(got, want)


def test_spt_dropout_reproducible_and_p_one():
    g = _gen(14)
    q, k, v, index, valid, _ = _spt_case(g, 2, 2, False, None, requires_grad=False)
    torch.manual_seed(123)
    a1, _, s1 = spt_attention(q, k, v, index, valid, None, 0.5, P)
    torch.manual_seed(123)
    a2, _, s2 = spt_attention(q, k, v, index, valid, None, 0.5, P)
    assert torch.equal(s1, s2) and torch.equal(a1, a2)
    torch.manual_seed(124)
    a3, _, s3 = spt_attention(q, k, v, index, valid, None, 0.5, P)
    assert not torch.equal(s1, s3) and not torch.equal(a1, a3)
    out, _, _ = spt_attention(q, k, v, index, valid, None, 0.5, 1.0)
    assert torch.equal(out, torch.zeros_like(out))


# ---------------------------------------------------------------------------------------------
# 6. codebook loss and gradient injection
# ---------------------------------------------------------------------------------------------

def _codebook_loss_loops(z, cb):
    """The formula written out with explicit loops over subspaces (no cdist)."""
    m, e, dc = cb.shape
    zs = z.reshape(-1, m, dc)
    soft, hard = [], []
    for mi in range(m):
        dist = (zs[:, mi, None, :] - cb[mi]).abs().sum(-1)          # [N, E]
        a = torch.softmax(-torch.log(dist.clamp_min(1e-5)), dim=-1)
        soft.append(a @ cb[mi])
        hard.append(cb[mi][dist.argmin(-1)])
    soft, hard = torch.stack(soft, 1), torch.stack(hard, 1)
    return ((soft - hard) ** 2).mean() + ((zs - hard) ** 2).mean()


def test_codebook_loss_value_and_gradient_flow():
    g = _gen(15)
    z = _randn(g, 2, 3, 5, 16, dtype=torch.float64, requires_grad=True)
    cb = _randn(g, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    loss = key_select.codebook_loss(z, cb)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, _codebook_loss_loops(z, cb))
    dz, dcb = torch.autograd.grad(loss, (z, cb))
    # z only through MSE(z, z_q): d/dz = 2 (z - z_q) / numel
    z_q = cb.detach()[torch.arange(2), pq_encode(z.detach(), cb.detach()).long()].reshape(z.shape)
    torch.testing.assert_close(dz, 2 * (z.detach() - z_q) / z.numel())
    # the codebook through both terms, z detached in the first one
    want_dcb = torch.autograd.grad(_codebook_loss_loops(z.detach(), cb), cb)[0]
    torch.testing.assert_close(dcb, want_dcb)
    assert dcb.abs().sum() > 0


def test_codebook_loss_half_input_and_training_reduces_it():
    g = _gen(16)
    z = _randn(g, 1, 2, 64, 16)
    cb = torch.nn.Parameter(_randn(g, 2, 16, 8))
    assert key_select.codebook_loss(z.half(), cb).dtype == torch.float32
    opt = torch.optim.Adam([cb], lr=0.05)
    first = key_select.codebook_loss(z, cb).item()
    for _ in range(30):
        opt.zero_grad()
        key_select.codebook_loss(z, cb).backward()
        opt.step()
    assert key_select.codebook_loss(z, cb).item() < 0.8 * first


def test_aux_loss_injects_weighted_gradient():
    g = _gen(17)
    x = _randn(g, 4, 16, dtype=torch.float64, requires_grad=True)
    w = _randn(g, 16, 16, dtype=torch.float64, requires_grad=True)
    cb = _randn(g, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    weight = 1e-2

    def run(inject):
        y = torch.tanh(x @ w)
        aux = key_select.codebook_loss(y, cb)
        if inject:
            out = aux_loss(y, aux, weight, "pq_test")
            total = (out.sin() ** 2).sum()
        else:
            total = (y.sin() ** 2).sum() + weight * aux
        return aux, total, torch.autograd.grad(total, (x, w, cb))

    aux_loss_ops.AUX_LOSSES.pop("pq_test", None)
    aux, _, got = run(True)
    assert torch.equal(aux_loss_ops.AUX_LOSSES["pq_test"], aux.detach())
    _, _, want = run(False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # the forward value is unchanged and not an alias
    y = torch.randn(3, requires_grad=True)
    out = aux_loss(y, torch.tensor(1.0, requires_grad=True), 0.5, "pq_test")
    assert torch.equal(out, y) and out.data_ptr() != y.data_ptr()


# ---------------------------------------------------------------------------------------------
# 7. selection recall
# ---------------------------------------------------------------------------------------------

def test_selection_recall_exact_cases():
    g = _gen(18)
    b, h, lq, lk, d = 1, 2, 9, 9, 16
    q, k, _ = _qkv(g, b, h, h, lq, lk, d, requires_grad=False)
    cb = _randn(g, 2, 4, 8)
    qc, kc = pq_encode(q, cb), pq_encode(k, cb)
    for causal in (False, True):
        index, valid = pq_select(qc, kc, lk, causal, None)  # keep == Lk: everything allowed is kept
        assert key_select.selection_recall(q, k, index, valid, lk, causal) == 1.0

    # codes that are exact: 4 clusters of orthogonal codewords; a query's code matches exactly its
    # cluster's keys, which are also its true top-4 by q . k
    e, dc, lk, keep = 4, 8, 16, 4
    basis = torch.eye(dc)[:e] * 10.0
    cb = torch.stack([basis, basis])                     # [M=2, E=4, 8]
    key_cluster = torch.arange(lk) % e
    query_cluster = torch.tensor([3, 0, 2, 1, 1])
    k = torch.cat([basis[key_cluster], basis[key_cluster]], -1).view(1, 1, lk, 16)
    k = k + 0.01 * torch.randn(k.shape, generator=g)
    q = torch.cat([basis[query_cluster], basis[query_cluster]], -1).view(1, 1, 5, 16)
    index, valid = pq_select(pq_encode(q, cb), pq_encode(k, cb), keep, False, None)
    assert key_select.selection_recall(q, k, index, valid, keep, False) == 1.0
    # and a poor pattern is measured as poor
    worst = torch.stack([(key_cluster != c).nonzero().flatten()[:keep] for c in query_cluster]).view(1, 1, 5, keep)
    assert key_select.selection_recall(q, k, worst.int(), torch.ones_like(worst, dtype=torch.bool), keep, False) == 0.0


# ---------------------------------------------------------------------------------------------
# 8. memory saved for backward (measured)
# ---------------------------------------------------------------------------------------------

def _saved_storages(fn):
    """Unique storages (by data_ptr) that autograd saves while fn runs: {data_ptr: nbytes}."""
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


def test_saved_memory_vs_eager_attention():
    g = _gen(19)
    b, h, n, d = 1, 2, 512, 64
    keep = n // 8
    q, k, v = _qkv(g, b, h, h, n, n, d)
    cb = _randn(g, d // 8, 16, 8)
    with torch.no_grad():
        index, valid = pq_select(pq_encode(q, cb), pq_encode(k, cb), keep, False, None)
    scale = d ** -0.5

    def eager():
        probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
        return probs @ v

    spt_saved, spt_out = _saved_storages(lambda: spt_attention(q, k, v, index, valid, None, scale, 0.0)[0])
    eager_saved, eager_out = _saved_storages(eager)
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    spt_internal = sum(n_ for p, n_ in spt_saved.items() if p not in inputs)
    eager_internal = sum(n_ for p, n_ in eager_saved.items() if p not in inputs)
    print(f"\n[saved for backward] B=1 H=2 n={n} D={d} keep={keep}: "
          f"spt total {sum(spt_saved.values())} B (attention-internal {spt_internal} B, "
          f"{len(spt_saved)} storages); eager total {sum(eager_saved.values())} B "
          f"(attention-internal {eager_internal} B, {len(eager_saved)} storages); "
          f"internal ratio {spt_internal / eager_internal:.3f}")
    assert inputs <= set(spt_saved)  # q, k, v themselves are saved, and counted apart
    assert eager_internal >= b * h * n * n * 4  # eager keeps the n x n probabilities
    assert spt_internal <= eager_internal / 4
    # and the sparse result is a real attention output (sanity: finite, right shape)
    assert spt_out.shape == eager_out.shape and torch.isfinite(spt_out).all()


# ---------------------------------------------------------------------------------------------
# 9. FLOP formulas
# ---------------------------------------------------------------------------------------------

def _count(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("b,h,hkv,lq,lk,d,dv,keep", [(2, 4, 2, 5, 7, 8, 6, 3), (1, 2, 2, 8, 8, 16, 16, 1)])
def test_flop_formulas(b, h, hkv, lq, lk, d, dv, keep):
    g = _gen(20)
    q, k, v = _qkv(g, b, h, hkv, lq, lk, d, dv=dv)
    cb = _randn(g, d // 8, 16, 8)
    qc = pq_encode(q, cb)
    kc = pq_encode(k, cb)
    index, valid = pq_select(qc, kc, keep, True, None)
    assert _count(lambda: pq_encode(q, cb)) == b * h * lq * (d // 8) * 16 * 8 * 2
    assert _count(lambda: pq_select(qc, kc, keep, True, None)) == b * h * lq * lk * (d // 8)
    fwd = 2 * b * h * lq * keep * (d + dv)
    assert _count(lambda: spt_attention(q, k, v, index, valid, None, 0.5, 0.0)) == fwd
    total = _count(lambda: spt_attention(q, k, v, index, valid, None, 0.5, 0.0)[0].sum().backward())
    assert total == fwd + 2 * b * h * lq * keep * (3 * d + 2 * dv)


# ---------------------------------------------------------------------------------------------
# 10. torch.compile smoke test (aot_eager: the ops stay opaque, fake kernels drive the trace)
# ---------------------------------------------------------------------------------------------

def test_compile_aot_eager_matches_eager():
    g = _gen(21)
    q, k, v = _qkv(g, 2, 4, 2, 8, 8, 16)
    cb = _randn(g, 2, 16, 8, requires_grad=True)
    allowed = torch.ones(2, 1, 8, 8, dtype=torch.bool)  # an HF-shaped mask [B, 1, Lq, Lk]
    allowed[0, ..., -3:] = False
    allowed[1, :, 4:, :2] = False

    def f(q, k, v, cb):
        index, valid = pq_select(pq_encode(q, cb), pq_encode(k, cb), 3, True, allowed)
        out, _, _ = spt_attention(q, k, v, index, valid, None, 0.25, 0.0)
        aux = key_select.codebook_loss(q, cb) + key_select.codebook_loss(k, cb)
        return aux_loss(out, aux, 0.01, "compile_test")

    leaves = (q, k, v, cb)
    want = f(*leaves)
    want_grads = torch.autograd.grad(want.square().sum(), leaves)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves)
    got_grads = torch.autograd.grad(got.square().sum(), leaves)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
    assert "compile_test" in aux_loss_ops.AUX_LOSSES


def test_codebook_loss_op_recomputes_instead_of_saving():
    """sparsify::codebook_loss: the plain function's value and gradients, opcheck and float64 gradcheck, and
    only its inputs saved for backward (the plain function keeps distances and soft assignments, [N, M, E])."""
    from bench_helpers import load_benchmark
    from sparsify.ops.key_select import codebook_loss
    saved_bytes = load_benchmark("_timing").saved_bytes
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 64, 16, generator=g, dtype=torch.float64)
    cb = torch.randn(2, 16, 8, generator=g, dtype=torch.float64)
    torch.library.opcheck(torch.ops.sparsify.codebook_loss.default, (z.requires_grad_(), cb.requires_grad_()))
    # in the codebook the loss is differentiated as written; in z its first term is detached on purpose
    # (codebook_loss's docstring), so z's gradient is checked against the plain function below instead
    z6 = z[:, :, :6].detach()
    torch.autograd.gradcheck(lambda b: torch.ops.sparsify.codebook_loss(z6, b), (cb,))
    grads = []
    for fn in (torch.ops.sparsify.codebook_loss, codebook_loss):
        zs, cs = z.detach().clone().requires_grad_(), cb.detach().clone().requires_grad_()
        loss, saved = saved_bytes(lambda: fn(zs, cs))
        loss.backward()
        grads.append((loss.detach(), zs.grad, cs.grad, saved["saved_bytes"]))
    (l1, dz1, dc1, saved_op), (l2, dz2, dc2, saved_plain) = grads
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(dz1, dz2)
    torch.testing.assert_close(dc1, dc2)
    assert saved_op == z.numel() * 8 + cb.numel() * 8, saved_op  # its two inputs
    assert saved_plain > 3 * saved_op
