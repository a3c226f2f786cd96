"""Fine-tune converted weights on your own folder of images, with a new classifier head.

    python examples/fine_tune.py densenet121.safetensors ~/data/flowers --epochs 10

The folder holds train/<class>/*.jpg and val/<class>/*.jpg. The head is replaced to fit the
number of classes; --head-only freezes the backbone (a linear probe). The run leaves its
checkpoints, metrics.jsonl, curves.png and best.safetensors in --workdir, and resumes if rerun.
"""

import argparse

from densenet_jax.train import TrainConfig
from densenet_jax.train.loop import Run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", help="the starting weights (.safetensors)")
    parser.add_argument("data_dir", help="a folder with train/ and val/")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01, help="lower than from scratch: the weights are trained")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--head-only", action="store_true")
    parser.add_argument("--workdir", default="runs/fine-tune")
    args = parser.parse_args()

    run = Run(TrainConfig(init_from=args.weights, dataset="folder", data_dir=args.data_dir,
                          epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          schedule="cosine", warmup_epochs=min(1.0, args.epochs / 10),
                          image_size=args.image_size, head_only=args.head_only, workdir=args.workdir))
    rows = run.fit()["metrics"]
    best = max(rows, key=lambda r: r["eval_acc"])
    print(f"{len(run.data.class_names)} classes ({', '.join(run.data.class_names[:5])}): "
          f"held-out accuracy {rows[-1]['eval_acc']:.3f}, best {best['eval_acc']:.3f} at epoch "
          f"{best['epoch']}; weights in {args.workdir}/best.safetensors")


if __name__ == "__main__":
    main()
