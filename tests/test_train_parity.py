"""Two steps in train mode against torch, in float64 on both sides (porting-notes 9b): the loss,
every gradient, the updated parameters and the updated running statistics must agree."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
import torchvision
from flax import nnx

from conftest import flax_twin
from densenet_jax.weights.torch_keys import weight_table
from densenet_jax.weights.format import cast
from torch_twins import cifar_bc_model, nchw, randomize

TOLERANCE = 1e-9  # per-leaf relative L2
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4


def relative_l2(ours, reference):
    return np.linalg.norm(ours - reference) / max(np.linalg.norm(reference), 1e-300)


def torch_steps(model, x, y, steps, optimizer=None):
    """``steps`` steps of ``optimizer(model)`` (torch's SGD by default) on the batch (x, y)."""
    model.double().train()
    opt = optimizer(model) if optimizer else torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM,
                                                             weight_decay=WEIGHT_DECAY)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(nchw(x)), torch.from_numpy(y))
        loss.backward()
        grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters()}
        opt.step()
        history.append((loss.item(), grads))
    return history, {k: v.numpy() for k, v in model.state_dict().items()}


def jax_steps(model, x, y, steps, tx=None):
    """``steps`` steps of ``tx`` (optax's SGD as torch's by default) on the batch (x, y)."""
    model.train()
    tx = tx or optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss, grads

    history = []
    for _ in range(steps):
        loss, grads = step(model, optimizer, x, y)
        history.append((float(loss), grads))
    return history


def flat(state) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_two_rmsproptf_steps_match_torch_and_timm_in_float64(rng):
    """README, How it compares: "train-mode parity with torch (float64, 1e-9)": the loss, every
    gradient, the parameters and running statistics after two steps, per-leaf relative L2, for a
    torchvision DenseNet with the ImageNet stem (7x7 convolution, max pool) and four blocks of
    unequal depth, densenet121's parts (the paper's CIFAR stem: test_trainer_matches_torch_sgd_in_float64;
    its depth adds nothing but minutes of compiling), stepped by create_optimizer's rmsproptf and by
    timm's create_optimizer_v2 with the timm-ra recipe's values: epsilon inside the square root, the
    square average starting at one, no weight decay on norms and biases (test_optimizers.py has
    every optimizer, on given gradients)."""
    from timm.optim import create_optimizer_v2
    from densenet_jax.train import create_optimizer

    torch.manual_seed(7)
    torch_model = randomize(torchvision.models.DenseNet(12, (2, 3, 4, 3), 24, num_classes=10), 7)
    case, size, classes = "ImageNet-stem DenseNet-BC, blocks (2, 3, 4, 3)", 64, 10
    x = rng.standard_normal((4, size, size, 3))
    y = rng.integers(0, classes, 4)
    options = dict(lr=0.016, weight_decay=1e-5, eps=1e-3)
    with jax.enable_x64(True):
        model = flax_twin(torch_model)
        cast(model, jnp.float64)
        start = flat(nnx.state(model, nnx.Param))
        ours = jax_steps(model, x, y, steps=2, tx=create_optimizer(model, "rmsproptf", **options))
        final = flat(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
    reference, reference_final = torch_steps(torch_model, x, y, steps=2,
                                             optimizer=lambda m: create_optimizer_v2(m, "rmsproptf", **options))

    table = weight_table(model.config)
    worst = {"loss": 0.0, "grad": 0.0, "state": 0.0}
    for (loss, grads), (ref_loss, ref_grads) in zip(ours, reference):
        worst["loss"] = max(worst["loss"], abs(loss - ref_loss) / abs(ref_loss))
        grads = flat(grads)
        for e in table:
            if e.torch_key in ref_grads:
                worst["grad"] = max(worst["grad"], relative_l2(grads[e.flax_key], e.to_flax(ref_grads[e.torch_key])))
    assert len(grads) == len(ref_grads)
    for e in table:  # the parameters' change, and the running mean/var, after both steps
        ours_now, theirs = final[e.flax_key], e.to_flax(reference_final[e.torch_key])
        if e.flax_key in start:
            ours_now, theirs = ours_now - start[e.flax_key], theirs - start[e.flax_key]
            assert np.linalg.norm(theirs) > 0, e.flax_key  # every parameter moved
        worst["state"] = max(worst["state"], relative_l2(ours_now, theirs))
    print(f"{case}: worst relative error {worst}")
    assert max(worst.values()) <= TOLERANCE, worst


# --- The trainer's own step -------------------------------------------------------------------------
# Run, built from `densenet-jax train` options as the command builds it, trains a small torchvision
# DenseNet-BC (2 layers per block, k=6) on the digits in float64; torch.optim.SGD (Nesterov, weight
# decay) under torch's own lr schedulers takes the same batches. 448 of the 1,437 training digits make
# a batch: 3 steps per epoch, 6 in two epochs.
TRAINER_CASES = {
    # Through both of the cifar schedule's lr/10 steps (50% and 75% of 6 steps: at steps 3 and 4), with
    # momentum and weight decay away from their defaults so that each must reach the optimizer.
    # --keep 1: only the last checkpoint stays.
    "full": ["--schedule", "cifar", "--lr", "0.2", "--momentum", "0.8", "--weight-decay", "1e-3",
             "--keep", "1"],
    # One epoch (3 steps) of linear warm-up from 0, then cosine decay over the other 3; the backbone
    # frozen in eval mode, so its BN statistics must not move either.
    # Batches read by a worker process must be the same; a checkpoint every 2 steps besides each
    # epoch's end.
    "head_only": ["--head-only", "--schedule", "cosine", "--warmup-epochs", "1", "--lr", "0.3",
                  "--workers", "1", "--checkpoint-every", "2", "--keep", "5"],
}
STEPS, BATCH = 6, 448


def torch_schedule(case, optimizer):
    sched = torch.optim.lr_scheduler
    if case == "full":
        return sched.MultiStepLR(optimizer, milestones=[3, 4], gamma=0.1)
    # LinearLR cannot start at 0; 1e-300 of the lr is 0 for every practical purpose.
    return sched.SequentialLR(optimizer, [sched.LinearLR(optimizer, start_factor=1e-300, total_iters=3),
                                          sched.CosineAnnealingLR(optimizer, T_max=3)], milestones=[3])


def torch_trainer(model, config, case, batches):
    """torch's SGD on ``batches``: per-step losses, and the final state dict and momentum buffers."""
    model.double().train()
    trained = model.parameters()
    if config.head_only:
        model.features.eval()
        trained = model.classifier.parameters()
    optimizer = torch.optim.SGD(trained, lr=config.lr, momentum=config.momentum, nesterov=True,
                                weight_decay=config.weight_decay)
    schedule = torch_schedule(case, optimizer)
    losses = []
    for images, labels in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(nchw(images.astype(np.float64))), torch.from_numpy(labels).long())
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    names = {p: k for k, p in model.named_parameters()}
    momentum = {names[p]: s["momentum_buffer"].numpy() for p, s in optimizer.state.items()}
    return losses, {k: v.numpy() for k, v in model.state_dict().items()}, momentum


