"""Sparse attention kernels (SPT token-granular and block-granular), generated per spec.

Public API (the specs and sources are in spt_attention_source.py)::

    spt_forward(q, k, v, index, valid, mask, scale, *, causal=False) -> (out, lse)
    spt_backward(grad_out, q, k, v, index, valid, mask, lse, scale, *, causal=False,
                 out=None, mask_grad=False) -> (dq, dk, dv) [+ dmask if mask_grad]

    block_sparse_forward(q, k, v, block_index, block_valid, *, block_m=64, block_n=64,
                         causal=False, key_padding_mask=None, scale=None) -> (out, lse)
    block_sparse_backward(grad_out, q, k, v, block_index, block_valid, lse, *, block_m=64,
                          block_n=64, causal=False, key_padding_mask=None, scale=None,
                          out=None) -> (dq, dk, dv)
    dense_block_map(Lq, Lk, block_m, block_n, causal=False) -> (block_index, block_valid)
    default_token_blocks(...), default_block_tiles(...)   # GPU launch configurations

(all four kernels also take optional tile-size overrides: block_m / block_k for the
token kernels, tile_m / tile_n for the block kernels)

Shapes: q [B, H, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], any strides, one dtype
out of fp16 / bf16 / fp32. GQA: H % Hkv == 0 and query head h reads kv head
h // (H // Hkv); repeated k / v are never materialised. out is [B, H, Lq, Dv] in q's
dtype, lse is the fp32 natural-log logsumexp of the kept scores per row.

Semantics shared by both kinds:

* A query row that keeps no key (every slot invalid / masked) gets out = 0, lse = -inf
  and zero gradients; nothing is NaN (SDPA would give NaN for such a row).
* ``causal`` is bottom-right aligned: query i may see key j <= i + (Lk - Lq), which is
  SDPA's ``is_causal`` when Lq == Lk and the right thing for a KV cache when Lq < Lk.
* Out-of-range key / block indices count as invalid slots (they are never read).
* Duplicate valid indices in one row are counted twice (like a gather-based reference);
  selections are expected to be distinct.
* Backward needs D_i = rowsum(P * dP). By default the kernel computes it in an extra
  pass over the kept entries (no forward output needed); pass ``out=`` to instead use
  rowsum(dO * O) computed here with torch (one pass less, FlashAttention-2 style; the
  token kernel ignores ``out`` when it has an additive mask, see ``spt_backward``).
* dk / dv are accumulated with ``tl.atomic_add`` into fp32 buffers (one key row /
  block is shared by many query rows and, with GQA, by several query heads), then cast.
  Summation order is therefore not deterministic on a GPU.

Token kernel (``spt_*``): index [B, H, Lq, keep] int32 (int64 accepted), valid bool
of the same shape (None: all valid); both may be broadcast views. The optional additive
float mask is broadcastable to [B, H, Lq, Lk] and read through its strides (0-strides
for broadcast dims), gathered at mask[b, h, i, index]; a bool mask is turned into an
additive 0 / -inf one. ``mask_grad=True`` makes the backward kernel store dS per slot
(fp32 [B, H, Lq, keep]); dmask is scattered from it here into a dense [B, H, Lq, Lk]
fp32 buffer and summed down to the mask's shape (a dense allocation: masks that need
gradients are rare).

Block kernel (``block_sparse_*``): block_index [B, H, ceil(Lq / block_m), kb] int32
(int64 accepted) lists the key blocks (block_n keys each) visited by each query block,
block_valid (bool, same shape, None: all valid) switches entries off; both broadcast.
block_m / block_n are the map's granularity: powers of two in 16..256 (tl.dot needs
>= 16). The kernel tiles (tile_m <= block_m rows per program, tile_n <= block_n keys
per step) may be smaller, so a coarse map does not force register-spilling tiles.
key_padding_mask: [B, Lk], nonzero = attend (the Hugging Face attention_mask
convention). Head dims that are not a power of two (up to 256) are zero-padded inside
the kernel to the next power of two (>= 16), no copy.

Interpreter notes (TRITON_INTERPRET=1, CPU tensors): kernels are built lazily and keyed
on the mode (see kernel.py); bf16 ``tl.dot`` is not exact in the interpreter, so the
block kernel is checked there in fp32 / fp16 only.
"""

from __future__ import annotations

import torch

