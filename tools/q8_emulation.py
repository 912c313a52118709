#!/usr/bin/env python3
"""Checks dynakv's q8 numerics against an independent NumPy emulation of
llama.cpp's quantised products, and both against llama.cpp itself, at the
first position of the parity fixture (one token: attention returns its value,
so the forward pass is the matrix products, norms and SwiGLU only).

The emulation follows llama.cpp's x86 code as vendored in llama-cpp-python
0.3.36: activations quantised per block of 32 with id = 127/amax, round half
to even, d = amax/127 stored as f16 (`quantize_row_q8_1`), Q4_1 products
d_x d_y sum(q_x q_y) + m_x s_y with s_y = f16(d sum(q_y))
(`ggml_vec_dot_q4_1_q8_1`), the Q8_0 head likewise without the min term.

Usage:
  cargo run --release -p dynakv-bench --example dump_logits -- q8 1 /tmp/ours-q8.json
  cargo run --release -p dynakv-bench --example dump_logits -- f32 1 /tmp/ours-f32.json
  python3 tools/q8_emulation.py /tmp/ours-q8.json /tmp/ours-f32.json
(needs the `gguf`, `numpy` and `llama-cpp-python` packages)

Superseded for llama.cpp's own numbers by tools/llamacpp_tensors.py: this
emulation squares in f64 in the RMS norm and uses NumPy's exp in SiLU, so
its 8-bit codes, and from there its logits, part from llama.cpp's (0.37 at
position 0); the other follows ggml's arithmetic to the bit.
"""
import json
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

sys.path.insert(0, os.path.dirname(__file__))
from brown_text import model_path  # noqa: E402

EPS = 1e-5
ours_q8, ours_f32 = sys.argv[1], sys.argv[2]
reader = GGUFReader(model_path())
tensors = {t.name: t for t in reader.tensors}
dense = {}


def weight(name):
    if name not in dense:
        t = tensors[name]
        d = dequantize(t.data, t.tensor_type)
        dense[name] = d.reshape(tuple(int(x) for x in reversed(t.shape))) if d.ndim == 1 else d
    return dense[name]


def q4_1_mins(name):
    t = tensors[name]
    raw = np.asarray(t.data).reshape(int(t.shape[1]), -1)
    blocks = raw.reshape(raw.shape[0], -1, 20)
    return blocks[:, :, 2:4].copy().view(np.float16).reshape(raw.shape[0], -1).astype(np.float32)


def quantise(x):
    """Q8_1 as llama.cpp's x86 quantize_row_q8_1: values q*d (d as f16), and
    the min term's correction f16(d sum q) - d16 sum q per block."""
    xb = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(xb).max(axis=1)
    d = (amax / np.float32(127)).astype(np.float32)
    inv = np.where(amax != 0, np.float32(127) / np.where(amax != 0, amax, 1), 0).astype(np.float32)
    q = np.rint(xb * inv[:, None]).astype(np.float32)
    d16 = d.astype(np.float16).astype(np.float32)
    s = (d * q.sum(axis=1)).astype(np.float16).astype(np.float32)
    return (q * d16[:, None]).reshape(-1), s - d16 * q.sum(axis=1)


def forward(token, q8):
    def mm(name, x):
        if not q8:
            return weight(name) @ x
        xq, ds = quantise(x)
        y = weight(name) @ xq
        if tensors[name].tensor_type.name == "Q4_1":
            y = y + q4_1_mins(name) @ ds
        return y

    def rms(x, w):
        return (x / np.sqrt(np.mean(x.astype(np.float64) ** 2) + EPS)).astype(np.float32) * w

    h = weight("token_embd.weight")[token].astype(np.float32)
    n_layers = 1 + max(int(n.split(".")[1]) for n in tensors if n.startswith("blk."))
    for layer in range(n_layers):
        p = f"blk.{layer}."
        x = rms(h, weight(p + "attn_norm.weight"))
        v = mm(p + "attn_v.weight", x)
        kv, q = v.shape[0], weight(p + "attn_q.weight").shape[0]
        group = (q // 64) // (kv // 64)
        o = np.concatenate([v[(i // group) * 64:(i // group) * 64 + 64] for i in range(q // 64)])
        h = h + mm(p + "attn_output.weight", o)
        x = rms(h, weight(p + "ffn_norm.weight"))
        g, u = mm(p + "ffn_gate.weight", x), mm(p + "ffn_up.weight", x)
        h = h + mm(p + "ffn_down.weight", g / (1 + np.exp(-g)) * u)
    return mm("token_embd.weight", rms(h, weight("output_norm.weight")))


fixture = json.load(open(os.path.join(os.path.dirname(__file__), "..", "dynakv-models",
                                      "tests", "fixtures", "parity.json")))
token = fixture["tokens"][0]
from llama_cpp import Llama  # noqa: E402

llm = Llama(model_path=model_path(), n_ctx=64, logits_all=True, n_threads=2, type_k=0, type_v=0,
            flash_attn=False, verbose=False)
llm.eval([token])
llama = np.array(llm.scores[0], dtype=np.float64)
rows = {"dynakv q8": np.array(json.load(open(ours_q8))[0]),
        "dynakv f32": np.array(json.load(open(ours_f32))[0]),
        "llama.cpp (Q4_1 file)": llama}
emulated = {"NumPy q8 emulation": forward(token, True), "NumPy f32": forward(token, False)}
print("max |logit difference| at position 0")
for a, ea in emulated.items():
    for b, rb in rows.items():
        print(f"  {a} vs {b}: {float(np.abs(ea - rb).max()):.6g}")
