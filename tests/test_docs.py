"""Every public name of the library has a docstring, and the reliability guarantees name real tests."""

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import densenet_jax

ROOT = Path(__file__).resolve().parent.parent


def public_names():
    for info in pkgutil.walk_packages(densenet_jax.__path__, "densenet_jax."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        yield info.name, module
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != info.name:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                yield f"{info.name}.{name}", obj
            if inspect.isclass(obj):
                for method, value in vars(obj).items():
                    if not method.startswith("_") and inspect.isfunction(value):
                        yield f"{info.name}.{name}.{method}", value


def test_every_public_name_has_a_docstring():
    missing = [name for name, obj in public_names() if not (obj.__doc__ or "").strip()]
    assert not missing, missing


def test_reliability_doc_names_tests_that_exist():
    text = (ROOT / "docs" / "reliability.md").read_text()
    cited = set(re.findall(r"(test_\w+\.py)::(\w+)", text))
    assert len(cited) >= 15
    for filename, test in cited:
        source = (ROOT / "tests" / filename).read_text()
        assert f"def {test}(" in source, (filename, test)
