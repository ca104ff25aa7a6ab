"""Packaging: pyproject's ranges, the runtime lock and the dev lock agree, and the package imports
only what it declares."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "reb_dist"
TEST_TOOLS = {"pytest", "pytest-timeout", "pluggy", "iniconfig"}

if not (REPO / "pyproject.toml").is_file() or not PACKAGE.is_dir():
    pytest.skip("needs the source tree (pyproject.toml, reb_dist/)", allow_module_level=True)


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def lock(name: str) -> dict[str, Requirement]:
    """A lock file's pins by canonical name (comments and blank lines skipped)."""
    pins = {}
    for line in (REPO / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", f"{name}: {line} is not an exact pin"
            pins[canonicalize_name(req.name)] = req
    return pins


def pinned_version(req: Requirement) -> str:
    return next(iter(req.specifier)).version


def declared(extras: tuple[str, ...] = ()) -> list[Requirement]:
    p = project()
    return [Requirement(r) for r in p["dependencies"]] + [
        Requirement(r) for extra in extras for r in p["optional-dependencies"][extra]]


def test_every_runtime_dependency_is_pinned_in_the_lock_within_its_range():
    pins = lock("requirements.lock")
    for req in declared():
        pin = pins.get(canonicalize_name(req.name))
        assert pin is not None, f"requirements.lock has no pin for {req}"
        assert req.specifier.contains(pinned_version(pin), prereleases=True), f"requirements.lock: {pin} is outside {req}"
        assert set(req.extras) <= set(pin.extras), f"requirements.lock: {pin} lacks the extras of {req}"


def test_ranges_are_not_exact_pins_and_python_is_not_capped():
    p = project()
    assert not p["requires-python"].startswith("==") and "<" not in p["requires-python"]
    for req in declared(tuple(p["optional-dependencies"])):
        assert req.specifier and all(s.operator != "==" for s in req.specifier), f"pyproject: {req} is exact or open"


def test_dev_tools_are_in_the_dev_lock_only():
    runtime, dev = lock("requirements.lock"), lock("requirements-dev.lock")
    assert not TEST_TOOLS & set(runtime), "test tools in the runtime lock"
    assert not set(runtime) & set(dev), f"pinned in both locks: {sorted(set(runtime) & set(dev))}"
    for req in declared(("test", "export")):
        if canonicalize_name(req.name) in runtime:
            continue  # a runtime dependency, checked above
        pin = dev.get(canonicalize_name(req.name))
        assert pin is not None and req.specifier.contains(pinned_version(pin)), f"requirements-dev.lock: {req}"


def _requires(name: str, extras: set[str]) -> list[Requirement]:
    """An installed distribution's requirements that apply with `extras` on this interpreter."""
    out = []
    for line in metadata.distribution(name).requires or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in {"", *extras}):
            out.append(req)
    return out


def test_the_runtime_lock_is_exactly_the_installed_closure_of_the_runtime_dependencies():
    """Transitive dependencies of pyproject's list, read from the installed metadata: all pinned,
    nothing else pinned (no dev tool rides along). Only where the lock is what is installed."""
    pins = lock("requirements.lock")
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    if any(installed.get(name) != pinned_version(pin) for name, pin in pins.items()):
        pytest.skip("the installed packages are not requirements.lock's (e.g. installed from pyproject)")
    seen: dict[str, set[str]] = {}
    todo = declared()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen and set(req.extras) <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | set(req.extras)
        todo.extend(_requires(name, seen[name]))
    assert set(seen) == set(pins), (f"missing from the lock: {sorted(set(seen) - set(pins))}; "
                                    f"not needed at run time: {sorted(set(pins) - set(seen))}")


def _third_party_imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, guarded) of every absolute third-party import in a file; guarded: inside a
    function or a try block, so the module itself imports without it."""
    found = []

    def visit(node: ast.AST, guarded: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = guarded or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Try))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            for n in names:
                top = n.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("reb_dist", "__future__"):
                    found.append((top, guarded))
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def test_the_package_imports_only_declared_dependencies():
    p = project()
    runtime = {canonicalize_name(r.name) for r in declared()}
    optional = {canonicalize_name(Requirement(r).name) for extra, reqs in p["optional-dependencies"].items()
                if extra != "test" for r in reqs}
    providers = metadata.packages_distributions()  # import name -> installed distributions
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, guarded in _third_party_imports(path):
            dists = {canonicalize_name(d) for d in providers.get(module, [])}
            where = path.relative_to(REPO)
            if dists & runtime:
                continue
            if dists & optional and guarded:
                continue
            problems.append(f"{where}: import {module} ({', '.join(sorted(dists)) or 'not installed'})"
                            + (" unguarded, from an optional extra" if dists & optional else " not declared"))
    assert not problems, "\n".join(problems)


def test_the_import_check_catches_an_undeclared_import(tmp_path):
    """The check above on a file that imports pytest (a test tool) at module level."""
    f = tmp_path / "m.py"
    f.write_text("import os\nimport pytest\ndef g():\n    import onnxruntime\ntry:\n    import onnx\nexcept ImportError:\n    onnx = None\n")
    assert _third_party_imports(f) == [("pytest", False), ("onnxruntime", True), ("onnx", True)]


def test_the_sample_images_licence_is_declared_and_travels_with_them():
    """The wheel ships MVTec's CC BY-NC-SA images: the package metadata says so (an SPDX expression
    naming both licences) and their licence file is one of the package's licence files."""
    p = project()
    assert p["license"] == "Apache-2.0 AND CC-BY-NC-SA-4.0"
    for name in p["license-files"]:
        assert (REPO / name).is_file(), name
    assert "Apache License" in (REPO / "LICENSE").read_text()
    sample = PACKAGE / "sample_data" / "mvtec_ad_256"
    assert "reb_dist/sample_data/mvtec_ad_256/license.txt" in p["license-files"]
    assert "Attribution-NonCommercial-ShareAlike 4.0" in (sample / "license.txt").read_text()
    for category in ("bottle", "pill"):  # and each category folder carries it as well
        assert (sample / category / "license.txt").read_text() == (sample / "license.txt").read_text()


def test_the_wheel_ships_the_example_configs_and_the_sample_with_its_licence(tmp_path):
    """What an installed package needs without a checkout: the example settings and sweep files
    (jobs/ and tune/ link to them), the sample images and both licences. Built with this
    environment's setuptools, offline."""
    import subprocess
    import sys
    import zipfile

    import shutil

    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ and egg-info there
    shutil.copytree(PACKAGE, source / "reb_dist", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("reb_dist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in ("sample_benchmark", "sample_sweep", "k_alpha"):
        assert f"reb_dist/configs/{config}.yaml" in names
        assert (REPO / ("tune" if config == "k_alpha" else "jobs") / f"{config}.yaml").resolve() == \
            PACKAGE / "configs" / f"{config}.yaml"  # the repository's paths are the same files
    assert "reb_dist/sample_data/mvtec_ad_256/bottle/train/good/000.png" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert any(n.endswith("licenses/reb_dist/sample_data/mvtec_ad_256/license.txt") for n in names)
