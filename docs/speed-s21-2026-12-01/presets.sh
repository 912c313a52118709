#!/bin/bash
# SmolLM2 presets and DynaKV int8 at 8k paired against dense f16: before
# (q8_0 in place only, s21g) / after (q4_0 and mixed in place too, s21i),
# alternating. usage: presets.sh OLD NEW
for round in 1 2; do
  for P in bytes-6 bytes-3; do
    for B in $1 $2; do
      echo "$round $P $B $(/tmp/pp.sh $B smollm2-135m /tmp/pca-pre.safetensors $P 8064)"
    done
  done
  for B in $1 $2; do
    echo "$round int8 $B $(/tmp/paired.sh $B smollm2-135m /tmp/pca-pre.safetensors 8064)"
  done
done
