"""Shared measurement helpers for the benchmark scripts (bench_attention, spt_table1, spt_recall).

What is measured, and how (the scripts say which measure each number is):

* time: ``warmup`` untimed calls, then ``repeats`` timed calls; the median is reported (min and max are
  kept in the JSON). On CUDA every call is bracketed by ``torch.cuda.synchronize()``; on CPU by nothing
  (the work is synchronous). The number of repeats adapts to a per-case time budget (at least
  ``min_repeats``, at most ``max_repeats``).
* memory on CUDA: ``torch.cuda.reset_peak_memory_stats()`` right before one call, then
  ``torch.cuda.max_memory_allocated()`` after it: the peak of *allocated* bytes during the call
  (inputs, parameters and gradients that exist at the time included), plus the same peak minus what was
  allocated just before the call ("peak above baseline").
* memory on CPU (there is no allocator peak to read): bytes the forward saves for backward, collected
  with ``torch.autograd.graph.saved_tensors_hooks`` and counted once per unique storage. Storages of the
  tensors passed as ``exclude`` (the benchmark's inputs, the parameters) are reported separately, so
  "saved (excl. inputs/params)" is what the variant adds on top of what every variant keeps anyway.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import re
import statistics
import time
from typing import Callable, Iterable, Optional, Sequence

import torch

MiB = float(1 << 20)


# ------------------------------------------------------------------------------------------ device

def pick_device(name: str = "auto") -> torch.device:
    """"auto": CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    return device


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {_cpu_model()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device) -> str:
    """File-name tag: "cpu", or the GPU name in lower case (e.g. "nvidia-h100-80gb-hbm3")."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def environment(device: torch.device) -> dict:
    """Versions and machine facts written into every result file."""
    info = {
        "device_type": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton  # noqa: F401
        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001  (absent or broken: just not recorded)
        info["triton"] = None
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = round(props.total_memory / (1 << 30), 1)
    else:
        info["loadavg_at_start"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return info


@contextlib.contextmanager
def cpu_threads(device: torch.device, threads: Optional[int]):
    """On CPU, run with `threads` torch threads (restored afterwards: main() may be called from tests)."""
    old = torch.get_num_threads()
    if device.type != "cuda" and threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ time

def time_call(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, min_repeats: int = 3,
              max_repeats: int = 20, budget_s: float = 2.0) -> dict:
    """Median wall time of fn() in milliseconds, after `warmup` untimed calls.

    Repeats: as many as fit in `budget_s` judging by the last warm-up call, clamped to
    [min_repeats, max_repeats]. Returns {"median_ms", "min_ms", "max_ms", "repeats", "times_ms"}.
    """
    last = 0.0
    for _ in range(max(1, warmup)):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        last = time.perf_counter() - t0
    repeats = max(min_repeats, min(max_repeats, int(budget_s / max(last, 1e-6))))
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "repeats": repeats, "times_ms": [round(t, 4) for t in times]}


def fwd_bwd_ms(forward: Callable[[], object], backward: Optional[Callable[[object], None]],
               clear: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """One forward + backward call: (forward ms, forward+backward ms). backward None: the forward runs without
    autograd and both times are the forward's. clear() drops the gradients after the backward."""
    sync(device)
    t0 = time.perf_counter()
    if backward is None:
        with torch.no_grad():
            forward()
        sync(device)
        t1 = t2 = time.perf_counter()
    else:
        out = forward()
        sync(device)
        t1 = time.perf_counter()
        backward(out)
        del out
        clear()
        sync(device)
        t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t0) * 1e3


