#!/usr/bin/env python3
"""Writes dynakv-models/tests/fixtures/parity-gemma3.json: llama.cpp's
per-position top-1 token and NLL on Brown `eval` text for Gemma 3 270M, under
the perplexity protocol for models that expect BOS (docs/protocol.md: the
text's tokens cut into runs of ctx - 1, each window BOS + one run, every text
token scored, the first from BOS's logits), at ctx 512 (4 windows: global and
sliding-window layers see the same span) and ctx 2048 (1 window: positions
past 512 exercise the 512-position sliding window), for two engines' views of
the same weights:

- `quant`: llama.cpp on the Q4_K_M file itself (its matmuls quantize
  activations to 8 bits);
- `f32`: llama.cpp on a copy with every tensor dequantized to F32
  (tools/dequantize_gguf.py): the same weight values, computed in f32.

Each window runs from an empty f32 KV cache with every logit kept.

Usage: python3 -m pip install llama-cpp-python gguf numpy &&
       python3 tools/make_parity_fixture_gemma3.py
"""
import json
import math
import os

import numpy as np
from llama_cpp import Llama

from brown_text import model_path, split_docs
from dequantize_gguf import dequantize_file

RUNS = {512: 4, 2048: 1}
DOCS = 12


def text_ids(path):
    llm = Llama(model_path=path, vocab_only=True, verbose=False)
    docs = split_docs("eval", DOCS)
    sep = llm.tokenize(b"\n\n", add_bos=False, special=False)
    ids = []
    for i, d in enumerate(docs):
        if i:
            ids += sep
        ids += llm.tokenize(d.encode("utf-8"), add_bos=False, special=False)
    return ids, llm.token_bos()


def run(path, ctx, windows):
    llm = Llama(model_path=path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                n_threads=2, type_k=0, type_v=0, flash_attn=False, verbose=False)
    top1, nll = [], []
    for win in windows:
        llm.reset()
        llm.eval(win)
        logits = np.array(llm.scores[:ctx], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
        for i in range(ctx - 1):
            top1.append(int(logits[i].argmax()))
            nll.append(float(lse[i] - logits[i, win[i + 1]]))
    return {"top1": top1, "nll": nll, "ppl": math.exp(sum(nll) / len(nll))}


src = model_path("gemma3-270m")
ids, bos = text_ids(src)
f32_path = "/tmp/dynakv-parity-gemma3-f32.gguf"
dequantize_file(src, f32_path)
out = {"source": "llama.cpp via llama-cpp-python " + __import__("llama_cpp").__version__,
       "model": "gemma3-270m", "split": "eval", "docs": DOCS, "bos": bos, "runs": []}
for ctx, n in RUNS.items():
    run_len = ctx - 1
    assert len(ids) >= run_len * n, (len(ids), ctx, n)
    windows = [[bos] + ids[w * run_len:(w + 1) * run_len] for w in range(n)]
    quant = run(src, ctx, windows)
    f32 = run(f32_path, ctx, windows)
    out["runs"].append({"ctx": ctx, "windows": windows, "quant": quant, "f32": f32})
    print(f"ctx {ctx}: {len(quant['nll'])} positions, PPL Q4_K_M {quant['ppl']:.4f}, f32 {f32['ppl']:.4f}")
os.remove(f32_path)
out["tokens"] = ids[:(2048 - 1)]
path = os.path.join(os.path.dirname(__file__), "..", "dynakv-models", "tests", "fixtures", "parity-gemma3.json")
with open(path + ".tmp", "w") as f:
    json.dump(out, f)
os.replace(path + ".tmp", path)
print("wrote", path)
