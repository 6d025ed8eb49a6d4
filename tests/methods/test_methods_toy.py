"""The method protocol, shown by two toy methods defined in this file only (adding a method touches one file):

  toy_gain (mlp):    the MLP's output times a learned per-module gain (state attached by prepare), in training
                     graphs only; between steps the gain decays in place (a schedule that must not recompile)
  toy_mask (linear): every plain projection computes with its weight times a 0/1 mask buffer (prepare drops the
                     smallest-magnitude fraction), the shape of MST's weight masks

Each is checked against eager transformers with the same effect applied by forward hooks / masked weights.
"""
import dataclasses
import operator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import sparsify
from sparsify.config import real
from sparsify.methods import Method, StateKind, register, unregister
from sparsify.methods.state import modules_with_state
from sparsify.passes.fx_utils import insert_call
from families import first_output, tiny_inputs, tiny_model

GAIN = "sparsify_toy_gain"
MASK = "sparsify_toy_mask"


@dataclass
class GainOptions:
    gain: float = real(2.0, low=0.0)
    decay: float = real(0.5, low=0.0, high=1.0)


class ToyGain(Method):
    name, kinds, options = "toy_gain", ("mlp",), GainOptions
    state = (StateKind("toy_gain", (GAIN,), lambda tensors: {}),)
    report_facts = ("gain_rows",)
    needs_prepare = True

    def decision(self, region, options, mode):
        return "toy_gain" if mode == "train" else "as written (toy_gain trains only)"

    def guard(self, region, options, states, mode):
        return None if (region.module, "toy_gain") in states else "no toy gain: call sparsify.prepare first"

    def rewrite(self, gm, region, options, states, mode):
        region.facts["gain_rows"] = 1
        if mode != "train":
            return  # inference keeps the MLP as written: a plan that differs by mode
        gain = states[(region.module, "toy_gain")][0]
        with gm.graph.inserting_after(region.output):
            scaled = insert_call(gm.graph, operator.mul, (region.output, gain), like=region.output)
        region.output.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)

    def prepare_region(self, ctx, region, options):
        created = ctx.attach(region, "toy_gain", lambda: {GAIN: torch.tensor(options.gain)},
                             ctx.hook_child(region, region.facts.get("up")))
        ctx.decide_prepared(region, "toy_gain", created, {}, f"gain {options.gain}")

    def between_steps(self, model, options, step):
        for _, _, tensors in modules_with_state(model, "toy_gain"):
            tensors[GAIN].mul_(options.decay)  # in place: the compiled graph reads the new value next step


@dataclass
class MaskOptions:
    drop: float = real(0.25, low=0.0, high=1.0)


class ToyMask(Method):
    name, kinds, options = "toy_mask", ("linear",), MaskOptions
    state = (StateKind("toy_mask", (MASK,), lambda tensors: {}),)
    needs_prepare = True

    def guard(self, region, options, states, mode):
        if region.facts["lora"]:
            return "a LoRA-wrapped projection: toy_mask masks plain weights only"
        return None if (region.module, "toy_mask") in states else "no mask: call sparsify.prepare first"

    def rewrite(self, gm, region, options, states, mode):
        proj = region.facts["_match"]
        mask = states[(region.module, "toy_mask")][0]  # in the module's layout
        with gm.graph.inserting_before(region.output):
            if region.facts["weight_transposed"]:  # Conv1D: the graph's weight is t(module weight)
                mask = insert_call(gm.graph, torch.t, (mask,), like=region.output)
            weight = insert_call(gm.graph, operator.mul, (proj.weight, mask), like=region.output)
            out = insert_call(gm.graph, F.linear, (proj.x, weight, proj.bias), like=region.output)
        region.output.replace_all_uses_with(out)

    def prepare_region(self, ctx, region, options):
        weight = ctx.model.get_submodule(region.module).weight
        created = ctx.attach(region, "toy_mask", lambda: {MASK: toy_mask_of(weight, options.drop)})
        ctx.decide_prepared(region, "toy_mask", created, {}, f"drop {options.drop}")


def toy_mask_of(weight: torch.Tensor, drop: float) -> torch.Tensor:
    """1 where |w| is above the `drop` quantile of its layer, 0 below; an integer buffer (not trained)."""
    cut = weight.detach().abs().flatten().quantile(drop)
    return (weight.detach().abs() > cut).to(torch.int8)


@pytest.fixture
def toy_methods():
    methods = [register(ToyGain()), register(ToyMask())]
    yield methods
    for method in methods:
        unregister(method.name)


def _gain_hooks(model, gains: dict):
    """Eager's version of toy_gain: each MLP module's output times its gain."""
    return [model.get_submodule(path).register_forward_hook(lambda m, a, out, g=gain: out * g)
            for path, gain in gains.items()]