def time_fwd_bwd(once: Callable[[], tuple], saved: Callable[[], dict], clear: Callable[[], None],
                 device: torch.device, args, *, compiled: bool, with_saved: bool = True) -> dict:
    """The protocol of the op benchmarks, for one case whose once() runs forward + backward and returns
    (forward ms, forward+backward ms), and whose saved() runs them once under saved_tensors_hooks and
    returns the saved-bytes info: a first call reported apart (for eager code it doubles as the
    saved-bytes measurement; compiled code gets an extra call afterwards), args.warmup warm-up calls (none
    on CPU when the first call alone exceeded args.budget_s: nothing compiles there), then repeats fitting
    the budget within [args.min_repeats, args.max_repeats]; on CUDA one more call for the peak."""
    res = {}
    sync(device)
    t0 = time.perf_counter()
    if with_saved and not compiled:
        res.update(saved())
    else:
        once()
    sync(device)
    res["first_call_s"] = round(time.perf_counter() - t0, 3)
    last = res["first_call_s"] * 1e3
    warmup = 0 if device.type != "cuda" and not compiled and last > args.budget_s * 1e3 else args.warmup
    res["warmup_calls"] = warmup
    for _ in range(warmup):
        last = once()[1]
    repeats = max(args.min_repeats, min(args.max_repeats, int(args.budget_s * 1e3 / max(last, 1e-3))))
    fwd, tot = zip(*(once() for _ in range(repeats)))
    res.update(fwd_ms=statistics.median(fwd), fwd_bwd_ms=statistics.median(tot), repeats=repeats,
               fwd_bwd_times_ms=[round(t, 4) for t in tot], fwd_times_ms=[round(t, 4) for t in fwd])
    if device.type == "cuda":
        res.update(cuda_peak(once, device))
    if with_saved and compiled:
        try:
            res.update(saved())
        except Exception as exc:  # noqa: BLE001  (compiled code may refuse saved-tensor hooks)
            res["saved_error"] = f"{type(exc).__name__}: {exc}"[:300]
            clear()
    return res


# ------------------------------------------------------------------------------------------ memory

def cuda_peak(fn: Callable[[], object], device: torch.device) -> dict:
    """Peak allocated bytes during one fn() on CUDA (reset right before it)."""
    sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_bytes": peak, "peak_above_baseline_bytes": peak - base, "baseline_bytes": base}


def _storage_key(t: torch.Tensor):
    try:
        s = t.untyped_storage()
        return (str(t.device), s.data_ptr()), s.nbytes()
    except Exception:  # noqa: BLE001  (tensor subclasses without a plain storage)
        return (str(t.device), id(t)), t.numel() * t.element_size()


def saved_bytes(forward: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> tuple[object, dict]:
    """Run forward() under saved_tensors_hooks; count each unique storage it saves for backward once.

    Returns (forward's result, {"saved_bytes", "saved_excl_bytes", "saved_tensors"}): saved_bytes counts
    every unique storage; saved_excl_bytes leaves out the storages of `exclude` (inputs, parameters).
    Keep the result alive and run backward outside this call (packing happens in forward only).
    """
    excluded = {_storage_key(t)[0] for t in exclude if t is not None}
    seen: dict = {}
    count = [0]

    def pack(t):
        key, nbytes = _storage_key(t)
        seen[key] = nbytes
        count[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    total = sum(seen.values())
    excl = sum(n for k, n in seen.items() if k not in excluded)
    return result, {"saved_bytes": total, "saved_excl_bytes": excl, "saved_tensors": count[0]}


# ------------------------------------------------------------------------------------------ output

def fmt_ms(x: Optional[float]) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def fmt_mib(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x / MiB:.1f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def write_results(out_dir: str, stem: str, payload: dict, markdown: str) -> tuple[str, str]:
    """Write <out_dir>/<stem>.json and .md; returns the two paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, stem + ".json")
    md_path = os.path.join(out_dir, stem + ".md")
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
        f.write("\n")
    with open(md_path, "w") as f:
        f.write(markdown.rstrip() + "\n")
    return json_path, md_path


def default_out_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def finish_environment(env: dict, device: torch.device, started: float) -> dict:
    env["wall_s"] = round(time.perf_counter() - started, 1)
    if device.type != "cuda" and hasattr(os, "getloadavg"):
        env["loadavg_at_end"] = list(os.getloadavg())
    return env


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def add_timing_args(p, *, warmup_help: str, warmup: Optional[int] = None, max_repeats: int = 20,
                    budget_s: float = 1.5, stem_help: str = "") -> None:
    """The options every timing benchmark shares: repeats, budget, output, seed, CPU threads."""
    p.add_argument("--warmup", type=int, default=warmup, help=warmup_help)
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--max-repeats", type=int, default=max_repeats)
    p.add_argument("--budget-s", type=float, default=budget_s, help="timing budget per case (sets the repeats)")
    p.add_argument("--out-dir", default=default_out_dir())
    p.add_argument("--stem", help=stem_help or "result file name without extension")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU: torch threads (default 1: steadier on a shared machine)")


def run_on_device(args, run: Callable, device: Optional[torch.device] = None):
    """run(args, device) on args.device (or `device`), with args.threads CPU threads (default 1)."""
    device = device or pick_device(args.device)
    with cpu_threads(device, args.threads or 1):
        return run(args, device)

