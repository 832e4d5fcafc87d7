#!/usr/bin/env bash
# Learning curves of demo-config candidates, run side by side on one accelerator (steps-to-BLEU
# does not depend on the device; wall time on 2 CPU cores is measured separately on CPU).
#   bench/demo_curves.sh OUTDIR STEPS
set -u
out=${1:-bench/results/curves}; steps=${2:-2000}; mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
common="--config=configs/demo.py --config.num_train_steps=$steps --config.eval_every_steps=250 --config.checkpoint_every_steps=100000"
declare -A runs=(
  [b32_lr3]="--config.data.batch_size=32 --config.optimizer.learning_rate=3e-3"
  [big_lr1]="--config.data.vocab_size=8000 --config.model.embed_dim=256 --config.model.encoder_hidden=256 --config.optimizer.learning_rate=1e-3"
  [lr1]="--config.optimizer.learning_rate=1e-3"
  [lr2_drop0]="--config.optimizer.learning_rate=2e-3 --config.model.dropout=0.0"
  [b32_lr2]="--config.data.batch_size=32 --config.optimizer.learning_rate=2e-3"
  [b32_lr1]="--config.data.batch_size=32 --config.optimizer.learning_rate=1e-3"
)
for name in "${!runs[@]}"; do
  python3 train.py $common ${runs[$name]} --workdir=/tmp/curves/$name > "$out/$name.log" 2>&1 &
done
wait
for name in "${!runs[@]}"; do cp /tmp/curves/$name/metrics.jsonl "$out/$name.jsonl"; grep -h "eval step\|final" "$out/$name.log" | sed "s/^/$name: /"; done
