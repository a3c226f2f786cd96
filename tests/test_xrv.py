"""torchxrayvision's DenseNets: converted weights give xrv's logits, ``predict`` on a PNG gives the
probabilities xrv's own pipeline gives for that file (its normalize, XRayCenterCrop, XRayResizer,
op_norm), and ``explain`` gives the Grad-CAM of xrv's model. xrv's network is built with
``weights=None`` (no download) at a reduced depth, so that the whole file stays cheap; the key names
and the forward are xrv's own class's."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchxrayvision as xrv
from flax import nnx
from PIL import Image

from densenet_jax import cli
from densenet_jax.data.images import read_image
from densenet_jax.factory import load
from densenet_jax.inference import model_transform

NAME = "densenet121-res224-nih"  # thresholds with NaN (outputs it was not trained on) and unnamed outputs
SMALL = dict(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16)


def calibrated(model: torch.nn.Module, x: torch.Tensor, seed: int) -> torch.nn.Module:
    """``model`` with BatchNorm statistics taken from a batch of ``x`` and then perturbed, random
    affine parameters, and a classifier bias at the logit of each threshold: outputs of realistic
    size (fresh statistics on [-1024, 1024] inputs give logits in the thousands), either side of
    their operating points."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
        for m in norms:
            n = m.num_features
            m.running_mean.add_(0.1 * m.running_var.sqrt() * torch.randn(n, generator=g))
            m.running_var.mul_(0.8 + 0.4 * torch.rand(n, generator=g))
            m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(0.2 * torch.randn(n, generator=g))
        t = torch.tensor(xrv.models.model_urls[NAME]["op_threshs"], dtype=torch.float32)
        model.classifier.bias.copy_(torch.nan_to_num(torch.log(t / (1 - t))))
    return model.eval()


def draw_xray(path, height: int = 300, width: int = 259, seed: int = 0):
    """An 8-bit grey PNG, not square (so the centre crop matters; an odd width, where rounding of
    the crop's offset shows), with smooth shapes and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    image = 120 + 60 * np.sin(xx / 17.0) * np.cos(yy / 23.0) + rng.normal(0, 20, (height, width))
    image[(yy - 150) ** 2 + (xx - 90) ** 2 < 40 ** 2] += 70
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "L").save(path)
    return path


def xrv_input(path) -> torch.Tensor:
    """xrv's own pipeline for an image file: utils.load_image (normalize to [-1024, 1024]), then
    XRayCenterCrop and XRayResizer(224), as its README and scripts do."""
    crop_resize = xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(224)
    image = xrv.utils.load_image(str(path))
    for t in crop_resize:
        image = t(image)
    return torch.from_numpy(image)[None]


def run_cli(capsys, *argv, expect: int = 0) -> str:
    if expect:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(list(argv))
        assert exit_info.value.code == expect
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]
    cli.main(list(argv))
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """xrv's DenseNet (calibrated statistics), its state dict as a named model's holds it (the
    ``op_threshs`` buffer beside the network), and that file converted with --xrv-weights."""
    root = tmp_path_factory.mktemp("xrv")
    torch.manual_seed(0)
    x = torch.from_numpy(np.random.default_rng(1).uniform(-1024, 1024, (8, 1, 224, 224)).astype(np.float32))
    model = calibrated(xrv.models.DenseNet(weights=None, **SMALL), x, seed=2)
    model.op_threshs = torch.tensor(xrv.models.model_urls[NAME]["op_threshs"], dtype=torch.float32)
    torch.save(model.state_dict(), root / "xrv.pth")
    out = root / "xrv.safetensors"
    cli.main(["convert", str(root / "xrv.pth"), str(out), "--xrv-weights", NAME])
    return model, out, root


def test_converted_xrv_densenet_gives_xrv_logits(converted):
    model, weights, _ = converted
    theirs_model = xrv.models.DenseNet(weights=None, **SMALL)
    theirs_model.load_state_dict({k: v for k, v in model.state_dict().items() if k != "op_threshs"})
    x = np.random.default_rng(3).uniform(-1024, 1024, (2, 1, 224, 224)).astype(np.float32)
    with torch.no_grad():
        theirs = theirs_model.eval()(torch.from_numpy(x)).numpy()  # no op_threshs: xrv returns logits
    ours_model = load(weights)
    ours_model.eval()
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(ours_model, np.transpose(x, (0, 2, 3, 1))))
    assert theirs.shape == ours.shape == (2, 18)
    assert np.abs(theirs).max() < 30  # realistic logits, so that 1e-5 means something
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_the_weights_record_xrv_names_thresholds_and_preprocessing(converted):
    _, weights, _ = converted
    model = load(weights)
    entry = xrv.models.model_urls[NAME]
    assert model.class_names == entry["labels"]
    np.testing.assert_array_equal(np.asarray(model.pretrained_cfg.op_threshs, np.float32),
                                  np.asarray(entry["op_threshs"], np.float32))
    assert model.pretrained_cfg.crop_mode == "xrv" and model.pretrained_cfg.input_size == (1, 224, 224)


@pytest.mark.parametrize("preprocess", ["weights", "xrv"])
def test_preprocessing_equals_xrv_pipeline_on_a_png(converted, tmp_path, preprocess):
    """What the weights record, and predict's --preprocess xrv for weights that record nothing."""
    model = load(converted[1])
    if preprocess == "xrv":
        model.pretrained_cfg = None
    png = draw_xray(tmp_path / "chest.png")
    ours = model_transform(model, preprocess)({"image": read_image(png)})["image"]
    theirs = xrv_input(png)[0].numpy().transpose(1, 2, 0)
    assert ours.shape == theirs.shape == (224, 224, 1) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)  # the same float32 steps, and scikit-image's resize


