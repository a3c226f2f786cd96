"""Caches are never stale and never fatal: the stored traced step's key holds everything that
changes the traced program, and a store that cannot be read or written is warned about once while
the work goes on, leaving no temporary file."""

import errno
import importlib.metadata
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from densenet_jax import files
from densenet_jax.data import listing
from densenet_jax.data.folder import find_images
from densenet_jax.train import trace_cache
from densenet_jax.train.trace_cache import SETTINGS, StoredJit
from fixtures import write_image_folder
from test_aot import make_step, state, structure

# For each setting in the key, a value other than JAX's default.
FLIPPED = {"jax_default_matmul_precision": "highest", "jax_enable_x64": True, "jax_numpy_dtype_promotion": "strict",
           "jax_default_prng_impl": "rbg", "jax_threefry_partitionable": False, "jax_enable_custom_prng": True,
           "jax_use_shardy_partitioner": False, "jax_softmax_custom_jvp": True}


def stored(folder, calls, x):
    """Run the step through a store in ``folder``; how many traces it took is ``len(calls)``."""
    return StoredJit(make_step(calls), folder, "config", structure)(state(), x)


@pytest.fixture
def x():
    return jnp.asarray(np.random.default_rng(0).standard_normal((5, 4)), jnp.float32)


def test_matmul_precision_is_not_served_a_step_traced_without_it(tmp_path, x):
    """JAX_DEFAULT_MATMUL_PRECISION=highest (a TF32 GPU's fp32) gets a trace that carries it."""
    calls = []
    stored(tmp_path, calls, x)
    with jax.default_matmul_precision("highest"):
        stored(tmp_path, calls, x)
    assert len(calls) == 2
    texts = [jax.export.deserialize(bytearray(p.read_bytes())).mlir_module() for p in tmp_path.glob("*.jaxexport")]
    assert sorted("HIGHEST" in t for t in texts) == [False, True]


def key(x) -> str:
    """The name the step for ``(state(), x)`` is stored under (computed without tracing; numpy
    arguments, since a flipped setting would compile jax's array constructors again)."""
    leaves, treedef = jax.tree.flatten(({"w": np.zeros((4, 3), np.float32), "n": np.zeros((), np.int32)}, x))
    return StoredJit(make_step([]), "unused", "config", structure)._key(leaves, treedef)


def test_every_setting_that_changes_the_program_is_in_the_key(monkeypatch):
    """Each of JAX's settings, XLA_FLAGS, the device kind, the jax/jaxlib/Flax versions and the
    arguments' dtype, flipped alone, changes the key; flipped back, the key is as before."""
    assert FLIPPED.keys() == set(SETTINGS)
    x = np.zeros((5, 4), np.float32)
    keys = [key(x)]
    for name, value in FLIPPED.items():
        before = getattr(jax.config, name)
        assert before != value, name
        jax.config.update(name, value)
        try:
            keys.append(key(x))
        finally:
            jax.config.update(name, before)
    with monkeypatch.context() as m:
        m.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
        keys.append(key(x))

    class Device:
        id, platform, device_kind = 0, "gpu", "NVIDIA H100 80GB HBM3"
    with monkeypatch.context() as m:
        m.setattr(jax, "devices", lambda: [Device()])
        keys.append(key(x))
        Device.device_kind = "NVIDIA A100-SXM4-80GB"
        keys.append(key(x))
    real = importlib.metadata.version
    for library in ("jax", "jaxlib", "flax"):
        with monkeypatch.context() as m:
            m.setattr(importlib.metadata, "version", lambda n, lib=library: real(n) + ("+1" if n == lib else ""))
            trace_cache._code_digest.cache_clear()
            keys.append(key(x))
    trace_cache._code_digest.cache_clear()
    keys.append(key(np.asarray(x, jnp.bfloat16)))
    assert len(set(keys)) == len(keys) == 1 + len(FLIPPED) + 7
    assert key(x) == keys[0]


