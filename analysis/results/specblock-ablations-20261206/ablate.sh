#!/usr/bin/env bash
# SpecBlock ablations at equal work: 30 steps of 2,048 tokens each, on one core, from the same feature cache.
. .venv/bin/activate
for v in full no-shift no-inherit no-rank-head no-prefix-mask; do
  flag=""; [ "$v" != full ] && flag="--$v"
  [ -f ablations/$v/report.json ] && continue
  OMP_NUM_THREADS=1 sglang-ext train-drafter --arch specblock --max-sequences 560 --feature-cache cache/ \
    --batch-tokens 2048 --lr 1e-3 --warmup-steps 5 --epochs 4 --max-steps 30 --no-progress $flag --out ablations/$v \
    > ablations/$v.log 2>&1
done