def test_convert_preprocess_xrv_records_the_pipeline_alone(converted, tmp_path, capsys):
    model, _, _ = converted
    plain = tmp_path / "plain.pth"  # a state dict without xrv's op_threshs buffer
    torch.save({k: v for k, v in model.state_dict().items() if k != "op_threshs"}, plain)
    out = tmp_path / "plain.safetensors"
    run_cli(capsys, "convert", str(plain), str(out), "--preprocess", "xrv")
    cfg = load(out).pretrained_cfg
    assert cfg.crop_mode == "xrv" and cfg.op_threshs is None and load(out).class_names is None


def test_predict_on_a_png_gives_xrv_probabilities(converted, tmp_path, capsys):
    model, weights, _ = converted
    pngs = [draw_xray(tmp_path / f"chest{i}.png", seed=i, width=260 + 20 * i) for i in range(2)]
    results = json.loads(run_cli(capsys, "predict", "--weights", str(weights), "--json", "--no-progress",
                                 *map(str, pngs)))
    model.input_resolution = 224  # as a named model: xrv's forward checks size and range, then op_norm
    try:
        for png, result in zip(pngs, results):
            with torch.no_grad():
                theirs = model(xrv_input(png))[0].numpy()
            expected = {name: p for name, p in zip(xrv.models.model_urls[NAME]["labels"], theirs) if name}
            assert result["probabilities"].keys() == expected.keys()
            ours = np.array([result["probabilities"][k] for k in expected])
            np.testing.assert_allclose(ours, np.array(list(expected.values())), rtol=0, atol=1e-5)
            assert (ours < 0.5).any() and (ours > 0.5).any()  # both sides of op_norm's operating point
    finally:
        del model.input_resolution


def test_explain_xrv_weights_by_pathology_name(converted, tmp_path, capsys):
    model, weights, _ = converted
    png = draw_xray(tmp_path / "chest.png", seed=5)
    out = json.loads(run_cli(capsys, "explain", "--weights", str(weights), str(png), "--label", "Effusion",
                             "--json", "--out", str(tmp_path / "cam.png")))
    label = xrv.models.model_urls[NAME]["labels"].index("Effusion")
    x = xrv_input(png)
    # Grad-CAM at xrv's final feature map: features2's ReLU of norm5's output, before the pooling.
    activations = F.relu(model.features(x))
    activations.retain_grad()
    model.classifier(activations.mean(dim=(2, 3)))[0, label].backward()
    alpha = activations.grad.mean(dim=(2, 3), keepdim=True)
    theirs = F.relu((alpha * activations).sum(1))[0].detach().numpy()
    assert out["label"] == "Effusion" and out["class"] == label
    np.testing.assert_allclose(np.asarray(out["cam"]), theirs, rtol=0, atol=1e-4)
    with Image.open(tmp_path / "cam.png") as overlay:
        assert overlay.size == (224, 224) and overlay.mode == "RGB"


@pytest.mark.parametrize("argv, words", [
    (["--xrv-weights", "densenet121-res224-everything"], "not one of torchxrayvision's DenseNet weights"),
    (["--xrv-weights", "densenet121-res224-rsna"], "are not those of densenet121-res224-rsna"),
])
def test_bad_xrv_conversions_are_one_line(converted, tmp_path, capsys, argv, words):
    _, _, root = converted
    out = tmp_path / "out.safetensors"
    line = run_cli(capsys, "convert", str(root / "xrv.pth"), str(out), *argv, expect=1)
    assert words in line and not out.exists()


def test_unknown_label_is_one_line(converted, tmp_path, capsys):
    _, weights, root = converted
    png = draw_xray(tmp_path / "chest.png")
    line = run_cli(capsys, "explain", "--weights", str(weights), str(png), "--label", "Broken heart",
                   "--out", str(tmp_path / "cam.png"), expect=1)
    assert "'Broken heart': not a class of these weights (known: Atelectasis" in line
    assert not (tmp_path / "cam.png").exists()