def test_a_store_that_cannot_be_written_warns_once_and_the_work_goes_on(tmp_path, x, monkeypatch, caplog):
    """A folder that cannot be made (/sys: not even root writes there; twice, one warning), a full
    disk during the write (ENOSPC from fsync, once the temporary file is made) and a file that
    cannot be read (EACCES, which root never meets): one warning naming the path each, the step's
    result as without a store, no ``.tmp`` left."""
    reference = jax.jit(make_step([]))(state(), x)
    monkeypatch.setattr(files, "_unusable", set())
    caplog.set_level(logging.WARNING, logger="densenet_jax")
    unwritable = "/sys/densenet-jax-steps"
    for _ in range(2):
        out = stored(unwritable, [], x)
    np.testing.assert_array_equal(out[1]["loss"], reference[1]["loss"])
    assert caplog.text.count("traced-step store (the step is traced instead) not usable") == 1 and unwritable in caplog.text

    caplog.clear()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(files.os, "fsync", full)
    out = stored(tmp_path / "full", [], x)
    np.testing.assert_array_equal(out[1]["loss"], reference[1]["loss"])
    assert caplog.text.count("traced-step store (the step is traced instead) not usable") == 1, caplog.text
    assert "No space left on device" in caplog.text and str(tmp_path / "full") in caplog.text
    assert os.listdir(tmp_path / "full") == []  # the partial file is removed
    monkeypatch.undo()

    monkeypatch.setattr(files, "_unusable", set())
    caplog.clear()
    stored(tmp_path / "ok", [], x)  # writes the file that is then unreadable
    [written] = (tmp_path / "ok").iterdir()
    real = type(written).read_bytes

    def unreadable(path):
        if path.suffix == ".jaxexport":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path)
    monkeypatch.setattr(type(written), "read_bytes", unreadable)
    out = stored(tmp_path / "ok", [], x)
    np.testing.assert_array_equal(out[1]["loss"], reference[1]["loss"])
    assert caplog.text.count("traced-step store (the step is traced instead) not usable") == 1
    assert str(written) in caplog.text


def test_a_listing_cache_that_cannot_be_written_warns_once(tmp_path, caplog, monkeypatch):
    """Both splits listed with the cache in /sys: right listings, one warning naming the file."""
    monkeypatch.setattr(files, "_unusable", set())
    caplog.set_level(logging.WARNING, logger="densenet_jax")
    root = write_image_folder(tmp_path / "images", per_class=1)
    unwritable = Path("/sys/densenet-jax-listings")
    for split in ("train", "val", "train"):
        assert len(find_images(root / split, unwritable).paths) == 3
    assert caplog.text.count("folder listing cache (folders are listed instead) not usable") == 1
    assert str(unwritable) in caplog.text


def changed_with_times_restored(root, change) -> None:
    """``change()`` the tree under ``root``, then give every folder its modification time back, as
    an object-store mount or a tar re-extracted with fixed times shows a new version of it."""
    times = {folder: os.stat(folder).st_mtime_ns for folder, _, _ in os.walk(root)}
    change()
    for folder, mtime in times.items():
        if os.path.isdir(folder):
            os.utime(folder, ns=(mtime, mtime))


def test_a_listing_is_never_trusted_on_mtimes_alone(tmp_path, monkeypatch):
    """Images added, an image removed and a new class, each with every folder's mtime put back:
    the next listing sees each. Where folders' ctimes cannot be trusted (a FUSE mount), nothing is
    cached; a folder changed within the timestamp tick before its listing is listed again."""
    monkeypatch.setattr(listing, "_RACY_NS", 0)  # the window is tested at the end
    cache = tmp_path / "listings"
    root = write_image_folder(tmp_path / "v1", per_class=2) / "train"
    calls = []
    real = os.scandir
    monkeypatch.setattr(listing.os, "scandir", lambda path: calls.append(path) or real(path))
    assert len(find_images(root, cache).paths) == 6
    calls.clear()
    assert len(find_images(root, cache).paths) == 6 and calls == []  # the cache serves
    changed_with_times_restored(root, lambda: [(root / c / f"{i}.jpg").write_bytes(b"")
                                               for c in ("cat", "dog", "fox") for i in (2, 3, 4, 5)])
    assert len(find_images(root, cache).paths) == 18
    changed_with_times_restored(root, lambda: (root / "dog" / "0.jpg").unlink())
    assert str(root / "dog" / "0.jpg") not in find_images(root, cache).paths
    changed_with_times_restored(root, lambda: (root / "gnu").mkdir() or (root / "gnu" / "0.jpg").write_bytes(b""))
    found = find_images(root, cache)
    assert found.classes == ["cat", "dog", "fox", "gnu"] and len(found.paths) == 18

    monkeypatch.setattr(listing, "TRUSTED_FILE_SYSTEMS", frozenset())  # as on gcsfuse: never trusted
    for _ in range(2):
        calls.clear()
        assert len(find_images(tmp_path / "v1" / "val", cache).paths) == 6 and len(calls) == 4
    assert len(list(cache.iterdir())) == 1  # only the train split's, from before
    monkeypatch.undo()
    monkeypatch.setattr(listing.os, "scandir", lambda path: calls.append(path) or real(path))
    changed_with_times_restored(root, lambda: None)  # every folder's ctime is now
    find_images(root, cache)
    calls.clear()
    find_images(root, cache)  # the folders changed within two seconds of their listing
    assert len(calls) == 5
