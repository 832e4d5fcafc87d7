"""The training loop: `train_and_evaluate(config, workdir)` trains (or resumes) a run in a workdir.

The pure steps live in `steps`, dev evaluation in `evaluation`, the metrics files and progress
line in `logbook`; this module owns the order of things and the Python side: checks, workdir,
checkpoints, signals.

Exact resume: everything a step consumes is a function of (seed, step): the batch is
`TrainBatches.batch(step)`, the dropout / sampling key is `fold_in(PRNGKey(seed), step)`. A
checkpoint therefore needs only the state plus the open logging window to continue bit-identically.
On resume, metrics.jsonl is cut back to the restored step (rows after it are written again) and
TensorBoard hides its events after that step (purge_step).

Failure handling (see tests/test_reliability.py):
- every input (config values, data files, the workdir's config, tokenizers and checkpoints) is
  checked before anything is compiled or written; a run whose trajectory-changing config differs
  from the workdir's is refused; the checkpoint is restored against `jax.eval_shape` of the state;
- one run per workdir: a second run on a held workdir stops at once, naming the holder;
- a run refused by a check leaves no trace: the corpus folder it prepared is removed again;
- a checkpoint records the rows per bucket of its batches: with data.max_tokens they are a multiple
  of the device count, and resuming on a count that plans other rows is refused;
- checkpoints are bound to the tokenizers they were trained with; checkpoints that exist but do
  not load (or were trained with other tokenizers) are refused, never replaced by a fresh start;
- a non-finite loss, gradient or updated parameter is detected inside the jitted step, which then
  keeps the old parameters; the loop stops (NonFiniteError naming the step, what was non-finite
  and the last good checkpoint) or skips the update, per `config.on_nonfinite`;
- a diverging loss stops the run (DivergedError): a training batch whose mean loss per target token
  exceeds DIVERGED_FACTOR x log(target vocabulary size), the loss of a uniform guess;
- SIGINT / SIGTERM: the loop finishes the current step, saves a checkpoint and raises Interrupted
  (a SystemExit whose message says how to resume); a second signal stops at once, without saving;
- a SIGKILL at any moment loses at most the steps since the last complete checkpoint: checkpoints,
  config.json, summary.json and the metrics.jsonl rewrite are all written atomically.

Several processes (config.distributed; train.py joins them): every process runs this same loop on
the same global batches and reads and feeds only its own rows of each (`TrainBatches.batch(n,
rows)`, `parallel.shard_rows`); process 0 alone holds the workdir lock and writes tokenizers, the
tokenized corpus (the others wait for it), config.json, metrics.jsonl, TensorBoard events and
summary.json; every process takes part in saving and restoring the checkpoints (orbax). Dev loss
and dev decoding run on the mesh: each process feeds its rows of each batch, and every process gets
all the hypotheses (identical in all). A signal to any process stops them all after the same step
(each step's votes are combined on the mesh, see `_Loop.run`); when a process dies, the others'
next collective fails (train.py exits with status 3) or JAX's heartbeat ends them
(config.distributed.heartbeat_timeout_s).
"""
import functools
import json
import logging
import math
import os
import shutil
import signal
import time
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from s2s_jax import (checkpoints, compiled, configuration, data, evaluation, files, logbook, parallel, schedules,
                     steps, stopping, trained, warm_start, workdir_lock)
from s2s_jax.models import Seq2Seq, make_model

logger = logging.getLogger(__name__)


# A model no better than a uniform guess loses log(V) nats per target token, where training starts
# and from where it falls. A batch this many times worse (the gold piece given probability V^-10 on
# average) means the run has diverged (an absurd learning rate), not a hard batch.
DIVERGED_FACTOR = 10


class TrainingError(RuntimeError):
    """The run stopped because training went wrong; the last good checkpoint is kept."""


class NonFiniteError(TrainingError):
    """The loss, the gradient or the updated parameters of a step were NaN or infinite."""


class DivergedError(TrainingError):
    """The loss of a step exceeded DIVERGED_FACTOR x log(target vocabulary size)."""


