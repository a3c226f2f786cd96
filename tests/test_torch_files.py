"""``densenet-jax convert`` on the checkpoints people have: wrapper prefixes, training checkpoints,
heads that are not torchvision's, torch.hub names, files that are already ours, no torch installed;
and the files it writes (umask mode, same bytes every time)."""

import argparse
import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

import densenet_jax as dj
from densenet_jax import cli
from densenet_jax.model.pretrained_cfg import PretrainedCfg
from densenet_jax.train.report import write_metrics
from densenet_jax.weights.format import read_safetensors, write_safetensors
from fixtures import tiny_weights_file
from torch_twins import assert_file_holds, nchw, randomize

ROOT = Path(__file__).resolve().parent.parent


def tiny(seed=0, num_classes=5) -> torch.nn.Module:
    """torchvision's DenseNet at its smallest useful size (imagenet stem, two blocks of two layers)."""
    torch.manual_seed(seed)
    return randomize(torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16,
                                                 num_classes=num_classes), seed).eval()


def convert(capsys, *argv) -> tuple[int, str, list[str]]:
    """``densenet-jax convert ARGV`` in this process: exit status, stdout, stderr lines."""
    try:
        cli.main(["convert", *map(str, argv)])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def refused(capsys, path: Path, *argv) -> str:
    """The one line ``convert`` refuses ``path`` with (exit 1, the path named once, nothing written)."""
    out = path.parent / "refused.safetensors"
    code, _, lines = convert(capsys, path, out, *argv)
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].count(str(path)) == 1, lines[0]
    assert not out.exists() and not list(path.parent.glob(".refused*"))
    return lines[0]


def conv_kernel(model: dj.DenseNet) -> np.ndarray:
    """One deep weight, in torch's layout, to compare with the torch model's."""
    return np.transpose(np.asarray(model.features.denseblock2.denselayer2.conv2.kernel[...]), (3, 2, 0, 1))


def torch_kernel(model: torch.nn.Module) -> np.ndarray:
    return model.features.denseblock2.denselayer2.conv2.weight.detach().numpy()


def averaged(model):
    """What torch.optim.swa_utils.AveragedModel (torchvision's ExponentialMovingAverage) saves."""
    return {"n_averaged": torch.tensor(7), **{f"module.{k}": v for k, v in model.state_dict().items()}}


