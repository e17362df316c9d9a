"""`dyn ls` and `dynamics.load_runs`: every run under a folder with its status, steps and last loss, read
from config.json and the tables' last rows; the journal tail that `dyn serve` reads while a run writes."""

from __future__ import annotations

import csv
import io
import json
import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from autoclip import AutoClip
from dynamics import Recorder, journal, load_run, load_runs
from dynamics.index import SegmentTail, lock_held
from tests.helpers import batches, dyn, make_model


def record(run_dir, steps=40, every=5, p=None, finish=True):
    """A small MLP recorded for ``steps`` steps: closed (finish=True) or left open (the Recorder is returned)."""
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    clipper = AutoClip(model.parameters(), p=p) if p is not None else None
    rec = Recorder(model, optimizer, run_dir, clipper=clipper, every=every)
    for x, y in batches(steps):
        rec.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))
    if finish:
        rec.close()
    return rec


def last_row(run_dir, table="steps"):
    """Oracle: (largest step, its loss) from the whole table, Parquet or journal, read with pyarrow."""
    parquet = run_dir / f"{table}.parquet"
    t = pq.read_table(parquet) if parquet.exists() else journal.read_table(run_dir / "journal", table)
    rows = t.to_pylist()
    last = max(rows, key=lambda r: r["step"])
    return last["step"], last["loss"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    record(root / "sweep" / "autoclip-p10", p=10.0)
    live = record(root / "live", steps=20, finish=False)  # this process holds its lock
    released = record(root / "crashed", steps=15, finish=False)
    released.release()  # the lock goes, config.json still says running: a process that died
    (root / "broken-config").mkdir()
    (root / "broken-config" / "config.json").write_text("{not json")
    record(root / "broken-table", steps=10)
    (root / "broken-table" / "steps.parquet").write_bytes(b"PAR1 not a parquet file")
    (root / "notes").mkdir()  # a folder with no run in it
    yield root
    live.close()


EXPECTED = {
    "sweep/autoclip-p10": "finished",
    "live": "running",
    "crashed": "interrupted",
    "broken-config": "damaged",
    "broken-table": "damaged",
}


def test_ls_json_lists_every_run_with_status_steps_and_last_loss(root):
    result = dyn("ls", root, "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert {n: r["status"] for n, r in rows.items()} == EXPECTED
    for name in ("sweep/autoclip-p10", "live", "crashed"):
        step, loss = last_row(root / name)
        assert rows[name]["steps"] == step and rows[name]["last_loss"] == loss
        assert rows[name]["every"] == 5
        assert rows[name]["quantities"] == ["StepSize", "Smoothness", "LayerNorms"]
        assert rows[name]["error"] is None
    assert (rows["live"]["steps"], rows["crashed"]["steps"]) == (20, 15)
    assert rows["sweep/autoclip-p10"]["clipper"] == "AutoClip" and rows["sweep/autoclip-p10"]["p"] == 10.0
    assert rows["live"]["clipper"] == "NoClip" and rows["live"]["p"] is None
    assert "corrupt config" in rows["broken-config"]["error"]
    assert "steps.parquet" in rows["broken-table"]["error"]


def test_load_runs_returns_the_same_runs_as_objects(root):
    runs = load_runs(root)
    assert [r.name for r in runs] == sorted(EXPECTED)
    by_name = {r.name: r for r in runs}
    assert {n: r.status for n, r in by_name.items()} == EXPECTED
    finished = by_name["sweep/autoclip-p10"]
    assert finished.label == "autoclip p=10" and finished.config["clipper"]["p"] == 10.0
    assert finished.load().metrics.equals(load_run(root / "sweep" / "autoclip-p10").metrics)
    assert math.isnan(by_name["broken-config"].last_loss) and by_name["broken-config"].steps is None


def test_ls_csv_and_table(root):
    as_csv = dyn("ls", root, "--csv")
    assert as_csv.returncode == 0, as_csv.stderr
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["name"] for r in rows] == sorted(EXPECTED)
    assert {r["name"]: r["status"] for r in rows} == EXPECTED
    assert rows[-1]["quantities"] == "StepSize; Smoothness; LayerNorms"
    table = dyn("ls", root)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "status", "steps"] and len(lines) == 1 + len(EXPECTED)
    assert any(line.startswith("sweep/autoclip-p10") and "autoclip p=10" in line for line in lines)


def test_lock_is_looked_up_without_taking_it(root, monkeypatch):
    import fcntl

    def probe(path):  # oracle: a shared non-blocking flock fails exactly when someone holds the lock
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    assert probe(root / "live" / ".lock") and not probe(root / "crashed" / ".lock")
    if not os.path.exists("/proc/locks"):
        pytest.skip("no /proc/locks here: the flock fallback is used")

    def refuse(*args):
        raise AssertionError("lock_held took a lock")

    monkeypatch.setattr(fcntl, "flock", refuse)
    assert lock_held(root / "live") is True
    assert lock_held(root / "crashed") is False
    assert lock_held(root / "sweep" / "autoclip-p10") is False  # finished: the lock file is gone


def test_a_torn_journal_tail_is_read_up_to_the_last_whole_batch(tmp_path):
    rec = record(tmp_path / "run", steps=30, finish=False)
    rec.release()
    segment = journal.segments(tmp_path / "run" / "journal", "steps")[-1]
    whole = pa.ipc.open_stream(segment.read_bytes()).read_all()
    data = segment.read_bytes()
    segment.write_bytes(data[:-20])  # the writer was killed inside the last batch
    (info,) = load_runs(tmp_path)
    rows = journal.read_table(segment.parent, "steps").to_pylist()
    assert info.status == "interrupted" and info.steps == rows[-1]["step"] == 25 < whole.num_rows
    assert info.last_loss == rows[-1]["loss"]
    # the dashboard's incremental reader, fed the same bytes a few at a time, finds the same rows
    segment.write_bytes(b"")
    tail, got = SegmentTail(segment), []
    for end in range(0, len(data) + 1, 97):
        segment.write_bytes(data[:end])
        got += [row for batch in tail.read() for row in batch.to_pylist()]
    segment.write_bytes(data)
    got += [row for batch in tail.read() for row in batch.to_pylist()]
    assert got == whole.to_pylist()


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    for args, message in [
        ((tmp_path / "missing",), "no such folder"),
        ((tmp_path, "--json", "--csv"), "choose one of --json and --csv"),
    ]:
        result = dyn("ls", *args)
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    empty = dyn("ls", tmp_path, "--json")
    assert empty.returncode == 0 and json.loads(empty.stdout) == [] and "no runs under" in empty.stderr
