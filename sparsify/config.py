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


def choice(default: str, *choices: str):
    """A field restricted to `choices` (the default first)."""
    allowed = (default, *choices)

    def check(value, config, where):
        if not isinstance(value, str) or value not in allowed:
            raise _invalid(ValueError, where, value, f"choose one of {list(allowed)}")
        return value
    return field(default=default, metadata={"check": check, "choices": allowed})


def integer(default: int, low: int, high: Optional[str] = None, among: Optional[tuple] = None):
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


def real(default: float, low: float, high: float = math.inf, low_open: bool = False):
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


def boolean(default: bool):
    def check(value, config, where):
        if not isinstance(value, bool):
            raise _invalid(TypeError, where, value, "must be True or False")
        return value
    return _checked(default, check)


def _section(section: type):
    """A nested config: an instance, a dict of its fields, its method name alone, or None (its defaults)."""
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
                                                f"a method name {list(section.method_names())}, None or an instance of {section.__name__}")
    return field(default_factory=section, metadata={"check": check})


def _dump_path(value, config, where):
    if value is None:
        return os.environ.get("SPARSIFY_DUMP") or None
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(path, str):
        raise _invalid(TypeError, where, value, "must be a directory path (str or os.PathLike) or None")
    return path


def patterns(default: tuple = ()):
    """fnmatch patterns of module paths: one pattern string or a list of them, stored as a tuple."""
    return _checked(tuple(default), _patterns)


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


def _method_field(default: str):
    """The section's `method`: a name from the registry (sparsify/methods), read when the value is checked so a
    method registered later is accepted; the default first, "off" last (leave the regions as written)."""
    def check(value, config, where):
        allowed = type(config).method_names()
        if not isinstance(value, str) or value not in allowed:
            raise _invalid(ValueError, where, value, f"choose one of {list(allowed)}")
        return value
    return field(default=default, metadata={"check": check})


class _Section(_Checked):
    """One region kind's options: `method` plus the fields of every method registered for the kind (each method's
    own options dataclass, added by sparsify.methods.register; the fields are flat: {"method": "spt", "keep": 0.5})."""
    kind = ""
    default_method = "dense"
    methods: tuple = ()  # registered method names of this kind, in registration order (the registry sets it)

    @classmethod
    def method_names(cls) -> tuple:
        return tuple(dict.fromkeys((cls.default_method, *cls.methods, "off")))


@dataclass
class AttentionConfig(_Section):
    """What every attention region is rewritten into.

    method: "dense" -> sparsify::attention with dense semantics; "spt" -> SPT sparse attention (its fields:
    sparsify/methods/spt.py SPTOptions); "off" -> leave the region as the model wrote it (it is still found and
    reported). The other fields belong to the registered methods (see their options classes).
    """
    options_path = "options.attention"
    kind = "attention"
    method: str = _method_field("dense")


@dataclass
class MLPConfig(_Section):
    """What every MLP region is rewritten into.

    method: "dense" -> sparsify::mlp; "routed" -> SPT's routed FFN (its fields: sparsify/methods/routed.py
    RoutedOptions); "off" -> untouched.
    """
    options_path = "options.mlp"
    kind = "mlp"
    method: str = _method_field("dense")


@dataclass
class LinearConfig(_Section):
    """What every projection (Linear, GPT-2's Conv1D, a peft LoRA-wrapped Linear) is rewritten into.

    method: "off" (the default: projections are left to Inductor and cuBLAS, and not listed in the report) or a
    registered linear method. A block method that rewrites a whole MLP and a linear method cannot both own its
    projections: the plan raises naming both; the dense block rewrite yields to a linear method.
    """
    options_path = "options.linear"
    kind = "linear"
    default_method = "off"
    method: str = _method_field("off")


SECTIONS = {"attention": AttentionConfig, "mlp": MLPConfig, "linear": LinearConfig}  # by region kind
SparseAttention = AttentionConfig  # the SPT method's settings live on the attention config
RoutedFFN = MLPConfig  # the routed method's settings live on the MLP config


