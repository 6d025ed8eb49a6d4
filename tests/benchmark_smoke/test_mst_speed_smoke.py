"""Smoke run of benchmarks/mst_speed.py (the block-sparse Linear and HSA against the dense paths)."""
import json

from bench_helpers import load_benchmark


def test_mst_speed_quick_writes_linear_and_attention_rows(tmp_path):
    """benchmarks/mst_speed.py --quick: the block-sparse Linear and HSA rows with measured times and the H200
    prediction beside them (a CPU run here: labelled, the HSA path named)."""
    bench = load_benchmark("mst_speed")
    bench.main(["--quick", "--out-dir", str(tmp_path), "--budget-s", "0.05", "--max-repeats", "3", "--warmup", "1"])
    result = json.loads((tmp_path / "mst_speed_cpu.json").read_text())
    assert {r["sparsity"] for r in result["linear"]} == {0.5, 0.9}
    assert all(r["dense_ms"] > 0 and r["sparse_ms"] > 0 and r["h200_speedup"] > 0 for r in result["linear"])
    (row,) = result["attention"]
    assert row["sdpa_ms"] > 0 and row["hsa_ms"] > 0 and "reference" in row["hsa_path"]
    assert "H200 predicted" in (tmp_path / "mst_speed_cpu.md").read_text()
