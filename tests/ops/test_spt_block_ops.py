"""Tests for the block-granular SPT ops (sparsify/ops/spt_block.py): pq_select_blocks, block_sparse_attention
(+ backward).

What is checked:
  * torch.library.opcheck on every op (schema, fake kernel, autograd registration, AOT dispatch);
  * the histogram identity of the block scores against token-level code matches, and pq_select_blocks against a
    brute-force loop over (query block, key block) pairs (causal, `allowed` masks of every broadcast shape and
    the structured ones: sliding window, packed sequences, KV cache; GQA, Lq != Lk, ties);
  * keep_blocks = nKB equals dense attention (SDPA with the same mask), forward and gradients, 1e-5 in fp32,
    also with a structured mask as the selection's `allowed` and the attention's mask;
  * fewer blocks equals SDPA with the block map expanded to a token mask, forward and gradients;
  * float64 gradcheck through the registered autograd (GQA, float mask with grad, bool mask, causal, dropout);
  * dropout replay, empty rows, row chunking, saved-tensor memory, FLOP formulas, a torch.compile smoke test;
  * a `gpu` class running the ops on CUDA against SDPA.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import sparsify.ops.spt  # noqa: F401
import sparsify.ops.spt_block as sb
from sparsify.ops._vjp import seeded_dropout
from op_inputs import (STRUCTURED_ALLOWED, allowed_at, gen as _gen, opcheck_ok as _ok, qkv as _qkv, randn as _randn,
                       random_allowed, structured_allowed)

select_blocks = torch.ops.sparsify.pq_select_blocks
bsa = torch.ops.sparsify.block_sparse_attention
bsa_backward = torch.ops.sparsify.block_sparse_attention_backward


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: with several intra-op threads (on a loaded machine) each matmul waits on a
    thread barrier for milliseconds, which made the float64 gradchecks minutes long. One thread, restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _codes(g, b, h, l, m=2, e=4):
    return torch.randint(0, e, (b, h, l, m), generator=g, dtype=torch.int32)


def _pattern(g, b, h, hkv, lq, lk, keep_blocks, block, causal, allowed=None, m=2, e=4):
    return select_blocks(_codes(g, b, h, lq, m, e), _codes(g, b, hkv, lk, m, e), keep_blocks, block, causal,
                         allowed)


def _token_mask(block_index, block_valid, block, lq, lk, causal):
    """The block map expanded to a [B, H, Lq, Lk] bool mask, written independently of the op (loops)."""
    b, h, nqb, kb = block_index.shape
    allowed = torch.zeros(b, h, lq, lk, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for qb in range(nqb):
                for s in range(kb):
                    if block_valid[bi, hi, qb, s]:
                        j = int(block_index[bi, hi, qb, s])
                        allowed[bi, hi, qb * block:(qb + 1) * block, j * block:(j + 1) * block] = True
    if causal:
        allowed &= torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)  # bottom-right (sparsify/ops/causal.py)
    return allowed


def _sdpa(q, k, v, bool_mask=None, float_mask=None, scale=None):
    """SDPA with GQA by repeat, a bool visibility mask and an additive float mask (combined into one float mask;
    rows with nothing visible give 0, as the op)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    mask = torch.zeros(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=q.dtype)
    if float_mask is not None:
        mask = mask + float_mask
    if bool_mask is not None:
        mask = mask.masked_fill(~bool_mask, float("-inf"))
    empty = torch.isneginf(mask).all(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.masked_fill(empty, 0.0), scale=scale)
    return out.masked_fill(empty, 0.0)


# ---------------------------------------------------------------------------------------------
# 1. opcheck
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("h,hkv,causal,allowed_kind", [(2, 2, False, None), (4, 2, True, "rows"), (4, 1, True, "keys"),
                                                      (4, 2, False, "heads"), (2, 1, True, "shared")])
def test_opcheck_pq_select_blocks(h, hkv, causal, allowed_kind):
    g = _gen(1)
    qc, kc = _codes(g, 2, h, 13), _codes(g, 2, hkv, 11)
    allowed = random_allowed(g, allowed_kind, 2, h, 13, 11)
    assert _ok(torch.library.opcheck(select_blocks.default, (qc, kc, 2, 4, causal, allowed)))


