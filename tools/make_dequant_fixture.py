#!/usr/bin/env python3
"""Writes dynakv-models/tests/fixtures/dequant.json: random ggml blocks of every
format the Rust reader supports, with the f32 values that the independent `gguf`
PyPI package's `dequantize` produces for them.

Usage: python3 -m pip install gguf numpy && python3 tools/make_dequant_fixture.py
"""
import json
import os

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

rng = np.random.default_rng(20261128)
# (type, blocks, byte offsets of f16 fields that must hold finite scales)
SPECS = {
    "F32": (Q.F32, 8, None),
    "F16": (Q.F16, 8, None),
    "BF16": (Q.BF16, 8, None),
    "Q4_0": (Q.Q4_0, 3, [0]),
    "Q4_1": (Q.Q4_1, 3, [0, 2]),
    "Q5_0": (Q.Q5_0, 3, [0]),
    "Q5_1": (Q.Q5_1, 3, [0, 2]),
    "Q8_0": (Q.Q8_0, 3, [0]),
    "Q2_K": (Q.Q2_K, 2, [80, 82]),
    "Q3_K": (Q.Q3_K, 2, [108]),
    "Q4_K": (Q.Q4_K, 2, [0, 2]),
    "Q5_K": (Q.Q5_K, 2, [0, 2]),
    "Q6_K": (Q.Q6_K, 2, [208]),
}
BLOCK = {Q.F32: (1, 4), Q.F16: (1, 2), Q.BF16: (1, 2), Q.Q4_0: (32, 18), Q.Q4_1: (32, 20), Q.Q5_0: (32, 22),
         Q.Q5_1: (32, 24), Q.Q8_0: (32, 34), Q.Q2_K: (256, 84), Q.Q3_K: (256, 110), Q.Q4_K: (256, 144),
         Q.Q5_K: (256, 176), Q.Q6_K: (256, 210)}

out = {}
for name, (qt, blocks, scale_offsets) in SPECS.items():
    be, bb = BLOCK[qt]
    if qt == Q.F32:
        raw = rng.standard_normal(blocks).astype("<f4").tobytes()
    elif qt == Q.F16:
        raw = rng.standard_normal(blocks).astype("<f2").tobytes()
    elif qt == Q.BF16:
        f = rng.standard_normal(blocks).astype("<f4")
        raw = (f.view("<u4") >> 16).astype("<u2").tobytes()
    else:
        buf = bytearray(rng.integers(0, 256, size=blocks * bb, dtype=np.uint8).tobytes())
        for b in range(blocks):
            for off in scale_offsets:
                s = np.float16(rng.uniform(-0.1, 0.1)).tobytes()
                buf[b * bb + off:b * bb + off + 2] = s
        raw = bytes(buf)
    n = blocks * be
    vals = dequantize(np.frombuffer(raw, dtype=np.uint8), qt).reshape(-1).astype(np.float32)
    assert vals.size == n, (name, vals.size, n)
    out[name] = {"n": n, "hex": raw.hex(), "values": [float(v) for v in vals]}

path = os.path.join(os.path.dirname(__file__), "..", "dynakv-models", "tests", "fixtures", "dequant.json")
with open(path + ".tmp", "w") as f:
    json.dump(out, f)
os.replace(path + ".tmp", path)
print("wrote", path)