from ..tables import KERNEL_DTYPES as SUPPORTED_DTYPES
from .kernel import interpret_mode, size_bucket, tile_configs
from .spt_attention_source import MAX_HEAD_DIM, BlockSparseSpec, TokenSparseSpec, get_spt_kernel

__all__ = [
    "spt_forward",
    "spt_backward",
    "block_sparse_forward",
    "block_sparse_backward",
    "dense_block_map",
    "default_token_blocks",
    "default_block_tiles",
]


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _is_pow2(n) -> bool:
    return isinstance(n, int) and n > 0 and n & (n - 1) == 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --- argument checking ---------------------------------------------------------------------

def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, heads, L, head_dim], got {getattr(t, 'shape', type(t))}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}; expected one of {tuple(str(d) for d in SUPPORTED_DTYPES)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, expected q's dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, expected q's device {q.device}")
    B, H, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"k has shape {tuple(k.shape)}, expected [B={B}, Hkv, Lk, D={D}]")
    if tuple(v.shape[:3]) != (B, Hkv, Lk):
        raise ValueError(f"v has shape {tuple(v.shape)}, expected [{B}, {Hkv}, {Lk}, Dv]")
    Dv = v.shape[3]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({Hkv})")
    for name, d in (("head dim", D), ("v head dim", Dv)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name} {d} is not supported (1..{MAX_HEAD_DIM})")
    if B * H > 65535:
        raise ValueError(f"B * H = {B * H} exceeds the grid limit 65535")
    return B, H, Hkv, Lq, Lk, D, Dv


def _broadcast(name, t, shape, q, dtypes=None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}, expected one of {tuple(str(d) for d in dtypes)}")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device}, expected q's device {q.device}")
    try:
        return torch.broadcast_to(t, shape)
    except RuntimeError:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, not broadcastable to {tuple(shape)}") from None


_INDEX_DTYPES = (torch.int32, torch.int64)


def _flags(name, t, shape, q):
    """A bool tensor as a uint8 view (same storage and strides: no i1 pointers in kernels)."""
    if t is None:
        return torch.ones((), dtype=torch.uint8, device=q.device).expand(shape)
    return _broadcast(name, t, shape, q, (torch.bool,)).view(torch.uint8)


# --- token-granular API ----------------------------------------------------------------------

# (block_m, block_k, num_warps) of the token kernels on a GPU, by padded head dim: the
# gather tiles are [block_m, block_k, pow2(head_dim)]. Picked offline from ptxas
# register / spill reports for sm_90 (no spills; no timing yet).
_TOKEN_BLOCKS = {
    # head dim <=: (forward, backward)
    64: ((8, 16, 4), (4, 16, 8)),
    128: ((4, 16, 8), (2, 16, 8)),
    256: ((2, 16, 4), (1, 16, 4)),
}


def default_token_blocks(head_dim, interpret=False, backward=False):
    """(block_m, block_k, num_warps) for the token kernels. The interpreter runs one
    program at a time in numpy: few, large programs are fastest there."""
    if interpret:
        return 16, 16, 4
    bd = max(16, _next_pow2(head_dim))
    return _TOKEN_BLOCKS[min(k for k in _TOKEN_BLOCKS if k >= bd)][int(backward)]


def _token_inputs(q, k, v, index, valid, mask, scale):
    B, H, Hkv, Lq, Lk, D, Dv = _check_qkv(q, k, v)
    if not isinstance(index, torch.Tensor) or index.dim() == 0:
        raise ValueError(f"index must be an int tensor [B, H, Lq, keep], got {getattr(index, 'shape', type(index))}")
    keep = index.shape[-1]
    shape = (B, H, Lq, keep)
    index = _broadcast("index", index, shape, q, _INDEX_DTYPES)
    valid = _flags("valid", valid, shape, q)
    mask_shape = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"mask must be a tensor or None, got {type(mask).__name__}")
        if mask.dtype == torch.bool:  # boolean "attend" mask -> additive 0 / -inf
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
        elif not mask.dtype.is_floating_point:
            raise ValueError(f"mask must be a float (additive) or bool tensor, got {mask.dtype}")
        mask_shape = tuple(mask.shape)
        mask = _broadcast("mask", mask, (B, H, Lq, Lk), q)
    if scale is None:
        scale = D ** -0.5
    return (B, H, Hkv, Lq, Lk, D, Dv, keep), index, valid, mask, mask_shape, float(scale)