CASES = {
    "plain": dict(h=2, hkv=2, causal=False, mask=None),
    "gqa_causal": dict(h=4, hkv=2, causal=True, mask=None),
    "float_mask_grad": dict(h=4, hkv=1, causal=False, mask="float"),
    "bool_mask": dict(h=2, hkv=1, causal=True, mask="bool"),
}


def _case(g, h, hkv, causal, mask, b=2, lq=11, lk=13, d=8, dv=4, block=4, keep_blocks=2, dtype=torch.float32,
          requires_grad=True):
    q, k, v = _qkv(g, b, h, hkv, lq, lk, d, dv=dv, dtype=dtype, requires_grad=requires_grad)
    bi, bv = _pattern(g, b, h, hkv, lq, lk, keep_blocks, block, causal)
    if mask == "float":
        m = _randn(g, 1, h, lq, lk, dtype=dtype, requires_grad=requires_grad)
    elif mask == "bool":
        m = torch.rand(b, 1, lq, lk, generator=g) < 0.7
    else:
        m = None
    return q, k, v, bi, bv, block, m


@pytest.mark.parametrize("case", list(CASES))
def test_opcheck_block_sparse_attention(case):
    q, k, v, bi, bv, block, m = _case(_gen(2), **CASES[case])
    causal = CASES[case]["causal"]
    assert _ok(torch.library.opcheck(bsa.default, (q, k, v, bi, bv, block, m, 0.35, causal, 0.0)))


def test_opcheck_block_sparse_attention_non_contiguous_and_broadcast_map():
    g = _gen(3)
    q = _randn(g, 2, 9, 4, 8).transpose(1, 2).requires_grad_()
    k = _randn(g, 2, 10, 2, 8).transpose(1, 2).requires_grad_()
    v = _randn(g, 2, 10, 2, 8).transpose(1, 2).requires_grad_()
    bi, bv = _pattern(g, 1, 1, 1, 9, 10, 2, 4, True)  # [1, 1, nQB, kb]: broadcast over B and H
    assert _ok(torch.library.opcheck(bsa.default, (q, k, v, bi, bv, 4, None, 0.3, True, 0.0)))


def test_opcheck_block_sparse_attention_backward():
    g = _gen(4)
    q, k, v, bi, bv, block, m = _case(g, 4, 2, True, "float", requires_grad=False)
    out, lse, seed = bsa(q, k, v, bi, bv, block, m, 0.5, True, 0.0)
    grad_out = torch.randn_like(out)
    for needs in ([True, True, True, True], [True, False, True, False], [False, False, False, True]):
        assert _ok(torch.library.opcheck(
            bsa_backward.default, (grad_out, q, k, v, bi, bv, block, m, lse, seed, 0.5, True, 0.0, needs)))


# ---------------------------------------------------------------------------------------------
# 2. pq_select_blocks
# ---------------------------------------------------------------------------------------------

def _token_scores(qc, kc):
    g = qc.shape[1] // kc.shape[1]
    kc = kc.repeat_interleave(g, 1)
    return (qc[:, :, :, None, :] == kc[:, :, None, :, :]).sum(-1)  # [B, H, Lq, Lk]


