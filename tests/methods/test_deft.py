"""DEFT (sparsify/methods/deft.py, ops/density.py) against eager transformers with the authors' loss computed by
hand from forward hooks on the activation modules: outputs unchanged, every gradient equal to that of
task_loss + weight * L_density, the metrics equal to count_nonzero / numel, under peft too."""
import pytest
import torch
import torch.nn.functional as F

import sparsify
from sparsify.methods.deft import stack_of
from sparsify.ops.aux_loss import AUX_LOSSES
from families import FAMILIES, first_output, grads_of, tiny_inputs, tiny_model

# the activation module of each family's MLP (what the authors hook: RoBERTa's intermediate_act_fn, T5's act)
ACT_SUFFIX = {"bert": "intermediate.intermediate_act_fn", "roberta": "intermediate.intermediate_act_fn",
              "gpt2": "mlp.act", "llama": "mlp.act_fn", "opt": "activation_fn", "t5": "DenseReluDense.act"}


def deft(**fields):
    return {"mlp": {"method": "deft", **fields}, "attention": "off", "inner": "aot_eager"}


def hooked_activations(model, family):
    """module path -> the activation output of that MLP, filled by forward hooks on every call."""
    acts, handles = {}, []
    for name, module in model.named_modules():
        if name.endswith(ACT_SUFFIX[family]):
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: acts.__setitem__(name, o)))
    return acts, handles


def density_loss_by_hand(acts: dict, eps: float, token_mask=None) -> torch.Tensor:
    """The authors' L_density: per layer and sample, the mean of a^2 / (a^2 + eps) over (real) tokens and
    features; mean over samples and layers, per stack (T5: encoder + decoder, each weight 1)."""
    stacks = {}
    for name, a in acts.items():
        s = (a * a / (a * a + eps)).float().mean(-1)  # [B, T]
        if token_mask is not None and s.shape == token_mask.shape:
            m = token_mask.float()
            rho = (s * m).sum(-1) / m.sum(-1)
        else:
            rho = s.mean(-1)
        stacks.setdefault(stack_of(name), []).append(rho.mean())
    return sum(torch.stack(layers).mean() for layers in stacks.values())


def compare_with_hand(model, family, inputs, options, weight, eps, token_mask=None, atol=1e-5):
    acts, handles = hooked_activations(model, family)
    reference = first_output(model(**inputs))
    assert acts, "no activation module hooked"
    hand = density_loss_by_hand(acts, eps, token_mask)
    (reference.square().mean() + weight * hand).backward()
    expected = grads_of(model)
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="sparsify", options=options)
    out = first_output(compiled(**inputs))
    report = sparsify.last_report()
    torch.testing.assert_close(out, reference, atol=atol, rtol=0)  # outputs unchanged
    out.square().mean().backward()  # the task loss alone: the density gradient is injected
    got = grads_of(model)
    # parameters eager leaves without a gradient (BERT's pooler, outside the loss) get zeros from AOTAutograd
    assert set(got) >= set(expected) and all(not got[n].any() for n in set(got) - set(expected))
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=atol, rtol=1e-4, msg=name)
    return report, hand


WIDE = pytest.mark.wide


@pytest.mark.parametrize("family", [f if f in ("bert", "llama", "t5") else pytest.param(f, marks=WIDE)
                                    for f in FAMILIES])
def test_gradient_equals_task_plus_density_loss(family):
    torch._dynamo.reset()
    AUX_LOSSES.clear()
    model = tiny_model(family)
    inputs = tiny_inputs(family)
    report, hand = compare_with_hand(model, family, inputs, deft(weight=0.7), 0.7, 1e-7)
    rows = [r for r in report.regions if r.kind == "mlp"]
    assert rows and all(r.decision == "deft (density loss)" for r in rows), report
    # the recorded loss terms add up to the hand-computed L_density
    recorded = sum(v for k, v in sparsify.aux_losses().items() if k.startswith("train:"))
    assert recorded == pytest.approx(hand.item(), rel=1e-5)
    if family == "t5":  # encoder and decoder are two stacks, each averaged over its own layers
        assert {r.facts["stack"] for r in rows} == {"encoder.block.*.layer.*.DenseReluDense",
                                                    "decoder.block.*.layer.*.DenseReluDense"}


