#!/usr/bin/env python3
"""rankd's CPU engine against onnxruntime and PyTorch on the same whole feed model, one thread each
(issue #18). Run by benches/engine-peers.sh, which builds engine_sizes first.

The feed model (formats/src/synth.rs, `feed`): 26 categorical slots with a 16-wide embedding each,
13 dense inputs, a wide part on the 26 slots, deep layers 429 -> 256 -> 128 -> 1, sigmoid.
`engine_sizes --export DIR` writes its tensors and, for requests of 20, 200, 1,000 and 10,000
items, every item's slot ids and dense inputs (what rankd computes from the raw features) and
rankd's scores. The peers get those precomputed ids (they skip the transforms rankd does):

- ORT whole model, one fused table: one Gather over the 26 tables concatenated (ids offset), the
  wide weights likewise, Concat with the dense inputs, three Gemms, Sigmoid;
- ORT whole model, per-slot gathers: 26 Gathers on 26 tables;
- PyTorch (TorchScript, frozen, inference mode), one fused table;
- ORT MLP only (deep layers on a ready 429-wide input), against rankd's deep layers alone.

Every peer's scores are checked against rankd's (max absolute difference printed; the check
fails above 1e-5). Rounds alternate rankd and the peers; each cell is the median of the rounds.

With a DCN-v2 export (`engine_sizes --cross L:R:S --export DIR`, issue #21) the ORT whole models
add the cross layers (Gemm, or MatMul then Gemm for low rank; Mul; Add) and only the whole
models are compared (rankd runs a cross model without the split).

Usage: engine_peers.py EXPORT_DIR ENGINE_SIZES_BINARY [ROUNDS] [SECONDS] [ISA] [CROSS]
"""
import json
import os
import subprocess
import sys
import time

import numpy as np

SIZES = [20, 200, 1000, 10000]


def rate(fn, items, seconds):
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n * items / (time.perf_counter() - start)


def load(d):
    a = lambda name: np.load(os.path.join(d, name))  # noqa: E731
    emb = [a(f"emb_{i}.npy") for i in range(26)]
    wide = [a(f"wide_{i}.npy") for i in range(26)]
    layers = [(a(f"w{l}.npy"), a(f"b{l}.npy")) for l in range(3)]
    req = {n: (a(f"ids_{n}.npy"), a(f"dense_{n}.npy"), a(f"scores_{n}.npy")) for n in SIZES}
    return emb, wide, a("wide_bias.npy"), layers, req


def load_cross(d):
    path = os.path.join(d, "cross.json")
    if not os.path.exists(path):
        return None
    c = json.load(open(path))
    a = lambda name: np.load(os.path.join(d, name))  # noqa: E731
    c["tensors"] = []
    for l in range(c["layers"]):
        if c["rank"] == 0:
            c["tensors"].append((a(f"cross_{l}_w.npy"), None, a(f"cross_{l}_b.npy")))
        else:
            c["tensors"].append((a(f"cross_{l}_u.npy"), a(f"cross_{l}_v.npy"), a(f"cross_{l}_b.npy")))
    c["out"] = a("cross_out.npy") if c["parallel"] else None
    return c


def cross_nodes(helper, numpy_helper, cross, x, inits, nodes):
    """x_{l+1} = x0 * (W x_l + b) + x_l; returns the last output's name."""
    prev = x
    for l, (w, v, b) in enumerate(cross["tensors"]):
        inits += [numpy_helper.from_array(w, f"cw{l}"), numpy_helper.from_array(b, f"cb{l}")]
        if v is None:
            nodes.append(helper.make_node("Gemm", [prev, f"cw{l}", f"cb{l}"], [f"ct{l}"], transB=1))
        else:
            inits.append(numpy_helper.from_array(v, f"cv{l}"))
            nodes += [
                helper.make_node("MatMul", [prev, f"cv{l}"], [f"cp{l}"]),
                helper.make_node("Gemm", [f"cp{l}", f"cw{l}", f"cb{l}"], [f"ct{l}"], transB=1),
            ]
        nodes += [
            helper.make_node("Mul", [x, f"ct{l}"], [f"cm{l}"]),
            helper.make_node("Add", [f"cm{l}", prev], [f"cx{l}"]),
        ]
        prev = f"cx{l}"
    return prev


