"""Trains an attention-based LSTM seq2seq model.

  python train.py --config=configs/demo.py --workdir=runs/demo [--config.model.attention=concat ...]

Rerunning the same command on the same workdir resumes from its last checkpoint.
"""
import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from s2s_jax import training

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, tokenizers, metrics and plots.")
config_flags.DEFINE_config_file("config", None, "Training config file (a get_config() module).",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", force=True)
    logging.getLogger("s2s_jax").setLevel(logging.INFO)
    training.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
