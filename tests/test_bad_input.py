"""Every kind of bad file, fed to every reader: one line naming the file and the fault, exit status 1
(CheckpointError from the library), and nothing written, not even a temporary file.

The converters and the CLI run in this process here (``densenet-jax convert``'s ``main``, which the
scripts in convert/ call); test_convert.py runs the scripts as processes.
"""

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import densenet_jax as dj
from densenet_jax import cli
from densenet_jax.weights.format import config_to_json, read_safetensors
from torch_twins import cifar_bc_model
from fixtures import tiny_weights_file

# An output folder nobody may write to, root included.
UNWRITABLE = Path("/sys/densenet-jax-test.out")


def run_main(direction, argv, capsys) -> tuple[int, list[str]]:
    """Run ``densenet-jax convert`` (``direction`` "torch_to_flax" or "flax_to_torch") as its
    command does; its exit status and stderr lines."""
    to = ["--to", "torch"] if direction == "flax_to_torch" else []
    try:
        cli.main(["convert", *to, *map(str, argv)])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


def assert_refused(code, lines, output: Path, *fragments):
    assert code == 1 and len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    if output.parent.is_dir():
        assert not output.exists()
        assert not list(output.parent.glob(f".{output.name}*"))  # no temporary file either


# --- the files --------------------------------------------------------------------------------

def good_pth(path: Path) -> Path:
    torch.save(cifar_bc_model(40, 12).state_dict(), path)
    return path


def write(content: bytes):
    def make(path: Path) -> Path:
        path.write_bytes(content)
        return path
    return make


def directory(path: Path) -> Path:
    path.mkdir()
    return path


def missing(path: Path) -> Path:
    return path


def truncated_pth(path: Path) -> Path:
    data = good_pth(path).read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def pth_of(value):
    def make(path: Path) -> Path:
        torch.save(value, path)
        return path
    return make


def mutated_pth(change):
    def make(path: Path) -> Path:
        state = dict(cifar_bc_model(40, 12).state_dict())
        change(state)
        torch.save(state, path)
        return path
    return make


TORCH_FILES = {  # name: (writer, what the message must say)
    "missing": (missing, "no such file"),
    "directory": (directory, "not a file"),
    "empty": (write(b""), "empty file"),
    "random bytes": (write(np.random.default_rng(0).bytes(4096)), "not a loadable"),
    "truncated": (truncated_pth, "not a loadable"),
    "a list": (pth_of([torch.zeros(3)]), "no key ends in features.conv0.weight"),
    "no tensors": (pth_of({"epoch": 3}), "holds no tensors"),
    "Inf": (mutated_pth(lambda s: s["classifier.weight"].fill_(float("inf"))), "classifier.weight holds NaN or Inf"),
    "renamed key": (mutated_pth(lambda s: s.__setitem__("features.conv0.kernel", s.pop("features.conv0.weight"))),
                    "no key ends in features.conv0.weight"),
    "other stem": (mutated_pth(lambda s: s.__setitem__("features.conv0.weight", torch.zeros(24, 3, 5, 5))),
                   "features.conv0.weight has shape (24, 3, 5, 5)"),
    "bad bottleneck": (mutated_pth(lambda s: s.__setitem__(
        "features.denseblock1.denselayer1.conv1.weight", torch.zeros(47, 24, 1, 1))), "not a multiple"),
}


@pytest.mark.parametrize("case", sorted(TORCH_FILES))
def test_torch_to_flax_refuses(tmp_path, capsys, case):
    writer, message = TORCH_FILES[case]
    bad = writer(tmp_path / "bad.pth")
    out = tmp_path / "out.safetensors"
    code, lines = run_main("torch_to_flax", [bad, out], capsys)
    assert_refused(code, lines, out, "bad.pth", message)
    assert lines[0].count(str(bad)) == 1, lines[0]  # the path once, never "bad.pth: bad.pth: ..."


def mutated_weights(change):
    def make(path: Path) -> Path:
        arrays, config = read_safetensors(tiny_weights_file(path))
        metadata = {"format": "densenet_jax", "config": config_to_json(config)}
        change(arrays, metadata)
        save_file(arrays, str(path), metadata=metadata)
        return path
    return make


def truncated_weights(path: Path) -> Path:
    data = tiny_weights_file(path).read_bytes()
    path.write_bytes(data[:len(data) - 1000])
    return path


