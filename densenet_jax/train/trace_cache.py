"""A jitted step whose traced program is kept on disk, so that a rerun skips tracing it.

XLA's persistent compilation cache skips compiling, but finding an entry there needs the program,
and tracing a densenet121 train step to get it takes seconds. Here the traced program itself is
stored (``jax.export``, beside the compilation cache), under a key made of everything that shapes
it: this package's source, the library versions, the caller's configuration, and the arguments'
structure, shapes, dtypes and shardings. A rerun with the same key loads it and goes straight to
the compilation cache.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
from pathlib import Path
from typing import Callable

import jax
from jax import export

from densenet_jax.files import atomic_write_bytes

log = logging.getLogger("densenet_jax")
_PACKAGE = Path(__file__).resolve().parent.parent
_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy")


@functools.cache
def _code_digest() -> str:
    """This package's source and the versions of the libraries that trace it."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(_PACKAGE).as_posix().encode() + path.read_bytes())
    for name in _LIBRARIES:
        digest.update(f"{name}={importlib.metadata.version(name)}".encode())
    return digest.hexdigest()


class StoredJit:
    """``jax.jit(fn, donate_argnums=0, out_shardings=out_sharding)`` whose trace is kept in ``folder``.

    ``config_key`` must name everything ``fn`` closes over (hyperparameters, model config);
    ``out_structure(*args)`` gives the pytree structure of ``fn``'s result without tracing it.
    """

    def __init__(self, fn: Callable, folder: Path, config_key: str,
                 out_structure: Callable[..., jax.tree_util.PyTreeDef], out_sharding=None):
        self.fn, self.folder, self.config_key = fn, Path(folder), config_key
        self.out_structure, self.out_sharding = out_structure, out_sharding
        self._calls: dict = {}

    def __call__(self, *args):
        leaves, treedef = jax.tree.flatten(args)
        # Shapes and dtypes only: asking every array for its sharding is a cost on every step, and
        # within a process the runner always places them alike (the file's key has the shardings).
        signature = (treedef, tuple((x.shape, x.dtype) for x in leaves))
        if signature not in self._calls:
            donated = tuple(range(len(jax.tree.leaves(args[0]))))  # the first argument's arrays
            self._calls[signature] = jax.jit(self._exported(leaves, treedef).call, donate_argnums=donated)
        return jax.tree.unflatten(self.out_structure(*args), self._calls[signature](*leaves))

    def _exported(self, leaves, treedef):
        """The stored program for these arguments, or a fresh trace of it, stored."""
        path = self.folder / f"{self._key(leaves, treedef)}.jaxexport"
        if path.is_file():
            try:
                return export.deserialize(bytearray(path.read_bytes()))
            except Exception as e:  # a damaged file: trace again and replace it
                log.warning("warning: %s: unreadable stored step (%s); tracing again", path, e)

        def flat(*leaves):  # a flat list of arrays: a signature jax.export can serialise
            return jax.tree.leaves(self.fn(*jax.tree.unflatten(treedef, leaves)))

        exported = export.export(jax.jit(flat, out_shardings=self.out_sharding))(*leaves)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, bytes(exported.serialize()))
        return exported

    def _key(self, leaves, treedef) -> str:
        digest = hashlib.sha256(f"{_code_digest()}|{self.config_key}|{treedef}".encode())
        for x in leaves:
            digest.update(f"{x.shape}{x.dtype}{getattr(x, 'sharding', None)}".encode())
        digest.update(f"{jax.devices()}|{jax.process_count()}".encode())
        return digest.hexdigest()[:32]
