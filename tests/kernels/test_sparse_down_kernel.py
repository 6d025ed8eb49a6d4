"""The activation-sparse down-projection kernel (codegen/sparse_down.py): equal to the op's reference under
Triton's interpreter (fp32 exact up to summation order, fp16 within half-precision tolerance), compiled for
sm_90 (tensor cores, no spills), and on CUDA where a GPU is."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import sparsify  # noqa: F401
from sm90 import compile_sm90
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


PTRS = dict(h_ptr="*fp16", w_ptr="*fp16", b_ptr="*fp16", nrn_ptr="*i32", cnt_ptr="*i32", out_ptr="*fp16")


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.wide  # the default suite compiles this family in tests/kernels/test_sm90_all.py
def test_compiles_for_sm90_with_tensor_cores_and_no_spills(tmp_path):
    """At a GPU tile (64 tokens x 64 outputs x 32 neurons, fp16) the GEMM kernel compiles for H100/H200: tl.dot lowers
    to wgmma and ptxas reports no spills; the union kernel compiles without spills too."""
    gemm = compile_sm90(tmp_path, "sparsify.codegen.sparse_down", "get_sparse_down_kernel", "SparseDownSpec",
                        dict(BLOCK_T=64, BLOCK_N=64, BLOCK_K=32, HAS_BIAS=True), PTRS)
    assert gemm["spill_stores"] == 0 and gemm["wgmma"] > 0, gemm
    union = compile_sm90(tmp_path, "sparsify.codegen.sparse_down", "get_sparse_down_kernel", "ActiveUnionSpec",
                         dict(BLOCK_T=16, BLOCK_F=256), PTRS, num_stages=1)
    assert union["spill_stores"] == 0, union


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 16, 64])
def test_cuda_op_equals_dense(t):
    h, w, b = (x.cuda() for x in _case(t, 512, 256, 0.3, torch.float16))
    got = torch.ops.sparsify.sparse_down(h, w, b, 16)
    torch.testing.assert_close(got.float(), F.linear(h.float(), w.float(), b.float()), atol=2e-2, rtol=2e-2)
