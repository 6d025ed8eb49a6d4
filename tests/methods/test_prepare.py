"""sparsify.prepare: what its report says, state made with other options, in-place compiled models,
graph breaks inside a layer, and too few k-means samples."""
import warnings

import pytest
import torch
import transformers

import sparsify
from families import assert_compiled_matches_eager, first_output, tiny_inputs, tiny_model

SPT = {"method": "spt", "keep": 1.0, "min_seq": 0, "codebook_loss": 0.0}


def routed(**mlp):
    return {"mlp": {"method": "routed", **mlp}, "inner": "aot_eager"}


def test_report_says_what_was_prepared():
    model = tiny_model("bert", "sdpa")
    inputs = tiny_inputs("bert")
    options = {"attention": SPT, **routed()}
    report = sparsify.prepare(model, **inputs, options=options)
    rows = {(r.kind, r.decision, r.reason.split(":")[0]) for r in report.regions}
    assert rows == {("attention", "prepared: pq_codebook", "new"), ("mlp", "prepared: router", "new")}
    assert "k-means on 128 q/k sub-vectors" in report.by_kind("attention")[0].reason
    again = sparsify.prepare(model, **inputs, options=options)
    assert {r.reason for r in again.regions} == {"kept the state the module already has"}

    exact = sparsify.prepare(tiny_model("bert", "sdpa"), **inputs, options={"attention": {**SPT, "score": "exact"}})
    assert {r.decision for r in exact.by_kind("attention")} == {"prepared: nothing needed"}
    odd = sparsify.prepare(tiny_model("bert", "sdpa"), **inputs, options={"attention": {**SPT, "subspace_dim": 3}})
    assert {(r.decision, r.reason) for r in odd.by_kind("attention")} == {
        ("dense", "head_dim 8 is not a multiple of subspace_dim 3: no codebook attached")}


@pytest.mark.parametrize("prepared,compiled,reason", [
    ({"block_order": "clustered"}, {"block_order": "contiguous"},
     "prepared with blocks=4, block_order='clustered', options ask for blocks=4, block_order='contiguous'"),
    ({"block_order": "contiguous"}, {"block_order": "clustered"},
     "prepared with blocks=4, block_order='contiguous', options ask for blocks=4, block_order='clustered'"),
    ({"blocks": 2}, {"blocks": 4},
     "prepared with blocks=2, block_order='contiguous', options ask for blocks=4, block_order='contiguous'"),
])
def test_state_made_with_other_options_stays_dense(prepared, compiled, reason):
    model = tiny_model("llama", "sdpa")
    inputs = tiny_inputs("llama")
    sparsify.prepare(model, **inputs, options=routed(**prepared))
    report = sparsify.explain(model, **inputs, options=routed(**compiled))
    assert [r.decision for r in report.by_kind("mlp")] == ["dense", "dense"]
    assert all(reason in r.reason for r in report.by_kind("mlp"))
    # preparing again with the other options keeps the state, and says the compile will stay dense
    with pytest.warns(UserWarning, match="prepare keeps existing state"):
        again = sparsify.prepare(model, **inputs, options=routed(**compiled))
    assert {r.decision for r in again.by_kind("mlp")} == {"dense"}


def test_prepare_after_in_place_compile():
    model = tiny_model("llama", "sdpa").eval()
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        expected = first_output(model(**inputs))
    options = {"attention": SPT, "inner": "aot_eager"}
    model.compile(backend="sparsify", options=options)
    report = sparsify.prepare(model, **inputs, options=options)
    assert {r.decision for r in report.by_kind("attention")} == {"prepared: pq_codebook"}
    assert model._compiled_call_impl is not None  # the user's compiled call is back in place
    with torch.no_grad():
        out = first_output(model(**inputs))
    assert [r.decision for r in sparsify.last_report().by_kind("attention")] == ["spt", "spt"]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_explain_and_count_flops_after_in_place_compile():
    model = tiny_model("llama", "sdpa").eval()
    inputs = tiny_inputs("llama")
    options = {"attention": {**SPT, "score": "exact"}, "inner": "aot_eager"}
    before = sparsify.count_flops(model, **inputs, options=options)
    model.compile(backend="sparsify", options=options)
    report = sparsify.explain(model, **inputs, options=options)
    assert [r.decision for r in report.by_kind("attention")] == ["spt", "spt"]
    assert sparsify.count_flops(model, **inputs, options=options) == before
    assert model._compiled_call_impl is not None


