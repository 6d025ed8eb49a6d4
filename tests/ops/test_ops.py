"""Tests for the sparsify:: torch.library ops (sparsify/ops): sparsify::attention and sparsify::mlp.

What is checked:
  * torch.library.opcheck (schema, autograd registration, fake kernel, AOT dispatch);
  * float64 gradcheck through the registered autograd (recompute-VJP backward ops);
  * hypothesis properties: attention == SDPA over repeated KV heads (GQA), mlp == plain torch;
  * dropout: drop rate, backward replaying the forward mask (returned seed), reproducibility;
  * FLOP formulas under torch.utils.flop_counter.FlopCounterMode;
  * clear ValueErrors for bad inputs;
  * the Triton up-projection path of the mlp op (Triton's interpreter on CPU);
  * on CUDA (marked gpu): both ops in fp16/bf16 against an fp32 CPU reference.
"""

import os

import torch

# Before sparsify (and its codegen) builds any Triton kernel. Triton reads TRITON_INTERPRET when a
# kernel is decorated; sparsify.codegen builds its kernels lazily and keys its cache on the mode,
# so setting it here is enough even when `import torch._dynamo` imported triton already. Only
# without CUDA: on a GPU machine a process-wide TRITON_INTERPRET=1 would turn every other test's
# Triton kernels into interpreted ones; there the interpreter tests set it per test (fixture).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import itertools  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import sparsify  # noqa: E402,F401  (registers torch.ops.sparsify.*)
from sparsify.ops import attention_reference, mlp_reference  # noqa: E402
from sparsify.ops import mlp as mlp_module  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()

attention_op = torch.ops.sparsify.attention
mlp_op = torch.ops.sparsify.mlp
ZERO_SEED = torch.zeros((), dtype=torch.int64)
ACTS = ("gelu", "gelu_tanh", "relu", "silu", "quick_gelu", "relu2")
TORCH_ACTS = {
    "gelu": lambda t: F.gelu(t),
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),
    "relu2": lambda t: F.relu(t) ** 2,
}
HYP = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _randn(g, *shape, dtype=torch.float32, requires_grad=False):
    t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    return t.requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------------------
# References (independent of sparsify's own reference functions)
# ---------------------------------------------------------------------------------------------

def _repeat_kv(k, v, heads):
    groups = heads // k.shape[1]
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def sdpa_reference(q, k, v, mask, scale, is_causal):
    """SDPA over KV heads repeated to the query head count (what HF's repeat_kv does). The ops' causal is
    bottom-right (sparsify/ops/causal.py), SDPA's is_causal top-left: they agree for Lq == Lk, else the reference
    passes the bottom-right mask explicitly."""
    k_rep, v_rep = _repeat_kv(k, v, q.shape[1])
    lq, lk = q.shape[-2], k.shape[-2]
    if is_causal and lq != lk:
        assert mask is None
        mask, is_causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq), False
    return F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask, dropout_p=0.0,
                                          is_causal=is_causal, scale=scale)


def manual_attention(q, k, v, mask, scale, is_causal):
    """Textbook attention, for the combinations SDPA refuses (attn_mask together with is_causal).

    Causal is bottom-right aligned (tril of ones(Lq, Lk) at diagonal Lk - Lq, sparsify/ops/causal.py), a bool mask keeps True, a float mask adds;
    rows with no finite score give 0 (SDPA's safe softmax)."""
    k_rep, v_rep = _repeat_kv(k, v, q.shape[1])
    scores = (q @ k_rep.transpose(-1, -2)) * scale
    lq, lk = scores.shape[-2:]
    if is_causal:
        keep = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return probs @ v_rep


def plain_proj(x, w, b, lora=None, s=1.0):
    y = F.linear(x, w, b)
    if lora is not None:
        a, bb = lora
        y = y + (x @ a.t()) @ bb.t() * s
    return y


def plain_mlp(x, up_w, up_b, gate_w, gate_b, down_w, down_b, activation, loras=(None, None, None),
              scales=(1.0, 1.0, 1.0)):
    act = TORCH_ACTS[activation]
    up = plain_proj(x, up_w, up_b, loras[0], scales[0])
    if gate_w is not None:
        h = act(plain_proj(x, gate_w, gate_b, loras[1], scales[1])) * up
    else:
        h = act(up)
    return plain_proj(h, down_w, down_b, loras[2], scales[2])


def mlp_args(x, up_w, up_b=None, gate_w=None, gate_b=None, down_w=None, down_b=None,
             loras=(None, None, None), scales=(1.0, 1.0, 1.0), activation="gelu", dropout_p=0.0):
    flat = []
    for pair in loras:
        flat += list(pair) if pair is not None else [None, None]
    return (x, up_w, up_b, gate_w, gate_b, down_w, down_b, *flat, list(scales), activation, dropout_p)


def make_mlp(g, lead=(2, 3), d_in=6, d_ff=10, d_out=5, gated=False, bias=False, lora_rank=0,
             dtype=torch.float32, requires_grad=False):
    """Random mlp tensors: (x, up_w, up_b, gate_w, gate_b, down_w, down_b, loras)."""
    def r(*shape):
        return _randn(g, *shape, dtype=dtype, requires_grad=requires_grad)
    x = r(*lead, d_in)
    up_w, down_w = r(d_ff, d_in) * 0.5, r(d_out, d_ff) * 0.5
    up_w, down_w = up_w.detach().requires_grad_(requires_grad), down_w.detach().requires_grad_(requires_grad)
    gate_w = r(d_ff, d_in) if gated else None
    up_b = r(d_ff) if bias else None
    gate_b = r(d_ff) if (bias and gated) else None
    down_b = r(d_out) if bias else None
    loras = [None, None, None]
    if lora_rank:
        loras[0] = (r(lora_rank, d_in), r(d_ff, lora_rank))
        if gated:
            loras[1] = (r(lora_rank, d_in), r(d_ff, lora_rank))
        loras[2] = (r(lora_rank, d_ff), r(d_out, lora_rank))
    return x, up_w, up_b, gate_w, gate_b, down_w, down_b, tuple(loras)


