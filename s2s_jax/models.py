"""LSTM encoder, attentional LSTM decoder and the Seq2Seq model (flax linen).

Modules declare parameters; the recurrences are pure functions run by `jax.lax.scan` over
arrays read once outside the loop. Speed by design (docs/architecture.md, "Modules"):
  * input projections of all time steps are one matmul; the scan carries only the recurrence;
  * the encoder's scan has its own backward pass (`recurrence.lstm_scan`): dW_h is one matmul;
  * padding never changes a carry (the carry is frozen past each sequence's length);
  * attention keys are projected once per batch (`Memory.keys`);
  * teacher forcing: states in the scan, one [B*T, H] x [H, V] output projection after it.
Tied and shared embeddings: one parameter, `decoder/embedding` [V, E], is also the output
projection (transposed, `tie_embeddings`) and the encoder's table (`share_embeddings`); the
matrices it stands for are not declared.

Public entry points (all through `model.apply(params, ..., method=...)`):
  `Seq2Seq.__call__`   teacher-forced / scheduled-sampling forward -> dict(logits, fed_tokens, attention)
                        (or the output projection's inputs instead of logits: `return_vectors`)
  `Seq2Seq.encode`     source -> (Memory, initial decoder state with leaves [B, ...])
  `Seq2Seq.decode_step` one token per hypothesis -> (log_probs [B, K, V], new state), the
                        `step_fn` contract of `s2s_jax.decoding`.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from s2s_jax import attention as attn
from s2s_jax import initializers, ops, output_layer, recurrence
from s2s_jax.ops import matmul
from s2s_jax.recurrence import lstm_cell

State = dict[str, jax.Array]  # decoder state: h, c [B, K, L, H]; feed [B, K, H] (+ attention, coverage [B, K, S])

def lstm_bias_init(key, shape, dtype=jnp.float32):
    """Zero bias with forget-gate bias 1 (gate order i, f, g, o)."""
    hidden = shape[0] // 4
    return jnp.zeros(shape, dtype).at[hidden:2 * hidden].set(1.0)


def reverse_padded(x: jax.Array, lengths: jax.Array) -> jax.Array:
    """Reverses each row of x [B, S, ...] within its length; padding stays at the end."""
    positions = jnp.arange(x.shape[1])[None, :]                          # [1, S]
    source = jnp.where(positions < lengths[:, None], lengths[:, None] - 1 - positions, positions)
    source = source.reshape(source.shape + (1,) * (x.ndim - 2))          # [B, S, 1...]
    return jnp.take_along_axis(x, source, axis=1)


def dropout(x: jax.Array, rate: float, train: bool) -> jax.Array:
    """Dropout from the module's 'dropout' rng stream (call inside a compact method)."""
    return nn.Dropout(rate, deterministic=not train)(x) if rate > 0 else x


class LSTMLayer(nn.Module):
    """One unidirectional LSTM over [B, S, D] with per-row lengths.

    `reverse` reads each row from its last real token back to the first: the scan runs from S-1
    down to 0 and the carry stays at its initial zeros over the trailing padding, so no gather is
    needed to reverse the rows.
    """
    hidden: int
    dtype: Any = jnp.float32
    reverse: bool = False
    init_scale: float = 0.1  # s2s_jax.initializers

    @nn.compact
    def __call__(self, inputs: jax.Array, lengths: jax.Array):
        """Returns outputs [B, S, H] (zero at padding) and the final (h, c) [B, H] at each length."""
        w_i = self.param("w_i", initializers.matrix(self.init_scale), (inputs.shape[-1], 4 * self.hidden))
        w_h = self.param("w_h", initializers.recurrent(self.init_scale), (self.hidden, 4 * self.hidden))
        bias = self.param("bias", lstm_bias_init, (4 * self.hidden,))
        gates_in = matmul(inputs.swapaxes(0, 1), w_i, self.dtype) + bias  # [S, B, 4H] in one matmul
        valid = attn.source_mask(lengths, inputs.shape[1]).swapaxes(0, 1)  # [S, B]
        outputs, final = recurrence.lstm_scan(gates_in, valid, w_h, self.reverse, self.dtype)
        return outputs.swapaxes(0, 1), final                          # [B, S, H]


