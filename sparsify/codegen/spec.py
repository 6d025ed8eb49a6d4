"""Kernel specs: the (small, hashable) description a kernel is generated from.

A spec holds every choice that changes the generated source and nothing else
(shapes and strides are runtime arguments). Two equal specs must produce the
same source, so the spec's canonical string is what the cache is keyed on.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch

from ..tables import ACTIVATIONS as _ACTIVATION_FUNCTIONS, DTYPE_NAMES, KERNEL_DTYPES

ACTIVATIONS = tuple(_ACTIVATION_FUNCTIONS)  # the names (sparsify/tables.py); Triton sources: templates.py

# Element types the kernels accept (inputs, weights and output share one dtype;
# accumulation is always fp32).
SUPPORTED_DTYPES = KERNEL_DTYPES

# Short names used in canonical strings and kernel names (stable across torch versions,
# unlike str(dtype) formatting might be).
_DTYPE_NAMES = DTYPE_NAMES


@dataclasses.dataclass(frozen=True)
class UpProjectionSpec:
    """``act(x @ W^T + b)``, or gated ``act(x @ Wg^T + bg) * (x @ Wu^T + bu)``."""

    activation: str
    gated: bool = False
    has_bias: bool = True
    dtype: torch.dtype = torch.float16

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unsupported activation {self.activation!r}; expected one of {ACTIVATIONS}"
            )
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"unsupported dtype {self.dtype}; expected one of "
                f"{tuple(str(d) for d in SUPPORTED_DTYPES)}"
            )
        # bool() guards against e.g. numpy bools or 0/1 ints making equal specs hash differently
        for name in ("gated", "has_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"UpProjectionSpec.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def dtype_name(self) -> str:
        return _DTYPE_NAMES[self.dtype]

    @property
    def kernel_name(self) -> str:
        """A descriptive function name, so kernels are recognisable in profiler traces."""
        parts = ["up_proj", self.activation]
        if self.gated:
            parts.append("gated")
        if self.has_bias:
            parts.append("bias")
        parts.append(self.dtype_name)
        return "_".join(parts) + "_kernel"

    def canonical(self) -> str:
        """A stable, explicit string of every field (independent of dataclass repr details)."""
        return (
            f"UpProjectionSpec(activation={self.activation},gated={int(self.gated)},"
            f"has_bias={int(self.has_bias)},dtype={self.dtype_name})"
        )


def spec_key(spec, salt: str = "") -> str:
    """sha256 hex digest of the spec's canonical string (plus an optional salt such as a
    template digest, so that editing a template never reuses a stale cached file)."""
    return hashlib.sha256(f"{spec.canonical()}|{salt}".encode()).hexdigest()
