"""Tests for the routed FFN (sparsify/ops/routed.py) and its grouped GEMM kernels (sparsify/codegen/grouped_gemm.py).

What is checked:
  * torch.library.opcheck on sparsify::routed_mlp and sparsify::routed_mlp_backward;
  * float64 gradcheck through the registered autograd (router, LoRA, biases, neuron order, empty blocks);
  * equality with the dense-masked reference routed_reference, forward and every gradient, fp32 1e-5, over
    hypothesis-drawn shapes and options (T = 0..40, blocks 2 / 4, top_k, gated, bias, LoRA, activation,
    gate, neuron order);
  * gate "none" with top_k == blocks equals sparsify::mlp (forward, gradients, and the same dropout draw);
  * routing: top_k by p, ties to the lower block id; T = 0, T < blocks, empty blocks, leading dims;
  * dropout replayed in backward; only x, the parameters, block_ids and the seed saved for backward;
  * FLOP formulas under FlopCounterMode (forward = top_k / blocks of the dense mlp + the router; backward
    exactly as documented);
  * cluster_neurons (balanced permutation, planted clusters recovered, deterministic) and init_router;
  * Triton grouped up / down / wgrad kernels against the torch per-block matmuls in the interpreter (fp32
    1e-4, fp16; odd sizes, empty blocks, T < blocks, neuron permutation, strided weights), the whole Triton
    forward / backward against the reference, and the CUDA registrations' dispatch logic on CPU tensors;
  * on a GPU (marked gpu): fp16 / bf16 / fp32 against an fp32 CPU reference, Triton used, no host sync.
"""
import importlib.util
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import sparsify.ops  # noqa: F401  (registers sparsify::mlp)
import sparsify.ops.routed as routed
import sparsify.ops.routed_grouping as routed_grouping
from sparsify.ops.mlp import mlp_reference
from sparsify.ops.routed import routed_flops, routed_reference
from sparsify.ops.routed_grouping import TORCH_GROUPED, Grouping, route
from sparsify.ops.routed_init import cluster_neurons, fit_router, init_router

routed_op = torch.ops.sparsify.routed_mlp
routed_bwd = torch.ops.sparsify.routed_mlp_backward
mlp_op = torch.ops.sparsify.mlp
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
HYP = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ZERO_SEED = torch.zeros((), dtype=torch.int64)
ACTS = ("gelu", "gelu_tanh", "relu", "silu", "quick_gelu", "relu2")


def _gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _randn(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def make_routed(g, lead=(2, 5), d=8, d_ff=12, d_out=6, blocks=4, top_k=2, gated=False, bias=False, lora_rank=0,
                perm=False, gate="sigmoid2p", activation="gelu", dropout_p=0.0, dtype=torch.float32,
                requires_grad=True, scales=(0.5, 2.0, 1.5)):
    """The 22 arguments of sparsify::routed_mlp, random (weights scaled so activations stay O(1))."""
    def r(*shape, scale=1.0):
        return _randn(g, *shape, dtype=dtype, scale=scale).requires_grad_(requires_grad)

    x = r(*lead, d)
    up_w, down_w = r(d_ff, d, scale=d ** -0.5), r(d_out, d_ff, scale=d_ff ** -0.5)
    gate_w = r(d_ff, d, scale=d ** -0.5) if gated else None
    up_b = r(d_ff, scale=0.5) if bias else None
    gate_b = r(d_ff, scale=0.5) if bias and gated else None
    down_b = r(d_out, scale=0.5) if bias else None
    lo = [None] * 6
    if lora_rank:
        lo = [r(lora_rank, d, scale=0.5), r(d_ff, lora_rank, scale=0.5),
              r(lora_rank, d, scale=0.5) if gated else None, r(d_ff, lora_rank, scale=0.5) if gated else None,
              r(lora_rank, d_ff, scale=0.5), r(d_out, lora_rank, scale=0.5)]
    router_w, router_b = r(blocks, d), r(blocks, scale=0.5)
    order = torch.randperm(d_ff, generator=g) if perm else None
    return [x, up_w, up_b, gate_w, gate_b, down_w, down_b, *lo, list(scales), router_w, router_b, order,
            blocks, top_k, gate, activation, dropout_p]


def _leaves(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def _tensors16(args):
    return list(args[:13]) + list(args[14:17])


def _ref(args, seed=ZERO_SEED):
    return routed_reference(*args, seed)


def _grads(out, leaves, grad_out):
    return torch.autograd.grad(out, leaves, grad_out, allow_unused=True)


def _ok(result):
    return bool(result) and all(v == "SUCCESS" for v in result.values())


# ---------------------------------------------------------------------------------------------
# 1. opcheck
# ---------------------------------------------------------------------------------------------

OPCHECK_CASES = {
    "plain_nobias": dict(gated=False, bias=False, activation="gelu"),
    "plain_bias_perm": dict(gated=False, bias=True, perm=True, activation="relu", top_k=3),
    "gated_lora": dict(gated=True, bias=True, lora_rank=2, activation="silu", perm=True),
    "gate_none": dict(gated=True, bias=False, gate="none", activation="gelu_tanh", top_k=1),
    "t_below_blocks": dict(lead=(3,), blocks=4, top_k=1, lora_rank=2),
}


@pytest.mark.parametrize("save_pre", [False, True], ids=["recompute", "save_pre"])
@pytest.mark.parametrize("case", list(OPCHECK_CASES), ids=list(OPCHECK_CASES))
def test_opcheck_routed_mlp(case, save_pre):
    args = make_routed(_gen(1), **OPCHECK_CASES[case])
    assert _ok(torch.library.opcheck(routed_op.default, (*args, save_pre)))


def test_opcheck_non_contiguous_inputs():
    """HF layouts: x a transposed view, GPT-2 Conv1D weights as transposed views."""
    g = _gen(2)
    args = make_routed(g, lead=(3, 4), d=8, d_ff=12, d_out=8)
    args[0] = _randn(g, 4, 3, 8).transpose(0, 1).requires_grad_()
    args[1] = _randn(g, 8, 12, scale=0.3).t().requires_grad_()
    args[5] = _randn(g, 12, 8, scale=0.3).t().requires_grad_()
    assert not args[0].is_contiguous()
    assert _ok(torch.library.opcheck(routed_op.default, tuple(args)))


def test_opcheck_routed_backward():
    g = _gen(3)
    args = make_routed(g, gated=True, bias=True, lora_rank=2, perm=True, requires_grad=False)
    out, ids, seed, pre_up, pre_gate = routed_op(*args, True)
    tensors = _tensors16(args)
    for needs in ([t is not None for t in tensors], [False, True, False, False, False, True] + [False] * 10,
                  [True] + [False] * 12 + [True, True, False]):
        for pre in ([], [pre_up, pre_gate]):  # recomputed / saved by the forward
            assert _ok(torch.library.opcheck(routed_bwd.default, (torch.randn_like(out), tensors, ids, seed,
                                                                   args[13], *args[17:22], needs, pre)))


# ---------------------------------------------------------------------------------------------
# 2. gradcheck (float64, through the registered autograd)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [
    dict(gated=False, bias=True, perm=True, activation="gelu", top_k=2),
    dict(gated=True, bias=True, lora_rank=2, perm=True, activation="silu", top_k=3),
    dict(gated=False, lora_rank=2, activation="gelu_tanh", top_k=1, gate="none"),
    dict(gated=True, bias=False, activation="gelu", blocks=2, top_k=1, lead=(1,)),  # T < blocks
], ids=["plain_bias_perm", "gated_lora_perm", "gate_none_lora", "t1"])
@pytest.mark.parametrize("save_pre", [False, True], ids=["recompute", "save_pre"])
def test_gradcheck_routed(opts, save_pre):
    args = make_routed(_gen(4), lead=opts.pop("lead", (5,)), d=4, d_ff=8, d_out=3, dtype=torch.float64, **opts)
    idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def fn(*ts):
        full = list(args)
        for i, t in zip(idx, ts):
            full[i] = t
        return routed_op(*full, save_pre)[0]

    assert torch.autograd.gradcheck(fn, tuple(args[i] for i in idx))


