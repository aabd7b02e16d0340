"""A rankd model in Python, as a team would write its own serving code: the feature transforms of
docs/feature-ops.md row by row (scripts/feature_ops_vectors.py, the independent implementation the
Rust tests check against) and the network of docs/model.md in batched numpy float32. The peer
servers of the KServe v2 comparison (MLServer, KServe's model server) wrap it; it reads the model
straight from the .rkm file (blob offsets from `rankd-tool inspect --json`).

Inputs follow docs/kserve.md: per feature a column of N item values (None, NaN or "" for
missing) or one request-level value.
"""
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import feature_ops_vectors as fo  # noqa: E402


class RankdModel:
    def __init__(self, inspect_json, rkm):
        spec = json.load(open(inspect_json))["spec"]
        self.fspec = spec["features"]
        self.types = {f["name"]: f["type"] for f in self.fspec["features"]}
        arch = spec["architecture"]
        data = np.memmap(rkm, dtype=np.uint8, mode="r")

        def blob(b):
            return np.frombuffer(data, dtype="<f4", count=b["len"], offset=b["offset"])

        self.emb = [(e["slot"], e["pooling"], blob(e["weights"]).reshape(-1, e["dim"]))
                    for e in arch["embeddings"]]
        self.dense = arch["dense_inputs"]
        wide = arch.get("wide")
        self.wide = [(w["slot"], blob(w["weights"])) for w in wide["slots"]] if wide else []
        self.wide_bias = np.float32(wide["bias"]) if wide else np.float32(0)
        self.layers = [(blob(l["weight"]).reshape(l["out_dim"], l["in_dim"]), blob(l["bias"]),
                        l["activation"] == "relu") for l in arch["deep"]]
        self.fm = arch["fm"]
        self.cache = {}

    def _value(self, name, v):
        if v is None:
            return None
        if isinstance(v, bytes):
            v = v.decode()
        t = self.types.get(name)
        if t == "float":
            v = float(v)
            return None if math.isnan(v) else v
        if t == "int":
            v = float(v) if not isinstance(v, int) else v
            return None if isinstance(v, float) and math.isnan(v) else int(v)
        if t == "string":
            return v or None
        if t == "int_list":
            return [int(x) for x in v]
        return [x.decode() if isinstance(x, bytes) else x for x in v if x]

    def _column(self, name, columns, n):
        if name not in columns:
            return [None] * n
        values, per_item = columns[name]
        if per_item:
            return [self._value(name, values[i]) for i in range(n)]
        return [self._value(name, values[0])] * n

    def transform(self, columns, n):
        """The slots of docs/feature-ops.md, column by column: id slots as one id list per row,
        dense slots as a float32 column. Vocabularies are indexed and hashes memoized once."""
        seed = self.fspec["hash_seed"]
        raw, out, num_ids = {}, {}, {}

        def col(name):
            if name not in raw:
                raw[name] = self._column(name, columns, n)
            return raw[name]

        def listed(v):
            return [] if v is None else (v if isinstance(v, list) else [v])

        for s in self.fspec["slots"]:
            t, name = s["transform"], s["name"]
            if t == "piecewise":
                b = s["boundaries"]
                x = np.array([np.nan if v is None else v for v in col(s["input"])], dtype=np.float64)
                ids = np.searchsorted(np.array(b), x, side="right")
                ids[np.isnan(x)] = len(b) + 1
                out[name] = [[int(i)] for i in ids]
                num_ids[name] = len(b) + 2
            elif t == "pickcat":
                key = ("pickcat", name)
                if key not in self.cache:
                    self.cache[key] = ({v: i for i, v in enumerate(s["vocabulary"])}, {})
                index, memo = self.cache[key]
                nv, m = len(s["vocabulary"]), s["oov_buckets"]

                def lookup(x):
                    i = index.get(x)
                    if i is None:
                        i = memo.get(x)
                        if i is None:
                            i = memo[x] = nv + fo.H([x], seed) % m
                    return i

                out[name] = [[lookup(x) for x in listed(v)] or [nv + m] for v in col(s["input"])]
                num_ids[name] = nv + m + 1
            elif t == "descartes":
                rows = [[0] for _ in range(n)]
                total = 1
                for inp in s["inputs"]:
                    k = num_ids[inp]
                    rows = [[a * k + b for a in r for b in o] for r, o in zip(rows, out[inp])]
                    total *= k
                out[name] = rows
                num_ids[name] = total
            elif t == "combinehash":
                cols = [col(f) for f in s["inputs"]]
                ids = []
                for vals in zip(*cols):
                    if any(v is None for v in vals):
                        ids.append([s["buckets"]])
                    else:
                        flat = [x for v in vals for x in listed(v)]
                        ids.append([fo.H(flat, seed) % s["buckets"]])
                out[name] = ids
                num_ids[name] = s["buckets"] + 1
            elif t in ("hash", "prefix"):
                ids = []
                for v in col(s["input"]):
                    vals = listed(v)
                    if t == "prefix":
                        vals = [x[: s["length"]] for x in vals]
                    ids.append([fo.H([x], seed) % s["buckets"] for x in vals] or [s["buckets"]])
                out[name] = ids
                num_ids[name] = s["buckets"] + 1
            elif t == "normalize":
                x = np.array([np.nan if v is None else v for v in col(s["input"])], dtype=np.float64)
                if s.get("log1p"):
                    with np.errstate(invalid="ignore"):
                        x = np.where(x > -1, np.log1p(np.where(x > -1, x, 0)), np.nan)
                y = (x - s["mean"]) / s["std"]
                if s.get("clip") is not None:
                    y = np.clip(y, -s["clip"], s["clip"])
                out[name] = np.nan_to_num(y, nan=0.0).astype(np.float32)
        return out

    def score(self, columns, n):
        """columns: name -> (values, per_item). Returns n float32 scores."""
        slots = self.transform(columns, n)
        fields = []
        for slot, pooling, table in self.emb:
            ids = slots[slot]
            if all(len(r) == 1 for r in ids):
                pooled = table[np.fromiter((r[0] for r in ids), dtype=np.int64, count=n)]
            else:
                pooled = np.empty((n, table.shape[1]), dtype=np.float32)
                for i, r in enumerate(ids):
                    pooled[i] = table[r].mean(axis=0) if pooling == "mean" else table[r].sum(axis=0)
            fields.append(pooled)
        dense = np.stack([slots[d] for d in self.dense], axis=1) if self.dense else np.zeros((n, 0), np.float32)
        logit = np.zeros(n, dtype=np.float32)
        if self.layers:
            h = np.concatenate(fields + [dense], axis=1)
            for w, b, relu in self.layers:
                h = h @ w.T + b
                if relu:
                    h = np.maximum(h, 0)
            logit += h[:, 0]
        for slot, w in self.wide:
            logit += np.array([w[r].sum() for r in slots[slot]], dtype=np.float32)
        logit += self.wide_bias
        if self.fm and fields:
            f = np.stack(fields)
            logit += 0.5 * ((f.sum(axis=0) ** 2) - (f ** 2).sum(axis=0)).sum(axis=1)
        return (1.0 / (1.0 + np.exp(-logit.astype(np.float64)))).astype(np.float32)


def columns_from_tensors(tensors):
    """tensors: [(name, shape, values as a flat list or array)] -> (columns, n) per docs/kserve.md."""
    n = 1
    for name, shape, _ in tensors:
        if not name.endswith(".lengths") and shape and shape[0] != 1:
            n = shape[0]
    lengths = {name[:-8]: list(v) for name, _, v in tensors if name.endswith(".lengths")}
    cols = {}
    for name, shape, values in tensors:
        if name.endswith(".lengths"):
            continue
        values = list(values)
        rows = shape[0] if shape else 1
        k = shape[1] if len(shape) == 2 else 1
        if len(shape) == 2 and k != 1 or name in lengths:
            lens = lengths.get(name, [k] * rows)
            values = [values[r * k: r * k + lens[r]] for r in range(rows)]
        cols[name] = (values, rows != 1 or n == 1)
    return cols, n
