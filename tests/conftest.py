import logging
import os

import numpy as np
import pytest
from flax import nnx

import densenet_jax as dj
from densenet_jax.interop import from_torchvision
from densenet_jax.weights import assign
from torch_twins import state_dict_numpy

# Tests that call the CLI in this process must not write compiled programs into the user's cache
# (the training subprocesses get a session cache of their own, see train_cli.py).
os.environ["DENSENET_JAX_CACHE"] = ""


def flax_twin(torch_model, **overrides) -> dj.DenseNet:
    """Our model holding ``torch_model``'s weights, converted through the library's own table."""
    arrays, config = from_torchvision(state_dict_numpy(torch_model), "torch model", **overrides)
    model = dj.DenseNet(config, rngs=nnx.Rngs(0))
    assign(model, arrays)
    return model


@pytest.fixture(autouse=True)
def library_logs_reach_caplog():
    """cli.main stops the library's logger propagating (it prints its own lines); undo that so
    that caplog sees the warnings of tests that run after a CLI test."""
    yield
    logging.getLogger("densenet_jax").propagate = True


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """The work directory of train_cli.RUN run to its end in one go."""
    from train_cli import RUN, train
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train(workdir, *RUN)
    return workdir


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def grain_workers():
    """Grain 0.2.18 reads an absl flag when it starts worker processes, which absl refuses before the
    flags are parsed (google/grain#1355); the library marks them parsed once issue 13's data branch is
    in, and this fixture goes (tests using --workers in this process take it until then)."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