def test_double_backward_is_a_clear_error():
    args = make_routed(_gen(5), dtype=torch.float64)
    out = routed_op(*args)[0]
    (gx,) = torch.autograd.grad(out.pow(2).sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match="routed_mlp_backward"):
        torch.autograd.grad(gx.sum(), args[0])


# ---------------------------------------------------------------------------------------------
# 3. equality with the dense-masked reference
# ---------------------------------------------------------------------------------------------

def _check_against_reference(args, tol=1e-5, grad_tol=2e-5, grad_seed=0, save_pre=False):
    """Forward (tol) and every gradient (grad_tol) against routed_reference, fp32; absolute tolerances are
    scaled by the reference's magnitude when it is above 1. The grouped path (one GEMM per block) and the
    dense-masked one (GEMMs over all F) round differently, not bitwise alike; gradient elements that come out
    of a cancellation (g * u + s * l near 0) amplify that: over 100 gradient draws of a 1-token case both fp32
    paths stayed within 1.3e-5 of an fp64 oracle (the op) and 4e-6 (the reference), hence 2e-5."""
    out, ids, seed, *_ = routed_op(*args, save_pre)
    ref = _ref(args, seed)
    _close(out, ref, tol)
    t = math.prod(args[0].shape[:-1])
    assert ids.dtype == torch.int32 and tuple(ids.shape) == (t, args[18])
    leaves = _leaves(args)
    if not leaves:
        return
    grad_out = _randn(_gen(grad_seed), *out.shape, dtype=out.dtype)
    for a, b, leaf in zip(_grads(out, leaves, grad_out), _grads(ref, leaves, grad_out), leaves):
        _close(torch.zeros_like(leaf) if a is None else a, torch.zeros_like(leaf) if b is None else b, grad_tol)


def _close(a, b, tol):
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    torch.testing.assert_close(a, b, atol=tol * scale, rtol=1e-5)


@settings(max_examples=int(os.environ.get("ROUTED_EXAMPLES", 40)), **HYP)
@given(
    t=st.integers(0, 40), d=st.integers(8, 32), fb=st.integers(1, 6), blocks=st.sampled_from([2, 4]),
    k_frac=st.floats(0.0, 1.0), gated=st.booleans(), bias=st.booleans(), lora=st.sampled_from([0, 0, 3]),
    activation=st.sampled_from(ACTS), gate=st.sampled_from(["sigmoid2p", "sigmoid2p", "none"]),
    perm=st.booleans(), dropout_p=st.sampled_from([0.0, 0.0, 0.0, 0.3]), seed=st.integers(0, 2**16),
    save_pre=st.booleans(),
)
def test_matches_reference(t, d, fb, blocks, k_frac, gated, bias, lora, activation, gate, perm, dropout_p, seed,
                           save_pre):
    top_k = 1 + min(blocks - 1, int(k_frac * blocks))
    torch.manual_seed(seed)  # the op's dropout seed comes from the global RNG
    args = make_routed(_gen(seed), lead=(t,), d=d, d_ff=fb * blocks, d_out=7, blocks=blocks, top_k=top_k,
                       gated=gated, bias=bias, lora_rank=lora, perm=perm, gate=gate, activation=activation,
                       dropout_p=dropout_p)
    _check_against_reference(args, save_pre=save_pre)


@pytest.mark.parametrize("save_pre", [False, True], ids=["recompute", "save_pre"])
@pytest.mark.parametrize("lead", [(0,), (2, 0, 3), (1,), (3,), (2, 3, 4)])
def test_shapes_and_edge_token_counts(lead, save_pre):
    args = make_routed(_gen(6), lead=lead, blocks=4, top_k=2, gated=True, bias=True, lora_rank=2, perm=True)
    _check_against_reference(args, save_pre=save_pre)
    out = routed_op(*args)[0]
    assert out.shape == (*lead, 6)


def test_empty_blocks():
    """A router that sends every token to blocks 1 and 3: blocks 0 and 2 get no token, and their weight
    gradients are exactly zero."""
    args = make_routed(_gen(7), lead=(9,), blocks=4, top_k=2, bias=True, lora_rank=2, perm=True)
    args[15] = torch.tensor([-5.0, 5.0, -5.0, 4.0], requires_grad=True)
    args[14] = (args[14].detach() * 1e-3).requires_grad_()
    out, ids, _, *_ = routed_op(*args)
    assert set(ids.flatten().tolist()) == {1, 3}
    _check_against_reference(args)
    grad_up = torch.autograd.grad(out.sum(), args[1])[0]
    for blk in (0, 2):
        assert torch.count_nonzero(grad_up[args[16][blk * 3:(blk + 1) * 3]]) == 0


