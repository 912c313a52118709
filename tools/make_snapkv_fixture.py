#!/usr/bin/env python3
"""Writes dynakv-bench/tests/fixtures/kvpress_snapkv.json: the tokens NVIDIA
kvpress's SnapKVPress keeps, per layer and KV head, when SmolLM2-135M-Instruct
prefills a fixed Brown `eval` prompt (the first L token ids of
dynakv-models/tests/fixtures/parity.json, tokenized by llama.cpp).

transformers loads the same GGUF file (`gguf_file=`), dequantized to f32, so
the reference shares nothing with the Rust code under test but the weights.
For each layer and head the fixture also keeps kvpress's cutoff score (the
lowest kept prefix score) and the prefix tokens whose score lies within 2% of
it: a disagreement between the two implementations on one of those tokens is
a near-tie decided by float rounding, not a semantic difference.

Usage:
  python3 -m venv /tmp/kvp && /tmp/kvp/bin/pip install kvpress gguf
  /tmp/kvp/bin/python tools/make_snapkv_fixture.py
"""
import json
import os
import sys

import torch
import transformers
import kvpress
from kvpress import SnapKVPress
from transformers import AutoModelForCausalLM, DynamicCache

sys.path.insert(0, os.path.dirname(__file__))
from brown_text import model_path  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
PARITY = os.path.join(ROOT, "dynakv-models/tests/fixtures/parity.json")
OUT = os.path.join(ROOT, "dynakv-bench/tests/fixtures/kvpress_snapkv.json")
L = 1024
RATIO = 0.5
NEAR = 0.02

torch.set_num_threads(2)
ids = json.load(open(PARITY))["tokens"][:L]
folder, name = os.path.split(model_path())
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                             attn_implementation="sdpa")
model.eval()

layers = {}


class RecordingSnapKV(SnapKVPress):
    """SnapKVPress that also writes down what it keeps."""

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        k_len = keys.shape[2]
        n_kept = max(1, int(k_len * (1 - self.compression_ratio)))
        kept = scores.topk(n_kept, dim=-1).indices[0]
        p = k_len - self.window_size
        heads = []
        for h in range(kept.shape[0]):
            prefix = scores[0, h, :p]
            kept_h = sorted(kept[h].tolist())
            cutoff = float(min(prefix[i] for i in kept_h if i < p))
            near = {str(i): float(prefix[i]) for i in range(p)
                    if abs(float(prefix[i]) - cutoff) <= NEAR * cutoff}
            heads.append({"kept": kept_h, "cutoff": cutoff, "near": near})
        layers[module.layer_idx] = heads
        return super().compress(module, hidden_states, keys, values, attentions, kwargs)


press = RecordingSnapKV(compression_ratio=RATIO)
with torch.no_grad(), press(model):
    model(torch.tensor([ids]), past_key_values=DynamicCache())

assert len(layers) == model.config.num_hidden_layers, len(layers)
out = {
    "source": "tools/make_snapkv_fixture.py",
    "kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5",
    "transformers": transformers.__version__,
    "torch": torch.__version__,
    "press": {"compression_ratio": RATIO, "window_size": press.window_size,
              "kernel_size": press.kernel_size},
    "near": NEAR,
    "tokens": ids,
    "layers": [layers[i] for i in range(len(layers))],
}
tmp = OUT + ".tmp"
with open(tmp, "w") as f:
    json.dump(out, f, separators=(",", ":"))
os.replace(tmp, OUT)
print(f"wrote {OUT}: {len(layers)} layers, {len(layers[0])} KV heads, "
      f"{len(layers[0][0]['kept'])} kept of {L}")