def _token_spec(q, D, Dv, causal, mask, mask_grad, precomputed_delta, block_m, block_k, backward, dropout=False):
    dm, dk, warps = default_token_blocks(max(D, Dv), interpret_mode(), backward)
    if dropout and dm >= 8 and not interpret_mode():
        dm //= 2  # the in-kernel Philox's state: 8 rows spilled at head_dim 64 on sm_90, 4 do not
    spec = TokenSparseSpec(
        head_dim=D, v_head_dim=Dv, dtype=q.dtype, causal=bool(causal),
        mask="additive" if mask is not None else "none", mask_grad=bool(mask_grad),
        precomputed_delta=bool(precomputed_delta), dropout=bool(dropout),
        block_m=block_m or dm, block_k=block_k or dk,
    )
    return spec, warps


def _common_args(spec, q, k, v, H, Hkv, Lq, Lk):
    return dict(
        q_ptr=q, k_ptr=k, v_ptr=v, H=H, GROUP=H // Hkv, Lq=Lq, Lk=Lk,
        s_qb=q.stride(0), s_qh=q.stride(1), s_qm=q.stride(2), s_qd=q.stride(3),
        s_kb=k.stride(0), s_kh=k.stride(1), s_kn=k.stride(2), s_kd=k.stride(3),
        s_vb=v.stride(0), s_vh=v.stride(1), s_vn=v.stride(2), s_vd=v.stride(3),
        BLOCK_D=spec.block_d, BLOCK_DV=spec.block_dv, HEAD_DIM=spec.head_dim, V_HEAD_DIM=spec.v_head_dim,
    )


def _map_args(index, valid):
    return dict(
        s_ib=index.stride(0), s_ih=index.stride(1), s_im=index.stride(2), s_is=index.stride(3),
        s_ab=valid.stride(0), s_ah=valid.stride(1), s_am=valid.stride(2), s_as=valid.stride(3),
    )


def spt_forward(q, k, v, index, valid=None, mask=None, scale=None, *, causal=False,
                block_m=None, block_k=None, dropout_p=0.0, seed=0):
    """Token-sparse attention forward: ``(out [B, H, Lq, Dv] in q.dtype, lse [B, H, Lq] fp32)``.

    For each query row i only the keys ``index[b, h, i, s]`` with ``valid[b, h, i, s]``
    take part: softmax(scale * q.k + mask[b, h, i, index]) over them, times the gathered
    v rows. See the module docstring for masks, causality, empty rows and GQA. dropout_p, seed: dropout on the
    kept slots' probabilities, drawn in-kernel (Philox at each slot's offset in [B, H, Lq, keep]: the op's
    reference draws the same mask, ops/_vjp.py philox_dropout_scale).
    """
    (B, H, Hkv, Lq, Lk, D, Dv, keep), index, valid, mask, _, scale = _token_inputs(
        q, k, v, index, valid, mask, scale)
    # [B, Lq, H, Dv] in memory as SDPA lays it out (ops/spt.py attention_output): the kernel writes by strides
    out = torch.empty((B, Lq, H, Dv), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if B * H * Lq == 0:
        return out, lse
    spec, warps = _token_spec(q, D, Dv, causal, mask, False, False, block_m, block_k, backward=False,
                              dropout=dropout_p > 0)
    kernel = get_spt_kernel(spec)
    kernel.check_device(q)
    args = _common_args(spec, q, k, v, H, Hkv, Lq, Lk)
    args.update(_map_args(index, valid))
    args.update(
        idx_ptr=index, valid_ptr=valid, out_ptr=out, lse_ptr=lse, KEEP=keep, sm_scale=scale,
        s_ob=out.stride(0), s_oh=out.stride(1), s_om=out.stride(2), s_od=out.stride(3),
        s_lb=lse.stride(0), s_lh=lse.stride(1), s_lm=lse.stride(2),
        BLOCK_M=spec.block_m, BLOCK_K=spec.block_k,
    )
    if mask is not None:
        args.update(mask_ptr=mask, s_mb=mask.stride(0), s_mh=mask.stride(1), s_mm=mask.stride(2), s_mn=mask.stride(3))
    if dropout_p > 0:
        args.update(_dropout_args(seed, dropout_p))
    grid = (_cdiv(Lq, spec.block_m), B * H)
    kernel.launch(grid, entry="fwd", num_warps=warps, num_stages=1, **args)
    return out, lse


def _delta_from_out(grad_out, out, shape, q):
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(grad_out.shape):
        raise ValueError(f"out must have grad_out's shape {tuple(grad_out.shape)}, got {getattr(out, 'shape', None)}")
    if out.device != q.device:
        raise ValueError(f"out is on {out.device}, expected q's device {q.device}")
    # rowsum(dO * O) = rowsum(P * dP): the FlashAttention-2 shortcut
    return (grad_out.float() * out.float()).sum(-1)


def _check_grad_out(grad_out, shape, q):
    if not isinstance(grad_out, torch.Tensor) or tuple(grad_out.shape) != shape:
        raise ValueError(f"grad_out must have shape {shape}, got {getattr(grad_out, 'shape', type(grad_out))}")
    if grad_out.dtype not in SUPPORTED_DTYPES or grad_out.device != q.device:
        raise ValueError(f"grad_out must be a float tensor on {q.device}, got {grad_out.dtype} on {grad_out.device}")


def _check_lse(lse, shape, q):
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != shape:
        raise ValueError(f"lse must have shape {shape}, got {getattr(lse, 'shape', type(lse))}")
    if lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(f"lse must be fp32 on {q.device} (as returned by the forward), got {lse.dtype} on {lse.device}")


def _mask_grad(ds, index, mask_shape, B, H, Lq, Lk):
    """dmask from the per-slot dS: scatter into [B, H, Lq, Lk] (dS is 0 on dropped slots, whose
    indices are clamped only to stay in range), then sum over the mask's broadcast dims."""
    dense = torch.zeros((B, H, Lq, Lk), dtype=torch.float32, device=ds.device)
    if Lk:
        dense.scatter_add_(3, index.long().clamp(0, Lk - 1), ds)
    lead = dense.dim() - len(mask_shape)
    if lead:
        dense = dense.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(mask_shape) if n == 1 and dense.shape[i] != 1)
    if dims:
        dense = dense.sum(dim=dims, keepdim=True)
    return dense.reshape(mask_shape)


