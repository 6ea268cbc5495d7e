"""The layering of DESIGN.md, read from the code's imports (function-level ones included), and
the old import paths and the repository files the README shows."""

from __future__ import annotations

import ast
import importlib
import subprocess
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sheap_dask"

CORE = ("parameters", "loss", "lm", "minimizer", "slsqp", "slsqp_evaluator")
DATASET_LAYER = ("fit", "store", "inputs", "cluster", "catalog", "explore", "accessor", "io", "cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every ``sheap_dask`` module (or package) that the file imports, absolute."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("sheap_dask"))
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if not target.startswith("sheap_dask"):
                continue
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)  # `from . import fit` imports a module
    return out


IMPORTS = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _offenders(importers, forbidden) -> list[str]:
    bad = []
    for module, imported in IMPORTS.items():
        if not any(module == f"sheap_dask.{m}" or module.startswith(f"sheap_dask.{m}.") for m in importers):
            continue
        for target in sorted(imported):
            if any(target == f"sheap_dask.{f}" or target.startswith(f"sheap_dask.{f}.") for f in forbidden):
                bad.append(f"{module} imports {target}")
    return bad


def test_the_core_never_imports_the_layers_above():
    assert _offenders(CORE, ("chunk", "compiled", *DATASET_LAYER)) == []


def test_models_and_derived_never_import_the_dataset_layer():
    assert _offenders(("models", "derived", "units"), DATASET_LAYER) == []


def test_nothing_below_explore_imports_it():
    below = [m.removeprefix("sheap_dask.").split(".")[0] for m in IMPORTS if m != "sheap_dask"]
    below = sorted(set(below) - {"explore", "accessor"})
    assert _offenders(below, ("explore", "accessor")) == []


@pytest.mark.parametrize(
    "module,names",
    [
        ("sheap_dask.slsqp", ("SLSQP", "FitResult", "PushbackStrategy", "EDM", "LossEvaluator")),
        ("sheap_dask.accessor", ("SheapAccessor", "register_model", "registered_model")),
        ("sheap_dask.models.derived", ("fwhm", "bh_mass", "luminosity", "parse_flux_unit", "RECIPES")),
    ],
)
def test_documented_import_paths_still_work(module, names):
    imported = importlib.import_module(module)
    assert [n for n in names if not hasattr(imported, n)] == []


def test_import_registers_the_accessor_and_its_old_path():
    import xarray as xr

    import sheap_dask as sd
    from sheap_dask.explore.accessor import SheapAccessor

    assert sd.accessor.SheapAccessor is SheapAccessor
    assert isinstance(xr.Dataset().sheap, SheapAccessor)


def _readme_tree() -> set[str]:
    """The files named in the README's "Where things are" tree, as paths under the package."""
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- section:layout -->", 1)[1].split("```", 2)[1]
    paths, folders = set(), []
    for line in block.splitlines()[1:]:
        if not line.strip() or line.strip() == "sheap_dask/":
            continue
        depth = (len(line) - len(line.lstrip())) // 2 - 1
        name = line.split()[0]
        folders = folders[:depth]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
        else:
            paths.add("/".join([*folders, name]))
    return paths


def _committed_modules() -> set[str]:
    """The package's modules that git tracks (files still being written are not in the tree yet)."""
    try:
        out = subprocess.run(["git", "ls-files", "*.py"], cwd=PACKAGE, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}
    return {line for line in out.splitlines() if (PACKAGE / line).exists()}


def test_readme_lists_every_module():
    listed = _readme_tree()
    modules = _committed_modules()
    # a sub-package's __init__.py is its folder's line
    modules = {m for m in modules if not (m.endswith("/__init__.py") and m.count("/") == 1 and m not in listed)}
    assert sorted(modules - listed) == [] and sorted(listed - modules) == []


def test_files_the_readme_links_to_exist():
    """Every repository file the README links or shows (``[..](path)``, ``![..](path)``) is in
    the repository: a renamed figure or table must not leave a dead link."""
    import re

    repo = PACKAGE.parent
    readme = (repo / "README.md").read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", readme) if ":" not in t and not t.startswith("#")]
    assert "docs/host_broad_profiles.png" in targets  # scripts/validate_host.py --figure
    missing = [t for t in targets if not (repo / t).is_file()]
    assert not missing, f"README links to files that are not in the repository: {missing}"
