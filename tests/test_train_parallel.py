"""1 device, 8 devices over a mesh, 8 devices with pmap, and 2 processes give the same training
(README, One device, all devices, several hosts: "train alike (float64, every weight to 1e-9)"),
with dropout on where the masks are the global batch's (mesh, and two processes).

Each run is three SGD steps of a small DenseNet-BC (train_cli.MODEL) on the digits through the real
command, in float64: in fp32 the BN biases' tiny gradients differ by 1e-3 relative between
reduction orders (porting-notes 9b), which would hide a real difference. Batch statistics are
global in every form.
"""

import json
import re
import socket

import numpy as np
import pytest
from flax import nnx

import densenet_jax as dj
from densenet_jax.weights.format import state_arrays
from train_cli import MODEL, QUICK, finish, relative_l2, train, weights

TOLERANCE = 1e-9
# Accumulating the epoch's three steps into one update, with the EMA average (BN statistics
# included) beside it: both must be the same however the batch is split. lr 1: the one update
# must move every weight past assert_same_training's check that training happened.
FP64 = ["--epochs", "1", "--precision", "fp64", "--grad-accum-steps", "3", "--model-ema", "--lr", "1.0"]
# Devices do not change a mixed batch (a host mixes its share before placing it) nor the soft-target
# loss: the pmap run mixes. Two processes mix each its own share, as timm's DDP does, so that run is
# compared unmixed.
MIXED = ["--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1"]
# Under mesh, one program over the global batch (as on one device, and as two processes run it),
# each example gets the dropout mask one device gives it: the mesh runs have dropout on. pmap's
# devices each draw their own masks (test_train.py), so its runs are compared without dropout.
DROP_RATE = 0.2
DROPOUT = ["--drop-rate", str(DROP_RATE)]


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_device")
    train(workdir, *FP64, *MIXED)
    return workdir


@pytest.fixture(scope="module")
def single_device_dropout(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_device_dropout")
    train(workdir, *FP64, *DROPOUT)
    return workdir


def assert_same_training(workdir, reference, drop_rate=0.0):
    """The two runs' weights, EMA weights and last loss agree; ``drop_rate``: the runs' (it changes
    how the initial weights are drawn, which the check that training happened compares with)."""
    ours, ref = weights(workdir), weights(reference)
    ema, ref_ema = weights(workdir, "model_ema.safetensors"), weights(reference, "model_ema.safetensors")
    assert max(relative_l2(ema[k], ref_ema[k]) for k in ref_ema) <= TOLERANCE
    assert ours.keys() == ref.keys()
    assert all(ours[k].shape == ref[k].shape for k in ref)  # no stray device axis
    worst = max(relative_l2(ours[k], ref[k]) for k in ref)
    loss = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])["train_loss"]
    ref_loss = json.loads((reference / "metrics.jsonl").read_text().splitlines()[-1])["train_loss"]
    print(f"{workdir.name}: worst per-leaf relative L2 {worst:.2e}, loss {loss} vs {ref_loss}")
    assert abs(loss - ref_loss) <= TOLERANCE * abs(ref_loss)
    assert worst <= TOLERANCE
    # The steps did change the weights: this is not a comparison of two initialisations.
    seed = int(QUICK[QUICK.index("--seed") + 1])
    initial = state_arrays(dj.create_model(MODEL, num_classes=10, drop_rate=drop_rate, rngs=nnx.Rngs(seed)))
    for key in ("features.conv0.kernel", "features.denseblock1.denselayer1.conv1.kernel", "classifier.kernel"):
        assert relative_l2(ref[key], np.asarray(initial[key], np.float64)) > 1e-6, key


# Each eight-device run is memory-efficient, compared with a plain run on one device: the same
# numbers then show that the devices split the training exactly and that the recomputation agrees
# with the plain model under them, BatchNorm's mean across devices included (pmap: an axis-name
# collective inside the recomputation) and, under mesh, the dropout masks. Every norm outside the
# recomputed part runs the plain layer there, and the two processes below train plain models, so the
# plain path is on several devices too; one device, memory-efficient against plain: test_memory_efficient.
@pytest.mark.parametrize("mode, options, reference, drop_rate", [("mesh", DROPOUT, "single_device_dropout", DROP_RATE),
                                                                 ("pmap", MIXED, "single_device", 0.0)])
def test_eight_devices_match_one(tmp_path, request, mode, options, reference, drop_rate):
    train(tmp_path, *FP64, *options, "--parallel", mode, "--memory-efficient", devices=8)
    assert_same_training(tmp_path, request.getfixturevalue(reference), drop_rate)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What the coordinator says when another program took the port between free_port() and its bind.
PORT_TAKEN = re.compile(r"address already in use|failed to add port|(failed|unable) to bind", re.IGNORECASE)


def train_two_processes(root, attempts: int = 3):
    """The work directory of a run by processes 0 and 1; a port taken by someone else in between
    means another port (and a fresh directory). On any failure the other process is killed."""
    for attempt in range(attempts):
        port, workdir = free_port(), root / f"attempt{attempt}"
        procs = [train(workdir, *FP64, *DROPOUT, devices=4, process=(i, 2), port=port, wait=False)
                 for i in range(2)]
        try:
            for proc in procs:
                finish(proc)
            return workdir
        except AssertionError as e:
            if attempt + 1 == attempts or not PORT_TAKEN.search(str(e)):
                raise
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()


def test_two_processes_match_one(tmp_path, single_device_dropout):
    assert_same_training(train_two_processes(tmp_path), single_device_dropout, DROP_RATE)
