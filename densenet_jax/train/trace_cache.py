"""A jitted step whose traced program is kept on disk, so that a rerun skips tracing it.

XLA's persistent compilation cache skips compiling, but finding an entry there needs the program,
and tracing a densenet121 train step to get it takes seconds. Here the traced program itself is
stored (``jax.export``, beside the compilation cache), under a key made of everything that shapes
it: this package's source, the library versions, JAX's settings that change what a trace emits
(matmul precision, x64, dtype promotion, the PRNG, the partitioner), ``XLA_FLAGS``, the devices'
platform and kind, the caller's configuration, and the arguments' structure, shapes, dtypes and
shardings. A rerun with the same key loads it and goes straight to the compilation cache.

The store only saves time: a folder that cannot be read or written (read-only, full) is named in
one warning and the step is traced as if there were no store.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
from pathlib import Path
from typing import Callable

import jax
from jax import export

from densenet_jax.errors import CheckpointError
from densenet_jax.files import atomic_write_bytes, cache_unusable

log = logging.getLogger("densenet_jax")
_PACKAGE = Path(__file__).resolve().parent.parent
_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy")
_NAME = "traced-step store (the step is traced instead)"
# JAX settings that change the program a trace emits: dot precision attributes (TF32 or fp32 on a
# GPU), 64-bit types, type promotion, the random bits' algorithm and layout, the partitioner that
# lowers shardings, softmax's derivative.
SETTINGS = ("jax_default_matmul_precision", "jax_enable_x64", "jax_numpy_dtype_promotion",
            "jax_default_prng_impl", "jax_threefry_partitionable", "jax_enable_custom_prng",
            "jax_use_shardy_partitioner", "jax_softmax_custom_jvp")


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
        try:
            payload = path.read_bytes()
        except FileNotFoundError:
            payload = None
        except OSError as e:
            cache_unusable(_NAME, self.folder, path, f"cannot read it: {e.strerror}")
            payload = None
        if payload is not None:
            try:
                return export.deserialize(bytearray(payload))
            except Exception as e:  # a damaged file: trace again and replace it
                log.warning("warning: %s: unreadable stored step (%s); tracing again", path, e)

        def flat(*leaves):  # a flat list of arrays: a signature jax.export can serialise
            return jax.tree.leaves(self.fn(*jax.tree.unflatten(treedef, leaves)))

        exported = export.export(jax.jit(flat, out_shardings=self.out_sharding))(*leaves)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, bytes(exported.serialize()))
        except CheckpointError as e:  # atomic_write_bytes' one line for a file it cannot create
            cache_unusable(_NAME, self.folder, path, str(e).removeprefix(f"{path}: "))
        except OSError as e:  # read-only or full: atomic_write_bytes has removed its temporary file
            cache_unusable(_NAME, self.folder, path, f"cannot write: {e.strerror}")
        return exported

    def _key(self, leaves, treedef) -> str:
        digest = hashlib.sha256(f"{_code_digest()}|{environment()}|{self.config_key}|{treedef}".encode())
        for x in leaves:
            digest.update(f"{x.shape}{x.dtype}{getattr(x, 'sharding', None)}".encode())
        return digest.hexdigest()[:32]


def environment() -> str:
    """What besides the code and the arguments changes a traced program: :data:`SETTINGS` as in
    effect here (a ``with jax.default_matmul_precision(...)`` included), ``XLA_FLAGS`` whole (which
    of its flags change a trace cannot be told from outside; a change costs one trace), and each
    device's platform and kind (an H100 and an A100 differ), with the process count."""
    settings = {name: str(getattr(jax.config, name)) for name in SETTINGS}
    devices = [(d.id, d.platform, d.device_kind) for d in jax.devices()]
    return json.dumps([settings, os.environ.get("XLA_FLAGS", ""), devices, jax.process_count()])