class Interrupted(SystemExit):
    """SIGINT / SIGTERM: a checkpoint was saved. `code` is 128 + the signal number, `message` says
    where the checkpoint is and how to resume."""

    def __init__(self, signum: int, step: int, directory: str):
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name
        self.step = step
        self.message = (f"{self.signal_name}: saved checkpoint step {step} in {directory}; "
                        "rerun the same command to resume from it")


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


class _Inputs(NamedTuple):
    """Everything a run needs that was checked before the first write."""
    corpus: data.Corpus
    batches: data.TrainBatches
    model: Seq2Seq
    mesh: jax.sharding.Mesh
    abstract_state: steps.TrainState  # shapes only
    param_count: int
    eval_sets: list[evaluation.EvalSet]  # dev, then eval.extra_sets
    warm: warm_start.Parent | None  # config.init_from's tokenizers and parameters


def _check_inputs(config, workdir: str) -> _Inputs:
    """Reads and checks config, workdir, data and shapes; compiles and writes nothing."""
    for change in configuration.check_workdir(config, workdir):
        logger.info("config change (does not alter the trajectory): %s", change)
    warm = warm_start.parent(config, workdir) if config.init_from and not trained.has_checkpoints(workdir) else None
    corpus = data.load_corpus(config.data, workdir, writes=jax.process_index() == 0,
                              sync=lambda: parallel.barrier("corpus"), reuse=warm and warm.tokenizers)
    logger.info("data: %s", corpus.stats)
    for split in ("train", "dev"):
        if corpus.stats.get(f"{split}_empty_skipped"):
            logger.warning("%s: skipped %d pairs with an empty side (data.on_empty='skip')",
                           split, corpus.stats[f"{split}_empty_skipped"])
    try:
        parallel.check_distributed(config.distributed)
        parallel.check_processes(config.distributed)
        mesh = parallel.make_mesh()
        micro = config.optimizer.accumulate_steps
        if not config.data.max_tokens:  # else every bucket's rows are a multiple of devices x micro-batches
            parallel.check_batch_size(config.data.batch_size, mesh, "data.batch_size", micro)
        parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
        batches = data.TrainBatches(corpus.train_src, corpus.train_tgt, batch_size=config.data.batch_size,
                                    boundaries=config.data.bucket_boundaries, seed=config.seed,
                                    max_tokens=config.data.max_tokens, row_multiple=mesh.size * micro)
    except ValueError as error:
        raise configuration.ConfigError(f"config: {error}") from error
    eval_sets = evaluation.eval_sets(config.eval, config.data, corpus)
    model = make_model(config.model, corpus.src_tokenizer.vocab_size, corpus.tgt_tokenizer.vocab_size)
    abstract_state = jax.tree.map(  # shapes only, replicated on the mesh: orbax restores onto it
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(mesh)),
        jax.eval_shape(lambda: steps.init_state(model, config.optimizer, config.num_train_steps, config.seed)))
    param_count = sum(x.size for x in jax.tree.leaves(abstract_state.params))
    logger.info("model: %s parameters; %d batches per epoch; batch shapes %s",
                f"{param_count:,}", batches.batches_per_epoch, batches.shapes)
    return _Inputs(corpus, batches, model, mesh, abstract_state, param_count, eval_sets, warm)


def _jit_train_step(config, model: Seq2Seq, mesh) -> compiled.Cached:
    """train_step with the run's static arguments bound, jitted with shardings and donation, its
    executables cached (`s2s_jax.compiled`; the optimizer inside the train state is keyed by the
    config it is made from)."""
    tf = config.teacher_forcing
    optimizer = json.dumps(dict(optimizer=config.optimizer.to_dict(), steps=config.num_train_steps), sort_keys=True)
    return compiled.jit(
        functools.partial(steps.train_step, model=model,
                          tf_schedule=schedules.from_config(tf, config.num_train_steps),
                          fast_path_only=schedules.is_always_one(tf.schedule, tf.start),
                          label_smoothing=config.optimizer.label_smoothing,
                          base_rng=jax.random.PRNGKey(config.seed), tf_mode=tf.mode, tf_passes=tf.passes,
                          accumulate_steps=config.optimizer.accumulate_steps, ema_decay=config.optimizer.ema_decay),
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
        out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
        donate_argnums=0, context=optimizer)


