import numpy as np
import pytest


@pytest.fixture
def rng():
    """A seeded random generator; tests that need randomness take this."""
    return np.random.default_rng(20261121)


@pytest.fixture
def torch_one_thread():
    """Tiny networks run fastest (and steadiest on a busy machine) on one torch thread."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
