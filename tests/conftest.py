import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import densenet_jax as dj
from densenet_jax.weights.torch_keys import from_torchvision
from torch_twins import state_dict_numpy

# Tests that call the CLI in this process must not write compiled programs into the user's cache
# (the training subprocesses get a session cache of their own, see train_cli.py).
os.environ["DENSENET_JAX_CACHE"] = ""
os.environ["DENSENET_JAX_LISTINGS"] = ""  # no folder listings cached in the user's home
# The suite compiles far more than it runs. LLVM's cheapest code generation shortens XLA:CPU's
# compiles and leaves XLA's own passes (fusion, buffer assignment: what the memory
# tests read) as they are; it is no fast-math, so results agree with the default build's to
# rounding, and every bit-for-bit comparison here compiles both sides alike. Subprocesses inherit it.
os.environ["XLA_FLAGS"] = f"--xla_backend_optimization_level=0 {os.environ.get('XLA_FLAGS', '')}".strip()


def flax_twin(torch_model, **overrides) -> dj.DenseNet:
    """Our model holding ``torch_model``'s weights, converted through the library's own table
    (``overrides`` as from_torchvision's). Built abstractly, without first drawing random weights
    (one small program to compile per parameter shape); dropout streams get keys of their own."""
    arrays, config = from_torchvision(state_dict_numpy(torch_model), "torch model", **overrides)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: dj.DenseNet(config, rngs=nnx.Rngs(0))))
    flat = nnx.to_flat_state(state)
    for i, (path, variable) in enumerate(flat):
        if isinstance(variable, nnx.RngKey):
            variable.set_value(jax.random.fold_in(jax.random.key(0), i))
        elif isinstance(variable, nnx.RngCount):
            variable.set_value(jnp.zeros((), jnp.uint32))
        else:
            variable.set_value(jnp.asarray(arrays.pop(".".join(map(str, path)))))
    assert not arrays, sorted(arrays)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.fixture(autouse=True)
def library_logs_reach_caplog():
    """cli.main stops the library's logger propagating (it prints its own lines); undo that so
    that caplog sees the warnings of tests that run after a CLI test."""
    yield
    logging.getLogger("densenet_jax").propagate = True


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """The work directory of train_cli.RUN run to its end in one go (what it printed beside it,
    in ``<workdir>.out``)."""
    from train_cli import RUN, train
    workdir = tmp_path_factory.mktemp("uninterrupted")
    workdir.with_name(f"{workdir.name}.out").write_text(train(workdir, *RUN))
    return workdir


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A tiny DenseNet-BC (three blocks of two layers, k=6) for digits' 10 classes, as a weights
    file: in-process training runs start from it (``init_from``) to stay cheap."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    dj.save(dj.create_model("densenet_bc_100_k12", block_config=(2, 2, 2), growth_rate=6,
                            num_classes=10, rngs=nnx.Rngs(0)), path)
    return path


@pytest.fixture(scope="session")
def tiny_run(tiny_weights):
    """``make(workdir, **overrides)``: the TrainConfig of a cheap in-process run from
    ``tiny_weights`` on digits, batch 64 (22 steps an epoch, metrics read every 10), one epoch, a
    constant learning rate (so that --epochs changes leave the compiled step as it is)."""
    from densenet_jax.train import TrainConfig

    def make(workdir, **overrides):
        options = dict(init_from=str(tiny_weights), epochs=1, batch_size=64, schedule="constant",
                       seed=3, progress=False, workdir=str(workdir))
        return TrainConfig(**{**options, **overrides})
    return make


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """The tests of one worker share a compilation cache of their own: the same program (the tiny
    model's step, a converted model's forward pass) compiles once, however many tests build it."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc
    CACHE = str(tmp_path_factory.mktemp("compilation-cache"))
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    cc.reset_cache()  # JAX decides once per process whether the cache is on
    yield
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    cc.reset_cache()


def pytest_collection_modifyitems(items):
    """pytest-xdist's loadgroup sends each group to one worker. A file is a group (its module
    fixtures are built once), and the files that use the session fixture ``uninterrupted`` (a
    training run in a subprocess) form one group, so that one worker trains it, once."""
    sharing = {item.path for item in items if "uninterrupted" in item.fixturenames}
    for item in items:
        item.add_marker(pytest.mark.xdist_group("uninterrupted" if item.path in sharing else item.path.name))
