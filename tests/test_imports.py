"""The package's import structure: no cycles, and ``import dino_d2`` registers DINO."""

import ast
import os
import subprocess
import sys

import dino_d2

PACKAGE_DIR = os.path.dirname(os.path.abspath(dino_d2.__file__))


def _module_name(path):
    relative = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[: -len(".py")]
    parts = relative.split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules():
    found = {}
    for root, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                found[_module_name(path)] = path
    return found


def _imports(module, path, modules):
    """dino_d2 modules that ``module`` imports explicitly, anywhere in the file (functions too).

    ``from package import name`` counts as importing ``package.name`` when that is a module,
    else ``package``; a package's own ``__init__`` is not implied by importing its submodules.
    """
    is_package = path.endswith("__init__.py")
    base = module if is_package else module.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                target = f"{anchor}.{node.module}" if node.module else anchor
            else:
                target = node.module
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                edges.add(candidate if candidate in modules else target)
    return {edge for edge in edges if edge in modules and edge != module}


def _find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_module_imports_a_module_that_imports_it_back():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # The scan sees edges to packages and to modules.
    assert "dino_d2.modeling.meta_arch" in graph["dino_d2.modeling"]
    assert "dino_d2.modeling.meta_arch.dino" in graph["dino_d2.modeling.meta_arch"]
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_dino_d2_registers_the_meta_architecture():
    code = (
        "import dino_d2\n"
        "from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY\n"
        "assert 'DINO' in META_ARCH_REGISTRY, 'DINO not registered'\n"
        "assert 'build_swin_backbone' in BACKBONE_REGISTRY, 'Swin not registered'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def _reachable(graph, start):
    seen, todo = set(), [name for name in graph if name == start or name.startswith(start + ".")]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    return seen


def test_training_imports_no_measurement_or_export_code():
    """engine/ (the training) stands below measure/ and export/: they import it, not the reverse,
    also through other packages."""
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    reached = _reachable(graph, "dino_d2.engine")
    assert "dino_d2.engine.training" in reached and "dino_d2.layers.fast_path" in reached
    forbidden = ("dino_d2.measure", "dino_d2.export")
    assert sorted(m for m in reached if m.startswith(forbidden)) == []
    # The check sees such an import: measure reaches both.
    assert {"dino_d2.engine.training", "dino_d2.export.verify"} <= _reachable(
        graph, "dino_d2.measure"
    )
