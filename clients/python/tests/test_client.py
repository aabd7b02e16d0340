"""The Python client against the real daemon: scores equal `rankd-tool score` on the Adult
requests (blocking and asyncio, lists and numpy); every error code a client can cause; a server
restart mid-load; a deadline."""
import asyncio
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import rankd  # noqa: E402
from rankd import _wire as w  # noqa: E402
from conftest import REPO, binary  # noqa: E402

ADULT = os.path.join(REPO, "examples", "models", "adult", "1", "model.rkm")
REQUESTS = os.path.join(REPO, "examples", "adult", "requests.jsonl")


def adult_requests():
    reqs = [json.loads(l) for l in open(REQUESTS) if l.strip()]
    csv = os.path.join(REPO, "..", "shared", "data", "adult", "test.csv")
    if os.path.exists(csv):
        lines = open(csv).read().splitlines()
        header = lines[0].split(",")
        for k in range(10):
            items = []
            for row in lines[1 + 40 * k: 41 + 40 * k]:
                item = {}
                for name, cell in zip(header, row.split(",")):
                    if name == "label":
                        continue
                    try:
                        item[name] = float(cell)
                    except ValueError:
                        item[name] = cell
                items.append(item)
            reqs.append({"user": {}, "items": items})
    return reqs


def reference_lines(reqs, model=None):
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"rankd-py-{os.getpid()}.jsonl")
    with open(path, "w") as f:
        for r in reqs:
            f.write(json.dumps(r) + "\n")
    out = subprocess.run([binary("rankd-tool"), "score", model or ADULT, "--requests", path],
                         check=True, capture_output=True, text=True).stdout
    os.remove(path)
    return [json.loads(l) for l in out.splitlines() if l.strip()]


def reference_scores(reqs):
    return [line["scores"] for line in reference_lines(reqs)]


def test_multitask_heads_equal_rankd_tool(daemon):
    """The bundled multi-task Adult model: every head by name, the default head's scores as
    `scores`, each equal to `rankd-tool score`."""
    model = os.path.join(REPO, "examples", "models", "adult-multitask", "1", "model.rkm")
    reqs = []
    for r in adult_requests():
        items = [{k: v for k, v in i.items() if k != "hours-per-week"} for i in r["items"]]
        user = {k: v for k, v in (r.get("user") or {}).items() if k != "hours-per-week"}
        reqs.append({"user": user, "items": items})
    want = reference_lines(reqs, model)
    d = daemon()
    with rankd.Client(d.addr) as c:
        for r, w in zip(reqs, want):
            got = c.score("adult-multitask", r["items"], r["user"])
            assert list(got.heads) == ["income", "long_hours"]
            assert got.heads["income"] == got.scores
            for name, values in w["heads"].items():
                assert got.heads[name] == pytest.approx(values, abs=1e-6)
            arr = c.score("adult-multitask", r["items"], r["user"], numpy=True)
            np.testing.assert_allclose(arr.heads["long_hours"], w["heads"]["long_hours"], atol=1e-6)
        # A single-task model's answers carry no heads.
        assert c.score("adult", reqs[0]["items"]).heads == {}
        # The status lists each version's heads.
        heads = {m["name"]: m["versions"][0]["heads"] for m in c.status()}
        assert heads == {"adult": [], "adult-multitask": ["income", "long_hours"]}


