#!/bin/bash
# DynaKV energy 0.30 (int8 latents) paired against dense f16, before
# (session 21's f16 default, s21c) / after (q8_0 latents read in place and
# value sums in order, s21g); binaries alternating. usage: codes3.sh OLD NEW
for round in 1 2; do
  for M in "smollm2-135m /tmp/pca-pre.safetensors" "gemma3-270m /tmp/gemma-pca.safetensors"; do
    for C in 8064 4096; do
      for B in $1 $2; do
        echo "$round $M $C $B $(/tmp/paired.sh $B $M $C)"
      done
    done
  done
done
