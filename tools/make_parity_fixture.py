#!/usr/bin/env python3
"""Writes dynakv-models/tests/fixtures/parity.json: llama.cpp's per-position
top-1 token and NLL on Brown `eval` text under the project's perplexity protocol
(docs/protocol.md), with its PPL, for two engines' views of the same weights:

- `q4_1`: llama.cpp on the GGUF file itself. llama.cpp multiplies Q4_1 weights
  with activations quantized to 8 bits (and the Q8_0 output head likewise), so
  its logits carry that quantization noise.
- `f32`: llama.cpp on a copy of the file with every tensor dequantized to F32
  (tools/dequantize_gguf.py): the same weight values, computed in f32.

Each window of CTX tokens is evaluated from an empty KV cache (f32 unless --kv f16) with all
logits kept (llama-cpp-python, logits_all=True), exactly as `dynakv eval ppl` does.

Usage: python3 -m pip install llama-cpp-python numpy && python3 tools/make_parity_fixture.py
       [--ubatch N] [--q4-only] [--out PATH] [--kv f32|f16]

`--ubatch 1` evaluates one token at a time: llama.cpp then takes ggml's own
products everywhere, where batches of two or more tokens take llamafile's
tiled ones (tinyBLAS) for f32 x f32 and Q8_0 products (here the attention
weights times V, and the output head), summed in another order; a build
with -DGGML_LLAMAFILE=OFF gives the same numbers batched
(tools/llamacpp_self_agreement.sh). `--q4-only` skips the f32 engine;
`--out` writes elsewhere than the committed fixture; `--kv f16` runs
llama.cpp's default f16 KV cache instead of f32.
"""
import argparse
import json
import math
import os

import numpy as np
from llama_cpp import Llama

from brown_text import model_path, split_docs

CTX = 1024
WINDOWS = 2
DOCS = 4

from dequantize_gguf import dequantize_file


def run(path, ids=None, ubatch=CTX, kv=0):
    llm = Llama(model_path=path, n_ctx=CTX, n_batch=CTX, n_ubatch=ubatch, logits_all=True,
                n_threads=2, type_k=kv, type_v=kv, flash_attn=False, verbose=False)  # ggml type: 0 f32, 1 f16
    if ids is None:
        docs = split_docs("eval", DOCS)
        sep = llm.tokenize(b"\n\n", add_bos=False, special=False)
        ids = []
        for i, d in enumerate(docs):
            if i:
                ids += sep
            ids += llm.tokenize(d.encode("utf-8"), add_bos=False, special=False)
        assert len(ids) >= CTX * WINDOWS, len(ids)
        ids = ids[:CTX * WINDOWS]
    top1, nll = [], []
    for w in range(WINDOWS):
        win = ids[w * CTX:(w + 1) * CTX]
        llm.reset()
        llm.eval(win)
        logits = np.array(llm.scores[:CTX], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
        for i in range(CTX - 1):
            top1.append(int(logits[i].argmax()))
            nll.append(float(lse[i] - logits[i, win[i + 1]]))
    return ids, {"top1": top1, "nll": nll, "ppl": math.exp(sum(nll) / len(nll))}


args = argparse.ArgumentParser()
args.add_argument("--ubatch", type=int, default=CTX)
args.add_argument("--q4-only", action="store_true")
args.add_argument("--out")
args.add_argument("--kv", choices=["f32", "f16"], default="f32")
args = args.parse_args()
if not 1 <= args.ubatch <= CTX:
    raise SystemExit(f"--ubatch must be in 1..{CTX}")
src = model_path()
kv = {"f32": 0, "f16": 1}[args.kv]
ids, q4 = run(src, ubatch=args.ubatch, kv=kv)
out = {"source": "llama.cpp via llama-cpp-python " + __import__("llama_cpp").__version__,
       "split": "eval", "docs": DOCS, "ctx": CTX, "windows": WINDOWS, "ubatch": args.ubatch, "kv": args.kv,
       "tokens": ids, "q4_1": q4}
if not args.q4_only:
    f32_path = "/tmp/dynakv-parity-f32.gguf"
    dequantize_file(src, f32_path)
    _, out["f32"] = run(f32_path, ids, args.ubatch, kv)
    os.remove(f32_path)
path = args.out or os.path.join(os.path.dirname(__file__), "..", "dynakv-models", "tests", "fixtures", "parity.json")
with open(path + ".tmp", "w") as f:
    json.dump(out, f)
os.replace(path + ".tmp", path)
f32_ppl = f", f32 {out['f32']['ppl']:.4f}" if "f32" in out else ""
print(f"wrote {path}: {len(q4['nll'])} positions, PPL q4_1 {q4['ppl']:.4f}{f32_ppl}")
