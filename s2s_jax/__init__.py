"""s2s_jax: attention-based LSTM sequence-to-sequence learning in JAX/Flax."""

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
NEG_INF = -1e7  # mask value (attention scores, log-probs): large finite negative, never -inf

__version__ = "0.1.0"