def spt_backward(grad_out, q, k, v, index, valid, mask, lse, scale=None, *, causal=False,
                 out=None, mask_grad=False, block_m=None, block_k=None, dropout_p=0.0, seed=0):
    """Token-sparse attention backward: ``(dq, dk, dv)`` in the input dtypes.

    P is recomputed from ``lse`` (from ``spt_forward`` with the same arguments). With
    ``out=`` (the forward output) and no mask, D_i = rowsum(dO * O) is computed here
    instead of by an extra kernel pass. With a mask the pass is kept: it also
    renormalises rows whose kept keys are all masked with finfo.min-like values (fp32
    absorbs their scores: the forward averages them, as fp32 SDPA, and lse alone cannot
    reproduce that). ``mask_grad=True`` (needs a float ``mask``) also returns dmask
    (fp32, the mask's shape) as a 4th element.
    """
    (B, H, Hkv, Lq, Lk, D, Dv, keep), index, valid, mask, mask_shape, scale = _token_inputs(
        q, k, v, index, valid, mask, scale)
    _check_grad_out(grad_out, (B, H, Lq, Dv), q)
    _check_lse(lse, (B, H, Lq), q)
    if mask_grad and mask is None:
        raise ValueError("mask_grad=True needs a float mask")
    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    dk_acc = torch.zeros((B, Hkv, Lk, D), dtype=torch.float32, device=q.device)
    dv_acc = torch.zeros((B, Hkv, Lk, Dv), dtype=torch.float32, device=q.device)
    ds = torch.zeros((B, H, Lq, keep), dtype=torch.float32, device=q.device) if mask_grad else None
    if B * H * Lq:
        # with an additive mask the kernel's own D_i pass is kept: it also renormalises rows
        # whose scores fp32 absorbs (see TOKEN_DELTA_PASS), which D_i from `out` cannot
        use_out = out is not None and mask is None
        delta = _delta_from_out(grad_out, out, (B, H, Lq), q) if use_out else None
        spec, warps = _token_spec(q, D, Dv, causal, mask, mask_grad, delta is not None, block_m, block_k,
                                  backward=True, dropout=dropout_p > 0)
        kernel = get_spt_kernel(spec)
        kernel.check_device(q)
        args = _common_args(spec, q, k, v, H, Hkv, Lq, Lk)
        args.update(_map_args(index, valid))
        args.update(
            idx_ptr=index, valid_ptr=valid, do_ptr=grad_out, lse_ptr=lse,
            dq_ptr=dq, dk_ptr=dk_acc, dv_ptr=dv_acc, KEEP=keep, sm_scale=scale,
            s_gb=grad_out.stride(0), s_gh=grad_out.stride(1), s_gm=grad_out.stride(2), s_gd=grad_out.stride(3),
            s_lb=lse.stride(0), s_lh=lse.stride(1), s_lm=lse.stride(2),
            s_dqb=dq.stride(0), s_dqh=dq.stride(1), s_dqm=dq.stride(2), s_dqd=dq.stride(3),
            s_dkb=dk_acc.stride(0), s_dkh=dk_acc.stride(1), s_dkn=dk_acc.stride(2), s_dkd=dk_acc.stride(3),
            s_dvb=dv_acc.stride(0), s_dvh=dv_acc.stride(1), s_dvn=dv_acc.stride(2), s_dvd=dv_acc.stride(3),
            BLOCK_M=spec.block_m, BLOCK_K=spec.block_k,
        )
        if mask is not None:
            args.update(mask_ptr=mask, s_mb=mask.stride(0), s_mh=mask.stride(1), s_mm=mask.stride(2), s_mn=mask.stride(3))
        if delta is not None:
            args.update(delta_ptr=delta, s_eb=delta.stride(0), s_eh=delta.stride(1), s_em=delta.stride(2))
        if ds is not None:
            args.update(ds_ptr=ds, s_sb=ds.stride(0), s_sh=ds.stride(1), s_sm=ds.stride(2), s_ss=ds.stride(3))
        if dropout_p > 0:
            args.update(_dropout_args(seed, dropout_p))
        grid = (_cdiv(Lq, spec.block_m), B * H)
        kernel.launch(grid, entry="bwd", num_warps=warps, num_stages=1, **args)
    grads = (dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype))
    if mask_grad:
        grads += (_mask_grad(ds, index, mask_shape, B, H, Lq, Lk),)
    return grads


