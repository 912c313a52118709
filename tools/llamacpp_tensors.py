#!/usr/bin/env python3
"""Checks, operation by operation, that an independent NumPy emulation of
ggml's CPU arithmetic (the one dynakv's llama.cpp reference decoder,
dynakv-models/src/llama/ggml_ops.rs, implements) gives llama.cpp's tensors to
the bit on SmolLM2's Q4_1 file.

llama.cpp decodes the parity fixture's first tokens one at a time with an f32
KV cache and no flash attention (as the fixture); its eval callback copies out
every f32 tensor of the graph. Each operation is then recomputed from
llama.cpp's own inputs to it, so each is checked on its own, and the count of
elements that differ in any bit is printed per operation, summed over layers
and steps. RoPE is tried three ways (separate roundings, and the two ways a
compiler may contract `x0*cos - x1*sin` into a fused multiply-add); llama.cpp's
build matches one.

Usage (llama-cpp-python with LLAMA_BUILD=OFF and a llama.cpp build's shared
libraries; numpy, gguf):
  LLAMA_CPP_LIB_PATH=<llama.cpp build>/bin python3 tools/llamacpp_tensors.py [--steps 6]
"""
import argparse
import ctypes
import json
import os

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
import llama_cpp as l

from brown_text import model_path

f32 = np.float32
args = argparse.ArgumentParser()
args.add_argument("--steps", type=int, default=6)
args = args.parse_args()
if not 1 <= args.steps <= 64:
    raise SystemExit("--steps must be in 1..64")
fixture = json.load(open(os.path.join(os.path.dirname(__file__), "..", "dynakv-models",
                                      "tests", "fixtures", "parity.json")))
tokens = fixture["tokens"][:args.steps]
path = model_path()


class Tensor(ctypes.Structure):
    """ggml.h's struct ggml_tensor (GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64,
    GGML_MAX_SRC 10, GGML_MAX_NAME 64)."""
    _fields_ = [("type", ctypes.c_int32), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int32), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


assert ctypes.sizeof(Tensor) == 336
dump, step = {}, [0]


def on_tensor(ptr, ask, _):
    if ask:
        return True
    t = ctypes.cast(ptr, ctypes.POINTER(Tensor)).contents
    if t.type != 0:  # f32 only
        return True
    ne, nb = list(t.ne), list(t.nb)
    size = sum((ne[i] - 1) * nb[i] for i in range(4)) + 4
    raw = np.frombuffer(bytes((ctypes.c_char * size).from_address(t.data)), dtype=np.float32)
    arr = np.lib.stride_tricks.as_strided(raw, shape=tuple(reversed(ne)), strides=tuple(reversed(nb)))
    key, n = f"{step[0]}/{t.name.decode()}", 1
    while (key if n == 1 else f"{key}#{n - 1}") in dump:
        n += 1
    dump[key if n == 1 else f"{key}#{n - 1}"] = np.array(arr, dtype=f32)
    return True


callback = l.ggml_backend_sched_eval_callback(on_tensor)
l.llama_backend_init()
model = l.llama_model_load_from_file(path.encode(), l.llama_model_default_params())
cp = l.llama_context_default_params()
cp.n_ctx = cp.n_batch = cp.n_ubatch = 64
cp.n_threads = cp.n_threads_batch = 2
cp.type_k = cp.type_v = 0  # f32 cache
cp.flash_attn_type = 0  # off
cp.cb_eval = callback
ctx = l.llama_init_from_model(model, cp)
for i, t in enumerate(tokens):
    step[0] = i
    if l.llama_decode(ctx, l.llama_batch_get_one((ctypes.c_int32 * 1)(t), 1)) != 0:
        raise SystemExit(f"llama_decode failed at step {i}")

