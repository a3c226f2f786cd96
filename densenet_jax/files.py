"""Writing a user's files safely: every output is refused before the work if it cannot be written,
and is written under a temporary name then renamed, so that no half-written file ever remains and
an existing file is replaced only when the new one is complete."""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from densenet_jax.errors import CheckpointError

log = logging.getLogger("densenet_jax")
_unusable: set[Path] = set()  # cache folders already warned about
# How TensorStore (under Orbax) reports ENOSPC: a ValueError whose text carries the OS error code.
_TENSORSTORE_ENOSPC = f"[os_error_code='{errno.ENOSPC}']"


def check_output(path: str | os.PathLike, *, force: bool = False, source: str | os.PathLike | None = None) -> None:
    """CheckpointError, before any work, unless ``path`` can be written: it is not the file ``source``
    being read, it does not exist yet (or ``force``), and its folder exists and is writable."""
    path = Path(path)
    if path.exists() and source is not None and path.resolve() == Path(source).resolve():
        raise CheckpointError(f"{path}: is the input file; write the output elsewhere")
    if path.exists() and not force:
        raise CheckpointError(f"{path}: already exists (pass --force to overwrite)")
    if not path.parent.is_dir():
        raise CheckpointError(f"{path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise CheckpointError(f"{path}: cannot write in {path.parent}")


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it, so no half-written file remains.

    The file gets the mode the umask gives a new file (0644 under the usual 022), as ``open`` would:
    the temporary file is created with 0666 and the kernel applies the umask (``mkstemp``'s 0600
    would survive the rename and hide the file from colleagues sharing a runs folder). It is
    fsynced before the rename, so a power cut leaves the old file or the new one, never an empty one.
    """
    path = Path(path)
    if path.is_dir():  # os.replace would fail after the write; say so first, in one line
        raise CheckpointError(f"{path}: is a folder; name a file to write")
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_folder_output(path: str | os.PathLike, names, *, force: bool = False) -> None:
    """CheckpointError, before any work, unless folder ``path`` can be written with files ``names``:
    it is new, or (with ``force``) a file-free earlier output of the same ``names``. A folder that
    holds anything else is refused first, so that the advice to pass --force is never given where
    --force would be refused too."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: is a file; name a folder to write")
    others = sorted(p.name for p in path.iterdir() if p.name not in names) if path.is_dir() else []
    if others:  # --force replaces an earlier export, never a folder of the user's own files
        raise CheckpointError(f"{path}: holds {others[0]}" + (f" and {len(others) - 1} more" if len(others) > 1 else "")
                              + f", not only {' and '.join(names)}; write to a new or empty folder")
    check_output(path, force=force)


def write_folder(path: Path, files: dict[str, bytes], *, force: bool = False) -> None:
    """Create folder ``path`` holding ``files``, atomically: built as a hidden folder beside it,
    then renamed. An existing ``path`` is replaced only with ``force`` (and only once the new one
    is complete), and only when it holds nothing but ``files`` (an earlier export): CheckpointError
    for a folder holding anything else, which is never deleted."""
    path = Path(path)
    check_folder_output(path, files, force=force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private (0700); a made folder is not
        for name, payload in files.items():
            (tmp / name).write_bytes(payload)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old / path.name, path)  # put the user's folder back
        if isinstance(e, OSError):
            raise CheckpointError(f"{path}: cannot write ({e.strerror})") from None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def cache_unusable(name: str, folder: Path, path: Path, why: str) -> None:
    """Warn that ``path`` in the cache ``folder`` (described by ``name``) cannot be read or written,
    once per folder: a cache only saves time, so the work goes on without it."""
    if folder not in _unusable:
        _unusable.add(folder)
        log.warning("warning: %s: %s not usable (%s); going on without it", path, name, why)
def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from or during, is a full disk (ENOSPC), as
    Python raises it or as TensorStore reports it."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if _TENSORSTORE_ENOSPC in str(error) or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_of(path: str | os.PathLike) -> str:
    """The mount point of the disk holding ``path`` (or where it would be made), with its free space."""
    path = Path(os.path.abspath(path))
    while not path.exists() or not os.path.ismount(path):
        path = path.parent
    free = shutil.disk_usage(path).free
    return f"{path}, {free / 2**20:.1f} MiB free"