class Encoder(nn.Module):
    """Embeddings, optional source reversal, `num_layers` (bi)directional LSTM layers."""
    vocab_size: int
    embed_dim: int
    hidden: int          # per direction
    num_layers: int = 1
    bidirectional: bool = True
    reverse_source: bool = False
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    init_scale: float = 0.1  # s2s_jax.initializers

    @property
    def output_dim(self) -> int:
        return self.hidden * (2 if self.bidirectional else 1)

    @nn.compact
    def __call__(self, src: jax.Array, src_len: jax.Array, train: bool = False, embedding: jax.Array | None = None):
        """src [B, S] -> memory [B, S, output_dim], final hidden [B, output_dim] of the last layer.

        With `reverse_source` the LSTMs read each sentence backwards, and the outputs are put back
        in source order, so attention weights always line up with the source tokens. `embedding`
        [V, embed_dim]: a table owned elsewhere (the decoder's, shared); None: the encoder's own.
        """
        if embedding is None:
            embedding = nn.Embed(self.vocab_size, self.embed_dim,
                                 embedding_init=initializers.matrix(self.init_scale)).embedding
        x = jnp.take(embedding, src, axis=0)                            # [B, S, embed_dim]
        x = dropout(x, self.dropout_rate, train)
        if self.reverse_source:
            x = reverse_padded(x, src_len)
        for layer in range(self.num_layers):
            forward, (h_fw, _) = LSTMLayer(self.hidden, self.dtype, init_scale=self.init_scale, name=f"layer{layer}_fw")(x, src_len)
            outputs, finals = [forward], [h_fw]
            if self.bidirectional:
                backward, (h_bw, _) = LSTMLayer(self.hidden, self.dtype, reverse=True, init_scale=self.init_scale,
                                                name=f"layer{layer}_bw")(x, src_len)
                outputs.append(backward)
                finals.append(h_bw)
            x = jnp.concatenate(outputs, axis=-1)                     # [B, S, output_dim]
            if layer + 1 < self.num_layers:
                x = dropout(x, self.dropout_rate, train)
        if self.reverse_source:
            x = reverse_padded(x, src_len)
        return x, jnp.concatenate(finals, axis=-1)


