"""sparsify::block_sparse_linear (ops/block_linear.py), MST's block mode: equal to F.linear with the expanded block
mask, the weight gradient dense where grad_blocks is all True and restricted to its blocks otherwise; fake kernel,
autograd and schema pass opcheck; float64 gradcheck; bad block shapes are named."""
import pytest
import torch
import torch.nn.functional as F

import sparsify  # noqa: F401  (registers the ops)
from sparsify.ops.block_linear import block_sparse_linear_reference, expand_blocks


def _case(t, n, k, blocks_shape, density, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g, dtype=dtype)
    w = torch.randn(n, k, generator=g, dtype=dtype)
    b = torch.randn(n, generator=g, dtype=dtype)
    blocks = torch.rand(blocks_shape, generator=g) < density
    return x, w, b, blocks


@pytest.mark.parametrize("t, n, k, blocks_shape", [(37, 64, 48, (4, 3)), (5, 32, 128, (2, 4)), (0, 32, 32, (2, 2)),
                                                   (9, 128, 64, (1, 2))])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_forward_and_gradients_equal_the_masked_dense_linear(t, n, k, blocks_shape, density):
    x, w, b, blocks = _case(t, n, k, blocks_shape, density, dtype=torch.float64)
    grad_blocks = blocks.clone()
    grad_blocks[0, 0] = True  # a block that is masked in the forward but wanted in the gradient
    mask = expand_blocks(blocks, w.shape)
    for bias in (b, None):
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        bs = None if bias is None else bias.clone().requires_grad_(True)
        got = torch.ops.sparsify.block_sparse_linear(xs, ws, bs, blocks, grad_blocks)
        xe, we = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        be = None if bias is None else bias.clone().requires_grad_(True)
        want = F.linear(xe, we * mask, be)
        torch.testing.assert_close(got, want)
        dy = torch.randn_like(want)
        got.backward(dy)
        want.backward(dy)
        torch.testing.assert_close(xs.grad, xe.grad)
        # the weight gradient: dense dy^T x on grad_blocks' blocks, zero elsewhere
        dense_grad = dy.t() @ x
        torch.testing.assert_close(ws.grad, dense_grad * expand_blocks(grad_blocks, w.shape))
        if bias is not None:
            torch.testing.assert_close(bs.grad, be.grad)


def test_all_true_grad_blocks_give_the_dense_gradient():
    """MST's update step: the growth criterion reads the weight's dense gradient through a sparse forward."""
    x, w, _, blocks = _case(12, 32, 32, (2, 2), 0.5, dtype=torch.float64)
    ws = w.clone().requires_grad_(True)
    out = torch.ops.sparsify.block_sparse_linear(x, ws, None, blocks, torch.ones_like(blocks))
    out.sum().backward()
    torch.testing.assert_close(ws.grad, torch.ones(12, 32, dtype=torch.float64).t() @ x)


def test_batched_input_and_a_transposed_weight():
    x, _, _, blocks = _case(2 * 7, 64, 32, (4, 2), 0.5)
    x = x.reshape(2, 7, 32)
    w = torch.randn(32, 64).t()  # GPT-2's Conv1D weight seen as F.linear's [out, in]: strides (1, 64)
    torch.testing.assert_close(torch.ops.sparsify.block_sparse_linear(x, w, None, blocks, blocks),
                               block_sparse_linear_reference(x, w, None, blocks), atol=1e-5, rtol=1e-5)


def test_opcheck_and_gradcheck():
    x, w, b, blocks = _case(9, 32, 48, (2, 3), 0.5, dtype=torch.float64)
    blocks[0, 0] = True
    for grad_blocks in (blocks, torch.ones_like(blocks)):
        torch.library.opcheck(torch.ops.sparsify.block_sparse_linear.default, (x, w, b, blocks, grad_blocks))
    xg, wg, bg = (t.clone().requires_grad_(True) for t in (x, w, b))
    # grad_blocks = blocks: the op is F.linear(x, w * M, b) in every input, gradient included (all-True
    # grad_blocks give the straight-through dense w-gradient instead: the test above)
    torch.autograd.gradcheck(lambda *a: torch.ops.sparsify.block_sparse_linear(*a, blocks, blocks), (xg, wg, bg),
                             fast_mode=True)  # random projections: the full Jacobian would take ~2000 calls


def test_fake_kernel_gives_the_real_shape_and_strides():
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, w, b, blocks = _case(10, 32, 32, (2, 2), 0.5)
    x = x.reshape(2, 5, 32)
    real = torch.ops.sparsify.block_sparse_linear(x, w, b, blocks, blocks)
    with FakeTensorMode() as mode:
        fake = torch.ops.sparsify.block_sparse_linear(*(mode.from_tensor(t) for t in (x, w, b, blocks, blocks)))
    assert fake.shape == real.shape and fake.stride() == real.stride()


def test_compiles_with_a_graph_input_mask():
    """Under torch.compile the block mask is a graph input: changing it in place reuses the graph."""
    x, w, b, blocks = _case(6, 32, 32, (2, 2), 0.5)
    torch._dynamo.reset()
    fn = torch.compile(lambda x, w, b, m: torch.ops.sparsify.block_sparse_linear(x, w, b, m, m), backend="aot_eager",
                       fullgraph=True)
    for _ in range(2):
        torch.testing.assert_close(fn(x, w, b, blocks), block_sparse_linear_reference(x, w, b, blocks),
                                   atol=1e-5, rtol=1e-5)
        blocks = ~blocks


@pytest.mark.parametrize("blocks_shape", [(5, 2), (2, 5), (4, 4)])
def test_blocks_that_do_not_cut_the_weight_are_named(blocks_shape):
    x, w, b, _ = _case(4, 48, 64, (1, 1), 1.0)
    with pytest.raises(ValueError, match="does not cut the weight"):
        torch.ops.sparsify.block_sparse_linear(x, w, b, torch.ones(blocks_shape, dtype=torch.bool),
                                               torch.ones(blocks_shape, dtype=torch.bool))


def test_block_lists_are_kept_until_the_mask_changes():
    """The kept-block lists are computed once per mask (and per layout: the input gradient's transposed view shares
    the mask's entry) and recomputed after an in-place change (MST's topology update), so the op stays exact."""
    from sparsify.codegen.block_linear import block_lists, compute_block_lists

    g = torch.Generator().manual_seed(3)
    blocks = torch.rand(4, 3, generator=g) < 0.5
    first = block_lists(blocks)
    assert block_lists(blocks) is first
    assert block_lists(blocks.t()) is block_lists(blocks.t())
    x, w = torch.randn(5, 48, generator=g), torch.randn(64, 48, generator=g)
    blocks[0] = ~blocks[0]  # in place, as MixedSparsity updates masks
    again = block_lists(blocks)
    assert again is not first
    for got, want in zip(again, compute_block_lists(blocks)):
        assert torch.equal(got, want)
    grad_blocks = torch.ones_like(blocks)
    torch.testing.assert_close(torch.ops.sparsify.block_sparse_linear(x, w, None, blocks, grad_blocks),
                               block_sparse_linear_reference(x, w, None, blocks), atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        frozen = torch.rand(4, 3, generator=g) < 0.5
        for got, want in zip(block_lists(frozen), compute_block_lists(frozen)):
            assert torch.equal(got, want)
