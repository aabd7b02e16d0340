#!/usr/bin/env python3
"""Builds an import test case and its expected scores outside Rust, with numpy.

Writes tools/tests/data/numpy/{model.toml, weights.safetensors, requests.jsonl, expected.json}:
a DeepFM model with a wide part (every term of docs/model.md), its weights in PyTorch layout,
requests with multi-valued, missing, unknown and request-level features, and the scores computed
here in float64 from the model math and the feature rules (scripts/feature_ops_vectors.py).
The same four files under numpy/dcn/ (wide & deep with two low-rank DCN-v2 cross layers parallel
to the deep tower) and numpy/mmoe/ (a multi-task model: three experts, a softmax gate and a tower
per head; expected.json then also has "heads", every head's scores by name).

    pip install numpy xxhash
    python3 scripts/numpy_reference.py

The Rust test tools/tests/import_score.rs imports the weights with `rankd-tool import`, scores the
requests with `rankd-tool score` and compares within 1e-5 (every head of the multi-task case).
"""
import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import feature_ops_vectors as fo  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "tools", "tests", "data", "numpy")

FEATURES = [
    ("user_age", "float"), ("user_gender", "string"), ("user_city", "string"),
    ("user_hist", "int_list"), ("item_id", "int"), ("item_cat", "string"),
    ("item_tags", "string_list"), ("item_price", "float"),
]
SLOTS = [
    {"name": "age_b", "transform": "piecewise", "input": "user_age", "boundaries": [18, 25, 35, 50, 65]},
    {"name": "gender", "transform": "pickcat", "input": "user_gender", "vocabulary": ["f", "m"], "oov_buckets": 1},
    {"name": "city", "transform": "pickcat", "input": "user_city",
     "vocabulary": ["Paris", "Tokyo", "Lagos", "Lima"], "oov_buckets": 5},
    {"name": "hist", "transform": "pickcat", "input": "user_hist", "vocabulary": [10, 20, 30, 40], "oov_buckets": 3},
    {"name": "item", "transform": "combinehash", "inputs": ["item_id"], "buckets": 97},
    {"name": "cat", "transform": "pickcat", "input": "item_cat",
     "vocabulary": ["news", "sport", "music", "film"], "oov_buckets": 2},
    {"name": "tags", "transform": "pickcat", "input": "item_tags",
     "vocabulary": ["a", "b", "c", "d", "e"], "oov_buckets": 2},
    {"name": "age_x_gender", "transform": "descartes", "inputs": ["age_b", "gender"]},
    {"name": "cat_x_city", "transform": "combinehash", "inputs": ["item_cat", "user_city"], "buckets": 50},
    {"name": "age_n", "transform": "normalize", "input": "user_age", "mean": 38.0, "std": 13.0, "clip": 3.0},
    {"name": "price_n", "transform": "normalize", "input": "item_price", "mean": 2.0, "std": 1.5, "log1p": True},
]
SPEC = {"hash_seed": 5, "features": [{"name": n, "type": t} for n, t in FEATURES], "slots": SLOTS}
EMB = [("age_b", "sum"), ("gender", "sum"), ("city", "sum"), ("hist", "mean"), ("item", "sum"),
       ("cat", "sum"), ("tags", "mean"), ("age_x_gender", "sum"), ("cat_x_city", "sum")]
DIM = 4
WIDE = ["age_b", "city", "item", "cat", "age_x_gender", "cat_x_city"]
DENSE = ["age_n", "price_n"]
LAYERS = [16, 8, 1]
# numpy/dcn: cross layers of rank CROSS_RANK parallel to the deep tower.
CROSS_LAYERS, CROSS_RANK = 2, 3
# numpy/mmoe: EXPERTS experts of EXPERT, a gate and a TOWER per head.
EXPERTS, EXPERT, TOWER, HEADS = 3, [12, 8], [4, 1], ["click", "like"]


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    return "[" + ", ".join(toml_value(x) for x in v) + "]"