WEIGHT_FILES = {
    "missing": (missing, "no such file"),
    "directory": (directory, "not a file"),
    "empty": (write(b""), "not a safetensors"),
    "random bytes": (write(np.random.default_rng(1).bytes(4096)), "not a safetensors"),
    "truncated": (truncated_weights, "not a safetensors"),
    "torch pickle": (good_pth, "a torch checkpoint, not densenet_jax weights; convert it first"),
    "no metadata": (mutated_weights(lambda a, m: m.clear()), "not a densenet_jax weights file"),
    "config not JSON": (mutated_weights(lambda a, m: m.__setitem__("config", "{growth")),
                        "metadata holds no valid DenseNet config"),
    "config bad value": (mutated_weights(lambda a, m: m.__setitem__(
        "config", m["config"].replace('"growth_rate": 12', '"growth_rate": -12'))), "growth_rate must be"),
    "config unknown field": (mutated_weights(lambda a, m: m.__setitem__(
        "config", m["config"].replace("{", '{"depth": 40, ', 1))), "unexpected keyword argument 'depth'"),
    "missing tensor": (mutated_weights(lambda a, m: a.pop("features.norm5.mean")), "missing key features.norm5.mean"),
    "extra tensor": (mutated_weights(lambda a, m: a.__setitem__("features.extra", np.zeros(2, np.float32))),
                     "unexpected key features.extra"),
    "wrong shape": (mutated_weights(lambda a, m: a.__setitem__("classifier.bias", np.zeros(7, np.float32))),
                    "classifier.bias has shape (7,)"),
    "integer tensor": (mutated_weights(lambda a, m: a.__setitem__("classifier.bias", np.zeros(10, np.int64))),
                       "classifier.bias is int64"),
    "NaN": (mutated_weights(lambda a, m: a["features.norm5.scale"].__setitem__(0, np.nan)),
            "features.norm5.scale holds NaN or Inf"),
}


def test_the_convert_hint_is_a_command_that_runs_where_the_user_is(tmp_path):
    (tmp_path / "sub").mkdir()
    pth = good_pth(tmp_path / "sub" / "densenet.pth")
    with pytest.raises(dj.CheckpointError) as error:
        dj.load(pth)
    assert str(error.value).endswith(f"convert it first: densenet-jax convert {pth} {pth.with_suffix('.safetensors')}")


@pytest.mark.parametrize("case", sorted(WEIGHT_FILES))
def test_every_weights_reader_refuses(tmp_path, capsys, case):
    writer, message = WEIGHT_FILES[case]
    bad = writer(tmp_path / "bad.safetensors")
    with pytest.raises(dj.CheckpointError, match=f"bad.safetensors: .*{re.escape(message)}"):
        dj.load(bad)
    out = tmp_path / "out.pth"
    code, lines = run_main("flax_to_torch", [bad, out], capsys)
    assert_refused(code, lines, out, "bad.safetensors", message)
    # Named once, as every error line names its file; the torch pickle's twice, the second time in
    # the command that converts it.
    named = 1 + ("convert it first" in message)
    assert lines[0].count(str(bad)) == named, lines[0]
    for command in (["evaluate", "--weights", bad], ["train", "--init-from", bad, "--workdir", tmp_path / "w"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([str(a) for a in command])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 1 and len(lines) == 1 and message in lines[0], (command, lines)
        assert lines[0].count(str(bad)) == named, lines[0]
    assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.parametrize("convert, source", [("torch_to_flax", good_pth), ("flax_to_torch", tiny_weights_file)])
def test_outputs_are_never_clobbered_or_half_written(tmp_path, capsys, convert, source):
    good = source(tmp_path / "in.file")
    out = tmp_path / "out.file"
    for target, message in ((tmp_path / "no" / "out.file", "does not exist"),
                            (UNWRITABLE, "cannot write")):
        assert_refused(*run_main(convert, [good, target], capsys), target, message)
    out.write_bytes(b"keep me")
    code, lines = run_main(convert, [good, out], capsys)
    assert code == 1 and "--force" in lines[0] and out.read_bytes() == b"keep me"
    code, _ = run_main(convert, [good, out, "--force"], capsys)
    assert code == 0 and out.stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.file", "out.file"]
