"""`dyn serve`: a read-only live dashboard. A run that a Recorder is writing shows its new rows in a real
browser within seconds, without a reload; nothing outside the runs folder is served; GET only."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pandas as pd
import pytest
import torch

from dynamics import Recorder, load_run, save_run
from tests.browser import browser, open_page  # noqa: F401 - the fixture
from tests.helpers import CLI_ENV, batches, dyn, make_model


class Training(threading.Thread):
    """A Recorder on a small MLP, stepping every few milliseconds until stopped; then the run is closed."""

    def __init__(self, run_dir):
        super().__init__(daemon=True)
        self.run_dir = run_dir
        self.stop = threading.Event()
        self.started = threading.Event()
        self.error = None

    def run(self):
        try:
            model = make_model()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            rec = Recorder(model, optimizer, self.run_dir, every=5)
            data = batches(50)
            while not self.stop.is_set():
                x, y = data[rec.t % len(data)]
                rec.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))
                if rec.t == 20:
                    self.started.set()
                time.sleep(0.01)
            rec.close()
        except BaseException as e:  # reported by the test that needs the run
            self.error = e
            self.started.set()


def serve(root, *args):
    """`dyn serve ROOT --port 0 ARGS` as a user starts it: (process, base URL from its first line)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", str(root), "--port", "0", *args],
        stderr=subprocess.PIPE,
        text=True,
        env=CLI_ENV,
    )
    line = process.stderr.readline()
    assert " at http://" in line, line + process.stderr.read()
    return process, line.split(" at ")[1].split()[0], line


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    root = tmp / "runs"
    step = np.arange(1, 41)
    frame = pd.DataFrame({"step": step, "loss": 1.0 / step, "grad_norm": np.ones(40), "threshold": np.inf})
    frame["clipped"] = False
    metrics = frame.assign(step_size=0.1, smoothness=2.0)
    save_run(root / "done", {"clipper": {"kind": "NoClip"}, "every": 1}, metrics=metrics, steps=frame)
    save_run(tmp / "outside", {"clipper": {"kind": "NoClip"}, "every": 1}, metrics=metrics, steps=frame)
    os.symlink(tmp / "outside", root / "escape")  # a link out of the folder: not a run under it
    training = Training(root / "live")
    training.start()
    assert training.started.wait(60) and training.error is None, training.error
    process, base, line = serve(root, "--interval", "1")
    yield base, root, line
    process.send_signal(signal.SIGINT)
    process.wait(20)
    training.stop.set()
    training.join(60)


def get(base, path):
    with urllib.request.urlopen(base + path.lstrip("/"), timeout=30) as response:
        return response.status, response.read()


def raw(base, method, path):
    """(status, headers, body) of a request sent exactly as written (no client-side path cleaning)."""
    host, port = base.split("//")[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest(method, path, skip_accept_encoding=True)
    conn.endheaders()
    response = conn.getresponse()
    out = response.status, dict(response.getheaders()), response.read()
    conn.close()
    return out


def test_api_runs_lists_the_runs_under_the_root(dashboard):
    base, root, line = dashboard
    assert base.startswith("http://127.0.0.1:")  # loopback unless --host says otherwise
    status, body = get(base, "/api/runs")
    runs = {r["name"]: r for r in json.loads(body)}
    assert status == 200 and set(runs) == {"done", "live"}  # the link out is not followed
    assert runs["done"]["status"] == "finished" and runs["done"]["steps"] == 40
    assert runs["live"]["status"] == "running" and runs["live"]["steps"] >= 20
    assert {"name", "status", "steps", "clipper", "last_loss"} <= set(runs["live"])


def test_a_running_run_grows_in_the_browser_without_reload(dashboard, browser):  # noqa: F811
    base, root, _ = dashboard
    page, log = open_page(browser, base + "run/live", allow=(base,))
    page.wait_for_selector("body[data-rendered=true]", timeout=30000)
    page.evaluate("window.loadedOnce = true")
    first = page.evaluate("() => Math.max(...document.getElementById('fig1-loss')._fullData[0].x)")
    page.wait_for_function(
        f"() => Math.max(...document.getElementById('fig1-loss')._fullData[0].x) > {first}", timeout=10000
    )
    assert page.evaluate("window.loadedOnce") is True  # the same page: no reload
    x, y = page.evaluate(
        """() => { const t = document.getElementById('fig1-loss')._fullData[0];
                   return [Array.from(t.x), Array.from(t.y)]; }"""
    )
    metrics = load_run(root / "live").metrics.set_index("step")
    assert x == sorted(x) and x[-1] > first
    assert all(metrics.loss[s] == v for s, v in zip(x, y))  # the rows as recorded, new ones included
    assert log.errors == [] and log.warnings == [] and log.blocked == []


def test_index_page_lists_the_runs_and_refreshes(dashboard, browser):  # noqa: F811
    base, _, _ = dashboard
    page, log = open_page(browser, base, allow=(base,))
    page.wait_for_function("() => document.body.dataset.updated !== undefined", timeout=10000)
    rows = page.evaluate(
        """() => Array.from(document.querySelectorAll('#runs-body tr'))
                   .map(r => [r.children[1].textContent, r.children[2].textContent])"""
    )
    assert rows == [["done", "finished"], ["live", "running"]]
    assert log.errors == [] and log.blocked == []


def test_get_only(dashboard):
    base, _, _ = dashboard
    for method in ("POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"):
        status, headers, _ = raw(base, method, "/api/runs")
        assert status == 405 and headers["Allow"] == "GET", method


def test_nothing_outside_the_root_is_served(dashboard):
    base, _, _ = dashboard
    for path in (
        "/run/../../../../etc/passwd",
        "/run/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/api/run/..%2f..%2f..%2fetc%2fpasswd",
        "/static/../../../../etc/passwd",
        "/run//etc/passwd",
        "/api/run/%2fetc%2fpasswd",
    ):
        status, _, body = raw(base, "GET", path)
        assert status == 403 and b"root:" not in body, path
    for path in ("/run/escape", "/api/run/escape", "/etc/passwd", "/run/nosuch"):
        status, _, body = raw(base, "GET", path)
        assert status == 404, path


def test_ctrl_c_port_in_use_and_bad_roots_end_with_one_line(dashboard, tmp_path):
    base, root, _ = dashboard
    port = base.rstrip("/").rsplit(":", 1)[1]
    busy = dyn("serve", root, "--port", port)
    assert busy.returncode == 2 and busy.stderr.count("\n") == 1 and "in use" in busy.stderr, busy.stderr
    for args, message in [((tmp_path,), "no runs under"), ((tmp_path / "missing",), "no such folder")]:
        result = dyn("serve", *args, "--port", "0")
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    process, _, line = serve(root)
    process.send_signal(signal.SIGINT)
    assert process.wait(20) == 130
    assert process.stderr.read() == "dyn: interrupted\n"


def non_loopback_address() -> str | None:
    """An address of this machine that is not loopback: the one a route out would use (nothing is sent)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_loopback_only_unless_asked(dashboard):
    base, _, _ = dashboard
    port = int(base.rstrip("/").rsplit(":", 1)[1])
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address, port), timeout=5).close()
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
