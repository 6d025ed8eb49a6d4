"""The backend end to end: compiled models equal eager, training follows eager, options, bad input."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import sparsify
from families import FAMILIES, first_output, grads_of, tiny_inputs, tiny_model
from paths import TESTS  # noqa: E402


def _loss(out):
    return first_output(out).square().mean()


def _compare_with_eager(family, impl, inner, atol=1e-5):
    model = tiny_model(family, impl).train()
    inputs = tiny_inputs(family)
    reference = first_output(model(**inputs)).detach()
    _loss(model(**inputs)).backward()
    reference_grads = grads_of(model)
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, backend="sparsify", options={"inner": inner})
    out = compiled(**inputs)
    report = sparsify.last_report()
    assert len(report.rewritten) == len(report.regions) > 0
    torch.testing.assert_close(first_output(out), reference, atol=atol, rtol=0)
    _loss(out).backward()
    grads = grads_of(model)
    assert reference_grads.keys() <= grads.keys()
    for name, grad in grads.items():  # AOTAutograd gives unused parameters (the pooler) zeros, not None
        expected = reference_grads.get(name, torch.zeros_like(grad))
        torch.testing.assert_close(grad, expected, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("family, impl", [
    # T5 (the slowest to trace) with eager attention under -m wide: its sdpa case runs here and under Inductor
    pytest.param(f, i, marks=(pytest.mark.wide,) if (f, i) == ("t5", "eager") else (), id=f"{f}-{i}")
    for f in FAMILIES for i in ("eager", "sdpa")])
def test_outputs_and_gradients_equal_eager_aot_eager(family, impl):
    _compare_with_eager(family, impl, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("family,impl", [("bert", "sdpa"), ("roberta", "eager"), ("gpt2", "eager"),
                                         ("llama", "eager"), ("opt", "sdpa"), ("t5", "sdpa")])
def test_outputs_and_gradients_equal_eager_inductor(family, impl):
    _compare_with_eager(family, impl, "inductor")


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_mode_outputs_equal_eager(family):
    model = tiny_model(family, "eager").eval()
    for padded in (True, False):
        inputs = tiny_inputs(family, padded=padded)
        compiled = torch.compile(model, backend="sparsify", options={"inner": "aot_eager"})
        with torch.no_grad():
            torch.testing.assert_close(first_output(compiled(**inputs)), first_output(model(**inputs)),
                                       atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_twenty_training_steps_follow_eager(family):
    def train(compile_backend):
        model = tiny_model(family, "sdpa", seed=3).train()
        step = torch.compile(model, backend="sparsify", options={"inner": "aot_eager"}) if compile_backend else model
        # SGD, not Adam: Adam rescales noise-level gradients (OPT's k_proj bias gets ~1e-12, exactly 0
        # in theory since softmax ignores a per-row shift) into full-size steps, so any rounding
        # difference between two correct implementations grows into a different trajectory
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses = []
        for i in range(20):
            loss = _loss(step(**tiny_inputs(family, seed=i)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    eager, compiled = train(False), train(True)
    assert compiled[-1] < compiled[0]
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), atol=1e-4, rtol=1e-4)


def test_dropout_in_training_is_applied_and_differentiable():
    import transformers
    from families import tiny_config
    config = tiny_config("t5")
    config.dropout_rate = 0.3
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config, attn_implementation="eager").train()
    compiled = torch.compile(model, backend="sparsify", options={"inner": "aot_eager"})
    inputs = tiny_inputs("t5")
    a, b = first_output(compiled(**inputs)), first_output(compiled(**inputs))
    report = sparsify.last_report()
    assert all(r.facts["dropout_p"] == pytest.approx(0.3) for r in report.regions)
    assert not torch.allclose(a, b)  # fresh dropout masks on each call
    a.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    torch.testing.assert_close(first_output(compiled(**inputs)), first_output(model(**inputs)), atol=1e-5, rtol=0)


# ---- options -----------------------------------------------------------------------------------

def test_options_dict_and_config_are_the_same():
    from_dict = sparsify.SparsifyConfig.from_options({"attention": {"method": "off"}, "inner": "aot_eager"})
    direct = sparsify.SparsifyConfig(attention=sparsify.AttentionConfig(method="off"), inner="aot_eager")
    assert from_dict == direct


@pytest.mark.parametrize("options,message", [
    ({"atention": {}}, "valid keys: \\['attention', 'dump', 'exclude', 'inner', 'linear', 'mlp', 'strict'\\]"),
    ({"attention": {"methd": "dense"}}, "\\['methd'\\] in options.attention; valid keys: \\['active', 'block', 'block_size', "),
    ({"attention": {"method": "magic"}}, "options.attention.method='magic' is not valid; choose one of"),
    ({"mlp": {"gate": "softmax"}}, "options.mlp.gate='softmax' is not valid; choose one of \\['sigmoid2p', 'none'\\]"),
    ({"inner": "tvm"}, "choose one of \\['inductor', 'aot_eager', 'eager'\\]"),
    ({"strict": "yes"}, "options.strict='yes' is not valid; must be True or False"),
    ({"attention": {"keep": 1.5}}, "options.attention.keep=1.5 is not valid; must be a real number in \\(0, 1\\]"),
    ({"mlp": {"top_k": "2"}}, "options.mlp.top_k='2' is not valid; must be an int in \\[1, blocks=4\\]"),
])
def test_bad_options_fail_at_once(options, message):
    with pytest.raises((ValueError, TypeError), match=message):  # TypeError: a value of the wrong type
        sparsify.SparsifyConfig.from_options(options)
    model = torch.nn.Linear(4, 4)
    with pytest.raises(Exception, match=message):
        torch.compile(model, backend="sparsify", options=options)(torch.randn(2, 4))


def test_backend_callable_and_method_off():
    model = tiny_model("bert", "sdpa")
    inputs = tiny_inputs("bert")
    compiled = torch.compile(model, backend=sparsify.backend({"inner": "eager", "mlp": {"method": "off"}}))
    torch.testing.assert_close(first_output(compiled(**inputs)), first_output(model(**inputs)), atol=1e-5, rtol=0)
    report = sparsify.last_report()
    assert [r.decision for r in report.by_kind("mlp")] == ["skipped", "skipped"]
    assert "options.mlp.method is 'off'" in report.by_kind("mlp")[0].reason
    assert [r.decision for r in report.by_kind("attention")] == ["sparsify.attention"] * 2


def test_exclude_patterns():
    report = sparsify.explain(tiny_model("t5", "sdpa"), **tiny_inputs("t5"), options={"exclude": ["decoder.*"]})
    decoder = [r for r in report.regions if r.module.startswith("decoder.")]
    assert decoder and all(r.decision == "skipped" and "decoder.*" in r.reason for r in decoder)
    assert all(r.decision.startswith("sparsify.") for r in report.regions if r.module.startswith("encoder."))


# ---- bad input ---------------------------------------------------------------------------------

class TanhMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def test_unsupported_region_stays_dense_with_reason():
    model, x = TanhMLP(), torch.randn(3, 8)
    report = sparsify.explain(model, x)
    [region] = report.regions
    assert region.kind == "mlp" and region.decision == "dense" and "activation not recognised" in region.reason
    compiled = torch.compile(model, backend="sparsify", options={"inner": "aot_eager"})
    torch.testing.assert_close(compiled(x), model(x))


def test_strict_mode_raises_with_module_path():
    model = tiny_model("bert", "eager")
    inputs = dict(tiny_inputs("bert"), output_attentions=True)  # probabilities escape the block
    report = sparsify.explain(model, **inputs)
    assert all("used outside the block" in r.reason for r in report.by_kind("attention"))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sparsify", options={"strict": True, "inner": "eager"})
    with pytest.raises(Exception, match="encoder.layer.0.attention.self"):
        compiled(**inputs)


def test_model_with_nothing_to_match_runs_unchanged_with_warning():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    x = torch.randn(3, 8)
    compiled = torch.compile(model, backend="sparsify", options={"inner": "aot_eager"})
    with pytest.warns(UserWarning, match="no attention or MLP block"):
        out = compiled(x)
    torch.testing.assert_close(out, model(x))


def test_graph_breaks_each_graph_is_handled():
    model = tiny_model("bert", "sdpa")
    layer0 = model.encoder.layer[0]
    original = layer0.forward

    def forward_with_break(*args, **kwargs):
        torch._dynamo.graph_break()
        return original(*args, **kwargs)

    layer0.forward = forward_with_break
    inputs = tiny_inputs("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = sparsify.explain(model, **inputs)
        compiled = torch.compile(model, backend="sparsify", options={"inner": "aot_eager"})
        out = compiled(**inputs)
    assert report.graphs >= 2
    assert len({r.graph for r in report.regions}) >= 2
    assert len(report.rewritten) == 4
    # last_report() is the last graph's; last_report(graphs=n) the compile's n graphs together
    assert len(sparsify.last_report().regions) < 4
    assert len(sparsify.last_report(graphs=report.graphs).rewritten) == 4
    torch.testing.assert_close(first_output(out), first_output(model(**inputs)), atol=1e-5, rtol=0)


def test_flops_by_block_attributes_every_flop_to_its_block():
    """flops_by_block counts each node for the region it was found in or inserted for: the dense MLP, lowered
    to plain matmuls, counts as "mlp" with exactly the gated MLP's 3 products; SDPA as "attention"; the rest
    (q/k/v/o projections, LM head) as "other"; the kinds add up to count_flops."""
    model = tiny_model("llama", "sdpa").eval()
    inputs = tiny_inputs("llama", padded=False)
    tokens = inputs["input_ids"].numel()
    by_block = sparsify.flops_by_block(model, **inputs)
    totals = sparsify.count_flops(model, **inputs)
    summed: dict = {}
    for ops in by_block.values():
        for op, n in ops.items():
            summed[op] = summed.get(op, 0) + n
    assert summed == totals
    assert set(by_block) == {"attention", "mlp", "other"}, by_block
    assert sum(by_block["mlp"].values()) == 2 * 3 * 2 * tokens * 32 * 64  # layers x products x 2·T·d·d_ff
    assert all("attention" in op for op in by_block["attention"]), by_block["attention"]
    assert sum(by_block["other"].values()) > 0


# ---- debugging ---------------------------------------------------------------------------------

def test_dump_directory(tmp_path):
    model = tiny_model("llama", "sdpa")
    torch.compile(model, backend="sparsify", options={"inner": "eager", "dump": str(tmp_path)})(**tiny_inputs("llama"))
    names = sorted(os.listdir(tmp_path))
    index = names[0].split("_")[1]
    assert {f"graph_{index}_before.py", f"graph_{index}_after.py", f"regions_{index}.txt",
            f"plan_{index}.json"} <= set(names)
    after = (tmp_path / f"graph_{index}_after.py").read_text()
    before = (tmp_path / f"graph_{index}_before.py").read_text()
    assert "sdpa_attention" in after and "dense_mlp" in after and "sparsify" not in before
    assert "layers.0.self_attn" in (tmp_path / f"regions_{index}.txt").read_text()


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env}, cwd=TESTS)


def test_entry_point_in_fresh_interpreter_and_torch_logs():
    code = (
        "import torch\n"
        "from families import tiny_model, tiny_inputs, first_output\n"
        "m = tiny_model('gpt2', 'sdpa'); x = tiny_inputs('gpt2')\n"
        "out = torch.compile(m, backend='sparsify', options={'inner': 'eager'})(**x)\n"
        "import sys; assert 'sparsify' in sys.modules\n"
        "print('maxdiff', (first_output(out) - first_output(m(**x))).abs().max().item())\n"
    )
    result = _run(code, TORCH_LOGS="sparsify")
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split("maxdiff")[1]) < 1e-5
    assert "h.0.attn: sparsify.attention" in result.stderr  # the INFO lines TORCH_LOGS turned on


def test_sparsify_dump_environment_variable(tmp_path):
    code = (
        "import torch, sparsify\n"
        "from families import tiny_model, tiny_inputs\n"
        "torch.compile(tiny_model('opt', 'sdpa'), backend='sparsify', options={'inner': 'eager'})(**tiny_inputs('opt'))\n"
    )
    result = _run(code, SPARSIFY_DUMP=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(name.startswith("regions_") for name in os.listdir(tmp_path))