class _Loop:
    """The steps from the restored (or fresh) state to num_train_steps, with the periodic actions:
    a progress row every log_every_steps, dev evaluation every eval_every_steps, a checkpoint every
    checkpoint_every_steps, after each evaluation, at the end and on a signal.

    Step metrics are read one step late (after the next step is dispatched) so the host never
    waits for the device, except at the steps where an action is due.
    """

    def __init__(self, config, inputs: _Inputs, state, window: logbook.Window, store, log, stats,
                 tracker: stopping.Tracker, origin: dict):
        """origin: {"init_from": {"workdir", "step"}} of a warm-started run (kept in every checkpoint), or {}."""
        self.config, self.inputs, self.state, self.window = config, inputs, state, window
        self.store, self.log, self.stats, self.tracker, self.origin = store, log, stats, tracker, origin
        self.train_step = _jit_train_step(config, inputs.model, inputs.mesh)
        self.evaluator = evaluation.Evaluator(config.eval, config.data, inputs.corpus, inputs.model, inputs.mesh,
                                              inputs.eval_sets)
        _, self.learning_rate = steps.make_optimizer(config.optimizer, config.num_train_steps)
        self.started = time.time()
        self._start_clock()
        self.dev: dict = {}

    def _start_clock(self) -> None:
        """Marks the start of a progress window (time, tokens, steps, compile seconds)."""
        self.clock = dict(time=time.time(), tokens=self.window.tokens,
                          steps=self.window.steps + self.window.skipped, compile_s=self.stats.seconds)

    def run(self) -> dict:
        """Trains to the end, or until early stopping stops it; returns the last dev metrics
        (empty if no evaluation ran)."""
        config, total = self.config, self.config.num_train_steps
        if self.tracker.stopped:  # stopped early before it was killed: nothing more to train
            return self.dev
        signals = _Signals()
        batches, mesh = self.inputs.batches, self.inputs.mesh
        # This process reads only these rows of a batch of n rows (one n per bucket).
        rows = functools.cache(lambda n: parallel.process_rows(n, mesh))
        pending = None  # (step, metrics) of the previous step, read after the next is dispatched
        # A signal to any process stops them all after the same step: each step every process
        # votes with the signal it received (0: none); the largest vote is read a step later.
        vote = 0
        try:
            for step in range(int(self.state.step), total):
                size = batches.size(step)
                batch = parallel.shard_rows(batches.batch(step, rows(size)), size, mesh)
                self.state, step_metrics = self.train_step(self.state, batch)
                stop, vote = int(vote), parallel.largest_over_processes(signals.received or 0, mesh)
                if pending is not None:
                    self._account(*pending)
                pending = (step, step_metrics)
                done = step + 1
                is_last = done == total
                log_due = done % config.log_every_steps == 0 or is_last
                eval_due = done % config.eval_every_steps == 0 or is_last
                save_due = done % config.checkpoint_every_steps == 0 or is_last or eval_due or stop
                if not (log_due or save_due):
                    continue
                self._account(*pending)
                pending = None
                if log_due:
                    self._progress(done, float(step_metrics["tf_ratio"]))
                dev = self._evaluate(done) if eval_due else None
                if save_due:
                    self._save(done, dev)
                if stop:
                    interrupted = Interrupted(stop, done, self.store.directory)
                    logger.warning("%s", interrupted.message)
                    raise interrupted
                if self.tracker.stopped:
                    logger.info("step %d: %s", done, self.tracker.stopped)
                    break
        finally:
            signals.restore()
        return self.dev

    def _account(self, step: int, step_metrics: dict) -> None:
        """Adds a step's metrics to the window; stops or warns on a non-finite step, stops on a
        diverging loss."""
        host = jax.device_get(step_metrics)
        if not bool(host["finite"]):
            self._nonfinite(step, host)
        else:
            self._check_divergence(step, host)
        self.window.add(host)

    def _last_good(self) -> str:
        good = self.store.good_step
        return f"step {good} in {self.store.directory}" if good is not None else f"none yet in {self.store.directory}"

    def _check_divergence(self, step: int, m: dict) -> None:
        vocab = self.inputs.corpus.tgt_tokenizer.vocab_size
        bound = DIVERGED_FACTOR * math.log(vocab)
        loss = float(m["loss_sum"]) / max(float(m["tokens"]), 1.0)
        if loss > bound:
            raise DivergedError(
                f"diverging loss at step {step + 1} (training batch {step}): {loss:.4g} per target token, above "
                f"{DIVERGED_FACTOR} x log(target vocabulary {vocab}) = {bound:.1f}; nothing was saved after it; "
                f"last good checkpoint: {self._last_good()}; lower --config.optimizer.learning_rate")

    def _nonfinite(self, step: int, m: dict) -> None:
        loss, grad_norm = float(m["smoothed_loss_sum"]), float(m["grad_norm"])
        what = (f"loss ({loss})" if not np.isfinite(loss) else
                f"gradient (norm {grad_norm})" if not np.isfinite(grad_norm) else
                "parameters after the update (loss and gradient were finite)")
        message = (f"non-finite {what} at step {step + 1} (training batch {step}): "
                   f"the update was not applied; last good checkpoint: {self._last_good()}")
        if self.config.on_nonfinite == "stop":
            raise NonFiniteError(f"{message}; nothing was saved after it. Rerun with "
                                 "--config.on_nonfinite=skip to skip such steps, or lower "
                                 "--config.optimizer.learning_rate")
        logger.warning("%s; skipped (on_nonfinite='skip')", message)

    def _progress(self, done: int, tf_ratio: float) -> None:
        """Writes the window's row and prints the progress line; compilation is not training time."""
        window, clock = self.window, self.clock
        tokens_per_s, seconds_per_step = logbook.window_rates(
            time.time() - clock["time"], self.stats.seconds - clock["compile_s"], window.tokens - clock["tokens"],
            window.steps + window.skipped - clock["steps"])
        learning_rate = float(self.learning_rate(done - 1)) * stopping.plateau_scale(self.state.opt_state)
        row = dict(window.averages(self.config.optimizer.label_smoothing > 0), tf_ratio=tf_ratio,
                   learning_rate=learning_rate, tokens_per_s=tokens_per_s,
                   elapsed_s=time.time() - self.started)
        self.log.write(done, row)
        logger.info("%s", logbook.progress_line(done, self.config.num_train_steps, row, seconds_per_step))
        self.window = logbook.Window()
        self._start_clock()

    def _evaluate(self, done: int) -> dict:
        """Dev (and extra sets') metrics, logged, then early stopping and the plateau decay
        updated; returns the metrics. Its time (and compilations) is not training time."""
        started, compile_s = time.time(), self.stats.seconds
        self.dev = self.evaluator(steps.inference_params(self.state))
        self.log.write(done, self.dev)
        logger.info("eval step %d | %s", done, " | ".join(f"{k} {v:.3f}" for k, v in self.dev.items()))
        opt_state = self.tracker.update(done, self.dev, self.state.opt_state,
                                        put=lambda tree: parallel.replicate(tree, self.inputs.mesh))
        self.state = self.state.replace(opt_state=opt_state)
        self.clock["time"] += time.time() - started
        self.clock["compile_s"] += self.stats.seconds - compile_s
        return self.dev

    def _save(self, done: int, dev: dict | None) -> None:
        corpus = self.inputs.corpus
        meta = dict(step=done, window=self.window.as_dict(), early_stopping=self.tracker.as_dict(), **self.origin,
                    batch_rows=self.inputs.batches.bucket_rows, devices=self.inputs.mesh.size,
                    param_shapes=checkpoints.param_shapes(self.state.params),
                    src_vocab_size=corpus.src_tokenizer.vocab_size, tgt_vocab_size=corpus.tgt_tokenizer.vocab_size)
        self.store.save(done, self.state, meta, dev)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) in `workdir`; returns the run's summary (final dev metrics, timings)."""
    configuration.check(config)
    if jax.process_index():  # process 0 holds the lock for all
        return _train_in(config, workdir)
    with workdir_lock.hold(workdir):
        return _train_in(config, workdir)


