#!/bin/bash
# Decode-step PPL (Brown eval, 16 windows of 1,024, last 512 scored one
# step at a time), run twice each: the same number both times now.
B=$1
for i in 1 2; do
echo "smollm2 int8 $(/tmp/q2.sh $B smollm2-135m --cache dynakv --artifact /tmp/pca-pre.safetensors --policy energy --budget 0.30)"
echo "smollm2 bytes-6 $(/tmp/q2.sh $B smollm2-135m --preset bytes-6 --artifact /tmp/pca-pre.safetensors)"
echo "gemma3 int8 $(/tmp/q2.sh $B gemma3-270m --cache dynakv --artifact /tmp/gemma-pca.safetensors --policy energy --budget 0.30)"
done
