"""Small argument checks shared by the library's entry points (one-line ValueErrors naming the argument)."""
import math
import numbers

import numpy as np


def is_int(value) -> bool:
    """True for Python and numpy integers, False for bools."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int) -> None:
    """Raises ValueError unless `value` is an integer >= minimum."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def is_number(value) -> bool:
    """True for finite real numbers (Python or numpy), False for bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
