"""Sparse attention kernels' specs and generated sources (token-granular SPT and block-granular).

    TokenSparseSpec, BlockSparseSpec     what a kernel module is generated from (entries "fwd" and "bwd")
    kernel_source(spec) -> str           generated source (pure: no triton import)
    kernel_key(spec), get_spt_kernel(spec) -> GeneratedKernel   (kernel.py's one cache)

The kernels' semantics and the launchers are in spt_attention.py; the template snippets in spt_templates.py.
"""

from __future__ import annotations

import dataclasses

import torch

from . import spt_templates as T
from .kernel import GeneratedKernel, KernelSpec, load_kernel, templates_digest

__all__ = ["TokenSparseSpec", "BlockSparseSpec", "kernel_source", "kernel_key", "get_spt_kernel", "MAX_HEAD_DIM",
           "TOKEN_MASK_KINDS"]

MAX_HEAD_DIM = 256
TOKEN_MASK_KINDS = ("none", "additive")


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _is_pow2(n) -> bool:
    return isinstance(n, int) and n > 0 and n & (n - 1) == 0


# --- specs -----------------------------------------------------------------------------

class _AttentionSpec(KernelSpec):
    """What both attention specs share: head dims (zero-padded to a power of two >= 16 inside the kernel) and two
    entries per module, the forward and the backward kernel."""

    family = "spt"
    entries = ("fwd", "bwd")

    def __post_init__(self):
        super().__post_init__()
        for name in ("head_dim", "v_head_dim"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or not 1 <= val <= MAX_HEAD_DIM:
                raise ValueError(f"{type(self).__name__}.{name} must be an int in 1..{MAX_HEAD_DIM}, got {val!r}")

    @property
    def block_d(self) -> int:
        return max(16, _next_pow2(self.head_dim))

    @property
    def block_dv(self) -> int:
        return max(16, _next_pow2(self.v_head_dim))


@dataclasses.dataclass(frozen=True)
class TokenSparseSpec(_AttentionSpec):
    """Token-granular (ELL) sparse attention: each query row keeps ``keep`` key slots.

    block_m: query rows per program; block_k: key slots per inner-loop chunk. The 3-D
    gather tiles are [block_m, block_k, pow2(head_dim)], so their product bounds the
    registers a program needs (see ``default_token_blocks``).
    """

    head_dim: int
    v_head_dim: int
    dtype: torch.dtype = torch.float16
    causal: bool = False
    mask: str = "none"  # "none" | "additive"
    mask_grad: bool = False  # backward also stores dS per slot (for dmask)
    dropout: bool = False  # dropout on the kept slots' probabilities, drawn in-kernel (Philox)
    precomputed_delta: bool = False  # backward reads D_i instead of computing it
    block_m: int = 16
    block_k: int = 16

    def __post_init__(self):
        super().__post_init__()
        if self.mask not in TOKEN_MASK_KINDS:
            raise ValueError(f"TokenSparseSpec.mask must be one of {TOKEN_MASK_KINDS}, got {self.mask!r}")
        if self.mask_grad and self.mask != "additive":
            raise ValueError("TokenSparseSpec.mask_grad needs mask='additive'")
        for name in ("block_m", "block_k"):
            val = getattr(self, name)
            if not _is_pow2(val) or val > 256:
                raise ValueError(f"TokenSparseSpec.{name} must be a power of two <= 256, got {val!r}")

    @property
    def kernel_name(self) -> str:
        """Base name of the two kernels (``<name>_fwd`` / ``<name>_bwd``), descriptive so
        they are recognisable in profiler traces."""
        parts = ["spt_token", f"d{self.head_dim}", f"dv{self.v_head_dim}", self.dtype_name]
        if self.causal:
            parts.append("causal")
        if self.mask != "none":
            parts.append(f"{self.mask}mask")
        if self.mask_grad:
            parts.append("dmask")
        if self.dropout:
            parts.append("drop")
        if self.precomputed_delta:
            parts.append("delta")
        parts.append(f"m{self.block_m}k{self.block_k}")
        return "_".join(parts)



@dataclasses.dataclass(frozen=True)
class BlockSparseSpec(_AttentionSpec):
    """Block-granular sparse attention: query blocks of ``block_m`` rows visit selected
    key blocks of ``block_n`` keys (flash-attention style, tl.dot).

    ``block_m`` / ``block_n`` are the block map's granularity; ``tile_m`` / ``tile_n``
    (0: the same) are the kernel's tiles, which may be smaller (a program handles
    tile_m rows of one map row and walks a selected block in tile_n-wide steps).
    """

    head_dim: int
    v_head_dim: int
    dtype: torch.dtype = torch.float16
    causal: bool = False
    key_padding: bool = False
    mask: str = "none"           # an attention mask tensor: "none", "bool" (True = attend) or "float" (added)
    dropout: bool = False        # dropout on the probabilities, drawn in-kernel (Philox; backward needs delta)
    precomputed_delta: bool = False
    block_m: int = 64
    block_n: int = 64
    tile_m: int = 0
    tile_n: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.mask not in ("none", "bool", "float"):
            raise ValueError(f"BlockSparseSpec.mask must be 'none', 'bool' or 'float', got {self.mask!r}")
        for name in ("block_m", "block_n"):
            val = getattr(self, name)
            if not _is_pow2(val) or not 16 <= val <= 256:
                raise ValueError(
                    f"BlockSparseSpec.{name} must be a power of two in 16..256 (tl.dot tiles), got {val!r}"
                )
        for name, block in (("tile_m", "block_m"), ("tile_n", "block_n")):
            val = getattr(self, name)
            if val == 0:  # frozen: normalise through object.__setattr__ (equal specs stay equal)
                object.__setattr__(self, name, getattr(self, block))
            elif not _is_pow2(val) or not 16 <= val <= getattr(self, block):
                raise ValueError(
                    f"BlockSparseSpec.{name} must be a power of two in 16..{block} "
                    f"({getattr(self, block)}), got {val!r}"
                )

    @property
    def kernel_name(self) -> str:
        parts = ["spt_block", f"d{self.head_dim}", f"dv{self.v_head_dim}", self.dtype_name]
        if self.causal:
            parts.append("causal")
        if self.key_padding:
            parts.append("kpm")
        if self.mask != "none":
            parts.append(f"mask{self.mask[0]}")
        if self.dropout:
            parts.append("drop")
        if self.precomputed_delta:
            parts.append("delta")
        parts.append(f"m{self.block_m}n{self.block_n}t{self.tile_m}x{self.tile_n}")
        return "_".join(parts)



# --- source generation -------------------------------------------------------------------

_TEMPLATE_DIGEST = templates_digest(vars(T))


def _check_spec(spec):
    if not isinstance(spec, (TokenSparseSpec, BlockSparseSpec)):
        raise ValueError(f"expected a TokenSparseSpec or BlockSparseSpec, got {type(spec).__name__}")


def kernel_key(spec) -> str:
    """Cache key (sha256 hex) of a spec's kernel module."""
    _check_spec(spec)
    return spec.key(_TEMPLATE_DIGEST)


def _token_source(spec: TokenSparseSpec) -> str:
    has_mask = spec.mask == "additive"
    mask_add = T.TOKEN_MASK_ADD if has_mask else ""
    slots = T.TOKEN_SLOTS.substitute(causal=T.TOKEN_CAUSAL if spec.causal else "")
    recompute = T.TOKEN_RECOMPUTE.substitute(mask_add=mask_add)
    bwd_dropout = T.TOKEN_BWD_DROPOUT if spec.dropout else T.TOKEN_BWD_NO_DROPOUT
    if spec.precomputed_delta:
        delta = T.TOKEN_DELTA_LOAD
    else:
        delta = T.TOKEN_DELTA_PASS.substitute(token_slots=slots, token_recompute=recompute,
                                              token_dropout_bwd=bwd_dropout)
    return T.TOKEN_KERNELS.substitute(
        reductions=T.REDUCTIONS,
        spec=spec.canonical(),
        key=kernel_key(spec),
        name=spec.kernel_name,
        mask_param=T.TOKEN_MASK_PARAM if has_mask else "",
        mask_strides=T.TOKEN_MASK_STRIDES if has_mask else "",
        mask_rows=T.TOKEN_MASK_ROWS if has_mask else "",
        mask_add=mask_add,
        token_slots=slots,
        token_recompute=recompute,
        token_delta=delta,
        renormalise="" if spec.precomputed_delta else T.TOKEN_RENORMALISE,
        delta_param=T.DELTA_PARAM if spec.precomputed_delta else "",
        delta_strides=T.DELTA_STRIDES if spec.precomputed_delta else "",
        ds_param=T.TOKEN_DS_PARAM if spec.mask_grad else "",
        ds_strides=T.TOKEN_DS_STRIDES if spec.mask_grad else "",
        ds_rows=T.TOKEN_DS_ROWS if spec.mask_grad else "",
        ds_store=T.TOKEN_DS_STORE if spec.mask_grad else "",
        dropout_param=T.BLOCK_DROPOUT_PARAM if spec.dropout else "",
        philox=T.BLOCK_PHILOX + "\n" if spec.dropout else "",
        token_dropout=T.TOKEN_FWD_DROPOUT if spec.dropout else T.TOKEN_FWD_NO_DROPOUT,
        token_dropout_bwd=bwd_dropout,
    )


def _block_source(spec: BlockSparseSpec) -> str:
    dot_kwargs = T.DOT_KWARGS_FP32 if spec.dtype == torch.float32 else ""
    scores = T.BLOCK_SCORES.substitute(
        dot_kwargs=dot_kwargs,
        causal=T.BLOCK_CAUSAL if spec.causal else "",
        kpm=T.BLOCK_KPM if spec.key_padding else "",
        mask={"none": "", "bool": T.BLOCK_MASK_BOOL, "float": T.BLOCK_MASK_FLOAT}[spec.mask],
    )
    recompute = T.BLOCK_RECOMPUTE.substitute(dot_kwargs=dot_kwargs)
    if spec.precomputed_delta:
        delta = T.BLOCK_DELTA_LOAD
    else:
        delta = T.BLOCK_DELTA_PASS.substitute(
            block_select=T.BLOCK_SELECT, block_scores=scores, block_recompute=recompute
        )
    return T.BLOCK_KERNELS.substitute(
        reductions=T.REDUCTIONS,
        spec=spec.canonical(),
        key=kernel_key(spec),
        name=spec.kernel_name,
        dot_kwargs=dot_kwargs,
        kpm_param=T.BLOCK_KPM_PARAM if spec.key_padding else "",
        kpm_strides=T.BLOCK_KPM_STRIDES if spec.key_padding else "",
        mask_param=T.BLOCK_MASK_PARAM if spec.mask != "none" else "",
        dropout_param=T.BLOCK_DROPOUT_PARAM if spec.dropout else "",
        philox=T.BLOCK_PHILOX + "\n" if spec.dropout else "",
        fwd_dropout=T.BLOCK_FWD_DROPOUT if spec.dropout else T.BLOCK_FWD_NO_DROPOUT,
        bwd_dropout=T.BLOCK_BWD_DROPOUT if spec.dropout else T.BLOCK_BWD_NO_DROPOUT,
        mask_strides=T.BLOCK_MASK_STRIDES if spec.mask != "none" else "",
        delta_param=T.DELTA_PARAM if spec.precomputed_delta else "",
        delta_strides=T.DELTA_STRIDES if spec.precomputed_delta else "",
        block_prologue=T.BLOCK_PROLOGUE,
        block_select=T.BLOCK_SELECT,
        block_scores=scores,
        block_recompute=recompute,
        block_delta=delta,
    )


def kernel_source(spec) -> str:
    """The Triton source generated for ``spec`` (both the fwd and the bwd kernel)."""
    _check_spec(spec)
    if isinstance(spec, TokenSparseSpec):
        return _token_source(spec)
    return _block_source(spec)


def get_spt_kernel(spec) -> GeneratedKernel:
    """The kernel module for ``spec`` (entries "fwd" and "bwd"): generated, written and imported on first use,
    then served from the one kernel cache (kernel.py), keyed on the interpreter mode."""
    _check_spec(spec)
    return load_kernel(spec, lambda: kernel_source(spec), _TEMPLATE_DIGEST)