@pytest.mark.parametrize("gated,bias,lora_rank,activation", [(False, True, 0, "gelu"), (True, True, 2, "silu"),
                                                             (False, False, 2, "relu"), (True, False, 0, "gelu_tanh")])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gate_none_all_blocks_equals_dense_mlp(gated, bias, lora_rank, activation, dropout_p):
    args = make_routed(_gen(8), lead=(3, 5), blocks=4, top_k=4, gate="none", gated=gated, bias=bias,
                       lora_rank=lora_rank, activation=activation, dropout_p=dropout_p)
    mlp_args = (*args[:14], activation, dropout_p)
    torch.manual_seed(123)
    out, ids, seed, *_ = routed_op(*args)
    torch.manual_seed(123)
    dense, dense_seed = mlp_op(*mlp_args)
    assert torch.equal(seed, dense_seed)
    _close(out, dense, 1e-5)
    torch.testing.assert_close(_ref(args, seed), mlp_reference(*mlp_args[:14], activation, dropout_p, seed),
                               atol=1e-6, rtol=1e-6)
    leaves = _leaves(args[:13])
    grad_out = _randn(_gen(80), *out.shape)
    for a, b in zip(_grads(out, leaves, grad_out), _grads(dense, leaves, grad_out)):
        _close(a, b, 2e-5)


def test_partial_requires_grad_frozen_base():
    """LoRA fine-tuning: only the LoRA factors and the router train; the rest get no gradient."""
    g = _gen(9)
    args = make_routed(g, gated=True, bias=True, lora_rank=2, perm=True, requires_grad=False)
    for i in (7, 8, 9, 10, 11, 12, 14, 15):
        args[i].requires_grad_()
    _check_against_reference(args)


# ---------------------------------------------------------------------------------------------
# 4. routing
# ---------------------------------------------------------------------------------------------

def test_route_top_k_and_ties():
    g = _gen(10)
    x = _randn(g, 50, 8)
    rw, rb = _randn(g, 4, 8), _randn(g, 4)
    p, ids = route(x, rw, rb, 2)
    torch.testing.assert_close(p, torch.sigmoid(x @ rw.t() + rb))
    assert ids.dtype == torch.int32
    for row, sel in zip(p, ids.long()):
        best = sorted(range(4), key=lambda i: (-row[i].item(), i))[:2]
        assert sel.tolist() == best
    # ties -> lower block id
    _, ids = route(torch.zeros(3, 8), torch.zeros(4, 8), torch.tensor([0.0, 1.0, 1.0, 1.0]), 2)
    assert ids.tolist() == [[1, 2]] * 3
    _, ids = route(torch.zeros(2, 8), torch.zeros(4, 8), torch.zeros(4), 3)
    assert ids.tolist() == [[0, 1, 2]] * 2


def test_grouping_is_sorted_by_block_with_device_offsets():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]], dtype=torch.int32)
    grp = Grouping(ids, 4, None)
    assert grp.offsets.tolist() == [0, 2, 3, 6, 6]      # block 3 empty
    assert grp.blk.tolist() == [0, 0, 1, 2, 2, 2]
    assert grp.tok.tolist() == [0, 2, 1, 0, 1, 2]       # stable: tokens in order inside a block
    assert torch.equal(grp.unsort(grp.blk), ids.long())


# ---------------------------------------------------------------------------------------------
# 5. dropout and memory
# ---------------------------------------------------------------------------------------------

def test_dropout_replayed_in_backward():
    args = make_routed(_gen(11), lead=(6, 5), gated=True, bias=True, lora_rank=2, perm=True, dropout_p=0.4)
    out, _, seed, *_ = routed_op(*args)
    assert seed.device.type == "cpu"
    ref = _ref(args, seed)
    _close(out, ref, 1e-5)
    leaves = _leaves(args)
    grad_out = _randn(_gen(81), *out.shape)
    for a, b in zip(_grads(out, leaves, grad_out), _grads(ref, leaves, grad_out)):
        _close(a, b, 2e-5)
    out2 = routed_op(*args)[0]
    assert not torch.allclose(out, out2)  # a fresh draw per call


def test_dropout_rate_and_p_one():
    keep = routed_grouping._keep_mask(64, 64, 0.25, torch.tensor(5), "cpu")
    assert abs(keep.float().mean().item() - 0.75) < 0.05
    args = make_routed(_gen(12), lead=(64,), requires_grad=False, dropout_p=1.0)
    args[6] = None  # no down bias: everything dropped gives exact zeros (no NaN from 0 / 0)
    torch.testing.assert_close(routed_op(*args)[0], torch.zeros(64, 6))