def test_registry_drives_the_options(toy_methods):
    config = sparsify.SparsifyConfig.from_options({"mlp": {"method": "toy_gain", "gain": 3}, "linear": "toy_mask"})
    assert config.mlp.gain == 3.0 and config.linear.drop == 0.25
    assert "toy_gain" in sparsify.MLPConfig.method_names() and "toy_mask" in sparsify.LinearConfig.method_names()
    with pytest.raises(ValueError, match=r"options.mlp.gain=-1 is not valid; must be a finite real number >= 0"):
        sparsify.SparsifyConfig.from_options({"mlp": {"method": "toy_gain", "gain": -1}})
    with pytest.raises(ValueError, match=r"options.linear.method='rigl' is not valid; choose one of \['off', 'mst', 'toy_mask'\]"):
        sparsify.SparsifyConfig.from_options({"linear": "rigl"})
    with pytest.raises(ValueError, match="already registered"):
        register(ToyGain())


def test_unregister_removes_names_and_fields():
    register(ToyGain())
    unregister("toy_gain")
    assert "toy_gain" not in sparsify.MLPConfig.method_names()
    assert "gain" not in {f.name for f in dataclasses.fields(sparsify.MLPConfig)}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['gain'\]"):
        sparsify.SparsifyConfig.from_options({"mlp": {"gain": 2.0}})


def test_a_field_two_methods_declare_differently_is_refused():
    @dataclass
    class Clash:
        blocks: int = real(4.0, low=0.0)  # routed declares blocks as an int

    class ClashMethod(Method):
        name, kinds, options = "clash", ("mlp",), Clash

    with pytest.raises(ValueError, match=r"method 'clash' declares options.mlp.blocks, which method 'routed' declares"):
        register(ClashMethod())
    unregister("clash")


def test_toy_gain_train_eval_and_between_steps_without_recompiling(toy_methods, compiled_graphs):
    model = tiny_model("llama", "eager")
    inputs = tiny_inputs("llama")
    options = {"mlp": {"method": "toy_gain", "gain": 2.0, "decay": 0.5}, "inner": "aot_eager"}
    report = sparsify.prepare(model, **inputs, options=options)
    assert [r.decision for r in report.by_kind("mlp")] == ["prepared: toy_gain"] * 2, report
    compiled_graphs.clear()  # prepare's own trace runs the passes too: count the compiles from here
    mlps = [r.module for r in report.by_kind("mlp")]

    compiled = torch.compile(model, backend="sparsify", options=options)
    steps = sparsify.BetweenSteps(compiled, options)
    assert [m.name for _, m, _ in steps.scheduled] == ["toy_gain"]
    model.train()
    for step in range(3):
        gains = {path: getattr(model.get_submodule(path), GAIN).detach().clone() for path in mlps}
        assert all(float(g) == 2.0 * 0.5 ** step for g in gains.values())
        out = first_output(compiled(**inputs))
        hooks = _gain_hooks(model, gains)
        with torch.no_grad():
            expected = first_output(model(**inputs))
        for hook in hooks:
            hook.remove()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        out.square().mean().backward()
        assert all(getattr(model.get_submodule(p), GAIN).grad is not None for p in mlps)  # the gain is learned
        model.zero_grad(set_to_none=True)
        steps.step()
    assert compiled_graphs == ["train"], "between-steps state changes must not recompile"
    rows = sparsify.last_report().by_kind("mlp")
    assert [(r.decision, r.mode, r.facts.get("gain_rows")) for r in rows] == [("toy_gain", "train", 1)] * 2

    model.eval()  # inference: compiled separately, planned separately
    with torch.no_grad():
        out = first_output(compiled(**inputs))
        expected = first_output(model(**inputs))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert compiled_graphs == ["train", "eval"]
    rows = sparsify.last_report().by_kind("mlp")
    assert [(r.decision, r.mode) for r in rows] == [("as written (toy_gain trains only)", "eval")] * 2
    assert "[eval]" in str(rows[0])


