"""The architecture, checked: which layer may import what.

core/        pure: no Ray, no MLflow, nothing from the layers above (config and errors are shared)
io/          files and stores; MLflow only in io/tracking.py, io/mlflow_model.py and mlflow_pyfunc.py
pipelines/   single process; may ask distributed/ for a sharded bank, lazily
distributed/ every `import ray`
reporting/   figures, tables, result files
"""

from __future__ import annotations

import ast
from pathlib import Path

import reb_dist

PACKAGE = Path(reb_dist.__file__).parent
LAYERS_ABOVE_CORE = ("reb_dist.io", "reb_dist.pipelines", "reb_dist.distributed", "reb_dist.reporting", "reb_dist.cli")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, including lazy ones inside functions, but not the
    ones under `if TYPE_CHECKING:` (type names only, never executed)."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
    return found


def modules(under: str = "") -> list[Path]:
    return sorted((PACKAGE / under).rglob("*.py"))


def offenders(files: list[Path], banned) -> list[str]:
    return [f"{p}:{line}: {name}" for p in files for line, name in imports(p)
            if banned(name)]


def test_ray_is_imported_only_in_distributed():
    files = [p for p in modules() if not p.is_relative_to(PACKAGE / "distributed")]
    assert offenders(files, lambda m: m == "ray" or m.startswith("ray.")) == []


def test_mlflow_is_imported_only_in_the_tracking_module():
    files = [p for p in modules() if p not in (PACKAGE / "io" / "tracking.py", PACKAGE / "io" / "mlflow_model.py",
                                              PACKAGE / "mlflow_pyfunc.py")
             and not p.is_relative_to(PACKAGE / "distributed")]
    assert offenders(files, lambda m: m == "mlflow" or m.startswith("mlflow.")) == []


def test_the_core_imports_nothing_from_the_layers_above_it():
    assert offenders(modules("core"), lambda m: m.startswith(LAYERS_ABOVE_CORE)) == []
    assert offenders(modules("core"), lambda m: m.split(".")[0] in ("ray", "mlflow")) == []


def test_no_module_imports_another_modules_private_names():
    bad = []
    for p in modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("reb_dist"):
                bad += [f"{p.name}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and a.name != "__version__"]
    assert bad == []


def test_the_checks_catch_an_offender(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import mlflow\n"
                   "def f():\n    import ray.train\n    from reb_dist.io.atomic import write_atomic\n")
    assert [name for _, name in imports(bad)] == ["typing", "ray.train", "reb_dist.io.atomic"]
    assert offenders([bad], lambda m: m.startswith("ray")) != []


def test_every_public_name_resolves_to_what_its_module_defines():
    import importlib
    import subprocess
    import sys

    for name in reb_dist.__all__:
        value = getattr(reb_dist, name)
        if name != "__version__":
            assert value is getattr(importlib.import_module(reb_dist._EXPORTS[name]), name), name
    light = subprocess.run([sys.executable, "-c", "import sys, reb_dist; print('torch' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert light.stdout.strip() == "False"  # `import reb_dist` (and so `reb --help`) does not load torch
