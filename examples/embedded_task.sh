#!/usr/bin/env bash
# Walk-through of the embedded task (King James → Basic English Bible verses), offline on a CPU:
# train the default preset, decode the test split with every sampler, score a predictions file,
# and compare samplers side by side. About 20 minutes on a 2-core laptop.
set -euo pipefail
RUN=${RUN:-runs/walkthrough}

# 1. Train (small preset, ~13 minutes on 2 cores). Every loss term goes to $RUN/log.jsonl.
diffutext train --task bible-basic --out "$RUN"

# 2. Decode the test split with each sampler. ddpm visits all T = 2000 timesteps, so it gets a
#    small --limit; the others take 20 steps (100× fewer).
diffutext sample --checkpoint "$RUN" --sampler ddpm --limit 32 --show 1
for sampler in skip uniform ddim ads; do
  diffutext sample --checkpoint "$RUN" --sampler "$sampler" --steps 20 --show 1
done

# 3. Write predictions, then score the file (sacreBLEU, DiffuSeq's sentence BLEU, ROUGE-L, dist-1, length).
diffutext sample --checkpoint "$RUN" --sampler ads --steps 20 --out "$RUN/ads20.jsonl" --show 0
diffutext evaluate "$RUN/ads20.jsonl" --json "$RUN/ads20.metrics.json"

# 4. MBR over 5 seeds: decode 5 times and keep, per verse, the candidate the others agree with most.
diffutext evaluate --checkpoint "$RUN" --sampler ads --steps 20 --seeds 5

# 5. One sentence of your own.
diffutext sample --checkpoint "$RUN" --text "And the LORD spake unto Moses, saying," --steps 20

# 6. Samplers × steps on 100 test verses: quality and wall time side by side.
diffutext ablate --checkpoint "$RUN" --limit 100
