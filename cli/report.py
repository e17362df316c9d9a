"""``dyn report``, ``dyn serve`` and ``dyn ls``: dyn's own window on runs.

report: one self-contained interactive HTML file of runs (opens from disk, no network).
serve:  a read-only live dashboard of the runs under a folder (an index, each run's report,
        running runs' curves extended every few seconds), on 127.0.0.1 unless told otherwise.
ls:     one row per run under a folder: name, status, steps, clipper and p, every, quantities, last loss.
"""

from __future__ import annotations

import csv
import errno
import json
import math
import socket
import sys
import threading
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import click

from cli.common import check_figure_path, environment_failure_at, plottable_runs
from cli.errors import fail

REPORT_FORMATS = (".html", ".htm")


@click.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    default=Path("report.html"),
    show_default=True,
    help="The HTML file to write (in the current folder unless a path is given).",
)
@click.option(
    "--layers",
    "layer_column",
    default=None,
    metavar="COLUMN",
    help="The per-layer heatmap's column (default: update_ratio if recorded, else grad_norm).",
)
@click.option("--title", default=None, help="The page title (default: the run names).")
def report(run_dirs, out, layer_column, title):
    """Write an interactive report of runs: one HTML file, no network needed.

    Panels: Fig. 1 (step size, training loss, gradient norm against smoothness with r and the
    final threshold), gradient norm and threshold over iterations with clipped steps marked,
    the per-layer heatmap, every other metrics column, evaluation curves, the dyn compare table
    (with intervals over seeds when runs form arms) and the findings of dyn diagnose.
    The file holds plotly.js: it opens from disk in a browser with no network.
    """
    check_figure_path(out, formats=REPORT_FORMATS)
    runs = plottable_runs(run_dirs)
    if layer_column is not None:
        from figures.layers import layer_columns

        available = sorted({c for r in runs for c in layer_columns(r)})
        if layer_column not in available:
            fail(f"--layers {layer_column}: no such layers column; the runs have: {', '.join(available) or 'none'}")
    from figures.files import FigurePathError
    from figures.report import write_report

    try:
        write_report(runs, out, layer_column=layer_column, title=title)
    except FigurePathError as e:
        fail(f"--out {e}")
    except OSError as e:
        environment_failure_at(out, e)
    click.echo(f"report: {out} ({out.stat().st_size / 1e6:.1f} MB)", err=True)


# -- dyn ls ----------------------------------------------------------------------------------------

LS_COLUMNS = ("name", "status", "steps", "clipper", "p", "every", "quantities", "last_loss")


def _index(root: Path):
    from dynamics.index import load_runs
    from dynamics.run import RunError

    try:
        return load_runs(root)
    except RunError as e:
        fail(str(e))


@click.command("ls")
@click.argument("root", required=False, default="runs", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects.")
@click.option("--csv", "as_csv", is_flag=True, help="Print a CSV table.")
def ls(root, as_json, as_csv):
    """List the runs under a folder: status, steps, clipper, last loss.

    One row per run under ROOT (default: runs), recursively: its name (path under ROOT), status
    (running; finished; interrupted: nobody records it any more, it can resume; damaged:
    unreadable, with the reason), last step, clipper and p, every, quantities and the loss at
    the last step. Reads config.json and the tables' last rows only.
    """
    if as_json and as_csv:
        fail("choose one of --json and --csv")
    runs = _index(root)
    rows = [r.as_dict() for r in runs]
    columns = list(LS_COLUMNS) + (["error"] if any(r["error"] for r in rows) else [])
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif as_csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=[*LS_COLUMNS, "error"], lineterminator="\n")
        writer.writeheader()
        writer.writerows({**r, "quantities": "; ".join(r["quantities"])} for r in rows)
    elif rows:
        from cli.compare import print_table

        table = [
            {
                **r,
                "clipper": run.label if run.status != "damaged" else "",
                "p": "" if r["p"] is None else f"{r['p']:g}",
                "steps": "" if r["steps"] is None else r["steps"],
                "every": "" if r["every"] is None else r["every"],
                "quantities": ", ".join(r["quantities"]),
                "last_loss": math.nan if r["last_loss"] is None else r["last_loss"],
                "error": r["error"] or "",
            }
            for r, run in zip(rows, runs)
        ]
        print_table(table, [c for c in columns if c != "p"])
    if not rows:
        click.echo(f"no runs under {root}", err=True)


