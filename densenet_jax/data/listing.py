"""A folder tree's listing (its sub-folders, and its files with given suffixes), cached on disk so
that listing it again costs one ``stat`` per folder.

A cached folder is trusted only while its status-change time (``st_ctime``) is the one it had when
listed. The kernel sets that time to now whenever an entry is added, removed or renamed, and
whenever anyone sets the modification time (``os.utime``, ``tar``, ``rsync -a`` restoring it), and
no user can set it back; the modification time alone is not enough, since those tools restore it
after changing the folder. Only on local kernel file systems (:data:`TRUSTED_FILE_SYSTEMS`) is
that rule known to hold: elsewhere (FUSE mounts of object stores such as gcsfuse or s3fs, which
report times of their own; network file systems, whose attribute caches lag behind other clients;
any system without ``/proc/self/mountinfo``) every folder is listed afresh. A folder changed less
than two seconds before it was listed is listed again next time too, since a change within the
same timestamp tick would not show. Files' own sizes and times are not kept: rewriting a file's
content leaves the listing true (a file that no longer decodes is found when it is read), and a
``stat`` per file would cost several times the listing itself. The cache lives in
``~/.cache/densenet-jax/listings`` (``DENSENET_JAX_LISTINGS`` moves it; empty turns it off), one
JSON file per listed folder, written atomically; one that is damaged or was made for another folder
or version is ignored and rewritten.

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

from densenet_jax.errors import CheckpointError, DataError
from densenet_jax.files import atomic_write_bytes, cache_unusable

log = logging.getLogger("densenet_jax")

CACHE_ENV = "DENSENET_JAX_LISTINGS"
_VERSION = 2
_NAME = "folder listing cache (folders are listed instead)"
_RACY_NS = 2_000_000_000
# File systems whose kernel driver keeps a folder's ctime as described above (ext4, xfs, btrfs, zfs
# and the like; tmpfs and overlayfs in containers), as /proc/self/mountinfo names them.
TRUSTED_FILE_SYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "jfs", "reiserfs",
                                  "bcachefs", "tmpfs", "ramfs", "overlay", "apfs", "hfsplus"})

# A listed folder: {"mtime_ns": int, "ctime_ns": int, "listed_ns": int, "dirs": [name], "hidden": [name],
# "files": [name]}
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
    trusted = _trusted_devices() if cache else set()
    if cache and not (root.is_dir() and root.stat().st_dev in trusted):
        cache = None  # a cache that would never be trusted is neither read nor written
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
        if not (entry and st.st_dev in trusted and entry["mtime_ns"] == st.st_mtime_ns
                and entry["ctime_ns"] == st.st_ctime_ns and entry["ctime_ns"] < entry["listed_ns"] - _RACY_NS):
            entry, listed = _list_folder(folder, st, suffixes), listed + 1
        tree[rel] = entry
        stack += [(f"{rel}/{d}" if rel else d, folder / d, ancestors | {identity}) for d in entry["dirs"]]
    if cache and (listed or tree.keys() != cached.keys()):
        _write_cache(cache, root, suffixes, tree)
    return tree


def _trusted_devices() -> set[int]:
    """The devices (``st_dev``) of the mounted file systems whose folder ctimes can be trusted; an
    empty set where the mounts cannot be read (not Linux)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text(errors="replace").splitlines()
    except OSError:
        return set()
    devices = set()
    for line in lines:  # "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw" (proc(5))
        fields = line.split()
        if " - " not in line or len(fields) < 3:
            continue
        fs_type = line.split(" - ", 1)[1].split()[0]
        major, _, minor = fields[2].partition(":")
        if fs_type in TRUSTED_FILE_SYSTEMS and major.isdigit() and minor.isdigit():
            devices.add(os.makedev(int(major), int(minor)))
    return devices


def _list_folder(folder: Path, st: os.stat_result, suffixes: tuple[str, ...]) -> Folder:
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
    return {"mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "listed_ns": listed_ns, "dirs": sorted(dirs),
            "hidden": sorted(hidden), "files": sorted(files)}


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
    except OSError as e:
        cache_unusable(_NAME, path.parent, path, f"cannot read it: {e.strerror}")
        return {}
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        log.info("%s: listing cache not usable (%s); listing %s again", path, e, root)
        return {}


def _valid_folder(entry) -> bool:
    def names(x):
        return isinstance(x, list) and all(isinstance(n, str) for n in x)

    times = ("mtime_ns", "ctime_ns", "listed_ns")
    return (isinstance(entry, dict) and all(isinstance(entry.get(k), int) for k in times) and names(entry.get("dirs"))
            and names(entry.get("hidden")) and names(entry.get("files")))


def _write_cache(path: Path, root: Path, suffixes: tuple[str, ...], tree: Tree) -> None:

    payload = {"version": _VERSION, "root": str(root), "suffixes": list(suffixes), "folders": tree}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(payload, separators=(",", ":")).encode())
    except OSError as e:  # a read-only or full home
        cache_unusable(_NAME, path.parent, path, f"cannot write: {e.strerror}")
    except CheckpointError as e:  # atomic_write_bytes' one line for a file it cannot create
        cache_unusable(_NAME, path.parent, path, str(e).removeprefix(f"{path}: "))
