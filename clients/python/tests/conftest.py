"""Starts the real rankd binary for the tests: RANKD_BIN, else target/debug/rankd (built with
`cargo build --bin rankd --bin rankd-tool`); the tests skip with the reason when neither exists
(outside CI)."""
import os
import subprocess
import threading

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def binary(name):
    env = {"rankd": "RANKD_BIN", "rankd-tool": "RANKD_TOOL_BIN"}[name]
    path = os.environ.get(env) or os.path.join(REPO, "target", "debug", name)
    if not os.path.exists(path):
        reason = f"no {name} binary at {path} (cargo build --bin {name}, or set {env})"
        if os.environ.get("CI"):
            raise RuntimeError(reason)
        pytest.skip(reason)
    return path


class Daemon:
    def __init__(self, models, *extra, listen="127.0.0.1:0"):
        self.proc = subprocess.Popen(
            [binary("rankd"), "--models", models, "--listen", listen, "--admin",
             "127.0.0.1:0", "--threads", "1", *extra],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        log = []
        for line in self.proc.stderr:
            log.append(line)
            if line.startswith("rankd: serving on "):
                self.addr = line.split()[3]
                break
        else:
            raise RuntimeError("rankd exited before serving:\n" + "".join(log))
        # Keep draining stderr so the daemon never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def stop(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def daemon():
    started = []

    def start(models=os.path.join(REPO, "examples", "models"), *extra, listen="127.0.0.1:0"):
        d = Daemon(models, *extra, listen=listen)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