# --- block-granular API ----------------------------------------------------------------------

# Kernel tiles (tile_m, tile_n, num_warps, num_stages) of the block kernels on a GPU, by padded head dim: the
# candidates triton.autotune times (kernel.py launch_tuned), the first being the default (SPARSIFY_AUTOTUNE=0, or
# tiles pinned by the caller). Each compiles for sm_90 without spills (benchmarks/results/sm90_kernels.md).
_BLOCK_TILES = {
    # head dim <=: (forward, backward)
    # bwd at head_dim 64: 64 x 64 tiles make dK / dV's dots 64 rows, wgmma-sized (at 64 x 32 they lowered to
    # mma.sync); sm_90 compile: 161 registers, no spills
    64: (((64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 4), (32, 64, 4, 3)),
         ((64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 4, 2), (64, 64, 8, 3))),
    # bwd at 128: 64 x 64 reaches 255 registers (the edge of spilling): 64 x 32 (183 registers, dK / dV on mma.sync)
    128: (((64, 32, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3)),
          ((64, 32, 8, 2), (32, 32, 4, 2), (32, 64, 8, 2))),
    256: (((32, 32, 8, 3),), ((16, 32, 8, 2),)),  # bwd spills whatever the tile
}


def _block_tile_candidates(head_dim, block_m, block_n, backward, interpret=False):
    if interpret:  # one program at a time in numpy: the map blocks themselves, one config
        return [(block_m, block_n, 4, 1)]
    bd = max(16, _next_pow2(head_dim))
    found = []
    for tm, tn, warps, stages in _BLOCK_TILES[min(k for k in _BLOCK_TILES if k >= bd)][int(backward)]:
        tile = (min(tm, block_m), min(tn, block_n), warps, stages)  # a tile never exceeds the map's block
        if tile not in found:
            found.append(tile)
    return found


def default_block_tiles(head_dim, block_m, block_n, backward=False, interpret=False):
    """(tile_m, tile_n, num_warps) of the block kernels' default config for a map of block_m x block_n."""
    return tuple(_block_tile_candidates(head_dim, block_m, block_n, backward, interpret)[0][:3])


def _block_configs(spec, backward, pinned, interpret):
    """The TileConfigs a block-kernel launch chooses from: the candidates, or the spec's tiles alone (at the default
    warps and stages) when the caller pinned them."""
    candidates = _block_tile_candidates(spec.head_dim, spec.block_m, spec.block_n, backward, interpret)
    return tile_configs(candidates, ("TILE_M", "TILE_N"),
                        {"TILE_M": spec.tile_m, "TILE_N": spec.tile_n} if pinned else None)


