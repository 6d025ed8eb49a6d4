"""The Hugging Face Trainer on a model compiled in place with the sparsify backend.

The Trainer's own `torch_compile_backend` goes through accelerate, which only accepts its list of backend
names; what works is compiling the model in place (`model.compile(backend="sparsify", options=...)`, so
the Trainer still sees the model's class and forward signature) after `sparsify.prepare` and before the
Trainer builds its optimizer. Checked: the regions are rewritten (the classification head is not
mistaken for an MLP block), the learned SPT / routed state trains, and `save_model` writes it.
"""
import pytest
import torch

import sparsify
from families import tiny_config


def test_trainer_fine_tunes_and_saves_the_sparse_state(tmp_path):
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file
    from transformers import BertForSequenceClassification, Trainer, TrainingArguments

    cfg = tiny_config("bert", "sdpa")
    cfg.num_labels = 2
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, cfg.vocab_size, (16, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 12:] = 0  # some padded rows
    data = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": ids[i, 1] % 2} for i in range(16)]
    options = {"attention": {"method": "spt", "keep": 0.5, "min_seq": 1},
               "mlp": {"method": "routed", "blocks": 2, "top_k": 1}, "inner": "aot_eager"}
    sparsify.prepare(model, input_ids=ids[:4], attention_mask=mask[:4], options=options)
    state_before = {n: p.detach().clone() for n, p in model.named_parameters() if "sparsify_" in n}
    assert len(state_before) == 2 * 3  # per layer: codebook, router weight, router bias

    model.compile(backend="sparsify", options=options)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()

    report = sparsify.last_report()
    assert sorted((r.kind, r.decision) for r in report.regions) == [("attention", "spt")] * 2 + [("mlp", "routed")] * 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    for name, before in state_before.items():
        assert not torch.equal(model.get_parameter(name).detach(), before), f"{name} did not train"

    trainer.save_model(str(tmp_path / "saved"))
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    for name in state_before:
        torch.testing.assert_close(saved[name], model.get_parameter(name).detach(), rtol=0, atol=0)
