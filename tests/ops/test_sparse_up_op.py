"""sparsify::sparse_up (ops/sparse_up.py): a gated MLP's up projection times its gate, computed only where the gate
is non-zero, equals g * F.linear(x, w, b); fake kernel, autograd and schema pass opcheck; float64 gradcheck."""
import pytest
import torch
import torch.nn.functional as F

import sparsify  # noqa: F401  (registers the ops)
from test_sparse_down_op import sparse_activations


@pytest.mark.parametrize("t, f, d, block_t", [(37, 50, 24, 16), (5, 64, 8, 16), (64, 96, 40, 32), (0, 16, 8, 16)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_equals_gate_times_dense_up(t, f, d, block_t, density):
    g = sparse_activations(t, f, density, structured=density == 0.1)
    x, w, b = torch.randn(t, d), torch.randn(f, d), torch.randn(f)
    for bias in (b, None):
        got = torch.ops.sparsify.sparse_up(g, x, w, bias, block_t)
        torch.testing.assert_close(got, g * F.linear(x, w, bias), atol=1e-5, rtol=1e-5)


def test_batched_inputs():
    g = sparse_activations(2 * 9, 32, 0.3).reshape(2, 9, 32)
    x, w = torch.randn(2, 9, 12), torch.randn(32, 12)
    torch.testing.assert_close(torch.ops.sparsify.sparse_up(g, x, w, None, 16), g * F.linear(x, w), atol=1e-5, rtol=1e-5)


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="sparse_up expects"):
        torch.ops.sparsify.sparse_up(torch.randn(4, 8), torch.randn(4, 3), torch.randn(8, 4), None, 16)
    with pytest.raises(ValueError, match="block_t"):
        torch.ops.sparsify.sparse_up(torch.randn(4, 8), torch.randn(4, 3), torch.randn(8, 3), None, 24)


def test_opcheck_and_gradcheck():
    g = sparse_activations(19, 24, 0.4, dtype=torch.float64)
    x, w, b = (torch.randn(*s, dtype=torch.float64) for s in ((19, 10), (24, 10), (24,)))
    torch.library.opcheck(torch.ops.sparsify.sparse_up.default, (g, x, w, b, 16))
    args = [a.clone().requires_grad_(True) for a in (g, x, w, b)]
    torch.autograd.gradcheck(lambda *a: torch.ops.sparsify.sparse_up(*a, 16), args)
    torch.ops.sparsify.sparse_up(*args, 16).square().sum().backward()
    dense = [a.clone().requires_grad_(True) for a in (g, x, w, b)]
    (dense[0] * F.linear(*dense[1:])).square().sum().backward()
    for a, e in zip(args, dense):
        torch.testing.assert_close(a.grad, e.grad)


def test_flops_are_the_dense_upper_bound():
    from torch.utils.flop_counter import FlopCounterMode
    g, x, w = torch.randn(6, 32), torch.randn(6, 8), torch.randn(32, 8)
    with FlopCounterMode(display=False) as counter:
        torch.ops.sparsify.sparse_up(g, x, w, None, 16)
    assert counter.get_total_flops() == 2 * 6 * 32 * 8 + 6 * 32
