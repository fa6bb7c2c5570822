"""setup.py declares every distribution that dino_d2 imports, and nothing it does not."""

import ast
import pathlib
import re
import sys
from collections import defaultdict
from importlib import metadata
from typing import Dict, Set

import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
# What `pip install .` installs: the package and its configs (as dino_d2.configs).
SCANNED = ("dino_d2", "configs")
# Required but deliberately not declared (see the comment in setup.py).
UNDECLARED = {"detectron2"}
# Declared without a direct import: needed at run time by what dino_d2 builds.
RUNTIME_ONLY = {
    "shapely": "fvcore's CropTransform.apply_polygons: polygon masks through the DETR crop",
}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(roots=SCANNED) -> Dict[str, Set[str]]:
    """Top-level names of the modules imported anywhere in ``roots`` (module level and inside
    functions, ``import_module("...")`` included), each with the files importing it."""
    found = defaultdict(set)
    for root in roots:
        for path in sorted((ROOT / root).rglob("*.py")):
            relative = str(path.relative_to(ROOT))
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), relative)):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                elif (
                    isinstance(node, ast.Call)
                    and getattr(node.func, "attr", getattr(node.func, "id", None))
                    == "import_module"
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                ):
                    names = [node.args[0].value]
                for name in names:
                    found[name.split(".")[0]].add(relative)
    return dict(found)


def _setup_keyword(name: str):
    """The literal value of a keyword of setup.py's ``setup()`` call, read from its source
    (setup.py itself is not run: it imports torch and plans the extension build)."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup"
    ]
    assert len(calls) == 1, "setup.py must call setup() once"
    (keyword,) = [k for k in calls[0].keywords if k.arg == name]
    return ast.literal_eval(keyword.value)


def declared_requirements() -> Dict[str, Requirement]:
    """``install_requires`` of setup.py."""
    requirements = [Requirement(text) for text in _setup_keyword("install_requires")]
    return {_canonical(r.name): r for r in requirements}


# Subpackages (or modules) whose imports an extra may provide instead of install_requires.
EXTRA_OF_SUBPACKAGE = {
    "dino_d2/export/": ("export", "openvino"),
    "dino_d2/engine/slurm.py": ("slurm",),
    "dino_d2/cli/submit_slurm.py": ("slurm",),
}


def extra_requirements(extra: str) -> Set[str]:
    """The distributions of an ``extras_require`` entry of setup.py."""
    return {_canonical(Requirement(text).name) for text in _setup_keyword("extras_require")[extra]}


def third_party(modules: Dict[str, Set[str]]) -> Dict[str, Set[str]]:
    return {
        name: files
        for name, files in modules.items()
        if name not in sys.stdlib_module_names and name != "dino_d2" and name not in UNDECLARED
    }


def test_the_scan_sees_imports_at_module_level_and_in_functions():
    modules = imported_modules()
    # Module level (dino_d2/layers/box_ops.py), inside a function (dino_d2/data/digits.py),
    # through importlib (dino_d2/_compat.py) and in a config.
    assert "dino_d2/layers/box_ops.py" in modules["torch"]
    assert "dino_d2/data/digits.py" in modules["sklearn"]
    assert "dino_d2/_compat.py" in modules["detectron2"]
    assert "configs/common/schedule.py" in modules["fvcore"]


def test_every_import_is_declared():
    declared = declared_requirements()
    providers = metadata.packages_distributions()
    missing = []
    for module, files in sorted(third_party(imported_modules()).items()):
        distributions = {_canonical(d) for d in providers.get(module, [])}
        allowed = set(declared)
        # The extras that every importing file may rely on.
        extras = set.intersection(
            *(
                {
                    e
                    for prefix, names in EXTRA_OF_SUBPACKAGE.items()
                    if f.startswith(prefix)
                    for e in names
                }
                for f in files
            )
        )
        allowed |= {name for extra in extras for name in extra_requirements(extra)}
        if not distributions and _canonical(module) in allowed - set(declared):
            continue  # an optional extra that is not installed here (openvino in CI)
        if not distributions:
            missing.append(f"{module} (imported by {sorted(files)}; no installed distribution)")
        elif not distributions & allowed:
            missing.append(f"{module} from {sorted(distributions)} (imported by {sorted(files)})")
    assert not missing, "setup.py install_requires lacks: " + "; ".join(missing)


def test_every_declaration_is_imported_or_needed_at_run_time():
    providers = metadata.packages_distributions()
    imported = {
        _canonical(d)
        for module in third_party(imported_modules())
        for d in providers.get(module, [])
    }
    unused = set(declared_requirements()) - imported - set(RUNTIME_ONLY)
    assert not unused, f"setup.py declares distributions that dino_d2 never imports: {unused}"
    # Every runtime-only one is really declared, and really not imported.
    assert set(RUNTIME_ONLY) <= set(declared_requirements()) and not set(RUNTIME_ONLY) & imported


def test_detectron2_is_not_a_requirement():
    assert not UNDECLARED & set(declared_requirements())


@pytest.mark.parametrize("name", sorted(declared_requirements()))
def test_installed_versions_satisfy_the_declaration(name):
    requirement = declared_requirements()[name]
    version = metadata.version(requirement.name)
    assert requirement.specifier.contains(version, prereleases=True), (requirement, version)
