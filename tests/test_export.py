"""Export, each format checked by its own runtime: onnxruntime runs the ONNX file, a process that
cannot import densenet_jax runs the StableHLO artifact, and timm loads the Hub folder.

densenet121 is exported at 64x64 (not 224): the export's cost is in the graph's size, which the
image size does not change, and its run time is smaller. Each densenet121 export happens once
(module fixtures) and serves every batch size.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn.functional as F
from flax import nnx

import densenet_jax as dj
from densenet_jax import cli
from densenet_jax.errors import CheckpointError
from densenet_jax.export import MIN_OPSET, default_image_size, export, onnx_bytes
from densenet_jax.model.pretrained_cfg import PretrainedCfg
from jax2onnx import to_onnx
from densenet_jax.files import write_folder
from densenet_jax.model.layers import max_pool_3x3_s2
from densenet_jax.weights.format import state_arrays, write_safetensors
from conftest import flax_twin
from fixtures import tiny_weights_file
from torch_twins import nchw, torchvision_model

SIZE = 64
CLASS_NAMES = [f"class {i}" for i in range(1000)]
# An output folder nobody may write to, root included.
UNWRITABLE = Path("/sys/densenet-jax-export.out")


def images(batch: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def logits(model: dj.DenseNet, x: np.ndarray) -> np.ndarray:
    """Our logits as predict and the trainer's eval compute them: the eval model jitted, its
    weights as arguments (op by op gives the same bits, but compiles every op for every shape)."""
    model.eval()
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))(state, jnp.asarray(x)))


def run_cli(argv, capsys) -> tuple[int, list[str], list[str]]:
    """``densenet-jax`` in this process: exit status, stdout lines, stderr lines."""
    try:
        cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip().splitlines()


@pytest.fixture(scope="module")
def densenet121_weights(tmp_path_factory):
    """torchvision's densenet121 (randomised BN statistics) as a densenet_jax weights file that
    carries class names, as a fine-tuned model's would."""
    model = flax_twin(torchvision_model("densenet121"))
    path = tmp_path_factory.mktemp("weights") / "densenet121.safetensors"
    write_safetensors({k: np.asarray(v) for k, v in state_arrays(model).items()}, model.config, path,
                      class_names=CLASS_NAMES)
    return path


@pytest.fixture(scope="module")
def densenet121(densenet121_weights):
    return dj.load(densenet121_weights)


@pytest.fixture(scope="module")
def densenet121_logits(densenet121):
    """Our logits for the images of batch 1 and 3."""
    return {batch: logits(densenet121, images(batch)) for batch in (1, 3)}


def test_max_pool_is_torchs_and_exports_as_a_2d_maxpool():
    """The stem's max-pool: torch's values and gradients, bit for bit (negative inputs, where a zero
    pad would differ; odd and even sizes), and one 2-D ONNX MaxPool that onnxruntime runs."""
    x = -np.abs(np.random.default_rng(0).standard_normal((2, 9, 12, 5))).astype(np.float32)
    t = nchw(x).requires_grad_()
    expected = F.max_pool2d(t, 3, stride=2, padding=1)
    expected.square().sum().backward()
    y = max_pool_3x3_s2(jnp.asarray(x))
    grad = jax.grad(lambda v: jnp.sum(max_pool_3x3_s2(v) ** 2))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(y), expected.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(grad), t.grad.numpy().transpose(0, 2, 3, 1))

    proto = to_onnx(max_pool_3x3_s2, inputs=[("batch", 9, 12, 5)])
    pools = [n for n in proto.graph.node if n.op_type == "MaxPool"]
    assert len(pools) == 1
    assert [list(a.ints) for a in pools[0].attribute if a.name == "kernel_shape"] == [[3, 3]]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_array_equal(out, np.asarray(y))


def assert_close(actual, expected, rtol):
    """Every logit within ``rtol`` of the largest one's magnitude."""
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= rtol * scale, (np.abs(actual - expected).max(), scale)


def test_onnx_densenet121_nchw_from_the_cli(densenet121_weights, densenet121_logits, tmp_path, capsys):
    out = tmp_path / "densenet121.onnx"
    code, lines, err = run_cli(["export", "--weights", densenet121_weights, "--format", "onnx",
                                "--image-size", SIZE, "--layout", "nchw", out], capsys)
    assert code == 0 and str(out) in lines[-1] and not err, err
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (spec,) = session.get_inputs()
    assert spec.name == "images" and spec.shape == ["batch", 3, SIZE, SIZE]
    for batch in (1, 3):
        x = images(batch)
        (y,) = session.run(["logits"], {"images": np.ascontiguousarray(x.transpose(0, 3, 1, 2))})
        assert y.shape == (batch, 1000)
        assert_close(y, densenet121_logits[batch], 1e-4)


