"""MST (sparsify/methods/mst.py, sparsify/training.py): the authors' Erdos-Renyi allocation, the schedule, masks on
every projection (the tied LM head included), the compiled model equal to eager with masked weights, masked
weights exactly zero after every step, topology updates that follow the target without recompiling, and AdamW
moments of regrown weights reset (the authors leave them stale)."""

import pytest
import torch

import sparsify
from sparsify.methods.mst import BLOCKS, GRAD_BLOCKS, MASK, layer_densities, target_sparsity
from sparsify.ops.block_linear import expand_blocks
from families import tiny_config


def mst(**fields):
    return {"linear": {"method": "mst", **fields}, "attention": "off", "mlp": "off", "inner": "aot_eager"}


def test_erdos_renyi_allocation_is_the_authors_on_gpt2_small():
    """papers.md: at S=0.9 on GPT-2 small with the tied head, c_attn 0.892, attn c_proj 0.838, c_fc and mlp c_proj
    0.899, lm_head 0.918; the global sparsity is the target."""
    shapes = {}
    for layer in range(12):
        shapes.update({f"{layer}.c_attn": (2304, 768), f"{layer}.attn.c_proj": (768, 768),
                       f"{layer}.c_fc": (3072, 768), f"{layer}.mlp.c_proj": (768, 3072)})
    shapes["lm_head"] = (50257, 768)
    density = layer_densities(shapes, 0.9, "erdos_renyi")
    got = {k: round(1 - density[k], 3) for k in ("0.c_attn", "0.attn.c_proj", "0.c_fc", "0.mlp.c_proj", "lm_head")}
    assert got == {"0.c_attn": 0.892, "0.attn.c_proj": 0.838, "0.c_fc": 0.899, "0.mlp.c_proj": 0.899, "lm_head": 0.918}
    sizes = {k: a * b for k, (a, b) in shapes.items()}
    assert sum(density[k] * sizes[k] for k in shapes) / sum(sizes.values()) == pytest.approx(0.1)


def test_a_layer_erdos_renyi_pushes_past_one_is_dense_and_the_rest_meet_the_target():
    shapes = {"tiny": (4, 4), "big": (512, 512)}
    density = layer_densities(shapes, 0.5, "erdos_renyi")
    assert density["tiny"] == 1.0
    assert (16 + density["big"] * 512 * 512) / (16 + 512 * 512) == pytest.approx(0.5)


def test_schedule_has_three_phases_and_no_jump():
    o = sparsify.SparsifyConfig.from_options(mst(total_steps=1000)).linear
    s = [target_sparsity(t, o) for t in range(0, 1001)]
    assert s[0] == 0.0 and s[250] == pytest.approx(0.9) and s[500] == pytest.approx(0.9) and s[1000] == pytest.approx(0.5)
    assert max(abs(a - b) for a, b in zip(s, s[1:])) < 0.01  # spread over the steps, not a staircase


@pytest.mark.parametrize("bad, match", [
    ({"ultra_end": 0.2}, "ultra_end=0.2 is not valid: it must be > warmup_end"),
    ({"ultra_sparsity": 1.0}, "ultra_sparsity"),
    ({"delta": 0}, "delta"),
    ({"total_steps": 0}, "total_steps"),
    ({"growth": "magnitude"}, "growth"),
    ({"allocation": "erk"}, "allocation"),
    ({"zeta": -0.1}, "zeta"),
    ({"block": (24, 32)}, "block"),
    ({"block": 32}, "block"),
])
def test_bad_options_fail_when_made(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sparsify.SparsifyConfig.from_options(mst(**bad))


def _gpt2(seed=0):
    import transformers
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(tiny_config("gpt2"))


def _batch():
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 90, (2, 12), generator=g)}


