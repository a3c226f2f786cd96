"""The package's shape, as docs/architecture.md states it: no import circles, no function-level
imports of our own modules, and modules one can read at once. (That each package imports only those
architecture.md puts before it is tests/test_docs.py's.)"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "densenet_jax"
MAX_LINES = 400

# Optional extras, and libraries that read their settings when imported: these alone may be
# imported inside a function.
LAZY = {"densenet_jax.inference", "grain", "absl", "sklearn", "tqdm", "matplotlib", "torch", "jax2onnx", "onnx", "onnxruntime",
        "skimage", "torchxrayvision",
        "huggingface_hub", "httpx2", "datasets"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, inside a function) for every import in ``path``; ``from a import b``
    counts as ``a.b`` where that is a module of ours."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    found.append((full if full in MODULES else child.module, in_function))
            visit(child, nested)

    visit(ast.parse(path.read_text()), False)
    return found


def test_no_import_circles():
    graph = {name: {t for t, _ in imports(path) if t in MODULES and t != name}
             for name, path in MODULES.items()}
    # Importing a submodule runs its packages' __init__ first; that edge is Python's, not ours.
    done, on_path = set(), []

    def walk(name):
        if name in on_path:
            pytest.fail("import circle: " + " -> ".join(on_path[on_path.index(name):] + [name]))
        if name in done:
            return
        on_path.append(name)
        for target in sorted(graph[name]):
            walk(target)
        on_path.pop()
        done.add(name)

    for name in sorted(graph):
        walk(name)


def test_function_level_imports_are_optional_dependencies_only():
    inside = [f"{name}: {target}" for name, path in MODULES.items() for target, in_function in imports(path)
              if in_function and target not in LAZY and target.split(".")[0] not in LAZY]
    assert not inside


def test_no_module_is_longer_than_a_reader_can_hold():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_the_circle_check_finds_a_circle(tmp_path, monkeypatch):
    """The checks above can fail: a module that imports its importer is found."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import densenet_jax.b\n")
    b.write_text("def f():\n    from densenet_jax import a\n")
    monkeypatch.setitem(MODULES, "densenet_jax.a", a)
    monkeypatch.setitem(MODULES, "densenet_jax.b", b)
    with pytest.raises(pytest.fail.Exception, match="densenet_jax.a -> densenet_jax.b -> densenet_jax.a"):
        test_no_import_circles()
    with pytest.raises(AssertionError):
        test_function_level_imports_are_optional_dependencies_only()
