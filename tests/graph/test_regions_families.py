"""Families beyond tests/families.py (issue 8, items 12 and 14): every block found or reported with a reason,
and the dense rewrite equal to eager where a block is rewritten."""
import pytest
import torch
import transformers as T

import sparsify
from families import assert_compiled_matches_eager, tiny_model, tiny_inputs

AOT = {"inner": "aot_eager"}
COMMON = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, vocab_size=96)
IDS = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)


def build(config, impl="eager", mode="eval"):
    torch.manual_seed(0)
    return T.AutoModel.from_config(config, attn_implementation=impl).float().train(mode == "train")


def inputs(seq=8):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, seq, dtype=torch.long)
    return {"input_ids": torch.randint(2, 96, (2, seq), generator=g), "attention_mask": mask}


def rows(report):
    return [(r.kind, r.module, r.decision, r.reason) for r in report.regions]


CONFIGS = {
    "phi3": lambda: T.Phi3Config(**COMMON, num_key_value_heads=2, **IDS),
    "modernbert": lambda: T.ModernBertConfig(**COMMON, **IDS, cls_token_id=0, sep_token_id=0,
                                             global_attn_every_n_layers=1),
    "falcon": lambda: T.FalconConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, vocab_size=96,
                                     new_decoder_architecture=False, multi_query=True, alibi=False, bias=True,
                                     bos_token_id=0, eos_token_id=0),
    "bloom": lambda: T.BloomConfig(hidden_size=32, n_head=4, n_layer=2, vocab_size=96, **IDS),
    "deberta": lambda: T.DebertaV2Config(**COMMON, pad_token_id=0),
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_block_rewritten_and_exact(family):
    """Fused gate_up + chunk (Phi-3, ModernBERT), x @ w.T + b (Falcon), 3-d baddbmm/bmm attention with
    alibi (Bloom) and DeBERTa's bmm on pre-scaled keys: all found, rewritten, equal to eager."""
    model = build(CONFIGS[family]())
    report = sparsify.explain(model, **inputs(), options=AOT)
    assert len(report.by_kind("attention")) == 2 and len(report.by_kind("mlp")) == 2, report.table()
    assert len(report.rewritten) == 4, report.table()
    if family in ("phi3", "modernbert"):
        assert all(r.facts["gated"] for r in report.by_kind("mlp"))
    torch._dynamo.reset()
    assert_compiled_matches_eager(model, inputs(), AOT)


def test_bloom_train_mode_gelu_autograd_function():
    """In train mode Bloom's GELU is an autograd.Function (a higher-order op in the graph): recognised as
    gelu_tanh on value and gradient, and the rewrite matches eager's outputs and gradients."""
    model = build(CONFIGS["bloom"](), mode="train")
    report = assert_compiled_matches_eager(model, inputs(), AOT)
    mlp = report.by_kind("mlp")
    assert [r.decision for r in mlp] == ["sparsify.mlp"] * 2, report.table()
    assert {r.facts["activation"] for r in mlp} == {"gelu_tanh"}


@pytest.mark.parametrize("impl", ["eager"])
def test_gemma2_softcapping_reported(impl):
    config = T.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=8, **IDS)
    report = sparsify.explain(build(config, impl), **inputs(), options=AOT)
    attention = report.by_kind("attention")
    assert len(attention) == 2, report.table()
    assert all(r.decision == "dense" and r.reason == "score modification (logit softcapping)" for r in attention)


def test_clip_quick_gelu_found_and_rewritten_exactly():
    config = T.CLIPTextConfig(**COMMON, **IDS)
    model = build(config)
    report = sparsify.explain(model, **inputs(), options=AOT)
    mlp = report.by_kind("mlp")
    assert len(mlp) == 2 and all(r.decision == "sparsify.mlp" and r.facts["activation"] == "quick_gelu"
                                 for r in mlp), report.table()
    torch._dynamo.reset()
    report = assert_compiled_matches_eager(model, inputs(), AOT)
    assert {r.decision for r in report.by_kind("mlp")} == {"sparsify.mlp"}


@pytest.mark.parametrize("family", ["mixtral", "qwen2moe"])
def test_moe_layers_reported(family):
    if family == "mixtral":
        config = T.MixtralConfig(**COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **IDS)
    else:
        config = T.Qwen2MoeConfig(**COMMON, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=32, shared_expert_intermediate_size=64, **IDS)
    model = build(config)
    report = sparsify.explain(model, **inputs(), options=AOT)
    moe = [r for r in report.by_kind("mlp") if "mixture-of-experts" in r.reason]
    assert [r.module for r in moe] == ["layers.0.mlp", "layers.1.mlp"], report.table()
    assert all(r.reason.startswith("mixture-of-experts layer (4 experts, top-2 routing)") for r in moe)
    torch._dynamo.reset()
    assert_compiled_matches_eager(model, inputs(), AOT)


