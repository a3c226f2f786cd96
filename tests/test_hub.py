"""Pretrained tags and Hub repos through huggingface_hub, against a stand-in Hub on 127.0.0.1.

The served repos are made by timm itself (``save_for_hf``: model.safetensors with torchvision's key
names and int64 BN counters, and timm's config.json) from models with random weights and
randomised BN statistics; small ones wherever the Hub mechanics are what is tested.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
from flax import nnx
import numpy as np
import pytest
import sklearn
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.models._hub import save_for_hf
from timm.models._manipulate import adapt_input_conv as timm_adapt_input_conv

import densenet_jax as dj
from densenet_jax import cli
from densenet_jax.model.registry import TAGS, resolve
from densenet_jax.weights.torch_keys import adapt_input_conv
from densenet_jax.weights.format import read_safetensors, stored_pretrained_cfg
from fixtures import write_image_folder
from hub_server import Hub
from torch_twins import randomize

PHOTO = Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg"
TINY = dict(growth_rate=8, block_config=(2, 2, 2), num_classes=10)
TIMM_FIELDS = ("hf_hub_id", "input_size", "test_input_size", "interpolation", "crop_pct",
               "test_crop_pct", "crop_mode", "mean", "std", "num_classes", "license")


@pytest.fixture(scope="module")
def hub():
    server = Hub()
    yield server
    server.close()


@pytest.fixture
def hf_home(tmp_path, monkeypatch, hub):
    """HF_HOME in a fresh folder and HF_ENDPOINT at the stand-in. huggingface_hub reads both when it
    is imported, so its module constants are pointed there too (the subprocess test uses only the
    environment variables)."""
    from huggingface_hub import constants
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"))
    hub.requests.clear()
    return home


def timm_files(model, folder: Path, **model_args) -> dict[str, bytes]:
    """The files of a timm Hub repo holding ``model``, written by timm."""
    save_for_hf(model, str(folder), model_args=model_args or None, safe_serialization=True)
    return {name: (folder / name).read_bytes() for name in ("config.json", "model.safetensors")}


@pytest.fixture(scope="module")
def tiny_timm(tmp_path_factory):
    """A small timm DenseNet (k=8, blocks of 2, 10 classes), random weights and BN statistics, and
    its repo files."""
    torch.manual_seed(0)
    model = randomize(timm.create_model("densenet121", **TINY), seed=3).eval()
    return model, timm_files(model, tmp_path_factory.mktemp("tiny_repo"), **TINY)


def timm_logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()


def logits(model, x: np.ndarray) -> np.ndarray:
    """Our model's eval logits, traced once (op-by-op dispatch of densenet121 takes over a minute)."""
    model.eval()
    return np.asarray(nnx.jit(lambda m, batch: m(batch))(model, jnp.asarray(x)))


def assert_close(ours, reference, rtol=1e-5):
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= rtol * np.abs(reference).max()


def test_tags_are_timms():
    """Every tag timm publishes for DenseNet, with timm's source and preprocessing; bare names pick
    timm's default tag."""
    assert set(dj.list_models(pretrained=True)) == set(timm.list_pretrained("densenet*"))
    for pattern in ("densenet12*", "densenetblur*", ["densenet16*", "densenet2*"]):  # timm's filter argument
        for pretrained in (False, True):
            ours = dj.list_models(pattern, pretrained=pretrained)
            assert set(ours) == set(timm.list_models(pattern, pretrained=pretrained)) and ours, (pattern, pretrained)
    with pytest.raises(TypeError, match="pretrained=True"):
        dj.list_models(True)
    for tag, cfg in TAGS.items():
        reference = timm.models.get_pretrained_cfg(tag)
        for field in TIMM_FIELDS:
            assert getattr(cfg, field) == getattr(reference, field), (tag, field)
        assert cfg.top1, tag
    for name in ("densenet121", "densenet169", "densenet201", "densenet161", "densenetblur121d"):
        assert resolve(name).tag == timm.models.get_pretrained_cfg(name).tag


