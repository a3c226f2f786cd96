"""The README is a front page that works: its Python runs, its command lines parse, its tables
are the registry's, and its links lead somewhere (the checks themselves are in doc_blocks.py)."""

import re

import densenet_jax as dj
from densenet_jax.model.registry import TAGS
from doc_blocks import (PYTHON, ROOT, SHELL, TEXT, blocks, check_inline_cli, check_links,
                        check_shell_command, doc_world, run_python_blocks, shell_commands)

README = ROOT / "README.md"


def test_readme_is_a_front_page():
    """At most 250 lines, the two commands near the top, and a link to every page of docs/."""
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 250, len(lines)
    top = "\n".join(lines[:30])
    assert "./run.sh train" in top and "./run.sh test" in top
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in text, f"README links no docs/{page.name}"


def test_readme_python_runs(tmp_path, monkeypatch):
    """Every Python block, in order, against a stand-in Hub serving the pretrained tags."""
    assert not [b.where() for b in blocks(README) if b.lang in PYTHON and b.not_run]
    with doc_world(tmp_path, monkeypatch) as hub:
        namespace = run_python_blocks(README)
    assert any("densenet121.tv_in1k" in path for _, path in hub.requests)  # the quick start downloaded
    assert (tmp_path / "bc100.safetensors").is_file()
    assert namespace["tuned"].config.num_classes == 5


def test_readme_command_lines_parse():
    """Every block names its language, every shell command is one the checks know and passes them,
    and inline `densenet-jax ...` spans name options their command has."""
    found = blocks(README)
    assert {b.lang for b in found} <= {*PYTHON, *SHELL, *TEXT}, [(b.where(), b.lang) for b in found]
    commands = [(b.where(), words) for b in found if b.lang in SHELL for words in shell_commands(b)]
    assert len(commands) >= 8
    for where, words in commands:
        check_shell_command(words, where)
    check_inline_cli(README.read_text(), "README.md")
    check_links(README)


def test_readme_tables_are_the_registry():
    """The models table's parameter counts are count_params', its names and tags the registry's;
    the tags table's top-1 figures are the ones the tags carry."""
    text = README.read_text()
    rows = re.findall(r"^\| `(\w+)` \| ([\d,]+) \| .* \| (.*) \|$", text, re.M)
    assert [name for name, _, _ in rows] == dj.list_models()
    for name, params, tags in rows:
        assert int(params.replace(",", "")) == dj.count_params(dj.get_config(name)), name
        listed = set(re.findall(r"`(\w+)`", tags))
        assert listed == {t.split(".")[1] for t in TAGS if t.split(".")[0] == name}, name
    tag_rows = dict(re.findall(r"^\| `(\w+\.\w+)` \| (.*)$", text, re.M))
    assert set(tag_rows) == set(TAGS)
    for tag, row in tag_rows.items():
        figures = {float(x) for x in re.findall(r"(?<![\d.])(\d\d\.\d{3})(?![\d.])", row)}
        assert figures == {t.value for t in TAGS[tag].top1}, tag
