"""Config ranges (configuration.check), resuming a workdir with changed settings
(configuration.check_workdir), the workdir lock and train.py's help. Fast: no training."""
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from configs import default, demo, gpu, tiny
from s2s_jax import configuration, schedules, workdir_lock
from s2s_jax.configuration import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _set(config, key, value):
    *groups, name = key.split(".")
    node = config
    for group in groups:
        node = node[group]
    node[name] = value
    return config


def _refused(config, match):
    with pytest.raises(ConfigError) as info:
        configuration.check(config)
    message = str(info.value)
    assert "\n" not in message
    assert re.fullmatch(match, message), message


# ----------------------------------------------------------------------------- ranges
@pytest.mark.parametrize("module", [default, demo, gpu, tiny], ids=lambda m: m.__name__)
def test_shipped_configs_pass(module):
    configuration.check(module.get_config())


@pytest.mark.parametrize("module, vocab, parameters", [(default, 8000, 6_532_416), (gpu, 8000, 42_620_736)],
                         ids=["default", "gpu"])
def test_config_builds_the_model_its_docstring_states(module, vocab, parameters):
    """Shapes only (jax.eval_shape): the parameter count each config's docstring states."""
    import jax
    from s2s_jax import steps
    from s2s_jax.models import make_model
    config = module.get_config()
    state = jax.eval_shape(lambda: steps.init_state(make_model(config.model, vocab, vocab), config.optimizer, config.num_train_steps, config.seed))
    assert sum(x.size for x in jax.tree.leaves(state.params)) == parameters
    assert f"{parameters:,}" in module.__doc__


