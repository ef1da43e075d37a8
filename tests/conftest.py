"""Shared fixtures. Shared constants (the tolerance table) and the float64
oracle live in tests/reference.py, which tests import."""
import os

import numpy as np
import pytest


@pytest.fixture
def rng():
    """The one random generator of the suite, seeded for reproducible data."""
    return np.random.default_rng(12345)


# In CI the property tests draw a fixed (derandomized) set of examples, so a
# run is reproducible; locally they explore new ones each time.
try:
    from hypothesis import settings
except ImportError:
    pass
else:
    settings.register_profile("bncore-ci", derandomize=True, deadline=None, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("bncore-ci")
