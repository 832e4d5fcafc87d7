"""Reference training loops for bench/train_speed.py: one model written plainly in JAX and in PyTorch.

The model (both): embeddings E, a bidirectional 1-layer LSTM encoder (H/2 per direction, so memory
width H), a 1-layer LSTM decoder H with input feeding, Luong 'general' attention, the attentional
vector tanh(Wc [context; h]), an output projection to V, cross-entropy and Adam 1e-3. The data: one
random batch of ids in [4, V), every sequence full length (no padding, no masks).

- `bench_torch`: PyTorch the way JoeyNMT writes it: an nn.LSTM encoder, an nn.LSTMCell stepped by
  a Python loop over the target positions, logits per batch after the loop.
- `bench_jax`: plain JAX: input projections hoisted out of the recurrences, lax.scan, logits after
  the loop, one jitted step.

Both return (seconds per step, loss of the last step, seconds of the first step if it compiles, else
None): the first step and two more are untimed, then `num_steps` are timed. `flops_per_step` is the
step's matmul work, `matmul_ceiling` the dense matmul rate of a framework on this machine. Each
framework is imported only inside its own functions, so that a process measuring one neither loads
the other nor counts its memory.
"""
import time

import numpy as np

CONFIGS = {
    "small": dict(B=64, S=40, T=40, E=256, H=256, V=8000),
    "large": dict(B=256, S=50, T=50, E=512, H=1024, V=32000),
}
LEARNING_RATE = 1e-3


def flops_per_step(B, S, T, E, H, V, **_) -> int:
    """Matmul FLOPs of one train step: the forward pass's, times 3 (forward + backward)."""
    half = H // 2
    encoder = 2 * (2 * B * S * 4 * half * (E + half))           # two directions, input E, recurrent H/2
    decoder = 2 * B * T * 4 * H * (E + H + H)                     # input [embedding; feed], recurrent H
    attention = (2 * B * T * S * H * 2                            # scores and context
                 + 2 * B * S * H * H                              # keys = memory Wa
                 + 2 * B * T * 2 * H * H)                         # tanh(Wc [context; h])
    output = 2 * B * T * H * V
    return 3 * (encoder + decoder + attention + output)


