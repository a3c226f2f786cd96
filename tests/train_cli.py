"""Running ``densenet-jax train`` in a fresh process, as a user would (tests share this helper)."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from densenet_jax.weights.format import read_safetensors

# The paper's DenseNet-BC at its shallowest with two layers a block (L=16, k=12: bottleneck and
# compression as in every ImageNet DenseNet; it compiles 4x faster than densenet_40_k12, and the
# resume, fault and device tests are about the trainer, not the size) on digits, batch 448:
# exactly 3 steps per epoch (1,437 // 448), and 448 splits evenly over 8 devices and over 2
# processes of 4.
MODEL = "densenet_bc_16_k12"
QUICK = ["--model", MODEL, "--dataset", "digits", "--batch-size", "448", "--no-progress", "--seed", "3"]


HERE = Path(__file__).resolve().parent

# Two epochs of 3 steps, dropout on (so the RNG must resume too), a checkpoint every 2 steps, and
# per-element mixup/CutMix with smoothed targets (its draws must resume too): the run that the
# resume and fault tests stop, restart, and compare with an uninterrupted one.
RUN = ["--epochs", "2", "--drop-rate", "0.2", "--checkpoint-every", "2", "--mixup", "0.8", "--cutmix", "1.0",
       "--mixup-mode", "elem", "--smoothing", "0.1"]

# One compilation cache and traced-step store for every training run of this test process, as a
# user's runs share theirs: XLA's cache is keyed by the program itself, and the traced step by
# everything that shapes it (test_caches.py), so a run served from it computes what a fresh one
# would, and most runs skip a compilation (the suite's largest cost). A test that checks reuse
# passes a cache of its own.
SESSION_CACHE = Path(tempfile.mkdtemp(prefix="densenet-jax-test-caches-"))
atexit.register(shutil.rmtree, SESSION_CACHE, ignore_errors=True)


def train(workdir: Path, *args, devices: int = 1, process: tuple[int, int] | None = None,
          port: int = 0, wait: bool = True, fault: tuple[str, int] | None = None, expect: int = 0,
          cache: str | Path | None = None):
    """Train in a fresh process; ``fault``: (point, n) for faults.py; ``expect``: its exit status;
    ``cache``: DENSENET_JAX_CACHE ("" turns it off; SESSION_CACHE by default)."""
    cache = SESSION_CACHE if cache is None else cache
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env = {**os.environ, "XLA_FLAGS": xla_flags,
           "JAX_PLATFORMS": "cpu", "DENSENET_JAX_CACHE": str(cache)}
    launcher = ["-m", "densenet_jax"] if fault is None else [str(HERE / "faults.py"), fault[0], str(fault[1])]
    quick = QUICK[2:] if "--init-from" in map(str, args) else QUICK  # the file names the architecture
    command = [sys.executable, *launcher, "train", *quick, "--workdir", str(workdir), *args]
    if process is not None:
        command += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(process[1]),
                    "--process-id", str(process[0])]
    group = fault is not None and "-group" in fault[0]  # its signal must not reach pytest
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=group)
    if not wait:
        return proc
    return finish(proc, expect=expect)


def finish(proc, timeout: float = 600, expect: int = 0):
    """The output of ``proc`` once it exits with ``expect``; killed if it runs past ``timeout``."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"killed after {timeout} s: {err[-3000:]}") from None
    assert proc.returncode == expect, err[-3000:]
    return out + err


def weights(workdir: Path, name: str = "model.safetensors") -> dict[str, np.ndarray]:
    return read_safetensors(workdir / name)[0]


def relative_l2(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def assert_same_weights(workdir: Path, reference: Path) -> None:
    """The final weights of two runs are equal, bit for bit."""
    a, b = weights(reference), weights(workdir)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)
