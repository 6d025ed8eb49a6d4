"""Configuration: one dataclass per region kind, nested in SparsifyConfig.

`options=` of torch.compile takes either a SparsifyConfig or a dict with the same field names
(nested dicts for the nested dataclasses). Anything unknown fails at once and lists what is valid.
The sparse methods add their own values to `method` and their own fields to these classes.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union


def _choice(default: str, *choices: str):
    """A string field restricted to `choices` (checked by SparsifyConfig.validate)."""
    return field(default=default, metadata={"choices": (default, *choices)})


@dataclass
class AttentionConfig:
    """What every attention region is rewritten into.

    method: "dense" -> sparsify::attention with dense semantics; "spt" -> SPT sparse attention
    (product-quantized top-L keys per query, papers.md section 1; needs sparsify.prepare() first,
    which creates the learned codebooks); "off" -> leave the region as the model wrote it (it is
    still found and reported).

    The remaining fields configure "spt":
    keep:          fraction of keys each query attends to, L = ceil(keep * n) (default 1/8)
    subspace_dim:  dims per PQ sub-vector d_c (head_dim must be a multiple)
    codewords:     codewords E per subspace
    codebook_loss: weight of the PQ codebook loss, added to the gradient of the task loss
    min_seq:       regions with fewer keys stay dense (sparsity does not pay below it)
    granularity:   "token" (top-L keys per query) or "block" (top key blocks per query block)
    block_size:    query/key block size of the block granularity
    score:         how keys are ranked: "codes" (SPT: the number of matching PQ codes; cheap integer
                   work, needs the codebook) or "exact" (the true q . k, as top-k attention does: one
                   Q K^T in the forward, no codebook, no codebook loss; keeps the quality where the
                   codes' recall is low, e.g. head_dim 32 -> only 4 subspaces)
    """
    method: str = _choice("dense", "spt", "off")
    keep: float = 0.125
    subspace_dim: int = 8
    codewords: int = 16
    codebook_loss: float = 1e-2
    min_seq: int = 128
    granularity: str = _choice("token", "block")
    block_size: int = 64
    score: str = _choice("codes", "exact")


SparseAttention = AttentionConfig  # the SPT method's settings live on the attention config


@dataclass
class MLPConfig:
    """What every MLP region is rewritten into.

    method: "dense" -> sparsify::mlp; "routed" -> SPT's routed FFN (papers.md section 1: each token
    runs through top_k of `blocks` neuron blocks chosen by a learned router; needs
    sparsify.prepare() first, which creates the routers); "off" -> untouched.

    The remaining fields configure "routed":
    blocks:      neuron blocks the FFN's hidden dimension is split into (d_ff must divide)
    top_k:       blocks each token runs through
    gate:        "sigmoid2p" (SPT: the kept blocks' frozen path is scaled by 2p, which is how the
                 router learns) or "none" (equals the dense FFN when top_k == blocks)
    block_order: "contiguous" (SPT) or "clustered" (MoEfication: neurons grouped by balanced
                 k-means on their up-projection rows)
    """
    method: str = _choice("dense", "routed", "off")
    blocks: int = 4
    top_k: int = 2
    gate: str = _choice("sigmoid2p", "none")
    block_order: str = _choice("contiguous", "clustered")


RoutedFFN = MLPConfig  # the routed method's settings live on the MLP config


@dataclass
class SparsifyConfig:
    """Top-level options of the "sparsify" backend.

    attention, mlp: the per-kind rewrite (see AttentionConfig, MLPConfig).
    inner:   the compiler for everything after our passes: "inductor" (default), "aot_eager"
             (AOTAutograd without codegen: fast to compile, for tests and debugging) or "eager".
    strict:  a region that cannot be rewritten raises (naming its module) instead of staying dense.
    dump:    a directory for graphs before/after the passes, the match table and the plan
             (defaults to $SPARSIFY_DUMP).
    exclude: fnmatch patterns of module paths whose regions are left untouched (e.g. "decoder.*").
    """
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    inner: str = _choice("inductor", "aot_eager", "eager")
    strict: bool = False
    dump: Optional[str] = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.dump is None:
            self.dump = os.environ.get("SPARSIFY_DUMP") or None
        self.exclude = tuple(self.exclude)
        validate(self)

    @classmethod
    def from_options(cls, options: Union["SparsifyConfig", Mapping[str, Any], None]) -> "SparsifyConfig":
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, Mapping):
            raise TypeError(f"sparsify: options must be a dict or a SparsifyConfig, not {type(options).__name__}")
        return _from_mapping(cls, options, path="options")


def _from_mapping(cls, values: Mapping[str, Any], path: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"sparsify: unknown key(s) {unknown} in {path}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        nested = fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        if nested is not None and dataclasses.is_dataclass(nested) and isinstance(value, Mapping):
            value = _from_mapping(nested, value, path=f"{path}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def validate(config: Any, path: str = "options") -> None:
    """Check every restricted field against its choices, recursing into nested configs."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        where = f"{path}.{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, where)
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ValueError(f"sparsify: {where}={value!r} is not valid; choose one of {list(f.metadata['choices'])}")
        elif f.type in ("bool",) and not isinstance(value, bool):
            raise ValueError(f"sparsify: {where} must be True or False, not {value!r}")