def random_batch(cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """(src [B, S], tgt [B, T + 1]) random full-length ids; tgt[:, :-1] is fed, tgt[:, 1:] predicted."""
    rng = np.random.default_rng(0)
    return rng.integers(4, cfg["V"], (cfg["B"], cfg["S"])), rng.integers(4, cfg["V"], (cfg["B"], cfg["T"] + 1))


def time_steps(step, carry, num_steps: int, block) -> tuple[float, float, float]:
    """(first call s, s per timed call, last value): `carry, value = step(carry)` is called 3 times
    untimed, then `num_steps` times timed; `block(value)` waits for the device."""
    start = time.perf_counter()
    carry, value = step(carry)
    block(value)
    first_s = time.perf_counter() - start
    for _ in range(2):
        carry, value = step(carry)
    block(value)
    start = time.perf_counter()
    for _ in range(num_steps):
        carry, value = step(carry)
    block(value)
    return first_s, (time.perf_counter() - start) / num_steps, value


# ----------------------------------------------------------------------------- plain JAX
def jax_params(cfg: dict) -> dict:
    """Weights N(0, 0.1^2), biases 0; LSTM gate weights side by side, [in, 4 * hidden]."""
    import jax
    import jax.numpy as jnp

    E, H, V = cfg["E"], cfg["H"], cfg["V"]
    half = H // 2
    shapes = dict(src_emb=(V, E), tgt_emb=(V, E), fw_in=(E, 4 * half), fw_rec=(half, 4 * half),
                  bw_in=(E, 4 * half), bw_rec=(half, 4 * half), dec_emb=(E, 4 * H), dec_feed=(H, 4 * H),
                  dec_rec=(H, 4 * H), key=(H, H), combine=(2 * H, H), out=(H, V))
    keys = jax.random.split(jax.random.PRNGKey(0), len(shapes))
    params = {name: 0.1 * jax.random.normal(k, shape) for k, (name, shape) in zip(keys, shapes.items())}
    biases = dict(fw_b=4 * half, bw_b=4 * half, dec_b=4 * H, out_b=V)
    return params | {name: jnp.zeros(n) for name, n in biases.items()}


def lstm_update(gates, c):
    """One LSTM update from the summed gate pre-activations [B, 4n] (i, f, g, o) and cell c [B, n]."""
    import jax
    import jax.numpy as jnp

    i, f, g, o = jnp.split(gates, 4, -1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jnp.tanh(c) * jax.nn.sigmoid(o), c


def scan_lstm(x_proj, w_rec):
    """Hidden states [S, B, n] of an LSTM from zero state; x_proj [S, B, 4n] is the hoisted input part."""
    import jax
    import jax.numpy as jnp

    def step(carry, x):
        h, c = lstm_update(x + carry[0] @ w_rec, carry[1])
        return (h, c), h

    zeros = jnp.zeros((x_proj.shape[1], w_rec.shape[0]))
    return jax.lax.scan(step, (zeros, zeros), x_proj)[1]


def jax_encode(p: dict, src):
    """Memory [B, S, H] of src [B, S]: forward and backward states side by side."""
    import jax.numpy as jnp

    x = p["src_emb"][src].transpose(1, 0, 2)                                  # [S, B, E]
    forward = scan_lstm(x @ p["fw_in"] + p["fw_b"], p["fw_rec"])              # [S, B, H/2]
    backward = scan_lstm((x @ p["bw_in"] + p["bw_b"])[::-1], p["bw_rec"])[::-1]
    return jnp.concatenate([forward, backward], -1).transpose(1, 0, 2)


def jax_decode(p: dict, memory, tgt_in):
    """Attentional vectors [T, B, H] for the fed targets tgt_in [B, T] over memory [B, S, H]."""
    import jax
    import jax.numpy as jnp

    keys = memory @ p["key"]                                                  # [B, S, H]
    emb_proj = p["tgt_emb"][tgt_in].transpose(1, 0, 2) @ p["dec_emb"] + p["dec_b"]   # [T, B, 4H]

    def step(carry, e):
        h, c, feed = carry
        h, c = lstm_update(e + feed @ p["dec_feed"] + h @ p["dec_rec"], c)
        alpha = jax.nn.softmax(jnp.einsum("bsh,bh->bs", keys, h), -1)        # [B, S]
        context = jnp.einsum("bs,bsh->bh", alpha, memory)                     # [B, H]
        feed = jnp.tanh(jnp.concatenate([context, h], -1) @ p["combine"])
        return (h, c, feed), feed

    zeros = jnp.zeros((tgt_in.shape[0], p["dec_rec"].shape[0]))
    return jax.lax.scan(step, (zeros, zeros, zeros), emb_proj)[1]


def jax_loss(p: dict, src, tgt):
    """Mean cross-entropy of tgt[:, 1:] given src [B, S] and tgt[:, :-1]."""
    import optax

    feeds = jax_decode(p, jax_encode(p, src), tgt[:, :-1])                   # [T, B, H]
    logits = feeds @ p["out"] + p["out_b"]                                    # [T, B, V]
    return optax.softmax_cross_entropy_with_integer_labels(logits, tgt[:, 1:].T).mean()


def bench_jax(cfg: dict, num_steps: int) -> tuple[float, float, float]:
    """(s per step, loss, compile s) of the jitted plain-JAX train step on the default backend."""
    import jax
    import jax.numpy as jnp
    import optax

    optimizer = optax.adam(LEARNING_RATE)
    src, tgt = (jnp.asarray(ids) for ids in random_batch(cfg))

    @jax.jit
    def train_step(params, opt_state, src, tgt):
        loss, grads = jax.value_and_grad(jax_loss)(params, src, tgt)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def step(carry):
        params, opt_state, loss = train_step(*carry, src, tgt)
        return (params, opt_state), loss

    params = jax_params(cfg)
    compile_s, step_s, loss = time_steps(step, (params, optimizer.init(params)), num_steps, jax.block_until_ready)
    return step_s, float(loss), compile_s


# ----------------------------------------------------------------------------- PyTorch, JoeyNMT-style
def torch_model(cfg: dict):
    """The model's modules, PyTorch's default initialisation."""
    import torch.nn as nn

    E, H, V = cfg["E"], cfg["H"], cfg["V"]
    return nn.ModuleDict(dict(
        src_emb=nn.Embedding(V, E), tgt_emb=nn.Embedding(V, E),
        encoder=nn.LSTM(E, H // 2, batch_first=True, bidirectional=True), decoder=nn.LSTMCell(E + H, H),
        key=nn.Linear(H, H, bias=False), combine=nn.Linear(2 * H, H, bias=False), out=nn.Linear(H, V)))


def torch_logits(m, src, tgt_in):
    """Logits [B, T, V] for src [B, S] and the fed targets tgt_in [B, T], one decoder step at a time."""
    import torch

    memory, _ = m.encoder(m.src_emb(src))                                     # [B, S, H]
    keys = m.key(memory)                                                      # [B, S, H]
    emb = m.tgt_emb(tgt_in)                                                   # [B, T, E]
    h, c, feed = (memory.new_zeros(src.shape[0], m.decoder.hidden_size) for _ in range(3))
    feeds = []
    for t in range(tgt_in.shape[1]):
        h, c = m.decoder(torch.cat([emb[:, t], feed], -1), (h, c))
        alpha = torch.softmax(torch.bmm(keys, h.unsqueeze(2)).squeeze(2), -1)           # [B, S]
        context = torch.bmm(alpha.unsqueeze(1), memory).squeeze(1)                      # [B, H]
        feed = torch.tanh(m.combine(torch.cat([context, h], -1)))
        feeds.append(feed)
    return m.out(torch.stack(feeds, 1))


def bench_torch(cfg: dict, num_steps: int, device: str) -> tuple[float, float, None]:
    """(s per step, loss, None) of the eager PyTorch train step on `device` (cpu | cuda)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True   # what a speed-minded user sets; JAX's default is alike
    model = torch_model(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), LEARNING_RATE)
    src, tgt = (torch.from_numpy(ids).to(device) for ids in random_batch(cfg))

    def train_step(carry):
        optimizer.zero_grad(set_to_none=True)
        logits = torch_logits(model, src, tgt[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg["V"]), tgt[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        return carry, loss

    _, step_s, loss = time_steps(train_step, None, num_steps, lambda _: torch_sync(device))
    return step_s, float(loss.detach()), None


def torch_sync(device: str) -> None:
    """Wait for the queued CUDA work (nothing to wait for on CPU)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- machine ceiling
def matmul_ceiling(framework: str, device: str) -> float:
    """GFLOP/s of a float32 n x n matmul in `framework` (jax | torch): this machine's rate for the work."""
    n = 8192 if device == "cuda" else 2048
    if framework == "jax":
        import jax

        a = jax.random.normal(jax.random.PRNGKey(1), (n, n))
        square = jax.jit(lambda x: x @ x)
        _, seconds, _ = time_steps(lambda x: (x, square(x)), a, 10, jax.block_until_ready)
    else:
        import torch

        a = torch.randn(n, n, device=device)
        _, seconds, _ = time_steps(lambda x: (x, x @ x), a, 10, lambda _: torch_sync(device))
    return 2 * n ** 3 / seconds / 1e9
