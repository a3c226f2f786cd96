"""The code blocks of README.md and docs/*.md, read and checked as a user would meet them.

Every fenced block names its language: ``python`` (or ``py``) blocks run, in order, one namespace
per page, in a fresh folder holding ``photo.jpg``, with a stand-in Hugging Face Hub on 127.0.0.1
serving every pretrained tag (small random DenseNets laid out as timm's repos); ``bash`` blocks
are checked line by line (:func:`check_shell_command`); ``text`` blocks are prose. A Python block
that cannot run here has ``<!-- not run: REASON -->`` on the line directly above its fence.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
import shutil
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

PYTHON, SHELL, TEXT = ("python", "py"), ("bash", "sh", "shell"), ("text",)
_FENCE = re.compile(r"^```(\S*)\s*$")
_NOT_RUN = re.compile(r"^<!-- not run: (\S.*?) -->$")
# Commands a shell block may use besides the ones checked below: what a user types around them.
OTHER_COMMANDS = {"cd", "export", "source", "git"}


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    not_run: str | None  # the reason given directly above the fence

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, in order."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{path.relative_to(ROOT)}:{i + 1}: a code block that is never closed"
        above = _NOT_RUN.match(lines[i - 1].strip()) if i else None
        found.append(Block(path, i + 1, match[1], "\n".join(lines[i + 1:end]) + "\n",
                           above[1] if above else None))
        i = end + 1
    return found


# --- shell lines ---

def shell_commands(block: Block) -> list[list[str]]:
    """Each simple command of a shell block as its words: continuation lines joined, comments and a
    leading ``$ `` dropped, ``&&``, ``||``, ``;`` and ``|`` splitting commands, and leading
    ``NAME=value`` assignments (``XLA_FLAGS=... densenet-jax train``) left out."""
    text = re.sub(r"\\\n", " ", block.code)
    commands = []
    for line in text.splitlines():
        line = re.sub(r"^\s*\$ ", "", line)
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        for word in [*lexer, ";"]:
            if word in (";", "&&", "||", "|", "&"):
                while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
                    words.pop(0)
                if words:
                    commands.append(words)
                words = []
            else:
                words.append(word)
    return commands


@cache
def cli_parser() -> argparse.ArgumentParser:
    from densenet_jax import cli
    return cli.parser()


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """The ``densenet-jax`` commands' parsers, by name."""
    action = next(a for a in cli_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options_of(command: str) -> set[str]:
    """Every option string of ``densenet-jax <command>``."""
    return {s for a in subcommands()[command]._actions for s in a.option_strings}


def check_cli_words(words: list[str], where: str) -> None:
    """``densenet-jax`` and its arguments: the command exists, every ``--option`` is one of its own
    (spelled in full: argparse would also take a prefix), and the whole line parses."""
    assert len(words) > 1 and words[1] in subcommands(), f"{where}: no densenet-jax command in {words}"
    known = options_of(words[1])
    for word in words[2:]:
        if word.startswith("-") and not re.fullmatch(r"-\d.*", word):
            option = word.split("=", 1)[0]
            assert option in known, f"{where}: densenet-jax {words[1]} has no option {option}"
    if "-h" in words or "--help" in words:
        return
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            cli_parser().parse_args(words[1:])
    except SystemExit:
        raise AssertionError(f"{where}: {shlex.join(words)}\n{stderr.getvalue().strip()}") from None


def check_inline_cli(text: str, where: str) -> None:
    """Inline spans that start with ``densenet-jax <command>`` name options that command has."""
    for span in re.findall(r"`(densenet-jax [^`]+)`", text):
        words = span.split()
        assert words[1] in subcommands(), f"{where}: `{span}`: no densenet-jax command {words[1]}"
        for word in words[2:]:
            if word.startswith("--"):
                assert word.split("=", 1)[0] in options_of(words[1]), \
                    f"{where}: `{span}`: densenet-jax {words[1]} has no option {word}"


def _script_options(path: Path, words: list[str], where: str) -> None:
    """A script from the checkout exists, and each ``--option`` given it is one it defines; a script
    that hands its arguments to the command (``main(["convert", *sys.argv[1:]])``) is checked as
    that command line."""
    assert (ROOT / path).is_file(), f"{where}: {path} does not exist"
    source = (ROOT / path).read_text()
    wrapped = re.search(r"main\(\[((?:\"[\w-]+\", )*)\*sys\.argv\[1:\]\]\)", source)
    if wrapped:
        check_cli_words(["densenet-jax", *re.findall(r"\"([\w-]+)\"", wrapped[1]), *words], where)
        return
    for word in words:
        if word.startswith("--"):
            option = word.split("=", 1)[0]
            assert f'"{option}"' in source, f"{where}: {path} defines no option {option}"


def _paths_exist(words: list[str], where: str) -> None:
    """Arguments that name a file of the checkout (tests/..., examples/...) name one that exists."""
    for word in words:
        top = word.split("/", 1)[0]
        if "/" in word and top in ("tests", "examples", "convert", "benchmarks", "docs"):
            assert (ROOT / word.split("::", 1)[0]).exists(), f"{where}: {word} does not exist"


def _extras() -> set[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(pyproject["project"]["optional-dependencies"])


def check_shell_command(words: list[str], where: str) -> None:
    """One command of a shell block, checked against what it names:

    - ``densenet-jax CMD ...`` and ``python -m densenet_jax CMD ...``: :func:`check_cli_words`;
    - ``./run.sh JOB ...``: a job run.sh has (``train`` arguments parse as ``densenet-jax train``'s,
      ``test`` arguments name test files that exist);
    - ``python PATH.py ...`` and ``bash PATH.sh``: the file exists and defines each ``--option``;
    - ``pip install``: every extra named (``.[train]``, ``densenet-jax[train]``) is in pyproject.toml;
    - anything else must be one of OTHER_COMMANDS.
    """
    head, args = words[0], words[1:]
    if head == "densenet-jax":
        check_cli_words(words, where)
    elif head in ("python", "python3") and args[:2] == ["-m", "densenet_jax"]:
        check_cli_words(["densenet-jax", *args[2:]], where)
    elif head in ("python", "python3") and args[:2] == ["-m", "pytest"]:
        _paths_exist(args[2:], where)
    elif head in ("python", "python3", "bash") and args and args[0].endswith((".py", ".sh")):
        _script_options(Path(args[0]), args[1:], where)
    elif head == "./run.sh":
        jobs = re.findall(r"^\s*(\w+)\)", (ROOT / "run.sh").read_text(), re.M)
        assert args and args[0] in jobs, f"{where}: run.sh has the jobs {jobs}, not {args[:1]}"
        if args[0] == "train":
            check_cli_words(["densenet-jax", "train", *args[1:]], where)
        else:
            _paths_exist(args[1:], where)
    elif head == "pip" or words[:3] == ["python", "-m", "pip"]:
        for extras in re.findall(r"\[([\w,-]+)\]", " ".join(args)):
            for extra in extras.split(","):
                assert extra in _extras(), f"{where}: pyproject.toml has no extra [{extra}]"
    else:
        assert head in OTHER_COMMANDS, f"{where}: {head}: a command the doc test does not know"


# --- links and references ---

def check_links(path: Path) -> None:
    """Relative Markdown links point at files (and, with ``#anchor``, headings) that exist."""
    text = path.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        destination = (path.parent / file).resolve() if file else path
        assert destination.exists(), f"{path.relative_to(ROOT)}: link to {target}: no such file"
        if anchor and destination.suffix == ".md":
            assert anchor in headings(destination), f"{path.relative_to(ROOT)}: link to {target}: no such heading"


def headings(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    names = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", name.strip().lower()).replace(" ", "-") for name in names}


def cited_tests(text: str) -> set[tuple[str, str]]:
    """``test_x.py::test_y`` references (also ``::test_y`` after a file named before it)."""
    cited, current = set(), None
    for filename, test in re.findall(r"(test_\w+\.py)?::(\w+)", text):
        current = filename or current
        if current:
            cited.add((current, test))
    return cited


# --- the world the Python blocks run in ---

TINY = dict(growth_rate=8, block_config=(2, 2, 2))  # a densenet121-shaped model that runs in seconds


@cache
def tiny_repo_files(tag: str) -> dict[str, bytes]:
    """The files of timm's Hub repo for ``tag``, holding a small random DenseNet: ``model.safetensors``
    in torchvision's key layout and timm's ``config.json``, with the tag's preprocessing."""
    import numpy as np
    import safetensors.numpy
    from flax import nnx

    import densenet_jax as dj
    from densenet_jax.model.registry import TAGS
    from densenet_jax.weights.format import state_arrays
    from densenet_jax.weights.torch_keys import to_torchvision

    cfg = TAGS[tag]
    model = dj.create_model(cfg.architecture, **TINY, rngs=nnx.Rngs(0))
    arrays = to_torchvision({k: np.asarray(v) for k, v in state_arrays(model).items()}, model.config)
    preprocessing = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.eval_config().items()}
    config = {"architecture": cfg.architecture, "num_classes": 1000, "num_features": model.config.num_features,
              "model_args": TINY, "pretrained_cfg": {**preprocessing, "num_classes": 1000}}
    return {"config.json": json.dumps(config).encode(), "model.safetensors": safetensors.numpy.save(arrays)}


@contextlib.contextmanager
def doc_world(folder: Path, monkeypatch):
    """Run in ``folder`` (holding ``photo.jpg``), with huggingface_hub's cache in it and its endpoint
    a stand-in Hub serving every pretrained tag's repo. huggingface_hub reads its environment when
    imported, so its module constants are pointed there too (as tests/test_hub.py does)."""
    import sklearn
    from huggingface_hub import constants

    from densenet_jax.model.registry import TAGS
    from hub_server import Hub

    hub = Hub()
    try:
        for tag, cfg in TAGS.items():
            hub.add(cfg.hf_hub_id, tiny_repo_files(tag))
        home = folder / "hf"
        monkeypatch.setenv("HF_HOME", str(home))
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"))
        shutil.copy(Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg", folder / "photo.jpg")
        monkeypatch.chdir(folder)
        yield hub
    finally:
        hub.close()


def run_python_blocks(path: Path) -> dict:
    """Run the page's Python blocks in order in one namespace (in the current folder); tracebacks
    point at the page's own lines. Returns the namespace."""
    namespace = {"__name__": "__main__"}
    for block in blocks(path):
        if block.lang in PYTHON and block.not_run is None:
            exec(compile("\n" * block.line + block.code, str(path), "exec"), namespace)
    return namespace
