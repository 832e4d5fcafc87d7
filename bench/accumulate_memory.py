"""Peak memory of one configs/gpu.py-sized train step against optimizer.accumulate_steps (compiled only).

Command:
  JAX_PLATFORMS=cpu python bench/accumulate_memory.py [--k=1,2,4] [--length=65]

Compiles the jitted train step (configs/gpu.py's model, 8000-piece vocabularies, batch 128 of the
longest bucket, donated state as in training) for each k and prints XLA's memory analysis: the
temporary buffers (activations, gradients, the accumulator) and the arguments (state + batch).
Nothing runs; the figures are the compiler's for this machine's backend.
"""
import argparse
import functools
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import gpu  # noqa: E402
from s2s_jax import data, schedules, steps  # noqa: E402
from s2s_jax.models import make_model  # noqa: E402

VOCAB = 8000


def compiled_memory(config, k: int, length: int):
    model = make_model(config.model, VOCAB, VOCAB)
    state = jax.eval_shape(lambda: steps.init_state(model, config.optimizer, config.num_train_steps, config.seed))
    rows = config.data.batch_size
    ids = jax.ShapeDtypeStruct((rows, length), np.int32)
    batch = data.Batch(ids, jax.ShapeDtypeStruct((rows,), np.int32), ids, ids, jax.ShapeDtypeStruct((rows,), np.int32))
    step = jax.jit(functools.partial(
        steps.train_step, model=model, tf_schedule=schedules.make_schedule("constant"), fast_path_only=True,
        label_smoothing=config.optimizer.label_smoothing, base_rng=jax.random.PRNGKey(0), accumulate_steps=k,
        ema_decay=config.optimizer.ema_decay), donate_argnums=0)
    return step.lower(state, batch).compile().memory_analysis()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", default="1,2,4")
    parser.add_argument("--length", type=int, default=65)
    parser.add_argument("--ema_decay", type=float, default=0.0)
    args = parser.parse_args()
    config = gpu.get_config()
    config.optimizer.ema_decay = args.ema_decay
    print(f"{jax.devices()[0].platform}: configs/gpu.py model, batch {config.data.batch_size} x {args.length}, "
          f"dtype {config.model.dtype}, ema_decay {args.ema_decay}")
    for k in (int(k) for k in args.k.split(",")):
        m = compiled_memory(config, k, args.length)
        print(f"k={k}: temp {m.temp_size_in_bytes / 2**20:,.0f} MiB | arguments {m.argument_size_in_bytes / 2**20:,.0f} MiB"
              f" | outputs {m.output_size_in_bytes / 2**20:,.0f} MiB (aliased {m.alias_size_in_bytes / 2**20:,.0f})"
              f" | peak ~ {(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes) / 2**20:,.0f} MiB",
              flush=True)


if __name__ == "__main__":
    main()