def _check_all(config, workdir: str) -> tuple[_Inputs, checkpoints.Checkpoints, tuple | None, object]:
    """Inputs, the open checkpoint store, the checkpoint to resume (None: no checkpoint yet) and,
    for a warm start without one, the parameters to start from (else None). A refused run removes
    the corpus folder it prepared: it leaves no trace in the workdir."""
    corpus_dir = os.path.join(workdir, "corpus")
    created = jax.process_index() == 0 and not os.path.exists(corpus_dir)
    try:
        inputs = _check_inputs(config, workdir)
        logger.info("seed %d; config:\n%s", config.seed, config)
        tokenizers = checkpoints.tokenizers_fingerprint(inputs.corpus.src_tokenizer, inputs.corpus.tgt_tokenizer)
        store = checkpoints.Checkpoints(workdir, config.keep_checkpoints, tokenizers=tokenizers,
                                        best_metric=config.eval.best_metric)
        try:  # CheckpointError: none loads, or made for another model shape, vocabulary or tokenizers
            restored = store.restore_latest(inputs.abstract_state)
            start = None
            if restored is not None:
                _check_batch_rows(restored[1], inputs, config.data.max_tokens, store.directory)
            elif inputs.warm is not None:
                start = warm_start.start_params(inputs.warm, inputs.abstract_state.params)
            return inputs, store, restored, start
        except BaseException:
            store.close()
            raise
    except Exception:  # a refusal; an interrupted preparation is kept: the next run resumes it
        if created:
            shutil.rmtree(corpus_dir, ignore_errors=True)
        raise