def test_onnx_paper_cifar_model_nhwc():
    """The paper's CIFAR DenseNet (L=40 k=12: 3x3 stem, no bottleneck, no compression) at 32x32,
    with 2 layers per block instead of 12: jax2onnx's conversion time grows faster than linearly
    with the graph (146 s for all 36 layers on the loaded 2-core machine), and every kind of layer
    is there with 2."""
    model = dj.create_model("densenet_40_k12", block_config=(2, 2, 2))
    proto = onnx.load_from_string(onnx_bytes(model, image_size=32))
    onnx.checker.check_model(proto)
    # The default opset is the oldest the graph is valid in (older runtimes refuse newer opsets).
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", MIN_OPSET)]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 32, 32, 3]
    for batch in (1, 3):
        x = images(batch, 32)
        (y,) = session.run(None, {"images": x})
        assert_close(y, logits(model, x), 1e-4)
    del proto.opset_import[:]
    proto.opset_import.append(onnx.helper.make_opsetid("", MIN_OPSET - 1))
    with pytest.raises(onnx.checker.ValidationError):  # the same graph one opset older is invalid
        onnx.checker.check_model(proto)


# Runs in a process that cannot import densenet_jax: only JAX and the artifact.
LOADER = textwrap.dedent("""
    import sys
    sys.modules["densenet_jax"] = None  # any import of the package fails
    try:
        import densenet_jax
        raise SystemExit("densenet_jax was importable")
    except ImportError:
        pass
    import jax, numpy as np
    exported = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
    for path in sys.argv[2:]:
        np.save(path + ".out.npy", np.asarray(exported.call(np.load(path))))
""")


def test_stablehlo_runs_without_densenet_jax_bit_for_bit(densenet121_weights, densenet121,
                                                         densenet121_logits, tmp_path, capsys):
    out = tmp_path / "densenet121.stablehlo"
    code, _, _ = run_cli(["export", "--weights", densenet121_weights, "--format", "stablehlo",
                          "--image-size", SIZE, out], capsys)
    assert code == 0
    inputs = []
    for batch in (1, 3):
        inputs.append(tmp_path / f"x{batch}.npy")
        np.save(inputs[-1], images(batch))
    # No PYTHONPATH: no checkout either; this process's XLA flags, for the same compiled program.
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
    subprocess.run([sys.executable, "-c", LOADER, out, *inputs], check=True, env=env, cwd=tmp_path,
                   timeout=600)
    # One artifact for every platform, run here on the CPU.
    assert jax.export.deserialize(bytearray(out.read_bytes())).platforms == ("cpu", "cuda", "tpu")
    densenet121.eval()
    jitted = jax.jit(lambda x: densenet121(x))
    for batch, path in zip((1, 3), inputs):
        x = np.load(path)
        y = np.load(f"{path}.out.npy")
        # Bit for bit: the program XLA compiles for the model jitted in this process with its
        # weights as constants, as exported. With the weights as arguments (or op by op), XLA
        # compiles the last dense block differently, and the logits move by about 1e-6.
        np.testing.assert_array_equal(y, np.asarray(jitted(jnp.asarray(x))))
        assert_close(y, densenet121_logits[batch], 1e-5)


