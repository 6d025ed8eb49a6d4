"""sparsify::sparse_down (ops/sparse_down.py): the activation-sparse down projection equals F.linear, its fake
kernel, autograd and schema pass opcheck, and its reference's gradient passes float64 gradcheck."""
import pytest
import torch
import torch.nn.functional as F

import sparsify  # noqa: F401  (registers the ops)
from sparsify.codegen.sparse_down import active_neurons
from sparsify.ops.sparse_down import sparse_down_reference


def sparse_activations(t, f, density, dtype=torch.float32, seed=0, structured=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(t, f, generator=g)
    if structured:  # DEFT-like: whole neurons off for every token
        h[:, torch.rand(f, generator=g) > density] = 0
    else:
        h[torch.rand(t, f, generator=g) > density] = 0
    return h.to(dtype)


@pytest.mark.parametrize("t, f, n, block_t", [(37, 50, 24, 16), (5, 64, 8, 16), (64, 96, 40, 32), (0, 16, 8, 16)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_equals_dense_linear(t, f, n, block_t, density):
    h = sparse_activations(t, f, density, structured=density == 0.1)
    w, b = torch.randn(n, f), torch.randn(n)
    for bias in (b, None):
        got = torch.ops.sparsify.sparse_down(h, w, bias, block_t)
        torch.testing.assert_close(got, F.linear(h, w, bias), atol=1e-5, rtol=1e-5)


def test_batched_input_and_strided_weight():
    h = sparse_activations(2 * 9, 32, 0.3).reshape(2, 9, 32)
    w = torch.randn(32, 20).t()  # a transposed view (GPT-2's Conv1D weight)
    torch.testing.assert_close(torch.ops.sparsify.sparse_down(h, w, None, 16), F.linear(h, w), atol=1e-5, rtol=1e-5)


def test_active_neurons_lists_the_union_per_tile():
    h = torch.zeros(20, 6)
    h[0, 4] = 1.0
    h[3, 1] = 2.0   # tile 0 (rows 0..15): neurons 1 and 4
    h[17, 5] = 1.0  # tile 1 (rows 16..19): neuron 5
    neurons, counts = active_neurons(h, 16)
    assert counts.tolist() == [2, 1]
    assert neurons[0, :2].tolist() == [1, 4] and neurons[1, :1].tolist() == [5]
    assert sorted(neurons[0].tolist()) == list(range(6))  # a permutation: the inactive ones follow


def test_opcheck_and_gradcheck():
    h = sparse_activations(19, 24, 0.4, dtype=torch.float64)
    w = torch.randn(12, 24, dtype=torch.float64)
    b = torch.randn(12, dtype=torch.float64)
    torch.library.opcheck(torch.ops.sparsify.sparse_down.default, (h, w, b, 16))
    hg, wg, bg = (t.clone().requires_grad_(True) for t in (h, w, b))
    torch.autograd.gradcheck(lambda *a: torch.ops.sparsify.sparse_down(*a, 16), (hg, wg, bg))
    # the gradient is the dense projection's
    torch.ops.sparsify.sparse_down(hg, wg, bg, 16).square().sum().backward()
    h2, w2, b2 = (t.clone().requires_grad_(True) for t in (h, w, b))
    F.linear(h2, w2, b2).square().sum().backward()
    for a, e in ((hg, h2), (wg, w2), (bg, b2)):
        torch.testing.assert_close(a.grad, e.grad)


def test_fake_kernel_gives_the_real_shape_and_strides():
    from torch._subclasses.fake_tensor import FakeTensorMode
    h, w = sparse_activations(10, 16, 0.5).reshape(2, 5, 16), torch.randn(8, 16)
    real = torch.ops.sparsify.sparse_down(h, w, None, 16)
    with FakeTensorMode() as mode:
        fake = torch.ops.sparsify.sparse_down(mode.from_tensor(h), mode.from_tensor(w), None, 16)
    assert fake.shape == real.shape and fake.stride() == real.stride()


@pytest.mark.parametrize("bad, match", [
    (dict(block_t=24), "block_t must be a power of two"),
    (dict(w=torch.randn(8, 15)), "expects h \\[T, F\\] and w \\[N, F\\]"),
    (dict(b=torch.randn(7)), "b must be \\[N\\]"),
])
def test_bad_arguments_are_named(bad, match):
    args = dict(h=torch.randn(4, 16), w=torch.randn(8, 16), b=None, block_t=16)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        sparse_down_reference(**args)


def test_the_h200_roofline_switch_grows_with_the_layer_and_the_row_layout():
    """DEFT's auto on CUDA takes the modelled switch: small layers are launch-bound (never sparse), large ones pay
    up to a union density near 1/2 (d_ff 8192) or more; a row-major W's column gathers pay only near 1/16."""
    from sparsify.ops.sparse_down import modelled_switch, roofline_ms
    assert modelled_switch(16, 384, 1536, 16) == 0.0
    small, large, huge = (modelled_switch(16, d, f, 16) for d, f in ((768, 3072), (2048, 8192), (4096, 14336)))
    assert small <= large < huge and 0.3 < large < 0.7
    assert modelled_switch(16, 2048, 8192, 16, layout="row_major") <= 1 / 16
    dense, sparse = roofline_ms(1, 4096, 14336, 0.0, 16)
    assert sparse < dense  # nothing active: two launches and one pass over h