def _check_batch_rows(meta: dict, inputs: _Inputs, max_tokens: int, directory: str) -> None:
    """ConfigError unless the checkpoint (`meta`) was trained on batches of the rows this run
    plans per bucket: with data.max_tokens they depend on the device count. Checkpoints of
    older versions record none."""
    if "batch_rows" not in meta or meta["batch_rows"] == inputs.batches.bucket_rows:
        return
    raise configuration.ConfigError(
        f"{directory}: step {meta['step']} was trained on batches of {meta['batch_rows']} rows (buckets "
        f"{inputs.batches.boundaries}) over {meta['devices']} devices; data.max_tokens={max_tokens} "
        f"gives {inputs.batches.bucket_rows} over this run's {inputs.mesh.size} (rows are a multiple of the "
        f"device count times optimizer.accumulate_steps): resume on {meta['devices']} devices or use a new --workdir")


def _starting_state(config, inputs, restored, start, directory: str):
    """(train state on the mesh, throughput window, checkpoint metadata) to start from: the restored
    checkpoint, else fresh from the seed (warm start: `start`'s parameters, a fresh optimizer and step)."""
    if restored is not None:  # on the mesh already
        state, meta = restored
        logger.info("resumed from %s at step %d", directory, int(state.step))
        return state, logbook.Window(**meta["window"]), meta
    fresh = steps.init_state(inputs.model, config.optimizer, config.num_train_steps, config.seed)
    if start is not None:
        fresh = fresh.replace(params=start)
    return parallel.replicate(fresh, inputs.mesh), logbook.Window(), {}


