"""``dyn export --tensorboard``: recorded runs replayed into TensorBoard event files, read back with
tensorboard's EventAccumulator and compared with the run's own tables (float32 in TensorBoard: 1e-6)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from cli.export import export, masked_crc32c_many
from dynamics import Recorder, load_run
from dynamics.run import save_run
from tests.helpers import batches, dyn_in_process, make_model, read_only_folder


def record(run_dir, steps: int = 12, close: bool = True, name: str | None = None) -> Recorder:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    rec = Recorder(model, optimizer, run_dir, every=3, config={"name": name} if name else None)
    for t, (x, y) in enumerate(batches(steps)):
        rec.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))
        if t % 6 == 5:
            rec.log_eval(accuracy=0.5 + 0.01 * t)
    if close:
        rec.close()
    return rec


def read(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(run) -> dict[str, list[tuple[int, float]]]:
    """Every non-NaN number of the run's tables under its tag, computed from the tables with pandas."""
    out: dict[str, list[tuple[int, float]]] = {}
    for table, prefix in (("metrics", "dyn"), ("steps", "dyn_steps"), ("eval", "dyn_eval")):
        frame = getattr(run, table)
        for column in frame.columns.drop("step"):
            values = frame[column].astype(float)
            keep = values.notna()
            if keep.any():
                out[f"{prefix}/{column}"] = list(zip(frame.step[keep].tolist(), values[keep].tolist()))
    for (name, column), part in run.layers.melt(id_vars=["step", "name"]).groupby(["name", "variable"]):
        part = part[part.value.notna()]
        out[f"dyn_layers/{name}/{column}"] = list(zip(part.step.tolist(), part.value.astype(float).tolist()))
    return out


def assert_same(got, want) -> None:
    assert sorted(got) == sorted(want)
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
        np.testing.assert_allclose([v for _, v in got[tag]], [v for _, v in want[tag]], rtol=1e-6, err_msg=tag)


def invoke(*args):
    return CliRunner().invoke(export, [str(a) for a in args])


def test_export_replays_every_table_of_finished_and_running_runs(tmp_path):
    record(tmp_path / "done")
    running = record(tmp_path / "live", close=False)  # still open: its rows are in the journal
    try:
        r = invoke(tmp_path / "done", tmp_path / "live", "--tensorboard", tmp_path / "tb")
        assert r.exit_code == 0, (r.output, r.exception)
        assert r.output.split() == [str(tmp_path / "tb" / "done"), str(tmp_path / "tb" / "live")]
        for name in ("done", "live"):
            run = load_run(tmp_path / name)
            assert len(run.metrics) == 4 and len(run.steps) == 12 and len(run.eval) == 2 and len(run.layers)
            want = expected(run)
            assert {"dyn/loss", "dyn/clipped", "dyn_steps/grad_norm", "dyn_eval/accuracy"} <= set(want)
            assert "dyn_layers/0.weight/grad_norm" in want
            assert_same(read(tmp_path / "tb" / name), want)
    finally:
        running.close()


def test_nan_cells_are_left_out_and_infinity_kept(tmp_path):
    steps = np.array([10, 20, 30, 40], dtype=np.int64)
    metrics = pd.DataFrame(
        {
            "step": steps,
            "loss": [1.0, 0.5, 0.25, 0.125],
            "grad_norm": [3.0, 2.0, 1.0, 0.5],
            "threshold": np.full(4, np.inf),
            "sharpness": [np.nan, 12.0, np.nan, 14.0],  # measured every other record
            "clipped": [False, True, False, False],
        }
    )
    save_run(tmp_path / "run", {"clipper": {"kind": "NoClip"}}, metrics=metrics)
    assert invoke(tmp_path / "run", "--tensorboard", tmp_path / "tb").exit_code == 0
    got = read(tmp_path / "tb" / "run")
    assert got["dyn/sharpness"] == [(20, 12.0), (40, 14.0)]
    assert got["dyn/threshold"] == [(s, np.inf) for s in steps.tolist()]
    assert got["dyn/clipped"] == [(10, 0.0), (20, 1.0), (30, 0.0), (40, 0.0)]


