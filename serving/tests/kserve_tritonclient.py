"""Scores the Adult requests through Triton's own Python clients (gRPC and HTTP, binary and
JSON tensors) against a running rankd and checks every score equals the binary RPC's within
1e-6; then the bundled multi-task model's heads (outputs `score.income`, `score.long_hours`)
against the binary RPC's. Run by serving/tests/kserve.rs with: GRPC_ADDR HTTP_ADDR CASES_JSON."""

import json
import sys

import numpy as np
import tritonclient.grpc as tg
import tritonclient.http as th

grpc_addr, http_addr, cases_path = sys.argv[1:4]
cases = json.load(open(cases_path))
MODEL = "adult"

gc = tg.InferenceServerClient(url=grpc_addr)
hc = th.InferenceServerClient(url=http_addr)
for c in (gc, hc):
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(MODEL)
assert "statistics" in gc.get_server_metadata().extensions
assert "model_configuration" in hc.get_server_metadata()["extensions"]
meta = hc.get_model_metadata(MODEL)
types = {t["name"]: t["datatype"] for t in meta["inputs"]}
assert meta["outputs"][0]["name"] == "score"
grpc_meta = gc.get_model_metadata(MODEL)
assert [t.name for t in grpc_meta.inputs] == [t["name"] for t in meta["inputs"]]
config = gc.get_model_config(MODEL).config
assert config.max_batch_size > 0 and len(config.input) == len(types)
assert hc.get_model_config(MODEL)["max_batch_size"] == config.max_batch_size


def array(datatype, values):
    if datatype == "BYTES":
        return np.array([b"" if v is None else str(v).encode() for v in values], dtype=np.object_)
    if datatype == "INT64":
        return np.array(values, dtype=np.int64)
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def inputs(module, case, binary, types=types, skip=()):
    out = []
    n = len(case["items"])
    item_names = sorted({k for item in case["items"] for k in item} - set(skip))
    for name in item_names:
        a = array(types[name], [item.get(name) for item in case["items"]])
        i = module.InferInput(name, [n], types[name])
        if module is th:
            i.set_data_from_numpy(a, binary_data=binary)
        else:
            i.set_data_from_numpy(a)
        out.append(i)
    for name, v in sorted(case["user"].items()):
        if name in skip:
            continue
        a = array(types[name], [v])
        i = module.InferInput(name, [1], types[name])
        if module is th:
            i.set_data_from_numpy(a, binary_data=binary)
        else:
            i.set_data_from_numpy(a)
        out.append(i)
    return out


worst = {}
for k, case in enumerate(cases):
    want = np.array(case["scores"], dtype=np.float32)
    runs = {
        "grpc": lambda: gc.infer(MODEL, inputs(tg, case, True),
                                 outputs=[tg.InferRequestedOutput("score")]),
        "http-binary": lambda: hc.infer(MODEL, inputs(th, case, True),
                                        outputs=[th.InferRequestedOutput("score", binary_data=True)]),
        "http-json": lambda: hc.infer(MODEL, inputs(th, case, False),
                                      outputs=[th.InferRequestedOutput("score", binary_data=False)]),
    }
    for how, run in runs.items():
        got = run().as_numpy("score")
        assert got.shape == want.shape, (how, k, got.shape, want.shape)
        diff = float(np.max(np.abs(got.astype(np.float64) - want))) if len(want) else 0.0
        assert diff <= 1e-6, (how, k, diff)
        worst[how] = max(worst.get(how, 0.0), diff)

# The multi-task model: its outputs by name, every head equal to the binary RPC's.
MT = "adult-multitask"
mt_meta = hc.get_model_metadata(MT)
assert [t["name"] for t in mt_meta["outputs"]] == ["score", "score.income", "score.long_hours"]
mt_types = {t["name"]: t["datatype"] for t in mt_meta["inputs"]}
for k, case in enumerate(cases):
    skip = ("hours-per-week",)
    for name, want in case["heads"].items():
        want = np.array(want, dtype=np.float32)
        out = "score." + name
        for how, r in {
            "grpc": gc.infer(MT, inputs(tg, case, True, mt_types, skip),
                             outputs=[tg.InferRequestedOutput(out)]),
            "http-binary": hc.infer(MT, inputs(th, case, True, mt_types, skip),
                                    outputs=[th.InferRequestedOutput(out, binary_data=True)]),
            "http-json": hc.infer(MT, inputs(th, case, False, mt_types, skip),
                                  outputs=[th.InferRequestedOutput(out, binary_data=False)]),
        }.items():
            got = r.as_numpy(out)
            assert got.shape == want.shape, (how, k, name, got.shape, want.shape)
            diff = float(np.max(np.abs(got.astype(np.float64) - want))) if len(want) else 0.0
            assert diff <= 1e-6, (how, k, name, diff)
            worst["heads " + how] = max(worst.get("heads " + how, 0.0), diff)
    # Without outputs asked for: `score` (the default head) and `score.long_hours`.
    r = gc.infer(MT, inputs(tg, case, True, mt_types, skip))
    assert np.array_equal(r.as_numpy("score"), np.array(case["heads"]["income"], np.float32))
    assert r.as_numpy("score.long_hours") is not None

# Errors come back as the clients' exceptions with the server's message.
for c, m in ((gc, tg), (hc, th)):
    try:
        c.infer("no-such-model", inputs(m, cases[0], True))
        raise SystemExit("an unknown model was scored")
    except Exception as e:  # InferenceServerException
        assert "no-such-model" in str(e), str(e)

stats = gc.get_inference_statistics(MODEL).model_stats[0]
assert stats.inference_count > 0 and stats.inference_stats.success.count > 0
print(f"tritonclient: {len(cases)} requests; max |score - binary RPC| "
      + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
