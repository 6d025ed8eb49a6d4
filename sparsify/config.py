"""Configuration: one dataclass per region kind, nested in SparsifyConfig.

`options=` of torch.compile takes either a SparsifyConfig or a dict with the same field names
(nested dicts for the nested dataclasses; a section may also be just its method name,
{"attention": "spt"}, or None for its defaults). Every field carries its own check in its metadata
(`field(metadata={"check": ...})`), and each dataclass runs them all in __post_init__, so a bad
value fails when the options are made -- by from_options, direct construction or
dataclasses.replace alike -- with a message that names the field path and what is valid.
The sparse methods add their own values to `method` and their own fields to these classes.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

# A check takes (value, the config that holds it, the field's path) and returns the value to store
# (normalised: 1 -> 1.0 for a float field, a path -> str, a pattern -> a tuple), or raises.
Check = Callable[[Any, Any, str], Any]


def _invalid(kind: type, where: str, value: Any, valid: str) -> Exception:
    return kind(f"sparsify: {where}={value!r} is not valid; {valid}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # True is an int in Python


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _checked(default: Any, check: Check):
    return field(default=default, metadata={"check": check})


def _choice(default: str, *choices: str):
    """A field restricted to `choices` (the default first)."""
    allowed = (default, *choices)

    def check(value, config, where):
        if not isinstance(value, str) or value not in allowed:
            raise _invalid(ValueError, where, value, f"choose one of {list(allowed)}")
        return value
    return field(default=default, metadata={"check": check, "choices": allowed})


def _integer(default: int, low: int, high: Optional[str] = None, among: Optional[tuple] = None):
    """An int (a bool, float or string is refused) >= low, <= the config's field named `high`, in `among`."""
    def check(value, config, where):
        bound = None if high is None else getattr(config, high)
        valid = (f"must be one of {list(among)}" if among else
                 f"must be an int in [{low}, {high}={bound}]" if high else f"must be an int >= {low}")
        if not _is_int(value):
            raise _invalid(TypeError, where, value, valid)
        if value < low or (bound is not None and value > bound) or (among and value not in among):
            raise _invalid(ValueError, where, value, valid)
        return int(value)
    return _checked(default, check)


def _real(default: float, low: float, high: float = math.inf, low_open: bool = False):
    """A finite real number (an int is accepted; a bool or string is not) in [low, high], or (low, high]."""
    if high < math.inf:
        valid = f"must be a real number in {'(' if low_open else '['}{low:g}, {high:g}]"
    else:
        valid = f"must be a finite real number {'>' if low_open else '>='} {low:g}"

    def check(value, config, where):
        if not _is_real(value):
            raise _invalid(TypeError, where, value, valid)
        in_range = (low < value if low_open else low <= value) and value <= high  # False for NaN
        if not (in_range and math.isfinite(value)):
            raise _invalid(ValueError, where, value, valid)
        return float(value)
    return _checked(default, check)


def _boolean(default: bool):
    def check(value, config, where):
        if not isinstance(value, bool):
            raise _invalid(TypeError, where, value, "must be True or False")
        return value
    return _checked(default, check)


def _section(section: type):
    """A nested config: an instance, a dict of its fields, its method name alone, or None (its defaults)."""
    methods = section.__dataclass_fields__["method"].metadata["choices"]

    def check(value, config, where):
        if value is None:
            return section()
        if isinstance(value, str):  # the shorthand {"attention": "spt"}; a bad name lists the valid ones
            return section(method=value)
        if isinstance(value, Mapping):
            return _from_mapping(section, value)
        if isinstance(value, section):
            validate(value)  # it may have been changed since it was made
            return value
        raise _invalid(TypeError, where, value, f"must be a dict of {section.__name__} fields, "
                                                f"a method name {list(methods)}, None or an instance of {section.__name__}")
    return field(default_factory=section, metadata={"check": check})


def _dump_path(value, config, where):
    if value is None:
        return os.environ.get("SPARSIFY_DUMP") or None
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(path, str):
        raise _invalid(TypeError, where, value, "must be a directory path (str or os.PathLike) or None")
    return path


