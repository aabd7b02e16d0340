"""python -m rankd score --addr HOST:PORT --model NAME requests.jsonl

Scores JSON-lines requests ({"user": {...}, "items": [{...}, ...]}, the offline scorer's format)
and prints one {"scores": [...]} line per request (with "heads": {"NAME": [...], ...} for a
multi-task model, as `rankd-tool score` writes), or {"error": ...}."""
import argparse
import json
import sys

from .client import Client
from .errors import ServerError


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m rankd")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score", help="score JSON-lines requests")
    s.add_argument("--addr", default="127.0.0.1:7470")
    s.add_argument("--model", required=True)
    s.add_argument("--version", type=int, default=0)
    s.add_argument("--label", default="")
    s.add_argument("requests", nargs="?", default="-")
    a = p.parse_args(argv)
    src = sys.stdin if a.requests == "-" else open(a.requests)
    failed = 0
    with Client(a.addr) as c:
        for line in src:
            if not line.strip():
                continue
            r = json.loads(line)
            try:
                res = c.score(a.model, r.get("items", []), r.get("user"), version=a.version,
                              label=a.label)
                out = {"scores": res.scores}
                if res.heads:  # a multi-task model: every head, as `rankd-tool score` writes
                    out["heads"] = res.heads
                print(json.dumps(out))
            except ServerError as e:
                failed += 1
                print(json.dumps({"error": e.name, "message": e.message}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