def training_checkpoint(model, ema):
    """What torchvision's reference train.py saves: model, EMA, optimizer, scheduler, epoch, args;
    args and a numpy best accuracy are the records the allow-list admits."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(1, 3, 32, 32)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 30)
    args = argparse.Namespace(lr=0.1, output_dir=Path("runs/x"), epochs=90, model="densenet121")
    return {"model": model.state_dict(), "model_ema": averaged(ema), "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(), "epoch": 3, "args": args, "best_acc1": np.float64(0.75)}


FORMS = {  # name: (what the file holds, given the model and an EMA twin; the prefix the line names)
    "torch.compile": (lambda m, e: {f"_orig_mod.{k}": v for k, v in m.state_dict().items()}, "_orig_mod."),
    "DDP over torch.compile": (lambda m, e: {f"module._orig_mod.{k}": v for k, v in m.state_dict().items()},
                               "module._orig_mod."),
    "nested containers": (lambda m, e: {"model": {"state_dict": m.state_dict()}}, "model.state_dict."),
    "Lightning": (lambda m, e: {"state_dict": {f"model.{k}": v for k, v in m.state_dict().items()}, "epoch": 3,
                                "global_step": 30, "pytorch-lightning_version": "2.4.0"}, "state_dict.model."),
    "EMA alone (AveragedModel)": (lambda m, e: averaged(m), "module."),
    "EMA kept as a submodule": (lambda m, e: {**m.state_dict(), **{f"ema.{k}": v for k, v in e.state_dict().items()}},
                                ""),
    "torchvision reference checkpoint": (training_checkpoint, "model."),
    # The EMA copy's prefix the shortest: the model is not chosen for being shortest.
    "model and EMA side by side": (lambda m, e: {"ema": e.state_dict(), "model": m.state_dict()}, "model."),
    "EMA beside a compiled DDP model": (lambda m, e: {"model_ema": averaged(e), "model": {
        f"module._orig_mod.{k}": v for k, v in m.state_dict().items()}}, "model.module._orig_mod."),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_a_densenet_under_any_wrapper_converts(tmp_path, capsys, form):
    model, ema = tiny(1), tiny(2)
    make, prefix = FORMS[form]
    torch.save(make(model, ema), tmp_path / "in.pth")
    code, out, lines = convert(capsys, tmp_path / "in.pth", tmp_path / "out.safetensors")
    assert code == 0, lines
    assert (f"under {prefix!r}" if prefix else "also in the file: 'ema.'") in out, out
    assert_file_holds(tmp_path / "out.safetensors", model.state_dict())


def test_prefix_picks_the_ema_copy_and_safetensors_need_no_container(tmp_path, capsys):
    model, ema = tiny(1), tiny(2)
    torch.save(training_checkpoint(model, ema), tmp_path / "ckpt.pth")
    code, out, _ = convert(capsys, tmp_path / "ckpt.pth", tmp_path / "ema.safetensors",
                           "--prefix", "model_ema.module.")
    assert code == 0 and "under 'model_ema.module.'" in out and "'model.'" in out, out
    assert_file_holds(tmp_path / "ema.safetensors", ema.state_dict())
    save_file({f"model.{k}": v for k, v in model.state_dict().items()}, str(tmp_path / "lit.safetensors"))
    code, out, _ = convert(capsys, tmp_path / "lit.safetensors", tmp_path / "lit_out.safetensors")
    assert code == 0 and "under 'model.'" in out, out
    assert_file_holds(tmp_path / "lit_out.safetensors", model.state_dict())


def test_when_no_one_densenet_is_found_the_line_names_what_was(tmp_path, capsys):
    model = tiny()
    torch.save({"student": model.state_dict(), "teacher": tiny(3).state_dict()}, tmp_path / "two.pth")
    line = refused(capsys, tmp_path / "two.pth")
    assert "2 DenseNets" in line and "'student.'" in line and "'teacher.'" in line and "--prefix" in line, line
    line = refused(capsys, tmp_path / "two.pth", "--prefix", "pupil.")
    assert "no DenseNet under prefix 'pupil.'" in line and "'student.'" in line, line
    resnet = torchvision.models.resnet18(weights=None).state_dict()
    torch.save({f"backbone.{k}": v for k, v in resnet.items()}, tmp_path / "resnet.pth")
    line = refused(capsys, tmp_path / "resnet.pth")
    assert "not a DenseNet checkpoint" in line, line
    assert f"found {len(resnet)} tensors, all under 'backbone.'" in line, line


class Exploit:
    """A pickle payload that would create ``marker`` if it were ever run, through ``call``."""

    def __init__(self, call, marker):
        self.call, self.marker = call, marker

    def __reduce__(self):
        if self.call == "system":
            return os.system, (f"touch {self.marker}",)
        if self.call == "eval":
            return eval, (f"__import__('pathlib').Path({str(self.marker)!r}).touch()",)
        return Path.touch, (Path(self.marker),)


@dataclasses.dataclass
class RunConfig:
    """A record class of the training script's own: not on the allow-list, refused by name."""
    lr: float = 0.1


@pytest.mark.parametrize("payload, name", [
    ("system", "posix.system"), ("eval", "eval"),
    ("touch", "getattr"),  # Path.touch pickles as getattr(Path, "touch")
    ("record", "test_torch_files.RunConfig")])
def test_pickled_code_is_refused_by_name_and_never_runs(tmp_path, capsys, payload, name):
    marker = tmp_path / "pwned"
    hidden = RunConfig() if payload == "record" else Exploit(payload, marker)
    checkpoint = {"state_dict": tiny().state_dict(), "args": argparse.Namespace(lr=0.1, hook=hidden), "epoch": 3}
    torch.save(checkpoint, tmp_path / "evil.pth")
    allowed_before = set(map(repr, torch.serialization.get_safe_globals()))
    line = refused(capsys, tmp_path / "evil.pth")
    assert f"refused to unpickle {name} " in line, line
    assert "\x1b" not in line and "weights_only" not in line and "trust" not in line, line  # no unsafe advice
    assert not marker.exists()
    assert set(map(repr, torch.serialization.get_safe_globals())) == allowed_before  # scoped to the one load


