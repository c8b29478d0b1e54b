"""The code a pipeline stage runs, as the files dvc.yaml must list in its `deps`.

DVC re-runs a stage when one of its deps changes, so each stage must depend on exactly its own code: all of it
(or a change would not re-run the stage) and nothing else (or editing the export would re-run the 12.5 GB
download and conversion). The list is computed from the imports: the stage's script, its module in
glm3.pipeline.stages, every glm3 module those import (also inside functions: that is where stages import the
library they call) and the function-level imports of those modules (the library functions a stage calls), and
then every module-level import of all of these, transitively; plus the non-Python files some modules read.
Imports inside functions further away are not followed: they belong to code the stage does not run (e.g.
generation, which `glm3.dialog.conversation` imports only when it chats). `python -m glm3.pipeline.code_deps`
prints the list per stage; the tests check dvc.yaml against it.
"""

from __future__ import annotations

import ast
import os
import sys

from glm3 import native

# Files (relative to the package) that modules read at run time, besides their imports.
DATA_FILES = {
    "glm3.kernels.library": tuple(f"csrc/{name}" for name in native.KERNEL_SOURCES + native.HEADERS),
    "glm3.weights.synthetic": ("assets",),
    "glm3.train.parallel": ("launch",),
    "glm3.train.signals": (f"csrc/{native.SIGTERM_SENDER}",),
}


def _package_dir() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../src/glm3


def _module_file(module: str) -> str | None:
    """The source file of a glm3 module, or None if `module` is not one (e.g. a function's name)."""
    parts = module.split(".")
    if parts[0] != "glm3":
        return None
    base = os.path.join(os.path.dirname(_package_dir()), *parts)
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _imports(path: str, inside_functions: bool) -> set[str]:
    """glm3 modules a source file imports at module level, or anywhere in it with inside_functions (absolute
    imports; the package uses no others)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found: set[str] = set()
    nodes = _runtime_nodes(tree) if inside_functions else _module_level(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "glm3")
        elif (
            isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "glm3"
        ):
            found.add(node.module)
            found.update(
                f"{node.module}.{alias.name}" for alias in node.names if _module_file(f"{node.module}.{alias.name}")
            )
    return found


def _type_checking_only(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`): a block that never runs."""
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.Module, functions: bool = True):
    """Every node that can run, function bodies included unless functions=False; `if TYPE_CHECKING:` blocks
    (annotations only) are left out."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if _type_checking_only(node):
            todo.extend(node.orelse)
            continue
        yield node
        if functions or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


def _module_level(tree: ast.Module):
    """The statements that run when the module is imported (not function or method bodies)."""
    return _runtime_nodes(tree, functions=False)


def module_closure(modules: set[str]) -> set[str]:
    """`modules` and every glm3 module they import at module level, transitively, with their parent packages."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        parts = module.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            name = ".".join(parts[:i])
            path = _module_file(name)
            if path is None or name in seen:
                continue
            seen.add(name)
            todo.extend(_imports(path, inside_functions=False))
    return seen


def stage_code(name: str, project: str | os.PathLike) -> list[str]:
    """The deps (paths relative to `project`) of stage `name`'s code, sorted: its script and every file of
    the library it runs."""
    from glm3.pipeline.stages import stage_module

    project = os.path.abspath(project)
    script = os.path.join(project, "stages", f"{name}.py")
    has_script = os.path.isfile(script)  # a project without DVC's scripts (a Prefect-only layout) runs none
    called = _imports(_module_file(stage_module(name)), inside_functions=True) | {stage_module(name)}
    for module in list(called):  # the library functions the stage calls, and what they import to run
        called |= _imports(_module_file(module), inside_functions=True)
    modules = module_closure((_imports(script, inside_functions=True) if has_script else set()) | called)
    files = {os.path.relpath(script, project)} if has_script else set()
    package = _package_dir()
    for module in modules:
        files.add(os.path.relpath(_module_file(module), project))
        for data in DATA_FILES.get(module, ()):
            files.add(os.path.relpath(os.path.join(package, data), project))
    return sorted(files)


if __name__ == "__main__":
    from glm3.pipeline.stages import ORDER

    root = sys.argv[1] if len(sys.argv) > 1 else "."
    for stage in ORDER:
        print(f"{stage}:")
        print("\n".join(f"  - {path}" for path in stage_code(stage, root)))