def test_mask_padding_leaves_padding_out():
    torch._dynamo.reset()
    model = tiny_model("bert")
    inputs = tiny_inputs("bert", padded=True)
    report, masked = compare_with_hand(model, "bert", inputs, deft(mask_padding=True), 1.0, 1e-7,
                                       token_mask=inputs["attention_mask"])
    assert all(r.facts["padding"] == "masked" for r in report.regions if r.kind == "mlp")
    # without the mask the padding counts: a different loss (the padded row has 3 padding tokens)
    torch._dynamo.reset()
    model = tiny_model("bert")
    _, counted = compare_with_hand(model, "bert", inputs, deft(), 1.0, 1e-7, token_mask=None)
    assert abs(masked.item() - counted.item()) > 1e-6


def test_mask_padding_without_an_attention_mask_warns_and_says_why():
    torch._dynamo.reset()
    model = tiny_model("bert")
    inputs = {"input_ids": tiny_inputs("bert")["input_ids"]}
    with pytest.warns(UserWarning, match="mask_padding=True, but this graph has no attention_mask"):
        torch.compile(model, backend="sparsify", options=deft(mask_padding=True))(**inputs)
    assert all(r.decision == "dense" for r in sparsify.last_report().regions if r.kind == "mlp")


def test_metrics_are_exact_counts_in_the_training_dtype():
    torch._dynamo.reset()
    sparsify.activation_density(reset=True)
    model = tiny_model("opt")  # relu: exact zeros
    inputs = tiny_inputs("opt", padded=False)
    acts, handles = hooked_activations(model, "opt")
    model(**inputs)
    for h in handles:
        h.remove()
    torch.compile(model, backend="sparsify", options=deft(measure_only=True))(**inputs)
    got = sparsify.activation_density(reset=True)
    assert len(got) == len(acts) == 2
    for name, a in acts.items():
        module = name.rsplit(".", 1)[0]
        m = got[f"train:{module}"]
        assert m["density"] == pytest.approx(float(torch.count_nonzero(a)) / a.numel())
        assert 0.3 < m["density"] < 0.7  # relu of random pre-activations: about half are zero
        assert m["density_tau"] == pytest.approx(float((a.abs() > 1e-3).sum()) / a.numel())
        assert m["surrogate"] == pytest.approx(float((a * a / (a * a + 1e-7)).mean()), rel=1e-6)
        assert m["exact_zeros"] is True
    assert sparsify.activation_density() == {}  # reset


def test_measure_only_adds_no_gradient():
    torch._dynamo.reset()
    model = tiny_model("bert")
    inputs = tiny_inputs("bert")
    reference = first_output(model(**inputs))
    reference.square().mean().backward()
    expected = grads_of(model)
    model.zero_grad(set_to_none=True)
    out = first_output(torch.compile(model, backend="sparsify", options=deft(measure_only=True))(**inputs))
    out.square().mean().backward()
    for name, grad in expected.items():
        torch.testing.assert_close(grads_of(model)[name], grad, atol=1e-6, rtol=0)
    assert all(r.decision == "deft (measure)" for r in sparsify.last_report().regions if r.kind == "mlp")


def test_silu_is_reported_as_never_exactly_zero():
    torch._dynamo.reset()
    sparsify.activation_density(reset=True)
    model = tiny_model("llama")
    torch.compile(model, backend="sparsify", options=deft())(**tiny_inputs("llama"))
    rows = [r for r in sparsify.last_report().regions if r.kind == "mlp"]
    assert all(r.facts["exact_zeros"].startswith("never in torch.float32") for r in rows)
    metrics = sparsify.activation_density(reset=True)
    assert metrics and all(m["exact_zeros"] is False and m["density"] == 1.0 for m in metrics.values())


