"""scripts/gpu_check.py end to end on tiny shapes (on CPU here): every step runs and the summary names the device,
so the one command a lent GPU gets never fails for the first time there."""
import json
import os
import subprocess
import sys

from paths import REPO


def test_gpu_check_runs_every_step_on_tiny_shapes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SPARSIFY_CACHE_DIR"] = str(tmp_path / "kernels")
    run = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "gpu_check.py"), "--tiny", "--out",
                          str(tmp_path / "check")], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "check" / "summary.json").read_text())
    assert summary["device"] and summary["tiny"]
    failed = [(s["step"], s["status"], s["tail"]) for s in summary["steps"] if s["status"] != "ok"]
    assert not failed, failed
    assert [s["step"] for s in summary["steps"]] == ["cuda tests", "attention", "ffn", "mst", "profile"]
    files = set(summary["files"])
    assert {"profile_routed_ffn.txt", "profile_block_attention.txt", "tuned_configs.json", "mst_speed_cpu.json"} <= files, files
    assert "# GPU check on" in (tmp_path / "check" / "summary.md").read_text()