# -- dyn serve -------------------------------------------------------------------------------------


class Dashboard:
    """What the server shows: the index of the runs under ``root`` and their live rows."""

    def __init__(self, root: Path, interval_s: float):
        from dynamics.index import RunIndex

        self.root = root
        self.real_root = root.resolve()
        self.index = RunIndex(root)
        self.interval_ms = int(interval_s * 1000)
        self._live: dict[Path, object] = {}
        self._lock = threading.Lock()

    def run(self, name: str):
        """The index row of run ``name``; None if there is none, or its files lie outside the root."""
        info = self.index.find(name)
        if info is None:
            return None
        real = (info.path / "config.json").resolve()
        if not real.is_relative_to(self.real_root):
            return None
        return info

    def live(self, path: Path):
        from dynamics.index import LiveRun

        with self._lock:
            return self._live.setdefault(path, LiveRun(path))


class DashboardPages:
    """The request handler's pages (mixed into http.server's BaseHTTPRequestHandler when serving, so that
    importing this module stays cheap): GET only; every page is generated from the runs the index found
    under the root."""

    server_version = "dyn"
    dashboard: Dashboard  # set on the subclass serve() makes

    def __getattr__(self, name: str):
        if name.startswith("do_"):  # POST, PUT, DELETE, HEAD, anything else: refused
            return self._refuse
        raise AttributeError(name)

    def _refuse(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"dyn serve is read-only: GET only\n", "text/plain", Allow="GET")

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass  # polling every few seconds would fill the terminal; errors reach the browser

    def _send(self, status: int, body: bytes, kind: str, cache: str = "no-store", **headers) -> None:
        self.send_response(status)
        self.send_header("Content-Type", f"{kind}; charset=utf-8" if kind.startswith("text") else kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _text(self, status: int, message: str) -> None:
        self._send(status, (message + "\n").encode(), "text/plain")

    def _json(self, data) -> None:
        self._send(HTTPStatus.OK, json.dumps(data, allow_nan=False).encode(), "application/json")

    def _html(self, text: str) -> None:
        self._send(HTTPStatus.OK, text.encode(), "text/html")

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away
        except Exception as e:  # one page failing must not stop the dashboard; the browser shows why
            self._text(
                HTTPStatus.INTERNAL_SERVER_ERROR, f"dyn serve could not build this page: {type(e).__name__}: {e}"
            )

    def _route(self) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        parts = path.split("/")
        if "\0" in path or ".." in parts or "\\" in path:
            return self._text(HTTPStatus.FORBIDDEN, "forbidden: paths outside the runs folder are not served")
        d = self.dashboard
        if path == "/":
            from figures.report import index_html

            return self._html(index_html(str(d.root), [r.as_dict() for r in d.index.runs()], d.interval_ms))
        if path == "/api/runs":
            return self._json([r.as_dict() for r in d.index.runs()])
        if path == "/static/plotly.min.js":
            from plotly.offline import get_plotlyjs

            return self._send(HTTPStatus.OK, get_plotlyjs().encode(), "text/javascript", cache="max-age=86400")
        if path == "/compare":
            names = parse_qs(url.query).get("run", [])
            return self._report(names, live=False)
        for prefix, handler in (("/run/", self._report_one), ("/api/run/", self._rows)):
            if path.startswith(prefix):
                name = path[len(prefix) :]
                if not name or name.startswith("/") or Path(name).is_absolute():
                    return self._text(HTTPStatus.FORBIDDEN, "forbidden: absolute paths are not served")
                return handler(name, url.query)
        return self._text(HTTPStatus.NOT_FOUND, f"not found: {path}")

    def _report_one(self, name: str, query: str) -> None:
        self._report([name], live=True)

    def _report(self, names: list[str], live: bool) -> None:
        from dynamics.index import run_status
        from dynamics.run import RunError, load_run
        from figures.report import report_html

        d = self.dashboard
        if not names:
            return self._text(HTTPStatus.BAD_REQUEST, "name runs to compare: /compare?run=A&run=B")
        infos = []
        for name in names:
            info = d.run(name)
            if info is None:
                return self._text(HTTPStatus.NOT_FOUND, f"no run {name!r} under {d.root}")
            infos.append(info)
        try:
            runs = [load_run(i.path) for i in infos]
        except RunError as e:
            return self._text(HTTPStatus.CONFLICT, f"cannot read the run: {e}")
        empty = [i.name for i, r in zip(infos, runs) if r.metrics.empty]
        if empty:
            page = (
                '<!DOCTYPE html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">'
                f"<title>{empty[0]}</title></head><body><p>{', '.join(empty)}: no recorded rows yet; "
                "this page looks again every 5 seconds.</p></body></html>"
            )
            return self._html(page)
        spec = None
        if live and len(runs) == 1 and run_status(runs[0].path, runs[0].config) == "running":
            run = runs[0]
            since = {
                t: (int(getattr(run, t).step.max()) if len(getattr(run, t)) else None)
                for t in ("metrics", "steps", "eval")
            }
            spec = {
                "run": _display_name(run),
                "url": "/api/run/" + quote(infos[0].name),
                "since": since,
                "interval_ms": d.interval_ms,
            }
        title = f"dyn: {', '.join(i.name for i in infos)}"
        self._html(report_html(runs, title=title, plotlyjs="/static/plotly.min.js", live=spec))

    def _rows(self, name: str, query: str) -> None:
        from dynamics.run import RunError

        d = self.dashboard
        info = d.run(name)
        if info is None:
            return self._text(HTTPStatus.NOT_FOUND, f"no run {name!r} under {d.root}")
        since = {}
        for table, values in parse_qs(query).items():
            try:
                since[table] = int(values[-1])
            except ValueError:
                return self._text(HTTPStatus.BAD_REQUEST, f"{table}={values[-1]!r}: give a step number")
        try:
            self._json(d.live(info.path).rows_since(since))
        except RunError as e:
            self._text(HTTPStatus.CONFLICT, f"cannot read the run: {e}")


def _display_name(run) -> str:
    from figures.report import unique_names

    return unique_names([run])[0]


def _warm_up() -> None:
    """Import what a report page needs while the user opens the browser: the first page comes sooner."""
    import plotly.graph_objects  # noqa: F401
    import scipy.stats  # noqa: F401

    import figures.report  # noqa: F401
    from figures import style

    style.colors([])


@click.command("serve")
@click.argument("root", required=False, default="runs", type=click.Path(path_type=Path))
@click.option("--port", default=6007, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0 shows the runs to the whole network).",
)
@click.option(
    "--interval", default=3.0, show_default=True, type=click.FloatRange(0.5, 3600), help="Seconds between refreshes."
)
def serve(root, port, host, interval):
    """A live dashboard of the runs under a folder, like tensorboard --logdir.

    ROOT defaults to runs. The index lists every run (name, status, steps, clipper, last loss); each run's page is its
    report, and a running run's curves grow every few seconds, read from its journal without
    taking its lock. GET /api/runs returns the index as JSON. Read-only; nothing outside ROOT is
    served. Stop with Ctrl-C.
    """
    try:
        _serve(root, port, host, interval)
    except KeyboardInterrupt:
        # said here, not left to click, which would print an empty line before the message
        click.echo("dyn: interrupted", err=True)
        sys.exit(130)


