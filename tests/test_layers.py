"""The library's dependencies point one way (docs/architecture.md, "Layers"): a module imports only from its own
layer or the layers below it, at module level and inside functions alike."""

import ast
import os

import pytest

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")

# Bottom to top. A package's layer is its first name under glm3; "glm3" is the package's own __init__.
LAYERS = (
    ("glm3", "lazy", "io", "settings", "dtypes", "native", "quantization"),
    ("kernels",),
    ("modeling",),
    ("weights", "memory"),
    ("runtime",),
    ("deploy", "dialog"),
    ("data",),
    ("train",),
    ("eval",),
    ("serve",),
    ("pipeline",),
    ("cli",),
    ("launch",),
)
RANK = {part: level for level, parts in enumerate(LAYERS) for part in parts}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return "glm3" if len(parts) == 1 else parts[1]


def module_name(path: str, src: str) -> str:
    name = os.path.relpath(path, src)[: -len(".py")].replace(os.sep, ".")
    return name.removesuffix(".__init__")


def imports_of(path: str) -> list[tuple[str, int]]:
    """Every glm3 module a file imports, with its line: `import glm3.x`, `from glm3.x import y`, `from glm3
    import x` (x is then the module, or a name of glm3's own namespace)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "glm3":
                found += [(f"glm3.{alias.name}", node.lineno) for alias in node.names]
            elif node.module.startswith("glm3."):
                found.append((node.module, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append(("<relative>", node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "glm3"]
    return found


def scan(src: str) -> tuple[int, list[str]]:
    """(number of glm3 imports seen, the ones that break the layering)."""
    seen, bad = 0, []
    for directory, _, files in os.walk(os.path.join(src, "glm3")):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            module = module_name(path, src)
            for target, line in imports_of(path):
                seen += 1
                where = f"{os.path.relpath(path, src)}:{line}"
                if target == "<relative>":
                    bad.append(f"{where}: relative import (use the absolute glm3 name)")
                    continue
                source_layer, target_layer = layer_of(module), layer_of(target)
                if source_layer not in RANK or target_layer not in RANK:
                    unknown = source_layer if source_layer not in RANK else target_layer
                    bad.append(f"{where}: glm3.{unknown} is in no layer (add it to LAYERS and docs/architecture.md)")
                elif target_layer != "glm3" and RANK[target_layer] > RANK[source_layer]:
                    bad.append(f"{where}: {module} imports {target}, a layer above it")
    return seen, bad


def test_every_import_points_down_the_layers():
    seen, bad = scan(SRC)
    assert seen > 300  # the scan reads the real tree (hundreds of imports), not an empty directory
    assert bad == []


def test_every_package_and_top_level_module_has_a_layer():
    entries = {e.removesuffix(".py") for e in os.listdir(os.path.join(SRC, "glm3"))}
    python = {
        e
        for e in entries
        if os.path.isfile(os.path.join(SRC, "glm3", e + ".py"))
        or os.path.isfile(os.path.join(SRC, "glm3", e, "__init__.py"))
    }
    assert python - {"__init__", "__main__"} - set(RANK) == set()


@pytest.mark.parametrize(
    ("source", "line", "expected"),
    [
        ("kernels/rope.py", "from glm3.modeling.config import GLM3Config", "a layer above it"),
        ("runtime/engine.py", "    from glm3.deploy.export import EXPORT_CONFIG", "a layer above it"),  # in a function
        ("modeling/linear.py", "import glm3.serve.app", "a layer above it"),
        ("weights/merge.py", "from glm3 import train", "a layer above it"),
        ("modeling/model.py", "from . import build", "relative import"),
        ("kernels/fancy.py", "from glm3.plugins import x", "in no layer"),
    ],
)
def test_the_scan_reports_an_upward_import(tmp_path, source, line, expected):
    path = tmp_path / "glm3" / source
    path.parent.mkdir(parents=True)
    body = f"def f():\n{line}\n" if line.startswith(" ") else f"{line}\n"
    path.write_text(body, encoding="utf-8")
    (tmp_path / "glm3" / "io.py").write_text("from glm3.dtypes import ITEMSIZE\nimport glm3.lazy\n", encoding="utf-8")
    seen, bad = scan(str(tmp_path))
    assert seen == 3
    assert len(bad) == 1 and expected in bad[0] and source in bad[0]
