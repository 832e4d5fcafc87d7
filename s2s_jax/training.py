"""Training: optimizer, pure jitted `train_step` / `eval_step`, and the resumable loop.

`train_step(state, batch, *, model, ...)` and `eval_step(params, batch, *, model)` are module-level
pure functions (static arguments bound with functools.partial, as in the Flax examples). The loop
in `train_and_evaluate` owns the Python side: data, checkpoints, logging, signals.

Exact resume: everything a step consumes is a function of (seed, step): the batch is
`TrainBatches.batch(step)`, the dropout / sampling key is `fold_in(PRNGKey(seed), step)`. A
checkpoint therefore needs only the state plus the open logging window to continue bit-identically.
On resume, metrics.jsonl is cut back to the restored step (rows after it are written again) and
TensorBoard hides its events after that step (purge_step).

Failure handling (see tests/test_reliability.py):
- every input (config values, data files, the workdir's config and checkpoints) is checked before
  anything is compiled or written; the checkpoint is restored against `jax.eval_shape` of the state;
- a non-finite loss, gradient or updated parameter is detected inside the jitted step, which then
  keeps the old parameters; the loop stops (NonFiniteError naming the step and the last good
  checkpoint) or skips the update, per `config.on_nonfinite`;
- SIGINT / SIGTERM: the loop finishes the current step, saves a checkpoint and raises Interrupted
  (a SystemExit whose message says how to resume); a second signal stops at once, without saving;
- a SIGKILL at any moment loses at most the steps since the last complete checkpoint: checkpoints,
  config.json, summary.json and the metrics.jsonl rewrite are all written atomically.
"""
import functools
import json
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from s2s_jax import PAD_ID, checkpoints, configuration, data, inference, metrics, parallel, schedules
from s2s_jax.models import Seq2Seq, make_model


logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """The loss or the gradient of a step was NaN or infinite."""


class Interrupted(SystemExit):
    """SIGINT / SIGTERM: a checkpoint was saved. `code` is 128 + the signal number, `message` says
    where the checkpoint is and how to resume."""

    def __init__(self, signum: int, step: int, directory: str):
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name
        self.step = step
        self.message = (f"{self.signal_name}: saved checkpoint step {step} in {directory}; "
                        "rerun the same command to resume from it")


class TrainState(train_state.TrainState):
    """Flax TrainState: step, params, opt_state (and the optax transformation)."""


# ----------------------------------------------------------------------------- optimizer
def make_learning_rate(opt_cfg, num_train_steps: int) -> optax.Schedule:
    """Linear warmup to the peak, then constant, cosine (to 10%) or inverse square root."""
    peak, warmup = opt_cfg.learning_rate, max(opt_cfg.warmup_steps, 1)
    decay_steps = max(num_train_steps - warmup, 1)
    after = {
        "constant": optax.constant_schedule(peak),
        "cosine": optax.cosine_decay_schedule(peak, decay_steps, alpha=0.1),
        "rsqrt": lambda step: peak * jnp.sqrt(warmup / (step + warmup)),
    }[opt_cfg.decay]
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(opt_cfg, num_train_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    learning_rate = make_learning_rate(opt_cfg, num_train_steps)
    clip = [optax.clip_by_global_norm(opt_cfg.clip_norm)] if opt_cfg.clip_norm > 0 else []
    tx = optax.chain(*clip, optax.adam(learning_rate, b1=opt_cfg.b1, b2=opt_cfg.b2))
    return tx, learning_rate


# ----------------------------------------------------------------------------- steps
def cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0):
    """Summed token cross-entropy over non-PAD targets: (loss_sum, token_count).

    logits [B, T, V], targets [B, T]. With smoothing, the target distribution puts 1 - eps on the
    gold token and spreads eps uniformly over the vocabulary.
    """
    mask = (targets != PAD_ID).astype(jnp.float32)
    logits = logits.astype(jnp.float32)
    if label_smoothing > 0:
        vocab = logits.shape[-1]
        soft = optax.smooth_labels(jax.nn.one_hot(targets, vocab), label_smoothing)
        losses = optax.softmax_cross_entropy(logits, soft)
    else:
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(losses * mask), jnp.sum(mask)


