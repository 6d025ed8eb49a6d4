"""The kernel layer's autotuning (codegen/kernel.py launch_tuned) on the families that have no accumulating output:
MST's block-sparse Linear (forward / input grad, weight grad) and DEFT's sparse down / up projections. Under the
interpreter a stand-in timer (kernel.autotune_bench) drives the real triton.autotune path and runs every config,
and the tuned launch's result must equal the reference; the grid follows each config's tile sizes. (The routed
FFN's and block attention's tuned launches, whose outputs accumulate, are tested beside their kernels:
tests/ops/test_routed_ops.py, tests/kernels/test_spt_kernels.py.)"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import sparsify  # noqa: F401
from sparsify.ops.block_linear import expand_blocks
from sparsify.ops.sparse_down import sparse_down_reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture
def timed(autotune_timer):
    return autotune_timer  # tests/conftest.py: the stand-in timer, each config run three times


def test_block_linear_tuned(timed, monkeypatch):
    import sparsify.codegen.block_linear as bl

    monkeypatch.setattr(bl, "_INTERPRET_TILES", ((16, 1, 1), (32, 1, 1)))
    g = torch.Generator().manual_seed(0)
    t, n, k = 45, 64, 48
    x, w, b, dy = (torch.randn(t, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g),
                   torch.randn(t, n, generator=g))
    blocks = torch.rand(4, 3, generator=g) < 0.5
    wm = w * expand_blocks(blocks, w.shape)
    torch.testing.assert_close(bl.block_mm_triton(x, w, blocks, b), x @ wm.t() + b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bl.block_mm_triton(dy, w.t(), blocks.t()), dy @ wm, atol=1e-4, rtol=1e-4)
    got = bl.block_wgrad_triton(dy, x, blocks)
    torch.testing.assert_close(got, (dy.t() @ x) * expand_blocks(blocks, w.shape), atol=1e-4, rtol=1e-4)
    assert len(timed) == 6  # three launches, two configs each


def test_sparse_down_and_up_tuned(timed, monkeypatch):
    import sparsify.codegen.sparse_down as sd
    import sparsify.codegen.sparse_up as su
    from sparsify.ops.sparse_up import sparse_up_reference

    monkeypatch.setattr(sd, "_INTERPRET_TILES", ((16, 16, 1, 1), (32, 32, 1, 1)))
    monkeypatch.setattr(su, "_INTERPRET_TILES", ((16, 16, 1, 1), (32, 32, 1, 1)))
    g = torch.Generator().manual_seed(1)
    t, f, d, n = 37, 80, 24, 40
    h = torch.randn(t, f, generator=g)
    h[:, torch.rand(f, generator=g) > 0.4] = 0
    w, b = torch.randn(n, f, generator=g), torch.randn(n, generator=g)
    torch.testing.assert_close(sd.sparse_down_triton(h, w, b, 16), sparse_down_reference(h, w, b, 16),
                               atol=1e-4, rtol=1e-4)
    x, wu, bu = torch.randn(t, d, generator=g), torch.randn(f, d, generator=g), torch.randn(f, generator=g)
    got = su.sparse_up_triton(h, x, wu, bu, 16)
    torch.testing.assert_close(got, sparse_up_reference(h, x, wu, bu, 16), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, h * F.linear(x, wu, bu), atol=1e-4, rtol=1e-4)
    assert len(timed) == 4


def test_tuned_configs_say_what_was_picked(timed, monkeypatch):
    """sparsify.codegen.tuned_configs() lists each tuned launch's choice: here the stand-in timer's fastest, the
    last config, for the block-sparse matmul."""
    import sparsify.codegen.block_linear as bl
    from sparsify.codegen import clear_cache, tuned_configs

    clear_cache()
    monkeypatch.setattr(bl, "_INTERPRET_TILES", ((16, 1, 1), (32, 1, 1)))
    x, w = torch.randn(40, 32), torch.randn(32, 32)
    bl.block_mm_triton(x, w, torch.ones(2, 2, dtype=torch.bool))
    rows = [r for r in tuned_configs() if r["kernel"].startswith("block_mm")]
    assert len(rows) == 1 and rows[0]["config"] == {"BLOCK_T": 32} and len(rows[0]["timings_ms"]) == 2


def test_tile_configs_pinned_and_candidates():
    from sparsify.codegen.kernel import TileConfig, tile_configs

    rows = ((64, 32, 4, 3), (128, 64, 8, 4))
    assert tile_configs(rows, ("BLOCK_N", "BLOCK_K")) == (TileConfig.of(4, 3, BLOCK_N=64, BLOCK_K=32),
                                                           TileConfig.of(8, 4, BLOCK_N=128, BLOCK_K=64))
    # nothing pinned (None values): every candidate, the first the default
    assert len(tile_configs(rows, ("BLOCK_N", "BLOCK_K"), {"BLOCK_N": None})) == 2
    # one side pinned: the default row with that side replaced, alone (no tuning), its warps and stages kept
    assert tile_configs(rows, ("BLOCK_N", "BLOCK_K"), {"BLOCK_K": 16}) == (TileConfig.of(4, 3, BLOCK_N=64, BLOCK_K=16),)
    with pytest.raises(ValueError, match="BLOCK_Q"):
        tile_configs(rows, ("BLOCK_N", "BLOCK_K"), {"BLOCK_Q": 16})