def _train_in(config, workdir: str) -> dict:
    stats = logbook.CompileStats()
    started = time.time()
    inputs, store, restored, start = _check_all(config, workdir)
    try:
        store.prune()  # what a kill after the last save left to delete
        # Every check has passed: from here on the run writes (process 0; all write checkpoints).
        writer = jax.process_index() == 0
        if writer:
            data.save_tokenizers(inputs.corpus, workdir)
            configuration.save(config, workdir)
        state, window, meta = _starting_state(config, inputs, restored, start, store.directory)
        tracker = stopping.Tracker(config.early_stopping, config.optimizer, meta.get("early_stopping"))
        origin = _origin(inputs.warm, meta)
        done = int(state.step) >= config.num_train_steps or tracker.stopped is not None
        summary = _finished_summary(workdir, int(state.step), done)
        if summary is not None:  # a finished run: nothing to redo
            if writer:
                print(_final_line(summary, config), flush=True)
            return summary
        log = logbook.MetricsLog(workdir, int(state.step))
        try:
            loop = _Loop(config, inputs, state, window, store, log, stats, tracker, origin)
            dev = loop.run() or loop.evaluator(steps.inference_params(loop.state))  # finished, no summary
        finally:
            log.close()
        best_step = store.best_step()
    finally:
        store.close()
    summary = dict(dev, steps=int(loop.state.step), wall_s=time.time() - started,
                   compilations=stats.count, compile_s=stats.seconds,
                   train_step_shapes=len(inputs.batches.shapes), parameters=inputs.param_count,
                   bleu_signature=loop.evaluator.signature,
                   stopped=tracker.stopped or f"reached num_train_steps ({config.num_train_steps})",
                   best_step=best_step, best_metric=config.eval.best_metric, early_stopping=tracker.as_dict(),
                   **origin, **_kept_evaluations(workdir))
    if writer:
        files.write_json(os.path.join(workdir, "summary.json"), summary)
        print(_final_line(summary, config), flush=True)
    return summary


def _finished_summary(workdir: str, step: int, done: bool) -> dict | None:
    """summary.json when the run is `done` (at the end, or stopped early) at the restored `step`
    and the summary is of that step."""
    path = os.path.join(workdir, "summary.json")
    if not done or not os.path.exists(path):
        return None
    summary = files.read_json(path)
    return summary if summary.get("steps") == step else None


def _origin(warm: warm_start.Parent | None, meta: dict) -> dict:
    """{"init_from": {"workdir", "step"}} of a warm-started run: from the parent now, or from the
    restored checkpoint's meta; {} for a run that started from scratch."""
    if warm is not None:
        return {"init_from": dict(workdir=os.path.abspath(warm.workdir), step=warm.step)}
    return {"init_from": meta["init_from"]} if "init_from" in meta else {}


def _kept_evaluations(workdir: str) -> dict:
    """The `evaluations` that `python -m s2s_jax.evaluate` recorded in summary.json (kept when a
    resumed run rewrites it)."""
    path = os.path.join(workdir, "summary.json")
    if not os.path.exists(path):
        return {}
    summary = files.read_json(path)
    return {"evaluations": summary["evaluations"]} if isinstance(summary, dict) and "evaluations" in summary else {}


def _final_line(summary: dict, config) -> str:
    beam = (f" | beam {config.eval.beam_size} BLEU {summary['dev_bleu_beam']:.2f}"
            if "dev_bleu_beam" in summary else "")
    return (f"final | step {summary['steps']} | dev loss {summary['dev_loss']:.3f} | "
            f"dev ppl {summary['dev_ppl']:.1f} | dev BLEU {summary['dev_bleu']:.2f} (greedy){beam} | "
            f"chrF {summary['dev_chrf']:.1f} | {logbook.duration(summary['wall_s'])} | "
            f"{summary['compilations']} compilations, {summary['compile_s']:.0f}s compiling | "
            f"sacrebleu {summary['bleu_signature']}{_stop_and_best(summary)}")


def _stop_and_best(summary: dict) -> str:
    """ " | why it stopped | best checkpoint: step N by metric" (summaries of older versions: "")."""
    if "stopped" not in summary:
        return ""
    best = (f"step {summary['best_step']} by {summary['best_metric']}" if summary["best_step"] is not None
            else "none (no evaluated checkpoint)")
    return f" | {summary['stopped']} | best checkpoint: {best}"