def test_tag_downloads_once_then_loads_from_the_cache(hub, hf_home, tiny_timm):
    reference, files = tiny_timm
    hub.add("timm/densenet121.ra_in1k", files)
    model = dj.create_model("densenet121", pretrained=True)  # timm's default tag: ra_in1k
    weights = "/timm/densenet121.ra_in1k/resolve/main/model.safetensors"
    asked = [r for r in hub.requests if r[1] not in ("/api/agent-harnesses", "/")]  # once a process
    assert asked == [("HEAD", weights), ("GET", weights)]
    first = list(hub.requests)
    assert model.pretrained_cfg == TAGS["densenet121.ra_in1k"]
    x = np.random.default_rng(1).normal(size=(2, 48, 48, 3)).astype(np.float32)
    assert_close(logits(model, x), timm_logits(reference, x))
    again = dj.create_model("densenet121.ra_in1k", pretrained=True, num_classes=4)
    assert hub.requests == first  # the second load asked nothing
    assert again.config.num_classes == 4
    np.testing.assert_array_equal(again.features.conv0.kernel[...], model.features.conv0.kernel[...])


def test_hf_hub_repo_with_timms_config_and_a_backbone(hub, hf_home, tiny_timm, tmp_path):
    reference, files = tiny_timm
    hub.add("someone/tiny-densenet", files)
    model = dj.load("hf-hub:someone/tiny-densenet")
    assert model.pretrained_cfg.test_input_size == (3, 288, 288)  # from its config.json
    assert model.pretrained_cfg.num_classes == 10 and model.pretrained_cfg.architecture == "densenet121"
    x = np.random.default_rng(2).normal(size=(1, 48, 48, 3)).astype(np.float32)
    assert_close(logits(model, x), timm_logits(reference, x))
    backbone = dj.load("hf-hub:someone/tiny-densenet", features_only=True)
    assert backbone.pretrained_cfg == model.pretrained_cfg
    dj.save(model, tmp_path / "saved.safetensors")  # the preprocessing travels with the weights
    assert stored_pretrained_cfg(tmp_path / "saved.safetensors") == model.pretrained_cfg
    assert dj.load(tmp_path / "saved.safetensors").pretrained_cfg == model.pretrained_cfg


def test_label_names_of_a_hub_repo_or_local_folder_are_predicts_names(hub, hf_home, tiny_timm, tmp_path, capsys):
    """timm's ``label_names`` (top level, or timm's older ``labels`` in pretrained_cfg) name
    ``predict``'s classes for ``hf-hub:`` and ``local-dir:``, not their numbers."""
    names = [f"kind-{i}" for i in range(10)]
    top = json.loads(tiny_timm[1]["config.json"])
    older = {**top, "pretrained_cfg": {**top["pretrained_cfg"], "labels": names}}
    hub.add("someone/named", {**tiny_timm[1], "config.json": json.dumps({**top, "label_names": names}).encode()})
    (tmp_path / "named").mkdir()
    for name, payload in {**tiny_timm[1], "config.json": json.dumps(older).encode()}.items():
        (tmp_path / "named" / name).write_bytes(payload)
    cli.main(["predict", "--model", "hf-hub:someone/named", str(PHOTO), "--json", "--no-progress"])
    top5 = json.loads(capsys.readouterr().out)[0]["top"]
    assert [e["name"] for e in top5] == [names[e["class"]] for e in top5]
    assert dj.load(f"local-dir:{tmp_path / 'named'}").class_names == names  # predict's names, as above


# A process as a user's: no network (the endpoint refuses connections), HF_HUB_OFFLINE unset,
# Orbax imported (as training does), and a library warning after the command.
NO_NETWORK = """
import logging, sys
import orbax.checkpoint
from densenet_jax import cli
try:
    cli.main(sys.argv[1:])
finally:
    logging.getLogger("huggingface_hub.utils._http").warning("a library warning")
"""