@pytest.fixture
def graph_break_in_bert_layers(monkeypatch):
    layer = transformers.models.bert.modeling_bert.BertLayer
    forward = layer.forward

    def breaking_forward(self, *args, **kwargs):
        torch._dynamo.graph_break()  # Dynamo resumes in this layer's frame: its paths start at the layer
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(layer, "forward", breaking_forward)


@pytest.mark.parametrize("score", ["codes", pytest.param("exact", marks=pytest.mark.wide)])
def test_graph_break_inside_a_layer(graph_break_in_bert_layers, score):
    model = tiny_model("bert", "eager").train()
    inputs = tiny_inputs("bert")
    options = {"attention": {**SPT, "score": score}, **routed(top_k=4, gate="none")}
    report = sparsify.prepare(model, **inputs, options=options)
    names = dict(model.named_modules())
    assert report.graphs > 1
    assert sorted(r.module for r in report.regions) == [
        "encoder.layer.0", "encoder.layer.0.attention.self", "encoder.layer.1", "encoder.layer.1.attention.self"]
    assert all(r.module in names for r in report.regions)
    if score == "codes":
        assert [n for n, _ in model.named_parameters() if "sparsify_pq" in n] == [
            "encoder.layer.0.attention.self.sparsify_pq_codebook", "encoder.layer.1.attention.self.sparsify_pq_codebook"]
    torch._dynamo.reset()
    assert_compiled_matches_eager(model, inputs, options)
    torch._dynamo.reset()
    compiled = sparsify.explain(model, **inputs, options=options)
    assert sorted((r.module, r.decision) for r in compiled.regions) == [
        ("encoder.layer.0", "routed"), ("encoder.layer.0.attention.self", "spt"),
        ("encoder.layer.1", "routed"), ("encoder.layer.1.attention.self", "spt")]

    torch._dynamo.reset()
    excluded = sparsify.explain(model, **inputs, options={**options, "exclude": ["encoder.layer.1*"]})
    assert sorted((r.module, r.decision) for r in excluded.regions) == [
        ("encoder.layer.0", "routed"), ("encoder.layer.0.attention.self", "spt"),
        ("encoder.layer.1", "skipped"), ("encoder.layer.1.attention.self", "skipped")]


def test_prepare_respects_exclude(graph_break_in_bert_layers):
    model = tiny_model("bert", "eager")
    report = sparsify.prepare(model, **tiny_inputs("bert"), options={"attention": SPT, "exclude": ["encoder.layer.0.*"]})
    assert sorted((r.module, r.decision) for r in report.by_kind("attention")) == [
        ("encoder.layer.0.attention.self", "skipped"), ("encoder.layer.1.attention.self", "prepared: pq_codebook")]
    assert [n for n, _ in model.named_parameters() if "sparsify" in n] == [
        "encoder.layer.1.attention.self.sparsify_pq_codebook"]


def test_more_codewords_than_samples_warns_once():
    model = tiny_model("bert", "sdpa")
    inputs = tiny_inputs("bert")
    with pytest.warns(UserWarning, match=r"encoder.layer.0.attention.self only 128 q/k sub-vectors per subspace "
                                         r"for codewords=256 \(2 module\(s\) alike\)") as caught:
        sparsify.prepare(model, **inputs, options={"attention": {**SPT, "codewords": 256}})
    assert sum("sub-vectors per subspace" in str(w.message) for w in caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough samples: no warning
        sparsify.prepare(tiny_model("bert", "sdpa"), **inputs, options={"attention": {**SPT, "codewords": 16}})
