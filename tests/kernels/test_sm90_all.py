"""Every kernel family the codegen emits, compiled for sm_90 through its own launcher at the launcher's GPU choices
(benchmarks/sm90_kernels.py, sparsify/codegen/sm90.py), in a fresh process without the interpreter: it compiles,
ptxas reports no spills, shared memory fits a Hopper block, kernels that multiply matrices use tensor cores, and no
atomic accumulation carries acq_rel ordering.
The default suite compiles one case per family in fp16 (--quick); `-m wide` compiles the whole table (fp16 and
bf16, head_dim 64 and 128, causal or not, d_model 2048 / d_ff 8192)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from paths import REPO

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                                reason="this triton has no NVIDIA backend")

# families whose kernels multiply matrix tiles (tl.dot): every tl.dot must lower to tensor-core instructions. The
# SPT token kernels gather different keys for each query row, so they have no tile product (CUDA-core dot
# products and reductions: why token mode cannot reach flash attention's speed, README); PQ encode / select
# compare codes.
DOT_FAMILIES = {"up_projection", "grouped_up", "grouped_act_bwd", "grouped_down", "grouped_wgrad", "block_attention_fwd",
                "block_attention_bwd", "block_mm", "block_wgrad", "sparse_down", "sparse_up"}
FAMILIES = DOT_FAMILIES | {"pq_encode", "pq_select", "spt_token_fwd", "spt_token_bwd"}


def _collect(tmp_path, quick: bool) -> list:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SPARSIFY_CACHE_DIR"] = str(tmp_path / "kernels")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "sm90_kernels.py"), "--out-dir", str(tmp_path)]
    run = subprocess.run(cmd + (["--quick"] if quick else []), cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=1800)
    if run.returncode != 0 and "ptxas" in run.stderr.lower():
        pytest.skip(f"no usable ptxas: {run.stderr[-500:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    stem = "sm90_kernels_quick" if quick else "sm90_kernels"
    return json.loads((tmp_path / f"{stem}.json").read_text())["rows"]


def _check(rows):
    from sparsify.codegen.sm90 import SM90_SHARED_LIMIT
    assert {r["family"] for r in rows} == FAMILIES
    errors = [(r["family"], r["case"], r["error"]) for r in rows if "error" in r]
    assert not errors, errors
    for family in DOT_FAMILIES:  # the family still multiplies tiles (DEFT's union kernel, a scan, has none)
        assert any(r["dots"] for r in rows if r["family"] == family), family
    for r in rows:
        where = (r["family"], r["case"], r["kernel"], r["constexprs"])
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, where
        assert 0 <= r["shared"] <= SM90_SHARED_LIMIT, where
        assert r["atomics_acq_rel"] == 0, where  # accumulations are relaxed: acq_rel fences every add
        if r["dots"]:
            assert r["wgmma"] + r["mma_sync"] > 0, where
        if r["family"].startswith("block_attention"):  # the block loops are pipelined (async copies of K / V tiles)
            assert r["cp_async"] + r["tma"] > 0, where


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_every_kernel_family_compiles_for_sm90_without_spills_and_with_tensor_cores(tmp_path):
    _check(_collect(tmp_path, quick=True))


@pytest.mark.wide
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_the_whole_sm90_table(tmp_path):
    _check(_collect(tmp_path, quick=False))