def test_a_checkpoint_without_classifier_converts_as_a_backbone(tmp_path, capsys):
    model = tiny(4)
    model.classifier = torch.nn.Identity()  # as a user who kept only the backbone does
    torch.save(model.state_dict(), tmp_path / "headless.pth")
    code, out, lines = convert(capsys, tmp_path / "headless.pth", tmp_path / "headless.safetensors")
    assert code == 0 and "no classifier" in out and "features_only=True" in out, (out, lines)
    arrays, config = read_safetensors(tmp_path / "headless.safetensors")
    assert config.num_classes == 0  # the file records "no head" as timm does: num_classes 0
    torch.save(model.features.state_dict(), tmp_path / "features.pth")  # the backbone module alone
    code, out, lines = convert(capsys, tmp_path / "features.pth", tmp_path / "features.safetensors")
    assert code == 0 and "no classifier" in out, (out, lines)
    same, same_config = read_safetensors(tmp_path / "features.safetensors")
    assert same_config == config and same.keys() == arrays.keys()
    assert all(np.array_equal(same[k], arrays[k]) for k in arrays)
    x = np.random.default_rng(0).standard_normal((2, 40, 40, 3), dtype=np.float32)
    with torch.no_grad():
        pooled, maps = model(nchw(x)).numpy(), model.features(nchw(x)).numpy()
    ours = dj.load(tmp_path / "headless.safetensors")
    ours.eval()
    np.testing.assert_allclose(np.asarray(ours(x)), pooled, rtol=1e-5, atol=1e-5)
    backbone = dj.load(tmp_path / "headless.safetensors", features_only=True)
    backbone.eval()
    last = np.transpose(np.asarray(backbone(x)[-1]), (0, 3, 1, 2))  # timm's last stage: after norm5's ReLU
    np.testing.assert_allclose(last, np.maximum(maps, 0), rtol=1e-5, atol=1e-5)
    tuned = dj.load(tmp_path / "headless.safetensors", num_classes=3)
    assert tuned.classifier.kernel.shape == (config.num_features, 3)
    np.testing.assert_array_equal(conv_kernel(tuned), torch_kernel(model))
    with pytest.raises(SystemExit):  # pooled features are no class scores
        cli.main(["predict", "--weights", str(tmp_path / "headless.safetensors"), str(tmp_path / "x.jpg")])
    assert "no classifier" in capsys.readouterr().err
    code, _, lines = convert(capsys, "--to", "torch", tmp_path / "headless.safetensors", tmp_path / "back.pth")
    assert code == 0, lines
    back = tiny()
    back.classifier = torch.nn.Identity()
    back.load_state_dict(torch.load(tmp_path / "back.pth", weights_only=True), strict=True)
    for key, value in model.state_dict().items():  # every tensor back as it was
        assert torch.equal(back.state_dict()[key], value) or key.endswith("num_batches_tracked"), key


def test_a_custom_head_is_named(tmp_path, capsys):
    model = tiny()
    model.classifier = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(32, 3))
    torch.save(model.state_dict(), tmp_path / "custom.pth")
    line = refused(capsys, tmp_path / "custom.pth")
    assert "custom head classifier.1.weight" in line and "Identity" in line, line


def test_torch_hub_hash_suffix_is_checked(tmp_path, capsys):
    import hashlib
    torch.save(tiny().state_dict(), tmp_path / "tmp.pth")
    data = (tmp_path / "tmp.pth").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    good = tmp_path / f"tiny-{digest[:8]}.pth"
    good.write_bytes(data)
    assert convert(capsys, good, tmp_path / "good.safetensors")[0] == 0
    wrong = "0" * 8 if not digest.startswith("0" * 8) else "1" * 8
    bad = tmp_path / f"tiny-{wrong}.pth"
    bad.write_bytes(data)
    line = refused(capsys, bad)
    assert f"SHA-256 begins {digest[:8]}, not {wrong}" in line, line
    (tmp_path / "tiny-v2.pth").write_bytes(data)  # no hash: too short, not hex
    assert convert(capsys, tmp_path / "tiny-v2.pth", tmp_path / "v2.safetensors")[0] == 0


def test_converting_densenet_jax_weights_says_they_are_already_ours(tmp_path, capsys):
    line = refused(capsys, tiny_weights_file(tmp_path / "ours.safetensors"))
    assert "already densenet_jax weights" in line and "--to torch" in line, line


