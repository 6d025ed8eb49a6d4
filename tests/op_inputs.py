"""Small input builders and checks shared by the op test files (seeded, CPU, float64-drawn)."""
import torch
from hypothesis import HealthCheck

HYP = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ZERO_SEED = torch.zeros((), dtype=torch.int64)  # the seed argument of ops run without dropout


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, dtype=torch.float32, requires_grad=False):
    """Normal draws made in float64 and cast, so every dtype sees the same values."""
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)


def qkv(g, b, h, hkv, lq, lk, d, dv=None, dtype=torch.float32, requires_grad=True):
    """q [B, H, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv]."""
    return (randn(g, b, h, lq, d, dtype=dtype, requires_grad=requires_grad),
            randn(g, b, hkv, lk, d, dtype=dtype, requires_grad=requires_grad),
            randn(g, b, hkv, lk, dv or d, dtype=dtype, requires_grad=requires_grad))


def opcheck_ok(result) -> bool:
    """torch.library.opcheck's result: every check passed."""
    return bool(result) and all(r == "SUCCESS" for r in result.values())
