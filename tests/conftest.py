import numpy as np
import pytest


@pytest.fixture
def rng():
    """A seeded random generator; tests that need randomness take this."""
    return np.random.default_rng(20261121)
