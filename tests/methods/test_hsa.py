"""HSA (sparsify/methods/hsa.py): MST's hybrid sparse attention as block patterns the block-sparse attention kernels
skip. The compiled model equals transformers' eager model whose SDPA gets the same boolean mask, forward and
backward; the pattern switches on and off with MST's phases without recompiling; the FLOP account counts the
attention density; options that would make blocks unskippable fail when made."""

import pytest
import torch
import torch.nn.functional as F

import sparsify
from sparsify.methods.hsa import HSAOptions, block_pattern, pattern_density, pattern_mask

SEQ = 48  # three blocks of 16


def hsa(**fields):
    return {"attention": {"method": "hsa", "block": 16, "window": 16, "stride": 32, "active": "always", **fields},
            "mlp": "off", "linear": "off", "inner": "aot_eager"}


def _gpt2(seed=0):
    import transformers
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
        attn_implementation="sdpa"))


def _batch(seq=SEQ):
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 96, (2, seq), generator=g)}


class _PatternedSDPA:
    """Eager's SDPA with HSA's boolean mask added: the oracle (SDPA with the same mask)."""

    def __init__(self, options: HSAOptions):
        self.options, self.sdpa = options, F.scaled_dot_product_attention

    def __call__(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        keep = pattern_mask(q.shape[-2], self.options, q.device)
        if attn_mask is not None:
            keep = keep & attn_mask if attn_mask.dtype == torch.bool else keep
            if attn_mask.dtype != torch.bool:
                return self.sdpa(q, k, v, attn_mask=attn_mask.masked_fill(~keep, float("-inf")), dropout_p=dropout_p,
                                 **kw)
        return self.sdpa(q, k, v, attn_mask=keep, dropout_p=dropout_p, **kw)


def test_patterns_on_blocks():
    p = block_pattern(6, 6, "union", 2, 3)
    assert p.tolist()[5] == [False, False, True, False, True, True]  # local: 5, 4; strided: 5, 2
    assert not torch.triu(p, 1).any()  # causal at block level
    o = HSAOptions(block=64, window=256, stride=256)
    assert o.pattern == "union" and 0.3 < pattern_density(4096, o) < 0.5  # blocks really are skipped
    assert pattern_density(256, o) == 1.0  # a sequence within the window is dense


@pytest.mark.parametrize("bad, match", [({"stride": 16}, "stride=16 is not valid.*keeps every key block"),
                                        ({"window": 24}, "window=24 is not valid"),
                                        ({"pattern": "fixed"}, "pattern"),
                                        ({"block": 48}, "block")])
def test_options_that_cannot_skip_blocks_fail_when_made(bad, match):
    with pytest.raises(ValueError, match=match):
        sparsify.SparsifyConfig.from_options(hsa(**bad))


def test_ultra_needs_mst_phases():
    with pytest.raises(ValueError, match="active='ultra' is not valid with options.linear.method='off'"):
        sparsify.SparsifyConfig.from_options(hsa(active="ultra"))


@pytest.mark.parametrize("pattern", ["union", "local", "strided"])
def test_compiled_equals_eager_with_the_same_boolean_mask_forward_and_backward(monkeypatch, pattern):
    options = hsa(pattern=pattern)
    model = _gpt2()
    torch._dynamo.reset()
    report = sparsify.prepare(model, **_batch(), options=options)
    assert {r.decision for r in report.by_kind("attention")} == {"prepared: hsa"}
    batch = _batch()
    compiled = torch.compile(model, backend="sparsify", options=options)
    out = compiled(**batch).logits
    rows = sparsify.last_report().by_kind("attention")
    assert {r.decision for r in rows} == {"hsa (block-sparse attention)"}, [(r.decision, r.reason) for r in rows]
    assert all(r.facts["hsa_pattern"].startswith(pattern) for r in rows)
    out.logsumexp(-1).mean().backward()
    got_grad = model.transformer.h[0].attn.c_attn.weight.grad.clone()
    model.zero_grad()
    hsa_options = sparsify.SparsifyConfig.from_options(options).attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", _PatternedSDPA(hsa_options))
    eager = model(**batch).logits
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    eager.logsumexp(-1).mean().backward()
    torch.testing.assert_close(got_grad, model.transformer.h[0].attn.c_attn.weight.grad, atol=1e-5, rtol=1e-4)
    monkeypatch.undo()
    dense = model(**batch).logits
    assert (dense - out).abs().max() > 1e-3  # the pattern did change the result: the test can fail


def test_padding_mask_is_kept_with_the_pattern(monkeypatch):
    options = hsa()
    model = _gpt2()
    torch._dynamo.reset()
    sparsify.prepare(model, **_batch(), options=options)
    batch = _batch()
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][0, :5] = 0  # left padding in one row
    out = torch.compile(model, backend="sparsify", options=options)(**batch).logits
    assert {r.decision for r in sparsify.last_report().by_kind("attention")} == {"hsa (block-sparse attention)"}
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        _PatternedSDPA(sparsify.SparsifyConfig.from_options(options).attention))
    eager = model(**batch).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(out[keep], eager[keep], atol=1e-5, rtol=1e-5)


def test_the_pattern_follows_msts_ultra_phase_without_recompiling(monkeypatch, compiled_graphs):
    options = hsa(active="ultra")
    options["linear"] = {"method": "mst", "total_steps": 10, "delta": 100, "warmup_end": 0.3, "ultra_end": 0.6}
    model = _gpt2()
    torch._dynamo.reset()
    sparsify.prepare(model, **_batch(), options=options)
    compiled = torch.compile(model, backend="sparsify", options=options)
    schedule = sparsify.training.MixedSparsity(compiled, None, options, tokens_per_step=2 * SEQ, seq_len=SEQ)
    batch = _batch()
    sdpa = F.scaled_dot_product_attention
    patterned = _PatternedSDPA(sparsify.SparsifyConfig.from_options(options).attention)
    phases = []
    for step in range(10):
        out = compiled(**batch).logits
        with torch.no_grad():
            monkeypatch.setattr(F, "scaled_dot_product_attention", patterned if schedule.hsa_active(step) else sdpa)
            torch.testing.assert_close(out, model(**batch).logits, atol=1e-5, rtol=1e-5)
            monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
        phases.append(schedule.hsa_active(step))
        out.sum().backward()
        schedule.step()
        model.zero_grad(set_to_none=True)
        if step == 0:
            first = len(compiled_graphs)
    assert phases == [False] * 3 + [True] * 3 + [False] * 4
    assert len(compiled_graphs) == first, "switching the pattern must not recompile"
    flops = schedule.flops()
    density = pattern_density(SEQ, schedule.hsa)
    assert flops["attention_density"] == pytest.approx((7 + 3 * density) / 10)


def test_a_kv_cache_or_a_non_causal_model_stays_dense_and_says_why():
    import transformers
    options = hsa()
    model = _gpt2()
    torch._dynamo.reset()
    sparsify.prepare(model, **_batch(), options=options)
    cache = transformers.DynamicCache()
    with torch.no_grad():
        model(**_batch(8), past_key_values=cache, use_cache=True)
    with pytest.warns(UserWarning):
        torch.compile(model, backend="sparsify", options=options)(input_ids=_batch(1)["input_ids"][:, :1],
                                                                  past_key_values=cache, use_cache=True)
    reasons = [r.reason for r in sparsify.last_report().by_kind("attention")]
    assert reasons and all("KV cache" in (r or "") for r in reasons), reasons
