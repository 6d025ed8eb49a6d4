"""The kernel layer's core, shared by every kernel family: spec base, generated-kernel wrapper, loader and cache.

    KernelSpec          base of every spec (a frozen dataclass): the choices that change the generated source
    GeneratedKernel     one generated module: spec, key, source, file and its ``@triton.jit`` entry points
    load_kernel(spec, make_source, salt)   generate -> write -> import on first use, then serve from memory
    cache_info(), clear_cache(), cache_dir(), interpret_mode()

A family (up_projection.py, grouped_gemm.py, pq_kernels.py, spt_attention_source.py) is a spec class, a source
function and its launchers; it goes through ``load_kernel`` and never keeps a cache of its own.

Why files: ``@triton.jit`` (and the interpreter) read the kernel's source through ``inspect``, which needs a real
file. Each generated kernel is written once to ``$SPARSIFY_CACHE_DIR`` (default ``~/.cache/sparsify/kernels``) as
``<key>.py`` and imported with importlib.

Why kernels are built lazily: in Triton (checked on 3.9) ``TRITON_INTERPRET`` is read when ``@triton.jit``
*decorates* a function, not at launch. Kernels are therefore only materialised on first use (this package imports
triton only then), and the in-memory cache is keyed on (spec key, interpreter mode), so a process that flips the
mode (a test suite) never reuses a kernel built for the other mode.

Templates versus ``tl.constexpr``: a spec field that only switches a branch inside one kernel body is better a
``tl.constexpr`` argument (Triton specialises on it; one source serves every value, see pq_kernels.py's CAUSAL /
HAS_MASK). Template text stays where a choice changes the kernel's parameter list or composes snippets (LoRA,
gated, mask-gradient stores).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from collections import namedtuple
from pathlib import Path
from string import Template
from typing import ClassVar

import torch

from ..tables import DTYPE_NAMES, KERNEL_DTYPES

__all__ = ["KernelSpec", "GeneratedKernel", "TileConfig", "load_kernel", "templates_digest", "cache_dir", "cache_info",
           "clear_cache", "interpret_mode", "autotune_enabled", "size_bucket", "tuned_configs", "CacheInfo"]


# --- specs -----------------------------------------------------------------------------------

def _canonical_value(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, torch.dtype):
        return DTYPE_NAMES.get(value, str(value).replace("torch.", ""))
    return str(value)


class KernelSpec:
    """Base of every kernel spec. Subclasses are frozen dataclasses holding every choice that changes the generated
    source and nothing else (shapes and strides are runtime arguments); equal specs give the same source, so the
    canonical string is what the cache is keyed on.

    Subclasses set ``family`` (cache-key salt and module-name prefix), ``entries`` (the jit functions a module
    defines: ``()`` for one function named ``kernel_name``, else suffixes such as ``("fwd", "bwd")`` for
    ``<kernel_name>_fwd`` / ``_bwd``) and ``kernel_name``; ``__post_init__`` here checks the bool fields and a
    ``dtype`` field, which every subclass' own checks extend."""

    family: ClassVar[str] = "kernel"
    entries: ClassVar[tuple] = ()
    dtypes: ClassVar[tuple] = KERNEL_DTYPES  # what a ``dtype`` field may hold

    def __post_init__(self):
        name = type(self).__name__
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            # numpy bools / 0-1 ints would make equal specs hash differently
            if f.type in ("bool", bool) and not isinstance(value, bool):
                raise ValueError(f"{name}.{f.name} must be a bool, got {value!r}")
            if f.name == "dtype" and value not in self.dtypes:
                raise ValueError(f"unsupported dtype {value}; expected one of {tuple(str(d) for d in self.dtypes)}")

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def kernel_name(self) -> str:
        """The jit function's name: "<family>_<dtype>_kernel" for a family with one source per dtype; a family with
        other fields names its variants itself."""
        if [f.name for f in dataclasses.fields(self)] == ["dtype"]:
            return f"{self.family}_{self.dtype_name}_kernel"
        raise NotImplementedError(f"{type(self).__name__} must name its kernel (kernel_name)")

    def canonical(self) -> str:
        """A stable, explicit string of every field (bools as 0/1, dtypes by short name)."""
        fields = ",".join(f"{f.name}={_canonical_value(getattr(self, f.name))}" for f in dataclasses.fields(self))
        return f"{type(self).__name__}({fields})"

    def key(self, salt: str = "") -> str:
        """sha256 hex of the canonical string, the family and a salt (the family's template digest, so an edited
        template or another sparsify version never reuses a stale cached file)."""
        return hashlib.sha256(f"{self.canonical()}|{self.family}|{salt}".encode()).hexdigest()


