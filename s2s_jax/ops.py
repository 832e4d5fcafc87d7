"""Numeric pieces shared by the model (`models`) and the fused output layer (`output_layer`):
the matmul in a compute dtype and the token ids that are never targets."""
from typing import Any

import jax
import jax.numpy as jnp

from s2s_jax import BOS_ID, PAD_ID

# Ids that are never a target token: label smoothing puts no mass on them.
NEVER_TARGETS = (PAD_ID, BOS_ID)


def matmul(x: jax.Array, w: jax.Array, dtype: Any) -> jax.Array:
    """x @ w computed in `dtype` (e.g. bfloat16 on accelerators), result in float32 (float64 if
    `dtype` is float64)."""
    return jnp.matmul(x.astype(dtype), w.astype(dtype),
                      preferred_element_type=jnp.promote_types(dtype, jnp.float32))
