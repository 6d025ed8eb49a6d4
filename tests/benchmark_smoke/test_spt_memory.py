"""SPT's whole-model bytes saved for backward against SDPA (benchmarks/spt_memory.py, issue 12's goal): with its
defaults (codes, codebook loss included) SPT saves no more than SDPA in block mode and no more than 1.25x SDPA in
token mode, and the codebook loss adds (almost) nothing over score="exact" (it recomputes in backward)."""
from bench_helpers import load_benchmark


def test_spt_defaults_save_no_more_than_sdpa():
    bench = load_benchmark("spt_memory")
    (row,) = bench.measure([512], variants=("SDPA", "SDPA, torch.compile (aot_eager)", "SPT token exact",
                                            "SPT token codes (defaults)", "SPT block codes"))
    leanest = min(row["SDPA"], row["SDPA, torch.compile (aot_eager)"])
    # beyond SDPA's tensors SPT saves only what it is: its codebook (a parameter it adds, 4 KB here, read by the
    # codebook loss in backward) and the block selection (int32 index + bool valid per head, query block and kept
    # key block: 2 x 8 x 1 at n 512, block 64, keep 1/8) with the dropout seed (int64): 88 bytes
    selection = 2 * 8 * 1 * (4 + 1) + 8
    assert row["SPT block codes"] <= leanest + row["SPT codebook"] + selection / 1e6, row
    assert row["SPT token codes (defaults)"] <= 1.25 * leanest, row
    assert row["SPT token codes (defaults)"] <= 1.02 * row["SPT token exact"], row  # the codebook loss recomputes
