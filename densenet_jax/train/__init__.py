"""Training, in the order a run meets it:

config       TrainConfig: what a run is asked to do, checked when built
checks       what only the machine, the data or a file can tell, checked before anything compiles
loop         Run: set up, restore, train epoch by epoch, evaluate, checkpoint, finish
step         the pure train and eval steps
parallel     where they run: jit over a device mesh, or per device with shard_map (``--parallel pmap``)
optim        the learning rate passed to each step, head-only training
optimizers   timm's optimizers (create_optimizer), gradient clipping and accumulation
meter        an epoch's running sums and images per second
evaluate     held-out loss and accuracy: each epoch's, and a weights file's (``densenet-jax evaluate``)
checkpoint   Orbax checkpoints, checked on restore
workdir      what a work directory belongs to (run.json)
trace_cache  traced steps kept on disk for reruns
signals      SIGINT and SIGTERM as a checkpointed stop
messages     what a run says
report       metrics.jsonl, curves.png
"""

from densenet_jax.train.config import TrainConfig
from densenet_jax.train.optimizers import create_optimizer

__all__ = ["TrainConfig", "create_optimizer"]