def test_every_projection_gets_a_mask_and_the_compiled_model_equals_eager_with_masked_weights():
    model = _gpt2()
    torch._dynamo.reset()
    report = sparsify.prepare(model, **_batch(), options=mst())
    masked = {path: module for path, module in model.named_modules() if hasattr(module, MASK)}
    # GPT-2's c_attn, attn.c_proj, c_fc, mlp.c_proj per layer (Conv1D) and the tied lm_head
    assert len(masked) == 4 * model.config.n_layer + 1 and "lm_head" in masked, sorted(masked)
    assert all(r.decision == "prepared: mst_mask" for r in report.by_kind("linear"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in masked.values():
            getattr(module, MASK).copy_(torch.rand(module.weight.shape, generator=g) > 0.5)
            module.weight.mul_(getattr(module, MASK))
    with torch.no_grad():
        expected = model(**_batch()).logits
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sparsify", options=mst())
    out = compiled(**_batch()).logits
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert {r.decision for r in sparsify.last_report().by_kind("linear")} == {"mst (masked weight)"}
    # the backward gives the dense gradient (growth reads it), MixedSparsity masks it before the optimizer
    out.logsumexp(-1).mean().backward()
    c_fc = masked["transformer.h.0.mlp.c_fc"]
    assert (c_fc.weight.grad[~getattr(c_fc, MASK)] != 0).any()


def test_training_keeps_masked_weights_zero_follows_the_target_and_never_recompiles(compiled_graphs):
    model = _gpt2()
    options = mst(total_steps=40, delta=5, warmup_end=0.25, ultra_end=0.5, warmup_sparsity=0.8, ultra_sparsity=0.8,
                  restore_sparsity=0.4)
    torch._dynamo.reset()
    sparsify.prepare(model, **_batch(), options=options)
    compiled = torch.compile(model, backend="sparsify", options=options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    schedule = sparsify.training.MixedSparsity(compiled, optimizer, options)
    o = schedule.options
    batch = _batch()
    for step in range(40):
        loss = compiled(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            graphs_after_first_step = len(compiled_graphs)  # the model's graphs (a graph break gives two)
        for w, mask in ((layer.weight, layer.mask) for layer in schedule.layers):
            assert not w[~mask].any(), f"a masked weight moved at step {step}"
        if step % o.delta == 0 and step > 0:
            assert schedule.sparsity() == pytest.approx(target_sparsity(step, o), abs=0.01), (step, schedule.updates[-1])
    assert len(compiled_graphs) == graphs_after_first_step, "mask and phase changes must not recompile"
    assert [u["step"] for u in schedule.updates] == list(range(5, 40, 5))
    # where the target holds (the ultra-sparse phase, step 15) the update swaps weights: drop = regrow > 0
    hold = next(u for u in schedule.updates if u["step"] == 15)
    assert hold["pruned"] == hold["regrown"] > 0


def test_regrown_weights_get_zeroed_adam_moments():
    """On an update step (the optimizer step skipped, as the authors do) a regrown weight's exp_avg and exp_avg_sq are
    zero: before the reset some of them were not (weights pruned earlier keep decaying moments), which the authors'
    code would hand to the regrown weight."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    options = mst(total_steps=100, delta=2, warmup_end=0.2, ultra_end=0.9, warmup_sparsity=0.5, ultra_sparsity=0.5)
    torch._dynamo.reset()
    sparsify.prepare(model, torch.randn(4, 16), options=options)
    compiled = torch.compile(model, backend="sparsify", options=options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = sparsify.training.MixedSparsity(compiled, optimizer, options)
    w, mask = schedule.layers[0].weight, schedule.layers[0].mask
    x = torch.randn(8, 16)
    stale_seen = False
    for step in range(40):
        compiled(x).square().sum().backward()
        before_mask = mask.clone()
        before = {k: v.clone() for k, v in optimizer.state[w].items() if k in ("exp_avg", "exp_avg_sq")}
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        grown = mask & ~before_mask
        if step % 2 == 0 and step > 0 and grown.any():
            for key in ("exp_avg", "exp_avg_sq"):
                assert not optimizer.state[w][key][grown].any(), (step, key)
                stale_seen |= bool(before[key][grown].any())
    assert stale_seen, "no regrown weight had stale moments: the test would not notice a missing reset"


def test_flop_account_counts_what_the_masks_keep():
    """Per step over the masked projections: forward 2 T N d, backward 4 T N d, on update steps the dense
    gradient's remainder 2 T N (1 - d); the dense model 6 T N."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    options = mst(total_steps=10, delta=3, warmup_end=0.3, ultra_end=0.9, warmup_sparsity=0.5, ultra_sparsity=0.5)
    torch._dynamo.reset()
    sparsify.prepare(model, torch.randn(4, 16), options=options)
    compiled = torch.compile(model, backend="sparsify", options=options)
    schedule = sparsify.training.MixedSparsity(compiled, torch.optim.SGD(model.parameters(), lr=0.1), options,
                                               tokens_per_step=5)
    expected = {"forward": 0.0, "backward": 0.0, "dense_gradient": 0.0}
    for step in range(6):
        compiled(torch.randn(5, 16)).sum().backward()
        kept = float(schedule.layers[0].mask.sum())  # the density this step ran at (the update comes after)
        update = step > 0 and step % 3 == 0
        expected["forward"] += 2 * 5 * kept
        expected["backward"] += 4 * 5 * kept
        expected["dense_gradient"] += 2 * 5 * (128 - kept) if update else 0.0
        schedule.step()
        model.zero_grad(set_to_none=True)
    got = schedule.flops()
    assert {k: got[k] for k in expected} == pytest.approx(expected)
    assert got["dense_model"] == 6 * 5 * 128 * 6 and got["tokens"] == 30 and got["steps"] == 6
    assert got["dense_over_mst"] == pytest.approx(got["dense_model"] / sum(expected.values()))
    assert schedule.sparsity() > 0.3  # the masks did thin out


def test_hf_trainer_runs_the_schedule_around_its_optimizer_step(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments
    model = _gpt2()
    options = mst(total_steps=6, delta=2, warmup_end=0.5, ultra_end=0.9, skip_update_step=False)
    torch._dynamo.reset()
    sparsify.prepare(model, **_batch(), options=options)
    ids = _batch()["input_ids"]
    data = [{"input_ids": ids[i % 2], "labels": ids[i % 2]} for i in range(12)]
    model.compile(backend="sparsify", options=options)
    schedule = sparsify.training.MixedSparsity(model, None, options)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[schedule.trainer_callback()])
    trainer.train()
    assert schedule.steps_done == 6 and schedule.optimizer is trainer.optimizer
    assert [u["step"] for u in schedule.updates] == [2, 4]
    assert schedule.sparsity() > 0.3
    for w, mask in ((layer.weight, layer.mask) for layer in schedule.layers):
        assert not w[~mask].any()


# --- block mode: masks of whole blocks, the block-sparse Linear op ---------------------------------------------

def _gpt2_blocky(seed=0):
    """A GPT-2 whose every projection (the tied head too) is a multiple of 16 on both sides."""
    import transformers
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2,
                                                                n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))


def _block_elements(module):
    """The block mask as an element mask in the module's weight layout."""
    return expand_blocks(getattr(module, BLOCKS), module.weight.shape)


def test_block_mode_compiles_to_the_block_sparse_linear_equal_to_eager_with_masked_blocks():
    model = _gpt2_blocky()
    options = mst(block=(16, 16))
    torch._dynamo.reset()
    report = sparsify.prepare(model, **_batch(), options=options)
    masked = {path: module for path, module in model.named_modules() if hasattr(module, BLOCKS)}
    assert len(masked) == 4 * 2 + 1 and not any(hasattr(m, MASK) for m in masked.values())
    assert all(r.decision == "prepared: mst_blocks" for r in report.by_kind("linear"))
    # masks in the module's layout: Conv1D c_fc is [in 32, out 128] -> [2, 8] blocks; the head [96, 32] -> [6, 2]
    assert getattr(masked["transformer.h.0.mlp.c_fc"], BLOCKS).shape == (2, 8)
    assert getattr(masked["lm_head"], BLOCKS).shape == (6, 2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in masked.values():
            blocks = getattr(module, BLOCKS)
            blocks.copy_(torch.rand(blocks.shape, generator=g) > 0.4)
            getattr(module, GRAD_BLOCKS).copy_(blocks)
            module.weight.mul_(_block_elements(module))
    with torch.no_grad():
        expected = model(**_batch()).logits
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sparsify", options=options)
    out = compiled(**_batch()).logits
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    rows = sparsify.last_report().by_kind("linear")
    assert {r.decision for r in rows} == {"mst (block-sparse linear)"}
    assert all(r.facts.get("mst_block") == "16x16" and "mst_block" in r.shown for r in rows)
    # the weight gradient exists on grad_blocks' blocks only (here the mask's); the rest is zero, not computed
    out.logsumexp(-1).mean().backward()
    c_fc = masked["transformer.h.0.mlp.c_fc"]
    keep = _block_elements(c_fc)
    assert (c_fc.weight.grad[keep] != 0).any() and not c_fc.weight.grad[~keep].any()


def test_block_mode_training_keeps_dropped_blocks_zero_reads_dense_gradients_on_update_steps_and_never_recompiles(
        compiled_graphs):
    model = _gpt2_blocky()
    options = mst(total_steps=30, delta=5, warmup_end=0.3, ultra_end=0.6, warmup_sparsity=0.75, ultra_sparsity=0.75,
                  restore_sparsity=0.5, block=(16, 16), allocation="uniform")
    torch._dynamo.reset()
    sparsify.prepare(model, **_batch(), options=options)
    compiled = torch.compile(model, backend="sparsify", options=options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    schedule = sparsify.training.MixedSparsity(compiled, optimizer, options)
    batch = _batch()
    modules = dict(model.named_modules())
    for step in range(30):
        update = schedule.is_update_step(step)
        loss = compiled(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        for layer in schedule.layers:
            assert bool(layer.grad_blocks.all()) == update or bool(layer.mask.all()), (step, layer.path)
            if update:  # the dense gradient growth reads: computed for the dropped blocks too
                dropped = ~expand_blocks(layer.mask, layer.weight.shape)
                assert not dropped.any() or layer.weight.grad[dropped].abs().sum() > 0, (step, layer.path)
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            first = len(compiled_graphs)
        for layer in schedule.layers:
            dropped = ~_block_elements(modules[layer.path])
            assert not layer.weight[dropped].any(), f"a weight of a dropped block moved at step {step}"
        if update:
            assert schedule.sparsity() == pytest.approx(target_sparsity(step, schedule.options), abs=0.05)
    assert len(compiled_graphs) == first, "block mask and phase changes must not recompile"
    assert schedule.updates and max(u["pruned"] for u in schedule.updates) > 0
    assert all(u["pruned"] % 256 == 0 for u in schedule.updates)  # whole 16 x 16 blocks
    flops = schedule.flops()
    assert flops["dense_over_mst"] > 1.2


def test_block_mode_regrows_blocks_with_zeroed_adam_moments():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    options = mst(total_steps=100, delta=2, warmup_end=0.2, ultra_end=0.9, warmup_sparsity=0.5, ultra_sparsity=0.5,
                  block=(16, 16))
    torch._dynamo.reset()
    sparsify.prepare(model, torch.randn(4, 64), options=options)
    compiled = torch.compile(model, backend="sparsify", options=options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = sparsify.training.MixedSparsity(compiled, optimizer, options)
    layer = schedule.layers[0]
    x = torch.randn(8, 64)
    seen = 0
    for step in range(30):
        compiled(x).square().sum().backward()
        before = layer.mask.clone()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        grown = expand_blocks(layer.mask & ~before, layer.weight.shape)
        if grown.any():
            seen += 1
            assert not layer.weight[grown].any()
            for key in ("exp_avg", "exp_avg_sq"):
                assert not optimizer.state[layer.weight][key][grown].any(), (step, key)
    assert seen


def test_block_sides_that_do_not_divide_a_weight_fail_at_prepare_naming_the_field_and_the_module():
    model = _gpt2_blocky()
    with pytest.raises(ValueError, match=r"options.linear.block=\(64, 64\) does not divide the weight .* of "
                                         r"transformer.h.0.attn.c_attn"):
        sparsify.prepare(model, **_batch(), options=mst(block=(64, 64)))


def test_a_model_prepared_unstructured_compiled_in_block_mode_stays_dense_and_says_why():
    model = _gpt2_blocky()
    torch._dynamo.reset()
    sparsify.prepare(model, **_batch(), options=mst())
    with pytest.warns(UserWarning):
        torch.compile(model, backend="sparsify", options=mst(block=(16, 16)))(**_batch())
    rows = sparsify.last_report().by_kind("linear")
    assert all(r.decision == "dense" for r in rows)
    assert all("it was prepared with unstructured masks" in (r.reason or "") for r in rows), [r.reason for r in rows]