def _serve(root: Path, port: int, host: str, interval: float) -> None:
    if not root.exists():
        fail(f"{root}: no such folder")
    if not root.is_dir():
        fail(f"{root}: not a folder")
    dashboard = Dashboard(root, interval)
    runs = dashboard.index.runs()
    if not runs:
        fail(f"no runs under {root}: a run is a folder with a config.json (dyn record --out {root}/NAME)")
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    handler = type("DashboardHandler", (DashboardPages, BaseHTTPRequestHandler), {"dashboard": dashboard})
    server_class = ThreadingHTTPServer
    if ":" in host:  # an IPv6 address
        server_class = type("ThreadingHTTPServer6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
    try:
        server = server_class((host, port), handler)
    except socket.gaierror as e:
        fail(f"--host {host}: unknown address ({e.strerror})")
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            fail(f"port {port} is in use on {host}: choose another with --port (0: any free port)")
        if e.errno in (errno.EACCES, errno.EPERM):
            fail(f"no permission to listen on port {port}: use a port above 1023")
        if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            fail(f"--host {host}: not an address of this machine")
        fail(f"cannot listen on {host}:{port}: {e.strerror or e}")
    server.daemon_threads = True
    threading.Thread(target=_warm_up, daemon=True).start()
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    click.echo(f"dyn serve: {len(runs)} runs under {root} at http://{shown}:{bound_port}/ (Ctrl-C to stop)", err=True)
    try:
        server.serve_forever(poll_interval=0.25)
    finally:
        server.server_close()