def test_runs_that_share_a_name_get_their_own_folders_and_a_new_export_replaces_the_old(tmp_path):
    record(tmp_path / "a" / "run", steps=6, name="baseline")
    record(tmp_path / "b" / "run", steps=6, name="baseline")
    out = tmp_path / "tb"
    r = invoke(tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "a" / "run", "--tensorboard", out)
    assert r.exit_code == 0, (r.output, r.exception)
    ids = [load_run(tmp_path / d / "run").config["run_id"][:8] for d in ("a", "b")]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"baseline-{i}" for i in ids)  # the repeat: once
    first = [p.name for p in (out / f"baseline-{ids[0]}").iterdir()]
    assert len(first) == 1 and "tfevents" in first[0]
    assert invoke(tmp_path / "a" / "run", "--tensorboard", out).exit_code == 0  # alone now: its own name
    assert invoke(tmp_path / "a" / "run", "--tensorboard", out).exit_code == 0  # again: replaces its export
    files = list((out / "baseline").iterdir())
    assert len(files) == 1 and not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert_same(read(out / "baseline"), expected(load_run(tmp_path / "a" / "run")))


def test_a_full_disk_is_one_line_exit_1_and_leaves_nothing(tmp_path, monkeypatch):
    import cli.export

    record(tmp_path / "run", steps=6)

    def full(fd):  # the disk fills up: what was written cannot be flushed
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli.export.os, "fsync", full)
    code, stderr = dyn_in_process("export", tmp_path / "run", "--tensorboard", tmp_path / "tb")
    assert code == 1 and len(stderr.splitlines()) == 1 and "the disk is full" in stderr, stderr
    assert list((tmp_path / "tb").iterdir()) == []  # no event file, no temporary file, no run folder


def test_checksums_equal_tensorboards():
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    rng = np.random.default_rng(0)
    chunks = [rng.bytes(int(n)) for n in rng.integers(0, 400, 500)] + [b"", b"a", b"ab", b"abc", rng.bytes(5000)]
    assert masked_crc32c_many(chunks).tolist() == [masked_crc32c(c) for c in chunks]


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good = record(root / "good", steps=6).run_dir
    damaged = record(root / "damaged", steps=6).run_dir
    (damaged / "metrics.parquet").write_bytes(b"PAR1 not a table")
    (root / "notrun").mkdir()
    (root / "afile").write_text("x")
    (root / "taken" / "good").mkdir(parents=True)
    (root / "taken" / "good" / "notes.txt").write_text("the user's own")
    unwritable = read_only_folder(root)
    jobs = {
        "notrun": (root / "notrun", "--tensorboard", root / "tb1"),
        "damaged": (damaged, "--tensorboard", root / "tb2"),
        "no_format": (good,),
        "file": (good, "--tensorboard", root / "afile"),
        "taken": (good, "--tensorboard", root / "taken"),
    }
    if unwritable is not None:
        jobs["read_only"] = (good, "--tensorboard", unwritable / "dyn-tb")
    results = {key: dyn_in_process("export", *args) for key, args in jobs.items()}
    yield root, results
    (root / "ro").chmod(0o755)


@pytest.mark.parametrize(
    "key, code, message",
    [
        ("notrun", 2, "not a run directory"),
        ("damaged", 2, "corrupt"),
        ("no_format", 2, "--tensorboard DIR"),
        ("file", 2, "is a file, not a folder"),
        ("taken", 2, "holds files dyn did not write (notes.txt)"),
        ("read_only", 1, "could not write"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(bad, key, code, message):
    root, results = bad
    if key not in results:
        pytest.skip("this user can write in a read-only folder (root)")
    got, stderr = results[key]
    assert got == code, stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("dyn: error: ") and message in stderr, stderr
    assert not [p for p in root.glob("tb*")] and not list((root / "ro").iterdir())
    assert [p.name for p in (root / "taken" / "good").iterdir()] == ["notes.txt"]
