"""Smoke tests of the benchmark scripts: each main() in a tiny configuration, so CI notices breakage.

Sizes are far too small to mean anything; the tests check that the scripts run end to end, write
their JSON / markdown, and report honestly (skips and NOT RUN checks say why; no numbers are invented).
"""

import pytest

from bench_helpers import FAST, load_benchmark as _load, result_files as _files


def test_bench_attention_tiny(tmp_path):
    bench = _load("bench_attention")
    payload = bench.main(["--device", "cpu", "--n", "64", "--head-dims", "16", "--heads", "2", "--keep", "0.25",
                          "--variants", "eager", "sdpa", "sparsify-dense", "spt-token", "spt-token-triton",
                          "spt-block", "spt-block-triton", *FAST, "--out-dir", str(tmp_path), "--stem", "att"])
    saved, markdown = _files(tmp_path, "att")
    assert saved["environment"]["device_type"] == "cpu" and "CPU" in saved["environment"]["device_name"]
    ok = {r["variant"] for r in payload["results"] if r["status"] == "ok"}
    assert {"eager", "sdpa", "sparsify-dense", "spt-token-select", "spt-token-attn", "spt-token"} <= ok
    for r in payload["results"]:
        if r["status"] == "ok":
            assert r["fwd_bwd_ms"] > 0
            if not r["variant"].endswith("-select"):
                assert r["saved_bytes"] > 0
        else:
            assert r["reason"]  # every skip says why
    # GPU targets are never claimed on CPU
    assert payload["checks"] and all(c["result"] == "NOT RUN" for c in payload["checks"])
    assert "NOT RUN" in markdown
    assert "H200 roofline" in markdown and "n 64 d 16: sdpa" in markdown  # the prediction beside the measurement
    # block mode is built: its select, attention and total rows are measured on CPU (a skip would hide a break)
    assert {"spt-block-select", "spt-block-attn", "spt-block"} <= ok, {
        r["variant"]: r.get("reason") for r in payload["results"] if r["variant"].startswith("spt-block")}


def test_bench_attention_block_mask_matches_selection():
    """The FlexAttention BlockMask built from a token selection covers exactly the selected pairs."""
    torch = pytest.importorskip("torch")
    bench = _load("bench_attention")
    pytest.importorskip("torch.nn.attention.flex_attention")
    g = torch.Generator().manual_seed(0)
    sel = torch.rand(1, 2, 200, 200, generator=g) < 0.05
    sel[0, 0, :130, :130] = True  # one full 128x128 block
    bm, density = bench.block_mask_from_dense(sel)
    dense = bm.to_dense()  # [B, H, q blocks, kv blocks]
    tiles = torch.zeros(1, 2, 256, 256, dtype=torch.bool)
    tiles[..., :200, :200] = sel
    expect = tiles.view(1, 2, 2, 128, 2, 128).any(5).any(3)
    assert torch.equal(dense.bool(), expect)
    assert 0 < density <= 1


def test_spt_table1_tiny(tmp_path):
    t1 = _load("spt_table1")
    payload = t1.main(["--device", "cpu", "--d", "32", "--heads", "2", "--d-ff", "64", "--seq", "32", "--batch", "1",
                       *FAST, "--out-dir", str(tmp_path), "--stem", "t1"])
    saved, markdown = _files(tmp_path, "t1")
    rows = {r["row"]: r for r in payload["rows"]}
    assert set(rows) == {"full", "lora", "lora_sdpa", "spt", "spt_backend"}
    for name in ("full", "lora", "lora_sdpa", "spt"):
        for block in ("mha", "ffn", "layer"):
            assert rows[name][block]["ms"] > 0, (name, block)
    assert rows["lora"]["trainable_params"] < rows["full"]["trainable_params"]
    assert "routed FFN" in markdown and "paper" in markdown.lower()
    backend_row = rows["spt_backend"]
    assert "error" not in backend_row, backend_row  # the backend row runs: an error is a failure, not a row
    assert backend_row["layer"]["ms"] > 0
    assert any(region.startswith("attention") and ": spt" in region for region in backend_row["regions"]), backend_row


def test_spt_recall_tiny(tmp_path):
    from sparsify_examples.models import ModelPackageMissing, minilm_path
    try:
        minilm_path()
    except ModelPackageMissing as exc:
        pytest.skip(str(exc))
    recall = _load("spt_recall")
    payload = recall.main(["--n", "48", "--keeps", "0.25", "--settings", "held-out", "--out-dir", str(tmp_path),
                           "--stem", "rc"])
    saved, markdown = _files(tmp_path, "rc")
    rows = payload["results"]
    assert len(rows) == 6  # one per MiniLM layer
    for r in rows:
        assert 0.0 <= r["recall_pq"] <= 1.0 and 0.0 <= r["recall_random"] <= 1.0
        assert r["mass_exact"] >= r["mass_pq"] - 1e-9  # nothing beats the exact top-L
    assert "recall" in markdown
