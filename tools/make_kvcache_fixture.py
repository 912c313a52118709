#!/usr/bin/env python3
"""Writes dynakv-models/tests/fixtures/kvcache_types.json: llama.cpp's
perplexity with f16, q8_0, q4_0 and mixed (K q8_0, V q4_0) KV caches, on the
parity fixture's windows (its `tokens`: Brown `eval`, 2 windows of 1,024),
so that our dense q8_0 / q4_0 caches can be checked against llama.cpp's
`--cache-type-k/-v` by their PPL ratio to the f16 cache of the same engine.

Since 2026-04 llama.cpp Hadamard-rotates Q, K and V whenever the KV cache is
quantised (its `attn_rot`); the last run repeats q4_0 with the rotation
disabled (`LLAMA_ATTN_ROT_DISABLE=1`), the plain block quantisation.

The weights are the GGUF file dequantized to F32 (tools/dequantize_gguf.py),
so the ratio measures the cache's quantisation alone. llama.cpp needs flash
attention for a quantised V cache; every run here uses it, f16 included.

Usage: python3 -m pip install llama-cpp-python gguf numpy && python3 tools/make_kvcache_fixture.py
"""
import json
import math
import os

import numpy as np
from llama_cpp import Llama

from brown_text import model_path
from dequantize_gguf import dequantize_file

HERE = os.path.dirname(__file__)
FIXTURES = os.path.join(HERE, "..", "dynakv-models", "tests", "fixtures")
# ggml type ids (ggml.h): F16 = 1, Q4_0 = 2, Q8_0 = 8
TYPES = {"f16": 1, "q4_0": 2, "q8_0": 8}
# (K, V, rotation of a quantised cache)
CONFIGS = [("f16", "f16", True), ("q8_0", "q8_0", True), ("q4_0", "q4_0", True),
           ("q8_0", "q4_0", True), ("q4_0", "q4_0", False)]


def run(path, ids, ctx, windows, k, v, rotate):
    if rotate:
        os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)
    else:
        os.environ["LLAMA_ATTN_ROT_DISABLE"] = "1"
    llm = Llama(model_path=path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                n_threads=2, type_k=TYPES[k], type_v=TYPES[v], flash_attn=True, verbose=False)
    nll = []
    for w in range(windows):
        win = ids[w * ctx:(w + 1) * ctx]
        llm.reset()
        llm.eval(win)
        logits = np.array(llm.scores[:ctx], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
        nll += [float(lse[i] - logits[i, win[i + 1]]) for i in range(ctx - 1)]
    del llm
    return {"k": k, "v": v, "rotate": rotate, "mean_nll": sum(nll) / len(nll), "ppl": math.exp(sum(nll) / len(nll))}


with open(os.path.join(FIXTURES, "parity.json")) as f:
    parity = json.load(f)
ids, ctx, windows = parity["tokens"], parity["ctx"], parity["windows"]
f32_path = "/tmp/dynakv-kvcache-f32.gguf"
dequantize_file(model_path(), f32_path)
try:
    runs = []
    for k, v, rotate in CONFIGS:
        r = run(f32_path, ids, ctx, windows, k, v, rotate)
        print(f"K {k} V {v} rotate {rotate}: PPL {r['ppl']:.4f}", flush=True)
        runs.append(r)
finally:
    os.remove(f32_path)
out = {"source": "llama.cpp via llama-cpp-python " + __import__("llama_cpp").__version__,
       "weights": "GGUF dequantized to F32", "flash_attn": True, "ctx": ctx, "windows": windows,
       "tokens_from": "parity.json", "runs": runs}
path = os.path.join(FIXTURES, "kvcache_types.json")
with open(path + ".tmp", "w") as f:
    json.dump(out, f, indent=1)
os.replace(path + ".tmp", path)
print(f"wrote {path}")