class Decoder(nn.Module):
    """Attentional LSTM decoder (Luong): input feeding, tanh(W_c [context; h]) -> vocabulary."""
    vocab_size: int
    embed_dim: int
    hidden: int
    memory_dim: int
    num_layers: int = 1
    attention: str = "general"   # none | dot | general | concat | scaled_dot
    attention_dim: int = 256     # concat (Bahdanau) only
    input_feeding: bool = True
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    init_scale: float = 0.1  # s2s_jax.initializers
    tie_embeddings: bool = False  # the output projection is the input embedding, transposed

    @property
    def feeds(self) -> bool:
        return self.input_feeding and self.attention != "none"

    def setup(self):
        if self.attention in ("dot", "scaled_dot") and self.memory_dim != self.hidden:
            raise ValueError(f"attention={self.attention!r} needs decoder hidden ({self.hidden}) == "
                             f"encoder output size ({self.memory_dim}); use general or concat")
        if self.tie_embeddings and self.embed_dim != self.hidden:
            raise ValueError(f"tie_embeddings needs embed_dim ({self.embed_dim}) == decoder hidden ({self.hidden})")
        h4 = 4 * self.hidden
        matrix = initializers.matrix(self.init_scale)
        self.embedding = self.param("embedding", matrix, (self.vocab_size, self.embed_dim))
        self.w_embed = self.param("w_embed", matrix, (self.embed_dim, h4))
        self.w_feed = self.param("w_feed", matrix, (self.hidden, h4)) if self.feeds else None
        self.w_i = [self.param(f"w_i{l}", matrix, (self.hidden, h4)) for l in range(1, self.num_layers)]
        self.w_h = [self.param(f"w_h{l}", initializers.recurrent(self.init_scale), (self.hidden, h4))
                    for l in range(self.num_layers)]
        self.bias = [self.param(f"bias{l}", lstm_bias_init, (h4,)) for l in range(self.num_layers)]
        self.bridge = nn.Dense(2 * self.num_layers * self.hidden, kernel_init=matrix)
        if self.attention != "none":
            self.attention_params = attn.AttentionParams(
                self.attention, self.hidden, self.memory_dim, self.attention_dim, self.init_scale)
            self.w_combine = self.param("w_combine", matrix, (self.memory_dim + self.hidden, self.hidden))
        # [H, V]; tied: the embedding [V, E] transposed (E == H), so both share one gradient.
        self.w_out = (self.embedding.T if self.tie_embeddings
                      else self.param("w_out", matrix, (self.hidden, self.vocab_size)))
        self.b_out = self.param("b_out", nn.initializers.zeros, (self.vocab_size,))
        self.dropout = nn.Dropout(self.dropout_rate)  # embeddings and attentional vectors

    def weights(self) -> dict:
        """All parameters as plain arrays, read once outside any scan."""
        return dict(w_feed=self.w_feed, w_i=self.w_i, w_h=self.w_h, bias=self.bias,
                    attention=self.attention_params() if self.attention != "none" else None,
                    w_combine=self.w_combine if self.attention != "none" else None)

    def initial_state(self, encoder_final: jax.Array) -> State:
        """Bridge: h = c = tanh(W [final forward; final backward]) for every layer; leaves [B, ...]."""
        batch = encoder_final.shape[0]
        hc = jnp.tanh(self.bridge(encoder_final)).reshape(batch, 2, self.num_layers, self.hidden)
        return dict(h=hc[:, 0], c=hc[:, 1], feed=jnp.zeros((batch, self.hidden), jnp.float32))

    def memory(self, values: jax.Array, src_len: jax.Array) -> attn.Memory:
        keys = values if self.attention == "none" else attn.project_keys(
            self.attention, self.attention_params(), values)
        return attn.Memory(values, keys, attn.source_mask(src_len, values.shape[1]))

    def embed_gates(self, tokens: jax.Array, train: bool, rng: jax.Array | None = None,
                    time_major: bool = False) -> jax.Array:
        """tokens [...] -> embedding part of the first layer's gates [..., 4H] (+ bias).
        `time_major` (static), tokens [B, T]: the gates come as [T, B, 4H], the scan's layout (the
        embeddings, not the 4x wider gates, are transposed; dropout masks as without it)."""
        x = jnp.take(self.embedding, tokens, axis=0)
        if train and self.dropout_rate > 0:
            x = self._drop(x, rng)
        if time_major:
            x = x.swapaxes(0, 1)                                      # [T, B, E]
        return matmul(x, self.w_embed, self.dtype) + self.bias[0]

    def _drop(self, x: jax.Array, rng: jax.Array | None) -> jax.Array:
        """Dropout with an explicit key inside a scan, or the module's 'dropout' stream outside."""
        if rng is None:
            return self.dropout(x, deterministic=False)
        keep = jax.random.bernoulli(rng, 1.0 - self.dropout_rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout_rate), 0.0)

    def cell(self, w: dict, gates_in: jax.Array, state: State, memory: attn.Memory):
        """One decoder step for every hypothesis: gates_in [B, K, 4H] -> (attentional vector
        [B, K, H], attention weights [B, K, S], new state). A pure function of its arguments."""
        if self.feeds:
            gates_in = gates_in + matmul(state["feed"], w["w_feed"], self.dtype)
        hs, cs = [], []
        x = None
        for layer in range(self.num_layers):
            if layer > 0:
                gates_in = matmul(x, w["w_i"][layer - 1], self.dtype) + w["bias"][layer]
            x, c = lstm_cell(gates_in, state["h"][:, :, layer], state["c"][:, :, layer],
                             w["w_h"][layer], self.dtype)
            hs.append(x)
            cs.append(c)
        if self.attention == "none":
            vector, weights = x, jnp.zeros(x.shape[:2] + memory.mask.shape[1:], jnp.float32)
        else:
            context, weights = attn.attend(self.attention, w["attention"], x, memory)  # [B, K, He]
            vector = jnp.tanh(matmul(jnp.concatenate([context, x], -1), w["w_combine"], self.dtype))
        new_state = dict(h=jnp.stack(hs, 2), c=jnp.stack(cs, 2), feed=vector)  # [B, K, L, H]
        if "attention" in state:  # tracked for the search (Seq2Seq.encode(track_attention=True))
            new_state.update(attention=weights, coverage=state["coverage"] + weights)  # [B, K, S]
        return vector, weights, new_state

    def output_inputs(self, vectors: jax.Array, train: bool, rng: jax.Array | None = None) -> jax.Array:
        """Attentional vectors [..., H] as the output projection sees them (after dropout)."""
        if train and self.dropout_rate > 0:
            vectors = self._drop(vectors, rng)
        return vectors

    def logits(self, vectors: jax.Array, train: bool, rng: jax.Array | None = None) -> jax.Array:
        """Attentional vectors [..., H] -> vocabulary logits [..., V]."""
        return matmul(self.output_inputs(vectors, train, rng), self.w_out, self.dtype) + self.b_out

    def teacher_forced(self, tgt_in: jax.Array, state: State, memory: attn.Memory, train: bool,
                       return_vectors: bool = False):
        """Ground truth at every step: the scan carries only the recurrence; one output
        projection [B*T, H] x [H, V] after it. Returns logits [B, T, V] (or, with
        `return_vectors`, the projection's inputs [B, T, H]) and weights [B, T, S]."""
        w = self.weights()
        gates = self.embed_gates(tgt_in, train, time_major=True)      # [T, B, 4H], hoisted
        state = jax.tree.map(lambda x: x[:, None], state)             # [B, 1, ...]

        def step(state, gates_t):
            vector, weights, state = self.cell(w, gates_t[:, None], state, memory)
            return state, (vector[:, 0], weights[:, 0])

        _, (vectors, weights) = jax.lax.scan(step, state, gates)
        vectors, weights = vectors.swapaxes(0, 1), weights.swapaxes(0, 1)  # [B, T, H], [B, T, S]
        if return_vectors:
            return self.output_inputs(vectors, train), weights
        return self.logits(vectors, train), weights

    def scheduled_sampling(self, tgt_in: jax.Array, state: State, memory: attn.Memory,
                           tf_ratio: jax.Array, rng: jax.Array, train: bool, coins: jax.Array | None = None):
        """Scheduled sampling (Bengio et al. 2015): at each step t > 0 the input is the ground
        truth with probability `tf_ratio`, else the model's own argmax prediction of step t-1,
        drawn per target token (`gold_coins`, unless `coins` [B, T] are given). Returns logits
        [B, T, V], weights [B, T, S], fed tokens [B, T]."""
        w = self.weights()
        length = tgt_in.shape[1]
        use_gold = self.gold_coins(rng, tf_ratio, tgt_in.shape) if coins is None else coins
        drop_rng = jax.random.split(rng)[1]
        step_rngs = jax.random.split(drop_rng, (length, 2))
        state = jax.tree.map(lambda x: x[:, None], state)             # [B, 1, ...]
        previous = tgt_in[:, 0]

        def step(carry, xs):
            state, predicted = carry
            gold_t, use_gold_t, (embed_rng, out_rng) = xs
            token = jnp.where(use_gold_t, gold_t, predicted)          # [B]
            gates_t = self.embed_gates(token, train, embed_rng)
            vector, weights, state = self.cell(w, gates_t[:, None], state, memory)
            logits_t = self.logits(vector[:, 0], train, out_rng)      # [B, V]
            predicted = ops.argmax(logits_t).astype(tgt_in.dtype)
            return (state, predicted), (logits_t, weights[:, 0], token)

        xs = (tgt_in.swapaxes(0, 1), use_gold.swapaxes(0, 1), step_rngs)
        _, (logits, weights, fed) = jax.lax.scan(step, (state, previous), xs)
        return logits.swapaxes(0, 1), weights.swapaxes(0, 1), fed.swapaxes(0, 1)

    @staticmethod
    def gold_coins(rng: jax.Array, tf_ratio: jax.Array, shape: tuple[int, int]) -> jax.Array:
        """Per target token [B, T]: feed the ground truth? True with probability `tf_ratio`, and
        always at position 0 (BOS). Drawn from the first half of `rng` (the sequential mode's
        dropout takes the second)."""
        return jax.random.bernoulli(jax.random.split(rng)[0], tf_ratio, shape).at[:, 0].set(True)

    def parallel_sampling(self, tgt_in: jax.Array, state: State, memory: attn.Memory,
                          tf_ratio: jax.Array, rng: jax.Array, passes: int,
                          coins: jax.Array | None = None, chunk: int = 0) -> jax.Array:
        """Parallel scheduled sampling (Duckworth et al. 2019): the inputs [B, T] of the final,
        differentiated teacher-forced pass. Each of `passes` teacher-forced passes (no gradient;
        no dropout in the decoder, the encoder outputs are the final pass's) reads the previous
        pass's inputs (the first: the ground truth) and predicts an argmax token at every
        position; the next inputs are, per target token, the ground truth where
        `scheduled_sampling`'s coin (the same draw from the same `rng`) says so, else the
        prediction of the previous position. With `passes` >= T these are the tokens that
        `scheduled_sampling` without dropout feeds. `coins` [B, T]: as in `scheduled_sampling`.
        `chunk` > 0: the argmax is taken `chunk` tokens at a time, never writing [B, T, V] logits,
        and only where the next position reads it (`output_layer.argmax`)."""
        use_gold = self.gold_coins(rng, tf_ratio, tgt_in.shape) if coins is None else coins  # [B, T]
        tokens = tgt_in
        for _ in range(passes):
            vectors, _ = self.teacher_forced(tokens, state, memory, train=False, return_vectors=True)
            vectors = jax.lax.stop_gradient(vectors)                                     # [B, T, H]
            if chunk:
                # Only positions whose next position reads a prediction need one.
                needed = jnp.pad(~use_gold[:, 1:], ((0, 0), (0, 1)))                      # [B, T]
                predicted = output_layer.argmax(vectors, self.w_out, self.b_out, chunk, self.dtype, needed)
            else:
                predicted = ops.argmax(self.logits(vectors, train=False))
            predicted = predicted.astype(tgt_in.dtype)                                   # [B, T]
            # Position t reads the prediction made at t - 1; position 0 is always gold.
            tokens = jnp.where(use_gold, tgt_in, jnp.roll(predicted, 1, axis=1))
        return tokens


