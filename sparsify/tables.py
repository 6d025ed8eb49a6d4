"""The tables every layer shares, defined once (a leaf module: it imports only torch, so the kernel layer may
import it without importing anything above it).

ACTIVATIONS:   name -> the elementwise torch function. The ops' references compute with it, the region finder
               names a spelled-out activation by probing against it, codegen's Triton sources
               (codegen/templates.py) and the routed backward's derivatives are keyed by the same names
               (tests check that the key sets agree).
KERNEL_DTYPES: the floating dtypes the sparse ops and their kernels take (inputs, weights and outputs share one;
               accumulation is fp32). DTYPE_NAMES: their short names in kernel names and cache keys.
"""
import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "gelu": lambda t: F.gelu(t),
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),  # CLIP's GELU approximation
    "relu2": lambda t: torch.square(F.relu(t)),  # squared ReLU (Primer; Persimmon, Nemotron, Arcee, Jais2)
}

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