def test_a_stem_torchvision_cannot_build_is_said_when_written(tmp_path, capsys):
    code, out, _ = convert(capsys, "--to", "torch", tiny_weights_file(tmp_path / "cifar.safetensors"),
                           tmp_path / "cifar.pth")
    assert code == 0 and "a CIFAR-stem DenseNet (3x3 conv0, no norm0 or max-pool)" in out, out
    torch.save(tiny().state_dict(), tmp_path / "in.pth")
    assert convert(capsys, tmp_path / "in.pth", tmp_path / "imagenet.safetensors")[0] == 0
    code, out, _ = convert(capsys, "--to", "torch", tmp_path / "imagenet.safetensors", tmp_path / "back.pth")
    assert code == 0 and out.strip().endswith("tensors"), out  # torchvision's own stem: nothing to say
    arrays, config = read_safetensors(tmp_path / "imagenet.safetensors")
    write_safetensors(arrays, config, tmp_path / "named.safetensors", class_names=list("abcde"),
                      pretrained_cfg=PretrainedCfg(input_size=(3, 8, 8)))
    code, out, _ = convert(capsys, "--to", "torch", tmp_path / "named.safetensors", tmp_path / "named.pth")
    assert code == 0 and out.strip().endswith(
        "; its class names and preprocessing stay in named.safetensors (a .pth holds tensors only)"), out


def test_outputs_get_the_umask_mode(tmp_path, capsys):
    torch.save(tiny().state_dict(), tmp_path / "in.pth")
    old = os.umask(0o027)
    try:
        assert convert(capsys, tmp_path / "in.pth", tmp_path / "a.safetensors")[0] == 0
        assert convert(capsys, "--to", "torch", tmp_path / "a.safetensors", tmp_path / "b.pth")[0] == 0
        write_metrics(tmp_path / "metrics.jsonl", [])
        os.umask(0o022)
        dj.save(dj.load(tmp_path / "a.safetensors"), tmp_path / "c.safetensors")
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE((tmp_path / name).stat().st_mode)
             for name in ("a.safetensors", "b.pth", "metrics.jsonl", "c.safetensors")}
    assert modes == {"a.safetensors": 0o640, "b.pth": 0o640, "metrics.jsonl": 0o640, "c.safetensors": 0o644}


def test_conversions_give_the_same_bytes_every_time(tmp_path, capsys):
    torch.save(tiny().state_dict(), tmp_path / "in.pth")
    for name in ("a", "b"):
        assert convert(capsys, tmp_path / "in.pth", tmp_path / f"{name}.safetensors")[0] == 0
        assert convert(capsys, "--to", "torch", tmp_path / f"{name}.safetensors", tmp_path / f"{name}.pth")[0] == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert (tmp_path / "a.pth").read_bytes() == (tmp_path / "b.pth").read_bytes()
    # safetensors orders its metadata by a hash map, differently from one call to the next: with
    # three entries, eight writes in a row would rarely agree by chance.
    arrays, config = read_safetensors(tmp_path / "a.safetensors")
    for i in range(8):
        write_safetensors(arrays, config, tmp_path / f"n{i}.safetensors", class_names=list("abcde"))
    assert len({(tmp_path / f"n{i}.safetensors").read_bytes() for i in range(8)}) == 1
    data = (tmp_path / "n0.safetensors").read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])


NO_TORCH = """
import sys
for extra in ("grain", "PIL", "sklearn", "tqdm", "matplotlib"):  # the train extra: a converter needs none
    sys.modules[extra] = None
from densenet_jax import cli
cli.main(["convert", sys.argv[1], sys.argv[2]])        # safetensors with torchvision's keys
assert "torch" not in sys.modules, "converting a safetensors file imported torch"
sys.modules["torch"] = None                           # from here on, as if torch were not installed
for argv in ([sys.argv[3], sys.argv[4]], ["--to", "torch", sys.argv[2], sys.argv[4]]):
    try:
        cli.main(["convert", *argv])
    except SystemExit as e:
        print("exit", e.code)
"""


def test_convert_needs_torch_for_pickles_only(tmp_path):
    """As a pip user without the extras: no train extra at all, and torch only once it is made
    unimportable (after checking that converting a safetensors file never imported it)."""
    model = tiny()
    save_file(dict(model.state_dict()), str(tmp_path / "tv.safetensors"))
    torch.save(model.state_dict(), tmp_path / "tv.pth")
    out = tmp_path / "out.safetensors"
    result = subprocess.run([sys.executable, "-c", NO_TORCH, tmp_path / "tv.safetensors", out,
                             tmp_path / "tv.pth", tmp_path / "again.pth"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("exit 1") == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all("the [convert] extra: pip install torch torchvision" in line for line in lines), lines
    assert "tv.pth" in lines[0] and "again.pth" in lines[1], lines
    assert_file_holds(out, model.state_dict())
    assert not (tmp_path / "again.pth").exists()