def train_step(state: TrainState, batch: data.Batch, *, model: Seq2Seq, tf_schedule,
               fast_path_only: bool, label_smoothing: float, base_rng: jax.Array):
    """One optimizer step. Returns (new_state, metrics) with sums, not means.

    A non-finite loss, gradient or updated parameter leaves params and optimizer state unchanged
    (the step counter still advances); `metrics["finite"]` tells the loop, which stops or goes on
    as configured.
    """
    step_rng = jax.random.fold_in(base_rng, state.step)
    dropout_rng, sampling_rng = jax.random.split(step_rng)
    tf_ratio = tf_schedule(state.step)

    def loss_fn(params):
        out = model.apply({"params": params}, batch.src, batch.src_len, batch.tgt_in, train=True,
                          tf_ratio=tf_ratio, sampling_rng=sampling_rng,
                          fast_path_only=fast_path_only, rngs={"dropout": dropout_rng})
        loss_sum, tokens = cross_entropy(out["logits"], batch.tgt_out, label_smoothing)
        return loss_sum / jnp.maximum(tokens, 1.0), (loss_sum, tokens)

    (_, (loss_sum, tokens)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updated = state.apply_gradients(grads=grads)
    # Finite loss and gradient can still overflow the parameters (an absurd learning rate).
    params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(updated.params)]))
    finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm) & params_finite
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    new_state = updated.replace(params=jax.tree.map(keep, updated.params, state.params),
                                opt_state=jax.tree.map(keep, updated.opt_state, state.opt_state))
    return new_state, dict(loss_sum=loss_sum, tokens=tokens, grad_norm=grad_norm,
                           tf_ratio=tf_ratio, finite=finite)


def eval_step(params, batch: data.Batch, *, model: Seq2Seq):
    """Teacher-forced dev loss: (loss_sum, token_count)."""
    out = model.apply({"params": params}, batch.src, batch.src_len, batch.tgt_in, fast_path_only=True)
    return cross_entropy(out["logits"], batch.tgt_out)


# ----------------------------------------------------------------------------- compile stats
class CompileStats:
    """Counts XLA compilations and sums tracing + lowering + compile seconds (jax.monitoring)."""
    EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
              "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        self.count, self.seconds = 0, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **_) -> None:
        if event in self.EVENTS:
            self.seconds += duration
            self.count += event == self.EVENTS[-1]


_COMPILE_STATS: CompileStats | None = None


def compile_stats() -> CompileStats:
    global _COMPILE_STATS
    if _COMPILE_STATS is None:
        _COMPILE_STATS = CompileStats()
    return _COMPILE_STATS


# ----------------------------------------------------------------------------- evaluation
class Evaluator:
    """Dev loss / perplexity and decoded dev BLEU + chrF (sacrebleu on detokenized text)."""

    def __init__(self, config, corpus: data.Corpus, model: Seq2Seq, mesh):
        self.config, self.corpus, self.model, self.mesh = config, corpus, model, mesh
        self.batches = data.eval_batches(corpus.dev_src, corpus.dev_tgt, batch_size=config.eval.batch_size,
                                         boundaries=config.data.bucket_boundaries)
        self.eval_step = jax.jit(functools.partial(eval_step, model=model))
        self.signature: str | None = None  # sacrebleu's, logged at the first evaluation

    def __call__(self, params) -> dict:
        loss_sum = tokens = 0.0
        for batch in self.batches:
            s, n = self.eval_step(params, parallel.shard_batch(batch, self.mesh))
            loss_sum, tokens = loss_sum + float(s), tokens + float(n)
        result = dict(dev_loss=loss_sum / tokens, dev_ppl=float(np.exp(loss_sum / tokens)))
        searches = ["greedy"] + (["beam"] if self.config.eval.search == "beam" else [])
        for search in searches:
            hyps = self.translate(params, search)
            bleu, signature = metrics.sacrebleu_score(hyps, self.corpus.dev_tgt_text)
            suffix = "" if search == "greedy" else "_beam"
            result[f"dev_bleu{suffix}"] = bleu
            result[f"dev_chrf{suffix}"] = metrics.chrf_score(hyps, self.corpus.dev_tgt_text)
            if self.signature is None:
                logger.info("dev BLEU: sacrebleu %s", signature)
                self.signature = signature
        return result

    def translate(self, params, search: str) -> list[str]:
        """Detokenized dev translations in corpus order."""
        ev = self.config.eval
        outputs: list[str] = [""] * len(self.corpus.dev_src)
        for batch in self.batches:
            beams = inference.decode_batch(
                self.model, params, batch.src, batch.src_len, search=search, beam_size=ev.beam_size,
                max_len=inference.max_decode_len(batch.src.shape[1], ev.max_decode_len), alpha=ev.alpha,
                n_best=1)
            texts = self.corpus.tgt_tokenizer.decode(np.asarray(beams.sequences[:, 0]))
            for index, text in zip(batch.index, texts):
                if index >= 0:
                    outputs[index] = text
        return outputs