@pytest.mark.parametrize("save_pre", [False, True], ids=["recompute", "save_pre"])
def test_saved_for_backward(save_pre):
    """recompute: nothing of size T * F is kept, only x, the parameters, block_ids and the seed; save_pre: also
    the kept blocks' up and gate outputs, T * top_k * fb each (top_k / blocks of the dense pre-activation)."""
    args = make_routed(_gen(13), lead=(16,), gated=True, bias=True, lora_rank=2, perm=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = routed_op(*args, save_pre)[0]
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    extra = [t for t in saved if not any(t is a for a in inputs) and t.numel()]
    # block_ids [16, 2] int32 and the int64 seed (+ 2 x [32, 3] pre-activations)
    want = [("torch.int32", 32), ("torch.int64", 1)] + [("torch.float32", 32 * 3)] * 2 * save_pre
    assert sorted((str(t.dtype), t.numel()) for t in extra) == sorted(want), extra
    assert out.shape == (16, 6)


# ---------------------------------------------------------------------------------------------
# 6. FLOPs
# ---------------------------------------------------------------------------------------------

def _count(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("gated,bias,blocks,top_k", [(False, False, 4, 2), (True, True, 4, 1), (False, True, 2, 2)])
def test_flops_are_top_k_over_blocks_of_dense_plus_router(gated, bias, blocks, top_k):
    t, d, d_ff, d_out = 10, 8, 16, 6
    args = make_routed(_gen(14), lead=(2, 5), d=d, d_ff=d_ff, d_out=d_out, blocks=blocks, top_k=top_k,
                       gated=gated, bias=bias)
    fb, a = d_ff // blocks, t * top_k
    expected = 2 * a * fb * d * (2 if gated else 1) + 2 * a * fb * d_out + 2 * t * blocks * d
    fwd = _count(lambda: routed_op(*args))
    assert fwd == expected
    dense = _count(lambda: mlp_op(*args[:14], "gelu", 0.0))
    assert fwd == dense * top_k // blocks + 2 * t * blocks * d
    # backward with every gradient: recompute (1x) + input and weight grads (2x), less the down projection's
    # forward, which the backward does not recompute
    total = _count(lambda: routed_op(*args)[0].sum().backward())
    assert total == fwd + 3 * fwd - 2 * a * fb * d_out
    # saving the up (and gate) outputs drops their recompute GEMMs, and nothing else
    saved = _count(lambda: routed_op(*args, True)[0].sum().backward())
    assert saved == total - 2 * a * fb * d * (2 if gated else 1)


def test_flops_with_lora_and_frozen_base():
    t, d, d_ff, d_out, r, blocks, top_k = 6, 8, 12, 5, 2, 4, 2
    args = make_routed(_gen(15), lead=(t,), d=d, d_ff=d_ff, d_out=d_out, blocks=blocks, top_k=top_k, gated=True,
                       lora_rank=r, requires_grad=False)
    fb, a = d_ff // blocks, t * top_k
    expected = 2 * a * fb * d * 2 + 2 * a * fb * d_out + 2 * t * blocks * d
    expected += 2 * (2 * t * r * d + 2 * a * fb * r) + 2 * a * fb * r + 2 * t * r * d_out
    assert _count(lambda: routed_op(*args)) == expected
    assert routed_flops(*[getattr(v, "shape", v) for v in args]) == expected
    for i in (7, 8, 9, 10, 11, 12, 14):  # LoRA + router_w train, base frozen, x needs no grad
        args[i].requires_grad_()
    total = _count(lambda: routed_op(*args)[0].sum().backward())
    bwd = total - expected
    want = 2 * t * blocks * d + 2 * (2 * a * fb * d + 2 * t * r * d + 2 * a * fb * r)   # recompute
    want += 2 * a * fb * d_out                                                             # v
    want += 2 * t * d_out * r + 2 * a * fb * r + (2 * a * fb * r + 2 * t * d_out * r) + 2 * a * fb * r  # down LoRA
    want += 2 * (2 * a * fb * r + 2 * a * fb * r + 2 * t * r * d)                          # up / gate LoRA
    want += 2 * t * blocks * d                                                             # dW_router
    assert bwd == want
    assert bwd < 2.2 * expected


# ---------------------------------------------------------------------------------------------
# 7. clustering and router initialisation
# ---------------------------------------------------------------------------------------------

def test_cluster_neurons_balanced_permutation():
    w = _randn(_gen(16), 48, 10)
    order = cluster_neurons(w, 4, iterations=5, seed=3)
    assert order.dtype == torch.int64 and sorted(order.tolist()) == list(range(48))
    assert torch.equal(order, cluster_neurons(w, 4, iterations=5, seed=3))  # deterministic
    for blk in order.view(4, 12):
        assert blk.tolist() == sorted(blk.tolist())
    with pytest.raises(ValueError):
        cluster_neurons(w, 5)


def test_cluster_neurons_recovers_planted_clusters():
    g = _gen(17)
    centers = F.normalize(_randn(g, 4, 16), dim=1) * 3
    truth = torch.arange(64) % 4
    w = centers[truth] + 0.3 * _randn(g, 64, 16)
    shuffle = torch.randperm(64, generator=g)
    w, truth = w[shuffle], truth[shuffle]
    order = cluster_neurons(w, 4)
    for blk in order.view(4, 16):
        assert truth[blk].unique().numel() == 1


def test_cluster_order_runs_in_the_op():
    args = make_routed(_gen(18), lead=(7,), d_ff=16, blocks=4, top_k=2, gated=True, bias=True)
    args[16] = cluster_neurons(args[3].detach(), 4)
    _check_against_reference(args)


def test_init_router_prefers_the_most_excited_blocks():
    g = _gen(19)
    up_w, up_b = _randn(g, 16, 8), _randn(g, 16)
    order = torch.randperm(16, generator=g)
    rw, rb = init_router(up_w, up_b, order, 4)
    assert rw.shape == (4, 8) and rb.shape == (4,)
    x = _randn(g, 20, 8)
    pre = (x @ up_w.t() + up_b)[:, order].view(20, 4, 4).mean(-1)
    logits = x @ rw.t() + rb
    torch.testing.assert_close(logits, pre - pre.mean(-1, keepdim=True), atol=1e-5, rtol=1e-5)
    assert torch.equal(logits.argsort(-1), pre.argsort(-1))
    rw0, rb0 = init_router(up_w, None, None, 4, scale=0.5)
    assert torch.count_nonzero(rb0) == 0
    torch.testing.assert_close(rw0.sum(0), torch.zeros(8), atol=1e-6, rtol=0)


def test_fit_router_ranks_blocks_by_their_contribution():
    """Planted: block b's activations scale with exp(x . u_b), so its share of the output is log-linear in x and
    a fitted router must rank blocks by contribution on new tokens too; logits are scaled to std 0.05."""
    g = _gen(21)
    d, d_ff, blocks, tokens = 8, 16, 4, 400
    u = _randn(g, blocks, d)
    order = torch.randperm(d_ff, generator=g)
    down_w = _randn(g, 6, d_ff)

    def sample(n):
        x = _randn(g, n, d)
        base = _randn(g, n, d_ff).abs() + 0.5
        scale = (x @ u.t()).exp().repeat_interleave(d_ff // blocks, dim=1)   # block-major in `order`
        hidden = torch.empty(n, d_ff)
        hidden[:, order] = base * scale
        contrib = torch.einsum("tbf,obf->tbo", hidden[:, order].view(n, blocks, -1),
                               down_w[:, order].view(6, blocks, -1)).norm(dim=-1)
        return x, hidden, contrib

    x, hidden, _ = sample(tokens)
    rw, rb = fit_router(x, hidden, down_w, order, blocks)
    assert rw.shape == (blocks, d) and rb.shape == (blocks,)
    assert abs((x @ rw.t() + rb).std().item() - 0.05) < 1e-4
    x_new, _, contrib_new = sample(200)
    picked = (x_new @ rw.t() + rb).topk(2, dim=-1).indices.sort(-1).values
    best = contrib_new.topk(2, dim=-1).indices.sort(-1).values
    assert (picked == best).all(-1).double().mean() > 0.9
    with pytest.raises(ValueError, match="multiple"):
        fit_router(x, hidden, down_w, None, 3)


# ---------------------------------------------------------------------------------------------
# 8. errors and compile
# ---------------------------------------------------------------------------------------------

def test_bad_inputs_raise():
    base = make_routed(_gen(20), requires_grad=False)
    for i, v, pat in [(20, "tanh", "activation"), (19, "softmax", "gate"), (17, 5, "multiple"),
                      (18, 5, "top_k"), (18, 0, "top_k"), (21, 1.5, "dropout")]:
        args = list(base)
        args[i] = v
        with pytest.raises(ValueError, match="sparsify.*" + pat):
            routed_op(*args)
    args = list(base)
    args[14] = torch.randn(3, 8)
    with pytest.raises(ValueError, match="router_w"):
        routed_op(*args)
    args = list(base)
    args[16] = torch.arange(5)
    with pytest.raises(ValueError, match="neuron_order"):
        routed_op(*args)


def test_torch_compile_aot_eager():
    args = make_routed(_gen(21), gated=True, bias=True, lora_rank=2, perm=True)

    def f(*a):
        return routed_op(*a)[0].square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    leaves = _leaves(args)
    got = torch.autograd.grad(compiled(*args), leaves)
    want = torch.autograd.grad(f(*args), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# 9. Triton grouped kernels (interpreter on CPU tensors)
# ---------------------------------------------------------------------------------------------

# kernel_cache_dir and interpreter: tests/conftest.py


def _grouping(g, t, blocks, top_k, empty=()):
    """A random routing with the blocks in `empty` never chosen."""
    scores = torch.rand(t, blocks, generator=g)
    for b in empty:
        scores[:, b] = -1.0
    ids = scores.argsort(dim=1, descending=True)[:, :top_k].to(torch.int32)
    return Grouping(ids, blocks, None)


UP_CASES = {
    # t, d, fb, blocks, top_k, empty, options
    "plain_odd": (37, 19, 5, 4, 2, (), dict(bias=True, activation="gelu")),
    "gated_lora_perm": (23, 24, 7, 4, 3, (), dict(gated=True, bias=True, lora=True, activation="silu", perm=True)),
    "t_below_blocks": (2, 16, 6, 4, 1, (), dict(activation="gelu_tanh", perm=True)),
    "empty_blocks": (13, 17, 9, 4, 2, (0, 2), dict(gated=True, activation="relu", lora=True)),
    "raw_strided": (11, 18, 6, 2, 1, (), dict(strided=True)),
}


def _up_inputs(g, t, d, fb, blocks, top_k, empty, opts, dtype):
    grp = _grouping(g, t, blocks, top_k, empty)
    d_ff = fb * blocks
    x = _randn(g, t, d, dtype=dtype)
    w = _randn(g, d_ff, d, dtype=dtype, scale=d ** -0.5)
    if opts.get("strided"):
        w = _randn(g, d, d_ff, dtype=dtype, scale=d ** -0.5).t()
    perm = torch.randperm(d_ff, generator=g) if opts.get("perm") else None
    kw = dict(perm=perm, activation=opts.get("activation"))
    if opts.get("bias"):
        kw["bias"] = _randn(g, d_ff, dtype=dtype, scale=0.5)
    if not opts.get("strided"):
        kw["row_scale"] = 2 * torch.rand(grp.assignments, generator=g)
    if opts.get("lora"):
        kw["lora"] = (_randn(g, t, 3, dtype=dtype), _randn(g, d_ff, 3, dtype=dtype, scale=0.5), 0.7)
    if opts.get("gated"):
        lg = None
        if opts.get("lora"):
            lg = (_randn(g, t, 2, dtype=dtype), _randn(g, d_ff, 2, dtype=dtype, scale=0.5), 1.3)
        kw["gate"] = (_randn(g, d_ff, d, dtype=dtype, scale=d ** -0.5),
                      _randn(g, d_ff, dtype=dtype, scale=0.5) if opts.get("bias") else None, lg)
    return grp, x, w, kw


def _as_fp32(kw):
    def cvt(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.float()
        if isinstance(v, tuple):
            return tuple(cvt(u) for u in v)
        return v
    return {k: cvt(v) for k, v in kw.items()}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(UP_CASES), ids=list(UP_CASES))
def test_grouped_up_matches_torch(interpreter, case, dtype):
    from sparsify.codegen.grouped_gemm import grouped_up

    t, d, fb, blocks, top_k, empty, opts = UP_CASES[case]
    grp, x, w, kw = _up_inputs(_gen(30), t, d, fb, blocks, top_k, empty, opts, dtype)
    got = grouped_up(x, w, grp.tok, grp.offsets, fb, **kw)
    want = TORCH_GROUPED.up(x.float(), w.float(), grp.tok, grp.offsets, fb, **_as_fp32(kw))
    assert got.dtype == dtype and got.shape == (grp.assignments, fb)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


DOWN_CASES = {
    "odd": (37, 5, 4, 2, 19, (), False, True),
    "perm_noscale": (23, 7, 4, 3, 24, (), True, False),
    "t_below_blocks": (3, 6, 4, 1, 16, (), True, True),
    "empty_blocks": (13, 9, 4, 2, 17, (1, 3), False, True),
}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(DOWN_CASES), ids=list(DOWN_CASES))
def test_grouped_down_and_wgrad_match_torch(interpreter, case, dtype):
    from sparsify.codegen.grouped_gemm import grouped_down, grouped_wgrad

    t, fb, blocks, top_k, m, empty, permuted, scaled = DOWN_CASES[case]
    g = _gen(31)
    grp = _grouping(g, t, blocks, top_k, empty)
    d_ff = fb * blocks
    h = _randn(g, grp.assignments, fb, dtype=dtype)
    w = _randn(g, d_ff, m, dtype=dtype, scale=fb ** -0.5).t()          # a transposed view [m, F]
    perm = torch.randperm(d_ff, generator=g) if permuted else None
    s = 2 * torch.rand(grp.assignments, generator=g) if scaled else None
    init = _randn(g, t, m)                                             # accumulates onto what is there
    got = grouped_down(h, w, grp.tok, grp.offsets, init.clone(), perm=perm, row_scale=s)
    want = TORCH_GROUPED.down(h.float(), w.float(), grp.tok, grp.offsets, init.clone(), perm=perm, row_scale=s)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)

    r = _randn(g, t, m, dtype=dtype)
    out = torch.full((m, d_ff), float("nan"))                           # every row must be written
    grouped_wgrad(h, r, grp.tok, grp.offsets, out.t(), perm=perm)
    want = TORCH_GROUPED.wgrad(h.float(), r.float(), grp.tok, grp.offsets, torch.empty(d_ff, m), perm=perm)
    torch.testing.assert_close(out.t(), want, atol=tol, rtol=tol)
    for b in empty:
        n = slice(b * fb, (b + 1) * fb) if perm is None else perm[b * fb:(b + 1) * fb]
        assert torch.count_nonzero(out.t()[n]) == 0


ACT_BWD_CASES = {
    # t, fb, blocks, top_k, m, empty, gated, permuted, scaled (gate sigmoid2p), activation, LoRA on (up, gate, down)
    "plain_gelu_perm": (37, 5, 4, 2, 19, (), False, True, True, "gelu", ()),
    "gated_silu": (23, 7, 4, 3, 24, (), True, False, True, "silu", ()),
    "gate_none_tanh": (13, 9, 4, 2, 17, (1, 3), False, False, False, "gelu_tanh", ()),
    "gated_relu2_perm_t_below": (3, 6, 4, 1, 16, (), True, True, True, "relu2", ()),
    "relu_empty": (11, 6, 2, 1, 18, (0,), False, False, True, "relu", ()),
    "quick_gelu_gated": (9, 8, 2, 2, 8, (), True, False, True, "quick_gelu", ()),
    "plain_lora_up_down": (21, 5, 4, 2, 12, (), False, True, True, "gelu", ("up", "down")),
    "gated_lora_all": (17, 6, 4, 2, 10, (2,), True, False, True, "silu", ("up", "gate", "down")),
    "gated_lora_gate_only": (8, 4, 2, 1, 9, (), True, True, False, "gelu_tanh", ("gate",)),
}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(ACT_BWD_CASES), ids=list(ACT_BWD_CASES))
def test_grouped_act_backward_matches_torch(interpreter, case, dtype):
    """The backward's fused kernel (v GEMM + activation backward + gate and bias gradient sums, LoRA terms in z
    and dh) against the plain-torch twin (the backward's CPU path, which test_matches_reference ties to
    autograd's gradients)."""
    from sparsify.codegen.grouped_gemm import grouped_act_backward
    from sparsify.ops.routed_grouping import ActGrads as ActGrads

    t, fb, blocks, top_k, m, empty, gated, permuted, scaled, act, lora = ACT_BWD_CASES[case]
    g = _gen(34)
    grp = _grouping(g, t, blocks, top_k, empty)
    d_ff, a = fb * blocks, grp.assignments
    dy = _randn(g, t, m, dtype=dtype)
    w = _randn(g, m, d_ff, dtype=dtype, scale=m ** -0.5).t()           # W_down's transpose, a view [F, m]
    pre = _randn(g, a, fb, dtype=dtype)
    pre_gate = _randn(g, a, fb, dtype=dtype) if gated else None
    lora_z = {name: _randn(g, a, fb, scale=0.5) for name in ("up", "gate") if name in lora}
    dh_extra = _randn(g, a, fb, scale=0.5) if "down" in lora else None
    perm = torch.randperm(d_ff, generator=g) if permuted else None
    s = 2 * torch.rand(a, generator=g) if scaled else None
    kw = dict(perm=perm, row_scale=s, activation=act, want_dg=scaled, want_db=True, lora_z=lora_z or None,
              dh_extra=dh_extra, want_h=dh_extra is not None)
    got = ActGrads(*grouped_act_backward(dy, w, grp.tok, grp.offsets, fb, pre=pre, pre_gate=pre_gate,
                                                  out_dtype=dtype, **kw))
    want = TORCH_GROUPED.act_backward(dy.float(), w.float(), grp.tok, grp.offsets, fb, pre=pre.float(),
                                      pre_gate=None if pre_gate is None else pre_gate.float(),
                                      out_dtype=torch.float32, **kw)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    close = lambda x, y, atol=tol: torch.testing.assert_close(x.float(), y, atol=atol, rtol=tol)  # noqa: E731
    close(got.ghd, want.ghd)
    assert (got.hd is None) == (want.hd is None) == (dh_extra is None)
    if got.hd is not None:
        close(got.hd, want.hd)
    assert set(got.gdz) == set(want.gdz) == ({"up", "gate"} if gated else {"up"})
    assert set(got.dz) == set(want.dz) == set(lora_z)
    for name in got.gdz:
        close(got.gdz[name], want.gdz[name])
        close(got.db[name], want.db[name], tol * 4)
    for name in got.dz:
        close(got.dz[name], want.dz[name])
    if scaled:
        close(got.dg, want.dg, tol * 4)
    else:
        assert got.dg is None and want.dg is None


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_grouped_kernels_apply_dropout_in_their_epilogue(interpreter, dtype, gated):
    """Dropout read in the up kernel's and the act_bwd kernel's epilogues (the mask of sorted_keep: torch's [T, F]
    draw at the sorted rows) against the torch twins; the mask really drops (some entries zero, kept ones scaled)."""
    from sparsify.codegen.grouped_gemm import grouped_act_backward, grouped_up
    from sparsify.ops.routed_grouping import ActGrads, sorted_keep

    g = _gen(36)
    t, d, fb, blocks, m, p = 19, 24, 12, 4, 16, 0.3
    grp = _grouping(g, t, blocks, 2)
    a = grp.assignments
    drop = sorted_keep(grp, fb, p, torch.tensor(1234), "cpu")
    assert 0 < drop[0].float().mean() < 1
    x, w = _randn(g, t, d, dtype=dtype), _randn(g, fb * blocks, d, dtype=dtype, scale=d ** -0.5)
    s = 2 * torch.rand(a, generator=g)
    gate = (_randn(g, fb * blocks, d, dtype=dtype, scale=d ** -0.5), None, None) if gated else None
    kw = dict(row_scale=s, activation="silu", gate=gate, dropout=drop)
    got = grouped_up(x, w, grp.tok, grp.offsets, fb, **kw)
    want = TORCH_GROUPED.up(x.float(), w.float(), grp.tok, grp.offsets, fb, **_as_fp32(kw))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    assert torch.all(got[~drop[0]] == 0)

    dy, wd = _randn(g, t, m, dtype=dtype), _randn(g, m, fb * blocks, dtype=dtype, scale=m ** -0.5).t()
    pre, pre_g = _randn(g, a, fb, dtype=dtype), _randn(g, a, fb, dtype=dtype) if gated else None
    kw = dict(row_scale=s, activation="silu", want_dg=True, want_db=True, dropout=drop)
    got = ActGrads(*grouped_act_backward(dy, wd, grp.tok, grp.offsets, fb, pre=pre, pre_gate=pre_g, out_dtype=dtype,
                                         **kw))
    want = TORCH_GROUPED.act_backward(dy.float(), wd.float(), grp.tok, grp.offsets, fb, pre=pre.float(),
                                      pre_gate=None if pre_g is None else pre_g.float(), out_dtype=torch.float32,
                                      **kw)
    torch.testing.assert_close(got.ghd.float(), want.ghd, atol=tol, rtol=tol)
    torch.testing.assert_close(got.dg, want.dg, atol=4 * tol, rtol=4 * tol)
    for name in got.gdz:
        torch.testing.assert_close(got.gdz[name].float(), want.gdz[name], atol=tol, rtol=tol)
        torch.testing.assert_close(got.db[name], want.db[name], atol=4 * tol, rtol=4 * tol)
    assert torch.all(got.ghd[~drop[0]] == 0) and torch.all(got.gdz["up"][~drop[0]] == 0)


@needs_triton
def test_autotuned_launches_restore_what_they_accumulate(autotune_timer, monkeypatch):
    """The GPU path's triton.autotune, driven under the interpreter by a stand-in timer that really runs every
    config three times (tests/conftest.py autotune_timer): down accumulates onto its output (the bias) and act_bwd
    sums the gate / bias gradients from zero, so without restore_value / reset_to_zero the timing runs would add
    into the result."""
    import sparsify.codegen.grouped_gemm as gg
    from sparsify.ops.routed_grouping import ActGrads

    timed = autotune_timer
    monkeypatch.setattr(gg, "_INTERPRET_TILES", ((16, 16, 16, 1, 1), (32, 32, 16, 1, 1)))
    g = _gen(35)
    t, fb, blocks, top_k, m = 29, 20, 4, 2, 33
    grp = _grouping(g, t, blocks, top_k)
    d_ff, a = fb * blocks, grp.assignments
    h, s = _randn(g, a, fb), 2 * torch.rand(a, generator=g)
    w = _randn(g, m, d_ff, scale=d_ff ** -0.5)
    init = _randn(g, t, m)
    got = gg.grouped_down(h, w, grp.tok, grp.offsets, init.clone(), row_scale=s)
    torch.testing.assert_close(got, TORCH_GROUPED.down(h, w, grp.tok, grp.offsets, init.clone(), row_scale=s),
                               atol=1e-4, rtol=1e-4)
    assert len(timed) == 2  # the tuned path ran: one timing per config

    dy, pre, pre_gate = _randn(g, t, m), _randn(g, a, fb), _randn(g, a, fb)
    kw = dict(pre=pre, pre_gate=pre_gate, row_scale=s, activation="silu", want_dg=True, want_db=True,
              out_dtype=torch.float32)
    got = ActGrads(*gg.grouped_act_backward(dy, w.t(), grp.tok, grp.offsets, fb, **kw))
    want = TORCH_GROUPED.act_backward(dy, w.t(), grp.tok, grp.offsets, fb, **kw)
    torch.testing.assert_close(got.dg, want.dg, atol=4e-4, rtol=4e-4)
    for name in ("up", "gate"):
        torch.testing.assert_close(got.db[name], want.db[name], atol=4e-4, rtol=4e-4)
        torch.testing.assert_close(got.gdz[name], want.gdz[name], atol=1e-4, rtol=1e-4)
    assert len(timed) == 4

    x = _randn(g, t, 24)
    wu = _randn(g, d_ff, 24, scale=24 ** -0.5)
    torch.testing.assert_close(gg.grouped_up(x, wu, grp.tok, grp.offsets, fb, activation="gelu"),
                               TORCH_GROUPED.up(x, wu, grp.tok, grp.offsets, fb, activation="gelu"),
                               atol=1e-4, rtol=1e-4)
    out = torch.full((d_ff, m), float("nan"))
    gg.grouped_wgrad(h, dy, grp.tok, grp.offsets, out)
    torch.testing.assert_close(out, TORCH_GROUPED.wgrad(h, dy, grp.tok, grp.offsets, torch.empty(d_ff, m)),
                               atol=1e-4, rtol=1e-4)
    assert len(timed) == 8


def test_tuning_names_must_be_launch_arguments(interpreter):
    """A restore / reset / key name that is not an argument of the launch fails on every path (on a GPU
    triton.autotune would reject it only there)."""
    from sparsify.codegen.grouped_gemm import GroupedGemmSpec, _tile_configs, get_grouped_kernel

    kernel = get_grouped_kernel(GroupedGemmSpec(kind="down", dtype=torch.float32))
    with pytest.raises(ValueError, match="out_buf"):
        kernel.launch_tuned((1,), _tile_configs("down", True), restore=("out_buf",), A=1)


@needs_triton
@pytest.mark.parametrize("opts", [
    dict(lead=(2, 9), gated=True, bias=True, lora_rank=2, perm=True, activation="silu", dropout_p=0.2),
    dict(lead=(3,), gated=False, bias=False, activation="gelu", top_k=1),          # T < blocks
    dict(lead=(0,), gated=True, bias=True, activation="relu"),                     # T = 0
    dict(lead=(17,), gated=False, bias=True, lora_rank=3, gate="none", activation="gelu_tanh", top_k=3),
    dict(lead=(2, 7), gated=True, bias=True, perm=True, activation="silu"),       # the fused act_bwd kernel
], ids=["gated_lora_perm_dropout", "t_below_blocks", "t0", "gate_none_lora", "gated_bias_perm_fused"])
@pytest.mark.parametrize("save_pre", [False, True], ids=["recompute", "save_pre"])
def test_triton_forward_backward_match_reference(interpreter, opts, save_pre):
    args = make_routed(_gen(32), d=12, d_ff=20, d_out=9, blocks=4, **{"top_k": 2, **opts})
    seed = torch.tensor(7) if args[21] > 0 else ZERO_SEED
    out, ids, *pre = routed.routed_mlp_forward_triton(*args, seed, save_pre)
    ref = _ref(args, seed)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # the kernel's stored pre-activations are the torch path's
    for got_pre, want_pre in zip(pre, routed._forward(routed.TORCH_GROUPED, *args, seed, save_pre)[2:]):
        torch.testing.assert_close(got_pre, want_pre, atol=1e-5, rtol=1e-5)
    tensors = [a.detach() if a is not None else None for a in _tensors16(args)]
    needs = [a is not None and a.requires_grad for a in _tensors16(args)]
    grad_out = _randn(_gen(82), *out.shape)
    got = routed.routed_mlp_backward_triton(grad_out, tensors, ids, seed, args[13], *args[17:22], needs,
                                            [p_.detach() for p_ in pre])
    want = _grads(ref, _leaves(args), grad_out)
    got = [gr for gr, n in zip(got, needs) if n]
    for a, b, leaf in zip(got, want, _leaves(args)):
        torch.testing.assert_close(a, torch.zeros_like(leaf) if b is None else b, atol=1e-4, rtol=1e-4)


@needs_triton
def test_cuda_registrations_use_triton(interpreter):
    """The Python functions registered as the CUDA kernels, called on CPU tensors under the interpreter."""
    from sparsify.codegen import cache_info

    fwd = routed.routed_mlp._backend_fns["cuda"]
    bwd = routed.routed_mlp_backward._backend_fns["cuda"]
    args = make_routed(_gen(33), lead=(10,), gated=True, bias=True, lora_rank=2, perm=True, requires_grad=False)
    before = cache_info()
    out, ids, seed, *_ = fwd(*args)
    assert cache_info().hits + cache_info().misses > before.hits + before.misses
    torch.testing.assert_close(out, _ref(args, seed), atol=1e-4, rtol=1e-4)
    tensors = _tensors16(args)
    needs = [t is not None for t in tensors]
    grads = bwd(torch.ones_like(out), tensors, ids, seed, args[13], *args[17:22], needs, [])
    want = routed_bwd(torch.ones_like(out), tensors, ids, seed, args[13], *args[17:22], needs, [])
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # fp64 has no kernel: the torch grouped path
    args64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    before = cache_info()
    out64, _, seed, *_ = fwd(*args64)
    assert cache_info() == before
    torch.testing.assert_close(out64, _ref(args64, seed))


def test_grouped_kernel_specs_and_cache(kernel_cache_dir):
    from sparsify.codegen.grouped_gemm import GroupedGemmSpec, kernel_key, kernel_source

    spec = GroupedGemmSpec(kind="up", dtype=torch.float16, activation="silu", gated=True, lora=True, permuted=True)
    src = kernel_source(spec)
    assert spec.kernel_name in src and "tl.atomic_add" not in src and "perm_ptr" in src
    assert kernel_key(spec) == kernel_key(GroupedGemmSpec(kind="up", dtype=torch.float16, activation="silu",
                                                          gated=True, lora=True, permuted=True))
    down = kernel_source(GroupedGemmSpec(kind="down", dtype=torch.float32, row_scale=True))
    assert "tl.atomic_add" in down and "perm_ptr" not in down and 'input_precision="ieee"' in down
    with pytest.raises(ValueError):
        GroupedGemmSpec(kind="down", activation="gelu")
    with pytest.raises(ValueError):
        GroupedGemmSpec(kind="up", gated=True)
    with pytest.raises(ValueError):
        GroupedGemmSpec(kind="up", dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# 10. CUDA
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
class TestCuda:
    TOL = {torch.float32: (1e-4, 1e-3), torch.float16: (1e-2, 3e-2), torch.bfloat16: (5e-2, 1e-1)}

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("opts", [dict(gated=True, bias=False, activation="silu", perm=True),
                                      dict(gated=False, bias=True, activation="gelu", lora_rank=4),
                                      dict(gated=True, bias=True, lora_rank=4, perm=True, activation="gelu_tanh")])
    def test_matches_fp32_reference_and_uses_triton(self, monkeypatch, kernel_cache_dir, dtype, opts):
        from sparsify.codegen import cache_info

        monkeypatch.setenv("TRITON_INTERPRET", "0")
        args = make_routed(_gen(40), lead=(3, 67), d=64, d_ff=256, d_out=48, blocks=4, top_k=2, **opts)
        dev = [a.detach().to("cuda", dtype if a.is_floating_point() else a.dtype).requires_grad_(a.requires_grad)
               if isinstance(a, torch.Tensor) else a for a in args]
        # route the fp32 reference exactly as the device did (near-ties may flip in low precision)
        before = cache_info()
        out, ids, seed, *_ = routed_op(*dev)
        assert cache_info().hits + cache_info().misses > before.hits + before.misses
        ref_args = [a.detach().to("cuda", dtype).float().requires_grad_() if isinstance(a, torch.Tensor)
                    and a.is_floating_point() else (a.cuda() if isinstance(a, torch.Tensor) else a) for a in args]
        ref_ids = route(ref_args[0].reshape(-1, 64), ref_args[14], ref_args[15], 2)[1]
        same = (ref_ids == ids).all(dim=1).reshape(3, 67)
        assert same.float().mean() > 0.9
        ref = routed_reference(*ref_args, seed)
        fa, ga = self.TOL[dtype]
        scale = ref.abs().max().item()
        torch.testing.assert_close(out.float()[same], ref[same], atol=fa * max(1.0, scale), rtol=fa * 10)
        # gradients through the device op vs the fp32 reference on the rows routed alike
        grad_out = torch.randn_like(ref) * same[..., None]
        got = torch.autograd.grad(out, _leaves(dev), grad_out.to(dtype))
        want = torch.autograd.grad(ref, _leaves(ref_args), grad_out, allow_unused=True)
        for a, b in zip(got, want):
            assert a.is_cuda and a.dtype == dtype
            b = torch.zeros_like(a, dtype=torch.float32) if b is None else b
            torch.testing.assert_close(a.float(), b, atol=ga * max(1.0, b.abs().max().item()), rtol=ga)

    def test_autotuned_equals_the_default_config(self, monkeypatch, kernel_cache_dir):
        """triton.autotune's timing runs leave down's output (accumulated onto its initial value) and act_bwd's
        sums (from zero) as one run would: tuned results equal the pinned default's (SPARSIFY_AUTOTUNE=0)."""
        import sparsify.codegen.grouped_gemm as gg
        from sparsify.ops.routed_grouping import ActGrads

        monkeypatch.setenv("TRITON_INTERPRET", "0")
        g = _gen(44)
        t, fb, blocks, m = 1000, 256, 4, 512
        grp = _grouping(g, t, blocks, 2)
        a = grp.assignments
        h, s, init = _randn(g, a, fb).cuda(), (2 * torch.rand(a, generator=g)).cuda(), _randn(g, t, m).cuda()
        w, dy, pre = _randn(g, m, fb * blocks, scale=0.05).cuda(), _randn(g, t, m).cuda(), _randn(g, a, fb).cuda()
        tok, offsets = grp.tok.cuda(), grp.offsets.cuda()
        kw = dict(pre=pre, row_scale=s, activation="gelu", want_dg=True, want_db=True, out_dtype=torch.float32)
        results = {}
        for tune in ("1", "0"):
            monkeypatch.setenv("SPARSIFY_AUTOTUNE", tune)
            down = gg.grouped_down(h, w, tok, offsets, init.clone(), row_scale=s)
            act = ActGrads(*gg.grouped_act_backward(dy, w.t(), tok, offsets, fb, **kw))
            results[tune] = (down, act.dg, act.db["up"], act.ghd)
        for tuned, default in zip(results["1"], results["0"]):
            torch.testing.assert_close(tuned, default, atol=1e-4, rtol=1e-4)

    def test_no_host_sync(self, monkeypatch, kernel_cache_dir):
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        args = make_routed(_gen(41), lead=(4, 33), d=64, d_ff=128, d_out=64, blocks=4, top_k=2, gated=True,
                           bias=True, lora_rank=4, perm=True, dropout_p=0.1)
        dev = [a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
        out = routed_op(*dev)[0]  # warm-up: kernels built and compiled
        torch.autograd.grad(out.sum(), _leaves(dev))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = routed_op(*dev)[0]
            grads = torch.autograd.grad(out.sum(), _leaves(dev))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert all(g.is_cuda for g in grads)

    def test_t0_and_fp64_fallback(self):
        args = make_routed(_gen(42), lead=(0,), gated=True, bias=True)
        dev = [a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
        out = routed_op(*dev)[0]
        assert out.shape == (0, 6)
        args = make_routed(_gen(43), lead=(9,), dtype=torch.float64, lora_rank=2)
        dev = [a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
        out, _, seed, *_ = routed_op(*dev)
        torch.testing.assert_close(out, routed_reference(*dev, seed))