def _tensors(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


# ---------------------------------------------------------------------------------------------
# 1. opcheck
# ---------------------------------------------------------------------------------------------

ATTN_OPCHECK_CASES = {
    "plain": dict(b=2, h=2, hkv=2, lq=3, lk=5, d=4, mask=None, causal=False),
    "bool_mask": dict(b=2, h=2, hkv=2, lq=3, lk=5, d=4, mask="bool", causal=False),
    "float_mask_grad": dict(b=1, h=4, hkv=2, lq=4, lk=3, d=8, mask="float", causal=False),
    "gqa_causal": dict(b=1, h=4, hkv=1, lq=4, lk=6, d=4, mask=None, causal=True),
    "bool_mask_causal": dict(b=2, h=2, hkv=1, lq=5, lk=5, d=4, mask="bool", causal=True),
}


def _attn_inputs(g, b, h, hkv, lq, lk, d, mask, causal, dtype=torch.float32, dv=None, mask_shape=None,
                 requires_grad=True):
    q = _randn(g, b, h, lq, d, dtype=dtype, requires_grad=requires_grad)
    k = _randn(g, b, hkv, lk, d, dtype=dtype, requires_grad=requires_grad)
    v = _randn(g, b, hkv, lk, dv or d, dtype=dtype, requires_grad=requires_grad)
    shape = mask_shape or (b, 1, lq, lk)
    if mask == "bool":
        m = torch.rand(shape, generator=g) < 0.7
    elif mask == "float":
        m = _randn(g, *shape, dtype=dtype, requires_grad=requires_grad)
    else:
        m = None
    return q, k, v, m


@pytest.mark.parametrize("case", list(ATTN_OPCHECK_CASES), ids=list(ATTN_OPCHECK_CASES))
def test_opcheck_attention(case):
    c = ATTN_OPCHECK_CASES[case]
    q, k, v, m = _attn_inputs(_gen(0), **c)
    result = torch.library.opcheck(attention_op.default, (q, k, v, m, 1.0 / math.sqrt(c["d"]), 0.0, c["causal"]))
    assert result and all(r == "SUCCESS" for r in result.values()), result


MLP_OPCHECK_CASES = {
    "plain_nobias": dict(gated=False, bias=False, lora_rank=0, activation="gelu"),
    "plain_bias": dict(gated=False, bias=True, lora_rank=0, activation="relu"),
    "gated_nobias": dict(gated=True, bias=False, lora_rank=0, activation="silu"),
    "gated_bias_lora": dict(gated=True, bias=True, lora_rank=2, activation="gelu_tanh"),
    "plain_lora": dict(gated=False, bias=False, lora_rank=3, activation="gelu"),
}


@pytest.mark.parametrize("case", list(MLP_OPCHECK_CASES), ids=list(MLP_OPCHECK_CASES))
def test_opcheck_mlp(case):
    c = dict(MLP_OPCHECK_CASES[case])
    act = c.pop("activation")
    x, uw, ub, gw, gb, dw, db, loras = make_mlp(_gen(1), requires_grad=True, **c)
    args = mlp_args(x, uw, ub, gw, gb, dw, db, loras=loras, scales=(0.5, 2.0, 1.5), activation=act)
    result = torch.library.opcheck(mlp_op.default, args)
    assert result and all(r == "SUCCESS" for r in result.values()), result


def test_opcheck_non_contiguous_inputs():
    """HF layouts: q/k/v as [B, L, H, D] transposed views, GPT-2 Conv1D weights as transposed views."""
    g = _gen(30)
    q = _randn(g, 2, 5, 4, 8).transpose(1, 2).requires_grad_()
    k = _randn(g, 2, 6, 2, 8).transpose(1, 2).requires_grad_()
    v = _randn(g, 2, 6, 2, 8).transpose(1, 2).requires_grad_()
    assert not q.is_contiguous()
    result = torch.library.opcheck(attention_op.default, (q, k, v, None, 0.3, 0.0, True))
    assert all(r == "SUCCESS" for r in result.values()), result
    x = _randn(g, 3, 2, 6).transpose(0, 1).requires_grad_()
    up_w = _randn(g, 6, 10).t().requires_grad_()
    down_w = _randn(g, 10, 4).t().requires_grad_()
    result = torch.library.opcheck(mlp_op.default, mlp_args(x, up_w, down_w=down_w, activation="gelu_tanh"))
    assert all(r == "SUCCESS" for r in result.values()), result


def test_opcheck_backward_ops():
    g = _gen(31)
    q, k, v, m = _attn_inputs(g, 1, 4, 2, 3, 5, 4, "float", False, requires_grad=False)
    grad_out = _randn(g, 1, 4, 3, 4)
    for needs in ([True, True, True, True], [True, False, True, False]):
        result = torch.library.opcheck(torch.ops.sparsify.attention_backward.default,
                                       (grad_out, q, k, v, m, ZERO_SEED, 0.5, 0.0, True, needs))
        assert all(r == "SUCCESS" for r in result.values()), result
    x, uw, ub, gw, gb, dw, db, loras = make_mlp(g, gated=True, bias=True, lora_rank=2)
    args = mlp_args(x, uw, ub, gw, gb, dw, db, loras=loras)
    tensors = list(args[:13])
    needs = [t is not None for t in tensors]
    needs[0] = False
    result = torch.library.opcheck(torch.ops.sparsify.mlp_backward.default,
                                   (_randn(g, 2, 3, 5), tensors, ZERO_SEED, [1.0, 0.5, 2.0], "silu", 0.0, needs))
    assert all(r == "SUCCESS" for r in result.values()), result


# ---------------------------------------------------------------------------------------------
# 2. gradcheck (float64, through the registered autograd)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask_kind,mask_shape,causal", [
    (None, None, False),
    ("float", (2, 1, 3, 4), False),       # batch-broadcast additive bias with grad (T5 style)
    ("float", (1, 2, 3, 4), True),        # per-head bias plus causal
    ("float", (3, 4), False),             # 2-d mask broadcast over batch and heads
    ("bool", (2, 1, 1, 4), True),
])
def test_gradcheck_attention(mask_kind, mask_shape, causal):
    g = _gen(2)
    q, k, v, m = _attn_inputs(g, 2, 2, 1, 3, 4, 3, mask_kind, causal, dtype=torch.float64, dv=2,
                              mask_shape=mask_shape)

    def fn(q, k, v, *mask):
        return attention_op(q, k, v, mask[0] if mask else m, 0.7, 0.0, causal)[0]

    inputs = (q, k, v) + ((m,) if mask_kind == "float" else ())
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("gated,bias,lora_rank,activation", [
    (False, True, 0, "gelu"),
    (True, False, 0, "silu"),
    (True, True, 2, "gelu_tanh"),
    (False, False, 2, "gelu"),
])
def test_gradcheck_mlp(gated, bias, lora_rank, activation):
    x, uw, ub, gw, gb, dw, db, loras = make_mlp(_gen(3), lead=(2, 2), d_in=3, d_ff=4, d_out=3, gated=gated,
                                                bias=bias, lora_rank=lora_rank, dtype=torch.float64,
                                                requires_grad=True)
    args = mlp_args(x, uw, ub, gw, gb, dw, db, loras=loras, scales=(0.5, 2.0, 1.5), activation=activation)
    diff_idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    assert len(diff_idx) == 3 + (1 if gated else 0) + (2 + gated if bias else 0) + (
        (4 + 2 * gated) if lora_rank else 0)

    def fn(*ts):
        full = list(args)
        for i, t in zip(diff_idx, ts):
            full[i] = t
        return mlp_op(*full)[0]

    assert torch.autograd.gradcheck(fn, tuple(args[i] for i in diff_idx))


