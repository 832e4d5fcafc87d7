"""metrics.jsonl and TensorBoard events as a reader sees them, across restarts and resumes.

The TensorBoard reference is an independent reader of the event files (TFRecord framing, Event
protos) that applies TensorBoard's purge rule: a SessionLog START at step s hides every event of
earlier files at step >= s.
"""
import json
import os
import struct

from tensorboardX.proto import event_pb2

from s2s_jax import logbook


def tensorboard_view(tb_dir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} as TensorBoard would show it."""
    scalars: dict[str, dict[int, float]] = {}
    for name in sorted(os.listdir(tb_dir)):
        with open(os.path.join(tb_dir, name), "rb") as f:
            blob = f.read()
        offset = 0
        while offset < len(blob):
            (length,) = struct.unpack_from("<Q", blob, offset)
            payload = blob[offset + 12: offset + 12 + length]  # after length and its crc
            offset += 12 + length + 4                           # payload crc
            event = event_pb2.Event.FromString(payload)
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                for values in scalars.values():
                    for step in [s for s in values if s >= event.step]:
                        del values[step]
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def read_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write(workdir, resume_step, rows):
    log = logbook.MetricsLog(workdir, resume_step)
    for step, value in rows:
        log.write(step, {"train_loss": value})
    log.close()


def test_a_run_restarted_before_its_first_checkpoint_hides_its_old_events(tmp_path):
    workdir = str(tmp_path)
    write(workdir, 0, [(10, 5.0), (20, 4.0)])    # killed before any checkpoint
    write(workdir, 0, [(10, 6.0)])               # restarts from step 0 (same second, too)
    assert tensorboard_view(os.path.join(workdir, "tb")) == {"train_loss": {10: 6.0}}
    assert read_rows(workdir) == [{"step": 10, "train_loss": 6.0}]


def test_resume_cuts_both_logs_back_to_the_restored_step(tmp_path):
    workdir = str(tmp_path)
    write(workdir, 0, [(10, 5.0), (20, 4.0), (30, 3.0)])
    with open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write('{"step": 40, "train_lo')        # torn last line of a killed run
    write(workdir, 20, [(30, 2.5), (40, 2.0)])   # resumed from the step-20 checkpoint
    assert tensorboard_view(os.path.join(workdir, "tb")) == {"train_loss": {10: 5.0, 20: 4.0, 30: 2.5, 40: 2.0}}
    assert [(r["step"], r["train_loss"]) for r in read_rows(workdir)] == [(10, 5.0), (20, 4.0), (30, 2.5), (40, 2.0)]


def test_window_averages_report_plain_nll_and_smoothed_loss_apart():
    window = logbook.Window()
    window.add(dict(finite=True, loss_sum=6.0, smoothed_loss_sum=9.0, tokens=3.0, grad_norm=1.0))
    window.add(dict(finite=False, loss_sum=float("nan"), smoothed_loss_sum=float("nan"), tokens=3.0,
                    grad_norm=float("nan")))
    window.add(dict(finite=True, loss_sum=2.0, smoothed_loss_sum=3.0, tokens=1.0, grad_norm=3.0))
    assert window.averages(smoothing=True) == dict(train_loss=2.0, train_loss_smoothed=3.0, grad_norm=2.0,
                                                   nonfinite_skipped=1)
    assert "train_loss_smoothed" not in window.averages(smoothing=False)
    assert logbook.Window(**window.as_dict()).as_dict() == window.as_dict()  # round trip via checkpoints


def test_progress_rates_leave_compilation_out():
    """A first window of 10 s, 8 of them compiling, 2 steps of 50 tokens: the ETA is built on 1 s
    per step (the 8-minute demo once predicted 27 minutes from its first line)."""
    tokens_per_s, seconds_per_step = logbook.window_rates(10.0, 8.0, 100.0, 2)
    assert (tokens_per_s, seconds_per_step) == (50.0, 1.0)
    line = logbook.progress_line(2, 482, dict(train_loss=5.0, tokens_per_s=tokens_per_s, tf_ratio=1.0,
                                              elapsed_s=10.0), seconds_per_step)
    assert line.endswith("0m10s elapsed, ~8m00s left")
