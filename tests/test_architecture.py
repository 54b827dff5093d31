"""The package's import graph: no module but the CLI's entry points imports the CLI, no import
circle, and every import runs from a layer to the same or a lower one."""

import ast
from pathlib import Path

import spdecode

ROOT = Path(spdecode.__file__).parent
# Lower number = lower layer; a module may import from its own layer or below.
LAYERS = {"runtime": 1, "data": 1, "drafting": 2, "methods": 3, "training": 3, "distributed": 4, "serve": 4, "plan": 5,
          "generators": 5, "bench": 5,
          "auto": 6, "cli": 7, "__main__": 8}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> spdecode modules it imports (at any depth: function-level imports count)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".") if name else []
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):  # import spdecode.x.y
                found |= {a.name.removeprefix("spdecode").lstrip(".") for a in node.names
                          if a.name.startswith("spdecode")}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.startswith("spdecode"):
                    target = node.module.removeprefix("spdecode").lstrip(".")
                else:
                    continue
                for alias in node.names:  # `from .x import y` may name a submodule y
                    sub = f"{target}.{alias.name}" if target else alias.name
                    found.add(sub if sub in modules else target)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_no_library_module_imports_the_cli():
    users = {m for m, deps in imports().items() if "cli" in deps}
    assert users <= {"__main__"}, users


def test_the_import_graph_has_no_circle():
    graph = {m: d - {""} for m, d in imports().items() if m}  # the package's own __init__ re-exports only
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for d in sorted(graph[m]):
            assert state.get(d) != "open", " -> ".join(path[path.index(d):] + [d])
            if d not in state:
                visit(d)
        path.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_imports_never_run_to_a_higher_layer():
    wrong = []
    for m, deps in imports().items():
        if not m:
            continue
        for d in deps:
            if d and LAYERS[d.split(".")[0]] > LAYERS[m.split(".")[0]]:
                wrong.append(f"{m} -> {d}")
    assert not wrong, wrong


def test_every_method_module_is_used_by_the_package():
    """Demo code lives in scripts/: every module of methods/ is imported by some other module of
    the package (a method the library or its CLI can run), not only by a script or a test."""
    src = Path(__file__).resolve().parents[1] / "src" / "spdecode"
    imported = set()
    for f in src.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.update({node.module.split(".")[-1], *(a.name for a in node.names)})
            elif isinstance(node, ast.Import):
                imported.update(a.name.split(".")[-1] for a in node.names)
    unused = [f.stem for f in (src / "methods").glob("*.py") if f.stem != "__init__" and f.stem not in imported]
    assert not unused, f"methods/ modules nothing in the package imports (move them to scripts/): {unused}"
