"""Train a paper CIFAR DenseNet with the paper's recipe (Huang et al., 2017, Section 4.2).

    python examples/cifar_recipe.py ~/data/cifar-10-batches-py                     # DenseNet-BC L=100 k=12
    python examples/cifar_recipe.py ~/data/cifar-100-python --dataset cifar100 --model densenet_40_k12

Recipe: SGD with Nesterov momentum 0.9, weight decay 1e-4, batch 64, 300 epochs, learning rate 0.1
divided by 10 at epochs 150 and 225; 4-pixel pad, random crop and flip. The paper reports 4.51%
C10+ error for DenseNet-BC L=100 k=12 and 5.24% for DenseNet L=40 k=12. --smoke trains two steps.
"""

import argparse

from densenet_jax.train import TrainConfig
from densenet_jax.train.loop import Run

RECIPE = dict(epochs=300, batch_size=64, lr=0.1, schedule="cifar", momentum=0.9, weight_decay=1e-4)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", help="cifar-10-batches-py or cifar-100-python")
    parser.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100"])
    parser.add_argument("--model", default="densenet_bc_100_k12")
    parser.add_argument("--workdir", default=None, help="default: runs/<model>-<dataset>")
    parser.add_argument("--memory-efficient", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="two steps, to check the set-up")
    args = parser.parse_args()

    config = TrainConfig(model=args.model, dataset=args.dataset, data_dir=args.data_dir,
                         workdir=args.workdir or f"runs/{args.model}-{args.dataset}",
                         memory_efficient=args.memory_efficient, **RECIPE)
    if args.smoke:
        config.epochs, config.max_steps = 1, 2
    result = Run(config).fit()
    print(f"{args.model} on {args.dataset}: step {result['step']}, "
          + (f"test error {1 - result['metrics'][-1]['eval_acc']:.2%}" if result["metrics"] else "no epoch finished"))


if __name__ == "__main__":
    main()