# ----------------------------------------------------------------------------- logging
class MetricsLog:
    """metrics.jsonl (one JSON object per line, each with `step`) plus TensorBoard events."""

    def __init__(self, workdir: str, resume_step: int):
        self.path = os.path.join(workdir, "metrics.jsonl")
        rows = []
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
            for line in text.splitlines(keepends=True):
                if not line.endswith("\n"):
                    break  # torn last line of a killed run
                try:
                    row = json.loads(line)
                except ValueError:
                    logger.warning("%s: dropping unreadable line %r", self.path, line[:80])
                    continue
                if row["step"] <= resume_step:  # rows past the restored checkpoint are redone
                    rows.append(line)
        _write_atomic(self.path, "".join(rows))
        from tensorboardX import SummaryWriter
        # Hide events of the interrupted run after the restored step (TensorBoard's purge).
        self.writer = SummaryWriter(os.path.join(workdir, "tb"),
                                    purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, values: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _write_atomic(path: str, text: str) -> None:
    """Writes a whole file or nothing: a run killed mid-write leaves the old file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


class Window:
    """Training metrics accumulated between two progress lines (saved in checkpoints).

    `steps` counts applied updates; `skipped` the non-finite steps skipped (on_nonfinite="skip"),
    whose loss and gradient norm are left out of the averages.
    """

    def __init__(self, loss_sum=0.0, tokens=0.0, steps=0, grad_norm_sum=0.0, skipped=0):
        self.loss_sum, self.tokens, self.steps, self.grad_norm_sum = loss_sum, tokens, steps, grad_norm_sum
        self.skipped = skipped

    def add(self, m: dict) -> None:
        if not bool(m["finite"]):
            self.skipped += 1
            return
        self.loss_sum += float(m["loss_sum"])
        self.tokens += float(m["tokens"])
        self.grad_norm_sum += float(m["grad_norm"])
        self.steps += 1

    def as_dict(self) -> dict:
        return dict(loss_sum=self.loss_sum, tokens=self.tokens, steps=self.steps,
                    grad_norm_sum=self.grad_norm_sum, skipped=self.skipped)

    def averages(self) -> dict:
        """train_loss (per token) and grad_norm over the applied steps; nonfinite_skipped if any."""
        row = {}
        if self.steps:
            row.update(train_loss=self.loss_sum / max(self.tokens, 1.0),
                       grad_norm=self.grad_norm_sum / self.steps)
        if self.skipped:
            row["nonfinite_skipped"] = self.skipped
        return row


def _progress_line(done: int, total: int, row: dict, seconds_per_step: float) -> str:
    return (f"step {done}/{total} | loss {row.get('train_loss', float('nan')):.3f} | "
            f"{row['tokens_per_s']:,.0f} tok/s | tf {row['tf_ratio']:.2f} | "
            f"{_duration(row['elapsed_s'])} elapsed, ~{_duration(seconds_per_step * (total - done))} left")


# ----------------------------------------------------------------------------- the loop
class _Signals:
    """Turns SIGINT / SIGTERM into a flag the loop checks after each step.

    A second signal stops at once (KeyboardInterrupt, or SystemExit for SIGTERM) without a
    checkpoint: the last complete one stays loadable. The handler only sets state; printing from
    a signal handler can fail inside a write of the interrupted code.
    """

    def __init__(self):
        self.received = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, _frame):
        if self.received is None:
            self.received = signum
            return
        self.restore()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def init_state(config, model: Seq2Seq) -> TrainState:
    """Fresh parameters (from config.seed) and optimizer state."""
    tx, _ = make_optimizer(config.optimizer, config.num_train_steps)
    length = config.data.bucket_boundaries[0]
    dummy = jnp.ones((1, length), jnp.int32)
    params = model.init(jax.random.PRNGKey(config.seed), dummy, jnp.ones((1,), jnp.int32), dummy,
                        fast_path_only=True)["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) in `workdir`; returns the final dev metrics."""
    # Inputs first: nothing is compiled or written until config, data and workdir are known good.
    configuration.check(config)
    configuration.check_workdir(config, workdir)
    corpus = data.load_corpus(config.data, workdir)  # writes tokenizers only once all files read
    logger.info("seed %d; config:\n%s", config.seed, config)
    logger.info("data: %s", corpus.stats)
    for split in ("train", "dev"):
        if corpus.stats.get(f"{split}_empty_skipped"):
            logger.warning("%s: skipped %d pairs with an empty side (data.on_empty='skip')",
                           split, corpus.stats[f"{split}_empty_skipped"])
    stats = compile_stats()
    started = time.time()

    mesh = parallel.make_mesh()
    try:
        parallel.check_batch_size(config.data.batch_size, mesh, "data.batch_size")
        parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
        batches = data.TrainBatches(corpus.train_src, corpus.train_tgt, batch_size=config.data.batch_size,
                                    boundaries=config.data.bucket_boundaries, seed=config.seed)
    except ValueError as error:
        raise configuration.ConfigError(f"config: {error}") from error
    model = make_model(config.model, corpus.src_tokenizer.vocab_size, corpus.tgt_tokenizer.vocab_size)
    abstract_state = jax.eval_shape(lambda: init_state(config, model))  # shapes only: no compilation
    param_count = sum(x.size for x in jax.tree.leaves(abstract_state.params))
    logger.info("model: %s parameters; %d batches per epoch; batch shapes %s",
                 f"{param_count:,}", batches.batches_per_epoch, batches.shapes)

    store = checkpoints.Checkpoints(workdir, config.keep_checkpoints)
    try:  # raises CheckpointError for a checkpoint of another model shape or vocabulary
        restored = store.restore_latest(abstract_state)
    except BaseException:
        store.close()
        raise
    configuration.save(config, workdir)
    window = Window()
    if restored is None:
        state = init_state(config, model)
    else:
        state, meta = restored
        window = Window(**meta["window"])
        logger.info("resumed from %s at step %d", store.directory, int(state.step))
    start_step = int(state.step)
    log = MetricsLog(workdir, start_step)
    state = jax.device_put(state, parallel.replicated(mesh))

    tf = config.teacher_forcing
    tf_schedule = schedules.make_schedule(tf.schedule, start=tf.start, end=tf.end,
                                          decay_steps=tf.decay_steps, k=tf.k)
    _, learning_rate = make_optimizer(config.optimizer, config.num_train_steps)
    step_fn = jax.jit(
        functools.partial(train_step, model=model, tf_schedule=tf_schedule,
                          fast_path_only=schedules.is_always_one(tf.schedule, tf.start),
                          label_smoothing=config.optimizer.label_smoothing,
                          base_rng=jax.random.PRNGKey(config.seed)),
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
        out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
        donate_argnums=0)
    evaluator = Evaluator(config, corpus, model, mesh)

    def save(step: int, dev_bleu: float | None = None) -> None:
        meta = dict(step=step, data_position=step, epoch=step // batches.batches_per_epoch,
                    window=window.as_dict(), param_shapes=checkpoints.param_shapes(state.params),
                    src_vocab_size=corpus.src_tokenizer.vocab_size,
                    tgt_vocab_size=corpus.tgt_tokenizer.vocab_size)
        store.save(step, state, meta, dev_bleu)

    def check_finite(step: int, m: dict) -> None:
        if bool(m["finite"]):
            return
        last = (f"step {store.good_step} in {store.directory}" if store.good_step is not None
                else f"none yet in {store.directory}")
        loss, grad_norm = float(m["loss_sum"]), float(m["grad_norm"])
        what = (f"loss ({loss})" if not np.isfinite(loss) else
                f"gradient (norm {grad_norm})" if not np.isfinite(grad_norm) else "parameters after the update")
        message = (f"non-finite loss or gradient at step {step + 1} (training batch {step}): {what}; "
                   f"the update was not applied; last good checkpoint: {last}")
        if config.on_nonfinite == "stop":
            raise NonFiniteError(f"{message}; nothing was saved after it. Rerun with "
                                 "--config.on_nonfinite=skip to skip such steps, or lower "
                                 "--config.optimizer.learning_rate")
        logger.warning("%s; skipped (on_nonfinite='skip')", message)

    signals = _Signals()
    clock = dict(time=time.time(), tokens=window.tokens, steps=window.steps + window.skipped)
    dev = {}
    pending = None  # metrics of the previous step, read after the next step is dispatched
    try:
        for step in range(start_step, config.num_train_steps):
            batch = parallel.shard_batch(batches.batch(step), mesh)
            state, step_metrics = step_fn(state, batch)
            if pending is not None:
                check_finite(*pending)
                window.add(pending[1])
            pending = (step, step_metrics)
            done = step + 1
            is_last = done == config.num_train_steps
            boundary = (done % config.log_every_steps == 0 or done % config.eval_every_steps == 0
                        or done % config.checkpoint_every_steps == 0 or is_last or signals.received)
            if not boundary:
                continue
            check_finite(*pending)
            window.add(pending[1])
            pending = None
            if done % config.log_every_steps == 0 or is_last:
                elapsed = time.time() - clock["time"]
                row = dict(window.averages(), tf_ratio=float(step_metrics["tf_ratio"]),
                           learning_rate=float(learning_rate(step)),
                           tokens_per_s=(window.tokens - clock["tokens"]) / max(elapsed, 1e-9),
                           elapsed_s=time.time() - started)
                log.write(done, row)
                steps_timed = max(window.steps + window.skipped - clock["steps"], 1)
                logger.info("%s", _progress_line(done, config.num_train_steps, row, elapsed / steps_timed))
                window = Window()
                clock = dict(time=time.time(), tokens=0.0, steps=0)
            dev_bleu = None
            if done % config.eval_every_steps == 0 or is_last:
                dev = evaluator(state.params)
                dev_bleu = dev["dev_bleu"]
                log.write(done, dev)
                logger.info("eval step %d | %s", done, " | ".join(f"{k} {v:.3f}" for k, v in dev.items()))
                clock["time"] = time.time()  # evaluation time is not training time
            if done % config.checkpoint_every_steps == 0 or is_last or signals.received or dev_bleu is not None:
                save(done, dev_bleu)
            if signals.received:
                interrupted = Interrupted(signals.received, done, store.directory)
                logger.warning("%s", interrupted.message)
                raise interrupted
    finally:
        signals.restore()
        store.close()
        log.close()

    if not dev:  # resumed a finished run
        dev = evaluator(state.params)
    summary = dict(dev, steps=config.num_train_steps, wall_s=time.time() - started,
                   compilations=stats.count, compile_s=stats.seconds,
                   train_step_shapes=len(batches.shapes), parameters=param_count,
                   bleu_signature=evaluator.signature)
    _write_atomic(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
    beam = (f" | beam {config.eval.beam_size} BLEU {dev['dev_bleu_beam']:.2f}"
            if "dev_bleu_beam" in dev else "")
    print(f"final | step {config.num_train_steps} | dev loss {dev['dev_loss']:.3f} | "
          f"dev ppl {dev['dev_ppl']:.1f} | dev BLEU {dev['dev_bleu']:.2f} (greedy){beam} | "
          f"chrF {dev['dev_chrf']:.1f} | {_duration(summary['wall_s'])} | "
          f"{stats.count} compilations, {stats.seconds:.0f}s compiling | sacrebleu {evaluator.signature}",
          flush=True)
    return summary
