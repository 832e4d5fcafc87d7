"""Trains an attention-based LSTM seq2seq model: `python train.py --config=configs/demo.py
--workdir=runs/demo` (the `s2s-train` console script runs the same). Flags, resume rules, exit
statuses and several processes: s2s_jax/train_command.py."""
from s2s_jax.train_command import run

if __name__ == "__main__":
    run()