class Seq2Seq(nn.Module):
    """Encoder + attentional decoder; the embeddings may be tied to the output projection and
    shared between the two sides."""
    src_vocab_size: int
    tgt_vocab_size: int
    embed_dim: int = 256
    encoder_hidden: int = 256     # per direction
    encoder_layers: int = 1
    bidirectional: bool = True
    reverse_source: bool = False
    decoder_hidden: int = 256
    decoder_layers: int = 1
    attention: str = "general"
    attention_dim: int = 256
    input_feeding: bool = True
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    # Tokens per chunk of the fused output layer + loss (s2s_jax.output_layer) that steps uses on
    # the teacher-forced path; 0 = logits and steps.cross_entropy. Changes no parameter.
    output_chunk: int = 0
    # Weight initialisation (s2s_jax.initializers): U(-s, s) for s > 0, Glorot / orthogonal for 0.
    init_scale: float = 0.1
    # The decoder's input embedding is its output projection's matrix (needs embed_dim == decoder_hidden).
    tie_embeddings: bool = False
    # The encoder reads the decoder's embedding table (needs one vocabulary: src == tgt vocab size).
    share_embeddings: bool = False

    def setup(self):
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(f"share_embeddings needs one vocabulary, but the source has {self.src_vocab_size} "
                             f"pieces and the target {self.tgt_vocab_size} (train them with data.joint_vocab)")
        self.encoder = Encoder(self.src_vocab_size, self.embed_dim, self.encoder_hidden,
                               self.encoder_layers, self.bidirectional, self.reverse_source,
                               self.dropout_rate, self.dtype, self.init_scale)
        memory_dim = self.encoder_hidden * (2 if self.bidirectional else 1)
        self.decoder = Decoder(self.tgt_vocab_size, self.embed_dim, self.decoder_hidden, memory_dim,
                               self.decoder_layers, self.attention, self.attention_dim,
                               self.input_feeding, self.dropout_rate, self.dtype, self.init_scale,
                               self.tie_embeddings)

    def encode(self, src: jax.Array, src_len: jax.Array, train: bool = False, track_attention: bool = False):
        """src [B, S], src_len [B] -> (Memory with leaves [B, S, ...], decoder state with leaves [B, ...]).

        `track_attention` (static): the state also holds `attention`, the last step's weights [B, S],
        and `coverage`, their sum over the steps so far [B, S] (zero at padding, like the weights);
        `decode_step` keeps both up to date.
        """
        values, final = self.encoder(src, src_len, train,
                                     embedding=self.decoder.embedding if self.share_embeddings else None)
        memory, state = self.decoder.memory(values, src_len), self.decoder.initial_state(final)
        if track_attention:
            zeros = jnp.zeros(memory.mask.shape, jnp.float32)  # [B, S]
            state = dict(state, attention=zeros, coverage=zeros)
        return memory, state

    def decode_step(self, memory: attn.Memory, tokens: jax.Array, state: State):
        """tokens [B, K], state leaves [B, K, ...] -> (log_probs [B, K, V], new state)."""
        vector, _, state = self.decoder.cell(self.decoder.weights(), self.decoder.embed_gates(tokens, False),
                                             state, memory)
        return jax.nn.log_softmax(self.decoder.logits(vector, False)), state

    def __call__(self, src, src_len, tgt_in, *, train: bool = False, tf_ratio=1.0,
                 sampling_rng: jax.Array | None = None, fast_path_only: bool = False,
                 return_vectors: bool = False, parallel_passes: int = 0, gold_coins: jax.Array | None = None):
        """Training forward. Returns dict(logits [B, T, V], attention [B, T, S], fed_tokens [B, T]).

        `parallel_passes` (static): 0 = sequential scheduled sampling (`Decoder.scheduled_sampling`);
        k >= 1 = parallel scheduled sampling with k prediction passes (`Decoder.parallel_sampling`),
        whose outputs always come from the teacher-forced path, on the mixed inputs.
        `fast_path_only` (static), sequential only: ratio is 1 for the whole run; compile only the
        teacher-forced path (also taken when `tf_ratio` is a Python number >= 1, as by default).
        Otherwise the ratio is traced and `lax.cond` runs the fast path (parallel: leaves the
        inputs unmixed) whenever it is >= 1.
        `return_vectors` (static, teacher-forced path only): instead of logits, return the output
        projection's inputs (after dropout) as `vectors` [B, T, H] and its parameters as
        `projection` (w_out [H, V], b_out [V]), for s2s_jax.output_layer.
        `gold_coins` [B, T]: scheduled sampling's draw (`Decoder.gold_coins`) given rather than drawn
        from `sampling_rng` (gradient accumulation gives each micro-batch its rows of the batch's).
        """
        memory, state = self.encode(src, src_len, train)
        gold = isinstance(tf_ratio, (int, float)) and tf_ratio >= 1.0
        if not gold and (parallel_passes or not fast_path_only):
            if sampling_rng is None:
                raise ValueError("scheduled sampling (tf_ratio < 1) needs sampling_rng")
            ratio = jnp.asarray(tf_ratio, jnp.float32)
            if not parallel_passes:
                if return_vectors:
                    raise ValueError("return_vectors needs the teacher-forced path (fast_path_only, "
                                     "tf_ratio >= 1 or parallel_passes > 0)")
                # Run the decoder as one function of its parameters, so lax.cond can pick a path.
                return self._decode_either(tgt_in, state, memory, ratio, sampling_rng, train, gold_coins)
            # The passes draw nothing from the module's rng streams (rngs=False): the final pass's
            # dropout is that of plain teacher forcing.
            mix = lambda decoder, ratio, rng: decoder.parallel_sampling(  # noqa: E731
                tgt_in, state, memory, ratio, rng, parallel_passes, gold_coins, self.output_chunk)
            tgt_in = nn.cond(ratio >= 1.0, lambda *_: tgt_in, mix, self.decoder, ratio, sampling_rng,
                             rngs=False)
        out, weights = self.decoder.teacher_forced(tgt_in, state, memory, train, return_vectors)
        if return_vectors:
            return dict(vectors=out, projection=(self.decoder.w_out, self.decoder.b_out),
                        attention=weights, fed_tokens=tgt_in)
        return dict(logits=out, attention=weights, fed_tokens=tgt_in)

    def _decode_either(self, tgt_in, state, memory, tf_ratio, rng, train, coins):
        def fast(decoder, *_):
            logits, weights = decoder.teacher_forced(tgt_in, state, memory, train)
            return logits, weights, tgt_in

        def sampled(decoder, ratio, rng):
            return decoder.scheduled_sampling(tgt_in, state, memory, ratio, rng, train, coins)

        logits, weights, fed = nn.cond(tf_ratio >= 1.0, fast, sampled, self.decoder, tf_ratio, rng)
        return dict(logits=logits, attention=weights, fed_tokens=fed)


def make_model(model_cfg, src_vocab_size: int, tgt_vocab_size: int) -> Seq2Seq:
    """Builds Seq2Seq from the `config.model` group: each key sets the field of its name (dropout
    sets dropout_rate; dtype is named)."""
    fields = dict(model_cfg)
    fields["dropout_rate"] = fields.pop("dropout")
    fields["dtype"] = jnp.dtype(fields["dtype"])
    return Seq2Seq(src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size, **fields)
