"""SPT keeps every mask's full meaning (issue 8, items 1-4): at keep = 1 the rewritten model equals transformers'
eager model exactly, and at keep < 1 no query ever sees a key its mask hides.

Cases the six families of tests/families.py do not reach: sliding-window attention (Mistral), packed sequences
(a block-diagonal 4-d mask), KV-cache decoding (generate, query length 1 against a growing cache), peft prefix
tuning (virtual tokens in front of the keys: a causal mask aligned bottom-right), a hand-written causal mask
from a registered tril buffer, and fully masked query rows (left padding with eager attention).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

import sparsify
from families import assert_compiled_matches_eager, first_output

SPT_EXACT = {"attention": {"method": "spt", "score": "exact", "keep": 1.0, "min_seq": 0}, "inner": "aot_eager"}
VOCAB = 96


def _spt(keep=1.0, **extra):
    return {"attention": {"method": "spt", "score": "exact", "keep": keep, "min_seq": 0, **extra},
            "inner": "aot_eager"}


def _llama_config(**kw):
    return transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=64, num_hidden_layers=2, vocab_size=VOCAB, bos_token_id=0,
                                    eos_token_id=0, pad_token_id=0, **kw)


def _causal_lm(family: str, impl: str):
    torch.manual_seed(0)
    if family == "llama":
        cfg = _llama_config()
    elif family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=VOCAB, attn_pdrop=0.0,
                                      resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                      pad_token_id=0)
    elif family == "mistral":
        cfg = transformers.MistralConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=64, num_hidden_layers=2, vocab_size=VOCAB,
                                         sliding_window=4, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    else:
        raise ValueError(family)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).float()


def _ids(batch, seq, seed=1):
    return torch.randint(2, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _decisions(report, kind="attention"):
    return {r.decision for r in report.by_kind(kind)}


# --- 1. sliding windows and block-diagonal (packed) masks -----------------------------------------------------

@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_sliding_window_equals_eager(impl):
    model = _causal_lm("mistral", impl).model
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, -3:] = 0
    report = assert_compiled_matches_eager(model, {"input_ids": _ids(2, 12), "attention_mask": mask}, SPT_EXACT)
    assert _decisions(report) == {"spt"}


def _packing_mask(documents, dtype):
    """[1, 1, n, n] causal block-diagonal mask of packed documents (bool, or additive with finfo.min)."""
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(documents)])
    keep = (doc[:, None] == doc[None, :]) & torch.ones(len(doc), len(doc), dtype=torch.bool).tril()
    if dtype == torch.bool:
        return keep[None, None]
    return torch.zeros(1, 1, *keep.shape).masked_fill(~keep, torch.finfo(dtype).min)


@pytest.mark.parametrize("impl,dtype", [("eager", torch.float32), ("sdpa", torch.float32), ("sdpa", torch.bool)])
def test_packed_sequences_equal_eager(impl, dtype):
    model = _causal_lm("llama", impl).model
    documents = (5, 3, 4)
    position_ids = torch.cat([torch.arange(n) for n in documents])[None]
    inputs = {"input_ids": _ids(1, 12), "position_ids": position_ids,
              "attention_mask": _packing_mask(documents, dtype)}
    # the oracle really is block-diagonal: the middle document alone gives the same states
    alone = first_output(model(input_ids=inputs["input_ids"][:, 5:8], position_ids=position_ids[:, 5:8]))
    torch.testing.assert_close(first_output(model(**inputs))[:, 5:8], alone, atol=1e-5, rtol=0)
    report = assert_compiled_matches_eager(model, inputs, SPT_EXACT)
    assert _decisions(report) == {"spt"}


@pytest.mark.parametrize("granularity", ["token", "block"])
def test_sliding_window_never_leaks_below_keep_one(granularity):
    """keep < 1: a token outside every later query's window changes nothing after the window."""
    model = _causal_lm("mistral", "eager").model.eval()
    compiled = torch.compile(model, backend="sparsify", options=_spt(0.5, granularity=granularity, block_size=16))
    ids = _ids(1, 40)
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % VOCAB
    with torch.no_grad():
        a, b = first_output(compiled(input_ids=ids)), first_output(compiled(input_ids=changed))
    assert _decisions(sparsify.last_report()) == {"spt"}
    # two layers of window 4 reach back 2 * 3 positions: from position 7 on nothing may move
    torch.testing.assert_close(a[:, 7:], b[:, 7:], atol=0, rtol=0)
    assert (a[:, 0] - b[:, 0]).abs().max() > 0  # and the change itself is seen


# --- 2. KV-cache decoding and prefix tuning (Lq < Lk, causal aligned bottom-right) -------------------------------

@pytest.mark.parametrize("family, impl", [("gpt2", "eager"), pytest.param("gpt2", "sdpa", marks=pytest.mark.wide),
                                          ("llama", "eager"), ("llama", "sdpa")])
