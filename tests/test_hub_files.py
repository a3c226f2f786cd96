"""timm's ``hf-hub:`` grammar in full, each of huggingface_hub's errors as its own line, and damaged
files in the Hugging Face cache, against the stand-in Hub of tests/hub_server.py. The references
are timm's own loads of the same repos from the same stand-in."""

import errno
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import densenet_jax as dj
from densenet_jax import CheckpointError
from densenet_jax.weights.format import state_arrays
from test_hub import TINY, hf_home, hub, timm_files, tiny_timm  # noqa: F401 (fixtures)
from torch_twins import randomize


@pytest.fixture(scope="module")
def other_timm(tmp_path_factory):
    """A second small timm DenseNet (other random weights), as its repo files."""
    torch.manual_seed(1)
    model = randomize(timm.create_model("densenet121", **TINY), seed=4).eval()
    return model, timm_files(model, tmp_path_factory.mktemp("other_repo"), **TINY)


def assert_same_weights(ours, reference) -> None:
    """Our model holds the torch model's classifier and first convolution."""
    arrays = state_arrays(ours)
    state = reference.state_dict()
    np.testing.assert_array_equal(arrays["classifier.bias"], state["classifier.bias"].numpy())
    np.testing.assert_array_equal(arrays["features.conv0.kernel"],
                                  state["features.conv0.weight"].numpy().transpose(2, 3, 1, 0))


def timm_load(name):
    return timm.create_model(name, pretrained=True).eval()


def test_revisions_and_file_overrides_load_what_timm_loads(hub, hf_home, tiny_timm, other_timm):
    """``hf-hub:repo@revision``; config.json's ``hf_hub_filename`` (a safetensors file, and a
    ``.bin`` read through its safetensors twin as timm does); a repo with only timm's default
    ``pytorch_model.bin``: each loads the weights timm loads from it."""
    (first, files), (second, other) = tiny_timm, other_timm
    hub.add("someone/tiny", files)
    hub.add_revision("someone/tiny", "v2", other)
    assert_same_weights(dj.load("hf-hub:someone/tiny"), first)
    v2 = dj.load("hf-hub:someone/tiny@v2")
    assert_same_weights(v2, timm_load("hf-hub:someone/tiny@v2"))
    assert_same_weights(v2, second)

    config = json.loads(files["config.json"])
    config["pretrained_cfg"]["hf_hub_filename"] = "ema.safetensors"
    hub.add("someone/ema", {**files, "config.json": json.dumps(config).encode(), "ema.safetensors": other["model.safetensors"]})
    config["pretrained_cfg"]["hf_hub_filename"] = "ema.bin"
    hub.add("someone/ema-bin", {**files, "config.json": json.dumps(config).encode(),
                                "ema.safetensors": other["model.safetensors"]})
    for name in ("hf-hub:someone/ema", "hf-hub:someone/ema-bin"):
        model = dj.load(name)
        assert_same_weights(model, timm_load(name))
        assert_same_weights(model, second)

    pickle = Path(hf_home) / "pytorch_model.bin"
    torch.save(second.state_dict(), pickle)
    hub.add("someone/pickle", {"config.json": files["config.json"], "pytorch_model.bin": pickle.read_bytes()})
    model = dj.load("hf-hub:someone/pickle")
    assert_same_weights(model, timm_load("hf-hub:someone/pickle"))
    assert_same_weights(model, second)


