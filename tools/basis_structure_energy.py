#!/usr/bin/env python3
"""Key energy kept at a fixed rank by DynaKV's joint basis and by two
cheaper-to-attend structures, from a calibration artifact.

Why: a pre-RoPE key stored at rank r costs r x d multiply-adds to rebuild
before it can be rotated and dotted (d = KV heads x head width), against the
dense cache's n_heads x head_dim. Two structures would cost less, and this
measures what they give up on the artifact's own calibration statistics:

- per-head bases (one basis per KV head, ranks split among heads by
  eigenvalue): a key rebuilds at r x head_dim;
- frequency-block bases (one complex basis per RoPE frequency, over that
  frequency's pair in every KV head): RoPE then commutes with the basis, so
  scores are taken in latent space with each latent coordinate turned by its
  frequency's angle (about r x (1 + query heads) multiply-adds a token).

Energy is the uncentered second moment of pre-RoPE keys (the mean counted,
as the cache adds it back exactly); rank is the same total of real
coordinates for every structure (a complex coordinate counts two).

Usage: tools/basis_structure_energy.py ARTIFACT [BUDGET ...]  (needs numpy)
"""
import json
import struct
import sys

import numpy as np


def load(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = json.loads(header["__metadata__"]["dynakv"])

    def get(name):
        info = header[name]
        if info["dtype"] != "F32":
            raise SystemExit(f"{name}: expected F32, found {info['dtype']}")
        a, b = info["data_offsets"]
        return np.frombuffer(data[a:b], dtype=np.float32).reshape(info["shape"]).astype(np.float64)

    layers = sorted({int(k.split(".")[1]) for k in header if k.startswith("layer.")})
    return meta, layers, get


def kept(moment, centered_eigs, mean, budget, n_kv, head_dim, interleaved):
    d = moment.shape[0]
    r = int(round(budget * d))
    total = np.trace(moment)
    # joint basis: the mean exact, the top r directions of the centred covariance
    joint = 1 - (centered_eigs.sum() - np.sort(centered_eigs)[::-1][:r].sum()) / total
    # per-head bases on the same statistics: top r eigenvalues over all heads' blocks
    cov = moment - np.outer(mean, mean)
    heads = np.concatenate([
        np.linalg.eigvalsh(cov[g * head_dim:(g + 1) * head_dim, g * head_dim:(g + 1) * head_dim])
        for g in range(n_kv)
    ])
    per_head = 1 - (np.trace(cov) - np.sort(heads)[::-1][:r].sum()) / total
    # frequency blocks: complex coordinate (re, im) of pair i in every head
    pairs = head_dim // 2
    eigs = []
    for i in range(pairs):
        if interleaved:
            re = [g * head_dim + 2 * i for g in range(n_kv)]
        else:
            re = [g * head_dim + i for g in range(n_kv)]
        im = [j + (1 if interleaved else pairs) for j in re]
        a_rr = moment[np.ix_(re, re)]
        a_ii = moment[np.ix_(im, im)]
        a_ri = moment[np.ix_(re, im)]
        herm = (a_rr + a_ii) + 1j * (a_ri.T - a_ri)
        eigs.extend(np.linalg.eigvalsh(herm))
    freq = np.sort(np.array(eigs))[::-1][: r // 2].sum() / total
    return joint, per_head, freq


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    meta, layers, get = load(sys.argv[1])
    budgets = [float(b) for b in sys.argv[2:]] or [0.30, 0.47]
    model = meta["model"]
    n_kv, head_dim = model["n_kv_heads"], model["head_dim"]
    interleaved = model["architecture"] == "llama"
    print(f"{model['architecture']}: {len(layers)} layers, {n_kv} KV heads x {head_dim}, "
          f"RoPE pairs {'interleaved' if interleaved else 'split halves'}")
    print("| budget | joint basis (DynaKV) | per-head bases | frequency-block bases |")
    print("|---|---|---|---|")
    for budget in budgets:
        rows = []
        for l in layers:
            dec, eig, mean = (get(f"layer.{l}.k.{x}") for x in ("dec", "eigenvalues", "mean"))
            moment = dec.T @ np.diag(eig) @ dec + np.outer(mean, mean)
            rows.append(kept(moment, eig, mean, budget, n_kv, head_dim, interleaved))
        lost = 1 - np.array(rows).mean(axis=0)
        print(f"| {budget:.2f} | " + " | ".join(f"{100 * x:.1f}% lost" for x in lost) + " |")


if __name__ == "__main__":
    main()