def test_scores_equal_rankd_tool(daemon):
    d = daemon()
    reqs = adult_requests()
    want = reference_scores(reqs)
    with rankd.Client(d.addr) as c:
        c.ping()
        for r, ws in zip(reqs, want):
            got = c.score("adult", r["items"], r.get("user"))
            assert got.model == "adult" and got.version == 1
            assert got.scores == pytest.approx(ws, abs=1e-6)
            arr = c.score("adult", r["items"], r.get("user"), numpy=True).scores
            assert isinstance(arr, np.ndarray) and arr.dtype == np.float32
            np.testing.assert_allclose(arr, ws, atol=1e-6)
        st = c.status()
        assert st[0]["name"] == "adult" and st[0]["versions"][0]["version"] == 1

    async def pipelined():
        async with rankd.AsyncClient(d.addr) as c:
            return await asyncio.gather(*[c.score("adult", r["items"], r.get("user"))
                                          for r in reqs for _ in range(3)])

    got = asyncio.run(pipelined())
    for i, g in enumerate(got):
        assert g.scores == pytest.approx(want[i // 3], abs=1e-6)


def test_error_codes(daemon, tmp_path):
    config = tmp_path / "rankd.toml"
    config.write_text("[limits]\nmax_items = 4\n")
    d = daemon(os.path.join(REPO, "examples", "models"), "--config", str(config))
    item = {"age": 39.0, "workclass": "State-gov"}

    def code_of(fn):
        with pytest.raises(rankd.ServerError) as e:
            fn()
        return e.value

    with rankd.Client(d.addr) as c:
        e = code_of(lambda: c.score("nope", [item]))
        assert (e.code, e.name) == (2, "UnknownModel") and "nope" in e.message
        assert code_of(lambda: c.score("adult", [item], version=9)).name == "UnknownVersion"
        assert code_of(lambda: c.score("adult", [item], label="canary")).name == "UnknownVersion"
        e = code_of(lambda: c.score("adult", [{"age": "old"}]))
        assert e.name == "BadFeature" and "age" in e.message
        assert code_of(lambda: c.score("adult", [item] * 5)).name == "LimitExceeded"
        # A body that is not a ScoreRequest, and a message type that is not a request.
        t, body = c.call(w.SCORE_REQUEST, b"\x00\x01garbage")
        assert t == w.ERROR and w.decode_error(body)[0] == 1
        t, body = c.call(w.PONG)
        assert t == w.ERROR and w.decode_error(body)[0] == 7
        # The connection is still good after every error.
        assert len(c.score("adult", [item]).scores) == 1


def test_deadline(daemon):
    d = daemon()
    big = [{"age": float(i), "workclass": "State-gov"} for i in range(5000)]
    with rankd.Client(d.addr) as c:
        with pytest.raises((rankd.DeadlineExceeded, rankd.ServerError)) as e:
            c.score("adult", big, deadline=1e-5)
        if isinstance(e.value, rankd.ServerError):
            assert e.value.name == "DeadlineExceeded"
        # The call after a local deadline works (the client reconnects).
        assert len(c.score("adult", big[:3]).scores) == 3


def test_restart_mid_load(daemon):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    listen = f"127.0.0.1:{port}"
    d = daemon(os.path.join(REPO, "examples", "models"), listen=listen)
    c = rankd.Client(listen, timeout=2.0)
    item = [{"age": 40.0}]
    assert len(c.score("adult", item).scores) == 1
    d.stop()
    # Fails fast and clearly while the server is down...
    for _ in range(3):
        with pytest.raises(rankd.ConnectionLost):
            c.score("adult", item)
    # ...and works again once it is back (the client reconnects on the next call).
    daemon(os.path.join(REPO, "examples", "models"), listen=listen)
    assert len(c.score("adult", item).scores) == 1


def test_cli(daemon):
    d = daemon()
    out = subprocess.run([sys.executable, "-m", "rankd", "score", "--addr", d.addr, "--model",
                          "adult", REQUESTS], check=True, capture_output=True, text=True,
                         cwd=os.path.join(os.path.dirname(__file__), ".."))
    lines = [json.loads(l) for l in out.stdout.splitlines()]
    want = reference_scores([json.loads(l) for l in open(REQUESTS) if l.strip()])
    assert [l["scores"] for l in lines] == [pytest.approx(x, abs=1e-6) for x in want]
    assert all("heads" not in l for l in lines)
    # A multi-task model: every head by name, as rankd-tool score writes them.
    out = subprocess.run([sys.executable, "-m", "rankd", "score", "--addr", d.addr, "--model",
                          "adult-multitask", REQUESTS], check=True, capture_output=True,
                         text=True, cwd=os.path.join(os.path.dirname(__file__), ".."))
    lines = [json.loads(l) for l in out.stdout.splitlines()]
    model = os.path.join(REPO, "examples", "models", "adult-multitask", "1", "model.rkm")
    want = reference_lines([json.loads(l) for l in open(REQUESTS) if l.strip()], model)
    for got, w in zip(lines, want):
        assert list(got["heads"]) == ["income", "long_hours"]
        for name, values in w["heads"].items():
            assert got["heads"][name] == pytest.approx(values, abs=1e-6)
