"""The package layout the README's Architecture section describes: no import cycles (function-level imports
included), and imports between folders only go downwards."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "omni_jax")
#: Folder (or top-level module) -> layer; a module may import only from its own layer or lower ones.
LAYERS = {"config": 0, "errors": 0, "buckets": 0, "rng": 0, "sharding": 1, "nn": 2, "processing": 3, "models": 4,
          "checkpoint": 5, "runtime": 6, "cli": 7, "pipeline": 8, "serving": 8, "__init__": 8}


def _modules() -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(d, f)
    return out


def _imports(path: str, name: str, modules: dict[str, str]) -> set[str]:
    """omni_jax modules `path` imports anywhere (module level or inside functions)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    is_pkg = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(parts + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names} & set(modules)
            found |= subs if subs else {base}  # `from pkg import submodule` imports the submodule
    return {m for m in found if m in modules and m != name}


def _graph():
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    return LAYERS[part]


def test_every_module_has_a_layer():
    assert {m.split(".")[1] for m in _graph() if "." in m} <= set(LAYERS)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph[node]):
            if dep.startswith(node + "."):  # a package importing its own submodules (re-exports)
                continue
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_imports_go_downwards():
    bad = [(m, d) for m, deps in _graph().items() for d in deps
           if _layer(d) > _layer(m) and not d.startswith(m + ".")]
    assert not bad, bad
