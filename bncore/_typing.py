"""Type aliases of the public API's annotations (static typing only)."""
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["Activation", "Array", "ArrayLike", "Float64Array", "FloatArray", "NDArray"]

#: An ndarray of any dtype (outputs keep the input's dtype).
Array = NDArray[Any]
#: A floating-point ndarray (statistics, parameters, gradients).
FloatArray = NDArray[np.floating[Any]]
#: A float64 ndarray (statistics that are always float64).
Float64Array = NDArray[np.float64]
#: A fused activation: None, "relu", "leaky_relu" or ("leaky_relu", slope).
Activation = str | tuple[str, float] | None
