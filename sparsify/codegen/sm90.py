"""Compile the kernels a launcher would launch for Hopper (sm_90) on a machine without a GPU, and read the figures a
Hopper engineer reads: registers, spills, shared memory, wgmma against mma.sync, cp.async / TMA, atomics.

    with compile_launches() as launches:          # every GeneratedKernel.launch (and each autotune config) compiles
        block_mm_triton(x, w, blocks)             # for sm_90 instead of running: the launcher's own GPU choices
    rows = [figures(c) for c in launches]         # one dict per compiled kernel (and per autotune config)

How: a Triton driver object that reports GPUTarget("cuda", 90, 32) is made the active driver, and each launch
goes through JITFunction.run(..., warmup=True): Triton's real specialisation and pipeline (TTIR -> TTGIR -> PTX ->
cubin with its bundled ptxas) without launching. The launchers run on CPU tensors as they would on CUDA ones
(the kernel layer's device check is lifted and the interpreter is off), so the tile sizes, warps and stages are
the ones a GPU run would use. ptxas -v on the PTX gives registers and spills. Used by benchmarks/sm90_kernels.py
(the table) and tests/kernels/test_sm90_all.py (the assertions); run it in a process without TRITON_INTERPRET.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
from typing import Optional

SM90_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on H100 / H200


@dataclasses.dataclass
class Launch:
    kernel: str          # the jit function's name
    constexprs: dict     # the launch's constexpr arguments (tile sizes, flags)
    num_warps: int
    num_stages: int
    compiled: object     # triton's CompiledKernel (asm["ptx"], asm["ttgir"], metadata)


def _hopper_driver():
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class HopperWithoutGPU(DriverBase):
        """Answers what the compiler asks (the target); anything that would touch a device is refused."""

        def __init__(self):
            self.target = GPUTarget("cuda", 90, 32)

        @classmethod
        def is_active(cls):
            return True

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            import torch
            return torch.device("cpu")

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_device_capability(self, device=None):
            return (9, 0)

        def get_benchmarker(self):
            raise RuntimeError("sm90.compile_launches: no benchmarking without a GPU")

    return HopperWithoutGPU()


def _constexpr_names(fn) -> set:
    return {p.name for p in fn.params if p.is_constexpr}


def _warmup(fn, grid, kwargs, num_warps, num_stages, launches):
    compiled = fn.run(grid=grid, warmup=True, num_warps=num_warps, num_stages=num_stages, **kwargs)
    names = _constexpr_names(fn)
    launches.append(Launch(fn.__name__, {k: v for k, v in kwargs.items() if k in names}, num_warps, num_stages,
                           compiled))


@contextlib.contextmanager
def compile_launches(all_configs: bool = True):
    """Within: launches compile for sm_90 and are recorded (the yielded list), nothing runs; an autotuned launch
    compiles each of its configs (all_configs) or its default only. The generated modules are built in jit mode (a
    process with TRITON_INTERPRET set would give interpreter objects: refused)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("sm90.compile_launches needs TRITON_INTERPRET unset (run it in a fresh process)")
    import triton
    from . import kernel as kernel_layer

    launches: list = []
    config = triton.runtime.driver
    previous_driver = getattr(config, "_active", None)  # not .active: on a CPU machine that discovers no driver
    config.set_active(_hopper_driver())

    def launch(self, grid, *, entry=None, num_warps=None, num_stages=None, **kwargs):
        _warmup(self._entries[entry], grid, kwargs, num_warps or 4, num_stages or 3, launches)

    def launch_tuned(self, grid, configs, *, entry=None, key=(), bucket=None, restore=(), reset=(), **kwargs):
        # the autotuner's stand-in: every config compiles (nothing to time without a GPU), or the default alone
        for config in configs if all_configs else configs[:1]:
            meta = {**kwargs, **config.kwargs}
            _warmup(self._entries[entry], grid(meta) if callable(grid) else grid, meta, config.num_warps,
                    config.num_stages, launches)

    saved = (kernel_layer.GeneratedKernel.launch, kernel_layer.GeneratedKernel.launch_tuned,
             kernel_layer.GeneratedKernel.check_device)
    kernel_layer.GeneratedKernel.launch = launch
    kernel_layer.GeneratedKernel.launch_tuned = launch_tuned
    kernel_layer.GeneratedKernel.check_device = lambda self, t: None
    try:
        yield launches
    finally:
        (kernel_layer.GeneratedKernel.launch, kernel_layer.GeneratedKernel.launch_tuned,
         kernel_layer.GeneratedKernel.check_device) = saved
        config._active = previous_driver  # None again on a CPU machine (reset_active would look for a GPU)


def ptxas_figures(ptx: str) -> dict:
    """ptxas -v on the PTX: registers per thread, spill store / load bytes."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(90).path, "-v", f"--gpu-name={sm_arch_from_capability(90)}", path,
                              "-o", path + ".o"], capture_output=True, text=True).stderr

    def number(pattern: str) -> Optional[int]:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else None
    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads")}


def figures(launch: Launch) -> dict:
    """What a Hopper engineer reads from one compiled kernel."""
    ptx = launch.compiled.asm["ptx"]
    ttgir = launch.compiled.asm.get("ttgir", "")
    atomics = re.findall(r"\batom\.[\w.]+", ptx) + re.findall(r"\bred\.[\w.]+", ptx)
    return {"kernel": launch.kernel, "constexprs": launch.constexprs, "num_warps": launch.num_warps,
            "num_stages": launch.num_stages, **ptxas_figures(ptx), "shared": int(launch.compiled.metadata.shared),
            "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
            "dots": ttgir.count("tt.dot") + ttgir.count("warp_group_dot"),
            "cp_async": ptx.count("cp.async"), "tma": ptx.count("cp.async.bulk.tensor"),
            "atomics": len(atomics), "atomics_acq_rel": sum(".acq_rel" in a for a in atomics)}
