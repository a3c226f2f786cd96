"""Running torchvision's random transforms on the draws ours made, so that the two can be compared
pixel for pixel: ``Recorder`` is the numpy Generator our transforms get, keeping every value it
hands out; ``replay`` puts those values in place of torch's random numbers inside
``torchvision.transforms``, checking that torchvision asks for each over the same range."""

from __future__ import annotations

import contextlib
import types

import numpy as np
import torch
import torchvision.transforms.transforms as TTT


class Recorder:
    """A numpy Generator (the methods our transforms call) that keeps ``(kind, low, high, value)``
    for every number it hands out, one entry per element of a sized draw."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.draws: list[tuple[str, float, float, float]] = []

    def uniform(self, low, high):
        value = self.rng.uniform(low, high)
        self.draws.append(("uniform", low, high, value))
        return value

    def integers(self, low, high, size=None):
        value = self.rng.integers(low, high, size=size)
        self.draws += [("integers", low, high, int(v)) for v in np.ravel(value)]
        return value

    def random(self):
        value = self.rng.random()
        self.draws.append(("random", 0.0, 1.0, value))
        return value


class _Replay:
    def __init__(self, draws):
        self.draws = list(draws)

    def take(self, kind, low, high):
        assert self.draws, f"torchvision drew a {kind} number over [{low}, {high}) that ours never drew"
        ours = self.draws.pop(0)
        assert ours[0] == kind and np.isclose(float(ours[1]), float(low), rtol=1e-6) and \
            np.isclose(float(ours[2]), float(high), rtol=1e-6), f"ours drew {ours}, torchvision asks {kind} {low} {high}"
        return ours[3]

    def empty(self, *shape):
        return types.SimpleNamespace(uniform_=lambda low, high: torch.tensor([self.take("uniform", low, high)],
                                                                          dtype=torch.float64))

    def randint(self, low, high, size):
        return torch.tensor([self.take("integers", low, high)])

    def rand(self, *shape):
        return torch.tensor([self.take("random", 0.0, 1.0)], dtype=torch.float64)


@contextlib.contextmanager
def replay(draws):
    """Inside, torchvision.transforms' random transforms draw ``draws`` (a Recorder's) in order; on
    leaving, every one of them must have been used."""
    fake = _Replay(draws)
    real = TTT.torch
    TTT.torch = types.SimpleNamespace(log=torch.log, tensor=torch.tensor, exp=torch.exp, empty=fake.empty,
                                      randint=fake.randint, rand=fake.rand)
    try:
        yield
    finally:
        TTT.torch = real
    assert not fake.draws, f"ours drew {fake.draws} that torchvision never asked for"
