"""Kernel code generation: spec -> Triton source (from a template) -> cached compiled kernel.

Public API::

    UpProjectionSpec, ACTIVATIONS        # what a kernel is generated from
    up_projection(x2d, w, b, activation, w_gate=None, b_gate=None)
    kernel_source(spec) -> str           # generated source (debugging / dumps)
    get_kernel(spec) -> CompiledKernel   # cached: same spec -> same object
    cache_info(), clear_cache()          # in-memory cache counters / reset

Triton is imported only when a kernel is first built (see emitter.py for why).
"""

from .emitter import CompiledKernel, cache_dir, cache_info, clear_cache, get_kernel, kernel_key, kernel_source
from .launch import up_projection
from .spec import ACTIVATIONS, SUPPORTED_DTYPES, UpProjectionSpec

__all__ = [
    "ACTIVATIONS",
    "SUPPORTED_DTYPES",
    "UpProjectionSpec",
    "CompiledKernel",
    "up_projection",
    "kernel_source",
    "kernel_key",
    "get_kernel",
    "cache_info",
    "clear_cache",
    "cache_dir",
]
