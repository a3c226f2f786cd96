"""README, Layout: "densenet_jax/ the library (never imports torch)"."""

import subprocess
import sys

# Every module of the package imported (the command's entry module aside: importing it runs it),
# and the command's parser built, in a fresh process; then the torch family must be absent.
CODE = """
import importlib, pkgutil, sys
import densenet_jax
for module in pkgutil.walk_packages(densenet_jax.__path__, "densenet_jax."):
    if module.name != "densenet_jax.__main__":
        importlib.import_module(module.name)
from densenet_jax import cli
cli.parser()
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "timm")))
"""


def test_the_library_never_imports_torch():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out[-2000:]


BARE = """
import sys
import densenet_jax as dj
print(sorted({m.split(".")[0] for m in sys.modules} & {"PIL", "grain", "sklearn", "matplotlib", "tqdm", "torch"}))
import densenet_jax.inference
print(dj.predict is densenet_jax.inference.predict)
"""


def test_import_needs_no_extra_and_predict_is_the_function():
    """``import densenet_jax`` works with the base install (no [train] extra loaded), and
    ``dj.predict`` is the function, also once its module has been imported."""
    out = subprocess.run([sys.executable, "-c", BARE], capture_output=True, text=True, timeout=300,
                         check=True).stdout.splitlines()
    assert out[-2:] == ["[]", "True"], out