def test_every_numeric_key_of_default_has_a_range():
    flat = configuration._flatten(default.get_config())
    numeric = {key for key, value in flat.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    assert numeric == set(configuration.RANGES)


@pytest.mark.parametrize("key, value, requirement", [
    # The four that passed before.
    ("optimizer.label_smoothing", 1.5, "must lie in [0, 1)"),
    ("optimizer.learning_rate", -1.0, "must lie in (0, 10]"),
    ("optimizer.b2", 2.0, "must lie in [0, 1)"),
    ("optimizer.clip_norm", -3.0, "must be >= 0"),
    ("optimizer.learning_rate", 0.0, "must lie in (0, 10]"),
    ("optimizer.learning_rate", float("nan"), "must lie in (0, 10]"),
    ("optimizer.learning_rate", 1e9, "must lie in (0, 10]"),  # trained to rc 0 with dev loss 2e10
    ("optimizer.b1", 1.0, "must lie in [0, 1)"),
    ("optimizer.b1", -0.1, "must lie in [0, 1)"),
    ("optimizer.label_smoothing", -0.5, "must lie in [0, 1)"),
    ("optimizer.warmup_steps", -1, "must be an integer >= 0"),
    ("model.dropout", 1.0, "must lie in [0, 1)"),
    ("model.dropout", -0.1, "must lie in [0, 1)"),
    ("eval.alpha", -0.6, "must be >= 0"),
    ("eval.alpha", float("inf"), "must be >= 0"),
    ("teacher_forcing.start", 1.5, "must lie in [0, 1]"),
    ("teacher_forcing.end", -0.1, "must lie in [0, 1]"),
    ("teacher_forcing.k", -2.0, "must be >= 0"),
    ("teacher_forcing.decay_steps", 0, "must be a positive integer"),
    ("seed", -1, "must be an integer >= 0"),
    ("num_train_steps", 0, "must be a positive integer"),
    ("log_every_steps", 0, "must be a positive integer"),
    ("eval_every_steps", -5, "must be a positive integer"),
    ("checkpoint_every_steps", 0, "must be a positive integer"),
    ("keep_checkpoints", 0, "must be a positive integer"),
    ("data.vocab_size", 5, "must be an integer >= 6"),
    ("data.max_len", 0, "must be a positive integer"),
    ("data.batch_size", 0, "must be a positive integer"),
    ("data.max_train_pairs", -1, "must be an integer >= 0"),
    ("data.max_dev_pairs", -1, "must be an integer >= 0"),
    ("data.synthetic_vocab_size", 3, "must be an integer >= 5"),
    ("data.synthetic_vocab_size", 4, "must be an integer >= 5"),
    ("data.synthetic_min_len", 0, "must be a positive integer"),
    ("data.synthetic_max_len", 0, "must be a positive integer"),
    ("data.synthetic_train_size", 0, "must be a positive integer"),
    ("data.synthetic_dev_size", 0, "must be a positive integer"),
    ("data.synthetic_seed", -1, "must be an integer >= 0"),
    ("model.embed_dim", 0, "must be a positive integer"),
    ("model.encoder_hidden", 0, "must be a positive integer"),
    ("model.encoder_layers", 0, "must be a positive integer"),
    ("model.decoder_hidden", 0, "must be a positive integer"),
    ("model.decoder_layers", 0, "must be a positive integer"),
    ("model.attention_dim", 0, "must be a positive integer"),
    ("eval.batch_size", 0, "must be a positive integer"),
    ("eval.max_decode_len", 0, "must be a positive integer"),
    ("eval.beam_size", 0, "must be a positive integer"),
])
def test_out_of_range_value_names_the_key_and_the_range(key, value, requirement):
    _refused(_set(tiny.get_config(), key, value), re.escape(f"config: {key}={value!r} {requirement}"))


@pytest.mark.parametrize("key, value", [("data.batch_size", True), ("data.batch_size", 2.5),
                                        ("optimizer.learning_rate", "fast")])
def test_wrong_type_names_the_key(key, value):
    config = tiny.get_config()
    config.unlock()
    with config.ignore_type():
        _set(config, key, value)
    _refused(config, re.escape(f"config: {key}={value!r} must ") + ".*")


def test_values_on_the_bounds_pass():
    config = tiny.get_config()
    for key, value in [("optimizer.b1", 0.0), ("optimizer.clip_norm", 0.0), ("optimizer.label_smoothing", 0.0),
                       ("teacher_forcing.start", 1.0), ("teacher_forcing.end", 0.0), ("eval.alpha", 0.0),
                       ("data.synthetic_vocab_size", 5), ("data.vocab_size", 6), ("seed", 0)]:
        _set(config, key, value)
    configuration.check(config)


@pytest.mark.parametrize("key", ["data.bucket_boundaries", "eval.decode_buckets"])
@pytest.mark.parametrize("boundaries", [(), (12, 8), (8, 8, 12), (1, 12), (8, 11), (8.5, 12), (8, "12")])
def test_bad_bucket_boundaries(key, boundaries):
    """eval.decode_buckets follows data.bucket_boundaries' rule, but () means the training buckets."""
    config = tiny.get_config()  # max_len 11: the last boundary must be >= 12
    config.unlock()
    group, name = key.split(".")
    with config.ignore_type():
        config[group][name] = boundaries
    if key == "eval.decode_buckets" and boundaries == ():
        configuration.check(config)
        return
    _refused(config, re.escape(f"config: {key}={boundaries!r} must be a non-empty, strictly "
                               "increasing sequence of integers >= 2 ending at >= data.max_len + 1 = 12 "
                               "(room for EOS)"))


def test_synthetic_min_len_above_max_len():
    config = tiny.get_config()
    config.data.synthetic_min_len = 11
    _refused(config, re.escape("config: data.synthetic_min_len=11 must be <= data.synthetic_max_len=10"))


@pytest.mark.parametrize("schedule, k, requirement", [
    ("exponential", 1.0, "must lie in (0, 1)"),
    ("exponential", 1.5, "must lie in (0, 1)"),
    ("inverse_sigmoid", 0.5, "must be >= 1"),
])
def test_k_out_of_its_schedules_range(schedule, k, requirement):
    config = tiny.get_config()
    config.teacher_forcing.schedule, config.teacher_forcing.k = schedule, k
    _refused(config, re.escape(f"config: teacher_forcing.k={k!r} {requirement} (or be 0.0: sized to the run) "
                               f"for the {schedule} schedule"))


@pytest.mark.parametrize("schedule, k", [("exponential", 0.0), ("exponential", 0.99), ("inverse_sigmoid", 0.0),
                                         ("inverse_sigmoid", 500.0), ("linear", 123.0), ("constant", 0.5)])
def test_k_in_range_or_auto_passes(schedule, k):
    config = tiny.get_config()
    config.teacher_forcing.schedule, config.teacher_forcing.k = schedule, k
    configuration.check(config)


def test_unknown_nested_key_and_missing_key():
    config = tiny.get_config()
    config.optimizer.learnig_rate = 1e-3
    _refused(config, re.escape("config: unknown key optimizer.learnig_rate ") + ".*configs/default.py.*")
    config = tiny.get_config()
    del config.data["max_len"]
    _refused(config, re.escape("config: missing key data.max_len"))


def test_k_override_on_the_command_line():
    """An auto k (0.0, a float field) takes --config.teacher_forcing.k=500 and =0.5 overrides."""
    for text, expected in (("500", 500.0), ("0.5", 0.5)):
        argv = ["train.py", f"--config={REPO}/configs/default.py", f"--config.teacher_forcing.k={text}"]
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
        values(argv)
        assert values.config.teacher_forcing.k == expected


# ----------------------------------------------------------------------------- auto k
def test_auto_k_starts_near_start_and_is_halfway_at_half_the_run():
    for module in (default, tiny):
        config = module.get_config()
        config.teacher_forcing.update(schedule="inverse_sigmoid", start=0.9, end=0.1, k=0.0)
        ratio = schedules.from_config(config.teacher_forcing, config.num_train_steps)
        assert float(ratio(0)) == pytest.approx(0.9, abs=0.02)
        assert float(ratio(config.num_train_steps // 2)) == pytest.approx(0.5, abs=1e-4)
        assert float(ratio(config.num_train_steps)) < 0.2


# ----------------------------------------------------------------------------- load
def _hand_edited(tmp_path, edit) -> str:
    """A workdir whose config.json is `edit(tiny's config as a JSON dict)`."""
    workdir = _saved(tmp_path, tiny.get_config())
    path = os.path.join(workdir, "config.json")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(edit(saved), f)
    return workdir


@pytest.mark.parametrize("edit, key", [
    (lambda c: [1, 2, 3], "not a config"),
    (lambda c: None, "not a config"),
    (lambda c: {**c, "data": {**c["data"], "bucket_boundaries": []}}, "data.bucket_boundaries"),
    (lambda c: {k: v for k, v in c.items() if k != "eval"}, "missing key eval."),
    (lambda c: {**c, "data": {**c["data"], "max_len": -1}}, "data.max_len=-1"),
], ids=["list", "null", "no buckets", "no eval group", "negative max_len"])
def test_load_checks_a_hand_edited_config(tmp_path, edit, key):
    workdir = _hand_edited(tmp_path, edit)
    path = os.path.join(workdir, "config.json")
    with pytest.raises(ConfigError) as info:
        configuration.load(workdir)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and key in message and "\n" not in message, message


@pytest.mark.parametrize("edit", [lambda c: [1, 2, 3], lambda c: None], ids=["list", "null"])
def test_check_workdir_refuses_a_config_json_that_is_not_an_object(tmp_path, edit):
    workdir = _hand_edited(tmp_path, edit)
    with pytest.raises(ConfigError, match=re.escape(os.path.join(workdir, "config.json")) + ": not a config"):
        configuration.check_workdir(tiny.get_config(), workdir)


# What a config.json written before these keys existed lacks (git log -S'<key>' -- configs/default.py).
LATER_KEYS = ("data.spm_sample_size", "model.init_scale", "model.output_chunk", "teacher_forcing.mode",
              "teacher_forcing.passes", "eval.max_len_a", "eval.max_len_b")


def _as_older_version(saved: dict) -> dict:
    for key in LATER_KEYS:
        group, name = key.split(".")
        del saved[group][name]
    del saved["distributed"]
    return saved


def test_a_config_json_of_an_older_version_loads_with_the_later_keys_at_their_older_values(tmp_path):
    workdir = _hand_edited(tmp_path, _as_older_version)
    config = configuration.load(workdir)
    assert (config.data.spm_sample_size, config.model.init_scale, config.model.output_chunk) == (1_000_000, 0.0, 0)
    assert (config.teacher_forcing.mode, config.teacher_forcing.passes) == ("sequential", 1)
    assert (config.eval.max_len_a, config.eval.max_len_b) == (2.0, 10)
    assert config.distributed.to_dict() == dict(coordinator_address="", num_processes=1, process_id=0,
                                                heartbeat_timeout_s=30, init_timeout_s=45)
    assert configuration.check_workdir(config, workdir) == []
    # The older value is what a resumed run is compared with.
    with pytest.raises(ConfigError, match=re.escape("(model.output_chunk: 0 → 512)")):
        configuration.check_workdir(tiny.get_config(), workdir)


def test_load_returns_the_saved_config(tmp_path):
    config = tiny.get_config()
    assert configuration.to_json(configuration.load(_saved(tmp_path, config))) == configuration.to_json(config)


# ----------------------------------------------------------------------------- check_workdir
def _saved(tmp_path, config):
    workdir = str(tmp_path / "w")
    configuration.save(config, workdir)
    return workdir


def test_fresh_workdir_has_nothing_to_compare(tmp_path):
    assert configuration.check_workdir(tiny.get_config(), str(tmp_path / "new")) == []


def test_trajectory_changes_are_refused_naming_each_key(tmp_path):
    workdir = _saved(tmp_path, tiny.get_config())
    config = tiny.get_config()
    config.seed = 7
    config.data.batch_size = 16
    config.data.bucket_boundaries = (12,)
    config.optimizer.learning_rate = 1e-3
    config.log_every_steps = 10  # free: not named
    with pytest.raises(ConfigError) as info:
        configuration.check_workdir(config, workdir)
    assert str(info.value) == (
        f"{workdir}/config.json: this workdir was trained with other settings, and resuming would continue "
        "on another trajectory (data.batch_size: 32 → 16; data.bucket_boundaries: [8, 12] → [12]; "
        "optimizer.learning_rate: 0.002 → 0.001; seed: 42 → 7); restore the old values or use a new --workdir")


@pytest.mark.parametrize("key, value", [
    ("data.max_len", 10), ("data.synthetic_train_size", 100), ("data.synthetic_seed", 1),
    ("optimizer.b2", 0.98), ("optimizer.clip_norm", 0.0), ("optimizer.decay", "rsqrt"),
    ("optimizer.warmup_steps", 10), ("optimizer.label_smoothing", 0.1), ("model.dropout", 0.1),
    ("model.dtype", "bfloat16"), ("model.reverse_source", True), ("teacher_forcing.schedule", "linear"),
    ("teacher_forcing.start", 0.9),
])
def test_each_trajectory_key_is_refused(tmp_path, key, value):
    workdir = _saved(tmp_path, tiny.get_config())
    with pytest.raises(ConfigError, match=re.escape(f"({key}: ")):
        configuration.check_workdir(_set(tiny.get_config(), key, value), workdir)


def test_free_changes_are_returned(tmp_path):
    workdir = _saved(tmp_path, tiny.get_config())
    config = tiny.get_config()
    config.num_train_steps = 600  # free: constant learning rate and teacher forcing
    config.log_every_steps = 10
    config.eval_every_steps = 100
    config.checkpoint_every_steps = 50
    config.keep_checkpoints = 3
    config.on_nonfinite = "skip"
    config.eval.search = "beam"
    config.eval.alpha = 1.0
    config.data.train_prefix = "elsewhere/train"  # unused by a synthetic task: not even reported
    config.teacher_forcing.k = 5.0  # unused by the constant schedule
    assert configuration.check_workdir(config, workdir) == [
        "checkpoint_every_steps: 100 → 50", "eval.alpha: 0.6 → 1.0", "eval.search: 'greedy' → 'beam'",
        "eval_every_steps: 300 → 100", "keep_checkpoints: 2 → 3", "log_every_steps: 50 → 10",
        "num_train_steps: 300 → 600", "on_nonfinite: 'stop' → 'skip'"]


@pytest.mark.parametrize("changes, free", [
    ({"optimizer.decay": "cosine"}, False),  # the cosine decay ends at num_train_steps
    ({"optimizer.decay": "rsqrt"}, True),
    ({"optimizer.decay": "wsd"}, False),  # the cooldown ends at num_train_steps
    ({"teacher_forcing.schedule": "inverse_sigmoid"}, False),  # auto k is sized to num_train_steps
    ({"teacher_forcing.schedule": "exponential"}, False),
    ({"teacher_forcing.schedule": "inverse_sigmoid", "teacher_forcing.k": 50.0}, True),
    ({"teacher_forcing.schedule": "exponential", "teacher_forcing.k": 0.99}, True),
    ({"teacher_forcing.schedule": "linear"}, True),
])
def test_num_train_steps_is_free_unless_the_trajectory_depends_on_it(tmp_path, changes, free):
    def make(num_train_steps):
        config = tiny.get_config()
        config.num_train_steps = num_train_steps
        for key, value in changes.items():
            _set(config, key, value)
        return config

    workdir = _saved(tmp_path, make(300))
    if free:
        assert configuration.check_workdir(make(600), workdir) == ["num_train_steps: 300 → 600"]
    else:
        with pytest.raises(ConfigError, match=re.escape("(num_train_steps: 300 → 600)")):
            configuration.check_workdir(make(600), workdir)


def test_a_key_the_workdir_does_not_have_is_refused(tmp_path):
    workdir = _saved(tmp_path, tiny.get_config())
    path = os.path.join(workdir, "config.json")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    del saved["optimizer"]["b1"]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(saved, f)
    with pytest.raises(ConfigError, match=re.escape("(optimizer.b1: absent → 0.9)")):
        configuration.check_workdir(tiny.get_config(), workdir)


def test_shape_change_keeps_its_own_message(tmp_path):
    workdir = _saved(tmp_path, tiny.get_config())
    config = tiny.get_config()
    config.model.embed_dim = 48
    config.seed = 1
    with pytest.raises(ConfigError, match=re.escape("another model shape or vocabulary (model.embed_dim: 32 "
                                                    "there, 48 here); use a new --workdir")):
        configuration.check_workdir(config, workdir)


# ----------------------------------------------------------------------------- workdir lock
HOLD = """
import sys, time
from s2s_jax import workdir_lock
try:
    with workdir_lock.hold(sys.argv[1]):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
except workdir_lock.WorkdirBusy as error:
    print(f"error: {error}", flush=True)
    sys.exit(2)
"""


def _holder(workdir, seconds):
    return subprocess.Popen([sys.executable, "-c", HOLD, workdir, str(seconds)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_second_run_fails_at_once_naming_the_holder(tmp_path):
    workdir = str(tmp_path / "w")
    with workdir_lock.hold(workdir):
        second = _holder(workdir, 0)
        stdout, stderr = second.communicate(timeout=60)
    assert second.returncode == 2, stderr
    assert stdout == (f"error: {workdir}: in use by another run (pid {os.getpid()} on host "
                      f"{socket.gethostname()}); wait for it to end or use another --workdir\n")
    assert not os.path.exists(workdir)  # made by hold(), removed on release: nothing left


def test_lock_of_a_killed_holder_can_be_taken(tmp_path):
    workdir = str(tmp_path / "w")
    holder = _holder(workdir, 600)
    try:
        assert holder.stdout.readline() == "held\n"
        busy = re.escape(f"(pid {holder.pid} on host {socket.gethostname()})")
        with pytest.raises(workdir_lock.WorkdirBusy, match=busy), workdir_lock.hold(workdir):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    assert os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))  # left behind, but not locked
    with workdir_lock.hold(workdir):
        with open(os.path.join(workdir, workdir_lock.LOCK_NAME), encoding="utf-8") as f:
            assert json.load(f) == {"pid": os.getpid(), "host": socket.gethostname()}
        with pytest.raises(workdir_lock.WorkdirBusy), workdir_lock.hold(workdir):  # one holder, even in a process
            pass
    assert os.listdir(workdir) == []


def test_release_keeps_what_the_run_wrote(tmp_path):
    workdir = str(tmp_path / "w")
    with workdir_lock.hold(workdir), open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write("{}")
    assert os.listdir(workdir) == ["config.json"]


# ----------------------------------------------------------------------------- train.py --help
def test_train_help_explains_overrides():
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, check=False)
    assert "--config.<group>.<key>=<value>" in result.stdout
    assert "configs/default.py" in result.stdout
    assert "--workdir" in result.stdout


def test_workdir_lock_is_not_a_config_layer():
    """WorkdirBusy is no ConfigError, and the lock module does not import configuration."""
    assert not issubclass(workdir_lock.WorkdirBusy, ConfigError)
    code = "import sys; from s2s_jax import workdir_lock; print('s2s_jax.configuration' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout == "False\n", out.stderr


def test_train_py_on_a_busy_workdir_prints_one_line(tmp_path):
    workdir = str(tmp_path / "w")
    with workdir_lock.hold(workdir):
        result = subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={workdir}"],
                                cwd=REPO, capture_output=True, text=True, timeout=120,
                                env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"error: {workdir}: in use by another run (pid {os.getpid()} on host "
                                      f"{socket.gethostname()}); wait for it to end or use another --workdir")
