"""Grad-CAM: ours equals a torch Grad-CAM of the same weights written here with hooks (the way
pytorch-grad-cam hooks timm's DenseNet: on ``features.norm5``, a BatchNorm with its ReLU inside),
and ``densenet-jax explain`` writes the overlay and the map. (torchxrayvision's weights: test_xrv.py.)"""

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from densenet_jax import cli
from densenet_jax.explain import grad_cam
from densenet_jax.factory import load
from densenet_jax.weights.format import write_safetensors
from densenet_jax.weights.torch_keys import from_torchvision
from torch_twins import nchw, randomize, state_dict_numpy

TINY = dict(growth_rate=8, block_config=(2, 2, 2), num_classes=5)  # 3 RGB channels, one label per image


def torch_grad_cam(model: torch.nn.Module, x: torch.Tensor, label: int | None) -> np.ndarray:
    """Grad-CAM with hooks on timm's ``features.norm5``: its output A and d logit / d A."""
    kept = {}

    def forward_hook(module, inputs, output):
        kept["activations"] = output
        output.register_hook(lambda grad: kept.__setitem__("gradients", grad))

    handle = model.features.norm5.register_forward_hook(forward_hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    labels = logits.argmax(1) if label is None else torch.full((len(x),), label)
    logits.gather(1, labels[:, None]).sum().backward()
    alpha = kept["gradients"].mean(dim=(2, 3), keepdim=True)
    return torch.relu((alpha * kept["activations"]).sum(1)).detach().numpy()


@pytest.fixture(scope="module")
def timm_twin(tmp_path_factory):
    """timm's DenseNet (random weights and statistics) and the same weights as a densenet_jax file."""
    torch.manual_seed(0)
    model = randomize(timm.create_model("densenet121", **TINY), seed=4).eval()
    arrays, config = from_torchvision(state_dict_numpy(model), "timm")
    path = tmp_path_factory.mktemp("cam") / "tiny.safetensors"
    write_safetensors(arrays, config, path, class_names=["cat", "dog", "fox", "owl", "yak"])
    return model, path


@pytest.mark.parametrize("label", [None, "owl"])
def test_grad_cam_equals_torch_grad_cam_with_hooks(timm_twin, label):
    model, path = timm_twin
    x = np.random.default_rng(0).normal(size=(3, 64, 64, 3)).astype(np.float32)
    index = {None: None, "owl": 3}[label]
    theirs = torch_grad_cam(model, nchw(x), index)
    ours = np.asarray(grad_cam(load(path), x, label))
    assert ours.shape == theirs.shape == (3, 4, 4) and ours.dtype == np.float32
    assert theirs.max() > 1e-2  # a map with something in it
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_explain_writes_the_overlay_and_the_map(timm_twin, tmp_path, capsys):
    model, path = timm_twin
    photo = tmp_path / "photo.png"
    pixels = np.random.default_rng(1).integers(0, 256, (80, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(photo)
    out = tmp_path / "cam.png"
    out.write_bytes(b"an earlier heatmap")
    argv = ["explain", "--weights", str(path), str(photo), "--out", str(out), "--json",
            "--preprocess", "torchvision"]
    with pytest.raises(SystemExit):  # kept without --force
        cli.main(argv)
    assert "cam.png" in capsys.readouterr().err and out.read_bytes() == b"an earlier heatmap"
    cli.main([*argv, "--force"])
    result = json.loads(capsys.readouterr().out)
    # torchvision's eval preprocessing (resize 256, crop 224) in torch, then the torch Grad-CAM.
    import torchvision.transforms as TT
    x = TT.Compose([TT.Resize(256), TT.CenterCrop(224), TT.ToTensor(),
                    TT.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(Image.open(photo))[None]
    with torch.no_grad():
        top = int(model(x).argmax())
    assert result["class"] == top and result["label"] == ["cat", "dog", "fox", "owl", "yak"][top]
    np.testing.assert_allclose(np.asarray(result["cam"]), torch_grad_cam(model, x, None)[0], rtol=0, atol=1e-4)
    with Image.open(out) as overlay:
        assert overlay.size == (224, 224) and overlay.mode == "RGB"
        # The overlay blends the image the model saw: not a flat picture.
        assert np.asarray(overlay).std() > 10


def test_explain_needs_an_output(timm_twin, tmp_path, capsys):
    _, path = timm_twin
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["explain", "--weights", str(path), str(tmp_path / "missing.png")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == ("densenet-jax: error: give --out FILE.png (the overlay), "
                                               "--json (the raw map), or both")