def test_double_backward_is_a_clear_error():
    """The backward ops have no autograd of their own: double backward must raise, not return junk."""
    q, k, v, _ = _attn_inputs(_gen(4), 1, 1, 1, 3, 3, 4, None, False, dtype=torch.float64)
    out, _ = attention_op(q, k, v, None, 0.5, 0.0, False)
    (gq,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="attention_backward"):
        torch.autograd.grad(gq.sum(), q)


# ---------------------------------------------------------------------------------------------
# 3. hypothesis: attention == SDPA over repeated KV, mlp == plain torch
# ---------------------------------------------------------------------------------------------

# (atol, rtol) for the forward and for the gradients
TOLS = {
    torch.float64: ((1e-10, 1e-8), (1e-9, 1e-7)),
    torch.float32: ((1e-5, 1e-5), (5e-5, 1e-4)),
    torch.float16: ((5e-3, 5e-3), (2e-2, 2e-2)),
    torch.bfloat16: ((3e-2, 3e-2), (1e-1, 5e-2)),
}
LOW_PRECISION = (torch.float16, torch.bfloat16)


@st.composite
def attention_cases(draw):
    b = draw(st.integers(1, 2))
    h = draw(st.sampled_from([1, 2, 4]))
    hkv = draw(st.sampled_from([d for d in (1, 2, 4) if h % d == 0]))
    lq, lk = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    d = draw(st.sampled_from([4, 8, 16]))
    dv = draw(st.sampled_from([d, 4]))
    kind = draw(st.sampled_from(["none", "bool", "float", "causal"]))
    mask_shape = draw(st.sampled_from([(b, h, lq, lk), (b, 1, lq, lk), (1, 1, lq, lk), (b, 1, 1, lk), (lq, lk)]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    scale = draw(st.sampled_from([None, 0.3]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(b=b, h=h, hkv=hkv, lq=lq, lk=lk, d=d, dv=dv, kind=kind, mask_shape=mask_shape, dtype=dtype,
                scale=scale, seed=seed)


@settings(max_examples=40, **HYP)
@given(attention_cases())
def test_attention_matches_sdpa(case):
    g = _gen(case["seed"])
    dtype, kind = case["dtype"], case["kind"]
    mask_kind = kind if kind in ("bool", "float") else None
    causal = kind == "causal"
    q, k, v, m = _attn_inputs(g, case["b"], case["h"], case["hkv"], case["lq"], case["lk"], case["d"], mask_kind,
                              causal, dtype=dtype, dv=case["dv"], mask_shape=case["mask_shape"])
    scale = case["scale"] if case["scale"] is not None else 1.0 / math.sqrt(case["d"])
    leaves = [q, k, v] + ([m] if mask_kind == "float" else [])

    out, seed = attention_op(q, k, v, m, scale, 0.0, causal)
    assert out.dtype == dtype and out.shape == (case["b"], case["h"], case["lq"], case["dv"])
    assert seed.dtype == torch.int64 and seed.shape == ()
    grad_out = _randn(g, *out.shape, dtype=dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)

    # reference: SDPA, in fp32 for the low-precision dtypes (then cast back)
    ref_dtype = torch.float32 if dtype in LOW_PRECISION else dtype
    ref_leaves = [t.detach().to(ref_dtype).requires_grad_() for t in leaves]
    rq, rk, rv = ref_leaves[:3]
    rm = ref_leaves[3] if mask_kind == "float" else m
    ref = sdpa_reference(rq, rk, rv, rm, scale, causal)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.to(ref_dtype))

    (fa, fr), (ga, gr) = TOLS[dtype]
    torch.testing.assert_close(out, ref.to(dtype), atol=fa, rtol=fr)
    for name, got, want in zip("qkvm", grads, ref_grads):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want.to(dtype), atol=ga, rtol=gr, msg=lambda s: f"d{name}: {s}")


@settings(max_examples=25, **HYP)
@given(
    b=st.integers(1, 2), h=st.sampled_from([1, 2, 4]), lq=st.integers(1, 9), lk=st.integers(1, 9),
    kind=st.sampled_from(["bool", "float"]), dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_attention_mask_and_causal_matches_manual(b, h, lq, lk, kind, dtype, seed):
    """SDPA refuses attn_mask with is_causal=True; the op takes both (causal AND mask)."""
    g = _gen(seed)
    q, k, v, m = _attn_inputs(g, b, h, 1, lq, lk, 4, kind, True, dtype=dtype, mask_shape=(b, 1, lq, lk))
    leaves = [q, k, v] + ([m] if kind == "float" else [])
    out, _ = attention_op(q, k, v, m, 0.5, 0.0, True)
    ref = manual_attention(q, k, v, m, 0.5, True)
    (fa, fr), (ga, gr) = TOLS[dtype]
    torch.testing.assert_close(out, ref, atol=fa, rtol=fr)
    grad_out = _randn(g, *out.shape, dtype=dtype)
    for got, want in zip(torch.autograd.grad(out, leaves, grad_out), torch.autograd.grad(ref, leaves, grad_out)):
        torch.testing.assert_close(got, want, atol=ga, rtol=gr)


def test_fully_masked_bool_row_is_zero_like_sdpa():
    """On this torch SDPA (math path and the CPU fused kernel alike) gives 0 for a query row whose
    bool mask is all False (its "safe softmax"), not NaN; the op must match, with finite grads."""
    g = _gen(5)
    q, k, v, _ = _attn_inputs(g, 1, 2, 1, 3, 4, 4, None, False)
    m = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    m[..., 1, :] = False
    sdpa = sdpa_reference(q, k, v, m, 0.5, False)
    assert torch.equal(sdpa[..., 1, :], torch.zeros_like(sdpa[..., 1, :]))  # documents SDPA here
    out, _ = attention_op(q, k, v, m, 0.5, 0.0, False)
    assert torch.equal(out[..., 1, :], torch.zeros_like(out[..., 1, :]))
    torch.testing.assert_close(out, sdpa, atol=1e-5, rtol=1e-5)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    assert torch.equal(dq[..., 1, :], torch.zeros_like(dq[..., 1, :]))
    # also a row emptied by causal + bool mask together (bottom-right: keys 0 and 1 visible to query 0, both masked)
    m2 = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    m2[..., 0, :2] = False
    out2, _ = attention_op(q, k, v, m2, 0.5, 0.0, True)
    assert torch.equal(out2[..., 0, :], torch.zeros_like(out2[..., 0, :]))
    torch.testing.assert_close(out2, manual_attention(q, k, v, m2, 0.5, True), atol=1e-5, rtol=1e-5)


def test_float_mask_with_some_neg_inf_matches_sdpa():
    """-inf entries in an additive mask (not whole rows) act like masked-out keys, grads finite."""
    g = _gen(6)
    q, k, v, _ = _attn_inputs(g, 1, 2, 2, 3, 4, 4, None, False, dtype=torch.float64)
    m = _randn(g, 1, 1, 3, 4, dtype=torch.float64)
    m[..., 0, 1] = m[..., 2, 0] = m[..., 2, 3] = float("-inf")
    m.requires_grad_()
    out, _ = attention_op(q, k, v, m, 0.5, 0.0, False)
    ref = sdpa_reference(q, k, v, m, 0.5, False)
    torch.testing.assert_close(out, ref)
    for got, want in zip(torch.autograd.grad(out.sum(), (q, k, v, m)), torch.autograd.grad(ref.sum(), (q, k, v, m))):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


def test_float_mask_fully_neg_inf_row_is_zero_like_sdpa():
    g = _gen(7)
    q, k, v, _ = _attn_inputs(g, 1, 1, 1, 3, 3, 4, None, False, requires_grad=False)
    m = torch.zeros(1, 1, 3, 3)
    m[..., 1, :] = float("-inf")
    sdpa = sdpa_reference(q, k, v, m, 0.5, False)
    assert torch.equal(sdpa[..., 1, :], torch.zeros(1, 1, 4))  # what SDPA does on this torch
    out, _ = attention_op(q, k, v, m, 0.5, 0.0, False)
    torch.testing.assert_close(out, sdpa)  # the op gives NaN in row 1


def test_fp16_finfo_min_padding_row_matches_sdpa():
    dt = torch.float16
    q = torch.ones(1, 1, 2, 8, dtype=dt)
    k = -5 * torch.ones(1, 1, 3, 8, dtype=dt)           # every score is -200
    v = _randn(_gen(32), 1, 1, 3, 4, dtype=dt)
    m = torch.zeros(1, 1, 2, 3, dtype=dt)
    m[..., 1, :] = torch.finfo(dt).min                   # query 1 is padding: every key masked
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=1.0)
    sdpa32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m.float(), scale=1.0)
    torch.testing.assert_close(sdpa.float(), sdpa32, atol=2e-3, rtol=2e-3)  # what SDPA does on this torch
    out, _ = attention_op(q, k, v, m, 1.0, 0.0, False)
    assert torch.isfinite(out).all(), out                # the op gives NaN in row 1
    torch.testing.assert_close(out, sdpa, atol=2e-3, rtol=2e-3)


@st.composite
def mlp_cases(draw):
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    return dict(
        lead=lead, d_in=draw(st.integers(1, 8)), d_ff=draw(st.integers(1, 12)), d_out=draw(st.integers(1, 8)),
        gated=draw(st.booleans()), bias=draw(st.booleans()), lora_rank=draw(st.sampled_from([0, 0, 1, 2])),
        activation=draw(st.sampled_from(ACTS)), dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        scales=tuple(draw(st.sampled_from([0.5, 1.0, 2.0])) for _ in range(3)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=40, **HYP)
@given(mlp_cases())
def test_mlp_matches_plain_torch(case):
    g = _gen(case["seed"])
    dtype = case["dtype"]
    x, uw, ub, gw, gb, dw, db, loras = make_mlp(g, lead=case["lead"], d_in=case["d_in"], d_ff=case["d_ff"],
                                                d_out=case["d_out"], gated=case["gated"], bias=case["bias"],
                                                lora_rank=case["lora_rank"], dtype=dtype, requires_grad=True)
    args = mlp_args(x, uw, ub, gw, gb, dw, db, loras=loras, scales=case["scales"], activation=case["activation"])
    out, seed = mlp_op(*args)
    assert out.shape == (*case["lead"], case["d_out"]) and out.dtype == dtype
    ref = plain_mlp(x, uw, ub, gw, gb, dw, db, case["activation"], loras=loras, scales=case["scales"])
    (fa, fr), (ga, gr) = TOLS[dtype]
    torch.testing.assert_close(out, ref, atol=fa, rtol=fr)
    leaves = _tensors(args)
    grad_out = _randn(g, *out.shape, dtype=dtype)
    for got, want in zip(torch.autograd.grad(out, leaves, grad_out), torch.autograd.grad(ref, leaves, grad_out)):
        torch.testing.assert_close(got, want, atol=ga, rtol=gr)


def test_mlp_partial_requires_grad():
    """Only some inputs need grad (frozen base weights, trainable LoRA): grads only for those."""
    g = _gen(8)
    x, uw, ub, gw, gb, dw, db, loras = make_mlp(g, gated=True, bias=True, lora_rank=2)
    for pair in loras:
        if pair is not None:
            for t in pair:
                t.requires_grad_()
    args = mlp_args(x, uw, ub, gw, gb, dw, db, loras=loras, activation="silu")
    out, _ = mlp_op(*args)
    out.sum().backward()
    assert uw.grad is None and x.grad is None and db.grad is None
    ref = plain_mlp(x, uw, ub, gw, gb, dw, db, "silu", loras=[tuple(t.detach().requires_grad_() for t in p)
                                                              for p in loras])
    torch.testing.assert_close(out, ref)


# ---------------------------------------------------------------------------------------------
# 4. dropout
# ---------------------------------------------------------------------------------------------

P = 0.5


def _dropped_fraction_bounds(n):
    sigma = math.sqrt(P * (1 - P) / n)
    return P - 6 * sigma, P + 6 * sigma


def test_attention_dropout_rate():
    """q = 0 gives uniform probs 1/Lk; with v = I each output element is one (dropped) probability."""
    b, h, lq, lk = 2, 2, 32, 32
    q = torch.zeros(b, h, lq, 8)
    k = torch.randn(b, h, lk, 8)
    v = torch.eye(lk).expand(b, h, lk, lk).contiguous()
    torch.manual_seed(0)
    out, seed = attention_op(q, k, v, None, 1.0, P, False)
    kept = 1.0 / lk / (1 - P)
    dropped = out == 0
    assert torch.all(dropped | torch.isclose(out, torch.tensor(kept)))  # kept values are rescaled
    lo, hi = _dropped_fraction_bounds(out.numel())
    assert lo < dropped.float().mean().item() < hi
    assert seed.dtype == torch.int64 and seed.device.type == "cpu"


def test_mlp_dropout_rate():
    """relu, identity up/down projections and positive x: each output is one (dropped) activation."""
    n = 24
    x = torch.rand(8, 16, n) + 0.5
    eye = torch.eye(n)
    torch.manual_seed(0)
    out, _ = mlp_op(*mlp_args(x, eye, None, None, None, eye, None, activation="relu", dropout_p=P))
    dropped = out == 0
    assert torch.all(dropped | torch.isclose(out, x / (1 - P)))
    lo, hi = _dropped_fraction_bounds(out.numel())
    assert lo < dropped.float().mean().item() < hi


def test_attention_dropout_backward_replays_forward_mask():
    g = _gen(9)
    q, k, v, m = _attn_inputs(g, 2, 4, 2, 5, 6, 8, "float", False, dtype=torch.float64)
    torch.manual_seed(1)
    out, seed = attention_op(q, k, v, m, 0.4, P, False)
    ref = attention_reference(q, k, v, m, 0.4, P, False, seed)
    torch.testing.assert_close(out, ref)
    no_drop, _ = attention_op(q, k, v, m, 0.4, 0.0, False)
    assert not torch.allclose(out, no_drop)  # dropout did something
    grad_out = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v, m), grad_out),
                         torch.autograd.grad(ref, (q, k, v, m), grad_out)):
        torch.testing.assert_close(got, want)


