#!/usr/bin/env bash
# The paper's experiment on the embedded task (bible-basic), CPU-sized:
#   1. a baseline DiffuSeq run (the default preset, 15 minutes);
#   2. the same run post-trained with the Distance Penalty (λ = 2, as for QQP) for a further budget;
#   3. the control: the same run trained on for the same further budget without the penalty;
# then every sampler × steps on the test split, with MBR over several seeds, and the full
# 2000-step chain of the baseline as the reference point. About 2 hours on a 2-core CPU.
set -euo pipefail
OUT=${OUT:-runs/repro}
MINUTES=${MINUTES:-15}    # baseline budget
FURTHER=${FURTHER:-10}    # post-training budget, the same wall time for DP and its control
SEEDS=${SEEDS:-3}

diffutext train --out "$OUT/base" --max-minutes "$MINUTES"
diffutext train --out "$OUT/dp" --init-from "$OUT/base" --distance-penalty 2 --max-minutes "$FURTHER"
diffutext train --out "$OUT/control" --init-from "$OUT/base" --distance-penalty 0 --max-minutes "$FURTHER"

# Few-step samplers on the whole test split (389 verses), K seeds with the MBR pick.
diffutext ablate --checkpoint "$OUT/base" --checkpoint "$OUT/control" --checkpoint "$OUT/dp" \
  --sampler skip,uniform,ddim,ads --steps 20,10,5 --seeds "$SEEDS" --limit 389 --out "$OUT/ablate"
# The full 2000-step chain of the baseline (the quality the few-step samplers are measured against).
diffutext ablate --checkpoint "$OUT/base" --sampler ddpm --seeds 1 --limit 389 --out "$OUT/ablate-ddpm"
