"""ADA-DEFT, our reconstruction (sparsify/methods/ada_deft.py), against eager transformers: at the prepared gates
(g = 1) the model is unchanged and the gradient is task + DEFT's density loss + gate_weight * mean gate; in eval
the MLPs whose gate is below skip_below do not run (the output equals eager with those MLPs' outputs zeroed, the
others scaled by their gate), and the report says which layers were skipped."""
import pytest
import torch

import sparsify
from sparsify.methods.ada_deft import GATE_LOGIT, gate_values
from sparsify.ops.aux_loss import AUX_LOSSES
from families import first_output, grads_of, tiny_inputs, tiny_model
from test_deft import density_loss_by_hand, hooked_activations

# the down projection below each family's MLP region module (the gate's owner): a hook zeroes / scales it in eager
DOWN = {"bert": "output.dense", "llama": "down_proj", "t5": "wo"}


def ada(**fields):
    return {"mlp": {"method": "ada_deft", **fields}, "attention": "off", "inner": "aot_eager"}


def _prepared(family, options):
    model = tiny_model(family)
    inputs = tiny_inputs(family)
    torch._dynamo.reset()
    sparsify.prepare(model, **inputs, options=options)
    torch._dynamo.reset()
    return model, inputs


def _gates(model):
    return {name: p for name, p in model.named_parameters() if name.endswith(GATE_LOGIT)}


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_training_gradient_is_task_plus_density_plus_gate_penalty(family):
    AUX_LOSSES.clear()
    options = ada(weight=0.5, gate_weight=0.3)
    model, inputs = _prepared(family, options)
    gates = _gates(model)
    assert gates and all(float(p) == 0.0 for p in gates.values())  # g = 2 sigmoid(0) = 1
    acts, handles = hooked_activations(model, family)
    reference = first_output(model(**inputs))
    for h in handles:
        h.remove()
    # the gates multiply by exactly 1 here; their own gradient (task part) is the MLP output . dL/dy, which the
    # compiled graph gives and eager does not have: compare the model's weights, and the gates' penalty part apart
    hand = density_loss_by_hand(acts, 1e-7)
    (reference.square().mean() + 0.5 * hand).backward()
    expected = {n: g for n, g in grads_of(model).items() if not n.endswith(GATE_LOGIT)}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="sparsify", options=options)
    out = first_output(compiled(**inputs))
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    out.square().mean().backward()
    got = grads_of(model)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # the penalty alone: zero the task (0 * output keeps the graph); the last layer's gate moves no density term
    # (earlier gates change later layers' activations), so its gradient is the penalty's:
    # d/ds [gate_weight * 2 sigmoid(k s) / layers] at s = 0 = gate_weight * 0.5 k / layers (k = gate_scale, 10)
    model.zero_grad(set_to_none=True)
    (0.0 * first_output(compiled(**inputs)).sum()).backward()
    last = gates[sorted(gates)[-1]]
    torch.testing.assert_close(last.grad, torch.tensor(0.3 * 0.5 * 10 / len(gates)))
    rows = [r for r in sparsify.last_report().regions if r.kind == "mlp"]
    assert rows and all(r.decision == "ada_deft (density + gate loss)" for r in rows)


@pytest.mark.parametrize("family", ["bert", "llama", pytest.param("t5", marks=pytest.mark.wide)])
def test_eval_skips_the_layers_below_the_threshold_and_scales_the_rest(family):
    options = ada(skip_below=0.5)
    model, inputs = _prepared(family, options)
    model.eval()
    gates = sorted(_gates(model).items())
    # first gated MLP: g = 2 sigmoid(10 * -0.3) = 0.095 (skipped); the others: 2 sigmoid(10 * 0.04) = 1.197 (kept)
    with torch.no_grad():
        for i, (_, p) in enumerate(gates):
            p.fill_(-0.3 if i == 0 else 0.04)
    values = gate_values(model)
    skipped = [path for path, g in values.items() if g < 0.5]
    assert len(skipped) == 1
    handles = []
    for path, g in values.items():
        scale = 0.0 if g < 0.5 else g
        down = model.get_submodule(f"{path}.{DOWN[family]}")
        handles.append(down.register_forward_hook(lambda m, i, o, s=scale: o * s))
    with torch.no_grad():
        reference = first_output(model(**inputs))
    for h in handles:
        h.remove()
    compiled = torch.compile(model, backend="sparsify", options=options)
    with torch.no_grad():
        out = first_output(compiled(**inputs))
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    rows = {r.module: r for r in sparsify.last_report().regions if r.kind == "mlp"}
    skipped_rows = [r for r in rows.values() if r.decision == "ada_deft (skipped)"]
    assert len(skipped_rows) == 1 and "skip_below" in skipped_rows[0].facts["gate"]
    assert sum(r.decision == "ada_deft (gated)" for r in rows.values()) == len(rows) - 1
    # the skipped MLP's projections are gone from the graph: fewer FLOPs than with every gate kept
    torch._dynamo.reset()
    flops_skipping = sparsify.count_flops(model, **inputs, options=options)
    with torch.no_grad():
        gates[0][1].fill_(0.0)
    torch._dynamo.reset()
    flops_all = sparsify.count_flops(model, **inputs, options=options)
    assert sum(flops_skipping.values()) < sum(flops_all.values())


def test_without_prepare_the_mlps_stay_dense_and_say_why():
    model = tiny_model("bert")
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="sparsify.prepare"):
        torch.compile(model, backend="sparsify", options=ada())(**tiny_inputs("bert"))
    rows = [r for r in sparsify.last_report().regions if r.kind == "mlp"]
    assert rows and all(r.decision == "dense" and "prepare" in r.reason for r in rows)


@pytest.mark.parametrize("bad, match", [({"gate_weight": -1.0}, "gate_weight"), ({"skip_below": 3.0}, "skip_below"),
                                        ({"gate_scale": 0.0}, "gate_scale")])
def test_bad_options_fail_when_made(bad, match):
    with pytest.raises(ValueError, match=match):
        sparsify.SparsifyConfig.from_options(ada(**bad))