def test_trainer_callback_steps_the_schedule(toy_methods):
    model = tiny_model("llama", "eager")
    options = {"mlp": {"method": "toy_gain", "decay": 0.5}}
    sparsify.prepare(model, **tiny_inputs("llama"), options=options)
    steps = sparsify.BetweenSteps(model, options)
    callback = steps.trainer_callback()
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    assert isinstance(callback, TrainerCallback)
    control = TrainerControl()
    callback.on_step_end(TrainingArguments(output_dir="unused", report_to=[]), TrainerState(), control)
    assert steps.steps_done == 1 and float(model.layers[0].mlp.sparsify_toy_gain) == 1.0
    steps.load_state_dict({"steps_done": 5})
    assert steps.state_dict() == {"steps_done": 5}


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # Linear, and GPT-2's Conv1D (a linear after canonicalize)
def test_toy_linear_method_composes_with_spt_attention(toy_methods, family):
    model = tiny_model(family, "eager")
    inputs = tiny_inputs(family)
    options = {"attention": {"method": "spt", "score": "exact", "keep": 1.0, "min_seq": 0},
               "linear": {"method": "toy_mask", "drop": 0.5}, "inner": "aot_eager"}
    report = sparsify.prepare(model, **inputs, options=options)
    linear = report.by_kind("linear")
    assert linear and all(r.decision == "prepared: toy_mask" for r in linear), report
    out = first_output(torch.compile(model, backend="sparsify", options=options)(**inputs))
    rows = sparsify.last_report()
    assert {r.decision for r in rows.by_kind("attention")} == {"spt"}
    assert {r.decision for r in rows.by_kind("linear")} == {"toy_mask"}
    # the dense MLP rewrite yields to the linear method that owns its projections
    assert all(r.decision == "skipped" and "toy_mask" in r.reason for r in rows.by_kind("mlp")), rows
    masked = {}
    with torch.no_grad():
        for path, module, tensors in modules_with_state(model, "toy_mask"):
            masked[path] = module.weight.detach().clone()
            module.weight.mul_(tensors[MASK])
        assert len(masked) == len(linear)
        expected = first_output(model(**inputs))
        for path, weight in masked.items():
            model.get_submodule(path).weight.copy_(weight)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(out, first_output(model(**inputs)), atol=1e-3)  # the masks did change the model


def test_two_sparse_methods_claiming_one_projection_is_an_error(toy_methods):
    model = tiny_model("llama", "eager")
    inputs = tiny_inputs("llama")
    options = {"mlp": {"method": "routed", "blocks": 2, "top_k": 2, "gate": "none"},
               "linear": {"method": "toy_mask"}, "inner": "aot_eager"}
    claims = r"claimed by mlp method 'routed' \(module 'layers.0.mlp'\) and by linear method 'toy_mask'"
    with pytest.raises(sparsify.SparsifyError, match=claims):
        sparsify.prepare(model, **inputs, options=options)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=claims) as failed:  # torch.compile wraps it
        torch.compile(model, backend="sparsify", options=options)(**inputs)
    assert isinstance(failed.value.inner_exception, sparsify.SparsifyError)
    # the dense MLP rewrite yields instead (test_toy_linear_method_composes_with_spt_attention), and so does "off"
    options["mlp"] = "off"
    torch.compile(model, backend="sparsify", options=options)(**inputs)
    assert {r.decision for r in sparsify.last_report().by_kind("mlp")} == {"skipped"}


def test_peft_lora_projections_are_linear_regions(toy_methods):
    """peft LoRA-wrapped Linears are linear regions of their own (lora=True): toy_mask's guard leaves them as
    written with its reason, the plain projections around them take the mask."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama", "eager"),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    inputs = tiny_inputs("llama")
    options = {"linear": {"method": "toy_mask"}, "inner": "aot_eager"}
    sparsify.prepare(model, **inputs, options=options)
    torch.compile(model, backend="sparsify", options=options)(**inputs)
    rows = sparsify.last_report().by_kind("linear")
    lora = {r.module for r in rows if r.facts["lora"]}
    assert lora == {f"base_model.model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}, rows
    for r in rows:
        expected = ("dense", "a LoRA-wrapped projection: toy_mask masks plain weights only") if r.facts["lora"] \
            else ("toy_mask", "")
        assert (r.decision, r.reason) == expected, r


def test_linear_method_state_survives_save_and_reload(toy_methods, tmp_path):
    """The checkpoint code reads state kinds from the registry: a new method's state reloads without edits there."""
    import transformers
    model = tiny_model("llama", "eager")
    inputs = tiny_inputs("llama")
    options = {"linear": {"method": "toy_mask", "drop": 0.5}, "inner": "aot_eager"}
    sparsify.prepare(model, **inputs, options=options)
    masks = {path: tensors[MASK].clone() for path, _, tensors in modules_with_state(model, "toy_mask")}
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="eager")
    with torch.no_grad():  # a different mask would come out of prepare on changed weights
        for name, p in reloaded.named_parameters():
            p.add_(0.01 * torch.randn_like(p))
    report = sparsify.prepare(reloaded, **inputs, options=options)
    assert {r.reason for r in report.by_kind("linear")} == {"loaded from the model's checkpoint"}, report
    again = {path: tensors[MASK] for path, _, tensors in modules_with_state(reloaded, "toy_mask")}
    assert again.keys() == masks.keys() and all(torch.equal(again[p], masks[p]) for p in masks)