reader = GGUFReader(path)
T = {t.name: t for t in reader.tensors}
meta = {f.name: f for f in reader.fields.values()}
base = float(meta["llama.rope.freq_base"].parts[-1][0])
eps = f32(meta["llama.attention.layer_norm_rms_epsilon"].parts[-1][0])
n_layers = int(meta["llama.block_count"].parts[-1][0])
libm = ctypes.CDLL("libm.so.6")
for fn, n in (("cosf", 1), ("sinf", 1), ("powf", 2)):
    getattr(libm, fn).restype = ctypes.c_float
    getattr(libm, fn).argtypes = [ctypes.c_float] * n


def fma(a, b, c):
    """One rounding: the f64 product of two f32 is exact, the f64 sum then
    rounds once more (a double rounding that can differ from a true fma in
    rare near-ties; none was met here)."""
    with np.errstate(invalid="ignore"):  # -inf scores of masked positions
        return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(f32)


def dense(name):
    t = T[name]
    return dequantize(t.data, t.tensor_type).reshape(tuple(int(x) for x in reversed(t.shape))).astype(f32)


def blocks(name):
    t = T[name]
    rows = int(t.shape[1])
    if t.tensor_type.name == "Q4_1":
        raw = np.asarray(t.data).reshape(rows, -1, 20)
        qs = raw[:, :, 4:20]
        q = np.concatenate([qs & 15, qs >> 4], axis=2).astype(np.int32)
        m = raw[:, :, 2:4].copy().view(np.float16)[..., 0].astype(f32)
    else:  # Q8_0
        raw = np.asarray(t.data).reshape(rows, -1, 34)
        q = raw[:, :, 2:34].copy().view(np.int8).astype(np.int32)
        m = None
    return raw[:, :, 0:2].copy().view(np.float16)[..., 0].astype(f32), m, q


def hsum8(acc):
    r = (acc[:, 4:] + acc[:, :4]).astype(f32)
    return ((r[:, 0] + r[:, 2]).astype(f32) + (r[:, 1] + r[:, 3]).astype(f32)).astype(f32)


cache = {}


def product(name, x):
    """quantize_row_q8_1 / q8_0 then ggml_vec_dot_q4_1_q8_1 / q8_0_q8_0 (x86)."""
    if name not in cache:
        cache[name] = blocks(name)
    dx, mx, qx = cache[name]
    xb = x.reshape(-1, 32).astype(f32)
    amax = np.abs(xb).max(axis=1).astype(f32)
    d = (amax / f32(127)).astype(f32)
    inv = np.where(amax != 0, f32(127) / np.where(amax != 0, amax, f32(1)), f32(0)).astype(f32)
    qy = np.rint((xb * inv[:, None]).astype(f32)).astype(np.int32)
    dy = d.astype(np.float16).astype(f32)
    sy = (d * qy.sum(axis=1).astype(f32)).astype(f32).astype(np.float16).astype(f32)
    rows = qx.shape[0]
    acc, summs = np.zeros((rows, 8), f32), np.zeros(rows, f32)
    for b in range(qx.shape[1]):
        if mx is not None:
            summs = (summs + (mx[:, b] * sy[b]).astype(f32)).astype(f32)
        xy = (qx[:, b, :] * qy[b][None, :]).reshape(rows, 8, 4).sum(axis=2).astype(f32)
        acc = fma(np.repeat((dx[:, b] * dy[b]).astype(f32)[:, None], 8, 1), xy, acc)
    return (hsum8(acc) + summs).astype(f32)


def expf(x):
    """ggml_v_expf, AVX-512."""
    x = x.astype(f32)
    h = lambda s: np.full_like(x, f32(float.fromhex(s)))
    r = h("0x1.8p23")
    z = fma(x, h("0x1.715476p+0"), r)
    n = (z - r).astype(f32)
    b = fma(-n, h("0x1.7f7d1cp-20"), fma(-n, h("0x1.62e4p-1"), x))
    u = (b * b).astype(f32)
    j = fma(fma(fma(h("0x1.0e4020p-7"), b, h("0x1.573e2ep-5")), u, fma(h("0x1.555e66p-3"), b, h("0x1.fffdb6p-2"))),
            u, fma(h("0x1.ffffecp-1"), b, np.ones_like(x)))
    with np.errstate(over="ignore", invalid="ignore"):
        res = np.ldexp(j.astype(np.float64), np.nan_to_num(n).astype(np.int64)).astype(f32)
    return np.where(np.abs(n) > 192, np.where(n <= 0, f32(0), f32(np.inf)), res).astype(f32)


