#!/usr/bin/env bash
# The paper's experiment, CPU-sized, on the embedded task (bible-basic) or any task folder
# (TASK=../shared/data/multi30k/de2en SPLIT=valid LIMIT=500 for Multi30k, whose test split is held out):
#   1. a baseline run (the default preset: 14 minutes on 2 cores; TASK=DIR for another task);
#   2. the same run post-trained with the Distance Penalty (λ = 2, as for QQP) for 1,500 more steps;
#   3. the control: the same run trained on for the same 1,500 steps without the penalty;
# then every few-step sampler × steps on the whole test split, K seeds with the MBR pick, and the
# full 2000-step chain as the reference point (0.2-0.4 s a step here, so on the first 100 verses,
# with the few-step samplers on the same 100 beside it). About 80 minutes on a 2-core CPU.
set -euo pipefail
OUT=${OUT:-runs/repro}
TASK=${TASK:-bible-basic}
SPLIT=${SPLIT:-test}
LIMIT=${LIMIT:-389}  # bible-basic's whole test split
FURTHER=${FURTHER:-1500}  # post-training steps, the same for DP and its control
SEEDS=${SEEDS:-3}

diffutext train --task "$TASK" --out "$OUT/base"
diffutext train --task "$TASK" --out "$OUT/dp" --init-from "$OUT/base" --distance-penalty 2 --max-steps "$FURTHER" --max-minutes 0
diffutext train --task "$TASK" --out "$OUT/control" --init-from "$OUT/base" --distance-penalty 0 --max-steps "$FURTHER" --max-minutes 0
# Few-step samplers on the whole test split (389 verses).
diffutext ablate --checkpoint "$OUT/base" --checkpoint "$OUT/control" --checkpoint "$OUT/dp" \
  --sampler skip,uniform,ads --steps 20,10,5 --seeds "$SEEDS" --split "$SPLIT" --limit "$LIMIT" --batch-size 400 --out "$OUT/ablate"
# The full 2000-step chain of the baseline on the first 100 verses (with every sampler beside it:
# `diffutext ablate`'s defaults), and the three checkpoints' 20-step samplers on the same 100.
diffutext ablate --checkpoint "$OUT/base" --split "$SPLIT" --out "$OUT/ablate-base-100"
diffutext ablate --checkpoint "$OUT/base" --checkpoint "$OUT/control" --checkpoint "$OUT/dp" \
  --sampler skip,uniform,ads --steps 20 --seeds "$SEEDS" --split "$SPLIT" --limit 100 --batch-size 400 --out "$OUT/ablate-100"
