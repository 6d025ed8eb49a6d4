"""Spec -> Triton source -> file on disk -> imported ``@triton.jit`` function, cached.

Why files: ``@triton.jit`` (and the interpreter) read the kernel's source through
``inspect``, which needs a real file. Each generated kernel is written once to
``$SPARSIFY_CACHE_DIR`` (default ``~/.cache/sparsify/kernels``) as ``<key>.py`` and
imported with importlib.

Why kernels are built lazily: in Triton (checked on 3.9) ``TRITON_INTERPRET`` is read
when ``@triton.jit`` *decorates* a function, not at launch. Kernels are therefore only
materialised on first use (this package imports triton only then), and the in-memory
cache is keyed on (spec key, interpreter mode), so a process that flips the mode (a
test suite) never reuses a kernel built for the other mode.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from collections import namedtuple
from pathlib import Path
from string import Template

from . import templates as T
from .spec import UpProjectionSpec, spec_key


def templates_digest(*namespaces: dict) -> str:
    """Digest of the upper-case template strings (str, string.Template, or dicts of them) in the
    given namespaces. Part of each cache key, so that an edited template, or another sparsify
    version, never shares (or fights over) one cached file name."""
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


_TEMPLATE_DIGEST = templates_digest(vars(T))

CacheInfo = namedtuple("CacheInfo", "hits misses generated entries")

_lock = threading.Lock()
_kernels: dict = {}  # (key, interpret) -> CompiledKernel
_stats = {"hits": 0, "misses": 0, "generated": 0}


# --- source generation ---------------------------------------------------------------

def kernel_key(spec: UpProjectionSpec) -> str:
    """The cache key (sha256 hex) of a spec's kernel."""
    return spec_key(spec, salt=_TEMPLATE_DIGEST)


def kernel_source(spec: UpProjectionSpec) -> str:
    """The Triton source generated for ``spec`` (pure: no file, no triton import)."""
    if not isinstance(spec, UpProjectionSpec):
        raise ValueError(f"expected an UpProjectionSpec, got {type(spec).__name__}")
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


def kernel_pointer_args(spec: UpProjectionSpec) -> tuple:
    """Pointer arguments of the generated kernel, in order (mirrors the template)."""
    names = ["x_ptr", "w_ptr"]
    if spec.gated:
        names.append("wg_ptr")
    if spec.has_bias:
        names.append("b_ptr")
        if spec.gated:
            names.append("bg_ptr")
    return tuple(names)


# --- disk + import ---------------------------------------------------------------------

def cache_dir() -> Path:
    """Where generated sources are written (read from the environment on each call)."""
    d = os.environ.get("SPARSIFY_CACHE_DIR")
    return Path(d) if d else Path.home() / ".cache" / "sparsify" / "kernels"


def _write_source(path: Path, source: str) -> None:
    """Write ``source`` to ``path`` unless it already holds exactly that.

    Atomic (temp file in the same directory + os.replace) so concurrent processes
    never import a half-written file; two writers racing write identical bytes.
    """
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
    # registered before exec, like a normal import (inspect / pickling look modules up here)
    sys.modules[module_name] = module
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


class CompiledKernel:
    """A generated kernel: its spec, source, file and the ``@triton.jit`` function."""

    def __init__(self, spec, key, source, path, fn, interpret):
        self.spec = spec
        self.key = key
        self.source = source
        self.path = path
        self.fn = fn  # the raw @triton.jit function
        self.interpret = interpret
        self.pointer_args = kernel_pointer_args(spec)  # which tensors a launch passes
        self._launcher = _with_block_configs(fn, interpret)

    def launch(self, grid, **kwargs):
        """Launch with keyword arguments (block sizes are supplied here, or by autotune)."""
        self._launcher(grid, kwargs)

    def __repr__(self):
        mode = "interpreter" if self.interpret else "jit"
        return f"CompiledKernel({self.spec.kernel_name}, key={self.key[:12]}, {mode})"


# Block configs (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). On the GPU the
# autotuner picks one per (T bucket, N, K); the small-M config serves decode batches.
_GPU_CONFIGS = (
    (32, 64, 64, 4, 4),
    (64, 64, 32, 4, 3),
    (128, 64, 32, 4, 3),
    (128, 128, 32, 8, 3),
)
# The interpreter runs every program in Python: one small config (tl.dot needs >= 16).
_INTERPRET_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)


def _t_bucket(t: int) -> int:
    """Next power of two (16 .. 8192): the token count varies call to call, and keying
    the autotuner on the exact T would re-benchmark every new sequence length."""
    b = 16
    while b < t and b < 8192:
        b *= 2
    return b


def _with_block_configs(fn, interpret):
    """A ``launcher(grid, kwargs)`` that supplies the block sizes."""
    if interpret:
        def launcher(grid, kwargs):
            fn[grid](**kwargs, **_INTERPRET_BLOCKS)
        return launcher

    import triton

    configs = [
        triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s)
        for m, n, k, w, s in _GPU_CONFIGS
    ]
    tuners = {}  # T bucket -> autotuner over fn (compiled binaries are shared via fn)

    def launcher(grid, kwargs):
        bucket = _t_bucket(kwargs["T"])
        tuned = tuners.get(bucket)
        if tuned is None:
            tuned = tuners.setdefault(bucket, triton.autotune(configs=configs, key=["N", "K"])(fn))
        tuned[grid](**kwargs)
    return launcher


def load_generated(key: str, make_source, family: str, build):
    """The one cache every kernel family goes through: on first use of (key, interpreter mode),
    generate the source, write it to the cache directory, import it, and keep
    build(module, source, path, interpret); afterwards serve that object from memory.

    A distinct module per mode: the same file decorated under the other mode is a different kind
    of function object (TRITON_INTERPRET is read at @triton.jit time)."""
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
        module = _import_file(path, f"_sparsify_{family}_{key[:24]}_{'interp' if interpret else 'jit'}")
        kernel = build(module, source, path, interpret)
        _kernels[(key, interpret)] = kernel
        return kernel


def get_kernel(spec: UpProjectionSpec) -> CompiledKernel:
    """The compiled kernel for ``spec``: generated, written and imported on first use,
    then served from memory (same spec -> same object, no re-generation)."""
    if not isinstance(spec, UpProjectionSpec):
        raise ValueError(f"expected an UpProjectionSpec, got {type(spec).__name__}")
    key = kernel_key(spec)
    return load_generated(
        key, lambda: kernel_source(spec), "kernel",
        lambda module, source, path, interpret: CompiledKernel(
            spec, key, source, path, getattr(module, spec.kernel_name), interpret))


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
