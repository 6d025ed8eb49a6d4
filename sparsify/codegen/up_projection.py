"""The fused up-projection family: ``act(x @ W^T + b)``, or gated ``act(x @ Wg^T + bg) * (x @ Wu^T + bu)``.

    UpProjectionSpec, kernel_source(spec), kernel_key(spec), get_kernel(spec)
    up_projection(x2d, w, b=None, activation="gelu", w_gate=None, b_gate=None) -> [T, N]

Source: templates.py (string.Template snippets: the gated and bias forms change the kernel's parameters).
Generated, cached and loaded through kernel.py like every family. On a GPU, triton.autotune picks the block
configuration per (token-count bucket, N, K).
"""

from __future__ import annotations

import dataclasses

import torch

from ..tables import ACTIVATIONS as _ACTIVATION_FUNCTIONS, KERNEL_DTYPES as SUPPORTED_DTYPES
from . import templates as T
from .kernel import GeneratedKernel, KernelSpec, TileConfig, load_kernel, size_bucket, templates_digest

ACTIVATIONS = tuple(_ACTIVATION_FUNCTIONS)  # the names (sparsify/tables.py); Triton sources: templates.py

_TEMPLATE_DIGEST = templates_digest(vars(T))


@dataclasses.dataclass(frozen=True)
class UpProjectionSpec(KernelSpec):
    """``act(x @ W^T + b)``, or gated ``act(x @ Wg^T + bg) * (x @ Wu^T + bu)``."""

    family = "up_projection"

    activation: str
    gated: bool = False
    has_bias: bool = True
    dtype: torch.dtype = torch.float16

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.activation!r}; expected one of {ACTIVATIONS}")
        super().__post_init__()

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


def _check_spec(spec):
    if not isinstance(spec, UpProjectionSpec):
        raise ValueError(f"expected an UpProjectionSpec, got {type(spec).__name__}")


def kernel_key(spec: UpProjectionSpec) -> str:
    """The cache key (sha256 hex) of a spec's kernel."""
    _check_spec(spec)
    return spec.key(_TEMPLATE_DIGEST)


def kernel_source(spec: UpProjectionSpec) -> str:
    """The Triton source generated for ``spec`` (pure: no file, no triton import)."""
    _check_spec(spec)
    dot_kwargs = T.DOT_KWARGS_FP32 if spec.dtype_name == "fp32" else ""
    gated = spec.gated

    if gated:
        act = T.ACTIVATIONS[spec.activation].substitute(v="acc_g")
        epilogue = T.EPILOGUE_GATED.substitute(act=act)
    else:
        act = T.ACTIVATIONS[spec.activation].substitute(v="acc")
        epilogue = T.EPILOGUE_PLAIN.substitute(act=act)

    if spec.has_bias:
        bias_params = T.BIAS_PARAMS.substitute(gate_bias_param=T.GATE_BIAS_PARAM if gated else "")
        bias = T.BIAS_LOAD.substitute(gate=T.GATE_BIAS_LOAD if gated else "")
    else:
        bias_params = bias = ""

    return T.UP_PROJECTION.substitute(
        spec=spec.canonical(),
        key=kernel_key(spec),
        kernel_name=spec.kernel_name,
        dot_kwargs=dot_kwargs,
        gate_params=T.GATE_PARAMS if gated else "",
        bias_params=bias_params,
        gate_stride_params=T.GATE_STRIDE_PARAMS if gated else "",
        gate_ptrs=T.GATE_PTRS if gated else "",
        gate_acc_init=T.GATE_ACC_INIT if gated else "",
        gate_dot=T.GATE_DOT.substitute(dot_kwargs=dot_kwargs) if gated else "",
        gate_advance=T.GATE_ADVANCE if gated else "",
        bias=bias,
        epilogue=epilogue,
    )


