"""The activation-sparse down-projection kernel (codegen/sparse_down.py): equal to the op's reference under
Triton's interpreter (fp32 exact up to summation order, fp16 within half-precision tolerance), compiled for
sm_90 (tensor cores, no spills), and on CUDA where a GPU is."""
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
from sparsify.ops.sparse_down import sparse_down_reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _case(t, f, n, density, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(t, f, generator=g)
    h[:, torch.rand(f, generator=g) > density] = 0          # whole neurons off (DEFT-like)
    h[torch.rand(t, f, generator=g) > 0.7] = 0              # and scattered zeros
    return h.to(dtype), torch.randn(n, f, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-2)])
@pytest.mark.parametrize("t, f, n, density", [(1, 64, 24, 0.3), (16, 64, 40, 0.3), (37, 80, 24, 0.5), (50, 48, 16, 0.0)])
def test_triton_equals_reference(interpreter, dtype, tol, t, f, n, density):
    from sparsify.codegen.sparse_down import sparse_down_triton
    h, w, b = _case(t, f, n, density, dtype)
    for bias in (b, None):
        got = sparse_down_triton(h, w, bias, 16)
        torch.testing.assert_close(sparse_down_triton(h, w.t().contiguous().t(), bias, 16), got)  # W^T rows
        expected = sparse_down_reference(h, w, bias, 16)
        torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(got.float(), F.linear(h.float(), w.float(), None if bias is None else bias.float()),
                                   atol=tol * 4, rtol=tol)


def test_triton_reads_strided_weights(interpreter):
    from sparsify.codegen.sparse_down import sparse_down_triton
    h, _, _ = _case(20, 32, 8, 0.5, torch.float32)
    w = torch.randn(32, 24).t()  # [24, 32] stored as W^T rows, strides (1, 24)
    torch.testing.assert_close(sparse_down_triton(h, w, None, 16), F.linear(h, w), atol=1e-5, rtol=1e-5)
    w = torch.randn(24, 64)[:, ::2]  # a strided view
    torch.testing.assert_close(sparse_down_triton(h, w, None, 16), F.linear(h, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t, f, block_t", [(1, 64, 16), (37, 300, 16), (64, 512, 32), (5, 17, 16)])
def test_union_kernel_equals_the_torch_union(interpreter, dtype, t, f, block_t):
    """One launch gives each tile's active neurons, ascending, and their count, as the torch path does (NaN counts
    as active: the dense product would carry it)."""
    from sparsify.codegen.sparse_down import active_neurons, active_neurons_triton
    h, _, _ = _case(t, f, 8, 0.4, dtype)
    h[0, 3] = float("nan")
    got_n, got_c = active_neurons_triton(h, block_t)
    want_n, want_c = active_neurons(h, block_t)
    assert torch.equal(got_c, want_c)
    for tile, count in enumerate(want_c.tolist()):
        assert torch.equal(got_n[tile, :count], want_n[tile, :count])


SM90_SCRIPT = """
import os, re, subprocess, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from sparsify.codegen.sparse_down import ActiveUnionSpec, SparseDownSpec, get_sparse_down_kernel
ptrs = dict(h_ptr="*fp16", w_ptr="*fp16", b_ptr="*fp16", nrn_ptr="*i32", cnt_ptr="*i32", out_ptr="*fp16")
for label, spec, consts, stages in (
        ("gemm", SparseDownSpec(dtype=torch.float16), dict(BLOCK_T=64, BLOCK_N=64, BLOCK_K=32, HAS_BIAS=True), 3),
        ("union", ActiveUnionSpec(dtype=torch.float16), dict(BLOCK_T=16, BLOCK_F=256), 1)):
    kernel = get_sparse_down_kernel(spec)
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "i32") for a in kernel.fn.arg_names}
    out = triton.compile(ASTSource(kernel.fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 4, "num_stages": stages})
    ptx = out.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        open(path, "w").write(ptx)
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=" + sm_arch_from_capability(90), path,
                              "-o", path + ".o"], capture_output=True, text=True).stderr
    print(label, "registers", re.search(r"Used (\\d+) registers", log).group(1),
          "spill_stores", re.search(r"(\\d+) bytes spill stores", log).group(1),
          "wgmma", ptx.count("wgmma.mma_async"), "mma", ptx.count("mma.sync"), "shared", out.metadata.shared)
"""


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_compiles_for_sm90_with_tensor_cores_and_no_spills(tmp_path):
    """At a GPU tile (64 tokens x 64 outputs x 32 neurons, fp16) the kernel compiles for H100/H200: tl.dot lowers
    to wgmma and ptxas reports no spills (figures printed for the record)."""
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
    found = {m.group(1): tuple(map(int, m.groups()[1:])) for m in
             re.finditer(r"(\w+) registers (\d+) spill_stores (\d+) wgmma (\d+) mma (\d+)", run.stdout)}
    assert set(found) == {"gemm", "union"}, run.stdout
    assert found["gemm"][1] == 0 and found["gemm"][2] > 0, run.stdout  # no spills, tensor cores
    assert found["union"][1] == 0, run.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 16, 64])
def test_cuda_op_equals_dense(t):
    h, w, b = (x.cuda() for x in _case(t, 512, 256, 0.3, torch.float16))
    got = torch.ops.sparsify.sparse_down(h, w, b, 16)
    torch.testing.assert_close(got.float(), F.linear(h.float(), w.float(), b.float()), atol=2e-2, rtol=2e-2)
