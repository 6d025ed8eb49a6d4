"""Method state through save_pretrained / from_pretrained: sparsify.load_state, and prepare restoring it."""
import pytest
import torch
import transformers

import sparsify
from families import first_output, tiny_inputs, tiny_model

OPTIONS = {"attention": {"method": "spt", "min_seq": 0}, "mlp": {"method": "routed"}, "inner": "aot_eager"}
STATE_NAMES = ("sparsify_pq_codebook", "sparsify_router_weight", "sparsify_router_bias", "sparsify_neuron_order")


def options_for(family):
    # Llama with clustered blocks, so the neuron order buffer travels through the checkpoint too
    if family == "llama":
        return {**OPTIONS, "mlp": {"method": "routed", "block_order": "clustered"}}
    return OPTIONS


def state_of(model) -> dict:
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {n: t.detach().clone() for n, t in tensors.items() if n.rsplit(".", 1)[-1] in STATE_NAMES}


def compiled_output(model, inputs, options):
    torch._dynamo.reset()
    with torch.no_grad():
        return first_output(torch.compile(model.eval(), backend="sparsify", options=options)(**inputs))


def trained(family, options):
    """A prepared model whose state moved away from its initialisation, as training moves it."""
    model = tiny_model(family, "sdpa").eval()
    inputs = tiny_inputs(family)
    sparsify.prepare(model, **inputs, options=options)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, tensor in state_of(model).items():
            live = model.get_parameter(name) if tensor.is_floating_point() else model.get_buffer(name)
            if tensor.is_floating_point():
                live.add_(0.1 * torch.randn(tensor.shape, generator=g))
            else:  # a neuron order: another permutation
                live.copy_(live.flip(0))
    return model, inputs


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("how", ["prepare", "load_state"])
def test_reloaded_model_gets_its_trained_state_back(family, how, tmp_path, caplog):
    options = options_for(family)
    model, inputs = trained(family, options)
    expected_state = state_of(model)
    assert len(expected_state) >= 6  # two codebooks, two routers (weight + bias)
    expected = compiled_output(model, inputs, options)
    assert {r.decision for r in sparsify.last_report().regions} == {"spt", "routed"}
    model.save_pretrained(tmp_path)

    reloaded = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert state_of(reloaded) == {}  # from_pretrained drops them (unexpected keys)
    assert reloaded.config.sparsify["state"].keys() == {"pq_codebook", "router"}
    if how == "prepare":
        with caplog.at_level("WARNING", logger="sparsify"):
            report = sparsify.prepare(reloaded, **inputs, options=options)
        assert "loaded the method state of 4 module(s)" in caplog.text
        assert {(r.decision, r.reason) for r in report.regions} == {
            ("prepared: pq_codebook", "loaded from the model's checkpoint"),
            ("prepared: router", "loaded from the model's checkpoint")}
    else:
        loaded = sparsify.load_state(reloaded, tmp_path)
        assert {kind for _, kind in loaded} == {"pq_codebook", "router"} and len(loaded) == 4
    state = state_of(reloaded)
    assert state.keys() == expected_state.keys()
    for name, tensor in expected_state.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    torch.testing.assert_close(compiled_output(reloaded, inputs, options), expected, atol=0, rtol=0)
    assert {r.decision for r in sparsify.last_report().regions} == {"spt", "routed"}


def test_load_state_reads_shards_files_and_state_dicts(tmp_path):
    options = options_for("llama")
    model, inputs = trained("llama", options)
    expected = state_of(model)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="8KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    for source in (tmp_path / "sharded", tmp_path / "weights.pt", model.state_dict()):
        fresh = tiny_model("llama", "sdpa", seed=3)
        sparsify.load_state(fresh, source)
        state = state_of(fresh)
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[n], t) for n, t in expected.items())
    # loading over state of other options replaces it: the neuron order goes away with "contiguous"
    contiguous = {k: v for k, v in model.state_dict().items() if not k.endswith("sparsify_neuron_order")}
    sparsify.load_state(fresh, contiguous)
    assert not any(n.endswith("sparsify_neuron_order") for n, _ in fresh.named_buffers())
    assert fresh.config.sparsify["state"]["router"]["layers.0.mlp"] == {"blocks": 4, "block_order": "contiguous"}


def test_load_state_names_a_module_the_model_lacks():
    model = tiny_model("bert", "sdpa")
    with pytest.raises(ValueError, match="no module 'encoder.layer.7.attention.self'"):
        sparsify.load_state(model, {"encoder.layer.7.attention.self.sparsify_pq_codebook": torch.zeros(1, 16, 8)})


def test_prepare_warns_once_when_the_saved_state_is_not_found(tmp_path):
    model, inputs = trained("bert", OPTIONS)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="sdpa")
    reloaded.name_or_path = reloaded.config._name_or_path = str(tmp_path / "moved")
    with pytest.warns(UserWarning, match=r"4 module\(s\) had method state.*sparsify.load_state") as caught:
        report = sparsify.prepare(reloaded, **inputs, options=OPTIONS)
    assert sum("had method state" in str(w.message) for w in caught) == 1
    assert {r.reason.split(":")[0] for r in report.regions} == {"new"}
