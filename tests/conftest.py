import numpy as np
import pytest

# (shape, axis) covering axis=1 with 2-5 dims, channels-last and odd axes
LAYOUTS = [
    ((37, 5), 1),
    ((6, 4, 33), 1),
    ((3, 5, 7, 9), 1),
    ((2, 3, 4, 5, 6), 1),
    ((4, 6, 7, 5), -1),
    ((50, 3), -1),
    ((4, 3, 5, 6), 2),
    ((5, 4, 6), 0),
]
DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-11, atol=1e-11),
       np.float16: dict(rtol=2e-3, atol=4e-3)}


def layout_id(p):
    shape, axis = p
    return "x".join(map(str, shape)) + f"-ax{axis}"


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


# In CI the property tests draw a fixed (derandomized) set of examples, so a
# run is reproducible; locally they explore new ones each time.
try:
    import os

    from hypothesis import settings

    settings.register_profile("bncore-ci", derandomize=True, deadline=None, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("bncore-ci")
except ImportError:
    pass
