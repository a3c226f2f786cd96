"""The pages of docs/ are true of the code: their Python runs, their command lines parse, the tests,
files and figures they cite exist, and the import order architecture.md states holds. Also: every
public name of the library has a docstring."""

import ast
import importlib
import inspect
import pkgutil
import re

import pytest

import densenet_jax
from doc_blocks import (PAGES, PYTHON, ROOT, SHELL, TEXT, blocks, check_inline_cli, check_links,
                        check_shell_command, cited_tests, doc_world, run_python_blocks,
                        shell_commands)

DOCS = [page for page in PAGES if page.parent.name == "docs"]
RESULTS = ROOT / "benchmarks" / "results"


def public_names():
    for info in pkgutil.walk_packages(densenet_jax.__path__, "densenet_jax."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        yield info.name, module
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != info.name:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                yield f"{info.name}.{name}", obj
            if inspect.isclass(obj):
                for method, value in vars(obj).items():
                    if not method.startswith("_") and inspect.isfunction(value):
                        yield f"{info.name}.{name}.{method}", value


def test_every_public_name_has_a_docstring():
    missing = [name for name, obj in public_names() if not (obj.__doc__ or "").strip()]
    assert not missing, missing


@pytest.mark.parametrize("page", [p for p in DOCS if any(b.lang in PYTHON for b in blocks(p))],
                         ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    """Each page's Python blocks, in order, in a fresh folder, against a stand-in Hub. A block that
    cannot run here says why, directly above it; such blocks stay rare."""
    skipped = [b.where() for b in blocks(page) if b.lang in PYTHON and b.not_run]
    assert len(skipped) <= 1, skipped
    with doc_world(tmp_path, monkeypatch):
        run_python_blocks(page)


def test_command_lines_parse_and_links_lead_somewhere():
    """In every page: each block names its language; each shell command passes the checks of
    doc_blocks.check_shell_command (densenet-jax lines parse with the command's own parser, scripts
    and files exist); inline `densenet-jax ...` spans name real options; links resolve."""
    count = 0
    for page in DOCS:
        for block in blocks(page):
            assert block.lang in (*PYTHON, *SHELL, *TEXT), f"{block.where()}: a block without a known language"
            if block.lang in SHELL:
                for words in shell_commands(block):
                    check_shell_command(words, block.where())
                    count += 1
        check_inline_cli(page.read_text(), page.name)
        check_links(page)
    assert count >= 20


def test_cited_tests_and_files_exist():
    """`test_x.py::test_y` names a test that exists, and inline paths of the checkout (tests/...,
    benchmarks/results/...) name files that exist (the package's modules: the module map test).
    reliability.md cites at least 15 tests."""
    for page in PAGES:
        text = page.read_text()
        for filename, test in cited_tests(text):
            source = (ROOT / "tests" / filename).read_text()
            assert f"def {test}(" in source, (page.name, filename, test)
        for path in re.findall(r"`((?:tests|examples|convert|benchmarks|docs)/[\w./-]*)`", text):
            assert (ROOT / path).exists(), (page.name, path)
    assert len(cited_tests((ROOT / "docs" / "reliability.md").read_text())) >= 15


_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?")


def _numbers(text: str) -> list[str]:
    return [n.replace(",", "") for n in _NUMBER.findall(text)]


def test_performance_figures_are_in_the_results_file_named_above_each_table():
    """Every number in a table of performance.md is a number of the benchmarks/results/ file named
    last before the table (rounded to the places shown)."""
    lines = (ROOT / "docs" / "performance.md").read_text().splitlines()
    source, tables = None, 0
    for i, line in enumerate(lines):
        named = re.findall(r"benchmarks/results/([\w.-]+\.md)", line)
        if named:
            source = RESULTS / named[-1]
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        tables += not lines[i - 1].startswith("|")
        assert source is not None and source.is_file(), f"performance.md:{i + 1}: no results file named above"
        measured = [float(n) for n in _numbers(source.read_text())]
        for number in _numbers(line):
            places = len(number.partition(".")[2])
            assert any(round(m, places) == float(number) for m in measured), \
                f"performance.md:{i + 1}: {number} is not in {source.name}"
    assert tables >= 7


def _package(module: str) -> str | None:
    """The architecture.md package of a module (``densenet_jax.model.config`` -> ``model``);
    None for the package's own ``__init__`` and ``__main__``, which may import any."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in ("__init__", "__main__"):
        return None
    return parts[1]


def test_packages_import_only_the_ones_architecture_md_puts_before_them():
    text = (ROOT / "docs" / "architecture.md").read_text()
    (order,) = re.findall(r"^errors.*<.*cli$", text, re.M)
    rank = {name.strip(): i for i, layer in enumerate(order.split("<")) for name in layer.split(",")}
    package_root = ROOT / "densenet_jax"
    assert {p.stem if p.is_file() else p.name for p in package_root.iterdir()
            if p.suffix == ".py" or (p / "__init__.py").exists()} - {"__init__", "__main__"} == set(rank)
    wrong = []
    for path in package_root.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        source = _package(module)
        if source is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                target = _package(name) if name.startswith("densenet_jax.") else None
                if target and target != source and rank[target] >= rank[source]:
                    wrong.append(f"{module} imports {name}")
    assert not wrong, wrong


def test_module_map_names_every_module():
    """architecture.md's module map lists every module of the package, and only modules that exist."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    mapped = set(re.findall(r"^\| `(densenet_jax/[\w/]+\.py)` \|", text, re.M))
    present = {str(p.relative_to(ROOT)) for p in (ROOT / "densenet_jax").rglob("*.py")}
    assert present - mapped == set(), "not in the module map"
    assert mapped - present == set(), "in the module map, not in the package"
