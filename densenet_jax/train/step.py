"""Pure train and eval steps over the NNX model's split state (no graph walking per step)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from densenet_jax.model.densenet import DenseNet
from densenet_jax.train.ema import ema_decay, ema_update
from densenet_jax.train.optimizers import set_learning_rate
from densenet_jax.train.losses import LossConfig, per_example_correct, per_example_loss


@struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState
    ema: dict | None = None  # {"params", "batch_stats"}: their moving average (--model-ema)

    def averaged(self) -> "TrainState":
        """This state with the moving average's weights and statistics in place of the model's."""
        return self.replace(params=self.ema["params"], batch_stats=self.ema["batch_stats"])


class Steps:
    """The model's train and eval steps as pure functions of (TrainState, rest, batch).

    ``tx`` (from :func:`densenet_jax.train.optimizers.create_optimizer`) holds its learning rate in
    its state; the train step sets it there from its ``lr`` argument, a scalar of dtype ``lr_dtype``
    (the parameters'), so that no learning rate is compiled into the step. With
    ``accum_steps`` > 1 the optimizer updates every that many steps (``tx`` accumulates);
    ``ema=(decay, warmup)`` keeps timm's ModelEmaV3 average, moved after each update.

    ``rest`` is what the model holds besides parameters and statistics (dropout's RNG state); it
    never changes, because dropout is reseeded from (seed, step) in every step, which keeps a resumed
    run identical to an uninterrupted one. With ``axis_name`` the steps run per device under
    shard_map: BatchNorm statistics and gradients are averaged across that axis.
    ``freeze_features`` runs the backbone in eval mode while training (its BatchNorm statistics stay
    as loaded), for head-only fine-tuning. ``loss``: what the labels are and how they are scored
    in training (:mod:`densenet_jax.train.losses`); held-out data gets ``loss.for_eval()``.
    """

    def __init__(self, model: DenseNet, tx: optax.GradientTransformation, *,
                 compute_dtype=jnp.float32, seed: int = 0, axis_name: str | None = None,
                 freeze_features: bool = False, accum_steps: int = 1, ema: tuple[float, bool] | None = None,
                 loss: LossConfig = LossConfig()):
        self.tx = tx
        self.accum_steps = accum_steps
        self.ema = ema
        self.loss = loss
        self.compute_dtype = compute_dtype
        self.loss_dtype = jnp.promote_types(compute_dtype, jnp.float32)  # bf16 compute, fp32 loss
        self.axis_name = axis_name
        dropout = model.config.drop_rate > 0 or model.config.head_drop_rate > 0
        self.dropout_key = jax.random.key(seed) if dropout else None
        model.set_attributes(axis_name=axis_name, raise_if_not_found=False)
        model.eval()
        self.eval_def = nnx.graphdef(model)
        model.train()
        if freeze_features:
            model.features.eval()
        # Plain arrays, not Variables: each jitted call flattens the state, and Variables make that
        # a Python call per leaf.
        self.train_def, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
        params, batch_stats, self.rest = nnx.as_pure((params, batch_stats, rest))
        # Copies: the average's arrays must not be the parameters' buffers, which a step donates.
        average = jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats}) if ema else None
        self.initial = TrainState(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params), average)
        self.lr_dtype = jax.tree.leaves(params)[0].dtype

    def train(self, state: TrainState, rest: nnx.State, images: jax.Array, labels: jax.Array,
              lr: jax.Array):
        """One SGD step at learning rate ``lr``: (new state, {loss, correct, grad_norm}) for the batch.
        ``labels``: int (n,), or float (n, classes) soft targets (mixup's); correct counts the
        largest target class then."""
        def loss_fn(params):
            model = nnx.merge(self.train_def, params, state.batch_stats, rest, copy=True)
            if self.dropout_key is not None:
                key = jax.random.fold_in(self.dropout_key, state.step)
                if self.axis_name is not None:
                    key = jax.random.fold_in(key, jax.lax.axis_index(self.axis_name))
                # A model built with nnx.Rngs(seed) keeps its dropout keys in the "default" stream,
                # one built with a "dropout" stream there: both, or every step draws the same masks.
                nnx.reseed(model, default=key, dropout=key)
            logits = model(images.astype(self.compute_dtype)).astype(self.loss_dtype)
            loss = per_example_loss(logits, labels, self.loss).mean()
            return loss, (logits, nnx.as_pure(nnx.state(model, nnx.BatchStat)))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        correct = jnp.sum(per_example_correct(logits, labels, self.loss))
        if self.axis_name is not None:
            grads, loss = jax.lax.pmean((grads, loss), self.axis_name)
            correct = jax.lax.psum(correct, self.axis_name)
        updates, opt_state = self.tx.update(grads, set_learning_rate(state.opt_state, lr), state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(state.step + 1, params, batch_stats, opt_state,
                               self._average(state, params, batch_stats))
        # The gradient norm too: a NaN input can leave the loss finite (a ReLU after the NaN batch
        # statistics may give 0) while the gradients of the BatchNorm weights are NaN.
        return new_state, {"loss": loss, "correct": correct, "grad_norm": optax.tree.norm(grads)}

    def _average(self, state: TrainState, params, batch_stats):
        """The moving average after this step: moved when the optimizer updated (every
        ``accum_steps`` steps), by the decay for the update count."""
        if self.ema is None:
            return None
        updates = (state.step + 1) // self.accum_steps
        moved = ema_update(state.ema, {"params": params, "batch_stats": batch_stats},
                           ema_decay(updates, *self.ema))
        if self.accum_steps == 1:
            return moved
        updated = (state.step + 1) % self.accum_steps == 0
        return jax.tree.map(lambda m, old: jnp.where(updated, m, old), moved, state.ema)

    def train_result_structure(self, state: TrainState, *_) -> jax.tree_util.PyTreeDef:
        """The pytree structure of what :meth:`train` returns, known without tracing it."""
        return jax.tree.structure((state, dict.fromkeys(("loss", "correct", "grad_norm"), 0)))

    def eval(self, state: TrainState, rest: nnx.State, images: jax.Array, labels: jax.Array,
             weights: jax.Array):
        """Sums over the batch of loss, correct predictions and weight (0 marks padding)."""
        model = nnx.merge(self.eval_def, state.params, state.batch_stats, rest)
        logits = model(images.astype(self.compute_dtype)).astype(self.loss_dtype)
        held_out = self.loss.for_eval()
        sums = {"loss": jnp.sum(per_example_loss(logits, labels, held_out) * weights),
                "correct": jnp.sum(per_example_correct(logits, labels, held_out) * weights),
                "count": jnp.sum(weights)}
        if self.axis_name is not None:
            sums = jax.lax.psum(sums, self.axis_name)
        return sums

    def scores(self, state: TrainState, rest: nnx.State, images: jax.Array, labels: jax.Array,
               weights: jax.Array) -> dict[str, jax.Array]:
        """The batch's eval logits (N, C) in at least float32, with its labels and weights: what
        ranking metrics (AUROC) need, which are no sums over batches."""
        model = nnx.merge(self.eval_def, state.params, state.batch_stats, rest)
        logits = model(images.astype(self.compute_dtype)).astype(self.loss_dtype)
        return {"logits": logits, "label": labels, "weight": weights}

    def model(self, state: TrainState) -> DenseNet:
        """The model holding ``state``'s weights, in eval mode."""
        return nnx.merge(self.eval_def, state.params, state.batch_stats, self.rest, copy=True)
