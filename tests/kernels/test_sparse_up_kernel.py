"""The gated sparse up-projection kernel (codegen/sparse_up.py): equal to the op's reference under Triton's
interpreter (fp32 exact up to summation order, fp16 within half-precision tolerance), compiled for sm_90 (tensor
cores, no spills), and on CUDA where a GPU is."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import sparsify  # noqa: F401
from sm90 import compile_sm90
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


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.wide  # the default suite compiles this family in tests/kernels/test_sm90_all.py
def test_compiles_for_sm90_with_tensor_cores_and_no_spills(tmp_path):
    figures = compile_sm90(tmp_path, "sparsify.codegen.sparse_up", "get_sparse_up_kernel", "SparseUpSpec",
                           dict(BLOCK_T=64, BLOCK_K=64, BLOCK_D=64, HAS_BIAS=True),
                           dict(g_ptr="*fp16", x_ptr="*fp16", w_ptr="*fp16", b_ptr="*fp16", nrn_ptr="*i32",
                                cnt_ptr="*i32", out_ptr="*fp16"))
    assert figures["spill_stores"] == 0 and figures["wgmma"] > 0, figures


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 16, 64])
def test_cuda_op_equals_dense(t):
    g, x, w, b = (a.cuda() for a in _case(t, 512, 256, 0.3, torch.float16))
    got = torch.ops.sparsify.sparse_up(g, x, w, b, 16)
    torch.testing.assert_close(got.float(), g.float() * F.linear(x.float(), w.float(), b.float()), atol=5e-2, rtol=2e-2)
