"""The golden frames of clients/testdata/golden: this client's requests decode to the same
fields as the reference (Rust) client's, and it decodes the golden responses as documented."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import rankd  # noqa: E402
from rankd import _wire as w  # noqa: E402
from rankd.rpc_generated import Kind, ScoreRequest  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "..", "testdata", "golden")
CASES = json.load(open(os.path.join(GOLDEN, "cases.json")))
KINDS = {v: k for k, v in vars(Kind).items() if not k.startswith("_")}


def read(name):
    return open(os.path.join(GOLDEN, name), "rb").read()


def s(b):
    return b.decode() if b is not None else ""


def decode_request(body):
    """Every field of a ScoreRequest body, order-independent."""
    r = ScoreRequest.GetRootAs(body, 0)
    user = {}
    for i in range(r.UserLength()):
        f = r.User(i)
        k = f.Kind()
        v = {Kind.F64: lambda: f.F64(), Kind.I64: lambda: f.I64(), Kind.Str: lambda: s(f.Str()),
             Kind.I64List: lambda: [f.I64s(j) for j in range(f.I64sLength())],
             Kind.StrList: lambda: [s(f.Strs(j)) for j in range(f.StrsLength())]}[k]()
        user[s(f.Name())] = (KINDS[k], v)
    n = r.NumItems()
    cols = {}
    for i in range(r.ItemsLength()):
        c = r.Items(i)
        k = c.Kind()
        missing = [bool(c.Missing(j // 8) >> (j % 8) & 1) if c.MissingLength() else False
                   for j in range(n)]
        if k in (Kind.I64List, Kind.StrList):
            offs = [c.Offsets(j) for j in range(c.OffsetsLength())]
            get = (lambda j: c.I64s(j)) if k == Kind.I64List else (lambda j: s(c.Strs(j)))
            vals = [[get(x) for x in range(offs[j], offs[j + 1])] for j in range(n)]
        else:
            get = {Kind.F64: c.F64s, Kind.I64: c.I64s, Kind.Str: lambda j: s(c.Strs(j))}[k]
            vals = [get(j) for j in range(n)]
        cols[s(c.Name())] = (KINDS[k], [None if m else v for v, m in zip(vals, missing)])
    return {"model": s(r.Model()), "version": r.Version(), "label": s(r.Label()),
            "routing_key": s(r.RoutingKey()), "deadline_us": r.DeadlineUs(), "num_items": n,
            "user": user, "items": cols}


def python_value(v):
    return v["value"]


@pytest.mark.parametrize("case", CASES["requests"], ids=lambda c: c["name"])
def test_requests_match_the_reference_client(case):
    golden = read(case["file"])
    items = [{f["name"]: python_value(f["value"]) for f in row} for row in case["items"]]
    user = {f["name"]: python_value(f["value"]) for f in case["user"]}
    body = w.encode_score_request(case["model"], items, user, version=case["version"],
                                  label=case["label"], routing_key=case["routing_key"],
                                  deadline_us=case["deadline_us"])
    ours = w.frame(w.SCORE_REQUEST, case["id"], body)
    assert ours[:16] == golden[:16]
    t, rid, n = w.parse_header(golden[:20])
    assert (t, rid, n) == (w.SCORE_REQUEST, case["id"], len(golden) - 20)
    want = decode_request(golden[20:])
    got = decode_request(body)
    assert got == want


@pytest.mark.parametrize("case", CASES["responses"], ids=lambda c: c["name"])
def test_responses_decode_as_documented(case):
    data = read(case["file"])
    t, rid, n = w.parse_header(data[:20])
    body = data[20:20 + n]
    assert (t, rid) == (case["type"], case["id"]) and len(data) == 20 + n
    if t == w.SCORE_RESPONSE:
        model, version, scores, heads = w.decode_score_response(body)
        assert (model, version) == (case["model"], case["version"])
        assert scores == pytest.approx(case["scores"], rel=1e-7)
        want = case.get("heads", [])
        assert list(heads) == [name for name, _ in want]
        for name, values in want:
            assert heads[name] == pytest.approx(values, rel=1e-7)
    elif t == w.ERROR:
        with pytest.raises(rankd.ServerError) as e:
            raise rankd.ServerError(*w.decode_error(body))
        assert e.value.code == case["code"] and e.value.message == case["message"]
        assert e.value.name == case.get("code_name", f"code {case['code']}")
    else:
        assert t == w.PONG and n == 0