def test_generate_with_kv_cache_equals_eager(family, impl):
    model = _causal_lm(family, impl).eval()
    ids = _ids(2, 6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding, as generate() batches prompts
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        logits_eager = model(input_ids=expected, attention_mask=torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)).logits
    model.forward = torch.compile(model.forward, backend="sparsify", options=SPT_EXACT)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)
    assert _decisions(sparsify.last_report()) == {"spt"}  # the decode steps' graph took SPT too
    # one decode step against a cache, compared by value: logits of the last token
    with torch.no_grad():
        full_mask = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)
        prefix = model(input_ids=expected[:, :-1], attention_mask=full_mask[:, :-1], use_cache=True)
        step = model(input_ids=expected[:, -1:], attention_mask=full_mask, past_key_values=prefix.past_key_values)
    torch.testing.assert_close(step.logits[:, -1], logits_eager[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prefix_tuning_equals_eager(family):
    peft = pytest.importorskip("peft")
    base = _causal_lm(family, "eager")
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10)
    model = peft.get_peft_model(base, config)
    ids = _ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    expected = model(input_ids=ids, attention_mask=mask).logits
    expected.square().mean().backward()
    prefix_grad = next(p for n, p in model.named_parameters() if p.requires_grad).grad.clone()
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="sparsify", options=SPT_EXACT)
    got = compiled(input_ids=ids, attention_mask=mask).logits
    assert _decisions(sparsify.last_report()) == {"spt"}
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    got.square().mean().backward()
    grad = next(p for n, p in model.named_parameters() if p.requires_grad).grad
    torch.testing.assert_close(grad, prefix_grad, atol=1e-5, rtol=0)


# --- 3. a causal mask the finder cannot read (a registered tril buffer) -----------------------------------------

class TrilAttentionLM(torch.nn.Module):
    """An older, hand-written causal self-attention block: the mask is a buffer sliced and used with masked_fill."""

    def __init__(self, d=32, heads=4, n_max=64):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(VOCAB, d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.register_buffer("bias", torch.tril(torch.ones(n_max, n_max)).view(1, 1, n_max, n_max))

    def forward(self, input_ids):
        x = self.embed(input_ids)
        b, n, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / (d // self.heads) ** 0.5)
        att = att.masked_fill(self.bias[:, :, :n, :n] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, d))


def test_tril_buffer_mask_equals_eager_and_never_leaks():
    torch.manual_seed(0)
    model = TrilAttentionLM()
    report = assert_compiled_matches_eager(model, {"input_ids": _ids(2, 16)}, SPT_EXACT)
    assert _decisions(report) == {"spt"}
    # keep < 1: changing the last token changes no earlier position (the selection must not rank future keys)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sparsify", options=_spt(0.25))
    ids = _ids(1, 32)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % VOCAB
    with torch.no_grad():
        a, b = compiled(ids), compiled(changed)
    assert _decisions(sparsify.last_report()) == {"spt"}
    torch.testing.assert_close(a[:, :-1], b[:, :-1], atol=0, rtol=0)
    assert a.abs().sum(-1).min() > 0  # no row lost all its keys


# --- 4. fully masked query rows (left padding, eager attention: finite finfo.min mask) ---------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padding_fully_masked_rows_equal_eager(family):
    model = _causal_lm(family, "eager").model if family == "llama" else _causal_lm(family, "eager").transformer
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0  # left padding: the first 4 query rows of batch 1 see no key at all
    report = assert_compiled_matches_eager(model, {"input_ids": _ids(2, 10), "attention_mask": mask}, SPT_EXACT)
    assert _decisions(report) == {"spt"}


@pytest.mark.parametrize("granularity", ["token", "block"])
def test_keep_one_equals_eager_for_both_granularities_on_windows_and_padding(granularity):
    model = _causal_lm("mistral", "eager").model
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, -5:] = 0
    options = _spt(1.0, granularity=granularity, block_size=16)
    report = assert_compiled_matches_eager(model, {"input_ids": _ids(2, 20), "attention_mask": mask}, options)
    assert _decisions(report) == {"spt"}


class _SDPACausal(torch.nn.Module):
    """A hand-written block calling SDPA(is_causal=True) with fewer queries than keys: SDPA aligns that top-left
    (query i sees keys j <= i), the ops' causal is bottom-right (sparsify/ops/causal.py)."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.q, self.kv, self.heads = torch.nn.Linear(d, d), torch.nn.Linear(d, 2 * d), heads

    def forward(self, x, memory):
        b, lq, d = x.shape
        q = self.q(x).view(b, lq, self.heads, -1).transpose(1, 2)
        k, v = (t.view(b, memory.shape[1], self.heads, -1).transpose(1, 2) for t in self.kv(memory).chunk(2, -1))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, lq, d)


@pytest.mark.parametrize("options", [
    {"inner": "aot_eager"},
    {"attention": {"method": "spt", "score": "exact", "keep": 1.0, "min_seq": 0}, "inner": "aot_eager"},
    {"attention": {"method": "spt", "score": "exact", "keep": 1.0, "min_seq": 0, "granularity": "block",
                   "block_size": 16}, "inner": "aot_eager"},
], ids=["dense", "spt", "spt-block"])
@pytest.mark.parametrize("lq,lk", [(5, 9), (9, 5), (7, 7)])
def test_sdpa_is_causal_keeps_its_top_left_meaning(options, lq, lk):
    torch.manual_seed(0)
    block = _SDPACausal()
    x, memory = torch.randn(2, lq, 16, requires_grad=True), torch.randn(2, lk, 16, requires_grad=True)
    want = block(x, memory)
    got = torch.compile(block, backend="sparsify", options=options)(x, memory)
    rows = sparsify.last_report().by_kind("attention")
    method = options.get("attention", {}).get("method", "dense")
    assert [r.decision for r in rows] == (["spt"] if method == "spt" else ["sparsify.attention"]), rows
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    grads = torch.autograd.grad(got.square().sum(), (x, memory))
    for g, w in zip(grads, torch.autograd.grad(want.square().sum(), (x, memory))):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
