#!/usr/bin/env bash
# configs/default.py (the JoeyNMT anchor's architecture and vocabularies) trained for the anchor's
# wall-clock budget, then decoded on dev like the anchor: greedy, and beam 5 without length penalty.
#   bench/anchor_budget.sh WORKDIR [SECONDS=1800] [TRAIN_FLAGS...]   (from the repository root: it reads
#   data/bible-es-en; TRAIN_FLAGS go to train.py after the script's own, e.g. --config.optimizer.ema_decay=0.999)
# Training gets SIGINT after SECONDS (the loop saves a checkpoint and stops, as JoeyNMT's time limit
# does; its last log line names the step reached); compilation counts against the budget. Then prints
# sacrebleu BLEU and chrF of both searches.
set -eu
workdir=$1; seconds=${2:-1800}; shift $(( $# < 2 ? $# : 2 ))
data=data/bible-es-en
python=${PYTHON:-python}
# The config's num_train_steps (3,100) end its cooldown inside the budget on 2 idle CPU cores; on a
# slower machine the SIGINT stops the run before the learning rate reaches 0. The evaluations before
# the last are skipped: they would spend the budget.
timeout --signal=INT --kill-after=120 "$seconds" "$python" train.py --config=configs/default.py \
  --workdir="$workdir" --config.eval_every_steps=1000000 --config.checkpoint_every_steps=500 "$@" || [ $? -eq 124 ]
for search in greedy beam; do
  "$python" -m s2s_jax.translate --workdir="$workdir" --input="$data/dev.es" \
    --output="$workdir/dev.$search.en" --search=$search --beam_size=5 --alpha=0
  echo "$search: $("$python" -m sacrebleu "$data/dev.en" -m bleu chrf -b < "$workdir/dev.$search.en" | tr '\n' ' ')"
done