def add_options(section: type, options: type, method: str) -> None:
    """Add the fields of a method's options dataclass to `section` (in place: the public class stays the same
    object, so instances and isinstance checks made before keep working). A field another method already
    declared must be the same field (same default and check), else this raises naming both."""
    fields = {f.name: f for f in dataclasses.fields(section)}
    if "_field_owners" not in section.__dict__:
        section._field_owners = {}  # field name -> the method that declared it
    owners = section._field_owners
    for f in dataclasses.fields(options):
        if "check" not in f.metadata:
            raise TypeError(f"sparsify: {options.__name__}.{f.name} has no check; declare it with "
                            "sparsify.config.choice/integer/real/boolean")
        if f.name in fields:
            same = (f.default == fields[f.name].default and f.metadata["check"] is fields[f.name].metadata["check"])
            if not same:
                raise ValueError(f"sparsify: method {method!r} declares {section.options_path}.{f.name}, which method "
                                 f"{owners.get(f.name, '?')!r} declares differently; rename one of them")
            continue
        fields[f.name] = f
        owners[f.name] = method
    _redeclare(section, list(fields.values()))


def remove_options(section: type, method: str) -> None:
    """Undo add_options for a method being unregistered (the fields only it declared)."""
    owners = section.__dict__.get("_field_owners", {})
    kept = [f for f in dataclasses.fields(section) if owners.get(f.name) != method]
    for name in [n for n, owner in owners.items() if owner == method]:
        del owners[name]
    _redeclare(section, kept)


def _redeclare(section: type, fields: list) -> None:
    """Re-run @dataclass on `section` with `fields`: dataclasses has no API to add a field to an existing class,
    so the generated methods are removed and the class is processed again (with fresh Field objects carrying the
    same default and metadata)."""
    for name in ("__init__", "__repr__", "__eq__", "__match_args__", "__dataclass_fields__", "__dataclass_params__"):
        if name in section.__dict__:
            delattr(section, name)
    for name in list(section.__dict__.get("__annotations__", {})):
        if name not in {f.name for f in fields} and name in section.__dict__:
            delattr(section, name)
    section.__annotations__ = {f.name: f.type for f in fields}
    for f in fields:
        setattr(section, f.name, field(default=f.default, default_factory=f.default_factory, metadata=f.metadata))
    dataclass(section)


@dataclass
class SparsifyConfig(_Checked):
    """Top-level options of the "sparsify" backend.

    attention, mlp, linear: the per-kind rewrite (AttentionConfig, MLPConfig, LinearConfig): an instance, a dict
             of its fields, its method name alone ("spt" means {"method": "spt"}) or None (the defaults).
    inner:   the compiler for everything after our passes: "inductor" (default), "aot_eager"
             (AOTAutograd without codegen: fast to compile, for tests and debugging) or "eager".
    strict:  a region that cannot be rewritten, or a module named like a block in which no pattern was recognised,
             raises (naming its module) instead of staying as written.
    dump:    a directory (str or os.PathLike) for graphs before/after the passes, the match table and
             the plan (None: $SPARSIFY_DUMP, if set).
    exclude: fnmatch patterns of module paths whose regions are left untouched (e.g. "decoder.*"):
             one pattern string or a list of them.
    """
    attention: AttentionConfig = _section(AttentionConfig)
    mlp: MLPConfig = _section(MLPConfig)
    linear: LinearConfig = _section(LinearConfig)
    inner: str = choice("inductor", "aot_eager", "eager")
    strict: bool = boolean(False)
    dump: Optional[str] = _checked(None, _dump_path)
    exclude: tuple[str, ...] = patterns(())

    def __post_init__(self) -> None:
        validate(self)
        _across_sections(self)

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


def _across_sections(config: "SparsifyConfig") -> None:
    """Checks that read two sections: HSA's active="ultra" follows MST's phases (options.linear)."""
    attention = config.attention
    if attention.method == "hsa" and attention.active == "ultra" and config.linear.method != "mst":
        raise ValueError("sparsify: options.attention.active='ultra' is not valid with options.linear.method="
                         f"{config.linear.method!r}: it follows MST's ultra-sparse phase; set options.linear.method="
                         "'mst' (with its total_steps) or options.attention.active='always'")


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
