"""Every reader of a run directory against every kind of damage: a RunError (CLI: one line, exit 2)."""

import json

import numpy as np
import pandas as pd
import pytest
from helpers import dyn

from dynamics import RunError, load_run, save_run


def _good(path):
    steps = np.arange(1, 41)
    metrics = pd.DataFrame(
        {
            "step": steps[9::10],
            "loss": [0.4, 0.3, 0.2, 0.1],
            "grad_norm": [2.0, 1.5, 1.0, 0.8],
            "threshold": [1.0, 1.0, 1.0, 1.0],
            "step_size": [0.1, 0.09, 0.08, 0.07],
            "smoothness": [3.0, 2.5, 2.0, 1.5],
        }
    )
    save_run(path, {"clipper": {"kind": "AutoClip", "p": 10.0}}, metrics=metrics)
    return path


def _config(path, change):
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))


def _damage_config_dir(path):
    (path / "config.json").unlink()
    (path / "config.json").mkdir()


DAMAGE = {
    "config.json a directory": _damage_config_dir,
    "config.json nested too deeply": lambda p: (p / "config.json").write_text("[" * 100_000 + "]" * 100_000),
    "config.json not JSON": lambda p: (p / "config.json").write_text("{not json"),
    "config.json a list": lambda p: (p / "config.json").write_text("[1, 2]"),
    "unknown schema_version": lambda p: _config(p, lambda c: c.update(schema_version=99)),
    "schema_version a string": lambda p: _config(p, lambda c: c.update(schema_version="1")),
    "clipper a string": lambda p: _config(p, lambda c: c.update(clipper="autoclip")),
    "every a float": lambda p: _config(p, lambda c: c.update(every=2.5)),
    "tables of the wrong shape": lambda p: _config(p, lambda c: c.update(tables={"metrics": [["loss"]]})),
    "strings in a numeric column": lambda p: pd.DataFrame({"step": [10, 20], "loss": ["a", "b"]}).to_parquet(
        p / "metrics.parquet"
    ),
    "a table without a step column": lambda p: pd.DataFrame({"loss": [0.1]}).to_parquet(p / "metrics.parquet"),
    "a step column of strings": lambda p: pd.DataFrame({"step": ["x"], "loss": [0.1]}).to_parquet(
        p / "metrics.parquet"
    ),
    "random bytes for a table": lambda p: (p / "metrics.parquet").write_bytes(b"\x00garbage" * 50),
    "layers without names": lambda p: pd.DataFrame({"step": [10], "grad_norm": [1.0]}).to_parquet(p / "layers.parquet"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_load_run_names_the_damage_with_a_run_error(tmp_path, kind):
    run = _good(tmp_path / "run")
    DAMAGE[kind](run)
    with pytest.raises(RunError):
        load_run(run)


def test_a_good_run_with_foreign_extra_columns_still_loads(tmp_path):
    run = _good(tmp_path / "run")
    frame = pd.read_parquet(run / "metrics.parquet")
    frame["my_column"] = "notes"
    frame.to_parquet(run / "metrics.parquet")
    assert load_run(run).metrics.my_column.tolist() == ["notes"] * 4


@pytest.mark.parametrize("kind", ["config.json a directory", "unknown schema_version", "strings in a numeric column"])
@pytest.mark.parametrize("command", ["info", "compare", "plot"])
def test_the_cli_readers_answer_damage_with_one_line_and_exit_2(tmp_path, kind, command):
    run = _good(tmp_path / "run")
    DAMAGE[kind](run)
    args = [command, str(run)] + (["--out", str(tmp_path / "f.png")] if command == "plot" else [])
    result = dyn(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "f.png").exists()


def test_compare_of_a_run_recorded_elsewhere_without_most_columns_is_nan_not_a_traceback(tmp_path):
    save_run(tmp_path / "run", {}, metrics=pd.DataFrame({"step": [1, 2, 3], "loss": [1.0, 0.5, 0.2]}))
    result = dyn("compare", str(tmp_path / "run"), "--json")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["r_value"] is None and row["step_size_mean"] is None and "final_si_sdri" not in row


def test_the_r_interval_of_a_perfect_line_is_the_line_not_a_division_by_zero(tmp_path):
    g = np.linspace(1.0, 2.0, 50)
    frame = pd.DataFrame({"step": np.arange(1, 51), "loss": g, "grad_norm": g, "smoothness": 2 * g, "step_size": g})
    save_run(tmp_path / "run", {}, metrics=frame)
    result = dyn("compare", str(tmp_path / "run"), "--json")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["r_value"] == pytest.approx(1.0) and row["r_ci_low"] == row["r_ci_high"] == pytest.approx(1.0)