def dotted(tree) -> dict[str, np.ndarray]:
    """A nested dict of arrays as {"features.conv0.kernel": array}."""
    return {".".join(str(k.key) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def momentum_buffers(opt_state) -> dict[str, np.ndarray]:
    """optax's momentum (the ``trace`` of its SGD) per parameter key, wherever the chain keeps it."""
    found = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        names = [getattr(k, "name", None) for k in path]
        if "trace" in names:
            found[".".join(str(k.key) for k in path[names.index("trace") + 1:])] = np.asarray(leaf)
    return found


@pytest.mark.parametrize("case", TRAINER_CASES)
def test_trainer_matches_torch_sgd_in_float64(case, tmp_path, capsys):
    """README, Training: "SGD with Nesterov momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at
    50% and 75%", `cosine` with `--warmup-epochs`, `--head-only` freezing the backbone and its BN
    statistics: the trainer's parameters, momentum buffers and BN statistics against torch's, 1e-9."""
    from densenet_jax import cli
    from densenet_jax.cli.train import train_config
    from densenet_jax.data import train_batches
    from densenet_jax.weights.torch_keys import from_torchvision
    from densenet_jax.train.loop import Run
    from densenet_jax.weights.format import read_safetensors, write_safetensors
    from torch_twins import state_dict_numpy

    torch_model = cifar_bc_model(16, 6, seed=5)
    weights = tmp_path / "start.safetensors"
    write_safetensors(*from_torchvision(state_dict_numpy(torch_model), "torch"), weights)
    args = cli.parser().parse_args(["train", "--init-from", str(weights), "--precision", "fp64",
                                    "--epochs", "2", "--batch-size", str(BATCH), "--no-progress",
                                    "--workdir", str(tmp_path / "run"), *TRAINER_CASES[case]])
    config = train_config(args)
    with jax.enable_x64(True):
        run = Run(config)
        assert run.total_steps == STEPS
        result = run.fit()
        state = run.runner.host_state(result["state"])
    assert "it/s" not in capsys.readouterr().err  # --no-progress: no bar (tqdm's rate), epoch lines only
    kept = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == ([6] if case == "full" else [2, 3, 4, 6])
    batches = [(b["image"], b["label"]) for epoch in range(2)
               for b in train_batches(run.data.train, run.data.augment, seed=config.seed, epoch=epoch,
                                      global_batch=BATCH)]
    assert len(batches) == STEPS
    losses, reference, reference_momentum = torch_trainer(torch_model, config, case, batches)

    ours = {**dotted(state.params), **dotted(state.batch_stats)}
    table = weight_table(run.model.config)
    assert ours.keys() == {e.flax_key for e in table}
    errors = {e.flax_key: relative_l2(ours[e.flax_key], e.to_flax(reference[e.torch_key])) for e in table}
    momentum = momentum_buffers(state.opt_state)
    by_torch_key = {e.torch_key: e for e in table}
    assert momentum.keys() == {by_torch_key[k].flax_key for k in reference_momentum}
    for key, buffer in reference_momentum.items():
        e = by_torch_key[key]
        errors[f"momentum {e.flax_key}"] = relative_l2(momentum[e.flax_key], e.to_flax(buffer))
    for epoch, row in enumerate(result["metrics"]):  # the loop's mean training loss per epoch
        expected = np.mean(losses[3 * epoch:3 * epoch + 3])
        errors[f"loss epoch {epoch + 1}"] = abs(row["train_loss"] - expected) / expected
    worst = max(errors, key=errors.get)
    print(f"{case}: worst relative error {errors[worst]:.2e} ({worst})")
    assert errors[worst] <= TOLERANCE, (worst, errors[worst])
    # The comparison is not of two unchanged models: what trains moved well beyond the tolerance,
    # and under --head-only the backbone did not move at all.
    start = read_safetensors(weights)[0]
    assert relative_l2(ours["classifier.kernel"], start["classifier.kernel"]) > 1e-3
    conv0 = "features.conv0.kernel"
    if config.head_only:
        np.testing.assert_array_equal(ours[conv0], start[conv0])
    else:
        assert relative_l2(ours[conv0], start[conv0]) > 1e-3