def session(model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def deep_nodes(helper, numpy_helper, layers, x, inits, nodes):
    prev = x
    for l, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(w, f"w{l}"), numpy_helper.from_array(b, f"b{l}")]
        out = f"h{l}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{l}", f"b{l}"], [out], transB=1))
        if l + 1 < len(layers):
            nodes.append(helper.make_node("Relu", [out], [out + "r"]))
            out += "r"
        prev = out
    return prev


def ort_whole(emb, wide, bias, layers, fused, cross=None):
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    if fused:
        offsets = np.cumsum([0] + [t.shape[0] for t in emb[:-1]]).astype(np.int64)
        inits += [
            numpy_helper.from_array(np.concatenate(emb), "E"),
            numpy_helper.from_array(np.concatenate(wide), "W"),
            numpy_helper.from_array(offsets, "off"),
        ]
        nodes += [
            helper.make_node("Add", ["ids", "off"], ["fid"]),
            helper.make_node("Gather", ["E", "fid"], ["g"]),
            helper.make_node("Gather", ["W", "fid"], ["gw"]),
        ]
    else:
        embs, wides = [], []
        for i in range(26):
            inits += [
                numpy_helper.from_array(emb[i], f"E{i}"),
                numpy_helper.from_array(wide[i], f"W{i}"),
                numpy_helper.from_array(np.array([i], dtype=np.int64), f"i{i}"),
            ]
            nodes += [
                helper.make_node("Gather", ["ids", f"i{i}"], [f"id{i}"], axis=1),
                helper.make_node("Gather", [f"E{i}", f"id{i}"], [f"g{i}"]),
                helper.make_node("Gather", [f"W{i}", f"id{i}"], [f"gw{i}"]),
            ]
            embs.append(f"g{i}")
            wides.append(f"gw{i}")
        nodes += [
            helper.make_node("Concat", embs, ["g"], axis=1),
            helper.make_node("Concat", wides, ["gw"], axis=1),
        ]
    inits += [
        numpy_helper.from_array(np.array([-1, 26 * 16], dtype=np.int64), "shape"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(bias.astype(np.float32), "bias"),
    ]
    nodes += [
        helper.make_node("Reshape", ["g", "shape"], ["flat"]),
        helper.make_node("Concat", ["flat", "dense"], ["x"], axis=1),
    ]
    if cross is None:
        deep = deep_nodes(helper, numpy_helper, layers, "x", inits, nodes)
    elif cross["parallel"]:
        xl = cross_nodes(helper, numpy_helper, cross, "x", inits, nodes)
        d = deep_nodes(helper, numpy_helper, layers, "x", inits, nodes)
        inits.append(numpy_helper.from_array(cross["out"], "cout"))
        nodes += [
            helper.make_node("MatMul", [xl, "cout"], ["clogit"]),
            helper.make_node("Add", [d, "clogit"], ["dc"]),
        ]
        deep = "dc"
    else:
        xl = cross_nodes(helper, numpy_helper, cross, "x", inits, nodes)
        deep = deep_nodes(helper, numpy_helper, layers, xl, inits, nodes)
    nodes += [
        helper.make_node("ReduceSum", ["gw", "axis1"], ["ws"], keepdims=1),
        helper.make_node("Add", ["ws", "bias"], ["wb"]),
        helper.make_node("Add", [deep, "wb"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "feed",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 26]),
            helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["n", 13]),
        ],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["n", 1])],
        inits,
    )
    return session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def ort_mlp(layers):
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    out = deep_nodes(helper, numpy_helper, layers, "x", inits, nodes)
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 429])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", 1])],
        inits,
    )
    return session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def torch_whole(emb, wide, bias, layers):
    import torch

    torch.set_num_threads(1)
    offsets = np.cumsum([0] + [t.shape[0] for t in emb[:-1]]).astype(np.int64)

    class Feed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.E = torch.nn.Parameter(torch.from_numpy(np.concatenate(emb)), requires_grad=False)
            self.W = torch.nn.Parameter(
                torch.from_numpy(np.concatenate(wide)).unsqueeze(1), requires_grad=False)
            self.off = torch.nn.Parameter(torch.from_numpy(offsets), requires_grad=False)
            self.bias = torch.nn.Parameter(torch.from_numpy(bias), requires_grad=False)
            self.l0 = torch.nn.Linear(429, 256)
            self.l1 = torch.nn.Linear(256, 128)
            self.l2 = torch.nn.Linear(128, 1)
            for lin, (w, b) in zip([self.l0, self.l1, self.l2], layers):
                lin.weight = torch.nn.Parameter(torch.from_numpy(w), requires_grad=False)
                lin.bias = torch.nn.Parameter(torch.from_numpy(b), requires_grad=False)

        def forward(self, ids, dense):
            fid = ids + self.off
            g = torch.nn.functional.embedding(fid, self.E).reshape(ids.shape[0], 416)
            x = torch.cat([g, dense], dim=1)
            h = torch.relu(self.l0(x))
            h = torch.relu(self.l1(h))
            deep = self.l2(h)
            w = torch.nn.functional.embedding(fid, self.W).sum(dim=1) + self.bias
            return torch.sigmoid(deep + w)

    m = torch.jit.freeze(torch.jit.script(Feed().eval()))
    return m, torch