def get_kernel(spec: UpProjectionSpec) -> GeneratedKernel:
    """The kernel for ``spec``: generated, written and imported on first use, then served from memory (same
    spec -> same object, no re-generation)."""
    _check_spec(spec)
    return load_kernel(spec, lambda: kernel_source(spec), _TEMPLATE_DIGEST)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Block configs (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). On the GPU the autotuner (kernel.py
# launch_tuned) picks one per (T bucket, N, K); the small-M config serves decode batches.
_GPU_CONFIGS = tuple(TileConfig.of(w, s, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k) for m, n, k, w, s in (
    (32, 64, 64, 4, 4),
    (64, 64, 32, 4, 3),
    (128, 64, 32, 4, 3),
    (128, 128, 32, 8, 3),
))
# The interpreter runs every program in Python: one small config (tl.dot needs >= 16).
_INTERPRET_CONFIGS = (TileConfig.of(1, 1, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16),)


def _check_matrix(name, t, shape, x):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if t.dtype != x.dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected the dtype of x ({x.dtype})")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device}, expected the device of x ({x.device})")


def up_projection(x2d, w, b=None, activation="gelu", w_gate=None, b_gate=None):
    """``act(x2d @ w^T + b)``, or with ``w_gate``: ``act(x2d @ w_gate^T + b_gate) * (x2d @ w^T + b)``.

    x2d: [T, K]; w, w_gate: [N, K] with any strides; b, b_gate: [N] or None
    (in the gated form both biases are given or neither). Returns a contiguous
    [T, N] tensor of x2d's dtype; products are accumulated in fp32.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {activation!r}; expected one of {ACTIVATIONS}")
    if not isinstance(x2d, torch.Tensor) or x2d.dim() != 2:
        raise ValueError(f"x2d must be a 2-D tensor [T, K], got {getattr(x2d, 'shape', type(x2d))}")
    if x2d.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"unsupported dtype {x2d.dtype}; expected one of {tuple(str(d) for d in SUPPORTED_DTYPES)}"
        )
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"w must be a 2-D tensor [N, K], got {getattr(w, 'shape', type(w))}")
    T, K = x2d.shape
    N = w.shape[0]
    _check_matrix("w", w, (N, K), x2d)
    gated = w_gate is not None
    if gated:
        _check_matrix("w_gate", w_gate, (N, K), x2d)
        if (b is None) != (b_gate is None):
            raise ValueError("gated up-projection: give both biases (b and b_gate) or neither")
    elif b_gate is not None:
        raise ValueError("b_gate given without w_gate")
    has_bias = b is not None
    if has_bias:
        _check_matrix("b", b, (N,), x2d)
        if gated:
            _check_matrix("b_gate", b_gate, (N,), x2d)

    spec = UpProjectionSpec(activation=activation, gated=gated, has_bias=has_bias, dtype=x2d.dtype)
    y = torch.empty((T, N), dtype=x2d.dtype, device=x2d.device)
    if T == 0 or N == 0:
        return y

    kernel = get_kernel(spec)
    kernel.check_device(x2d)

    args = dict(
        x_ptr=x2d, w_ptr=w, y_ptr=y, T=T, N=N, K=K,
        stride_xm=x2d.stride(0), stride_xk=x2d.stride(1),
        stride_wn=w.stride(0), stride_wk=w.stride(1),
        stride_ym=y.stride(0), stride_yn=y.stride(1),
    )
    if gated:
        args.update(wg_ptr=w_gate, stride_wgn=w_gate.stride(0), stride_wgk=w_gate.stride(1))
    if has_bias:
        args["b_ptr"] = b.contiguous()  # the kernel indexes biases with unit stride
        if gated:
            args["bg_ptr"] = b_gate.contiguous()

    grid = lambda meta: (_cdiv(T, meta["BLOCK_M"]), _cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    kernel.launch_tuned(grid, _INTERPRET_CONFIGS if kernel.interpret else _GPU_CONFIGS, key=("N", "K"),
                        bucket=size_bucket(T), **args)
    return y