def rms(x, w):
    s = 0.0
    for v in x:
        s += float(f32(v) * f32(v))
    scale = f32(1) / f32(np.sqrt(f32(f32(s / len(x)) + eps)))
    return ((x * scale).astype(f32) * w).astype(f32)


def rope(x, pos, variant):
    nd = x.shape[-1]
    ts = f32(libm.powf(f32(base), f32(-2.0) / f32(nd)))
    theta, out = f32(pos), x.copy()
    for i in range(nd // 2):
        c, s = f32(libm.cosf(theta)), f32(libm.sinf(theta))
        theta = f32(theta * ts)
        x0, x1 = x[..., 2 * i], x[..., 2 * i + 1]
        if variant == "separate":
            a = ((x0 * c).astype(f32) - (x1 * s).astype(f32)).astype(f32)
            b = ((x0 * s).astype(f32) + (x1 * c).astype(f32)).astype(f32)
        elif variant == "fma(x0, .)":
            a, b = fma(x0, c, -(x1 * s).astype(f32)), fma(x0, s, (x1 * c).astype(f32))
        else:  # fma(x1, .)
            a, b = fma(-x1, s, (x0 * c).astype(f32)), fma(x1, c, (x0 * s).astype(f32))
        out[..., 2 * i], out[..., 2 * i + 1] = a, b
    return out


def reduce16(a):
    t = (a[..., 8:] + a[..., :8]).astype(f32)
    q = (t[..., 4:] + t[..., :4]).astype(f32)
    return ((q[..., 0] + q[..., 2]).astype(f32) + (q[..., 1] + q[..., 3]).astype(f32)).astype(f32)


def vec_dot(x, y):
    """ggml_vec_dot_f32 (AVX-512) along the last axis (a multiple of 64)."""
    acc = [np.zeros(x.shape[:-1] + (16,), f32) for _ in range(4)]
    for i in range(0, x.shape[-1], 64):
        for j in range(4):
            sl = slice(i + 16 * j, i + 16 * j + 16)
            acc[j] = fma(x[..., sl], np.broadcast_to(y[..., sl], x[..., sl].shape), acc[j])
    return reduce16((((acc[0] + acc[2]).astype(f32)) + ((acc[1] + acc[3]).astype(f32))).astype(f32))


unequal = {}


def check(op, got, ref):
    ref = ref.reshape(-1).astype(f32)
    got = np.asarray(got, f32).reshape(-1)
    n = int((ref.view(np.uint32) != got.view(np.uint32)).sum())
    total = unequal.setdefault(op, [0, 0])
    total[0] += n
    total[1] += ref.size


w = {}
for s in range(len(tokens)):
    g = lambda name: dump[f"{s}/{name}"]
    check("embedding (Q8_0 rows)", dense("token_embd.weight")[tokens[s]], g("embd"))
    h = g("embd").reshape(-1)
    for L in range(n_layers):
        p = f"blk.{L}."
        for key in ("attn_norm", "ffn_norm"):
            w.setdefault(p + key, dense(p + key + ".weight"))
        check("rms norm x weight", rms(h, w[p + "attn_norm"]), g(f"attn_norm-{L}"))
        x = g(f"attn_norm-{L}").reshape(-1)
        for name, t in (("attn_q", "Qcur"), ("attn_k", "Kcur"), ("attn_v", "Vcur")):
            check("Q4_1 products", product(p + name + ".weight", x), g(f"{t}-{L}"))
        q, k = g(f"Qcur-{L}#1")[0, 0], g(f"Kcur-{L}#1")[0, 0]
        for variant in ("separate", "fma(x0, .)", "fma(x1, .)"):
            check(f"rope, {variant}", rope(q, s, variant), g(f"Qcur-{L}#2"))
            check(f"rope, {variant}", rope(k, s, variant), g(f"Kcur-{L}#2"))
        qr = g(f"Qcur-{L}#2")[0, 0]
        heads, kv = qr.shape[0], k.shape[0]
        n_kv = g(f"kq-{L}").shape[-1]
        K = np.zeros((n_kv, kv, q.shape[1]), f32)
        V = np.zeros_like(K)
        for t in range(s + 1):
            K[t], V[t] = dump[f"{t}/Kcur-{L}#2"][0, 0], dump[f"{t}/Vcur-{L}#1"][0, 0]
        kq = np.stack([vec_dot(K[:, hh * kv // heads, :], qr[hh]) for hh in range(heads)])
        ref_kq = g(f"kq-{L}")[0, :, 0, :]
        check("scores K q (vec_dot_f32)", kq[:, :s + 1], ref_kq[:, :s + 1])
        sc = (ref_kq * f32(1 / np.sqrt(q.shape[1]))).astype(f32)
        sc[:, s + 1:] = -np.inf
        e = np.stack([expf((sc[hh] - sc[hh].max()).astype(f32)) for hh in range(heads)])
        tot = sum(reduce16(e[:, i:i + 16]).astype(np.float64) for i in range(0, n_kv, 16))
        probs = (e * (1.0 / tot).astype(f32)[:, None]).astype(f32)
        ref_p = g(f"kq_soft_max-{L}")[0, :, 0, :]
        check("softmax (expf, f64 sums)", probs, ref_p)
        o = np.stack([vec_dot(V[:, hh * kv // heads, :].T.copy(), ref_p[hh]) for hh in range(heads)])
        check("value sums (vec_dot_f32)", o, g(f"kqv-{L}")[0, :, 0, :])
        check("Q4_1 products", product(p + "attn_output.weight", g(f"kqv_out-{L}").reshape(-1)), g(f"attn_out-{L}"))
        hi = (h + g(f"attn_out-{L}").reshape(-1)).astype(f32)
        check("residual adds", hi, g(f"ffn_inp-{L}"))
        hi = g(f"ffn_inp-{L}").reshape(-1)
        check("rms norm x weight", rms(hi, w[p + "ffn_norm"]), g(f"ffn_norm-{L}"))
        x = g(f"ffn_norm-{L}").reshape(-1)
        check("Q4_1 products", product(p + "ffn_gate.weight", x), g(f"ffn_gate-{L}"))
        check("Q4_1 products", product(p + "ffn_up.weight", x), g(f"ffn_up-{L}"))
        gate, up = g(f"ffn_gate-{L}").reshape(-1), g(f"ffn_up-{L}").reshape(-1)
        sw = ((gate / (f32(1) + expf((f32(0) - gate).astype(f32))).astype(f32)).astype(f32) * up).astype(f32)
        check("swiglu (expf)", sw, g(f"ffn_swiglu-{L}"))
        check("Q4_1 products", product(p + "ffn_down.weight", g(f"ffn_swiglu-{L}").reshape(-1)), g(f"ffn_out-{L}"))
        h = (hi + g(f"ffn_out-{L}").reshape(-1)).astype(f32)
        check("residual adds", h, g(f"l_out-{L}"))
        h = g(f"l_out-{L}").reshape(-1)
    check("rms norm x weight", rms(h, dense("output_norm.weight")), g("result_norm"))
    check("Q8_0 output head", product("token_embd.weight", g("result_norm").reshape(-1)), g("result_output"))

print(f"llama.cpp's tensors for {len(tokens)} tokens decoded one at a time, {n_layers} layers;")
print("elements whose bits differ from the emulation, per operation:")
for op, (n, total) in unequal.items():
    print(f"  {op:28s} {n:8d} of {total}")
