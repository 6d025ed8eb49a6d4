"""SPT with score="exact": sparsify::qk_select / qk_select_blocks (top-L by the true q . k) and the backend path.

Checked: both ops against brute-force loops (`allowed` masks of every broadcast shape and the structured ones:
sliding window, packed sequences, KV cache; causal, GQA, ties -> lower index, ELL layout, short rows masked),
opcheck, FLOP formulas, recall 1 by construction, and through the backend:
no codebook needed, keep=1 equals dense (forward and gradients), keep<1 equals SDPA on the selected pattern,
FlopCounterMode counts the selection's Q K^T.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import sparsify
import sparsify.ops  # noqa: F401  (registers the ops)
from families import assert_compiled_matches_eager, op_flops, tiny_inputs, tiny_model
from op_inputs import (HYP, RANDOM_ALLOWED, STRUCTURED_ALLOWED, gen as _gen, opcheck_ok as _ok, random_allowed,
                       structured_allowed)
from sparsify.ops.key_select import selection_recall
from sparsify.methods.spt import CODEBOOK
from test_spt_block_ops import brute_select_blocks
from test_spt_ops import STRUCTURED_SHAPES, brute_select

qk_select = torch.ops.sparsify.qk_select
qk_select_blocks = torch.ops.sparsify.qk_select_blocks


def _grid(g, *shape, levels=3):
    """Small integers as floats: q . k is exact in any order of summation, and ties are frequent."""
    return torch.randint(-levels, levels + 1, shape, generator=g).float()


def brute_qk_select(q, k, keep, causal, allowed):
    return brute_select(q, k, keep, causal, allowed, score_of=lambda qi, kj: float(qi @ kj))


@given(seed=st.integers(0, 2**16), lq=st.integers(1, 10), lk=st.integers(1, 10), data=st.data(),
       groups=st.sampled_from([1, 2]), hkv=st.sampled_from([1, 2]), causal=st.booleans(),
       allowed_kind=st.sampled_from(RANDOM_ALLOWED))
@settings(max_examples=40, **HYP)
def test_qk_select_matches_brute_force(seed, lq, lk, data, groups, hkv, causal, allowed_kind):
    g = _gen(seed)
    keep = data.draw(st.integers(1, lk))
    b, h, d = 2, hkv * groups, 4
    q, k = _grid(g, b, h, lq, d), _grid(g, b, hkv, lk, d)
    allowed = random_allowed(g, allowed_kind, b, h, lq, lk)
    index, valid = qk_select(q, k, keep, causal, allowed)
    want_index, want_valid = brute_qk_select(q, k, keep, causal, allowed)
    assert index.dtype == torch.int32 and valid.dtype == torch.bool
    assert torch.equal(valid, want_valid)
    assert torch.equal(index, want_index)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", STRUCTURED_ALLOWED)
def test_qk_select_structured_masks_match_brute_force(kind, causal):
    """Sliding window, packed sequences, KV-cache decode (bottom-right, Lq < Lk), with and without is_causal."""
    g = _gen(8)
    lq, lk = STRUCTURED_SHAPES[kind]
    q, k = _grid(g, 2, 4, lq, 4), _grid(g, 2, 2, lk, 4)
    allowed = structured_allowed(kind, 2, lq, lk)
    for keep in (1, 3, lk):
        got = qk_select(q, k, keep, causal, allowed)
        want = brute_qk_select(q, k, keep, causal, allowed)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_qk_select_ties_lowest_index_and_half_inputs():
    q = torch.ones(1, 1, 2, 4)
    k = torch.ones(1, 1, 8, 4)
    k[0, 0, 5] = 2.0  # the best key; the other seven tie
    index, valid = qk_select(q, k, 3, False, None)
    assert valid.all() and index[0, 0, 0].tolist() == [0, 1, 5]
    index16, valid16 = qk_select(q.half(), k.half(), 3, False, None)
    assert torch.equal(index16, index) and torch.equal(valid16, valid)


def test_qk_select_has_recall_one_and_chunks_consistently(monkeypatch):
    g = _gen(1)
    q, k = torch.randn(2, 4, 40, 8, generator=g), torch.randn(2, 2, 40, 8, generator=g)
    for allowed in (torch.rand(2, 1, 1, 40, generator=g) < 0.8,     # key padding
                    torch.rand(2, 1, 40, 40, generator=g) < 0.5,    # row by row (an HF mask)
                    torch.rand(2, 4, 40, 40, generator=g) < 0.5):   # per head
        monkeypatch.setattr(sparsify.ops.key_select, "_CHUNK_ELEMS", 1 << 24)
        index, valid = qk_select(q, k, 5, True, allowed)
        assert selection_recall(q, k, index, valid, 5, True, allowed) == 1.0
        monkeypatch.setattr(sparsify.ops.key_select, "_CHUNK_ELEMS", 37)  # a few rows per chunk: the mask's rows follow
        again = qk_select(q, k, 5, True, allowed)
        assert torch.equal(again[0], index) and torch.equal(again[1], valid)
    # recall reads the mask: the top-5 chosen without it keeps keys the mask forbids, measured below 1
    index, valid = qk_select(q, k, 5, True, None)
    assert selection_recall(q, k, index, valid, 5, True, allowed) < 0.9


def test_qk_select_bad_inputs():
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
    for keep in (0, 6):
        with pytest.raises(ValueError, match="keep"):
            qk_select(q, k, keep, False, None)
    with pytest.raises(ValueError, match="H % Hkv"):
        qk_select(q, torch.randn(1, 3, 5, 4), 2, False, None)
    for allowed in (torch.ones(1, 5, dtype=torch.bool), torch.ones(1, 1, 1, 4, dtype=torch.bool),
                    torch.ones(1, 2, 2, 5, dtype=torch.bool), torch.ones(1, 1, 3, 5, dtype=torch.uint8)):
        for op, args in ((qk_select, (q, k, 2, False, allowed)), (qk_select_blocks, (q, k, 1, 2, False, allowed))):
            with pytest.raises(ValueError, match="allowed must be a bool mask broadcastable to \\[B, H, Lq, Lk\\]"):
                op(*args)


@pytest.mark.parametrize("h,hkv,causal,allowed_kind", [(2, 2, False, None), (4, 2, True, "rows"), (4, 1, True, "keys"),
                                                      (4, 2, False, "heads"), (2, 1, True, "shared")])
def test_opcheck_qk_select(h, hkv, causal, allowed_kind):
    g = _gen(2)
    q, k = torch.randn(2, h, 6, 8, generator=g), torch.randn(2, hkv, 7, 8, generator=g)
    allowed = random_allowed(g, allowed_kind, 2, h, 6, 7)
    assert _ok(torch.library.opcheck(qk_select.default, (q, k, 3, causal, allowed)))
    blocks = (q, k, 2, 4, causal, allowed)
    assert _ok(torch.library.opcheck(qk_select_blocks.default, blocks))


def _dot_scores(q, k):
    """q . k of every (query, key) pair, [B, H, Lq, Lk] (GQA: each query head reads its kv head)."""
    return q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)


def brute_qk_select_blocks(q, k, keep, block, causal, allowed):
    """pq_select_blocks' brute force with the q . k of every pair as the token score: the sum over every query
    row of the block and the keys some query may attend to (the pooled score of the contract)."""
    return brute_select_blocks(q, k, keep, block, causal, allowed, token_scores=_dot_scores)


@given(seed=st.integers(0, 2**16), lq=st.integers(1, 13), lk=st.integers(1, 13), block=st.sampled_from([2, 4]),
       data=st.data(), hkv=st.sampled_from([1, 2]), causal=st.booleans(), allowed_kind=st.sampled_from(RANDOM_ALLOWED))
@settings(max_examples=30, **HYP)
def test_qk_select_blocks_matches_brute_force(seed, lq, lk, block, data, hkv, causal, allowed_kind):
    g = _gen(seed)
    keep = data.draw(st.integers(1, -(-lk // block)))
    q, k = _grid(g, 2, 2 * hkv, lq, 4), _grid(g, 2, hkv, lk, 4)
    allowed = random_allowed(g, allowed_kind, 2, 2 * hkv, lq, lk, p=0.5)
    got = qk_select_blocks(q, k, keep, block, causal, allowed)
    want = brute_qk_select_blocks(q, k, keep, block, causal, allowed)
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", STRUCTURED_ALLOWED)
def test_qk_select_blocks_structured_masks_match_brute_force(kind, causal):
    g = _gen(9)
    lq, lk = {"window": (22, 22), "packed": (21, 21), "kv_cache": (6, 21)}[kind]
    q, k = _grid(g, 2, 4, lq, 4), _grid(g, 2, 2, lk, 4)
    allowed = structured_allowed(kind, 2, lq, lk)
    for keep in (1, 2, -(-lk // 4)):
        got = qk_select_blocks(q, k, keep, 4, causal, allowed)
        want = brute_qk_select_blocks(q, k, keep, 4, causal, allowed)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_flop_formulas_of_the_selection():
    q, k = torch.randn(2, 4, 12, 8), torch.randn(2, 2, 10, 8)
    with FlopCounterMode(display=False) as counter:
        qk_select(q, k, 3, False, None)
        qk_select_blocks(q, k, 2, 4, False, None)
    flops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert flops["sparsify.qk_select"] == 2 * 2 * 4 * 12 * 10 * 8
    assert flops["sparsify.qk_select_blocks"] == 2 * 2 * 4 * 3 * 3 * 8


# ---------------------------------------------------------------------------------------------
# Through the backend
# ---------------------------------------------------------------------------------------------

def exact_options(**attention):
    base = {"method": "spt", "score": "exact", "keep": 1.0, "min_seq": 1}
    return {"attention": {**base, **attention}, "inner": "aot_eager"}



@pytest.mark.parametrize("family,granularity", [("bert", "token"), ("llama", "token"), ("gpt2", "block")])
def test_exact_keep_one_reproduces_dense_without_prepare(family, granularity):
    model = tiny_model(family, "sdpa").train()
    inputs = tiny_inputs(family, seq=32)
    options = exact_options(granularity=granularity, block_size=16)
    sparsify.prepare(model, **inputs, options=options)  # allowed, and a no-op for score="exact"
    assert not any(name.endswith(CODEBOOK) for name, _ in model.named_parameters())  # no state needed
    report = assert_compiled_matches_eager(model, inputs, options)
    assert {(r.decision, r.facts["score"]) for r in report.by_kind("attention")} == {("spt", "exact")}


def test_exact_selection_equals_sdpa_on_the_selected_pattern():
    """keep < 1: the op pair equals SDPA with a bool mask allowing exactly the top-L keys of q . k."""
    g = _gen(3)
    q, k, v = (torch.randn(1, 2, 32, 8, generator=g) for _ in range(3))
    index, valid = qk_select(q, k, 4, True, None)
    out, _, _ = torch.ops.sparsify.spt_attention(q, k, v, index, valid, None, 8 ** -0.5, 0.0)
    scores = (q @ k.transpose(-1, -2)).masked_fill(~torch.ones(32, 32, dtype=torch.bool).tril(), float("-inf"))
    top = scores.topk(4, dim=-1).indices
    allowed = torch.zeros(1, 2, 32, 32, dtype=torch.bool).scatter_(-1, top, True) & torch.ones(32, 32).tril().bool()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=allowed), atol=1e-5, rtol=0)


def test_exact_flops_count_the_selection_and_the_sparse_work():
    seq = 64
    inputs = tiny_inputs("bert", seq=seq, padded=False)
    flops = op_flops(tiny_model("bert", "sdpa").eval(), inputs, exact_options(keep=0.125))
    per_layer_dense = 2 * 2 * 4 * seq * seq * (8 + 8)  # 2·B·H·n·n·(D+Dv), as sparsify::attention counts
    assert flops["sparsify.spt_attention"] * 8 == 2 * per_layer_dense
    assert flops["sparsify.qk_select"] == 2 * (2 * 2 * 4 * seq * seq * 8)  # one Q K^T per layer
    assert "sparsify.pq_select" not in flops and "sparsify.pq_encode" not in flops


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_exact_selection_on_cuda_matches_cpu(dtype):
    """Integer-grid q/k make q . k exact in every dtype and summation order, so CUDA must pick the same keys."""
    g = _gen(7)
    q, k = _grid(g, 2, 4, 300, 16).to(dtype), _grid(g, 2, 2, 300, 16).to(dtype)
    kv = torch.rand(2, 1, 1, 300, generator=g) < 0.8
    rows = torch.rand(2, 1, 300, 300, generator=g) < 0.5
    for causal, allowed in ((False, kv), (True, kv), (True, rows)):
        want = qk_select(q, k, 37, causal, allowed)
        got = qk_select(q.cuda(), k.cuda(), 37, causal, allowed.cuda())
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
        want_b = qk_select_blocks(q, k, 2, 64, causal, allowed)
        got_b = qk_select_blocks(q.cuda(), k.cuda(), 2, 64, causal, allowed.cuda())
        assert torch.equal(got_b[0].cpu(), want_b[0]) and torch.equal(got_b[1].cpu(), want_b[1])