def test_mlp_dropout_backward_replays_forward_mask():
    g = _gen(10)
    x, uw, ub, gw, gb, dw, db, loras = make_mlp(g, gated=True, bias=True, lora_rank=2, dtype=torch.float64,
                                                requires_grad=True)
    args = mlp_args(x, uw, ub, gw, gb, dw, db, loras=loras, scales=(0.5, 1.0, 2.0), activation="gelu",
                    dropout_p=P)
    torch.manual_seed(2)
    out, seed = mlp_op(*args)
    ref = mlp_reference(*args, seed)
    torch.testing.assert_close(out, ref)
    no_drop, _ = mlp_op(*args[:-1], 0.0)
    assert not torch.allclose(out, no_drop)
    leaves = _tensors(args)
    grad_out = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, leaves, grad_out), torch.autograd.grad(ref, leaves, grad_out)):
        torch.testing.assert_close(got, want)


def test_dropout_reproducible_under_manual_seed():
    g = _gen(11)
    q, k, v, _ = _attn_inputs(g, 1, 2, 2, 6, 6, 4, None, False, requires_grad=False)
    x, uw, ub, gw, gb, dw, db, _ = make_mlp(g, gated=True)
    margs = mlp_args(x, uw, ub, gw, gb, dw, db, activation="silu", dropout_p=P)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append((attention_op(q, k, v, None, 0.5, P, False), mlp_op(*margs)))
    (a1, s1), (m1, t1) = runs[0]
    (a2, s2), (m2, t2) = runs[1]
    assert torch.equal(s1, s2) and torch.equal(a1, a2)
    assert torch.equal(t1, t2) and torch.equal(m1, m2)
    torch.manual_seed(124)
    a3, s3 = attention_op(q, k, v, None, 0.5, P, False)
    assert not torch.equal(s1, s3) and not torch.equal(a1, a3)


