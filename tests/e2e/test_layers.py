"""The house's one-way data flow, checked on the source: no module imports a layer above its own.

    tables, config, debug  (leaves: import nothing of sparsify)
    < codegen (kernels) < ops < passes (graph, regions) < methods < plan, checkpoint, steps < pipeline
    < backend < prepare < the package's __init__

A lazy import inside a function counts the same as one at the top: an import back up is a design smell either way.
"""
import ast
from pathlib import Path

import sparsify

ROOT = Path(sparsify.__file__).parent
LEVELS = {"tables": 0, "config": 0, "debug": 0, "codegen": 1, "ops": 2, "passes": 3, "methods": 4,
          "plan": 5, "checkpoint": 5, "steps": 5, "training": 6, "pipeline": 6, "backend": 7, "prepare": 8, "": 9}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path, module: str):
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            yield from (n for n in names if n.startswith("sparsify"))
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("sparsify"))


def test_every_module_has_a_layer():
    for path in ROOT.rglob("*.py"):
        module = "sparsify." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        assert _layer(module.removesuffix(".__init__")) in LEVELS, f"{module}: add its layer to LEVELS"


def test_no_import_goes_up_a_layer():
    upward = []
    for path in ROOT.rglob("*.py"):
        module = ("sparsify." + ".".join(path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        own = _layer(module)
        for target in _imports(path, module):
            other = _layer(target)
            if other != own and LEVELS[other] >= LEVELS[own]:
                upward.append(f"{module} imports {target}")
    assert not upward, "\n".join(upward)
