"""``densenet-jax models``: the architectures with their parameters and pretrained tags."""

from __future__ import annotations

import argparse

from densenet_jax.model.config import count_params
from densenet_jax.model.registry import TAGS, get_config, list_models, split_name

HELP = "the model names, their parameters and pretrained tags"


def add_options(p: argparse.ArgumentParser) -> None:
    """``densenet-jax models``'s arguments and options, added to ``p``."""
    p.add_argument("--pretrained", action="store_true",
                   help="the pretrained tags: source, preprocessing, published top-1")


def run(args: argparse.Namespace) -> None:
    """Print every architecture with its parameters and pretrained tags; with ``--pretrained`` every
    tag with its source, preprocessing and published top-1."""
    if not args.pretrained:
        for name in list_models():
            tags = [split_name(t)[1] for t in TAGS if split_name(t)[0] == name]
            print(f"{name:22s} {count_params(get_config(name)):>12,d}  {', '.join(tags)}")
        print("and any densenet_<L>_k<k> or densenet_bc_<L>_k<k>: the paper's CIFAR family at depth L, "
              "growth rate k")
        return
    for tag, cfg in TAGS.items():
        size = f"{cfg.input_size[1]}/{cfg.crop_pct}" + (
            f" (test {cfg.test_input_size[1]}/{cfg.test_crop_pct})" if cfg.test_input_size else "")
        top1 = "; ".join(f"{t.value:.3f} ({t.protocol})" for t in cfg.top1)
        print(f"{tag:26s} hf-hub:{cfg.hf_hub_id}  {cfg.interpolation} {size}  top-1 {top1}")
