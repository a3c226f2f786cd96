"""Training: what a run is asked to do (config), pure steps (step), where they run (parallel),
optimizer and schedules (optim), checkpoints (checkpoint), the loop (loop), held-out evaluation
(evaluate) and what a run writes (report)."""

from densenet_jax.train.config import TrainConfig

__all__ = ["TrainConfig"]