ERRORS = {  # case: (how the stand-in serves someone/x, the name loaded, HF_TOKEN, what the line says)
    "gated": ("gated", "hf-hub:someone/x", None, "Hub repo someone/x is gated: accept its conditions at "),
    "private": ("private", "hf-hub:someone/x", None, "no Hub repo someone/x that can be read without a token: "
                "check the name; if the repo is private, set HF_TOKEN"),
    "wrong token": ("private", "hf-hub:someone/x", "hf_wrong", "no Hub repo someone/x that your token (HF_TOKEN"),
    "not found": (None, "hf-hub:someone/y", None, "no Hub repo someone/y that can be read without a token"),
    "revision not found": ("plain", "hf-hub:someone/x@v9", None, "Hub repo someone/x has no revision 'v9' "
                           "(a branch, tag or commit)"),
    "entry not found": ("no weights", "hf-hub:someone/x", None,
                        "Hub repo someone/x has no model.safetensors or pytorch_model.bin"),
    "two revisions": ("plain", "hf-hub:someone/x@v1@v2", None, "hf-hub:someone/x@v1@v2: not a Hub repo id"),
    "bad repo id": ("plain", "hf-hub:some one/x", None, "'some one/x' is not a Hub repo id"),
    "offline": ("plain", "hf-hub:someone/x", None, "config.json is not in the Hugging Face cache"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_each_hub_error_is_its_own_line(case, hub, hf_home, tiny_timm, monkeypatch):
    serve, name, token, message = ERRORS[case]
    files = dict(tiny_timm[1])
    hub.repos.pop("someone/x", None)
    hub.gated.discard("someone/x")
    hub.private.pop("someone/x", None)
    if serve:
        hub.add("someone/x", {"config.json": files["config.json"]} if serve == "no weights" else files)
    if serve == "gated":
        hub.gated.add("someone/x")
    if serve == "private":
        hub.private["someone/x"] = "hf_secret"
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    if case == "offline":
        from huggingface_hub import constants
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError) as error:
        dj.load(name)
    line = str(error.value)
    assert "\n" not in line and message in line, line
    if serve == "private":  # the right token reads it
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        assert_same_weights(dj.load(name), tiny_timm[0])


def cached(home: Path, repo: str, filename: str) -> Path:
    """The snapshot entry of ``filename`` in huggingface_hub's cache under ``home``."""
    [path] = (home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots").glob(f"*/{filename}")
    return path


def test_a_damaged_cached_config_is_named_removed_and_fetched_again(hub, hf_home, tiny_timm, caplog):
    hub.add("someone/cfg", tiny_timm[1])
    dj.load("hf-hub:someone/cfg")
    config = cached(hf_home, "someone/cfg", "config.json")
    config.resolve().write_bytes(b'{"architecture": "densenet121", "pretrained_cfg": {"input_si')
    hub.requests.clear()
    with caplog.at_level(logging.WARNING, logger="densenet_jax"):
        model = dj.load("hf-hub:someone/cfg")
    assert_same_weights(model, tiny_timm[0])
    assert f"{config} (in the Hugging Face cache): " in caplog.text and "removed, fetching it again" in caplog.text
    assert ("GET", "/someone/cfg/resolve/main/config.json") in hub.requests
    assert config.read_bytes() == tiny_timm[1]["config.json"]


@pytest.mark.parametrize("filename", ["config.json", "model.safetensors"])
def test_a_bad_file_in_a_read_only_cache_is_named_with_what_to_do(filename, hub, hf_home, tiny_timm, monkeypatch):
    """The cause and the file, not the EROFS of removing it (root ignores permissions: the
    removal is refused by a stand-in for a read-only mount)."""
    hub.add("someone/ro", tiny_timm[1])
    dj.load("hf-hub:someone/ro")
    path = cached(hf_home, "someone/ro", filename)
    path.resolve().write_bytes(path.read_bytes()[:100])
    real = Path.unlink

    def read_only(self, missing_ok=False):
        if str(self).startswith(str(hf_home)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, missing_ok)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(CheckpointError) as error:
        dj.load("hf-hub:someone/ro")
    line = str(error.value)
    cause = "not a timm model config" if filename == "config.json" else "not a complete safetensors file"
    assert "\n" not in line and line.startswith(f"{path}: ") and cause in line, line
    assert "cannot be changed here (Read-only file system)" in line and f"delete {path.resolve()} and {path}" in line
    assert "set HF_HUB_CACHE to a writable folder" in line