def test_block_scores_histogram_identity():
    g = _gen(5)
    b, h, hkv, lq, lk, block = 2, 4, 2, 23, 30, 4
    qc, kc = _codes(g, b, h, lq, 3, 5), _codes(g, b, hkv, lk, 3, 5)
    kv = torch.rand(b, lk, generator=g) < 0.7
    tok = _token_scores(qc, kc) * kv[:, None, None, :]
    nqb, nkb = -(-lq // block), -(-lk // block)
    pad = F.pad(tok, (0, nkb * block - lk, 0, nqb * block - lq))
    want = pad.reshape(b, h, nqb, block, nkb, block).sum((3, 5)).double()
    torch.testing.assert_close(sb.block_scores(qc, kc, block, kv), want, rtol=0, atol=0)
    # the ops' key weight: a key counts iff some query row of some head may attend to it
    allowed = torch.rand(b, h, lq, lk, generator=g) < 0.02
    allowed[..., :3] = False  # keys 0-2 visible to nobody
    weight = sb.key_visible(allowed)
    assert weight.dtype == torch.float32 and weight.shape == (b, lk)
    assert torch.equal(weight.bool(), allowed.any(2).any(1)) and not weight[:, :3].any()
    assert torch.equal(sb.key_visible(allowed[:1, :1, :1]).bool(), allowed[:1, 0, 0])


def brute_select_blocks(qc, kc, keep, block, causal, allowed, token_scores=_token_scores):
    """The module docstring's contract, looped over (query block, key block) pairs. Key block kb is a candidate
    for query block qb iff `allowed` (broadcast to [B, H, Lq, Lk]) has a True in the block pair and, if causal,
    kb's first key is visible to qb's last query row (bottom-right: key <= row + Lk - Lq; the two checked
    separately); the causal diagonal candidate (the block holding key first_row + Lk - Lq) first,
    then the block score: the sum of token_scores(qc, kc) [B, H, Lq, Lk] over every query row of qb and the keys
    of kb that some query of some head may attend to; ties to the lower block; ELL order."""
    b, h, lq, _ = qc.shape
    lk = kc.shape[2]
    nqb, nkb = -(-lq // block), -(-lk // block)
    tok = token_scores(qc, kc)
    full = allowed_at(allowed, b, h, lq, lk)
    visible_key = full.any(2).any(1)                                  # [B, Lk]
    index = torch.zeros(b, h, nqb, keep, dtype=torch.int32)
    valid = torch.zeros(b, h, nqb, keep, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for qb in range(nqb):
                rows = slice(qb * block, (qb + 1) * block)
                last_row = min((qb + 1) * block, lq) - 1
                cands = []
                for kb in range(nkb):
                    cols = slice(kb * block, (kb + 1) * block)
                    if not full[bi, hi, rows, cols].any() or (causal and kb * block > last_row + lk - lq):
                        continue
                    score = (tok[bi, hi, rows, cols] * visible_key[bi, cols]).sum().item()
                    forced = causal and kb * block <= qb * block + lk - lq < (kb + 1) * block
                    cands.append((0 if forced else 1, -score, kb))
                chosen = sorted(kb for _, _, kb in sorted(cands)[:keep])
                index[bi, hi, qb, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
                valid[bi, hi, qb, :len(chosen)] = True
    return index, valid


def _block_allowed(g, kind, b, h, lq, lk, block):
    """The `allowed` mask of a brute-force case: a random kind of op_inputs.random_allowed (for "keys", key
    block 0 of batch 0 fully padded) or a structured one of op_inputs.structured_allowed."""
    if kind in STRUCTURED_ALLOWED:
        return structured_allowed(kind, b, lq, lk)
    allowed = random_allowed(g, kind, b, h, lq, lk, p=0.6)
    if kind == "keys":
        allowed[0, ..., :block] = False  # a fully padded key block
    return allowed


@pytest.mark.parametrize("b,h,hkv,lq,lk,block,keep,causal,kind,e", [
    (2, 2, 2, 24, 24, 4, 2, False, None, 3),
    (2, 4, 2, 23, 23, 4, 3, True, None, 2),       # heavy ties (E = 2)
    (1, 2, 1, 30, 17, 4, 5, False, "keys", 4),    # keep = nKB
    (2, 2, 2, 19, 26, 3, 1, True, "keys", 3),     # keep 1, Lq < Lk, odd block
    (1, 3, 3, 26, 13, 4, 2, True, None, 4),       # Lq > Lk: query blocks past the last key block
    (2, 2, 1, 16, 16, 5, 4, True, "keys", 4),     # keep = nKB with causal: upper blocks invalid
    (2, 2, 1, 8, 4, 2, 1, True, "keys", 3),       # Lq > Lk, causal, padded key block: never a candidate
    (2, 4, 2, 21, 18, 4, 2, False, "rows", 3),    # an HF-shaped mask [B, 1, Lq, Lk], row by row
    (2, 4, 2, 18, 18, 3, 3, True, "rows", 3),
    (2, 4, 2, 17, 22, 4, 2, True, "heads", 3),    # per-head masks: candidates differ between heads
    (2, 2, 1, 20, 20, 4, 3, False, "shared", 3),  # one [1, 1, Lq, Lk] mask for the batch
    (2, 4, 2, 24, 24, 4, 2, False, "window", 3),  # sliding window (causal, bottom-right): a band of blocks
    (2, 4, 2, 23, 23, 4, 3, True, "window", 3),
    (2, 2, 1, 22, 22, 4, 3, False, "packed", 3),  # block-diagonal packing
    (2, 2, 1, 22, 22, 4, 3, True, "packed", 3),
    (2, 4, 2, 6, 21, 4, 2, False, "kv_cache", 3),  # KV-cache decode, Lq < Lk bottom-right (causal=False)
    (2, 4, 2, 6, 21, 4, 2, True, "kv_cache", 3),   # ... with the ops' (bottom-right) causal on top
])
def test_pq_select_blocks_matches_brute_force(b, h, hkv, lq, lk, block, keep, causal, kind, e):
    g = _gen(lq * 100 + lk)
    qc, kc = _codes(g, b, h, lq, 3, e), _codes(g, b, hkv, lk, 3, e)
    allowed = _block_allowed(g, kind, b, h, lq, lk, block)
    got = select_blocks(qc, kc, keep, block, causal, allowed)
    want = brute_select_blocks(qc, kc, keep, block, causal, allowed)
    assert got[0].dtype == torch.int32 and got[1].dtype == torch.bool
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    full = allowed_at(allowed, b, h, lq, lk)
    nqb, nkb = got[0].shape[2], -(-lk // block)
    if causal:  # the diagonal block (holding key first_row + Lk - Lq) is always kept when the mask allows a pair in it
        for qb in range(nqb):
            diagonal_key = qb * block + lk - lq
            if diagonal_key < 0:
                continue
            kd = diagonal_key // block
            has_pair = full[:, :, qb * block:(qb + 1) * block, kd * block:(kd + 1) * block].flatten(2).any(-1)
            kept = ((got[0][:, :, qb] == kd) & got[1][:, :, qb]).any(-1)
            assert torch.equal(kept, has_pair)
    # a key block is never selected for a query block whose rows the mask gives no key of it
    for qb in range(nqb):
        for kb in range(nkb):
            pair = full[:, :, qb * block:(qb + 1) * block, kb * block:(kb + 1) * block].flatten(2).any(-1)
            chosen = ((got[0][:, :, qb] == kb) & got[1][:, :, qb]).any(-1)
            assert not (chosen & ~pair).any(), (qb, kb)
    if kind == "keys":  # the fully padded block is never selected
        assert not ((got[0][0] == 0) & got[1][0]).any()


def test_pq_select_blocks_bad_inputs():
    qc = torch.zeros(1, 2, 8, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="keep_blocks"):
        select_blocks(qc, qc, 3, 4, False, None)
    with pytest.raises(ValueError, match="block"):
        select_blocks(qc, qc, 1, 0, False, None)
    with pytest.raises(ValueError, match="integer"):
        select_blocks(qc.float(), qc, 1, 4, False, None)
    with pytest.raises(ValueError, match=">= 0"):
        select_blocks(qc - 1, qc, 1, 4, False, None)
    for allowed in (torch.ones(1, 8, dtype=torch.bool),          # the old [B, Lk] key-padding form
                    torch.ones(1, 1, 1, 7, dtype=torch.bool),    # wrong Lk
                    torch.ones(1, 1, 4, 8, dtype=torch.bool),    # Lq neither 1 nor 8
                    torch.ones(1, 1, 8, 8, dtype=torch.int32)):  # not bool
        with pytest.raises(ValueError, match="allowed must be a bool mask broadcastable to \\[B, H, Lq, Lk\\]"):
            select_blocks(qc, qc, 1, 4, False, allowed)


# ---------------------------------------------------------------------------------------------
# 3. block_sparse_attention against SDPA
# ---------------------------------------------------------------------------------------------

def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def _check_fwd_bwd(got, want, inputs, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    grad_out = torch.randn_like(got)
    for a, b in zip(_grads(got, inputs, grad_out), _grads(want, inputs, grad_out)):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "float", "bool"])
@pytest.mark.parametrize("hkv", [4, 2])
def test_all_blocks_equals_dense_attention(causal, mask_kind, hkv):
    g = _gen(7)
    b, h, lq, lk, d, block = 2, 4, 21, 21, 16, 4
    q, k, v = _qkv(g, b, h, hkv, lq, lk, d)
    nkb = -(-lk // block)
    bi, bv = _pattern(g, b, h, hkv, lq, lk, nkb, block, causal)
    inputs = [q, k, v]
    float_mask = bool_mask = None
    if mask_kind == "float":
        float_mask = _randn(g, b, 1, lq, lk, requires_grad=True)
        inputs.append(float_mask)
    elif mask_kind == "bool":
        bool_mask = torch.rand(b, h, lq, lk, generator=g) < 0.7
        bool_mask |= torch.eye(lq, lk, dtype=torch.bool)  # every row keeps a key
    mask = float_mask if float_mask is not None else bool_mask
    got = bsa(q, k, v, bi, bv, block, mask, d ** -0.5, causal, 0.0)[0]
    visible = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq) if causal else None
    if bool_mask is not None:
        visible = bool_mask if visible is None else bool_mask & visible
    want = _sdpa(q, k, v, visible, float_mask)
    if visible is None and float_mask is None:  # plain SDPA, no mask at all
        g_ = h // hkv
        want = F.scaled_dot_product_attention(q, k.repeat_interleave(g_, 1), v.repeat_interleave(g_, 1))
    _check_fwd_bwd(got, want, inputs)


@pytest.mark.parametrize("score", ["pq", "exact"])
@pytest.mark.parametrize("kind", STRUCTURED_ALLOWED)
def test_all_blocks_with_structured_mask_equals_dense_attention(kind, score):
    """keep_blocks = nKB with the region's mask as `allowed` and as the attention mask: dense attention
    (sparsify::attention, causal=False: a KV cache's bottom-right causality lives only in the mask)."""
    g = _gen(23)
    lq, lk = {"window": (22, 22), "packed": (21, 21), "kv_cache": (7, 22)}[kind]
    b, h, hkv, d, block = 2, 4, 2, 16, 4
    q, k, v = _qkv(g, b, h, hkv, lq, lk, d)
    mask = structured_allowed(kind, b, lq, lk)
    nkb = -(-lk // block)
    if score == "pq":
        bi, bv = _pattern(g, b, h, hkv, lq, lk, nkb, block, False, allowed=mask)
    else:
        bi, bv = torch.ops.sparsify.qk_select_blocks(q.detach(), k.detach(), nkb, block, False, mask)
    # every block pair holding an allowed pair is selected, no other
    covered = _token_mask(bi, bv, block, lq, lk, False)
    assert not (mask & ~covered).any()
    scale = d ** -0.5
    got = bsa(q, k, v, bi, bv, block, mask, scale, False, 0.0)[0]
    dense, _ = torch.ops.sparsify.attention(q, k, v, mask, scale, 0.0, False)
    torch.testing.assert_close(got, _sdpa(q, k, v, mask, scale=scale), atol=1e-5, rtol=1e-5)
    _check_fwd_bwd(got, dense, [q, k, v])


@pytest.mark.parametrize("b,h,hkv,lq,lk,block,keep,causal,kind", [
    (2, 4, 2, 33, 33, 8, 2, False, None),
    (2, 4, 2, 33, 33, 8, 2, True, None),
    (1, 2, 1, 40, 27, 4, 3, True, "keys"),    # Lq > Lk, key padding as `allowed` and as the bool mask
    (2, 2, 2, 17, 45, 5, 4, False, "keys"),
    (2, 4, 2, 9, 33, 4, 3, False, "kv_cache"),  # bottom-right causality only in the mask
    (2, 2, 1, 30, 30, 4, 3, False, "packed"),
])
def test_fewer_blocks_equals_sdpa_with_expanded_mask(b, h, hkv, lq, lk, block, keep, causal, kind):
    g = _gen(8)
    q, k, v = _qkv(g, b, h, hkv, lq, lk, 8, dv=6)
    allowed = _block_allowed(g, kind, b, h, lq, lk, block) if kind else None
    bi, bv = _pattern(g, b, h, hkv, lq, lk, keep, block, causal, allowed=allowed, m=3, e=4)
    assert bi.shape == (b, h, -(-lq // block), keep)
    got, lse, _ = bsa(q, k, v, bi, bv, block, allowed, 0.4, causal, 0.0)
    visible = _token_mask(bi, bv, block, lq, lk, causal)
    if allowed is not None:
        visible &= allowed
    assert not visible.all()  # a real sparsity pattern
    want = _sdpa(q, k, v, visible, scale=0.4)
    _check_fwd_bwd(got, want, [q, k, v])
    # lse is the logsumexp of the visible scores
    s = torch.einsum("bhid,bhjd->bhij", q, k.repeat_interleave(h // hkv, 1)) * 0.4
    torch.testing.assert_close(lse, torch.logsumexp(s.masked_fill(~visible, float("-inf")), -1))


def test_rows_with_nothing_visible_give_zero_and_no_nan():
    g = _gen(9)
    q, k, v = _qkv(g, 1, 2, 2, 8, 8, 4, dtype=torch.float64)
    bi = torch.zeros(1, 2, 2, 1, dtype=torch.int32)
    bv = torch.tensor([True, False]).reshape(1, 1, 2, 1).expand(1, 2, 2, 1)  # query block 1 sees nothing
    bool_mask = torch.ones(8, 8, dtype=torch.bool)
    bool_mask[1] = False  # row 1 (block 0) masked out entirely
    out, lse, _ = bsa(q, k, v, bi, bv, 4, bool_mask, 0.5, False, 0.0)
    assert torch.isfinite(out).all()
    assert (out[:, :, 4:] == 0).all() and (out[:, :, 1] == 0).all()
    assert torch.isneginf(lse[:, :, 4:]).all() and torch.isneginf(lse[:, :, 1]).all()
    gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v))
    assert (gq[:, :, 4:] == 0).all() and (gq[:, :, 1] == 0).all()
    assert torch.isfinite(gk).all() and torch.isfinite(gv).all()
    # out-of-range block indices count as invalid
    out2, _, _ = bsa(q, k, v, torch.full_like(bi, 7), torch.ones_like(bv), 4, None, 0.5, False, 0.0)
    assert (out2 == 0).all()


def test_row_chunking_gives_identical_results(monkeypatch):
    g = _gen(10)
    q, k, v, bi, bv, block, m = _case(g, 4, 2, True, "float", lq=19, lk=19, dtype=torch.float64)
    args = (q, k, v, bi, bv, block, m, 0.5, True, 0.0)
    out = bsa(*args)[0]
    grads = torch.autograd.grad(out.sum(), (q, k, v, m))
    monkeypatch.setattr(sb, "_CHUNK_ELEMS", 2 * 4 * 19 * 3)  # 3 rows per chunk
    out_c = bsa(*args)[0]
    grads_c = torch.autograd.grad(out_c.sum(), (q, k, v, m))
    torch.testing.assert_close(out_c, out, rtol=0, atol=1e-14)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_bad_inputs():
    g = _gen(11)
    q, k, v, bi, bv, block, _ = _case(g, 2, 2, False, None)
    with pytest.raises(ValueError, match="block_index"):
        bsa(q, k, v, bi[:, :, :2], bv[:, :, :2], block, None, 0.5, False, 0.0)  # nQB != ceil(Lq / block)
    with pytest.raises(ValueError, match="block_index"):
        bsa(q, k, v, bi, bv, 2, None, 0.5, False, 0.0)  # block 2: nQB would be 6
    with pytest.raises(ValueError, match="mask"):
        bsa(q, k, v, bi, bv, block, torch.zeros(3, 3), 0.5, False, 0.0)
    with pytest.raises(ValueError, match="dropout"):
        bsa(q, k, v, bi, bv, block, None, 0.5, False, 1.5)
    with pytest.raises(ValueError, match="incompatible"):
        bsa(q, k[..., :4], v, bi, bv, block, None, 0.5, False, 0.0)


# ---------------------------------------------------------------------------------------------
# 4. gradcheck (float64, through the registered autograd and block_sparse_attention_backward)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("h,hkv,causal,mask_kind,mask_shape,dropout_p", [
    (2, 2, False, None, None, 0.0),
    (4, 2, True, None, None, 0.0),
    (4, 1, False, "float", (1, 4, 7, 9), 0.0),    # per-head bias with grad, GQA
    (4, 2, True, "float", (2, 1, 1, 9), 0.0),     # padding-like additive mask with grad
    (2, 1, False, "float", (7, 9), 0.0),          # 2-d mask broadcast over batch and heads
    (4, 2, True, "bool", (2, 1, 7, 9), 0.0),
    (4, 2, True, "float", (1, 4, 7, 9), 0.3),     # dropout, replayed from the seed
])
def test_gradcheck_block_sparse_attention(h, hkv, causal, mask_kind, mask_shape, dropout_p):
    g = _gen(12)
    b, lq, lk, block = 2, 7, 9, 3
    q, k, v = _qkv(g, b, h, hkv, lq, lk, 4, dv=3, dtype=torch.float64)
    kv = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    kv[1, ..., -4:] = False
    bi, bv = _pattern(g, b, h, hkv, lq, lk, 2, block, causal, allowed=kv)
    if mask_kind == "float":
        mask = _randn(g, *mask_shape, dtype=torch.float64, requires_grad=True)
    elif mask_kind == "bool":
        mask = torch.rand(mask_shape, generator=g) < 0.7
    else:
        mask = None

    def fn(q, k, v, *m):
        torch.manual_seed(0)  # the same dropout seed on every call
        return bsa(q, k, v, bi, bv, block, m[0] if m else mask, 0.7, causal, dropout_p)[0]

    inputs = (q, k, v) + ((mask,) if mask_kind == "float" else ())
    assert torch.autograd.gradcheck(fn, inputs)


def test_double_backward_is_a_clear_error():
    g = _gen(13)
    q, k, v, bi, bv, block, _ = _case(g, 2, 2, False, None, dtype=torch.float64)
    out = bsa(q, k, v, bi, bv, block, None, 0.5, False, 0.0)[0]
    (gq,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="block_sparse_attention_backward"):
        torch.autograd.grad(gq.sum(), q)


# ---------------------------------------------------------------------------------------------
# 5. dropout
# ---------------------------------------------------------------------------------------------

def test_dropout_replay_and_reproducibility():
    g = _gen(14)
    q, k, v, bi, bv, block, m = _case(g, 4, 2, True, "float", dtype=torch.float64)
    torch.manual_seed(1)
    out, _, seed = bsa(q, k, v, bi, bv, block, m, 0.4, True, 0.5)
    assert seed.dtype == torch.int64 and seed.device.type == "cpu"
    # reference: dense masked softmax, the same seeded keep-mask over [B, H, Lq, Lk] (Philox at each pair's
    # row-major offset: the draw the block kernels make in-kernel)
    from sparsify.ops._vjp import philox_dropout_scale
    visible = _token_mask(bi, bv, block, q.shape[2], k.shape[2], True)
    s = torch.einsum("bhid,bhjd->bhij", q, k.repeat_interleave(2, 1)) * 0.4 + m
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)
    ref = (p * philox_dropout_scale(p.shape, p.dtype, p.device, 0.5, seed)) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, ref)
    grad_out = torch.randn_like(out)
    for a, b in zip(_grads(out, (q, k, v, m), grad_out), _grads(ref, (q, k, v, m), grad_out)):
        torch.testing.assert_close(a, b)
    no_drop = bsa(q, k, v, bi, bv, block, m, 0.4, True, 0.0)[0]
    assert not torch.allclose(out, no_drop)
    torch.manual_seed(1)
    again, _, seed2 = bsa(q, k, v, bi, bv, block, m, 0.4, True, 0.5)
    assert torch.equal(seed, seed2) and torch.equal(again, out)
    zero = bsa(q, k, v, bi, bv, block, m, 0.4, True, 1.0)[0]
    assert torch.equal(zero, torch.zeros_like(zero))


# ---------------------------------------------------------------------------------------------
# 6. memory, FLOPs, compile
# ---------------------------------------------------------------------------------------------

def test_saved_tensors_exclude_probabilities():
    g = _gen(15)
    b, h, n, d, block = 1, 2, 64, 16, 8
    q, k, v = _qkv(g, b, h, h, n, n, d)
    bi, bv = _pattern(g, b, h, h, n, n, 2, block, True)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = bsa(q, k, v, bi, bv, block, None, 0.25, True, 0.0)[0]
    out.sum().backward()
    inputs = 4 * b * h * n * d * 4  # q, k, v and the output (the backward kernel reads D_i from it, as SDPA)
    assert sum(saved) - inputs < b * h * n * n * 4 / 4  # no [n, n] probabilities kept


def _count(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("b,h,hkv,lq,lk,d,dv,block,keep", [
    (2, 4, 2, 13, 17, 8, 6, 4, 2),
    (1, 2, 2, 8, 8, 16, 16, 4, 2),   # keep_blocks * block == Lk
])
def test_flop_formulas(b, h, hkv, lq, lk, d, dv, block, keep):
    g = _gen(16)
    q, k, v = _qkv(g, b, h, hkv, lq, lk, d, dv=dv)
    bi, bv = _pattern(g, b, h, hkv, lq, lk, keep, block, True)
    visited = min(lk, keep * block)
    fwd = 2 * b * h * lq * visited * (d + dv)
    assert _count(lambda: bsa(q, k, v, bi, bv, block, None, 0.5, True, 0.0)) == fwd
    total = _count(lambda: bsa(q, k, v, bi, bv, block, None, 0.5, True, 0.0)[0].sum().backward())
    assert total == fwd + 2 * b * h * lq * visited * (3 * d + 2 * dv)


def test_compile_aot_eager_matches_eager():
    g = _gen(17)
    q, k, v = _qkv(g, 2, 4, 2, 16, 16, 16)
    cb = _randn(g, 2, 16, 8)
    allowed = torch.ones(2, 1, 16, 16, dtype=torch.bool)  # an HF-shaped mask [B, 1, Lq, Lk]
    allowed[0, ..., -5:] = False
    allowed[1, :, 8:, :4] = False

    def f(q, k, v):
        qc = torch.ops.sparsify.pq_encode(q.detach(), cb)
        kc = torch.ops.sparsify.pq_encode(k.detach(), cb)
        bi, bv = select_blocks(qc, kc, 2, 4, True, allowed)
        return bsa(q, k, v, bi, bv, 4, allowed, 0.25, True, 0.0)[0]

    want = f(q, k, v)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    got_grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# 7. GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
class TestGPU:
    def test_select_blocks_cuda_equals_cpu(self):
        g = _gen(20)
        qc, kc = _codes(g, 2, 8, 300, 8, 16), _codes(g, 2, 2, 300, 8, 16)
        for allowed in (torch.rand(2, 1, 1, 300, generator=g) < 0.9, torch.rand(2, 8, 300, 300, generator=g) < 0.5):
            got = select_blocks(qc.cuda(), kc.cuda(), 4, 32, True, allowed.cuda())
            want = select_blocks(qc, kc, 4, 32, True, allowed)
            assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_attention_cuda_all_blocks_equals_sdpa(self, dtype):
        g = _gen(21)
        b, h, hkv, n, d, block = 2, 8, 2, 256, 64, 64
        q, k, v = (t.cuda().detach().requires_grad_() for t in _qkv(g, b, h, hkv, n, n, d, dtype=dtype))
        qc, kc = _codes(g, b, h, n).cuda(), _codes(g, b, hkv, n).cuda()
        bi, bv = select_blocks(qc, kc, n // block, block, True, None)
        out = bsa(q, k, v, bi, bv, block, None, d ** -0.5, True, 0.0)[0]
        want = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                              is_causal=True)
        tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(out, want, **tol)
        grad_out = torch.randn_like(out)
        for a, b_ in zip(_grads(out, (q, k, v), grad_out), _grads(want, (q, k, v), grad_out)):
            gtol = tol if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
            torch.testing.assert_close(a, b_, **gtol)
        assert math.isfinite(out.float().sum().item())


@pytest.mark.parametrize("causal", [False, True])
def test_select_blocks_with_the_codebook_size_is_the_same_selection(causal):
    """codewords= (what SPT's rewrite passes) only spares the look at the codes' range: the same blocks, and
    codes outside [0, codewords) are refused on the CPU."""
    g = _gen(21)
    q_codes, k_codes = _codes(g, 2, 4, 40, 3, 5), _codes(g, 2, 2, 40, 3, 5)
    want = select_blocks(q_codes, k_codes, 3, 8, causal, None)
    got = select_blocks(q_codes, k_codes, 3, 8, causal, None, 8)  # a larger E: empty histogram bins only
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(select_blocks(q_codes, k_codes, 3, 8, causal, None, 5)[0], want[0])
    with pytest.raises(ValueError, match="codes must be in"):
        select_blocks(q_codes, k_codes, 3, 8, causal, None, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_select_blocks_on_cuda_does_not_synchronise():
    g = _gen(22)
    q_codes, k_codes = (_codes(g, 1, 4, 512, 8, 16).cuda() for _ in range(2))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        select_blocks(q_codes, k_codes, 2, 64, True, None, 16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
