"""The region finder on the Dynamo graphs of stock transformers models (built from configs)."""
import math

import pytest
import torch

import sparsify
from families import FAMILIES, expected_blocks, tiny_inputs, tiny_model


def explain(model, inputs, **options):
    return sparsify.explain(model, **inputs, options=options or None)


def _block_cases():
    """Every family x attention implementation x mode x padding; T5 (an encoder-decoder, the slowest to trace)
    keeps half of its cases in the default suite, each implementation, mode and padding still met, and runs the
    rest with -m wide."""
    for family in FAMILIES:
        for impl in ("eager", "sdpa"):
            for mode in ("train", "eval"):
                for padded in (True, False):
                    marks = ()
                    if family == "t5" and padded != ((impl == "eager") == (mode == "train")):
                        marks = (pytest.mark.wide,)
                    yield pytest.param(family, impl, mode, padded, marks=marks,
                                       id=f"{family}-{impl}-{mode}-{'padded' if padded else 'unpadded'}")


@pytest.mark.parametrize("family, impl, mode, padded", list(_block_cases()))
def test_every_block_found_and_rewritten(family, impl, mode, padded):
    model = tiny_model(family, impl).train(mode == "train")
    report = explain(model, tiny_inputs(family, padded=padded))
    n_attention, n_mlp = expected_blocks(family)
    assert len(report.by_kind("attention")) == n_attention, report.table()
    assert len(report.by_kind("mlp")) == n_mlp, report.table()
    decisions = {r.decision for r in report.regions}
    assert decisions == {"sparsify.attention", "sparsify.mlp"}, report.table()


def _facts(report, kind):
    return [r.facts for r in report.by_kind(kind)]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_bert_facts(impl):
    report = explain(tiny_model("bert", impl), tiny_inputs("bert"))
    att = report.by_kind("attention")
    assert [r.module for r in att] == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    for f in _facts(report, "attention"):
        assert f["scale"] == pytest.approx(1 / math.sqrt(8))
        assert not f["causal"] and f["mask"] in ("additive", "boolean") and f["head_dim"] == 8
        assert f["source"] == impl
    mlp = report.by_kind("mlp")
    assert [r.module for r in mlp] == ["encoder.layer.0", "encoder.layer.1"]
    assert mlp[0].facts["up"] == "encoder.layer.0.intermediate.dense"
    assert mlp[0].facts["down"] == "encoder.layer.0.output.dense"
    assert {(f["activation"], f["gated"], f["bias"]) for f in _facts(report, "mlp")} == {("gelu", False, True)}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_gpt2_facts(impl):
    """Conv1D shows up as addmm; gelu_new is spelled out in 8 element-wise nodes."""
    report = explain(tiny_model("gpt2", impl), tiny_inputs("gpt2"))
    assert [r.module for r in report.by_kind("attention")] == ["h.0.attn", "h.1.attn"]
    assert all(f["causal"] for f in _facts(report, "attention"))
    assert [r.module for r in report.by_kind("mlp")] == ["h.0.mlp", "h.1.mlp"]
    assert {f["activation"] for f in _facts(report, "mlp")} == {"gelu_tanh"}
    assert report.by_kind("mlp")[0].facts["up"] == "h.0.mlp.c_fc"


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_llama_facts(impl):
    """GQA through expand/reshape, RoPE before the scores, SwiGLU."""
    report = explain(tiny_model("llama", impl), tiny_inputs("llama"))
    for f in _facts(report, "attention"):
        assert f["causal"] and f["heads"] == 4 and f["kv_heads"] == 2 and f["gqa_groups"] == 2
    assert [r.module for r in report.by_kind("attention")] == ["layers.0.self_attn", "layers.1.self_attn"]
    for f in _facts(report, "mlp"):
        assert f["activation"] == "silu" and f["gated"] and not f["bias"]
    assert report.by_kind("mlp")[0].facts["gate"] == "layers.0.mlp.gate_proj"


def test_opt_facts():
    """OPT scales q before the product: the region's own scale is 1."""
    report = explain(tiny_model("opt", "eager"), tiny_inputs("opt"))
    for f in _facts(report, "attention"):
        assert f["causal"] and f["scale"] == 1.0
    assert {f["activation"] for f in _facts(report, "mlp")} == {"relu"}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_t5_facts(impl):
    """No 1/sqrt(d) scale, relative position bias, encoder self / decoder self / cross attention."""
    report = explain(tiny_model("t5", impl), tiny_inputs("t5"))
    by_module = {r.module: r.facts for r in report.by_kind("attention")}
    assert by_module["encoder.block.0.layer.0.SelfAttention"]["causal"] is False
    assert by_module["decoder.block.0.layer.0.SelfAttention"]["causal"] is True
    assert by_module["decoder.block.0.layer.1.EncDecAttention"]["causal"] is False
    assert all(f["scale"] == 1.0 and f["mask"] == "additive" for f in by_module.values())
    for f in _facts(report, "mlp"):
        assert f["activation"] == "gelu_tanh" and f["gated"]


def test_dropout_is_read_in_train_mode_only():
    import transformers
    from families import tiny_config
    config = tiny_config("bert", "eager")
    config.attention_probs_dropout_prob = 0.1
    model = transformers.AutoModel.from_config(config, attn_implementation="eager")
    train = explain(model.train(), tiny_inputs("bert"))
    assert [f["dropout_p"] for f in _facts(train, "attention")] == [pytest.approx(0.1)] * 2
    torch._dynamo.reset()
    evaluated = explain(model.eval(), tiny_inputs("bert"))
    assert [f["dropout_p"] for f in _facts(evaluated, "attention")] == [0.0, 0.0]


@pytest.mark.parametrize("family,targets", [
    ("bert", ["query", "value", "intermediate.dense", "output.dense"]),
    ("llama", ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]),
    ("gpt2", ["c_attn", "c_fc", "c_proj"]),
])
def test_regions_under_peft_lora(family, targets):
    peft = pytest.importorskip("peft")
    model = tiny_model(family, "sdpa")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                       init_lora_weights=False))
    report = explain(model, tiny_inputs(family))
    assert len(report.by_kind("attention")) == 2 and len(report.by_kind("mlp")) == 2, report.table()
    assert all(r.facts["lora"] for r in report.by_kind("mlp"))
    assert all(r.module.startswith("base_model.model.") for r in report.regions)
    assert len(report.rewritten) == 4
