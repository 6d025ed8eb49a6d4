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


# ---------------------------------------------------------------------------------------------
# `allowed` masks of the selection ops (pq_select, qk_select, *_blocks): bool, 4 dims, broadcastable
# to [B, H, Lq, Lk]; key j is a candidate for query i of head h iff allowed[b, h, i, j] (and j <= i + Lk - Lq if causal: bottom-right, sparsify/ops/causal.py)
# ---------------------------------------------------------------------------------------------

RANDOM_ALLOWED = (None, "keys", "rows", "heads", "shared")
STRUCTURED_ALLOWED = ("window", "packed", "kv_cache")


def random_allowed(g, kind, b, h, lq, lk, p=0.7):
    """A random mask: None; "keys" [B, 1, 1, Lk] (key padding); "rows" [B, 1, Lq, Lk] (an HF mask);
    "heads" [B, H, Lq, Lk] (per-head); "shared" [1, 1, Lq, Lk] (one mask for the whole batch)."""
    shape = {None: None, "keys": (b, 1, 1, lk), "rows": (b, 1, lq, lk), "heads": (b, h, lq, lk),
             "shared": (1, 1, lq, lk)}[kind]
    return None if shape is None else torch.rand(shape, generator=g) < p


def structured_allowed(kind, b, lq, lk, window=3):
    """[B, 1, Lq, Lk] masks with the structure of real HF masks, every query row keeping at least one key:
      "window":   sliding window, causal aligned bottom-right: 0 <= (i + Lk - Lq) - j < window;
      "packed":   block-diagonal packing (Lq == Lk): causal within each packed sequence; batch row bi packs
                  sequences of length 3 + bi (the last one cut short);
      "kv_cache": a KV-cache decode step (Lq < Lk): causal aligned bottom-right, j <= i + Lk - Lq, and batch
                  row 1 left-padded (its first min(2, Lk - Lq) keys masked)."""
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    offset = lk - lq
    if kind == "window":
        rel = i + offset - j
        mask = ((rel >= 0) & (rel < window)).expand(b, lq, lk)
    elif kind == "packed":
        if lq != lk:
            raise ValueError(f"packed masks need Lq == Lk, got {lq}, {lk}")
        seg = torch.stack([torch.arange(lq) // (3 + bi) for bi in range(b)])    # [B, L] sequence id
        mask = (seg[:, :, None] == seg[:, None, :]) & (j <= i)
    elif kind == "kv_cache":
        if not lq < lk:
            raise ValueError(f"kv_cache masks need Lq < Lk, got {lq}, {lk}")
        mask = (j <= i + offset).expand(b, lq, lk).clone()
        if b > 1:
            mask[1, :, :min(2, offset)] = False
    else:
        raise ValueError(f"unknown structured mask {kind!r}; valid: {STRUCTURED_ALLOWED}")
    assert mask.any(-1).all(), "every query row keeps a key"
    return mask[:, None].contiguous()


def allowed_at(allowed, b, h, lq, lk):
    """`allowed` broadcast to [B, H, Lq, Lk] (all True when None): index [b, h, i, j] in brute-force loops."""
    if allowed is None:
        return torch.ones(b, h, lq, lk, dtype=torch.bool)
    return allowed.expand(b, h, lq, lk)
