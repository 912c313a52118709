#!/bin/bash
S=pca-pre.safetensors; G=gemma3-pca-pre.safetensors  # from `dynakv calibrate [--model gemma3-270m]`
OUT=latent-default.jsonl; : > $OUT
for m in "smollm2-135m $S" "gemma3-270m $G"; do set -- $m
 for b in 0.30 0.47; do for l in f32 int8; do
  RAYON_NUM_THREADS=2 target/release/dynakv eval ppl --model $1 --ctx 1024 --max-windows 8 --json --cache dynakv --artifact $2 --policy energy --budget $b --latent-dtype $l 2>/dev/null >> $OUT
 done; done; done