def _patterns(value, config, where):
    valid = "must be an fnmatch pattern string or a list of them"
    if isinstance(value, str):  # one pattern: iterating it would make each character a pattern ("*" among them)
        return (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise _invalid(TypeError, where, value, valid) from None
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise _invalid(TypeError, where, value, f"{valid}; {pattern!r} is not a string")
    return patterns


class _Checked:
    """Runs every field's check when the config is made (construction, from_options, dataclasses.replace)."""
    options_path = "options"  # where the config sits in the options, for the messages

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class AttentionConfig(_Checked):
    """What every attention region is rewritten into.

    method: "dense" -> sparsify::attention with dense semantics; "spt" -> SPT sparse attention
    (product-quantized top-L keys per query, papers.md section 1; needs sparsify.prepare() first,
    which creates the learned codebooks); "off" -> leave the region as the model wrote it (it is
    still found and reported).

    The remaining fields configure "spt":
    keep:          fraction of keys each query attends to, in (0, 1]; L = ceil(keep * n) (default 1/8)
    subspace_dim:  dims per PQ sub-vector d_c, an int >= 1 (head_dim must be a multiple)
    codewords:     codewords E per subspace, an int >= 2
    codebook_loss: weight of the PQ codebook loss (finite, >= 0), added to the gradient of the task loss
    min_seq:       regions with fewer keys stay dense (sparsity does not pay below it); an int >= 0
    granularity:   "token" (top-L keys per query) or "block" (top key blocks per query block)
    block_size:    query/key block size of the block granularity: 16, 32, 64 or 128 (the block kernels' tiles)
    score:         how keys are ranked: "codes" (SPT: the number of matching PQ codes; cheap integer
                   work, needs the codebook) or "exact" (the true q . k, as top-k attention does: one
                   Q K^T in the forward, no codebook, no codebook loss; keeps the quality where the
                   codes' recall is low, e.g. head_dim 32 -> only 4 subspaces)
    """
    options_path = "options.attention"
    method: str = _choice("dense", "spt", "off")
    keep: float = _real(0.125, low=0.0, high=1.0, low_open=True)
    subspace_dim: int = _integer(8, low=1)
    codewords: int = _integer(16, low=2)
    codebook_loss: float = _real(1e-2, low=0.0)
    min_seq: int = _integer(128, low=0)
    granularity: str = _choice("token", "block")
    block_size: int = _integer(64, low=1, among=(16, 32, 64, 128))
    score: str = _choice("codes", "exact")


SparseAttention = AttentionConfig  # the SPT method's settings live on the attention config


@dataclass
class MLPConfig(_Checked):
    """What every MLP region is rewritten into.

    method: "dense" -> sparsify::mlp; "routed" -> SPT's routed FFN (papers.md section 1: each token
    runs through top_k of `blocks` neuron blocks chosen by a learned router; needs
    sparsify.prepare() first, which creates the routers); "off" -> untouched.

    The remaining fields configure "routed":
    blocks:      neuron blocks the FFN's hidden dimension is split into, an int >= 1 (d_ff must
                 divide: checked per model when the plan is made)
    top_k:       blocks each token runs through, an int in [1, blocks]
    gate:        "sigmoid2p" (SPT: the kept blocks' frozen path is scaled by 2p, which is how the
                 router learns) or "none" (equals the dense FFN when top_k == blocks)
    block_order: "contiguous" (SPT) or "clustered" (MoEfication: neurons grouped by balanced
                 k-means on their up-projection rows)
    """
    options_path = "options.mlp"
    method: str = _choice("dense", "routed", "off")
    blocks: int = _integer(4, low=1)
    top_k: int = _integer(2, low=1, high="blocks")  # checked after blocks (fields run in order)
    gate: str = _choice("sigmoid2p", "none")
    block_order: str = _choice("contiguous", "clustered")


RoutedFFN = MLPConfig  # the routed method's settings live on the MLP config


@dataclass
class SparsifyConfig(_Checked):
    """Top-level options of the "sparsify" backend.

    attention, mlp: the per-kind rewrite (see AttentionConfig, MLPConfig): an instance, a dict of its
             fields, its method name alone ("spt" means {"method": "spt"}) or None (the defaults).
    inner:   the compiler for everything after our passes: "inductor" (default), "aot_eager"
             (AOTAutograd without codegen: fast to compile, for tests and debugging) or "eager".
    strict:  a region that cannot be rewritten raises (naming its module) instead of staying dense.
    dump:    a directory (str or os.PathLike) for graphs before/after the passes, the match table and
             the plan (None: $SPARSIFY_DUMP, if set).
    exclude: fnmatch patterns of module paths whose regions are left untouched (e.g. "decoder.*"):
             one pattern string or a list of them.
    """
    attention: AttentionConfig = _section(AttentionConfig)
    mlp: MLPConfig = _section(MLPConfig)
    inner: str = _choice("inductor", "aot_eager", "eager")
    strict: bool = _boolean(False)
    dump: Optional[str] = _checked(None, _dump_path)
    exclude: tuple[str, ...] = _checked((), _patterns)

    @classmethod
    def from_options(cls, options: Union["SparsifyConfig", Mapping[str, Any], None]) -> "SparsifyConfig":
        if options is None:
            return cls()
        if isinstance(options, cls):
            validate(options)  # it may have been changed since it was made
            return options
        if not isinstance(options, Mapping):
            raise TypeError(f"sparsify: options must be a dict or a SparsifyConfig, not {type(options).__name__}")
        return _from_mapping(cls, options)


def _from_mapping(cls, values: Mapping[str, Any]):
    """cls(**values), after refusing keys that are not its fields (the fields' checks do the rest)."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names), key=str)
    if unknown:
        raise ValueError(f"sparsify: unknown key(s) {unknown} in {cls.options_path}; valid keys: {sorted(names)}")
    return cls(**values)


def validate(config: Any) -> None:
    """Run each field's check in field order, storing the normalised value (see Check)."""
    for f in dataclasses.fields(config):
        value = f.metadata["check"](getattr(config, f.name), config, f"{config.options_path}.{f.name}")
        object.__setattr__(config, f.name, value)