class _Expert(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


class _LinearExpertsMoE(torch.nn.Module):
    """Top-2 routing over separate Linear experts, every expert run on the tokens routed to it (as
    pre-5 Mixtral did, with a dense gather instead of a data-dependent nonzero)."""
    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(16, 4, bias=False)
        self.experts = torch.nn.ModuleList(_Expert() for _ in range(4))

    def forward(self, x):
        probs = torch.softmax(self.gate(x), dim=-1)
        weights, chosen = torch.topk(probs, 2, dim=-1)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            w = (weights * (chosen == i)).sum(-1, keepdim=True)
            order = torch.argsort(w.squeeze(-1), descending=True, stable=True)[: x.shape[0] // 2]
            out = out.index_add(0, order, expert(x[order]) * w[order])
        return (out,)


def test_moe_with_linear_experts_rewrites_each_expert_exactly():
    torch.manual_seed(0)
    model = _LinearExpertsMoE()
    x = {"x": torch.randn(12, 16)}
    report = assert_compiled_matches_eager(model, x, AOT)
    experts = [r for r in report.by_kind("mlp") if "experts" not in r.facts]
    assert [r.decision for r in experts] == ["sparsify.mlp"] * 4, report.table()
    (moe,) = [r for r in report.by_kind("mlp") if "experts" in r.facts]
    assert "4 expert MLP(s) are regions of their own" in moe.reason


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_dynamic_shapes_every_block_rewritten(family):
    """dynamic=True: scales arrive as SymFloats (guarded constants), GPT-2's gelu_new reads sqrt(2/pi) as one."""
    model = tiny_model(family, "eager")
    compiled = torch.compile(model, backend="sparsify", options=AOT, dynamic=True)
    for seq in (8, 12):
        data = tiny_inputs(family, seq=seq)
        reference = model(**data).last_hidden_state
        reference.square().mean().backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        out = compiled(**data).last_hidden_state
        report = sparsify.last_report()
        assert len(report.rewritten) == 4, report.table()
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
        out.square().mean().backward()
        for n, p in model.named_parameters():
            if n in expected:
                torch.testing.assert_close(p.grad, expected[n], atol=1e-5, rtol=0, msg=n)
        model.zero_grad(set_to_none=True)


def test_dynamic_scale_guarded():
    """A scale read from a float attribute under dynamic=True is guarded: changing it recompiles."""
    model = tiny_model("gpt2", "eager").eval()
    compiled = torch.compile(model, backend="sparsify", options=AOT, dynamic=True)
    data = tiny_inputs("gpt2")
    with torch.no_grad():
        compiled(**data)
        for block in model.h:
            block.attn.scaling = 0.05
        torch.testing.assert_close(compiled(**data).last_hidden_state, model(**data).last_hidden_state,
                                   atol=1e-5, rtol=0)


class _InplaceDivAttention(torch.nn.Module):
    """Attention whose scores are divided in place (`scores /= sqrt(d)`, operator.itruediv in the graph)."""
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        q, k, v = (t.unflatten(-1, (4, 8)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores /= 8 ** 0.5
        return (torch.matmul(torch.softmax(scores, dim=-1), v),)


def test_inplace_division_is_a_scale():
    torch.manual_seed(0)
    report = assert_compiled_matches_eager(_InplaceDivAttention(), {"x": torch.randn(2, 8, 32)}, AOT)
    (attention,) = report.by_kind("attention")
    assert attention.decision == "sparsify.attention", report.table()
    assert attention.facts["scale"] == pytest.approx(8 ** -0.5)


@pytest.mark.parametrize("check", ["dense", "routed"])
def test_peft_lora_on_a_fused_gate_up_projection(check):
    """peft LoRA on Phi-3's fused gate_up_proj (W x + s B (A x), then chunk): split into the gate and up halves with
    the shared A x and each half's rows of B, so the MLP is found (with lora=True) and equals eager, outputs and
    every adapter gradient; the routed FFN over all blocks too."""
    peft = pytest.importorskip("peft")
    model = build(T.Phi3Config(**COMMON, num_key_value_heads=2, **IDS), mode="train")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                       target_modules=["gate_up_proj", "down_proj", "qkv_proj"]))
    torch.manual_seed(2)
    for p in model.parameters():
        if p.requires_grad:  # lora_B starts at zero: give the adapters values so the test can see them
            torch.nn.init.normal_(p, std=0.2)
    options = dict(AOT)
    if check == "routed":
        options["mlp"] = {"method": "routed", "blocks": 2, "top_k": 2, "gate": "none"}
        sparsify.prepare(model, **inputs(), options=options)
    report = sparsify.explain(model, **inputs(), options=options)
    mlp = report.by_kind("mlp")
    assert len(mlp) == 2 and all(r.facts["lora"] and r.facts["gated"] for r in mlp), report.table()
    torch._dynamo.reset()
    report = assert_compiled_matches_eager(model, inputs(), options)
    want = "routed" if check == "routed" else "sparsify.mlp"
    assert [r.decision for r in report.by_kind("mlp")] == [want] * 2, report.table()
