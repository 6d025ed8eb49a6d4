"""Smoke run of MST's real-run script (benchmarks/mst_pretrain.py) on a 2-layer byte GPT-2 for a few steps, both
variants, and its summary and plot; and the WordNet corpus split (benchmarks/data_wordnet.py). Skipped where
Debian's wordnet-base is not installed."""
import json
import os
import sys

import pytest

from bench_helpers import load_benchmark
from paths import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import data_wordnet  # noqa: E402

pytestmark = pytest.mark.skipif(not data_wordnet.wordnet_available(), reason=f"no WordNet ({data_wordnet.INSTALL_HINT})")


def test_wordnet_glosses_split_by_gloss():
    train, val = data_wordnet.byte_splits(seed=0)
    assert train.numel() > 5_000_000 and 0 < val.numel() < train.numel() / 10
    text_val = bytes(val[:2000].tolist()).decode("utf-8", errors="replace").split("\n")[1:-1]
    text_train = bytes(train.tolist()).decode("utf-8", errors="replace")
    assert text_val and not any(len(g) > 40 and g in text_train for g in text_val)


def test_mst_pretrain_both_variants_and_summary(tmp_path):
    bench = load_benchmark("mst_pretrain")
    common = ["--steps", "6", "--delta", "2", "--eval-every", "3", "--val-batches", "1", "--batch", "2", "--seq", "32",
              "--layers", "1", "--d-model", "32", "--heads", "2", "--log-every", "0", "--inner", "aot_eager"]
    for variant in ("dense", "mst"):
        bench.main(["--variant", variant, *common, "--out", str(tmp_path / f"{variant}.json")])
    dense, mst = (json.loads((tmp_path / f"{v}.json").read_text()) for v in ("dense", "mst"))
    assert dense["dense_over_this"] == 1.0 and mst["dense_over_this"] > 1.0
    assert mst["topology_updates"] == 2 and mst["val_curve"][-1]["sparsity"] > 0.2
    assert len(dense["val_curve"]) == len(mst["val_curve"]) == 3
    # --dense-head keeps the tied LM head out of the masked set: fewer masked FLOPs, and the label says so
    bench.main(["--variant", "mst", "--dense-head", *common, "--out", str(tmp_path / "mst_dense_head.json")])
    head = json.loads((tmp_path / "mst_dense_head.json").read_text())
    assert head["options"]["linear"]["dense_tied_head"]
    assert head["masked_projection_flops"]["dense"] < mst["masked_projection_flops"]["dense"]
    text = bench.main(["--summary", str(tmp_path)])
    assert "| mst (0.9 by 0.25, 0.9 to 0.75, 0.5 at the end, dense head, delta 2) |" in text
    assert "| mst (0.9 by 0.25, 0.9 to 0.75, 0.5 at the end, delta 2) |" in text and (tmp_path / "val_loss.png").stat().st_size > 0

