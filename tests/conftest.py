import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))  # tests/families.py


def pytest_collection_modifyitems(config, items):
    """Skips `gpu` tests where there is no CUDA device, and `wide` cases (the wider families / peft methods of a
    differential test) unless -m selects them: `python -m pytest -q -n 2 -m wide` runs those, and the default
    suite stays inside CI's time budget."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    narrow = "wide" not in (config.getoption("markexpr") or "")
    not_wide = pytest.mark.skip(reason="a wide case: run with -m wide")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "wide" in item.keywords and narrow:
            item.add_marker(not_wide)


def pytest_configure(config):
    """One torch thread per pytest-xdist worker: `-n 2` on two cores already fills them, and more intra-op threads
    per worker make tiny tensors' ops wait on thread barriers (a float64 gradcheck took 10 s instead of 0.1)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch, so cache entries of one test never serve another."""
    torch._dynamo.reset()
    yield


@pytest.fixture
def compiled_graphs(monkeypatch):
    """The mode ("train" / "eval") of every graph the sparsify passes run on in this test, in order (sparsify.prepare's
    and explain's traces included: clear it after them): a test that must not recompile compares its length across
    steps."""
    import importlib
    backend_module = importlib.import_module("sparsify.backend")  # sparsify.backend is the function of that name
    run_passes = backend_module.run_passes
    graphs = []
    monkeypatch.setattr(backend_module, "run_passes",
                        lambda gm, config, *a, **k: graphs.append(k.get("mode")) or run_passes(gm, config, *a, **k))
    return graphs


@pytest.fixture(scope="module")
def kernel_cache_dir(tmp_path_factory):
    """Generated kernel sources go to a temporary directory, not ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSIFY_CACHE_DIR", str(tmp_path_factory.mktemp("sparsify_kernels")))
        yield


@pytest.fixture
def interpreter(kernel_cache_dir, monkeypatch):
    """Triton's interpreter on CPU tensors, for this test only. triton.language is imported first, in
    the process's own mode: its @jit helpers are decorated at import (TRITON_INTERPRET is read then),
    and a GPU run must not get interpreter versions of them."""
    import triton.language  # noqa: F401

    monkeypatch.setenv("TRITON_INTERPRET", "1")



@pytest.fixture
def autotune_timer(interpreter, monkeypatch):
    """Drives the kernel layer's triton.autotune path under the interpreter (codegen/kernel.py autotune_bench): a
    stand-in timer that really runs each config three times (so an output the timing runs would corrupt shows) and
    ranks the last config fastest (so the tuned choice is not the default). Yields the list of timing calls."""
    import sparsify.codegen.kernel as kernel_layer

    calls = []

    def bench(fn, quantiles=None, **_):
        for _ in range(3):
            fn()
        calls.append(fn)
        return [1.0 / len(calls)] * 3

    monkeypatch.setattr(kernel_layer, "autotune_bench", bench)
    return calls
