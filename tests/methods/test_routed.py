"""SPT routed FFN through the backend: exactness at top_k == blocks, state, guards, FLOPs."""
import pytest
import torch

import sparsify
from families import assert_compiled_matches_eager, first_output, op_flops, tiny_inputs, tiny_model


def routed_options(**mlp):
    return {"mlp": {"method": "routed", "blocks": 4, "top_k": 2, **mlp}, "inner": "aot_eager"}



@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", pytest.param("t5", marks=pytest.mark.wide)])
def test_ungated_all_blocks_equals_dense(family):
    model = tiny_model(family, "sdpa").train()
    inputs = tiny_inputs(family)
    options = routed_options(top_k=4, gate="none")
    sparsify.prepare(model, **inputs, options=options)
    report = assert_compiled_matches_eager(model, inputs, options)
    assert {r.decision for r in report.by_kind("mlp")} == {"routed"}


@pytest.mark.parametrize("block_order", ["contiguous", "clustered"])
def test_routers_are_parameters_learn_and_survive_checkpoints(block_order, tmp_path):
    model = tiny_model("llama", "sdpa").train()
    inputs = tiny_inputs("llama")
    options = routed_options(block_order=block_order)
    sparsify.prepare(model, **inputs, options=options)
    router = model.get_parameter("layers.0.mlp.sparsify_router_weight")
    assert router.shape == (4, 32)
    assert ("layers.0.mlp.sparsify_neuron_order" in dict(model.named_buffers())) == (block_order == "clustered")
    compiled = torch.compile(model, backend="sparsify", options=options)
    first_output(compiled(**inputs)).square().mean().backward()
    assert router.grad is not None and router.grad.abs().sum() > 0  # learns through the 2p gate

    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    fresh = tiny_model("llama", "sdpa", seed=5)
    sparsify.prepare(fresh, **inputs, options=options)
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    torch._dynamo.reset()
    with torch.no_grad():
        a = first_output(torch.compile(model.eval(), backend="sparsify", options=options)(**inputs))
        torch._dynamo.reset()
        b = first_output(torch.compile(fresh.eval(), backend="sparsify", options=options)(**inputs))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mlp,reason", [
    ({"blocks": 3}, "d_ff 64 is not divisible by blocks=3"),
])
def test_guards(mlp, reason):
    model = tiny_model("bert", "sdpa")
    inputs = tiny_inputs("bert")
    sparsify.prepare(model, **inputs, options=routed_options())
    report = sparsify.explain(model, **inputs, options=routed_options(**mlp))
    assert [(r.decision, r.reason) for r in report.by_kind("mlp")] == [("dense", reason)] * 2
    torch._dynamo.reset()
    with pytest.raises(Exception, match="encoder.layer.0"):
        torch.compile(model, backend="sparsify", options={**routed_options(**mlp), "strict": True})(**inputs)


def test_without_prepare_the_report_says_what_to_do():
    report = sparsify.explain(tiny_model("opt", "sdpa"), **tiny_inputs("opt"), options=routed_options())
    assert all(r.decision == "dense" and "sparsify.prepare" in r.reason for r in report.by_kind("mlp"))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_flops_are_top_k_over_blocks_of_dense_plus_router(family):
    """FlopCounterMode on the rewritten graph: MLP FLOPs at top_k / blocks of dense, plus the router's."""
    inputs = tiny_inputs(family, padded=False)
    tokens = inputs["input_ids"].numel()

    def mlp_flops(options):
        torch._dynamo.reset()
        model = tiny_model(family, "sdpa").eval()
        if options["mlp"]["method"] == "routed":
            sparsify.prepare(model, **inputs, options=options)
        return sparsify.flops_by_block(model, **inputs, options=options)["mlp"]

    # the dense MLP runs as plain torch calls (passes/lower.py), counted for the block all the same
    dense = sum(mlp_flops({"mlp": {"method": "dense"}}).values())
    routed_ops = mlp_flops(routed_options(top_k=2))
    assert set(routed_ops) == {"sparsify.routed_mlp"}, routed_ops
    routed = routed_ops["sparsify.routed_mlp"]
    router = 2 * 2 * tokens * 4 * 32  # 2 layers x 2·T·blocks·d_model
    assert dense > 0 and routed == dense * 2 // 4 + router


def test_mlp_module_compiled_as_the_root():
    """The compiled root's own hooks run outside the traced frame: its router is tagged from its
    up projection instead, and the region still becomes routed."""
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    model, x = MLP(), torch.randn(4, 16)
    options = routed_options(top_k=4, gate="none")
    sparsify.prepare(model, x, options=options)
    out = torch.compile(model, backend="sparsify", options=options)(x)
    assert [r.decision for r in sparsify.last_report().by_kind("mlp")] == ["routed"]
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=0)


def _saved_storages(fn):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_training_saves_the_up_outputs_unless_told_to_recompute():
    """options.mlp.recompute: the default saves each kept block's up and gate outputs (no recompute GEMM in backward),
    True saves only the inputs; both give the same gradients, and the report says which ran."""
    model = tiny_model("llama", "sdpa").train()
    inputs = tiny_inputs("llama")
    sparsify.prepare(model, **inputs, options=routed_options())
    runs = {}
    for recompute in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="sparsify", options=routed_options(recompute=recompute))
        first_output(compiled(**inputs)).square().mean().backward()  # compile outside the hooks
        model.zero_grad(set_to_none=True)
        out, saved = _saved_storages(lambda: first_output(compiled(**inputs)))
        out.square().mean().backward()
        facts = {r.facts.get("backward") for r in sparsify.last_report().by_kind("mlp")}
        runs[recompute] = (saved, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                           facts)
        model.zero_grad(set_to_none=True)
    (saved_pre, grads_pre, facts_pre), (saved_re, grads_re, facts_re) = runs[False], runs[True]
    assert facts_pre == {"saves up outputs"} and facts_re == {"recomputes up outputs"}
    for name, grad in grads_re.items():
        torch.testing.assert_close(grads_pre[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    # per layer: up and gate outputs of T * top_k assignments x d_ff / blocks neurons, fp32
    tokens = inputs["input_ids"].numel()
    layers, d_ff = model.config.num_hidden_layers, model.config.intermediate_size
    assert saved_pre - saved_re == layers * 2 * tokens * 2 * (d_ff // 4) * 4