def templates_digest(*namespaces: dict) -> str:
    """Digest of the upper-case template strings (str, string.Template, or dicts of them) in the given namespaces:
    the salt of a family's cache keys."""
    parts = []
    for namespace in namespaces:
        for name, value in sorted(namespace.items()):
            if not name.isupper():
                continue
            if isinstance(value, dict):
                parts += sorted(f"{name}.{k}={getattr(v, 'template', v)}" for k, v in value.items())
            elif isinstance(value, (str, Template)):
                parts.append(f"{name}={getattr(value, 'template', value)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# --- tile configurations and autotuning -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One launch configuration: constexpr tile sizes and the warps / pipeline stages to compile them with."""

    constexprs: tuple  # ((name, value), ...): hashable, so a tuple of configs can key a memo
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def of(cls, num_warps: int = 4, num_stages: int = 3, **constexprs) -> "TileConfig":
        return cls(tuple(sorted(constexprs.items())), num_warps, num_stages)

    @property
    def kwargs(self) -> dict:
        return dict(self.constexprs)


def tile_configs(rows, names, pinned: dict | None = None) -> tuple:
    """A launch's TileConfigs from a family's candidate rows ``(*tiles, num_warps, num_stages)`` (tile values in the
    order of ``names``), the first row the default. ``pinned`` maps names to values a caller fixed (None: not fixed);
    when any is fixed, the one config is the default row with those values put in (no tuning)."""
    rows = tuple(rows)
    fixed = {k: v for k, v in (pinned or {}).items() if v is not None}
    unknown = set(fixed) - set(names)
    if unknown:
        raise ValueError(f"pinned tiles {sorted(unknown)} are not among this family's {list(names)}")
    if fixed:
        default = dict(zip(names, rows[0][:len(names)]))
        rows = ((*(fixed.get(k, default[k]) for k in names), *rows[0][len(names):]),)
    return tuple(TileConfig.of(*row[len(names):], **dict(zip(names, row[:len(names)]))) for row in rows)


def size_bucket(n: int, lo: int = 16, hi: int = 8192) -> int:
    """The next power of two of n, within [lo, hi]: an autotuning bucket for a size that changes call to call (a
    token count), so a new sequence length reuses the bucket's timing instead of timing again."""
    b = lo
    while b < n and b < hi:
        b *= 2
    return b


# The autotuner's timing function (triton.autotune's do_bench; None: Triton's GPU timer). The interpreter has no timer,
# so there launch_tuned runs the default config, unless a test sets one here to drive the tuned path on CPU (each
# config's timing runs then really run, which is what proves restore / reset right).
autotune_bench = None


def autotune_enabled() -> bool:
    """SPARSIFY_AUTOTUNE=0 pins every launch to its family's first (default) config: reproducible tiles, no timing
    runs on first use (CUDA-graph capture, profiling a fixed kernel)."""
    return os.environ.get("SPARSIFY_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


# --- the generated kernel --------------------------------------------------------------------

class GeneratedKernel:
    """A generated kernel module: its spec, key, source, file and ``@triton.jit`` entry points.

    ``fn`` is the single entry of one-function families; ``entry("fwd")`` those of multi-entry ones. ``launch``
    drops num_warps / num_stages under the interpreter (one Python "program" at a time: warps mean nothing)."""

    def __init__(self, spec: KernelSpec, key: str, source: str, path: Path, module, interpret: bool):
        self.spec, self.key, self.source, self.path, self.interpret = spec, key, source, path, interpret
        names = [spec.kernel_name] if not spec.entries else [f"{spec.kernel_name}_{e}" for e in spec.entries]
        self._entries = {e: getattr(module, n) for e, n in zip(spec.entries or (None,), names)}
        self._memo: dict = {}

    @property
    def fn(self):
        if None not in self._entries:
            raise AttributeError(f"{self.spec.kernel_name} has several entries {tuple(self._entries)}: use entry()")
        return self._entries[None]

    def entry(self, name: str):
        return self._entries[name]

    def memo(self, name, make):
        """A per-kernel derived object (an autotuner over ``fn``), made once."""
        if name not in self._memo:
            self._memo[name] = make()
        return self._memo[name]

    def launch(self, grid, *, entry: str | None = None, num_warps: int | None = None,
               num_stages: int | None = None, **kwargs):
        fn = self._entries[entry]
        options = {} if self.interpret else {
            k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v is not None}
        fn[grid](**kwargs, **options)

    def launch_tuned(self, grid, configs, *, entry: str | None = None, key=(), bucket=None, restore=(), reset=(),
                     **kwargs):
        """Launch with the fastest of ``configs`` (TileConfig, the first being the default): triton.autotune on a
        GPU, timed once per value of the ``key`` arguments and ``bucket`` (a caller's coarse size class, e.g. the
        next power of two of a token count, so a new sequence length does not re-time). Outputs that a kernel
        accumulates into need their value back between timing runs: ``restore`` names those that start from a
        value (a bias, an earlier partial sum), ``reset`` those that start from zero. Under the interpreter (no timer
        unless autotune_bench is set), with one config, or with SPARSIFY_AUTOTUNE=0, the first config runs.
        ``grid`` may be a function of the config's constexprs (Triton's ``grid(meta)``)."""
        unknown = [name for name in (*key, *restore, *reset) if name not in kwargs]
        if unknown:  # caught here, on every path, not first on a GPU by triton.autotune
            raise ValueError(f"{self.spec.kernel_name}: tuning names {unknown} are not arguments of this launch")
        if len(configs) == 1 or not autotune_enabled() or (self.interpret and autotune_bench is None):
            config = configs[0]
            meta = {**kwargs, **config.kwargs}
            self.launch(grid(meta) if callable(grid) else grid, entry=entry, num_warps=config.num_warps,
                        num_stages=config.num_stages, **meta)
            return
        configs, key, restore, reset = tuple(configs), tuple(key), tuple(restore), tuple(reset)

        def make():
            import triton

            return triton.autotune([triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                                    for c in configs], key=list(key), restore_value=list(restore) or None,
                                   reset_to_zero=list(reset) or None, do_bench=autotune_bench)(self._entries[entry])
        self.memo(TunedName(entry, configs, key, restore, reset, bucket, autotune_bench), make)[grid](**kwargs)

    def check_device(self, t: torch.Tensor) -> None:
        if t.device.type == "cpu" and not self.interpret:
            raise RuntimeError(f"sparsify {self.spec.family} kernels need a GPU tensor, or TRITON_INTERPRET=1 "
                               f"for CPU tensors")

    def __repr__(self):
        mode = "interpreter" if self.interpret else "jit"
        return f"GeneratedKernel({self.spec.kernel_name}, key={self.key[:12]}, {mode})"


# --- disk + import -----------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where generated sources are written (read from the environment on each call)."""
    d = os.environ.get("SPARSIFY_CACHE_DIR")
    return Path(d) if d else Path.home() / ".cache" / "sparsify" / "kernels"


def _write_source(path: Path, source: str) -> None:
    """Write ``source`` to ``path`` unless it already holds exactly that. Atomic (temp file in the same directory
    + os.replace) so concurrent processes never import a half-written file; racing writers write equal bytes."""
    try:
        if path.read_text() == source:
            return
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _import_file(path: Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before exec, like a normal import (inspect / pickling look modules up here)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def interpret_mode() -> bool:
    """Whether Triton would currently build interpreter kernels (TRITON_INTERPRET)."""
    try:
        from triton import knobs  # triton >= 3.4: honours programmatic overrides too

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# --- the one cache ---------------------------------------------------------------------------

CacheInfo = namedtuple("CacheInfo", "hits misses generated entries")
# A tuned launcher's memo name: one triton.autotune object per entry, config list, tuning arguments and size bucket
TunedName = namedtuple("TunedName", "entry configs key restore reset bucket bench")

_lock = threading.Lock()
_kernels: dict = {}  # (key, interpret) -> GeneratedKernel
_stats = {"hits": 0, "misses": 0, "generated": 0}


def load_kernel(spec: KernelSpec, make_source, salt: str = "") -> GeneratedKernel:
    """The kernel for ``spec``: on first use of (key, interpreter mode) generate ``make_source()``, write it to
    ``cache_dir()``, import it; afterwards serve the same object from memory. A distinct module per mode: the same
    file decorated under the other mode is a different kind of function object."""
    if not isinstance(spec, KernelSpec):
        raise ValueError(f"expected a KernelSpec, got {type(spec).__name__}")
    key = spec.key(salt)
    interpret = interpret_mode()
    with _lock:
        kernel = _kernels.get((key, interpret))
        if kernel is not None:
            _stats["hits"] += 1
            return kernel
        _stats["misses"] += 1
        source = make_source()
        _stats["generated"] += 1
        path = cache_dir() / f"{key}.py"
        _write_source(path, source)
        module = _import_file(path, f"_sparsify_{spec.family}_{key[:24]}_{'interp' if interpret else 'jit'}")
        kernel = GeneratedKernel(spec, key, source, path, module, interpret)
        _kernels[(key, interpret)] = kernel
        return kernel


def tuned_configs() -> list[dict]:
    """What the autotuner picked so far, per kernel: the entry, the launcher's size bucket, Triton's tuning key (the
    key arguments' values and the tensors' dtypes), the chosen tiles / warps / stages, and each config's timing in ms
    where Triton kept them (the last tuning of that launcher). Empty until a GPU launch has tuned (the interpreter
    runs the default config)."""
    with _lock:
        kernels = list(_kernels.values())
    rows = []
    for kernel in kernels:
        for name, tuner in list(kernel._memo.items()):
            if not isinstance(name, TunedName):
                continue
            entry, bucket = name.entry, name.bucket
            timings = {str(c): t for c, t in (getattr(tuner, "configs_timings", None) or {}).items()}
            for key, config in getattr(tuner, "cache", {}).items():
                rows.append({"kernel": kernel.spec.kernel_name, "entry": entry, "bucket": bucket,
                             "key": [str(k) for k in key], "config": dict(config.kwargs),
                             "num_warps": config.num_warps, "num_stages": config.num_stages,
                             "timings_ms": {c: [float(v) for v in t] if isinstance(t, (list, tuple)) else float(t)
                                            for c, t in timings.items()}})
    return rows


def cache_info() -> CacheInfo:
    """In-memory cache counters: hits, misses, sources generated, kernels held."""
    with _lock:
        return CacheInfo(_stats["hits"], _stats["misses"], _stats["generated"], len(_kernels))


def clear_cache() -> None:
    """Drop the in-memory kernels and reset the counters (files on disk are kept)."""
    with _lock:
        _kernels.clear()
        for k in _stats:
            _stats[k] = 0
