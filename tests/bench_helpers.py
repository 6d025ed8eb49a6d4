"""Shared by the benchmark smoke tests: load a script from benchmarks/ as a module, read its result files."""
import importlib.util
import json
import os
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
# timing options that make every case run once or twice
FAST = ["--warmup", "1", "--min-repeats", "1", "--max-repeats", "2", "--budget-s", "0.01"]


def load_benchmark(name: str):
    """benchmarks/<name>.py as a fresh module (its own imports, e.g. _timing, resolve from benchmarks/)."""
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (data_fortunes._Pool) look their module up there
    spec.loader.exec_module(module)
    return module


def result_files(tmp_path, stem: str):
    """(payload from <stem>.json, text of <stem>.md)."""
    return json.loads((tmp_path / f"{stem}.json").read_text()), (tmp_path / f"{stem}.md").read_text()
