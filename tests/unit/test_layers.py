"""The architecture, checked: which layer may import what.

Layers, bottom to top (`LAYERS`); a module imports only from its own layer or the ones below it,
at the top of the file, inside a function or under `if TYPE_CHECKING:` alike, and no modules
import each other in a circle:

  errors, version, names, progress,  what every layer may name (progress: the bars -q hides;
  environ                            environ: environment variables set for a block)
  core/        pure: numpy, torch, faiss; no Ray, no MLflow, no settings classes (plain values in)
  config       the settings object, checked against the core's registries
  detectors    settings -> the core detector's plain values (method specs parsed once, here)
  io/          files and stores; MLflow only in io/tracking.py and io/mlflow_model.py
  results      result types the pipelines make and reporting writes
  reporting/   figures, tables, result files
  pipelines/   single process, Ray-free; the Ray layer is injected from above
  export/      ONNX / TorchScript files and scoring with them
  distributed/ every `import ray`: the thin Ray layer (Data, Train, Tune, bank actors)
  commands/    each command's run: settings in, tracking and output files out
  api          the Python API
  mlflow_pyfunc  the MLflow model wrapper (scores through the API; MLflow too)
  cli, reb_dist  the command line and the package's lazy public names
"""

from __future__ import annotations

import ast
from pathlib import Path

import reb_dist

PACKAGE = Path(reb_dist.__file__).parent
LAYERS_ABOVE_CORE = ("reb_dist.io", "reb_dist.pipelines", "reb_dist.distributed", "reb_dist.reporting", "reb_dist.cli")


def imports(path: Path, type_checking: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, including lazy ones inside functions; those under
    `if TYPE_CHECKING:` (type names only, never executed) only when `type_checking`."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if not type_checking and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
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


# bottom to top; a module's layer is the longest prefix listed (reb_dist itself: the top)
LAYERS = [
    ("reb_dist.errors", "reb_dist.version", "reb_dist.names", "reb_dist.progress", "reb_dist.environ"),
    ("reb_dist.core",),
    ("reb_dist.config",),
    ("reb_dist.detectors",),
    ("reb_dist.io",),
    ("reb_dist.results",),
    ("reb_dist.reporting",),
    ("reb_dist.pipelines",),
    ("reb_dist.export",),
    ("reb_dist.distributed",),
    ("reb_dist.commands",),
    ("reb_dist.api",),
    ("reb_dist.mlflow_pyfunc",),
    ("reb_dist.cli", "reb_dist"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """Index in LAYERS of the longest listed prefix of `module` (a package or a module)."""
    best, rank = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, rank = len(name), i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS"
    return rank


def internal_imports(path: Path) -> list[tuple[int, str]]:
    """(line, reb_dist module) a file imports, relative imports resolved, TYPE_CHECKING ones included;
    `from pkg import name` counts as pkg.name when that is a module."""
    found = {(line, name) for line, name in imports(path, type_checking=True)
             if name == "reb_dist" or name.startswith("reb_dist.")}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("reb_dist"):
            subs = [f"{node.module}.{alias.name}" for alias in node.names]
            subs = [sub for sub in subs if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").is_file()
                    or (PACKAGE.parent / sub.replace(".", "/") / "__init__.py").is_file()]
            found |= {(node.lineno, sub) for sub in subs}
            if len(subs) == len(node.names):  # `from pkg import module`: the module, not pkg's own names
                found.discard((node.lineno, node.module))
    return sorted(found)


def upward_imports(files: list[Path], names: dict[Path, str] | None = None) -> list[str]:
    """Every import in `files` of a module in a higher layer; `names` gives a file's module name
    where it is not under the package (the check's own test)."""
    out = []
    for p in files:
        here = (names or {}).get(p) or module_name(p)
        for line, name in internal_imports(p):
            if layer(name) > layer(here):
                out.append(f"{p.name}:{line}: {here} (layer {layer(here)}) imports {name} (layer {layer(name)})")
    return out


def test_no_module_imports_from_a_layer_above_its_own():
    assert upward_imports(modules()) == []


def test_no_modules_import_each_other_in_a_circle():
    graph = {module_name(p): {name for _, name in internal_imports(p)} for p in modules()}
    graph = {m: {n for n in targets if n in graph and n != m} for m, targets in graph.items()}
    assert circles(graph) == []


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_layer_checks_catch_a_lazy_upward_import_and_a_circle(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from reb_dist import api\n"
                   "def f():\n    from reb_dist.pipelines.evaluate import fit_detector\n")
    found = upward_imports([bad], {bad: "reb_dist.core.probe"})
    assert [f.split(": ", 1)[1] for f in found] == [
        "reb_dist.core.probe (layer 1) imports reb_dist.api (layer 11)",
        "reb_dist.core.probe (layer 1) imports reb_dist.pipelines.evaluate (layer 7)"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
