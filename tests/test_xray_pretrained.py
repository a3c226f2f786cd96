"""Multi-label against torch (docs/xray.md): the masked, positive-weighted BCE against
``torch.nn.BCEWithLogitsLoss``, and an ImageNet tag fine-tuned on grey 224 px X-ray-like images
(``--pretrained densenet121.tv_in1k --in-chans 1``, from the stand-in Hub) predicting as timm does
with the same weights."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from densenet_jax import cli
from densenet_jax.train.losses import LossConfig, per_example_correct, per_example_loss
from densenet_jax.weights.format import read_safetensors, stored_class_names, stored_pretrained_cfg
from densenet_jax.weights.torch_keys import to_torchvision
from fixtures import SHAPES, draw_shapes
from test_hub import TINY, hf_home, hub, tiny_timm  # noqa: F401 (fixtures)


def test_masked_bce_with_pos_weight_equals_torchs_on_the_known_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (6, 4)).astype(np.float32)
    targets = (rng.random((6, 4)) < 0.4).astype(np.float32)
    pos_weight = (3.0, 0.5, 1.0, 7.0)
    config = LossConfig(multi_label=True, pos_weight=pos_weight)
    reference = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight), reduction="none")(
        torch.from_numpy(logits), torch.from_numpy(targets)).numpy()
    ours = per_example_loss(jnp.asarray(logits), jnp.asarray(targets), config)
    np.testing.assert_allclose(float(ours.mean()), reference.mean(), rtol=1e-6)  # torch's reduction "mean"
    missing = rng.random((6, 4)) < 0.3
    with_gaps = np.where(missing, np.nan, targets).astype(np.float32)
    ours = per_example_loss(jnp.asarray(logits), jnp.asarray(with_gaps), config)
    np.testing.assert_allclose(ours, np.where(missing, 0, reference).sum(1) / 4, rtol=1e-6)
    grads = jax.grad(lambda x: per_example_loss(x, jnp.asarray(with_gaps), config).sum())(jnp.asarray(logits))
    assert np.isfinite(grads).all() and not np.asarray(grads)[missing].any()  # a missing label teaches nothing
    agree = (logits > 0) == (targets > 0.5)
    np.testing.assert_array_equal(per_example_correct(jnp.asarray(logits), jnp.asarray(with_gaps), config),
                                  (agree | missing).all(1))


def test_grey_fine_tuning_of_a_pretrained_tag_at_224_predicts_as_timm(hub, hf_home, tiny_timm, tmp_path, capsys):  # noqa: F811
    """``train --pretrained densenet121.tv_in1k --in-chans 1 --dataset csv`` at 224 px writes
    multi-label weights whose ``predict`` probabilities are timm's sigmoid on the same weights
    (in_chans=1), the image prepared by timm's transform from the recorded preprocessing."""
    hub.add("timm/densenet121.tv_in1k", tiny_timm[1])
    rng = np.random.default_rng(224)
    (tmp_path / "images").mkdir()
    lines = ["Path," + ",".join(SHAPES)]
    for i in range(3):
        present = rng.random(3) < 0.5
        Image.fromarray(draw_shapes(present, 224, rng)).save(tmp_path / f"images/{i}.png")
        lines.append(f"images/{i}.png," + ",".join(str(int(v)) for v in present))
    (tmp_path / "train.csv").write_text("\n".join(lines[:3]) + "\n")
    (tmp_path / "val.csv").write_text("\n".join(lines[:1] + lines[3:]) + "\n")
    run = tmp_path / "run"
    cli.main(["train", "--pretrained", "densenet121.tv_in1k", "--in-chans", "1", "--dataset", "csv",
              "--data-dir", str(tmp_path), "--train-csv", "train.csv", "--val-csv", "val.csv", "--epochs", "1",
              "--batch-size", "2", "--lr", "0.01", "--workdir", str(run), "--no-progress"])
    weights = run / "model.safetensors"
    arrays, config = read_safetensors(weights)
    cfg = stored_pretrained_cfg(weights)
    assert config.in_chans == 1 and config.num_classes == 3 and stored_class_names(weights) == list(SHAPES)
    assert cfg.input_size == (1, 224, 224) and cfg.mean == pytest.approx([np.mean((0.485, 0.456, 0.406))])
    capsys.readouterr()
    image = tmp_path / "images/2.png"
    cli.main(["predict", "--weights", str(weights), "--json", str(image)])
    probabilities = json.loads(capsys.readouterr().out)[0]["probabilities"]

    reference = timm.create_model("densenet121", pretrained=False, in_chans=1, **{**TINY, "num_classes": 3})
    missing, unexpected = reference.load_state_dict(
        {k: torch.from_numpy(v) for k, v in to_torchvision(arrays, config, "ours").items()}, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    reference.eval()
    transform = create_transform(**resolve_data_config(pretrained_cfg=dataclasses.asdict(cfg)))
    x = transform(Image.open(image).convert("L"))[None]
    with torch.no_grad():
        expected = torch.sigmoid(reference(x))[0].numpy()
    np.testing.assert_allclose([probabilities[k] for k in SHAPES], expected, atol=1e-5)
