#!/bin/bash
# DynaKV energy 0.30 (int8 latents) paired against dense f16, before/after
# reading q8_0 latents in place; binaries alternating. usage: codes.sh OLD NEW
for round in 1 2; do
  for C in 8064 4096; do
    for B in $1 $2; do
      echo "$round $C $B $(/tmp/paired.sh $B smollm2-135m /tmp/pca-pre.safetensors $C)"
    done
  done
done