def test_timm_loads_the_folder_as_pretrained(densenet121_weights, densenet121_logits, tmp_path, capsys):
    out = tmp_path / "densenet121-timm"
    code, _, _ = run_cli(["export", "--weights", densenet121_weights, "--format", "timm",
                          "--image-size", SIZE, out], capsys)
    assert code == 0 and sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    x, expected = images(3), densenet121_logits[3]
    from_folder = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    overlay = timm.create_model("densenet121", pretrained=True, num_classes=1000,
                                pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
    for model in (from_folder, overlay):
        with torch.no_grad():
            np.testing.assert_allclose(model(nchw(x)).numpy(), expected, rtol=1e-5, atol=1e-5)
    cfg = from_folder.pretrained_cfg
    assert cfg["label_names"] == CLASS_NAMES
    assert dj.load(f"local-dir:{out}").class_names == CLASS_NAMES  # and back: names, not ImageNet's
    data = {k: tuple(v) if isinstance(v, list) else v
            for k, v in timm.data.resolve_data_config({}, model=from_folder).items()}
    assert data == {"input_size": (3, SIZE, SIZE), "interpolation": "bilinear",
                    "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                    "crop_pct": 0.875, "crop_mode": "center"}
    assert json.loads((out / "config.json").read_text())["architecture"] == "densenet121"


def test_timm_folder_keeps_the_weights_test_size():
    """An ra tag's larger test size (288, crop 0.95) survives the export: timm resolves it."""
    from densenet_jax.export import timm_files
    from densenet_jax.model.registry import TAGS

    model = dj.DenseNet121(rngs=nnx.Rngs(0))
    model.pretrained_cfg = TAGS["densenet121.ra_in1k"]
    cfg = json.loads(timm_files(model)["config.json"])["pretrained_cfg"]
    timms = timm.models.get_pretrained_cfg("densenet121.ra_in1k").to_dict()
    for use_test_size in (False, True):
        ours, theirs = (timm.data.resolve_data_config(pretrained_cfg=c, use_test_size=use_test_size)
                        for c in (cfg, timms))
        assert {k: tuple(v) if isinstance(v, list) else v for k, v in ours.items()} == theirs
    assert tuple(theirs["input_size"]) == (3, 288, 288)


def test_timm_folder_of_a_one_channel_model(densenet121_weights, tmp_path):
    """in_chans=1 (a grey model, its weights without a recorded preprocessing): timm builds it from the folder
    with one input channel and our stem's weights, and resolves one-channel preprocessing: input
    size (1, S, S) and one mean and std, ImageNet's averaged as timm's in_chans=1 takes them (the
    logits of timm's folders are compared above)."""
    model = dj.load(densenet121_weights, in_chans=1)
    export(model, "timm", tmp_path / "grey", image_size=SIZE)
    theirs = timm.create_model(f"local-dir:{tmp_path / 'grey'}", pretrained=True)
    np.testing.assert_array_equal(theirs.features.conv0.weight.detach().numpy(),
                                  np.transpose(np.asarray(model.features.conv0.kernel[...]), (3, 2, 0, 1)))
    data = timm.data.resolve_data_config({}, model=theirs)
    assert tuple(data["input_size"]) == (1, SIZE, SIZE)
    np.testing.assert_allclose(data["mean"], [sum((0.485, 0.456, 0.406)) / 3], rtol=1e-12)
    np.testing.assert_allclose(data["std"], [sum((0.229, 0.224, 0.225)) / 3], rtol=1e-12)


# --- refusals: one line, exit 1, nothing written ---------------------------------------------------

def assert_refused(code, err, output: Path, *fragments):
    assert code == 1 and len(err) == 1, err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    if output.parent.is_dir():
        assert not output.exists()
        assert not list(output.parent.glob(f".{output.name}*"))  # no temporary file or folder


@pytest.mark.parametrize("case", ["missing weights", "corrupt weights", "unknown format",
                                  "unknown layout", "layout for stablehlo", "unwritable output",
                                  "missing output folder", "image too small", "no timm architecture",
                                  "timm folder named as a file", "existing output", "opset too old",
                                  "unknown platform", "timm onto a folder of other files"])
def test_bad_input_is_one_line_exit_1_and_no_output(case, tmp_path, capsys, request):
    weights = tiny_weights_file(tmp_path / "tiny.safetensors")
    out, fmt, options, fragments = tmp_path / "out", "stablehlo", [], []
    if case == "missing weights":
        weights, fragments = tmp_path / "absent.safetensors", ["absent.safetensors", "no such file"]
    elif case == "corrupt weights":
        weights = tmp_path / "corrupt.safetensors"
        weights.write_bytes(b"\x00garbage" * 10)
        fragments = ["corrupt.safetensors"]
    elif case == "unknown format":
        fmt, fragments = "tflite", ["'tflite'", "onnx, stablehlo, timm"]
    elif case == "unknown layout":
        fmt, options, fragments = "onnx", ["--layout", "nwhc"], ["'nwhc'"]
    elif case == "layout for stablehlo":
        options, fragments = ["--layout", "nchw"], ["onnx only"]
    elif case == "unwritable output":
        out, fragments = UNWRITABLE, [str(UNWRITABLE)]
    elif case == "missing output folder":
        out, fragments = tmp_path / "absent" / "out", ["does not exist"]
    elif case == "image too small":
        options, fragments = ["--image-size", "3"], ["--image-size 3", "at least 4"]
    elif case == "no timm architecture":
        fmt, fragments = "timm", ["timm has no"]
    elif case == "timm folder named as a file":
        fmt, out, fragments = "timm", tmp_path / "out.json", ["out.json", "is a folder", "not a .json file"]
    elif case == "existing output":
        out.write_bytes(b"the user's file")
        fragments = ["already exists", "--force"]
    elif case == "opset too old":
        fmt, options, fragments = "onnx", ["--opset", "17"], ["--opset 17", f"needs opset {MIN_OPSET}"]
    elif case == "unknown platform":
        options, fragments = ["--platforms", "cpu,gpu"], ["--platforms cpu,gpu", "cuda"]
    elif case == "timm onto a folder of other files":
        weights = request.getfixturevalue("densenet121_weights")
        out.mkdir()
        (out / "mine.txt").write_text("the user's")
        fmt, fragments = "timm", ["holds mine.txt", "new or empty folder"]
    code, _, err = run_cli(["export", "--weights", weights, "--format", fmt, *options, out], capsys)
    if case == "existing output":
        assert code == 1 and len(err) == 1 and all(f in err[0] for f in fragments), err
        assert out.read_bytes() == b"the user's file"
        assert not list(tmp_path.glob(".out*"))
    elif case == "timm onto a folder of other files":  # not "pass --force", which would refuse too
        assert code == 1 and len(err) == 1 and all(f in err[0] for f in fragments) and "--force" not in err[0], err
        assert [p.name for p in out.iterdir()] == ["mine.txt"]
    else:
        assert_refused(code, err, out, *fragments)


def test_force_replaces_an_existing_output(tmp_path, capsys):
    weights = tiny_weights_file(tmp_path / "tiny.safetensors")
    out = tmp_path / "tiny.stablehlo"
    out.write_bytes(b"old")
    code, _, _ = run_cli(["export", "--weights", weights, "--format", "stablehlo", "--image-size", 8,
                          "--platforms", "cpu", "--force", out], capsys)
    assert code == 0
    exported = jax.export.deserialize(bytearray(out.read_bytes()))
    assert exported.in_avals[0].shape[1:] == (8, 8, 3) and exported.platforms == ("cpu",)
    assert not list(tmp_path.glob(".tiny.stablehlo*"))


def test_the_default_image_size_is_the_weights_own(tmp_path, capsys):
    """Without --image-size, every format takes the size the weights record (a training run's 40),
    as the timm folder's config does; weights that record none get 224."""
    model = dj.create_model("densenet_bc_100_k12", block_config=(2, 2, 2), rngs=nnx.Rngs(0))
    model.pretrained_cfg = PretrainedCfg(input_size=(3, 40, 40), crop_pct=1.0)
    weights = tmp_path / "trained-at-40.safetensors"
    dj.save(model, weights)
    code, _, err = run_cli(["export", "--weights", weights, "--format", "stablehlo", "--platforms", "cpu",
                            tmp_path / "out.stablehlo"], capsys)
    assert code == 0, err
    assert jax.export.deserialize(bytearray((tmp_path / "out.stablehlo").read_bytes())).in_avals[0].shape[1:] == (40, 40, 3)
    assert default_image_size(dj.create_model("densenet_bc_16_k12")) == 224


def test_a_folder_output_is_replaced_whole_or_not_at_all(tmp_path):
    out = tmp_path / "folder"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    with pytest.raises(CheckpointError, match="holds mine.txt, not only config.json"):
        write_folder(out, {"config.json": b"{}"})
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    with pytest.raises(CheckpointError, match="holds mine.txt, not only config.json"):
        write_folder(out, {"config.json": b"{}"}, force=True)  # --force replaces an export, not this
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    (out / "mine.txt").unlink()
    write_folder(out, {"config.json": b"[]"}, force=True)  # an empty folder is replaced
    write_folder(out, {"config.json": b"{}"}, force=True)
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_bytes() == b"{}"
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]  # no temporary or old folder left


def test_onnx_without_the_export_extra_is_one_line(monkeypatch):
    """Without jax2onnx, the ONNX export says which extra it needs instead of a ModuleNotFoundError."""
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # as if not installed
    model = dj.create_model("densenet_bc_16_k12", num_classes=3)
    with pytest.raises(ValueError, match=r"^ONNX export needs jax2onnx \(the \[export\] extra"):
        onnx_bytes(model, image_size=32)