def test_dropout_p_one_gives_zeros():
    g = _gen(33)
    q, k, v, _ = _attn_inputs(g, 1, 2, 2, 3, 3, 4, None, False, requires_grad=False)
    assert torch.equal(F.dropout(torch.ones(3), 1.0), torch.zeros(3))
    out, _ = attention_op(q, k, v, None, 0.5, 1.0, False)
    torch.testing.assert_close(out, torch.zeros_like(out))
    x, uw, _, _, _, dw, _, _ = make_mlp(g)
    out, _ = mlp_op(*mlp_args(x, uw, down_w=dw, activation="relu", dropout_p=1.0))
    torch.testing.assert_close(out, torch.zeros_like(out))


# ---------------------------------------------------------------------------------------------
# 5. FLOPs
# ---------------------------------------------------------------------------------------------

def _count(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops(), counter.get_flop_counts()


@pytest.mark.parametrize("b,h,hkv,lq,lk,d,dv", [(2, 4, 2, 3, 5, 8, 6), (1, 2, 2, 7, 7, 4, 4), (1, 4, 1, 1, 9, 16, 8)])
def test_attention_flops(b, h, hkv, lq, lk, d, dv):
    q, k, v, m = _attn_inputs(_gen(12), b, h, hkv, lq, lk, d, "float", False, dv=dv)
    expected = 2 * b * h * lq * lk * (d + dv)
    fwd, counts = _count(lambda: attention_op(q, k, v, m, 0.5, 0.0, False))
    assert fwd == expected, counts
    total, counts = _count(lambda: attention_op(q, k, v, m, 0.5, 0.0, False)[0].sum().backward())
    assert total == 4 * expected, counts


@pytest.mark.parametrize("gated,bias", list(itertools.product([False, True], [False, True])))
def test_mlp_flops(gated, bias):
    lead, d_in, d_ff, d_out = (2, 3), 6, 10, 5
    x, uw, ub, gw, gb, dw, db, loras = make_mlp(_gen(13), lead=lead, d_in=d_in, d_ff=d_ff, d_out=d_out,
                                                gated=gated, bias=bias, requires_grad=True)
    args = mlp_args(x, uw, ub, gw, gb, dw, db, activation="gelu")
    t = math.prod(lead)
    expected = 2 * t * (d_ff * d_in * (2 if gated else 1) + d_out * d_ff)
    fwd, counts = _count(lambda: mlp_op(*args))
    assert fwd == expected, counts
    total, counts = _count(lambda: mlp_op(*args)[0].sum().backward())
    assert total == 4 * expected, counts


def test_mlp_flops_with_lora():
    lead, d_in, d_ff, d_out, r = (4,), 6, 10, 5, 2
    x, uw, ub, gw, gb, dw, db, loras = make_mlp(_gen(14), lead=lead, d_in=d_in, d_ff=d_ff, d_out=d_out,
                                                gated=True, lora_rank=r)
    t = 4
    expected = 2 * t * (d_ff * d_in * 2 + d_out * d_ff)
    expected += 2 * (2 * t * (r * d_in + d_ff * r))   # up and gate LoRA: x @ A^T, then @ B^T
    expected += 2 * t * (r * d_ff + d_out * r)         # down LoRA
    fwd, counts = _count(lambda: mlp_op(*mlp_args(x, uw, ub, gw, gb, dw, db, loras=loras)))
    assert fwd == expected, counts


# ---------------------------------------------------------------------------------------------
# 6. errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("q_shape,k_shape,v_shape", [
    ((1, 3, 2, 4), (1, 2, 2, 4), (1, 2, 2, 4)),   # 3 query heads, 2 kv heads
    ((1, 4, 2, 4), (1, 2, 2, 4), (1, 1, 2, 4)),   # k and v head counts differ
    ((1, 2, 2, 4), (1, 2, 2, 8), (1, 2, 2, 4)),   # q/k head dims differ
    ((1, 2, 2, 4), (1, 2, 3, 4), (1, 2, 2, 4)),   # k/v lengths differ
    ((2, 2, 4), (2, 2, 4), (2, 2, 4)),            # not 4-d
])
def test_attention_bad_shapes_raise(q_shape, k_shape, v_shape):
    with pytest.raises(ValueError, match="sparsify"):
        attention_op(torch.randn(q_shape), torch.randn(k_shape), torch.randn(v_shape), None, 1.0, 0.0, False)


