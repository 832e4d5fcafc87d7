"""Weight initialisation shared by the encoder, decoder and attention modules.

`init_scale` > 0: every weight matrix, vector and embedding ~ U(-init_scale, init_scale), the recipe
of Luong, Pham & Manning 2015 (0.1). It leaves the demo's unigram plateau several times sooner than
Glorot init on the bundled corpus (BUILD_NOTES.md, "Demo recipe").
`init_scale` = 0: Glorot uniform, orthogonal recurrent weights, normal(1/sqrt(d)) vectors.
Biases are not weights here: zero, with the LSTM forget-gate bias 1 (models.lstm_bias_init).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp


def uniform(scale: float) -> nn.initializers.Initializer:
    """U(-scale, scale)."""
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -scale, scale)


def matrix(init_scale: float) -> nn.initializers.Initializer:
    """Input, projection and embedding matrices."""
    return uniform(init_scale) if init_scale > 0 else nn.initializers.xavier_uniform()


def recurrent(init_scale: float) -> nn.initializers.Initializer:
    """Hidden-to-hidden LSTM matrices."""
    return uniform(init_scale) if init_scale > 0 else nn.initializers.orthogonal()


def vector(init_scale: float, size: int) -> nn.initializers.Initializer:
    """Weight vectors of `size` entries (the concat score's v)."""
    return uniform(init_scale) if init_scale > 0 else nn.initializers.normal(size ** -0.5)