def write_toml(path, kind="deepfm"):
    lines = [f"hash_seed = {SPEC['hash_seed']}", f"fm = {toml_value(kind == 'deepfm')}", ""]
    for n, t in FEATURES:
        lines += ["[[feature]]", f"name = {json.dumps(n)}", f"type = {json.dumps(t)}", ""]
    for s in SLOTS:
        lines.append("[[slot]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in s.items()]
        lines.append("")
    for slot, pooling in EMB:
        lines += ["[[embedding]]", f"slot = {json.dumps(slot)}", f"dim = {DIM}", f"pooling = {json.dumps(pooling)}", ""]
    if kind == "mmoe":
        lines += ["[deep]", f"dense = {toml_value(DENSE)}", f"layers = {toml_value(EXPERT)}", ""]
        lines += ["[multitask]", f"experts = {EXPERTS}", f"tower = {toml_value(TOWER)}", ""]
        for h in HEADS:
            lines += ["[[heads]]", f"name = {json.dumps(h)}", ""]
    else:
        lines += ["[wide]", f"slots = {toml_value(WIDE)}", ""]
        lines += ["[deep]", f"dense = {toml_value(DENSE)}", f"layers = {toml_value(LAYERS)}", ""]
    if kind == "dcn":
        lines += ["[cross]", f"layers = {CROSS_LAYERS}", f"rank = {CROSS_RANK}",
                  'structure = "parallel"', ""]
    open(path, "w").write("\n".join(lines))


def num_ids():
    # Same rules as feature-ops; computed by running the Python implementation's bookkeeping.
    out = {}
    for s in SLOTS:
        t = s["transform"]
        if t == "piecewise":
            out[s["name"]] = len(s["boundaries"]) + 2
        elif t == "pickcat":
            out[s["name"]] = len(s["vocabulary"]) + s["oov_buckets"] + 1
        elif t == "descartes":
            n = 1
            for i in s["inputs"]:
                n *= out[i]
            out[s["name"]] = n
        elif t == "combinehash":
            out[s["name"]] = s["buckets"] + 1
    return out


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def dense(T, name, x, relu):
    h = T[f"{name}.weight"].astype(np.float64) @ x + T[f"{name}.bias"].astype(np.float64)
    return np.maximum(h, 0.0) if relu else h


def logits(kind, T, fields, x, slots):
    """Every head's logit (one for a single-task model) of one item, from docs/model.md."""
    if kind == "mmoe":
        experts = []
        for k in range(EXPERTS):
            h = x
            for i in range(len(EXPERT)):
                h = dense(T, f"expert.{k}.{i}", h, True)
            experts.append(h)
        out = []
        for head in HEADS:
            z = dense(T, f"gate.{head}", x, False)
            g = np.exp(z - z.max())
            g /= g.sum()
            h = sum(g[k] * experts[k] for k in range(EXPERTS))
            for i in range(len(TOWER)):
                h = dense(T, f"tower.{head}.{i}", h, i + 1 < len(TOWER))
            out.append(h[0])
        return out
    h = x
    for i in range(len(LAYERS)):
        h = dense(T, f"deep.{i}", h, i + 1 < len(LAYERS))
    logit = h[0] + float(T["wide.bias"][0])
    for slot in WIDE:
        logit += T[f"wide.{slot}"].astype(np.float64)[slots[slot]].sum()
    if kind == "deepfm":
        F = np.stack(fields)
        logit += 0.5 * ((F.sum(axis=0) ** 2) - (F ** 2).sum(axis=0)).sum()
    if kind == "dcn":
        xl = x.copy()
        for l in range(CROSS_LAYERS):
            U = T[f"cross.{l}.u"].astype(np.float64)
            V = T[f"cross.{l}.v"].astype(np.float64)
            xl = x * (U @ (V.T @ xl) + T[f"cross.{l}.bias"].astype(np.float64)) + xl
        logit += T["cross.output"].astype(np.float64) @ xl
    return [logit]


def build(kind, out, seed):
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = num_ids()
    T = {}
    for slot, _ in EMB:
        T[f"embedding.{slot}"] = (rng.standard_normal((ids[slot], DIM)) * 0.3).astype(np.float32)
    width = len(EMB) * DIM + len(DENSE)
    d = width

    def layer(name, out, inp, scale=None):
        scale = np.sqrt(2.0 / inp) if scale is None else scale
        T[f"{name}.weight"] = (rng.standard_normal((out, inp)) * scale).astype(np.float32)
        T[f"{name}.bias"] = (rng.standard_normal(out) * 0.05).astype(np.float32)

    if kind == "mmoe":
        for k in range(EXPERTS):
            w = d
            for i, o in enumerate(EXPERT):
                layer(f"expert.{k}.{i}", o, w)
                w = o
        for head in HEADS:
            layer(f"gate.{head}", EXPERTS, d, 0.5)
            w = EXPERT[-1]
            for i, o in enumerate(TOWER):
                layer(f"tower.{head}.{i}", o, w)
                w = o
    else:
        for slot in WIDE:
            T[f"wide.{slot}"] = (rng.standard_normal(ids[slot]) * 0.2).astype(np.float32)
        T["wide.bias"] = np.array([-0.4], dtype=np.float32)
        for i, o in enumerate(LAYERS):
            layer(f"deep.{i}", o, width)
            width = o
    if kind == "dcn":
        for l in range(CROSS_LAYERS):
            for part in ("u", "v"):
                T[f"cross.{l}.{part}"] = (rng.standard_normal((d, CROSS_RANK)) * 0.15).astype(np.float32)
            T[f"cross.{l}.bias"] = (rng.standard_normal(d) * 0.05).astype(np.float32)
        T["cross.output"] = (rng.standard_normal(d) * 0.2).astype(np.float32)
    write_toml(os.path.join(out, "model.toml"), kind)
    write_safetensors(os.path.join(out, "weights.safetensors"), T)

    requests = []
    heads = HEADS if kind == "mmoe" else ["score"]
    expected = {h: [] for h in heads}
    cities = ["Paris", "Tokyo", "Atlantis", "Lima", None]
    for r in range(25):
        user = {}
        if r % 5 != 4:
            user["user_age"] = float(rng.uniform(10, 80)) if r % 2 else int(rng.integers(10, 80))
        if r % 3:
            user["user_gender"] = ["f", "m", "x"][r % 3]
        c = cities[r % len(cities)]
        if c is not None:
            user["user_city"] = c
        user["user_hist"] = [int(x) for x in rng.choice([10, 20, 30, 99, 7], size=r % 4)]
        items = []
        for i in range(1 + (r * 7) % 30):
            item = {"item_id": int(rng.integers(0, 10**9))}
            if i % 4:
                item["item_cat"] = ["news", "sport", "knitting", "film"][i % 4]
            item["item_tags"] = [str(x) for x in rng.choice(list("abcdxyz"), size=i % 5)]
            if i % 6 != 5:
                item["item_price"] = float(rng.uniform(0, 50))
            if i % 9 == 8:
                item["user_city"] = "Lagos"  # an item overriding a request-level feature
            if i % 11 == 10:
                item["item_id"] = None
            items.append(item)
        requests.append({"user": user, "items": items})
        per_head = {h: [] for h in heads}
        for item in items:
            row = dict(user)
            row.update({k: v for k, v in item.items() if v is not None})
            row = {k: v for k, v in row.items() if v is not None}
            slots = fo.run(SPEC, row)
            fields = []
            for slot, pooling in EMB:
                table = T[f"embedding.{slot}"].astype(np.float64)
                rows = table[slots[slot]]
                fields.append(rows.mean(axis=0) if pooling == "mean" else rows.sum(axis=0))
            x = np.concatenate(fields + [np.array([np.float64(np.float32(slots[d]))]) for d in DENSE])
            for h, logit in zip(heads, logits(kind, T, fields, x, slots)):
                per_head[h].append(1.0 / (1.0 + np.exp(-logit)))
        for h in heads:
            expected[h].append(per_head[h])
    with open(os.path.join(out, "requests.jsonl"), "w") as f:
        for r in requests:
            f.write(json.dumps(r) + "\n")
    doc = {"scores": expected[heads[0]]}
    if kind == "mmoe":
        doc["heads"] = expected
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(doc, f)


def main():
    build("deepfm", OUT, 2024)
    build("dcn", os.path.join(OUT, "dcn"), 2025)
    build("mmoe", os.path.join(OUT, "mmoe"), 2026)


if __name__ == "__main__":
    main()
