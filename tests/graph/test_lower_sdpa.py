"""Dense attention = SDPA (passes/lower.py): the default backend's attention regions run
torch's scaled_dot_product_attention, forward and backward, wherever its semantics are sparsify::attention's; the
op stays where they differ (and in sparsify.prepare's trace). Equal to the op's reference on the edge cases, equal
to eager on every family, and no more bytes saved for backward than the model compiled without sparsify."""
import pytest
import torch

import sparsify
from bench_helpers import load_benchmark
from families import FAMILIES, assert_compiled_matches_eager, tiny_inputs, tiny_model
from sparsify.ops.attention import attention_reference
from sparsify.passes.lower import sdpa_applies, sdpa_attention


def _qkv(b=2, h=4, hkv=2, lq=8, lk=8, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=g, dtype=dtype), torch.randn(b, hkv, lk, d, generator=g, dtype=dtype),
            torch.randn(b, hkv, lk, d, generator=g, dtype=dtype))


@pytest.mark.parametrize("mask_kind", [None, "bool", "float", "bool_empty_row", "float_empty_row"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hkv", [4, 2])
def test_sdpa_path_equals_the_ops_reference(mask_kind, causal, hkv):
    q, k, v = _qkv(hkv=hkv)
    g = torch.Generator().manual_seed(3)
    mask = None
    if mask_kind and mask_kind.startswith("bool"):
        mask = torch.rand(2, 1, 8, 8, generator=g) > 0.3
        if mask_kind.endswith("empty_row"):
            mask[0, :, 2] = False
    elif mask_kind:
        mask = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
        if mask_kind.endswith("empty_row"):
            mask[1, :, 5] = float("-inf")
    assert sdpa_applies(q, k, v, mask, causal)
    args = (mask, 0.3, 0.0, causal)
    qs, ks, vs = (t.clone().requires_grad_(True) for t in (q, k, v))
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    got = sdpa_attention(qs, ks, vs, *args)
    want = attention_reference(qr, kr, vr, mask, 0.3, 0.0, causal, torch.zeros((), dtype=torch.int64))
    torch.testing.assert_close(got, want)
    got.square().sum().backward()
    want.square().sum().backward()
    for a, b in ((qs, qr), (ks, kr), (vs, vr)):
        torch.testing.assert_close(a.grad, b.grad)


def test_where_sdpa_differs_the_op_stays():
    q, k, v = _qkv(lq=3, lk=8)
    assert not sdpa_applies(q, k, v, None, True)  # bottom-right causal with a cache: SDPA's is top-left
    q16, k16, v16 = (t.half() for t in _qkv())
    assert not sdpa_applies(q16, k16, v16, torch.zeros(1, 1, 8, 8), False)  # fp32 finfo.min mask on fp16 scores
    assert sdpa_applies(q16, k16, v16, torch.zeros(1, 1, 8, 8, dtype=torch.half), False)


@pytest.mark.parametrize("family", [f if f in ("llama", "t5") else pytest.param(f, marks=pytest.mark.wide)
                                    for f in FAMILIES])
def test_every_family_runs_sdpa_and_equals_eager(family):
    """(The other families' compiled-vs-eager tests run through the lowering too: it is the default.)"""
    model = tiny_model(family, "sdpa")
    inputs = tiny_inputs(family)
    torch._dynamo.reset()
    assert_compiled_matches_eager(model, inputs, {"inner": "aot_eager"})
    rows = sparsify.last_report().by_kind("attention")
    assert rows and all(r.facts.get("kernel") == "sdpa" for r in rows), [(r.module, r.facts.get("kernel")) for r in rows]
    mlps = sparsify.last_report().by_kind("mlp")  # the dense MLP op lowered to its plain torch calls
    assert mlps and all(r.facts.get("kernel") == "torch" for r in mlps), [(r.module, r.facts.get("kernel")) for r in mlps]


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_default_backend_saves_no_more_for_backward_than_the_model_compiled_alone(family):
    """Whole model, train mode, seq 64: the default backend against torch.compile(aot_eager) of the same model."""
    model = tiny_model(family, "sdpa")
    inputs = tiny_inputs(family, seq=64, padded=False)
    measured = {}
    for name, compile_kw in (("plain", {"backend": "aot_eager"}),
                             ("sparsify", {"backend": "sparsify", "options": {"inner": "aot_eager"}})):
        torch._dynamo.reset()
        compiled = torch.compile(model, **compile_kw)
        compiled(**inputs)  # compile outside the hooks
        _, saved = load_benchmark("_timing").saved_bytes(lambda: compiled(**inputs))
        measured[name] = saved["saved_bytes"]
    # attention as SDPA and the MLPs as plain torch calls: AOTAutograd saves what it saves for the model alone
    assert measured["sparsify"] <= 1.02 * measured["plain"], measured
    assert measured["plain"] > 0