def dense_block_map(Lq: int, Lk: int, block_m: int, block_n: int, causal: bool = False, device=None):
    """Every allowed key block for every query block: ``(block_index int32 [nqb, nkb],
    block_valid bool [nqb, nkb])`` with nqb = ceil(Lq / block_m), nkb = ceil(Lk / block_n).
    With ``causal`` (bottom-right aligned, as the kernels) blocks entirely above the
    diagonal are invalid. Broadcasts over [B, H] when passed to the block kernels."""
    nqb, nkb = _cdiv(Lq, block_m), _cdiv(Lk, block_n)
    block_index = torch.arange(nkb, dtype=torch.int32, device=device).expand(nqb, nkb).contiguous()
    if not causal:
        return block_index, torch.ones((nqb, nkb), dtype=torch.bool, device=device)
    # the last row of query block qb sees keys <= last + (Lk - Lq)
    last_row = torch.clamp((torch.arange(nqb, device=device) + 1) * block_m, max=Lq) - 1
    first_key = torch.arange(nkb, device=device) * block_n
    block_valid = first_key[None, :] <= (last_row + (Lk - Lq))[:, None]
    return block_index, block_valid


def _attn_mask(mask, B, H, Lq, Lk):
    """A mask tensor broadcastable to [B, H, Lq, Lk] as a broadcast view (stride 0 where it broadcasts), and its
    kind for the spec: "bool" (True = attend) or "float" (added to the scores)."""
    if mask is None:
        return None, "none"
    if not isinstance(mask, torch.Tensor) or mask.dim() > 4 or mask.is_complex():
        raise ValueError(f"attn_mask must be a bool or float tensor broadcastable to {(B, H, Lq, Lk)}")
    try:
        view = mask.broadcast_to(B, H, Lq, Lk)
    except RuntimeError:
        raise ValueError(f"attn_mask {tuple(mask.shape)} does not broadcast to {(B, H, Lq, Lk)}") from None
    if mask.dtype == torch.bool:
        return view, "bool"
    if not mask.is_floating_point():
        raise ValueError(f"attn_mask must be bool or floating point, got {mask.dtype}")
    return view, "float"


def _block_inputs(q, k, v, block_index, block_valid, block_m, block_n, key_padding_mask, scale):
    B, H, Hkv, Lq, Lk, D, Dv = _check_qkv(q, k, v)
    for name, val in (("block_m", block_m), ("block_n", block_n)):
        if not _is_pow2(val) or not 16 <= val <= 256:
            raise ValueError(f"{name} must be a power of two in 16..256, got {val!r}")
    if not isinstance(block_index, torch.Tensor) or block_index.dim() == 0:
        raise ValueError("block_index must be an int tensor [B, H, ceil(Lq / block_m), kb]")
    nqb = _cdiv(Lq, block_m)
    shape = (B, H, nqb, block_index.shape[-1])
    block_index = _broadcast("block_index", block_index, shape, q, _INDEX_DTYPES)
    block_valid = _flags("block_valid", block_valid, shape, q)
    kpm = None
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise ValueError("key_padding_mask must be a tensor [B, Lk] or None")
        if key_padding_mask.dtype != torch.bool:
            if key_padding_mask.dtype.is_complex:
                raise ValueError("key_padding_mask must be bool or integer / float 0-1")
            key_padding_mask = key_padding_mask != 0
        kpm = _flags("key_padding_mask", key_padding_mask, (B, Lk), q)
    if scale is None:
        scale = D ** -0.5
    block_index, counts = _compact_blocks(block_index, block_valid, _cdiv(Lk, block_n))
    return (B, H, Hkv, Lq, Lk, D, Dv, nqb), block_index, counts, kpm, float(scale)


def _compact_blocks(block_index, block_valid, nkb):
    """The selection as the kernels read it: per map row the valid, in-range block indices first (a stable sort:
    their order kept) and their count [B, H, nqb] int32, so a kernel loops over exactly those blocks' tiles with
    no branch (which lets Triton pipeline the loads). On the device, nothing read back."""
    ok = block_valid & (block_index >= 0) & (block_index < nkb)
    order = torch.sort((~ok).to(torch.uint8), dim=-1, stable=True).indices
    compact = torch.gather(block_index, -1, order).to(torch.int32).contiguous()
    return compact, ok.sum(-1, dtype=torch.int32).contiguous()