def test_no_network_without_hf_hub_offline_is_one_line_without_retries(tmp_path):
    """One line (no retry warnings: huggingface_hub's five retries are not waited for), saying that
    HF_HUB_OFFLINE=1 fails at once; a library's warning is printed once, not twice."""
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{port}",
           "JAX_PLATFORMS": "cpu"}
    env.pop("HF_HUB_OFFLINE", None)
    out = subprocess.run([sys.executable, "-c", NO_NETWORK, "predict", "--model", "densenet121.tv_in1k", str(PHOTO)],
                         env=env, capture_output=True, text=True, timeout=300)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(err) == 2, out.stderr
    assert "the Hub cannot be reached (HF_HUB_OFFLINE=1 says so at once" in err[0], err[0]
    assert err[1] == "a library warning"


@pytest.mark.parametrize("in_chans", [1, 2, 4, 6])
def test_adapt_input_conv_equals_timms(in_chans):
    weight = torch.randn(16, 3, 7, 7, generator=torch.Generator().manual_seed(in_chans))
    ours = adapt_input_conv(in_chans, weight.numpy())
    reference = timm_adapt_input_conv(in_chans, weight.clone()).numpy()
    assert ours.shape == reference.shape == (16, in_chans, 7, 7) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, rtol=1e-7, atol=0)


def test_local_file_with_in_chans_gives_timms_logits(tiny_timm, tmp_path):
    """``pretrained_cfg_overlay=dict(file=...)`` reads timm's file with no Hub; ``in_chans=1`` adapts
    conv0 as timm does (timm's own pretrained loading, same file, is the reference)."""
    reference, files = tiny_timm
    path = tmp_path / "model.safetensors"
    path.write_bytes(files["model.safetensors"])
    overlay = dict(file=str(path), num_classes=10)
    with pytest.raises(dj.CheckpointError, match=(  # the file is not densenet121's: said, not run
            f"^{path}: holds DenseNet\\(k=8, blocks \\(2, 2, 2\\), imagenet stem\\), not "
            "densenet121.tv_in1k's densenet121: load it without the tag")):
        dj.create_model("densenet121.tv_in1k", pretrained=True, pretrained_cfg_overlay=overlay)
    # Told the architecture the file holds, as timm is below, the file fits (timm's stem width
    # follows its growth rate, 2k; ours is the config's num_init_features, as torchvision's).
    ours = dj.create_model("densenet121.tv_in1k", pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1,
                           growth_rate=8, block_config=(2, 2, 2), num_init_features=16)
    theirs = timm.create_model("densenet121", pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1,
                               growth_rate=8, block_config=(2, 2, 2)).eval()
    np.testing.assert_array_equal(theirs.state_dict()["features.norm0.running_var"],  # timm read the file
                                  reference.state_dict()["features.norm0.running_var"])
    x = np.random.default_rng(3).normal(size=(2, 40, 40, 1)).astype(np.float32)
    assert_close(logits(ours, x), timm_logits(theirs, x))
    assert ours.pretrained_cfg.input_size == (1, 224, 224) and len(ours.pretrained_cfg.mean) == 1


def _cache_holds_no_weights(home: Path) -> bool:
    cache = home / "hub"
    return not any(p.name == "model.safetensors" or p.name.endswith(".incomplete") for p in cache.rglob("*")) \
        if cache.exists() else True


