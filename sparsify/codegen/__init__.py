"""Kernel code generation: spec -> Triton source (from a template) -> cached compiled kernel.

One core (kernel.py: KernelSpec, GeneratedKernel, the loader and its cache) and one file per kernel family:

    up_projection.py         fused (gated) up-projection; up_projection(x2d, w, b, activation, w_gate, b_gate)
    grouped_gemm.py          the routed FFN's grouped GEMMs (up / down / wgrad, and act_bwd: the backward's v GEMM
                             with the activation's backward, dropout and the gate / bias sums in its epilogue)
    pq_kernels.py            SPT's product-quantisation encode and top-k key selection
    spt_attention_source.py  sparse attention kernels' specs and sources (token and block granular)
    spt_attention.py         their launchers (spt_forward / backward, block_sparse_forward / backward)
    block_linear.py          MST's block-sparse Linear (forward / input grad, weight grad)
    sparse_down.py, sparse_up.py   DEFT's activation-sparse down / (gated) up projections
    sm90.py                  compile any launcher's kernels for Hopper without a GPU (registers, spills, wgmma)
Launchers tune their tiles with triton.autotune on a GPU through kernel.py's launch_tuned.

Public API here::

    UpProjectionSpec, ACTIVATIONS, up_projection, kernel_source, kernel_key, get_kernel
    cache_info(), clear_cache(), cache_dir()   # the one in-memory cache every family goes through
    tuned_configs()                            # what the autotuner picked on a GPU, per kernel and shape

Triton is imported only when a kernel is first built (see kernel.py for why). Nothing here imports a module
above the kernel layer (tests/e2e/test_layers.py).
"""

from .kernel import GeneratedKernel, KernelSpec, cache_dir, cache_info, clear_cache, tuned_configs
from .up_projection import ACTIVATIONS, SUPPORTED_DTYPES, UpProjectionSpec, get_kernel, kernel_key, kernel_source, up_projection

__all__ = [
    "ACTIVATIONS",
    "SUPPORTED_DTYPES",
    "UpProjectionSpec",
    "KernelSpec",
    "GeneratedKernel",
    "up_projection",
    "kernel_source",
    "kernel_key",
    "get_kernel",
    "cache_info",
    "clear_cache",
    "cache_dir",
    "tuned_configs",
]