def _block_args(spec, q, k, v, H, Hkv, Lq, Lk, block_index, counts, kpm, scale):
    args = _common_args(spec, q, k, v, H, Hkv, Lq, Lk)
    args.update(s_ib=block_index.stride(0), s_ih=block_index.stride(1), s_im=block_index.stride(2),
                s_is=block_index.stride(3), s_cb=counts.stride(0), s_ch=counts.stride(1), s_cm=counts.stride(2))
    args.update(
        bidx_ptr=block_index, bcnt_ptr=counts, KB=block_index.shape[-1],
        NKB=_cdiv(Lk, spec.block_n), sm_scale=scale,
        MAP_M=spec.block_m, BLOCK_N=spec.block_n,  # TILE_M / TILE_N: the launch's config (_block_configs)
    )
    if kpm is not None:
        args.update(kpm_ptr=kpm, s_pb=kpm.stride(0), s_pn=kpm.stride(1))
    return args


def _dropout_args(seed, p):
    """The kernels' Philox key: the int64 seed's two 32-bit halves (as tl.rand splits it), and p."""
    seed = int(seed) & ((1 << 64) - 1)
    return dict(seed_lo=seed & 0xFFFFFFFF, seed_hi=seed >> 32, p_drop=float(p))


def _mask_args(mask):
    if mask is None:
        return {}
    return dict(mask_ptr=mask, s_mb=mask.stride(0), s_mh=mask.stride(1), s_mm=mask.stride(2), s_mn=mask.stride(3))