def test_mlp_bad_inputs_raise():
    x = torch.randn(2, 4)
    up, down = torch.randn(3, 4), torch.randn(2, 3)
    with pytest.raises(ValueError, match="sparsify.*activation"):
        mlp_op(*mlp_args(x, up, down_w=down, activation="tanh"))
    with pytest.raises(ValueError, match="sparsify"):  # up does not take x's width
        mlp_op(*mlp_args(x, torch.randn(3, 5), down_w=down))
    with pytest.raises(ValueError, match="sparsify"):  # down does not take up's width
        mlp_op(*mlp_args(x, up, down_w=torch.randn(2, 4)))
    with pytest.raises(ValueError, match="sparsify"):  # gate shaped differently from up
        mlp_op(*mlp_args(x, up, gate_w=torch.randn(4, 4), down_w=down))


# ---------------------------------------------------------------------------------------------
# 7. the Triton up-projection path (interpreter on CPU)
# ---------------------------------------------------------------------------------------------

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


# kernel_cache_dir and interpreter: tests/conftest.py


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy exp in the interpreter
@pytest.mark.parametrize("activation,gated,bias", [
    ("gelu", False, True), ("gelu_tanh", False, False), ("relu", False, True), ("silu", False, False),
    ("gelu", True, False), ("gelu_tanh", True, True), ("relu", True, False), ("silu", True, True),
])
def test_mlp_forward_triton_matches_reference(interpreter, activation, gated, bias):
    # T = 2*11 = 22 and N = 20 span two 16-blocks with a ragged edge; K = 20 two k-steps
    x, uw, ub, gw, gb, dw, db, _ = make_mlp(_gen(15), lead=(2, 11), d_in=20, d_ff=20, d_out=7, gated=gated,
                                            bias=bias)
    out = mlp_module.mlp_forward_triton(x, uw, ub, gw, gb, dw, db, None, None, 1.0, activation, 0.0,
                                        torch.zeros((), dtype=torch.int64))
    ref = mlp_reference(*mlp_args(x, uw, ub, gw, gb, dw, db, activation=activation), ZERO_SEED)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@needs_triton