def main():
    d, binary = sys.argv[1], sys.argv[2]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    secs = float(sys.argv[4]) if len(sys.argv) > 4 else 0.4
    isa = sys.argv[5] if len(sys.argv) > 5 else ""
    emb, wide, bias, layers, req = load(d)
    cross = load_cross(d)
    import onnxruntime as ort

    peers = {
        "ort_fused": ort_whole(emb, wide, bias, layers, True, cross),
        "ort_slots": ort_whole(emb, wide, bias, layers, False, cross),
    }
    if cross is not None:
        return main_cross(peers, req, binary, rounds, secs, isa, cross, ort)
    peers["ort_mlp"] = ort_mlp(layers)
    tmodel, torch = torch_whole(emb, wide, bias, layers)
    # Scores against rankd's.
    worst = {}
    for n in SIZES:
        ids, dense, want = req[n]
        for name in ["ort_fused", "ort_slots"]:
            got = peers[name].run(None, {"ids": ids, "dense": dense})[0][:, 0]
            worst[name] = max(worst.get(name, 0.0), float(np.abs(got - want).max()))
        with torch.inference_mode():
            got = tmodel(torch.from_numpy(ids), torch.from_numpy(dense)).numpy()[:, 0]
        worst["torch"] = max(worst.get("torch", 0.0), float(np.abs(got - want).max()))
    for name, w in worst.items():
        print(json.dumps({"check": name, "max_abs_score_diff_vs_rankd": w}))
        assert w <= 1e-5, f"{name} scores differ from rankd's by {w}"

    cells = {}
    add = lambda k, n, v: cells.setdefault((k, n), []).append(v)  # noqa: E731
    for r in range(rounds):
        args = [binary, "1", str(secs), "--json"] + (["--isa", isa] if isa else [])
        out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        best = isa.lower() if isa else rows[-1]["isa"].lower()
        for row in rows:
            if row["isa"].lower() == best:
                add("rankd " + row["mode"], row["items"], row["items_per_s"])
        for n in SIZES:
            ids, dense, _ = req[n]
            x = np.random.default_rng(n).standard_normal((n, 429)).astype(np.float32)
            add("ort whole, fused", n, rate(lambda: peers["ort_fused"].run(None, {"ids": ids, "dense": dense}), n, secs))
            add("ort whole, per-slot", n, rate(lambda: peers["ort_slots"].run(None, {"ids": ids, "dense": dense}), n, secs))
            add("ort mlp", n, rate(lambda: peers["ort_mlp"].run(None, {"x": x}), n, secs))
            ti, td = torch.from_numpy(ids), torch.from_numpy(dense)
            with torch.inference_mode():
                add("torch whole, fused", n, rate(lambda: tmodel(ti, td), n, secs))
    med = {k: float(np.median(v)) for k, v in cells.items()}
    rng = {k: (min(v), max(v)) for k, v in cells.items()}
    for k in sorted(med):
        print(json.dumps({"what": k[0], "items": k[1], "items_per_s": med[k],
                          "min": rng[k][0], "max": rng[k][1]}))
    print()
    print(f"rankd ISA: {best}; onnxruntime {ort.__version__}; PyTorch {torch.__version__}; "
          f"one thread each; {rounds} rounds of {secs} s; medians")
    print()
    print("| items/s (median of rounds) | " + " | ".join(f"{n:,} items" for n in SIZES) + " |")
    print("|---|" + "---:|" * len(SIZES))
    for what in ["rankd whole, split", "rankd whole, split, unfolded", "rankd whole, no split",
                 "rankd deep layers only",
                 "ort whole, fused", "ort whole, per-slot", "torch whole, fused", "ort mlp"]:
        print(f"| {what} | " + " | ".join(f"{med[(what, n)] / 1e3:.0f}K ({rng[(what, n)][0] / 1e3:.0f}-{rng[(what, n)][1] / 1e3:.0f})" for n in SIZES) + " |")
    print()
    print("| rankd / peer | " + " | ".join(f"{n:,} items" for n in SIZES) + " |")
    print("|---|" + "---:|" * len(SIZES))
    for a, b, label in [
        ("rankd whole, split", "ort whole, fused", "rankd split / ORT whole model (one fused table)"),
        ("rankd whole, split", "ort whole, per-slot", "rankd split / ORT whole model (per-slot gathers)"),
        ("rankd whole, split, unfolded", "ort whole, fused",
         "rankd split, no folded tables / ORT whole model (fused)"),
        ("rankd whole, no split", "ort whole, fused", "rankd no split / ORT whole model (fused)"),
        ("rankd whole, split", "torch whole, fused", "rankd split / PyTorch TorchScript (fused table)"),
        ("rankd deep layers only", "ort mlp", "rankd deep layers only / ORT MLP only"),
    ]:
        print(f"| {label} | " + " | ".join(f"{med[(a, n)] / med[(b, n)]:.2f}" for n in SIZES) + " |")