def block_sparse_forward(q, k, v, block_index, block_valid=None, *, block_m=64, block_n=64,
                         causal=False, key_padding_mask=None, scale=None, tile_m=None, tile_n=None, attn_mask=None,
                         dropout_p=0.0, seed=0):
    """Block-sparse attention forward: ``(out [B, H, Lq, Dv] in q.dtype, lse [B, H, Lq] fp32)``.

    Query block qb (rows qb*block_m ...) attends to the keys of the blocks
    ``block_index[b, h, qb, :]`` whose ``block_valid`` is set, with causal / key padding
    masking inside them. With ``dense_block_map`` this is dense attention. tile_m / tile_n
    override the kernel tiles (default: ``default_block_tiles``). attn_mask: a bool (True = attend) or float
    (added) mask broadcastable to [B, H, Lq, Lk], as sparsify::block_sparse_attention's `mask`. dropout_p, seed:
    dropout on the probabilities, drawn in-kernel from Philox at each pair's offset (ops/_vjp.py
    philox_dropout_scale is the same draw).
    """
    (B, H, Hkv, Lq, Lk, D, Dv, nqb), block_index, counts, kpm, scale = _block_inputs(
        q, k, v, block_index, block_valid, block_m, block_n, key_padding_mask, scale)
    attn_mask, mask_kind = _attn_mask(attn_mask, B, H, Lq, Lk)
    # [B, Lq, H, Dv] in memory as SDPA lays it out (ops/spt.py attention_output): the kernel writes by strides
    out = torch.empty((B, Lq, H, Dv), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if B * H * Lq == 0:
        return out, lse
    tm, tn, _ = default_block_tiles(D, block_m, block_n, False, interpret_mode())
    spec = BlockSparseSpec(head_dim=D, v_head_dim=Dv, dtype=q.dtype, causal=bool(causal),
                           key_padding=kpm is not None, mask=mask_kind, dropout=dropout_p > 0, block_m=block_m,
                           block_n=block_n, tile_m=tile_m or tm, tile_n=tile_n or tn)
    kernel = get_spt_kernel(spec)
    kernel.check_device(q)
    args = _block_args(spec, q, k, v, H, Hkv, Lq, Lk, block_index, counts, kpm, scale)
    args.update(_mask_args(attn_mask))
    if dropout_p > 0:
        args.update(_dropout_args(seed, dropout_p))
    args.update(
        out_ptr=out, lse_ptr=lse,
        s_ob=out.stride(0), s_oh=out.stride(1), s_om=out.stride(2), s_od=out.stride(3),
        s_lb=lse.stride(0), s_lh=lse.stride(1), s_lm=lse.stride(2),
    )
    configs = _block_configs(spec, False, tile_m is not None or tile_n is not None, kernel.interpret)
    kernel.launch_tuned(lambda meta: (_cdiv(Lq, meta["TILE_M"]), B * H), configs, entry="fwd", key=("KB",),
                        bucket=(size_bucket(Lq, hi=1 << 20), size_bucket(B * H)), **args)
    return out, lse


def block_sparse_backward(grad_out, q, k, v, block_index, block_valid, lse, *, block_m=64, block_n=64,
                          causal=False, key_padding_mask=None, scale=None, out=None,
                          tile_m=None, tile_n=None, attn_mask=None, dropout_p=0.0, seed=0):
    """Block-sparse attention backward: ``(dq, dk, dv)`` in the input dtypes.

    One program per (query block, b, h) walks the selected key blocks once: dq is
    accumulated in registers, dk / dv tiles are atomically added to fp32 buffers. D_i is
    computed by an extra pass, or from ``out=`` (the forward output) if given. attn_mask: as the forward's
    (no gradient for it: a float mask that needs one takes the op's reference). dropout_p, seed: the forward's
    (the same in-kernel draw); dropout needs ``out=`` (D_i = rowsum(dO * O) holds the dropped probabilities).
    """
    if dropout_p > 0 and out is None:
        raise ValueError("block_sparse_backward: dropout needs the forward's output (out=) for D_i")
    (B, H, Hkv, Lq, Lk, D, Dv, nqb), block_index, counts, kpm, scale = _block_inputs(
        q, k, v, block_index, block_valid, block_m, block_n, key_padding_mask, scale)
    attn_mask, mask_kind = _attn_mask(attn_mask, B, H, Lq, Lk)
    _check_grad_out(grad_out, (B, H, Lq, Dv), q)
    _check_lse(lse, (B, H, Lq), q)
    if grad_out.dtype != q.dtype:  # tl.dot(dO, V^T) needs matching operand types
        grad_out = grad_out.to(q.dtype)
    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    dk_acc = torch.zeros((B, Hkv, Lk, D), dtype=torch.float32, device=q.device)
    dv_acc = torch.zeros((B, Hkv, Lk, Dv), dtype=torch.float32, device=q.device)
    if B * H * Lq:
        delta = None if out is None else _delta_from_out(grad_out, out, (B, H, Lq), q)
        tm, tn, _ = default_block_tiles(D, block_m, block_n, True, interpret_mode())
        spec = BlockSparseSpec(head_dim=D, v_head_dim=Dv, dtype=q.dtype, causal=bool(causal),
                               key_padding=kpm is not None, mask=mask_kind, dropout=dropout_p > 0,
                               precomputed_delta=delta is not None,
                               block_m=block_m, block_n=block_n, tile_m=tile_m or tm, tile_n=tile_n or tn)
        kernel = get_spt_kernel(spec)
        kernel.check_device(q)
        args = _block_args(spec, q, k, v, H, Hkv, Lq, Lk, block_index, counts, kpm, scale)
        args.update(_mask_args(attn_mask))
        if dropout_p > 0:
            args.update(_dropout_args(seed, dropout_p))
        args.update(
            do_ptr=grad_out, lse_ptr=lse, dq_ptr=dq, dk_ptr=dk_acc, dv_ptr=dv_acc,
            s_gb=grad_out.stride(0), s_gh=grad_out.stride(1), s_gm=grad_out.stride(2), s_gd=grad_out.stride(3),
            s_lb=lse.stride(0), s_lh=lse.stride(1), s_lm=lse.stride(2),
            s_dqb=dq.stride(0), s_dqh=dq.stride(1), s_dqm=dq.stride(2), s_dqd=dq.stride(3),
            s_dkb=dk_acc.stride(0), s_dkh=dk_acc.stride(1), s_dkn=dk_acc.stride(2), s_dkd=dk_acc.stride(3),
            s_dvb=dv_acc.stride(0), s_dvh=dv_acc.stride(1), s_dvn=dv_acc.stride(2), s_dvd=dv_acc.stride(3),
        )
        if delta is not None:
            args.update(delta_ptr=delta, s_eb=delta.stride(0), s_eh=delta.stride(1), s_em=delta.stride(2))
        configs = _block_configs(spec, True, tile_m is not None or tile_n is not None, kernel.interpret)
        # dK / dV accumulate atomically from zero: the autotuner's timing runs zero them again
        kernel.launch_tuned(lambda meta: (_cdiv(Lq, meta["TILE_M"]), B * H), configs, entry="bwd", key=("KB",),
                            bucket=(size_bucket(Lq, hi=1 << 20), size_bucket(B * H)), reset=("dk_ptr", "dv_ptr"),
                            **args)
    return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype)
