"""Checks that a KServe v2 server scores like rankd: the same requests (JSON tensors, or binary
ones for servers that take BYTES only in binary form) to rankd's REST endpoint and to the peer's.

    python check_scores.py RANKD_HTTP PEER_HTTP MODEL adult|random [REQUESTS]

`adult`: 50 rows of ../shared/data/adult/test.csv per request. `random`: 50 items per request,
values drawn per input from the model's metadata (a fifth of the strings missing), seeded.
"""
import os
import sys

import numpy as np
import tritonclient.http as th

rankd_url, peer_url, model, mode = sys.argv[1:5]
count = int(sys.argv[5]) if len(sys.argv) > 5 else 10
rankd, peer = th.InferenceServerClient(url=rankd_url), th.InferenceServerClient(url=peer_url)
rng = np.random.default_rng(7)
WORDS = [f"w{i}".encode() for i in range(40)] + [b"news", b"sport", b"film", b""]


def adult_requests():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "adult", "test.csv")
    lines = open(path).read().splitlines()
    header = lines[0].split(",")
    for k in range(count):
        rows = [l.split(",") for l in lines[1 + 50 * k: 51 + 50 * k]]
        req = []
        for j, name in enumerate(header):
            if name == "label":
                continue
            vals = [r[j] for r in rows]
            try:
                req.append((name, "FP64", np.array([float(v) for v in vals])))
            except ValueError:
                req.append((name, "BYTES", np.array([v.encode() for v in vals], dtype=np.object_)))
        yield req


def random_requests():
    meta = rankd.get_model_metadata(model)
    for _ in range(count):
        req = []
        for t in meta["inputs"]:
            if len(t["shape"]) == 2 and t["shape"][1] == -1:
                continue  # lists: covered by the Rust tests
            missing = rng.random(50) < 0.2
            if t["datatype"] == "FP64":
                # No NaN: MLServer 1.7.1 refuses NaN in JSON tensors (422).
                v = rng.uniform(-5, 100, 50)
            elif t["datatype"] == "INT64":
                v = rng.integers(0, 10**6, 50)
            else:
                v = np.array([WORDS[i] if not m else b"" for i, m in
                              zip(rng.integers(0, len(WORDS), 50), missing)], dtype=np.object_)
            req.append((t["name"], t["datatype"], v))
        yield req


def inputs(req, binary):
    out = []
    for name, dt, arr in req:
        i = th.InferInput(name, [len(arr)], dt)
        i.set_data_from_numpy(arr, binary_data=binary)
        out.append(i)
    return out


worst = 0.0
out = [th.InferRequestedOutput("score", binary_data=False)]
for req in (adult_requests() if mode == "adult" else random_requests()):
    a = rankd.infer(model, inputs(req, False), outputs=out).as_numpy("score").reshape(-1)
    try:
        b = peer.infer(model, inputs(req, False), outputs=out).as_numpy("score").reshape(-1)
    except Exception as e:  # KServe 0.21 takes BYTES tensors only in binary form
        if "inference-header-content-length" not in str(e):
            raise
        b = peer.infer(model, inputs(req, True), outputs=out).as_numpy("score").reshape(-1)
    assert a.shape == b.shape, (a.shape, b.shape)
    worst = max(worst, float(np.max(np.abs(a - b))))
print(f"{peer_url} {model}: {count} requests of 50 items, max |score - rankd| = {worst:.2e}")
sys.exit(0 if worst <= 1e-5 else 1)
