"""The converters, run as a user runs them: torch -> flax -> torch, the forms people have, bad input."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from flax import nnx

import densenet_jax as dj
from densenet_jax import cli
from densenet_jax.weights.torch_files import read_torch_checkpoint
from torch_twins import assert_file_holds, cifar_bc_model, nchw, torchvision_model

ROOT = Path(__file__).resolve().parent.parent


def run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / "convert" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def assert_refused(result, output: Path, *fragments):
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}*"))  # no temporary file left either


def test_round_trip_is_exact_and_loads_strictly_into_torchvision(tmp_path):
    original = torchvision_model("densenet121", seed=11)
    torch.save(original.state_dict(), tmp_path / "in.pth")
    result = run("torch_to_flax.py", tmp_path / "in.pth", tmp_path / "m.safetensors")
    assert result.returncode == 0, result.stderr
    assert "densenet121" in result.stdout and "7,978,856" in result.stdout
    result = run("flax_to_torch.py", tmp_path / "m.safetensors", tmp_path / "out.pth")
    assert result.returncode == 0, result.stderr
    state = torch.load(tmp_path / "out.pth", weights_only=True)
    back = torchvision.models.densenet121(weights=None)
    back.load_state_dict(state, strict=True)
    for key, value in original.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(state[key], value), key  # bit for bit


def test_converted_model_matches_torch(tmp_path, rng):
    torch_model = cifar_bc_model(100, 12, num_classes=100).eval()
    torch.save(torch_model.state_dict(), tmp_path / "bc.pth")
    assert run("torch_to_flax.py", tmp_path / "bc.pth", tmp_path / "bc.safetensors").returncode == 0
    model = dj.load(tmp_path / "bc.safetensors")
    assert model.config == dj.get_config("densenet_bc_100_k12", num_classes=100)
    model.eval()
    x = rng.standard_normal((2, 32, 32, 3), dtype=np.float32)
    with torch.no_grad():
        reference = torch_model(nchw(x)).numpy()
    logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))  # one program, not one per operation
    assert np.abs(logits - reference).max() <= 1e-5 * np.abs(reference).max()


def legacy_keys(state):
    """torchvision's pre-0.3 names: denselayerN.norm.1.weight instead of norm1.weight."""
    import re
    return {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()}


@pytest.mark.parametrize("form", ["legacy", "module_prefix", "wrapped_state_dict", "wrapped_model",
                                  "fp16", "safetensors"])
def test_accepts_the_forms_people_have(tmp_path, form):
    original = cifar_bc_model(40, 12, seed=5)  # a small BC model: 6 layers per block
    state = original.state_dict()
    path = tmp_path / "in.pth"
    if form == "legacy":
        state = legacy_keys(state)
        assert any(".norm.1." in k for k in state)
    elif form == "module_prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    elif form == "wrapped_state_dict":
        state = {"epoch": 3, "state_dict": state, "optimizer": {}}
    elif form == "wrapped_model":
        state = {"model": state}
    elif form == "fp16":
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    if form == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "in.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    out = tmp_path / "out.safetensors"
    cli.main(["convert", str(path), str(out)])  # what convert/torch_to_flax.py runs, in this process
    # Every tensor, BN statistics included: fp16 ones kept as fp16, legacy names' values kept.
    assert_file_holds(out, original.state_dict(), (lambda v: v.half()) if form == "fp16" else None)


def test_no_bottleneck_model_round_trips(tmp_path):
    model = dj.create_model("densenet_40_k12", num_classes=4, rngs=nnx.Rngs(2))
    dj.save(model, tmp_path / "a.safetensors")
    assert run("flax_to_torch.py", tmp_path / "a.safetensors", tmp_path / "a.pth").returncode == 0
    assert run("torch_to_flax.py", tmp_path / "a.pth", tmp_path / "b.safetensors").returncode == 0
    back = dj.load(tmp_path / "b.safetensors")
    assert back.config == model.config
    np.testing.assert_array_equal(np.asarray(back.features.denseblock3.denselayer12.conv1.kernel[...]),
                                  np.asarray(model.features.denseblock3.denselayer12.conv1.kernel[...]))


def mutate(tmp_path, change):
    state = dict(cifar_bc_model(40, 12).state_dict())
    change(state)
    torch.save(state, tmp_path / "bad.pth")
    return tmp_path / "bad.pth"


@pytest.mark.parametrize("change, fragments", [
    (lambda s: s.pop("features.denseblock2.denselayer1.norm2.running_var"),
     ["missing key features.denseblock2.denselayer1.norm2.running_var"]),
    (lambda s: s.__setitem__("features.denseblock1.denselayer1.extra.weight", torch.zeros(3)),
     ["unexpected key features.denseblock1.denselayer1.extra.weight"]),
    (lambda s: s.__setitem__("features.transition2.conv.weight", torch.zeros(40, 81, 1, 1)),
     ["features.transition2.conv.weight", "(40, 81, 1, 1)"]),
    (lambda s: s.__setitem__("classifier.bias", torch.zeros(10, dtype=torch.int64)),
     ["classifier.bias", "not a floating-point tensor"]),
    (lambda s: s["features.norm5.weight"].fill_(float("nan")), ["features.norm5.weight", "NaN"]),
])
def test_bad_state_dicts_are_refused_in_one_line(tmp_path, change, fragments):
    bad = mutate(tmp_path, change)
    out = tmp_path / "out.safetensors"
    assert_refused(run("torch_to_flax.py", bad, out), out, "bad.pth", *fragments)


def test_bad_files_are_refused_in_one_line(tmp_path):
    out = tmp_path / "out.safetensors"
    assert_refused(run("torch_to_flax.py", tmp_path / "nope.pth", out), out, "nope.pth", "no such file")
    (tmp_path / "noise.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    assert_refused(run("torch_to_flax.py", tmp_path / "noise.pth", out), out, "noise.pth", "not a loadable")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet.pth")
    assert_refused(run("torch_to_flax.py", tmp_path / "resnet.pth", out), out, "resnet.pth", "not a DenseNet")
    torch.save(cifar_bc_model(40, 12).state_dict(), tmp_path / "ok.pth")
    assert_refused(run("torch_to_flax.py", tmp_path / "ok.pth", tmp_path / "no" / "out.safetensors"),
                   tmp_path / "no" / "out.safetensors", "does not exist")
    out.write_bytes(b"keep me")
    result = run("torch_to_flax.py", tmp_path / "ok.pth", out)
    assert result.returncode == 1 and "--force" in result.stderr and out.read_bytes() == b"keep me"
    torch_out = tmp_path / "out.pth"
    assert_refused(run("flax_to_torch.py", tmp_path / "ok.pth", torch_out), torch_out, "ok.pth",
                   "a torch checkpoint")


class Exploit:
    """A pickle payload that would create a file if it were ever executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickles_never_execute_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"features.conv0.weight": Exploit(str(marker))}, tmp_path / "evil.pth")
    assert not marker.exists()
    out = tmp_path / "out.safetensors"
    assert_refused(run("torch_to_flax.py", tmp_path / "evil.pth", out), out, "evil.pth")
    assert not marker.exists()
    with pytest.raises(dj.CheckpointError):
        read_torch_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()
