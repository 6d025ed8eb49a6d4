"""The block-sparse Linear's kernels (codegen/block_linear.py): forward, input gradient and weight gradient equal
the masked dense products under Triton's interpreter (fp32 up to summation order, fp16 within half precision),
compile for sm_90 with tensor cores and no spills, and run through the op on CUDA where a GPU is."""
import importlib.util

import pytest
import torch

import sparsify  # noqa: F401
from sm90 import compile_sm90
from sparsify.ops.block_linear import expand_blocks

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _case(t, n, k, blocks_shape, density, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w, b = torch.randn(t, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    blocks = torch.rand(blocks_shape, generator=g) < density
    blocks[0, -1] = True
    return x.to(dtype), w.to(dtype), b.to(dtype), blocks


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 3e-2)])
@pytest.mark.parametrize("t, n, k, blocks_shape, density", [(1, 32, 32, (2, 2), 0.5), (37, 64, 48, (4, 3), 0.4),
                                                            (20, 64, 64, (2, 2), 0.0), (16, 32, 64, (1, 2), 1.0)])
def test_kernels_equal_the_masked_dense_products(interpreter, dtype, tol, t, n, k, blocks_shape, density):
    from sparsify.codegen.block_linear import block_mm_triton, block_wgrad_triton
    x, w, b, blocks = _case(t, n, k, blocks_shape, density, dtype)
    wm = (w.float() * expand_blocks(blocks, w.shape))
    for bias in (b, None):
        want = x.float() @ wm.t() + (0 if bias is None else bias.float())
        torch.testing.assert_close(block_mm_triton(x, w, blocks, bias).float(), want, atol=tol * 4, rtol=tol)
    dy = torch.randn(t, n).to(dtype)
    # input gradient: the same kernel with W^T (swapped strides) and the transposed block mask
    torch.testing.assert_close(block_mm_triton(dy, w.t(), blocks.t()).float(), dy.float() @ wm, atol=tol * 4, rtol=tol)
    grad_blocks = ~blocks
    want = (dy.float().t() @ x.float()) * expand_blocks(grad_blocks, w.shape)
    got = block_wgrad_triton(dy, x, grad_blocks).float()
    torch.testing.assert_close(got, want, atol=tol * 4, rtol=tol)
    assert torch.all(got[~expand_blocks(grad_blocks, w.shape)] == 0)


def test_kernel_reads_a_transposed_weight(interpreter):
    from sparsify.codegen.block_linear import block_mm_triton
    x, _, _, blocks = _case(9, 32, 64, (2, 4), 0.5, torch.float32)
    w = torch.randn(64, 32).t()  # Conv1D's weight as F.linear's [out, in]: strides (1, 32)
    torch.testing.assert_close(block_mm_triton(x, w, blocks), x @ (w * expand_blocks(blocks, w.shape)).t(),
                               atol=1e-4, rtol=1e-4)


PTRS = dict(x_ptr="*fp16", a_ptr="*fp16", b_ptr="*fp16", idx_ptr="*i32", cnt_ptr="*i32", out_ptr="*fp16",
            dy_ptr="*fp16", g_ptr="*i1", dw_ptr="*fp16")


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("side", [pytest.param(32, marks=pytest.mark.wide), pytest.param(64, marks=pytest.mark.wide)])  # both: in test_sm90_all (quick: 32; wide: the whole table)
def test_compiles_for_sm90_with_tensor_cores_and_no_spills(tmp_path, side):
    """At 64-token tiles and (side x side) blocks in fp16 both kernels compile for H100/H200 without spills. The
    forward / input-gradient dot is [64 tokens, side] x [side, side]: wgmma. The weight gradient's is [side, 64] x
    [64, side]: wgmma at side 64; a 32-row block is below wgmma's 64-row tile at 4 warps, so it lowers to mma.sync
    (tensor cores, Ampere-style): why benchmarks/mst_speed.py recommends 64 x 64 blocks on Hopper."""
    mm = compile_sm90(tmp_path, "sparsify.codegen.block_linear", "get_block_linear_kernel", "BlockMMSpec",
                      dict(BLOCK_T=64, BR=side, BC=side, HAS_BIAS=True), PTRS)
    assert mm["spill_stores"] == 0 and mm["wgmma"] > 0, mm
    wgrad = compile_sm90(tmp_path, "sparsify.codegen.block_linear", "get_block_linear_kernel", "BlockWgradSpec",
                         dict(BLOCK_T=64, BN=side, BK=side), PTRS)
    assert wgrad["spill_stores"] == 0 and (wgrad["wgmma"] > 0 if side >= 64 else wgrad["mma"] > 0), wgrad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_op_forward_and_backward_equal_the_masked_linear(dtype):
    x, w, b, blocks = (t.cuda() for t in _case(300, 256, 512, (8, 16), 0.25, dtype))
    mask = expand_blocks(blocks, w.shape)
    xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
    out = torch.ops.sparsify.block_sparse_linear(xs, ws, bs, blocks, blocks)
    xe, we, be = (t.float().clone().requires_grad_(True) for t in (x, w, b))
    want = torch.nn.functional.linear(xe, we * mask, be)
    torch.testing.assert_close(out.float(), want, atol=5e-2, rtol=2e-2)
    dy = torch.randn_like(want)
    out.backward(dy.to(dtype))
    want.backward(dy)
    torch.testing.assert_close(xs.grad.float(), xe.grad, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(ws.grad.float(), we.grad, atol=2e-1, rtol=2e-2)
