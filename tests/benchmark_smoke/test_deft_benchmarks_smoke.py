"""Smoke runs of DEFT's benchmarks: the real run's script (benchmarks/deft_finetune.py) on a tiny random BERT for
a few steps, every variant, and its summary and plot; the inference benchmark (benchmarks/deft_inference.py) in
its quick configuration. Sizes are far too small to mean anything: the tests check that the scripts run, write
what they say, and measure rather than invent (no GPU row on CPU, errors of the sparse path at zero)."""
import json
import os
import sys

import pytest

from bench_helpers import FAST, load_benchmark
from paths import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import data_fortunes  # noqa: E402


@pytest.mark.skipif(not data_fortunes.fortunes_available(), reason="fortunes not installed")
def test_deft_finetune_variants_and_summary(tmp_path):
    pytest.importorskip("peft")
    bench = load_benchmark("deft_finetune")
    for variant in ("peft", "ada"):  # deft is ada's path without the gates
        bench.main(["--model", "tiny", "--variant", variant, "--weight", "5", "--steps", "3", "--batch", "4",
                    "--seq-len", "32", "--n-test", "8", "--inner", "aot_eager", "--log-every", "0", "--skip-sweep", "1.5",
                    "--out", str(tmp_path / f"{variant}.json")])
    runs = {v: json.loads((tmp_path / f"{v}.json").read_text()) for v in ("peft", "ada")}
    for run in runs.values():
        assert len(run["eval_density_per_layer"]) == 2 and 0.0 < run["eval_density_mean"] <= 1.0
        assert run["eval_density_tau_mean"] <= 1.0 and len(run["train_density_every_10pct"]) >= 1
    assert runs["peft"]["options"]["mlp"]["measure_only"] and not runs["ada"]["options"]["mlp"]["measure_only"]
    assert runs["ada"]["ada_gates"] and runs["ada"]["eval_forward_flops"] <= runs["ada"]["eval_forward_flops_all_mlps"]
    text = bench.main(["--summary", str(tmp_path)])
    assert "| peft |" in text and "| ada (weight 5) |" in text
    # the sweep's threshold 1.5 skips both MLPs (every gate is near 1): FLOPs fall, and the table says so
    assert len(runs["ada"]["ada_skip_sweep"][0]["skipped"]) == 2 and "| 1.5 | 2 |" in text
    assert (tmp_path / "summary.md").exists() and (tmp_path / "density_per_layer.png").stat().st_size > 0


def test_deft_finetune_linear_schedule():
    """The authors' schedule: linear warm-up over 6 % of the steps from 0, then linear decay to 0 at the end."""
    import torch
    bench = load_benchmark("deft_finetune")
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = bench.lr_schedule(optimizer, "linear", 0.06, 100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[3] == pytest.approx(0.5) and lrs[6] == pytest.approx(1.0)
    assert lrs[53] == pytest.approx(0.5) and lrs[-1] == pytest.approx(1 / 94) and max(lrs) == pytest.approx(1.0)
    constant = bench.lr_schedule(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1), "constant", 0.06, 9)
    assert constant.get_last_lr() == [0.1]


def test_deft_inference_quick(tmp_path):
    bench = load_benchmark("deft_inference")
    result = bench.main(["--quick", "--device", "cpu", *FAST, "--out-dir", str(tmp_path), "--stem", "inf"])
    assert (tmp_path / "inf.json").exists() and "switch" in (tmp_path / "inf.md").read_text()
    assert result["device"].lower().startswith("cpu") and result["dtype"] == "torch.float32"
    for case in result["cases"]:
        for row in case["rows"]:
            assert row["max_abs_err"] < 1e-4  # the sparse path is exact
            assert row["down_dense_ms"] > 0 and row["down_sparse_ms"] > 0
            assert 0.0 <= row["union"] <= 1.0
        # the H200 columns are a model: MiniLM's layer is launch-bound, never sparse
        assert case["switch_h200_rows"] is None
