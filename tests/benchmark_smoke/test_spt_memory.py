"""SPT's whole-model bytes saved for backward against SDPA (benchmarks/spt_memory.py, issue 12's goal): with its
defaults (codes, codebook loss included) SPT saves no more than SDPA in block mode and no more than 1.25x SDPA in
token mode, and the codebook loss adds (almost) nothing over score="exact" (it recomputes in backward)."""
from bench_helpers import load_benchmark


def test_spt_defaults_save_no_more_than_sdpa():
    bench = load_benchmark("spt_memory")
    (row,) = bench.measure([512], variants=("SDPA", "SDPA, torch.compile (aot_eager)", "SPT token exact",
                                            "SPT token codes (defaults)", "SPT block codes"))
    leanest = min(row["SDPA"], row["SDPA, torch.compile (aot_eager)"])
    assert row["SPT block codes"] <= leanest, row
    assert row["SPT token codes (defaults)"] <= 1.25 * leanest, row
    assert row["SPT token codes (defaults)"] <= 1.02 * row["SPT token exact"], row  # the codebook loss recomputes
