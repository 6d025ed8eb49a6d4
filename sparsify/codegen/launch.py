"""The callable entry points: validate arguments, build the spec, launch the kernel."""

from __future__ import annotations

import torch

from .emitter import get_kernel
from .spec import ACTIVATIONS, SUPPORTED_DTYPES, UpProjectionSpec


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
    if x2d.device.type == "cpu" and not kernel.interpret:
        raise RuntimeError(
            "sparsify.codegen kernels need a GPU tensor, or TRITON_INTERPRET=1 for CPU tensors"
        )

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
    kernel.launch(grid, **args)
    return y