def test_mlp_forward_triton_transposed_weights_down_lora_dropout(interpreter):
    """GPT-2 Conv1D weights arrive as transposed views; down-side LoRA and dropout run after the kernel."""
    g = _gen(16)
    x, _, ub, _, _, _, db, loras = make_mlp(g, lead=(5,), d_in=9, d_ff=18, d_out=4, bias=True, lora_rank=2)
    uw = _randn(g, 9, 18).t()   # [d_ff, d_in] view of a [d_in, d_ff] tensor
    dw = _randn(g, 18, 4).t()
    la, lb = loras[2]
    seed = torch.tensor(1234, dtype=torch.int64)
    out = mlp_module.mlp_forward_triton(x, uw, ub, None, None, dw, db, la, lb, 0.5, "gelu", 0.3, seed)
    ref = mlp_reference(x, uw, ub, None, None, dw, db, None, None, None, None, la, lb, [1.0, 1.0, 0.5], "gelu",
                        0.3, seed)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy exp in the interpreter
@pytest.mark.parametrize("gated", [False, True])
def test_mlp_forward_triton_large_inputs_stay_finite(interpreter, gated):
    """Pre-activations of several hundred: exp-based tanh / sigmoid must saturate, not give NaN."""
    g = _gen(34)
    x = _randn(g, 3, 16) * 30
    uw, gw = _randn(g, 16, 16), (_randn(g, 16, 16) if gated else None)
    eye = torch.eye(16)
    for activation in ACTS:
        out = mlp_module.mlp_forward_triton(x, uw, None, gw, None, eye, None, None, None, 1.0, activation, 0.0,
                                            ZERO_SEED)
        ref = mlp_reference(*mlp_args(x, uw, gate_w=gw, down_w=eye, activation=activation), ZERO_SEED)
        assert torch.isfinite(out).all(), activation
        torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-4, msg=lambda m: f"{activation}: {m}")


@needs_triton
def test_mlp_forward_triton_fp16(interpreter):
    # (bf16 is left out: Triton 3.9's interpreter returns garbage for a bf16 tl.dot, even in a
    # 16x16 one-line kernel, so it cannot check the kernel; the GPU tests cover bf16.)
    x, uw, ub, gw, gb, dw, db, _ = make_mlp(_gen(35), lead=(3,), d_in=20, d_ff=18, d_out=5, gated=True,
                                            bias=True, dtype=torch.float16)
    out = mlp_module.mlp_forward_triton(x, uw, ub, gw, gb, dw, db, None, None, 1.0, "silu", 0.0, ZERO_SEED)
    assert out.dtype == torch.float16
    ref = plain_mlp(*(t.float() if t is not None else None for t in (x, uw, ub, gw, gb, dw, db)), "silu")
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)


def _cuda_kernel_of_mlp():
    """The Python function registered as sparsify::mlp's CUDA kernel (called directly on CPU tensors,
    under the interpreter, to exercise its dispatch logic without a GPU)."""
    fns = getattr(mlp_module.mlp, "_backend_fns", None)
    if not fns or "cuda" not in fns:
        pytest.skip("cannot reach the registered CUDA kernel of sparsify::mlp")
    return fns["cuda"]


@needs_triton
def test_mlp_cuda_kernel_logic_uses_triton(interpreter):
    from sparsify.codegen import cache_info

    cuda_kernel = _cuda_kernel_of_mlp()
    x, uw, ub, gw, gb, dw, db, loras = make_mlp(_gen(17), lead=(3, 4), gated=True, bias=True, lora_rank=2)
    loras = (None, None, loras[2])  # down LoRA still takes the Triton path
    args = mlp_args(x, uw, ub, gw, gb, dw, db, loras=loras, scales=(1.0, 1.0, 0.5), activation="silu")
    before = cache_info()
    out, seed = cuda_kernel(*args)
    after = cache_info()
    assert after.hits + after.misses > before.hits + before.misses
    torch.testing.assert_close(out, mlp_reference(*args, ZERO_SEED), atol=1e-4, rtol=1e-4)


@needs_triton
def test_mlp_cuda_kernel_logic_float64(interpreter):
    cuda_kernel = _cuda_kernel_of_mlp()
    x, uw, ub, gw, gb, dw, db, _ = make_mlp(_gen(18), gated=True, dtype=torch.float64)
    args = mlp_args(x, uw, ub, gw, gb, dw, db, activation="gelu")
    out, _ = cuda_kernel(*args)
    torch.testing.assert_close(out, mlp_reference(*args, ZERO_SEED))


