"""Compile a generated kernel for sm_90 on a machine without a GPU and read ptxas' figures (registers, spill stores,
wgmma / mma.sync counts, shared memory): the Hopper check of the kernel tests. In a fresh process, because the
test process imports triton in interpreter mode."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from paths import REPO

_SCRIPT = """
import json, os, re, subprocess, sys, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import importlib, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
module, getter, spec_cls, dtype, consts, ptrs, warps, stages = json.loads(sys.argv[1])
mod = importlib.import_module(module)
kernel = getattr(mod, getter)(getattr(mod, spec_cls)(dtype=getattr(torch, dtype)))
sig = {a: "constexpr" if a in consts else ptrs.get(a, "i32") for a in kernel.fn.arg_names}
out = triton.compile(ASTSource(kernel.fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                     options={"num_warps": warps, "num_stages": stages})
ptx = out.asm["ptx"]
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "k.ptx")
    open(path, "w").write(ptx)
    log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=" + sm_arch_from_capability(90), path,
                          "-o", path + ".o"], capture_output=True, text=True).stderr
print(json.dumps({"registers": int(re.search(r"Used (\\d+) registers", log).group(1)),
                  "spill_stores": int(re.search(r"(\\d+) bytes spill stores", log).group(1)),
                  "wgmma": ptx.count("wgmma.mma_async"), "mma": ptx.count("mma.sync"), "shared": out.metadata.shared}))
"""


def compile_sm90(tmp_path, module: str, getter: str, spec_cls: str, consts: dict, ptrs: dict, dtype: str = "float16",
                 num_warps: int = 4, num_stages: int = 3) -> dict:
    """ptxas' figures for `module.getter(module.spec_cls(dtype=...))` at the constexprs `consts` (pointer argument
    types in `ptrs`, the rest i32); skips where this triton has no NVIDIA backend or no usable ptxas."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["SPARSIFY_CACHE_DIR"] = str(tmp_path)
    args = json.dumps([module, getter, spec_cls, dtype, consts, ptrs, num_warps, num_stages])
    run = subprocess.run([sys.executable, "-c", _SCRIPT, args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    if run.returncode != 0 and "ptxas" in run.stderr.lower():
        pytest.skip(f"no usable ptxas: {run.stderr[-500:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    print(module, spec_cls, figures)  # for the record (pytest -s)
    return figures
