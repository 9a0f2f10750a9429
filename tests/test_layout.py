"""The layout's two wings, read from the source with ast (nothing is imported): the product (jobs/ and the
Argo-facing workflows/{pipeline,submit}.py) never imports workflows/local/ (running on one machine), the phase
images copy exactly the product, and the project's modules import each other without a circle."""

from __future__ import annotations

import ast
import re

from conftest import REPO

from workflows.local.containers import SOURCES

PRODUCT_WORKFLOWS = ("workflows/__init__.py", "workflows/pipeline.py", "workflows/submit.py")
# third-party packages slow to import: a project module that imports one at its top may be imported lazily
HEAVY = {"torch", "transformers", "peft", "sentence_transformers", "sklearn", "tinker", "datasets", "safetensors"}


def module_name(path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for top in ("jobs", "workflows") for path in sorted((REPO / top).rglob("*.py"))}


def type_only(tree: ast.Module) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:`: never executed, so no import there can make a circle."""
    blocks = [node for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)]
    return {id(node) for block in blocks for statement in block.body for node in ast.walk(statement)}


def imports(name: str) -> list[tuple[str, bool]]:
    """(imported name, at module top level) for every import the module executes: top level and inside functions.
    `from a.b import c` names a.b.c when that is a module of the project, else a.b."""
    tree = ast.parse(MODULES[name].read_text())
    skipped, top = type_only(tree), {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module,
                       id(node) in top) for alias in node.names]
    return found


def project_module(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for name in MODULES:
        targets = {project_module(imported) for imported, _ in imports(name)}
        edges[name] = {target for target in targets if target and target != name}
    return edges


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports, as a path that ends where it starts; None when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def is_product(name: str) -> bool:
    return name.split(".")[0] == "jobs" or str(MODULES[name].relative_to(REPO)) in PRODUCT_WORKFLOWS


def test_the_product_never_imports_what_runs_it_on_one_machine():
    def local(name: str, imported: str) -> bool:  # jobs/ imports nothing of workflows/ at all
        return imported.startswith("workflows.local" if name.startswith("workflows") else "workflows")

    offending = [f"{name} imports {imported}" for name in MODULES if is_product(name)
                 for imported, _ in imports(name) if local(name, imported)]
    assert not offending, offending
    assert any(name.startswith("workflows.local.") for name in MODULES), "workflows/local/ is gone: update this test"


def test_the_modules_import_each_other_without_a_circle():
    edges = graph()
    assert ("workflows.local.runner", "workflows.local.steps") in {(a, b) for a in edges for b in edges[a]}
    found = cycle(edges)
    assert found is None, "import circle: " + " -> ".join(found or [])


def test_the_cycle_finder_finds_a_circle_behind_a_function_local_import():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_only_heavy_modules_are_imported_inside_functions():
    """A function-local import of the project's own module is there only to keep torch and the like out of
    `python -m jobs --help` and the CLI: the module imported must import such a package at its top."""
    def heavy(name: str) -> bool:
        return any(imported.split(".")[0] in HEAVY for imported, at_top in imports(name) if at_top)

    lazy = {(name, target) for name in MODULES for imported, at_top in imports(name)
            if not at_top and (target := project_module(imported))}
    cheap = sorted(f"{name} imports {target} inside a function" for name, target in lazy if not heavy(target))
    assert not cheap, cheap


def test_the_phase_images_copy_exactly_the_product():
    dockerfile = (REPO / "images" / "base" / "Dockerfile").read_text()
    copied = [source for line in re.findall(r"^COPY (.+)$", dockerfile, re.MULTILINE)
              for source in line.split()[:-1]]
    assert sorted(copied) == sorted(SOURCES), "images/base/Dockerfile and workflows/local/containers.py SOURCES differ"
    assert not [source for source in copied if source.startswith("workflows/local")]
    # every project module the product imports, transitively, is in what the image copies
    edges, seen, todo = graph(), set(), [name for name in MODULES if is_product(name)]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += edges[name]
    paths = [MODULES[name].relative_to(REPO).as_posix() for name in seen]
    missing = sorted(path for path in paths
                     if not any(path == source or path.startswith(source + "/") for source in SOURCES))
    assert not missing, f"the product imports modules the images lack: {missing}"
