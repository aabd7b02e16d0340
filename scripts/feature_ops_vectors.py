#!/usr/bin/env python3
"""Independent Python implementation of docs/feature-ops.md, used to write cross-language test
vectors (feature-ops/tests/data/vectors.json). Needs `pip install xxhash`.

    python3 scripts/feature_ops_vectors.py > feature-ops/tests/data/vectors.json

The Rust test `cross_language_vectors` replays every row and compares ids and dense values.
"""
import bisect
import json
import math
import random
import struct

import xxhash


def enc(values):
    out = b""
    for v in values:
        if isinstance(v, int):
            out += b"\x01" + struct.pack("<q", v)
        else:
            e = v.encode("utf-8")
            out += b"\x02" + struct.pack("<I", len(e)) + e
    return out


def H(values, seed):
    return xxhash.xxh3_64_intdigest(enc(values), seed)


SPEC = {
    "hash_seed": 17,
    "features": [
        {"name": "age", "type": "float"},
        {"name": "city", "type": "string"},
        {"name": "item", "type": "int"},
        {"name": "tags", "type": "string_list"},
        {"name": "hist", "type": "int_list"},
    ],
    "slots": [
        {"name": "age_b", "transform": "piecewise", "input": "age", "boundaries": [18, 25, 35.5, 50, 65]},
        {"name": "city_id", "transform": "pickcat", "input": "city",
         "vocabulary": ["Beijing", "Paris", "Tokyo", "São Paulo", ""], "oov_buckets": 7},
        {"name": "item_id", "transform": "pickcat", "input": "item",
         "vocabulary": [5, 1234567890123, -1, 0], "oov_buckets": 100},
        {"name": "tag_id", "transform": "pickcat", "input": "tags",
         "vocabulary": ["news", "sport", "music"], "oov_buckets": 3},
        {"name": "age_x_city", "transform": "descartes", "inputs": ["age_b", "city_id"]},
        {"name": "tag_x_age", "transform": "descartes", "inputs": ["tag_id", "age_b"]},
        {"name": "city_item", "transform": "combinehash", "inputs": ["city", "item"], "buckets": 1000003},
        {"name": "hist_h", "transform": "combinehash", "inputs": ["hist", "tags"], "buckets": 64},
        {"name": "age_n", "transform": "normalize", "input": "age", "mean": 38.5, "std": 13.6, "clip": 2.5},
        {"name": "age_log", "transform": "normalize", "input": "age", "mean": 3.0, "std": 0.5, "log1p": True},
        {"name": "item_h", "transform": "hash", "input": "item", "buckets": 997},
        {"name": "tags_h", "transform": "hash", "input": "tags", "buckets": 31},
        {"name": "city3", "transform": "prefix", "input": "city", "length": 3, "buckets": 101},
        {"name": "tags1", "transform": "prefix", "input": "tags", "length": 1, "buckets": 13},
    ],
}


def run(spec, row):
    seed = spec["hash_seed"]
    out = {}
    num_ids = {}
    for s in spec["slots"]:
        t = s["transform"]
        if t == "piecewise":
            b = s["boundaries"]
            x = row.get(s["input"])
            ids = [len(b) + 1] if x is None or math.isnan(x) else [bisect.bisect_right(b, x)]
            num_ids[s["name"]] = len(b) + 2
        elif t == "pickcat":
            vocab = s["vocabulary"]
            n, m = len(vocab), s["oov_buckets"]
            index = {v: i for i, v in enumerate(vocab)}
            v = row.get(s["input"])
            vals = [] if v is None else (v if isinstance(v, list) else [v])
            ids = [index[x] if x in index else n + H([x], seed) % m for x in vals] or [n + m]
            num_ids[s["name"]] = n + m + 1
        elif t == "descartes":
            ids = [0]
            total = 1
            for name in s["inputs"]:
                k = num_ids[name]
                ids = [a * k + b for a in ids for b in out[name]]
                total *= k
            num_ids[s["name"]] = total
        elif t == "combinehash":
            vals = [row.get(f) for f in s["inputs"]]
            if any(v is None for v in vals):
                ids = [s["buckets"]]
            else:
                flat = []
                for v in vals:
                    flat.extend(v if isinstance(v, list) else [v])
                ids = [H(flat, seed) % s["buckets"]]
            num_ids[s["name"]] = s["buckets"] + 1
        elif t in ("hash", "prefix"):
            # One id per value; prefix keeps the first `length` code points of a string.
            v = row.get(s["input"])
            vals = [] if v is None else (v if isinstance(v, list) else [v])
            if t == "prefix":
                vals = [x[: s["length"]] for x in vals]
            ids = [H([x], seed) % s["buckets"] for x in vals] or [s["buckets"]]
            num_ids[s["name"]] = s["buckets"] + 1
        elif t == "normalize":
            x = row.get(s["input"])
            if x is None or math.isnan(x):
                y = 0.0
            else:
                if s.get("log1p"):
                    x = math.log1p(x) if x > -1 else float("nan")
                y = (x - s["mean"]) / s["std"]
                if s.get("clip") is not None:
                    y = max(-s["clip"], min(s["clip"], y))
                if math.isnan(y):
                    y = 0.0
            out[s["name"]] = y
            continue
        out[s["name"]] = ids
    return out


def main():
    rng = random.Random(5)
    cities = ["Beijing", "Paris", "Tokyo", "São Paulo", "", "Lima", "東京", "x" * 300]
    rows = []
    for i in range(300):
        row = {}
        if rng.random() < 0.9:
            row["age"] = rng.choice([rng.uniform(0, 100), 18.0, 35.5, 65.0, -3.0, 1e12])
        if rng.random() < 0.9:
            row["city"] = rng.choice(cities)
        if rng.random() < 0.9:
            row["item"] = rng.choice([5, 1234567890123, -1, 0, rng.randint(-2**63, 2**63 - 1)])
        if rng.random() < 0.9:
            row["tags"] = [rng.choice(["news", "sport", "music", "cats", "dogs"]) for _ in range(rng.randint(0, 4))]
        if rng.random() < 0.9:
            row["hist"] = [rng.randint(-10**12, 10**12) for _ in range(rng.randint(0, 40))]
        rows.append({"row": row, "expected": run(SPEC, row)})
    print(json.dumps({"spec": SPEC, "cases": rows}, ensure_ascii=False, indent=None))


if __name__ == "__main__":
    main()