def test_layers_selects_modules_and_the_rest_is_skipped():
    torch._dynamo.reset()
    model = tiny_model("bert")
    torch.compile(model, backend="sparsify", options=deft(layers="encoder.layer.1"))(**tiny_inputs("bert"))
    rows = {r.module: r for r in sparsify.last_report().regions if r.kind == "mlp"}
    assert rows["encoder.layer.1"].decision == "deft (density loss)"
    assert rows["encoder.layer.0"].decision == "skipped" and "options.mlp.layers" in rows["encoder.layer.0"].reason


def test_eval_graph_measures_and_the_report_says_so():
    torch._dynamo.reset()
    sparsify.activation_density(reset=True)
    model = tiny_model("bert").eval()
    with torch.no_grad():
        torch.compile(model, backend="sparsify", options=deft())(**tiny_inputs("bert"))
    rows = [r for r in sparsify.last_report().regions if r.kind == "mlp"]
    assert rows and all(r.mode == "eval" and r.decision == "deft (measure)" for r in rows)
    assert all(name.startswith("eval:") for name in sparsify.activation_density(reset=True))


@pytest.mark.parametrize("bad, match", [
    ({"weight": -1.0}, "options.mlp.weight=-1.0 is not valid"),
    ({"eps": 0.0}, "options.mlp.eps=0.0 is not valid"),
    ({"eps": -1e-7}, "options.mlp.eps"),
    ({"weight": "1"}, "options.mlp.weight"),
    ({"tau": float("nan")}, "options.mlp.tau"),
    ({"layers": [3]}, "options.mlp.layers"),
    ({"measure_only": 1}, "options.mlp.measure_only"),
    ({"switch_density": 1.5}, "options.mlp.switch_density=1.5 is not valid"),
    ({"inference": "fast"}, "options.mlp.inference"),
    ({"block_t": 24}, "options.mlp.block_t"),
])
def test_bad_options_fail_when_made(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sparsify.SparsifyConfig.from_options({"mlp": {"method": "deft", **bad}})


def test_composes_with_spt_attention():
    """SPT at keep=1 (exact) on attention and DEFT on the MLPs of one model: still the hand-computed gradient."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    options = {"attention": {"method": "spt", "score": "exact", "keep": 1.0, "min_seq": 0},
               "mlp": {"method": "deft"}, "inner": "aot_eager"}
    report, _ = compare_with_hand(model, "llama", tiny_inputs("llama"), options, 1.0, 1e-7, atol=2e-5)
    decisions = {r.kind: r.decision for r in report.regions}
    assert decisions == {"attention": "spt", "mlp": "deft (density loss)"}


def test_between_steps_logs_the_metrics():
    torch._dynamo.reset()
    sparsify.activation_density(reset=True)
    model = tiny_model("opt")
    options = deft()
    steps = sparsify.BetweenSteps(model, options)
    compiled = torch.compile(model, backend="sparsify", options=options)
    first_output(compiled(**tiny_inputs("opt"))).sum().backward()
    steps.step()
    logs = steps.last_metrics
    assert set(logs) >= {"deft/train/density", "deft/train/density/decoder.layers.0",
                         "deft/train/density/decoder.layers.*"}
    assert 0.3 < logs["deft/train/density"] < 0.7
    assert sparsify.activation_density() == {}  # each step reports its own forwards
    callback = steps.trainer_callback()
    trainer_logs = {"loss": 1.0}
    callback.on_log(None, None, None, logs=trainer_logs)
    assert trainer_logs["deft/train/density"] == logs["deft/train/density"] and trainer_logs["loss"] == 1.0


# --- under peft: base weights frozen, only the adapters train ------------------------------------------------------

LORA_TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"], "t5": ["q", "v"],
                "llama": ["q_proj", "v_proj"]}


def _peft_model(family, kind):
    peft = pytest.importorskip("peft")
    import transformers
    from families import tiny_config

    torch.manual_seed(0)
    if kind == "lora":  # the paper's setting: r=8, alpha=16, dropout 0.1 on query / value
        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=LORA_TARGETS[family])
        base = tiny_model(family)
    elif kind == "prefix":  # 60 virtual tokens, as the paper
        task = "CAUSAL_LM" if family == "llama" else "SEQ_2_SEQ_LM"
        auto = transformers.AutoModelForCausalLM if family == "llama" else transformers.AutoModelForSeq2SeqLM
        base = auto.from_config(tiny_config(family), attn_implementation="eager")
        config = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=60)
    else:  # (IA)3 on keys and values
        config = peft.IA3Config(target_modules=LORA_TARGETS[family][:1] + (["key"] if family != "llama" else ["k_proj"]),
                                feedforward_modules=[])
        base = tiny_model(family)
    model = peft.get_peft_model(base, config)
    # dropout (LoRA's 0.1) draws different masks in eager and compiled runs: compare in eval mode, where it is
    # off; grad mode still makes these training graphs (the adapters require grad)
    return model.eval()


@pytest.mark.parametrize("family, kind", [("bert", "lora"), pytest.param("roberta", "lora", marks=WIDE),
                                          pytest.param("t5", "lora", marks=WIDE), ("llama", "lora"),
                                          pytest.param("t5", "prefix", marks=WIDE), ("llama", "prefix"),
                                          ("t5", "ia3"), pytest.param("llama", "ia3", marks=WIDE)])
def test_under_peft_the_adapters_get_the_density_gradient(family, kind):
    torch._dynamo.reset()
    model = _peft_model(family, kind)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n or "prompt_encoder" in n or "ia3" in n or "classifier" in n or "score" in n
                             for n in trainable)
    inputs = tiny_inputs(family)
    report, hand = compare_with_hand(model, family, inputs, deft(), 1.0, 1e-7)
    rows = [r for r in report.regions if r.kind == "mlp"]
    assert rows and all(r.decision == "deft (density loss)" for r in rows), report
    assert all(r.module.startswith("base_model.") for r in rows)  # paths as model.named_modules() of the PeftModel
    # the density term moves the adapters: without it their gradient differs
    with_density = grads_of(model)
    model.zero_grad(set_to_none=True)
    first_output(model(**inputs)).square().mean().backward()
    task_only = grads_of(model)
    assert any(not torch.allclose(with_density[n], task_only[n]) for n in task_only), "density gradient is zero"


# --- inference: the down projection reads only the non-zero activations ---------------------------------------------

def _eval_run(model, family, options, monkeypatch):
    import sparsify.ops.sparse_down as sd
    calls = []
    reference = sd.sparse_down_reference
    monkeypatch.setattr(sd, "sparse_down_reference", lambda *a: calls.append(1) or reference(*a))
    inputs = tiny_inputs(family)
    with torch.no_grad():
        expected = first_output(model(**inputs))
        got = first_output(torch.compile(model, backend="sparsify", options=options)(**inputs))
    rows = [r for r in sparsify.last_report().regions if r.kind == "mlp"]
    return expected, got, rows, len(calls)


@pytest.mark.parametrize("family", ["opt", "llama", "gpt2", "t5"])
def test_sparse_inference_equals_eager(family, monkeypatch):
    torch._dynamo.reset()
    model = tiny_model(family).eval()
    expected, got, rows, calls = _eval_run(model, family, deft(inference="sparse"), monkeypatch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # GPT-2's Conv1D stores [F, N]: W^T rows as it is; nn.Linear's row-major W is gathered through its strides
    layout = "W^T rows" if family == "gpt2" else "row-major W"
    assert rows and all(r.facts["inference"].startswith(f"sparse (block_t=16, {layout}") for r in rows)
    assert calls == len(rows)  # every MLP's down projection ran through sparsify::sparse_down


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prepare_stores_the_down_projections_as_rows_and_the_result_is_unchanged(family, monkeypatch):
    torch._dynamo.reset()
    model = tiny_model(family).eval()
    inputs = tiny_inputs(family)
    with torch.no_grad():
        expected = first_output(model(**inputs))
    down = "down_proj.weight" if family == "llama" else "mlp.c_proj.weight"
    weights = {n: p for n, p in model.named_parameters() if n.endswith(down)}
    values = {n: p.detach().clone() for n, p in weights.items()}
    report = sparsify.prepare(model, **inputs, options=deft(inference="sparse"))
    assert all(r.decision == "prepared: W^T rows" for r in report.by_kind("mlp"))
    for n, p in model.named_parameters():
        if n in weights:  # nn.Linear [N, F] with strides (1, N); Conv1D [F, N] contiguous, as it was
            rows_stride = (1, p.shape[0]) if family == "llama" else (p.shape[1], 1)
            assert p is weights[n] and p.stride() == rows_stride and torch.equal(p, values[n])
    torch._dynamo.reset()
    _, got, rows, calls = _eval_run(model, family, deft(inference="sparse"), monkeypatch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert calls == len(rows) and all(r.facts["inference"] == "sparse (block_t=16, W^T rows)" for r in rows)


def test_auto_inference_follows_the_measured_training_density(monkeypatch):
    torch._dynamo.reset()
    sparsify.activation_density(reset=True)
    model = tiny_model("opt")
    first_output(torch.compile(model, backend="sparsify", options=deft())(**tiny_inputs("opt"))).sum().backward()
    density = sparsify.activation_density()["train:decoder.layers.0"]["density"]
    assert 0.3 < density < 0.7
    model.eval()
    torch._dynamo.reset()
    _, _, rows, calls = _eval_run(model, "opt", deft(inference="auto", switch_density=0.9), monkeypatch)
    assert calls == 2 and all(r.facts["inference"].startswith("sparse") for r in rows)
    torch._dynamo.reset()
    _, _, rows, calls = _eval_run(model, "opt", deft(inference="auto", switch_density=0.1), monkeypatch)
    assert calls == 0 and all("> switch_density 0.1" in r.facts["inference"] for r in rows)
    torch._dynamo.reset()  # the device's switch density: on CPU the sparse path never paid (measured)
    _, _, rows, calls = _eval_run(model, "opt", deft(inference="auto"), monkeypatch)
    assert calls == 0 and all("on cpu the sparse path did not beat dense" in r.facts["inference"] for r in rows)
    sparsify.activation_density(reset=True)
    torch._dynamo.reset()
    _, _, rows, calls = _eval_run(model, "opt", deft(inference="auto"), monkeypatch)
    assert calls == 0 and all("no training density measured" in r.facts["inference"] for r in rows)


def test_sparse_inference_leaves_a_lora_down_projection_dense_and_says_why(monkeypatch):
    peft = pytest.importorskip("peft")
    torch._dynamo.reset()
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["down_proj"])).eval()
    expected, got, rows, calls = _eval_run(model, "llama", deft(inference="sparse"), monkeypatch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert calls == 0 and all("LoRA adapter" in r.facts["inference"] for r in rows)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_gated_up_projection_reads_only_the_rows_the_gate_keeps(family, monkeypatch):
    """Gated MLPs (SwiGLU, T5's gated GELU): the gate's zeros are exact zeros of act(gate) * up, so the up projection
    runs as sparsify::sparse_up. A ReLU gate has real zeros: the output still equals eager."""
    import transformers
    import sparsify.ops.sparse_up as su
    from families import tiny_config
    torch._dynamo.reset()
    config = tiny_config(family)
    if family == "llama":
        config.hidden_act = "relu"
    else:
        config.feed_forward_proj = "gated-relu"
        config.dense_act_fn, config.is_gated_act = "relu", True
    torch.manual_seed(0)
    model = type(tiny_model(family))(config).eval()
    calls = []
    reference = su.sparse_up_reference
    monkeypatch.setattr(su, "sparse_up_reference", lambda *a: calls.append(float((a[0] != 0).float().mean()))
                        or reference(*a))
    expected, got, rows, down_calls = _eval_run(model, family, deft(inference="sparse"), monkeypatch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert rows and all(r.facts["inference_up"].startswith("sparse") for r in rows)
    assert len(calls) == len(rows) == down_calls and all(0.2 < c < 0.8 for c in calls)  # the gates had zeros
