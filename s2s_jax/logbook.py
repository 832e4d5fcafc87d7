"""What a run records: metrics.jsonl + TensorBoard events, the window of training metrics between
two progress lines, the progress line itself, and XLA compilation counts."""
import json
import logging
import os

import jax

from s2s_jax import compiled, files

logger = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


# ----------------------------------------------------------------------------- compilations
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_COMPILED = {"count": 0, "seconds": 0.0}  # process-wide totals, fed by one jax.monitoring listener
_LISTENING = False


def _listen(event: str, duration_s: float, **_) -> None:
    if event in _COMPILE_EVENTS or event == compiled.LOAD_EVENT:
        _COMPILED["seconds"] += duration_s
        _COMPILED["count"] += event == _COMPILE_EVENTS[-1]


class CompileStats:
    """XLA compilations (count) and tracing + lowering + compile seconds since this object was made,
    plus the seconds spent loading executables from the cache of compiled functions (`compiled`)."""

    def __init__(self):
        global _LISTENING
        if not _LISTENING:
            jax.monitoring.register_event_duration_secs_listener(_listen)
            _LISTENING = True
        self._start = dict(_COMPILED)

    @property
    def count(self) -> int:
        return _COMPILED["count"] - self._start["count"]

    @property
    def seconds(self) -> float:
        return _COMPILED["seconds"] - self._start["seconds"]


# ----------------------------------------------------------------------------- metrics files
class MetricsLog:
    """metrics.jsonl (one JSON object per line, each with `step`) plus TensorBoard events under tb/.

    Opening it for a run that resumes at `resume_step` cuts metrics.jsonl back to that step (rows
    after it are written again) and hides TensorBoard events after it (purge_step), also when the
    run restarts from step 0.

    One writer: in a run of several processes only process 0's log writes; the others' do nothing.
    """

    def __init__(self, workdir: str, resume_step: int):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.writer = None
        if jax.process_index():
            return
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
                if row["step"] <= resume_step:
                    rows.append(line)
        files.write_atomic(self.path, "".join(rows))
        from tensorboardX import SummaryWriter
        # One event file per run start (tensorboardX names files by the second: a restart within
        # the same second would truncate the previous file); names sort by resume step.
        self.writer = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1,
                                    filename_suffix=f".from{resume_step:09d}.{os.getpid()}")

    def write(self, step: int, values: dict) -> None:
        if self.writer is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------- the window
class Window:
    """Training metrics summed between two progress lines (saved in checkpoints).

    `steps` counts applied updates; `skipped` the non-finite steps skipped (on_nonfinite="skip"),
    whose losses and gradient norm are left out of the sums.
    """

    def __init__(self, loss_sum=0.0, tokens=0.0, steps=0, grad_norm_sum=0.0, skipped=0, smoothed_loss_sum=0.0):
        self.loss_sum, self.smoothed_loss_sum, self.tokens = loss_sum, smoothed_loss_sum, tokens
        self.steps, self.grad_norm_sum, self.skipped = steps, grad_norm_sum, skipped

    def add(self, m: dict) -> None:
        """Adds one step's host metrics (train_step's output)."""
        if not bool(m["finite"]):
            self.skipped += 1
            return
        self.loss_sum += float(m["loss_sum"])
        self.smoothed_loss_sum += float(m["smoothed_loss_sum"])
        self.tokens += float(m["tokens"])
        self.grad_norm_sum += float(m["grad_norm"])
        self.steps += 1

    def as_dict(self) -> dict:
        return dict(loss_sum=self.loss_sum, smoothed_loss_sum=self.smoothed_loss_sum, tokens=self.tokens,
                    steps=self.steps, grad_norm_sum=self.grad_norm_sum, skipped=self.skipped)

    def averages(self, smoothing: bool) -> dict:
        """train_loss (plain NLL per token), train_loss_smoothed (the objective, when smoothing),
        grad_norm over the applied steps; nonfinite_skipped if any."""
        row = {}
        if self.steps:
            tokens = max(self.tokens, 1.0)
            row["train_loss"] = self.loss_sum / tokens
            if smoothing:
                row["train_loss_smoothed"] = self.smoothed_loss_sum / tokens
            row["grad_norm"] = self.grad_norm_sum / self.steps
        if self.skipped:
            row["nonfinite_skipped"] = self.skipped
        return row


def window_rates(wall_s: float, compile_s: float, tokens: float, steps: int) -> tuple[float, float]:
    """(tokens per second, seconds per step) of a progress window whose `wall_s` seconds include
    `compile_s` of compilation: compilation is not training time (the first window of a run
    would otherwise predict its remaining time from compile-bound steps)."""
    train_s = max(wall_s - compile_s, 1e-9)
    return tokens / train_s, train_s / max(steps, 1)


def progress_line(done: int, total: int, row: dict, seconds_per_step: float) -> str:
    """`step 50/3500 | loss 5.123 | 8,010 tok/s | tf 1.00 | 0m40s elapsed, ~7m10s left`."""
    return (f"step {done}/{total} | loss {row.get('train_loss', float('nan')):.3f} | "
            f"{row['tokens_per_s']:,.0f} tok/s | tf {row['tf_ratio']:.2f} | "
            f"{duration(row['elapsed_s'])} elapsed, ~{duration(seconds_per_step * (total - done))} left")
