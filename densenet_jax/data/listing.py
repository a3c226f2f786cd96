"""A folder tree's listing (its sub-folders, and its files with given suffixes), cached on disk so
that listing it again costs one ``stat`` per folder.

Adding, removing or renaming an entry changes its folder's modification time, so a cached folder
whose time is unchanged still holds the same names and is not read again; any other folder is
listed afresh. A folder modified less than two seconds before it was listed is listed again next
time too, since a change within the same timestamp tick (coarse clocks; FAT keeps 2 s) would not
show. Files' own sizes and times are not kept: rewriting a file's content leaves the listing true
(a file that no longer decodes is found when it is read), and a ``stat`` per file would cost
several times the listing itself. The cache lives in ``~/.cache/densenet-jax/listings``
(``DENSENET_JAX_LISTINGS`` moves it; empty turns it off), one JSON file per listed folder, written atomically; one that is damaged or
was made for another folder is ignored and rewritten.

Names starting with a dot are hidden: recorded as such, never descended into (``.git``,
``.ipynb_checkpoints``). Symbolic links are followed, except back into a folder being listed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from densenet_jax.errors import DataError
from densenet_jax.files import atomic_write_bytes

log = logging.getLogger("densenet_jax")

CACHE_ENV = "DENSENET_JAX_LISTINGS"
_VERSION = 1
_RACY_NS = 2_000_000_000

# A listed folder: {"mtime_ns": int, "listed_ns": int, "dirs": [name], "hidden": [name], "files": [name]}
Folder = dict
# Folders by path relative to the root, "" the root itself, "/" between names.
Tree = dict[str, Folder]


def default_cache_dir() -> Path | None:
    """Where listings are cached: ``$DENSENET_JAX_LISTINGS`` (empty: nowhere), else
    ``~/.cache/densenet-jax/listings``."""
    folder = os.environ.get(CACHE_ENV, os.path.expanduser("~/.cache/densenet-jax/listings"))
    return Path(folder) if folder else None


def list_tree(root: str | os.PathLike, suffixes: tuple[str, ...],
              cache_dir: Path | None = None) -> Tree:
    """Every folder under ``root`` (``root`` included), with its sub-folders and its files whose
    names end with one of ``suffixes`` (lower case; compared case-insensitively), reusing and
    refreshing the cached listing in ``cache_dir`` (default: ``default_cache_dir()``).

    Raises DataError naming a folder that cannot be listed."""
    root = Path(os.path.abspath(root))
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    cache = cache_dir / _cache_name(root, suffixes) if cache_dir else None
    cached = _read_cache(cache, root, suffixes) if cache else {}
    tree, listed = {}, 0
    stack = [("", root, frozenset())]
    while stack:
        rel, folder, ancestors = stack.pop()
        try:
            st = os.stat(folder)
        except OSError as e:
            raise DataError(f"{folder}: cannot list ({e.strerror})") from None
        identity = (st.st_dev, st.st_ino)
        if identity in ancestors:
            continue  # a link back up the tree (os.walk(followlinks=True) would go round forever)
        entry = cached.get(rel)
        if not (entry and entry["mtime_ns"] == st.st_mtime_ns
                and entry["mtime_ns"] < entry["listed_ns"] - _RACY_NS):
            entry, listed = _list_folder(folder, st.st_mtime_ns, suffixes), listed + 1
        tree[rel] = entry
        stack += [(f"{rel}/{d}" if rel else d, folder / d, ancestors | {identity}) for d in entry["dirs"]]
    if cache and (listed or tree.keys() != cached.keys()):
        _write_cache(cache, root, suffixes, tree)
    return tree


def _list_folder(folder: Path, mtime_ns: int, suffixes: tuple[str, ...]) -> Folder:
    listed_ns = time.time_ns()  # taken before reading, so that a change during the read counts as racy
    dirs, hidden, files = [], [], []
    try:
        with os.scandir(folder) as entries:
            for e in entries:
                if e.name.startswith("."):
                    hidden.append(e.name)
                elif e.is_dir():
                    dirs.append(e.name)
                elif e.name.lower().endswith(suffixes):  # a dangling link too, as os.walk lists it
                    files.append(e.name)
    except OSError as e:
        raise DataError(f"{folder}: cannot list ({e.strerror})") from None
    return {"mtime_ns": mtime_ns, "listed_ns": listed_ns, "dirs": sorted(dirs), "hidden": sorted(hidden),
            "files": sorted(files)}


def _cache_name(root: Path, suffixes: tuple[str, ...]) -> str:
    key = json.dumps([str(root), list(suffixes)]).encode()
    return hashlib.sha256(key).hexdigest()[:24] + ".json"


def _read_cache(path: Path, root: Path, suffixes: tuple[str, ...]) -> Tree:
    """The cached tree, or {} when there is none, or it is damaged or not this folder's."""
    try:
        data = json.loads(path.read_bytes())
        if (data["version"], data["root"], data["suffixes"]) != (_VERSION, str(root), list(suffixes)):
            raise ValueError("made for another folder or version")
        tree = data["folders"]
        if not (isinstance(tree, dict) and all(map(_valid_folder, tree.values()))):
            raise ValueError("malformed entries")
        return tree
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        log.info("%s: listing cache not usable (%s); listing %s again", path, e, root)
        return {}


def _valid_folder(entry) -> bool:
    def names(x):
        return isinstance(x, list) and all(isinstance(n, str) for n in x)

    return (isinstance(entry, dict) and isinstance(entry.get("mtime_ns"), int)
            and isinstance(entry.get("listed_ns"), int) and names(entry.get("dirs"))
            and names(entry.get("hidden")) and names(entry.get("files")))


def _write_cache(path: Path, root: Path, suffixes: tuple[str, ...], tree: Tree) -> None:

    payload = {"version": _VERSION, "root": str(root), "suffixes": list(suffixes), "folders": tree}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(payload, separators=(",", ":")).encode())
    except (OSError, ValueError) as e:  # a read-only home: the cache only saves time
        log.info("%s: listing cache not written (%s)", path, e)