BAD = {  # name: (repo, its files' damage, the CLI --model, what the line says)
    "unknown tag": (None, None, "densenet121.in22k", "unknown tag 'densenet121.in22k'; densenet121 has"),
    "no such repo": (None, None, "hf-hub:nobody/nothing", "no Hub repo nobody/nothing"),
    "not a DenseNet": ("someone/resnet", "resnet", "hf-hub:someone/resnet", "holds a resnet50, not a DenseNet"),
    "truncated file": ("timm/densenet169.tv_in1k", "truncate", "densenet169.tv_in1k",
                       "not a complete safetensors file, truncated or corrupt"),
    "Git LFS pointer": ("timm/densenet201.tv_in1k", "lfs", "densenet201.tv_in1k", "a Git LFS pointer, not the weights"),
    "download cut short": ("timm/densenet161.tv_in1k", "cut", "densenet161.tv_in1k",
                           "downloading model.safetensors from timm/densenet161.tv_in1k failed"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_hub_input_is_one_line_and_leaves_nothing_cached(case, hub, hf_home, tiny_timm, capsys):
    repo, damage, model, message = BAD[case]
    files = dict(tiny_timm[1])
    if damage == "resnet":
        files["config.json"] = json.dumps({"architecture": "resnet50", "num_classes": 1000}).encode()
    elif damage == "truncate":
        files["model.safetensors"] = files["model.safetensors"][:5000]
    elif damage == "lfs":
        files["model.safetensors"] = (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64
                                      + b"\nsize 4000000\n")
    elif damage == "cut":
        hub.cut_short.add((repo, "model.safetensors"))
    if repo:
        hub.add(repo, files)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", "--model", model, str(PHOTO)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1 and message in err[0], err
    assert _cache_holds_no_weights(hf_home)


def test_offline_without_a_cached_copy_says_what_to_fetch(hub, hf_home, monkeypatch, capsys, tiny_timm, tmp_path):
    """The line names the file to fetch and how to pass it; passed so (``--weights`` with the tag),
    predict runs offline with the tag's preprocessing."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", "--model", "densenet121.tv_in1k", str(PHOTO)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1 and hub.requests == []
    assert (f"model.safetensors is not in the Hugging Face cache ({hf_home / 'hub'})" in err[0]
            and "HF_HUB_OFFLINE is set" in err[0]
            and f"{hub.url}/timm/densenet121.tv_in1k/resolve/main/model.safetensors" in err[0]
            and "pretrained_cfg_overlay=dict(file=PATH)" in err[0])
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(tiny_timm[1]["model.safetensors"])
    with pytest.raises(SystemExit):  # another architecture under the tag: refused, in one line
        cli.main(["predict", "--model", "densenet121.tv_in1k", "--weights", str(tiny), str(PHOTO)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tiny}: holds DenseNet(k=8, blocks (2, 2, 2), imagenet stem)" in err[0], err
    torch.manual_seed(0)
    reference = randomize(timm.create_model("densenet121"), seed=5).eval()  # the tag's architecture
    local = tmp_path / "model.safetensors"
    (tmp_path / "full").mkdir()
    local.write_bytes(timm_files(reference, tmp_path / "full")["model.safetensors"])
    cli.main(["predict", "--model", "densenet121.tv_in1k", "--weights", str(local), str(PHOTO), "--json"])
    result = json.loads(capsys.readouterr().out)[0]
    transform = create_transform(**resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(
        "densenet121.tv_in1k").to_dict()))
    with torch.no_grad():
        p = torch.softmax(reference(transform(Image.open(PHOTO).convert("RGB"))[None]), -1)[0].numpy()
    assert result["top"][0]["class"] == int(np.argmax(p)) and hub.requests == []
    assert abs(result["top"][0]["probability"] - p.max()) <= 1e-5


@pytest.mark.parametrize("options", [[], ["--test-size", "--in-chans", "1"], ["--preprocess", "torchvision"]],
                         ids=["timm_224", "test_size_288_in_chans_1", "torchvision_256_224"])
def test_predict_model_tag_gives_timms_probabilities(options, hub, hf_home, tiny_timm, tmp_path, capsys):
    """``predict --model TAG``: downloads, prepares the photo as the weights want (or as asked), and
    gives what timm's model gives on timm's (or torchvision's) transform of it."""
    import torchvision.transforms as TT
    reference, files = tiny_timm
    hub.add("timm/densenet121.ra_in1k", files)
    cli.main(["predict", "--model", "densenet121.ra_in1k", str(PHOTO), "--json", *options])
    result = json.loads(capsys.readouterr().out)[0]
    cfg = {k: v for k, v in TAGS["densenet121.ra_in1k"].__dict__.items() if k != "top1"}
    mode, model = "RGB", reference
    if options == ["--preprocess", "torchvision"]:
        transform = TT.Compose([TT.Resize(256), TT.CenterCrop(224), TT.ToTensor(),
                                TT.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    else:
        in_chans = 1 if "--in-chans" in options else 3
        if in_chans == 1:
            cfg = {**cfg, "mean": (sum(cfg["mean"]) / 3,), "std": (sum(cfg["std"]) / 3,),
                   "input_size": (1, 224, 224), "test_input_size": (1, 288, 288)}
            path = tmp_path / "model.safetensors"
            path.write_bytes(files["model.safetensors"])
            model = timm.create_model("densenet121", pretrained=True, in_chans=1, growth_rate=8, block_config=(2, 2, 2),
                                      pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
            mode = "L"
        transform = create_transform(**resolve_data_config(pretrained_cfg=cfg, use_test_size="--test-size" in options,
                                                           args={"in_chans": in_chans}))
    x = transform(Image.open(PHOTO).convert(mode))[None]
    with torch.no_grad():
        p = torch.softmax(model(x), -1)[0].numpy()
    assert [e["class"] for e in result["top"]] == np.argsort(-p, kind="stable")[:5].tolist()
    for entry in result["top"]:
        assert abs(entry["probability"] - p[entry["class"]]) <= 1e-5


def test_offline_loads_from_the_cache_by_environment_alone_and_torch_free(hub, hf_home, tiny_timm):
    """A fresh process that only has HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE=1 loads a tag from the
    cache a first load filled, asking the stand-in nothing, and never imports torch or timm."""
    hub.add("timm/densenet121.tv_in1k", tiny_timm[1])
    dj.create_model("densenet121.tv_in1k", pretrained=True)
    hub.requests.clear()
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "1",
           "JAX_PLATFORMS": "cpu"}
    code = ("import sys, densenet_jax as dj; m = dj.create_model('densenet121.tv_in1k', pretrained=True); "
            "print(m.config.num_classes, m.pretrained_cfg.tag, "
            "sorted(n for n in ('torch', 'torchvision', 'timm') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "10 tv_in1k []" and hub.requests == []


def test_models_command_lists_names_params_tags_and_top1(capsys):
    cli.main(["models"])
    lines = capsys.readouterr().out.splitlines()
    assert any(l.split()[:3] == ["densenet121", "7,978,856", "ra_in1k,"] and l.endswith("tv_in1k") for l in lines)
    assert any(l.split()[:2] == ["densenet_bc_100_k12", "769,162"] for l in lines)
    assert lines[-1].startswith("and any densenet_<L>_k<k> or densenet_bc_<L>_k<k>")
    cli.main(["models", "--pretrained"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(TAGS)
    assert "densenet121.tv_in1k" in lines[2] and "hf-hub:timm/densenet121.tv_in1k" in lines[2]
    assert "74.750" in lines[2] and "74.434" in lines[2] and "bicubic 224/0.875" in lines[2]
    assert "(test 288/0.95)" in lines[0] and "76.486" in lines[0]


def test_train_pretrained_fine_tunes_with_a_new_head_on_grey_images(hub, hf_home, tiny_timm, tmp_path, capsys):
    """``train --pretrained TAG --in-chans 1``: starts from the tag's weights, conv0 adapted (checked
    with the backbone frozen), a new head for the folder's classes; the weights it writes carry the
    run's preprocessing (one channel, its image size and resize)."""
    reference, files = tiny_timm
    hub.add("timm/densenet121.ra_in1k", files)
    data = write_image_folder(tmp_path / "images")
    workdir = tmp_path / "run"
    cli.main(["train", "--pretrained", "densenet121.ra_in1k", "--dataset", "folder", "--data-dir", str(data),
              "--image-size", "32", "--in-chans", "1", "--head-only", "--epochs", "1", "--batch-size", "4",
              "--lr", "0.01", "--workdir", str(workdir), "--no-progress"])
    arrays, config = read_safetensors(workdir / "model.safetensors")
    assert config.in_chans == 1 and config.num_classes == 3 and config.block_config == (2, 2, 2)
    timm_state = {k: v.numpy() for k, v in reference.state_dict().items()}
    conv0 = adapt_input_conv(1, timm_state["features.conv0.weight"]).transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(arrays["features.conv0.kernel"], conv0)
    np.testing.assert_array_equal(arrays["features.norm5.mean"], timm_state["features.norm5.running_mean"])
    cfg = stored_pretrained_cfg(workdir / "model.safetensors")
    assert cfg.input_size == (1, 32, 32) and cfg.crop_pct == 32 / 36 and cfg.interpolation == "bilinear"