@needs_triton
def test_mlp_cuda_kernel_logic_gated_one_bias(interpreter):
    cuda_kernel = _cuda_kernel_of_mlp()
    g = _gen(19)
    x, uw, _, gw, _, dw, db, _ = make_mlp(g, gated=True)
    ub = _randn(g, uw.shape[0])
    args = mlp_args(x, uw, ub, gw, None, dw, db, activation="silu")
    out, _ = cuda_kernel(*args)
    torch.testing.assert_close(out, mlp_reference(*args, ZERO_SEED), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# 8. CUDA
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
class TestCuda:
    # (atol, rtol) forward, grads: vs an fp32 CPU reference
    TOL = {torch.float16: ((5e-3, 5e-3), (2e-2, 2e-2)), torch.bfloat16: ((3e-2, 3e-2), (1e-1, 5e-2))}

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("mask_kind,causal,hkv", [(None, False, 4), ("bool", False, 2), ("float", False, 1),
                                                      (None, True, 2), ("bool", True, 1)])
    def test_attention(self, dtype, mask_kind, causal, hkv):
        g = _gen(20)
        q, k, v, m = _attn_inputs(g, 2, 4, hkv, 7, 9, 16, mask_kind, causal, mask_shape=(2, 1, 7, 9))
        cpu_leaves = [q, k, v] + ([m] if mask_kind == "float" else [])
        dev_leaves = [t.detach().to("cuda", dtype).requires_grad_() for t in cpu_leaves]
        dm = dev_leaves[3] if mask_kind == "float" else (m.cuda() if m is not None else None)
        out, seed = attention_op(*dev_leaves[:3], dm, 0.25, 0.0, causal)
        assert out.is_cuda and out.dtype == dtype
        ref = manual_attention(q, k, v, m, 0.25, causal)
        grad_out = _randn(g, *ref.shape)
        (fa, fr), (ga, gr) = self.TOL[dtype]
        torch.testing.assert_close(out.float().cpu(), ref, atol=fa, rtol=fr)
        got = torch.autograd.grad(out, dev_leaves, grad_out.to("cuda", dtype))
        want = torch.autograd.grad(ref, cpu_leaves, grad_out)
        for a, b in zip(got, want):
            assert a.is_cuda and a.dtype == dtype
            torch.testing.assert_close(a.float().cpu(), b, atol=ga, rtol=gr)

    def test_attention_dropout_backward_replays_mask(self):
        g = _gen(21)
        q, k, v, _ = _attn_inputs(g, 1, 2, 2, 5, 5, 8, None, False, dtype=torch.float32)
        dq, dk, dv = (t.detach().cuda().requires_grad_() for t in (q, k, v))
        out, seed = attention_op(dq, dk, dv, None, 0.3, P, False)
        ref = attention_reference(dq, dk, dv, None, 0.3, P, False, seed)
        torch.testing.assert_close(out, ref)
        grad_out = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (dq, dk, dv), grad_out),
                        torch.autograd.grad(ref, (dq, dk, dv), grad_out)):
            torch.testing.assert_close(a, b)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("gated,bias,activation", [(False, True, "gelu"), (True, False, "silu"),
                                                       (True, True, "gelu_tanh"), (False, False, "relu")])
    def test_mlp_uses_triton(self, monkeypatch, kernel_cache_dir, dtype, gated, bias, activation):
        from sparsify.codegen import cache_info

        monkeypatch.setenv("TRITON_INTERPRET", "0")  # compiled kernels, not the interpreter
        g = _gen(22)
        x, uw, ub, gw, gb, dw, db, loras = make_mlp(g, lead=(3, 40), d_in=64, d_ff=96, d_out=32, gated=gated,
                                                    bias=bias, requires_grad=True)
        cpu_args = mlp_args(x, uw, ub, gw, gb, dw, db, activation=activation)
        cpu_leaves = _tensors(cpu_args)
        dev_args = tuple(a.detach().to("cuda", dtype).requires_grad_() if isinstance(a, torch.Tensor) else a
                         for a in cpu_args)
        dev_leaves = _tensors(dev_args)
        before = cache_info()
        out, _ = mlp_op(*dev_args)
        after = cache_info()
        assert after.hits + after.misses > before.hits + before.misses, "the CUDA mlp did not use Triton"
        assert out.is_cuda and out.dtype == dtype
        ref = plain_mlp(x, uw, ub, gw, gb, dw, db, activation)
        (fa, fr), (ga, gr) = self.TOL[dtype]
        scale = ref.abs().max().item()  # d_in = 64: absolute error grows with the magnitudes
        torch.testing.assert_close(out.float().cpu(), ref, atol=fa * max(1.0, scale), rtol=fr)
        grad_out = _randn(g, *ref.shape)
        got = torch.autograd.grad(out, dev_leaves, grad_out.to("cuda", dtype))
        want = torch.autograd.grad(ref, cpu_leaves, grad_out)
        for a, b in zip(got, want):
            assert a.is_cuda and a.dtype == dtype
            torch.testing.assert_close(a.float().cpu(), b, atol=ga * max(1.0, b.abs().max().item()), rtol=gr)

    def test_mlp_with_up_lora_falls_back(self):
        g = _gen(23)
        x, uw, ub, gw, gb, dw, db, loras = make_mlp(g, gated=True, bias=True, lora_rank=2)
        cpu_args = mlp_args(x, uw, ub, gw, gb, dw, db, loras=loras, scales=(0.5, 1.0, 2.0), activation="silu")
        dev_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in cpu_args)
        out, _ = mlp_op(*dev_args)
        torch.testing.assert_close(out.cpu(), mlp_reference(*cpu_args, ZERO_SEED), atol=1e-4, rtol=1e-4)