def main_cross(peers, req, binary, rounds, secs, isa, cross, ort):
    """A DCN-v2 feed model: rankd's whole engine against ORT's whole models."""
    worst = {}
    for n in SIZES:
        ids, dense, want = req[n]
        for name in ["ort_fused", "ort_slots"]:
            got = peers[name].run(None, {"ids": ids, "dense": dense})[0][:, 0]
            worst[name] = max(worst.get(name, 0.0), float(np.abs(got - want).max()))
    for name, w in worst.items():
        print(json.dumps({"check": name, "max_abs_score_diff_vs_rankd": w}))
        assert w <= 1e-5, f"{name} scores differ from rankd's by {w}"
    cells = {}
    add = lambda k, n, v: cells.setdefault((k, n), []).append(v)  # noqa: E731
    spec = f"{cross['layers']}:{cross['rank']}:{'parallel' if cross['parallel'] else 'stacked'}"
    for r in range(rounds):
        args = [binary, "1", str(secs), "--json", "--cross", spec] + (["--isa", isa] if isa else [])
        out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        best = isa.lower() if isa else rows[-1]["isa"].lower()
        for row in rows:
            if row["isa"].lower() == best:
                add("rankd whole", row["items"], row["items_per_s"])
        for n in SIZES:
            ids, dense, _ = req[n]
            add("ort whole, fused", n, rate(lambda: peers["ort_fused"].run(None, {"ids": ids, "dense": dense}), n, secs))
            add("ort whole, per-slot", n, rate(lambda: peers["ort_slots"].run(None, {"ids": ids, "dense": dense}), n, secs))
    med = {k: float(np.median(v)) for k, v in cells.items()}
    rng = {k: (min(v), max(v)) for k, v in cells.items()}
    print()
    print(f"DCN-v2 feed model ({spec}); rankd ISA: {best}; onnxruntime {ort.__version__}; "
          f"one thread each; {rounds} rounds of {secs} s; medians")
    print()
    print("| items/s (median of rounds) | " + " | ".join(f"{n:,} items" for n in SIZES) + " |")
    print("|---|" + "---:|" * len(SIZES))
    for what in ["rankd whole", "ort whole, fused", "ort whole, per-slot"]:
        print(f"| {what} | " + " | ".join(f"{med[(what, n)] / 1e3:.0f}K ({rng[(what, n)][0] / 1e3:.0f}-{rng[(what, n)][1] / 1e3:.0f})" for n in SIZES) + " |")
    print()
    print("| rankd / peer | " + " | ".join(f"{n:,} items" for n in SIZES) + " |")
    print("|---|" + "---:|" * len(SIZES))
    for b in ["ort whole, fused", "ort whole, per-slot"]:
        print(f"| rankd / {b} | " + " | ".join(f"{med[('rankd whole', n)] / med[(b, n)]:.2f}" for n in SIZES) + " |")


if __name__ == "__main__":
    main()
