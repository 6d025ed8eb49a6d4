"""The gated sparse up-projection kernel (codegen/sparse_up.py): equal to the op's reference under Triton's
interpreter (fp32 exact up to summation order, fp16 within half-precision tolerance), compiled for sm_90 (tensor
cores, no spills), and on CUDA where a GPU is."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sparsify  # noqa: F401
from paths import REPO
from sparsify.ops.sparse_up import sparse_up_reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _case(t, f, d, density, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(t, f, generator=gen)
    g[:, torch.rand(f, generator=gen) > density] = 0  # neurons the gate keeps off for every token
    g[torch.rand(t, f, generator=gen) > 0.7] = 0
    return (g.to(dtype), torch.randn(t, d, generator=gen).to(dtype), torch.randn(f, d, generator=gen).to(dtype),
            torch.randn(f, generator=gen).to(dtype))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-2)])
@pytest.mark.parametrize("t, f, d, density", [(1, 64, 24, 0.3), (16, 64, 40, 0.3), (37, 80, 24, 0.5), (20, 48, 16, 0.0)])
def test_triton_equals_reference(interpreter, dtype, tol, t, f, d, density):
    from sparsify.codegen.sparse_up import sparse_up_triton
    g, x, w, b = _case(t, f, d, density, dtype)
    for bias in (b, None):
        got = sparse_up_triton(g, x, w, bias, 16)
        torch.testing.assert_close(got.float(), sparse_up_reference(g, x, w, bias, 16).float(), atol=tol, rtol=tol)
        dense = g.float() * F.linear(x.float(), w.float(), None if bias is None else bias.float())
        torch.testing.assert_close(got.float(), dense, atol=tol * 8, rtol=tol)


SM90_SCRIPT = """
import os, re, subprocess, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from sparsify.codegen.sparse_up import SparseUpSpec, get_sparse_up_kernel
kernel = get_sparse_up_kernel(SparseUpSpec(dtype=torch.float16))
consts = dict(BLOCK_T=64, BLOCK_K=64, BLOCK_D=64, HAS_BIAS=True)
ptrs = dict(g_ptr="*fp16", x_ptr="*fp16", w_ptr="*fp16", b_ptr="*fp16", nrn_ptr="*i32", cnt_ptr="*i32", out_ptr="*fp16")
sig = {a: "constexpr" if a in consts else ptrs.get(a, "i32") for a in kernel.fn.arg_names}
out = triton.compile(ASTSource(kernel.fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                     options={"num_warps": 4, "num_stages": 3})
ptx = out.asm["ptx"]
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "k.ptx")
    open(path, "w").write(ptx)
    log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=" + sm_arch_from_capability(90), path,
                          "-o", path + ".o"], capture_output=True, text=True).stderr
print("registers", re.search(r"Used (\\d+) registers", log).group(1),
      "spill_stores", re.search(r"(\\d+) bytes spill stores", log).group(1),
      "wgmma", ptx.count("wgmma.mma_async"), "mma", ptx.count("mma.sync"), "shared", out.metadata.shared)
"""


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_compiles_for_sm90_with_tensor_cores_and_no_spills(tmp_path):
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["SPARSIFY_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", SM90_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    if run.returncode != 0 and "ptxas" in run.stderr.lower():
        pytest.skip(f"no usable ptxas: {run.stderr[-500:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    print(run.stdout)
    found = re.search(r"registers (\d+) spill_stores (\d+) wgmma (\d+) mma (\d+)", run.stdout)
    assert found, run.stdout
    _, stores, wgmma, _ = map(int, found.groups())
    assert stores == 0 and wgmma > 0, run.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 16, 64])
def test_cuda_op_equals_dense(t):
    g, x, w, b = (a.cuda() for a in _case(t, 512, 256, 0.3, torch.float16))
    got = torch.ops.sparsify.sparse_up(g, x, w, b, 16)
    torch.testing.assert_close(got.float(), g.float() * F.linear(x.float(), w.float(), b.float()), atol=5e-2, rtol=2e-2)
