"""The paper's Table 1: five losses, their scale-freedom under AutoClip, and `dyn sweep`."""

import csv
import json

import numpy as np
import pytest
from helpers import dyn

from dynamics import load_run
from dynamics.tasks.separation.train import TaskOptions, record

TINY = dict(
    steps=24,
    every=4,
    hidden=8,
    train_mixtures=8,
    eval_mixtures=2,
    eval_every=0,
    checkpoint_every=100,
    n_samples=2048,
    p=10.0,
)


@pytest.mark.parametrize("loss", ["dc", "wkm", "mi", "chimera", "snr"])
def test_scaling_a_loss_scales_grad_norm_and_threshold_but_not_clipping(tmp_path, loss):
    # the paper's footnote 2: grad(a f) = a grad f. With a a power of two the scaling is exact
    # in floating point, and Adam's eps scales with it, so the whole run is the same up to a.
    a = 8.0
    runs = {}
    for scale in (1.0, a):
        out = tmp_path / f"s{scale:g}"
        record(TaskOptions(loss=loss, loss_scale=scale, **TINY), out)
        runs[scale] = load_run(out)
    base, scaled = runs[1.0].steps, runs[a].steps
    assert len(base) == 24
    assert np.array_equal(scaled.grad_norm, a * base.grad_norm)
    assert np.array_equal(scaled.threshold, a * base.threshold)
    assert np.array_equal(scaled.clipped, base.clipped) and base.clipped.any()
    assert np.allclose(scaled.loss, a * base.loss, rtol=1e-6)
    m1, ma = runs[1.0].metrics, runs[a].metrics
    assert np.array_equal(m1.step_size, ma.step_size)  # the same trajectory
    assert np.allclose(ma.smoothness, a * m1.smoothness, rtol=1e-6)


SWEEP = [
    "--p",
    "10,100",
    "--loss",
    "mi,snr",
    "--steps",
    "12",
    "--every",
    "4",
    "--hidden",
    "8",
    "--train-mixtures",
    "8",
    "--eval-mixtures",
    "2",
    "--jobs",
    "2",
]


def test_tiny_sweep_writes_table_and_rerun_skips_finished_runs(tmp_path):
    out = tmp_path / "sweep"
    first = dyn("sweep", *SWEEP, "--out", out)
    assert first.returncode == 0, first.stderr
    names = ["mi-p10", "mi-p100", "snr-p10", "snr-p100"]
    for name in names:
        assert load_run(out / name).status == "finished"
    with open(out / "table1.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["loss"], float(r["p"])) for r in rows] == [("mi", 10), ("mi", 100), ("snr", 10), ("snr", 100)]
    for r in rows:
        expected = load_run(out / r["run"]).eval.si_sdr.iloc[-1]
        assert float(r["si_sdr"]) == pytest.approx(expected)
    markdown = (out / "table1.md").read_text()
    assert "| p | L_MI | L_SNR |" in markdown and f"{float(rows[0]['si_sdr']):.1f}" in markdown
    assert (out / "table1.png").read_bytes()[:4] == b"\x89PNG"

    stamps = {n: (out / n / "metrics.parquet").stat().st_mtime_ns for n in names}
    (out / "snr-p100" / "config.json").unlink()  # as if this run had never started
    for f in (out / "snr-p100").iterdir():
        f.unlink()
    second = dyn("sweep", *SWEEP, "--out", out)
    assert second.returncode == 0, second.stderr
    assert "3 finished already, 1 to train" in second.stderr
    for n in names[:3]:
        assert (out / n / "metrics.parquet").stat().st_mtime_ns == stamps[n]
    assert load_run(out / "snr-p100").status == "finished"

    compared = dyn("compare", out / "mi-p10", out / "snr-p100", "--json")
    assert compared.returncode == 0, compared.stderr
    assert [r["run"] for r in json.loads(compared.stdout)] == ["mi-p10", "snr-p100"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--p", "10,101"], "--p must be in [0, 100]"),
        (["--loss", "mi,xyz"], "unknown loss xyz"),
        (["--jobs", "0"], "--jobs must be a positive integer"),
    ],
)
def test_sweep_bad_input_is_one_line_exit_2(tmp_path, args, message):
    result = dyn("sweep", *args, "--out", tmp_path / "s")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert not (tmp_path / "s").exists()


def test_sweep_over_seeds_writes_mean_and_interval_per_cell(tmp_path):
    from scipy import stats

    out = tmp_path / "sweep"
    args = ["--p", "100", "--loss", "mi", "--seeds", "0,1,2", "--steps", "8", "--every", "4", "--hidden", "8"]
    result = dyn("sweep", *args, "--train-mixtures", "8", "--eval-mixtures", "2", "--jobs", "2", "--out", out)
    assert result.returncode == 0, result.stderr
    finals = [load_run(out / f"mi-p100-s{s}").eval.si_sdr.iloc[-1] for s in range(3)]
    assert len(set(finals)) == 3  # the seeds differ
    with open(out / "table1.csv") as f:
        (row,) = list(csv.DictReader(f))
    low, high = stats.t.interval(0.95, 2, loc=np.mean(finals), scale=stats.sem(finals))
    assert int(row["n_seeds"]) == 3 and float(row["si_sdr"]) == pytest.approx(np.mean(finals))
    assert float(row["si_sdr_ci_low"]) == pytest.approx(low) and float(row["si_sdr_ci_high"]) == pytest.approx(high)
    assert f"{np.mean(finals):.1f} [{low:.1f}, {high:.1f}]" in (out / "table1.md").read_text()


def test_a_sweep_manifest_older_than_an_option_still_matches_at_that_options_default():
    from cli.sweep import changed_settings

    settings = {"hidden": 8, "every": 4, "time_limit": None}
    assert changed_settings({"hidden": 8, "every": 4}, settings) == []  # written before --time-limit existed
    assert changed_settings({"hidden": 8, "every": 4}, {**settings, "time_limit": 5.0}) == ["time_limit"]
    assert changed_settings({"hidden": 16, "every": 4, "time_limit": None}, settings) == ["hidden"]
