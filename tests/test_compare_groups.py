"""`dyn compare` with intervals: per-run r intervals, `--groups` over seeds, and eval columns by name.

Runs are built from known frames (3 seeds x 2 arms, AutoClip p=10 and p=100, plus a run of
another task whose eval table has an ``accuracy`` column). Every number the command prints is
recomputed here from those frames with numpy and scipy: Pearson r, the moving-block bootstrap
resampled index by index from the same seeded draws, Student t intervals (scipy.stats.t.interval)
and Welch intervals (scipy.stats.ttest_ind(equal_var=False)).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from dynamics.analysis import relaxed_smoothness
from dynamics.run import save_run
from dynamics.stats import r_block_length
from tests.helpers import dyn, naive_block_t_interval
from tests.test_analysis import primal_lp_fit

ROWS, EVERY, SEEDS = 300, 10, (0, 1, 2)
ARMS = {"p10": (10.0, 0.3), "p100": (100.0, 0.8)}  # name: (p, correlation of the logged pairs)
RUN_COLUMNS = [
    "run",
    "steps",
    "final_loss",
    "step_size_mean",
    "step_size_cv",
    "r_value",
    "r_ci_low",
    "r_ci_high",
    "l0",
    "l1",
    "l0_ci_low",
    "l0_ci_high",
    "l1_ci_low",
    "l1_ci_high",
    "clipped_fraction",
    "clip_rate",
    "clip_rate_last10",
    "mean_clip_coef",
    "mean_clip_coef_last10",
    "lr_scale",
    "lr_scale_last10",
    "final_threshold",
    "final_si_sdri",
]
MEASURES = [
    "steps",
    "final_loss",
    "step_size_mean",
    "step_size_cv",
    "r_value",
    "l0",
    "l1",
    "clipped_fraction",
    "clip_rate",
    "clip_rate_last10",
    "mean_clip_coef",
    "mean_clip_coef_last10",
    "lr_scale",
    "lr_scale_last10",
    "final_threshold",
    "final_si_sdri",
    "final_si_sdr",
]


def make_tables(p: float, rho: float, seed: int, eval_frame: pd.DataFrame) -> dict:
    """Metrics whose log pairs follow an AR(1) with correlation rho (so rows are autocorrelated),
    a threshold that is the running p-th percentile, a loss that decays, and the eval frame."""
    rng = np.random.default_rng(100 * seed + int(p))
    e = rng.standard_normal((ROWS, 2))
    e[:, 1] = rho * e[:, 0] + math.sqrt(1 - rho**2) * e[:, 1]
    xy = np.zeros_like(e)
    for t in range(ROWS):
        xy[t] = (0.6 * xy[t - 1] if t else 0.0) + e[t]
    g, s = np.exp(xy[:, 0]), np.exp(xy[:, 1])
    s[[7, 70]] = np.nan  # left out of r
    threshold = np.array([np.percentile(g[: i + 1], p) for i in range(ROWS)])
    step = np.arange(ROWS, dtype=np.int64) * EVERY
    loss = np.exp(-step / 1500) + 0.05 * rng.random(ROWS)
    metrics = pd.DataFrame(
        {
            "step": step,
            "epoch": step // 100,
            "time_s": 0.01 * step,
            "loss": loss,
            "grad_norm": g,
            "threshold": threshold,
            "clip_coef": np.minimum(1.0, threshold / g),
            "clipped": g > threshold,
            "step_size": 1e-3 * (1 + 0.3 * rng.random(ROWS)),
            "smoothness": s,
            "lr": np.full(ROWS, 1e-3),
        }
    )
    steps = metrics[["step", "loss", "grad_norm", "threshold", "clipped"]]
    return {"metrics": metrics, "steps": steps, "eval": eval_frame}


def config(name: str, p: float, seed: int, loss: str = "mi") -> dict:
    return {
        "name": name,
        "command": ["dyn", "record", "--out", f"runs/{name}"],
        "time_s": 10.0 + seed,
        "every": EVERY,
        "probes": 1,
        "clipper": {"kind": "AutoClip", "p": p, "window": None, "nonfinite": "error"},
        "task": {"loss": loss, "seed": seed, "p": p, "steps": ROWS * EVERY, "layers": 2, "hidden": 64},
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{run name: (run dir, tables)} for 3 seeds x 2 arms, plus "acc", a run of another task."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for arm, (p, rho) in ARMS.items():
        for seed in SEEDS:
            name = f"{arm}-s{seed}"
            eval_frame = pd.DataFrame(
                {
                    "step": np.array([1000, ROWS * EVERY - EVERY], np.int64),
                    "si_sdr": [1.0, 4.0 + 0.7 * seed + (p == 10.0)],
                    "si_sdri": [0.5, 6.0 + 0.4 * seed**2 + 2 * (p == 10.0)],
                }
            )
            tables = make_tables(p, rho, seed, eval_frame)
            out[name] = (save_run(root / name, config(name, p, seed), **tables), tables)
    acc_eval = pd.DataFrame({"step": np.array([500, 2990], np.int64), "accuracy": [0.5, 0.875]})
    tables = make_tables(10.0, 0.5, 7, acc_eval)
    acc_config = {**config("acc", 10.0, 7), "task_description": "a classifier"}
    acc_config["task"] = {"seed": 7, "classes": 10}
    out["acc"] = (save_run(root / "acc", acc_config, **tables), tables)
    return out


def names(arm=None):
    return [f"{a}-s{s}" for a in ARMS for s in SEEDS if arm in (None, a)]


def in_process(*args) -> SimpleNamespace:
    """`dyn ARGS...` through the command's own entry point (run_group: errors as one line, exit
    code 2), in this process to spare a start-up per case; stdout and stderr captured."""
    from cli.errors import run_group
    from cli.main import dyn as group

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["dyn", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_group(group)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = argv
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="module")
def results(built, tmp_path_factory):
    d = {name: built[name][0] for name in built}
    six = [d[n] for n in names()]
    # one case as a user runs it: a fresh process, the exit code and stderr as the shell sees them
    out = {"json": dyn("compare", *six, "--json", cwd=tmp_path_factory.mktemp("cwd"))}
    in_process_jobs = {
        "groups_json": ("compare", *six, "--groups", "--json"),
        "groups_csv": ("compare", *six, "--groups", "--csv"),
        "groups_table": ("compare", *six, "--groups"),
        "one_arm": ("compare", *(d[n] for n in names("p10")), "--groups", "--json"),
        "three_arms": ("compare", *six, d["acc"], "--groups", "--json"),
        "mixed_tasks": ("compare", d["p10-s0"], d["acc"], "--csv"),
        "both_formats": ("compare", *six, "--json", "--csv"),
        "same_seed_twice": ("compare", d["p10-s0"], d["p10-s1"], d["p10-s0"], "--groups"),
        "info": ("info", d["p10-s1"]),
        "info_acc": ("info", d["acc"]),
    }
    return out | {k: in_process(*args) for k, args in in_process_jobs.items()}


# ----------------------------------------------------------------------------------------------
# the oracle: every number from the frames the runs were built from


def oracle_bootstrap(x, y, n_resamples=2000, level=0.95, seed=0):
    """The studentized moving-block bootstrap interval of r, resampled index by index (tests/helpers.py)."""
    block = r_block_length(x, y)
    return naive_block_t_interval(x, y, block, n_resamples, level, seed), block


def oracle_clipping(steps: pd.DataFrame) -> dict:
    """clip_rate, mean_clip_coef, lr_scale (and _last10: the last 10% of steps) with pandas, row by row."""
    out = {}
    for suffix, part in (("", steps), ("_last10", steps.iloc[-max(1, len(steps) // 10) :])):
        h = [min(1.0, t / g) for g, t in zip(part.grad_norm, part.threshold)]  # every norm here is finite, > 0
        coefs = [c for c, clipped in zip(h, part.clipped) if clipped]
        out[f"clip_rate{suffix}"] = float(np.mean(part.clipped))
        out[f"mean_clip_coef{suffix}"] = float(np.mean(coefs)) if coefs else math.nan
        out[f"lr_scale{suffix}"] = float(np.mean(h))
    return out


def oracle_row(name, tables) -> dict:
    m, st, ev = tables["metrics"], tables["steps"], tables["eval"]
    g, s = m.grad_norm.to_numpy(float), m.smoothness.to_numpy(float)
    keep = np.isfinite(g) & np.isfinite(s) & (g > 0) & (s > 0)
    x, y = np.log(g[keep]), np.log(s[keep])
    (low, high), _ = oracle_bootstrap(x, y)
    step_size = m.step_size.to_numpy(float)
    tail = max(1, len(st) // 20)
    finite = np.isfinite(g) & np.isfinite(s)
    l0, l1 = primal_lp_fit(g[finite], s[finite], 0.5)
    row = {
        "run": name,
        "steps": int(st.step.iloc[-1]),
        "final_loss": float(st.loss.iloc[-tail:].mean()),
        "step_size_mean": float(step_size.mean()),
        "step_size_cv": float(step_size.std() / step_size.mean()),
        "r_value": float(np.corrcoef(x, y)[0, 1]),
        "r_ci_low": float(low),
        "r_ci_high": float(high),
        "l0": l0,
        "l1": l1,
        "clipped_fraction": float(st.clipped.mean()),
        **oracle_clipping(st),
        "final_threshold": float(m.threshold.iloc[-1]),
    }
    for column in ev.columns[1:]:
        row[f"final_{column}"] = float(ev[column].iloc[-1])
    row.setdefault("final_si_sdri", math.nan)
    return row


def oracle_group(rows) -> dict:
    out = {"n_seeds": len(rows)}
    for c in MEASURES:
        v = np.array([r[c] for r in rows], float)
        ci = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v)) if np.ptp(v) else (v[0], v[0])
        out[f"{c}_mean"], out[f"{c}_ci_low"], out[f"{c}_ci_high"] = v.mean(), *ci
    return out


def oracle_difference(a_rows, b_rows) -> dict:
    out = {"n_seeds": None}
    for c in MEASURES:
        a, b = np.array([r[c] for r in a_rows], float), np.array([r[c] for r in b_rows], float)
        if np.ptp(a) == 0 and np.ptp(b) == 0:
            ci = (a.mean() - b.mean(),) * 2
        else:
            with warnings.catch_warnings():  # scipy warns of a side with no spread (lr_scale 1 without clipping)
                warnings.simplefilter("ignore", RuntimeWarning)
                res = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
            ci = (res.low, res.high)
        out[f"{c}_mean"], out[f"{c}_ci_low"], out[f"{c}_ci_high"] = a.mean() - b.mean(), *ci
    return out


def close(got, expected, rel=1e-9):
    if expected is None or (isinstance(expected, float) and not math.isfinite(expected)):
        return got is None or (isinstance(got, float) and not math.isfinite(got))
    if isinstance(expected, str):
        return got == expected
    return got == pytest.approx(expected, rel=rel, abs=1e-12)


def tolerance(key: str) -> float:
    """l0 and l1 come from two different LPs (dual here, primal in the oracle): equal to solver precision."""
    return 1e-7 if key.startswith(("l0", "l1")) else 1e-9


# ----------------------------------------------------------------------------------------------
# per run


def test_the_runs_are_autocorrelated_so_blocks_are_longer_than_one(built):
    for name in names():
        m = built[name][1]["metrics"]
        keep = np.isfinite(m.smoothness)
        x, y = np.log(m.grad_norm[keep].to_numpy()), np.log(m.smoothness[keep].to_numpy())
        assert oracle_bootstrap(x, y, n_resamples=1000)[1] > 1


def test_compare_json_has_r_intervals(results, built):
    r = results["json"]
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert [d["run"] for d in data] == names()
    for obj, name in zip(data, names()):
        expected = oracle_row(name, built[name][1])
        assert list(obj) == [*RUN_COLUMNS, "final_si_sdr"]
        for k, v in expected.items():
            assert close(obj[k], v, tolerance(k)), (name, k, obj[k], v)
        assert obj["r_ci_low"] < obj["r_value"] < obj["r_ci_high"]
        # the intervals of l0 and l1: dynamics.analysis's bootstrap (tested in tests/test_analysis.py) of the
        # finite (grad_norm, smoothness) rows
        m = built[name][1]["metrics"]
        fit = relaxed_smoothness(m.grad_norm, m.smoothness)
        assert (obj["l0_ci_low"], obj["l0_ci_high"], obj["l1_ci_low"], obj["l1_ci_high"]) == (*fit.l0_ci, *fit.l1_ci)
        assert obj["l0_ci_low"] <= obj["l0"] <= obj["l0_ci_high"] and obj["l1_ci_low"] <= obj["l1"] <= obj["l1_ci_high"]
    # the method is stated where a reader sees it, with the block lengths the oracle used
    blocks = sorted({oracle_bootstrap(*log_xy(built[n][1]), n_resamples=1000)[1] for n in names()})
    assert "2000 resamples" in r.stderr and "moving-block" in r.stderr
    span = str(blocks[0]) if len(blocks) == 1 else f"{blocks[0]}-{blocks[-1]}"
    assert f"block length {span} rows" in r.stderr


def log_xy(tables):
    m = tables["metrics"]
    keep = np.isfinite(m.smoothness)
    return np.log(m.grad_norm[keep].to_numpy()), np.log(m.smoothness[keep].to_numpy())


def test_eval_columns_by_name_union_over_runs(results, built):
    r = results["mixed_tasks"]
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert list(rows[0]) == [*RUN_COLUMNS, "final_si_sdr", "final_accuracy"]
    sep, acc = rows
    assert float(sep["final_si_sdri"]) == built["p10-s0"][1]["eval"].si_sdri.iloc[-1]
    assert math.isnan(float(sep["final_accuracy"]))
    assert float(acc["final_accuracy"]) == 0.875
    assert math.isnan(float(acc["final_si_sdri"])) and math.isnan(float(acc["final_si_sdr"]))


# ----------------------------------------------------------------------------------------------
# per group


def expected_groups(built):
    rows = {arm: [oracle_row(n, built[n][1]) for n in names(arm)] for arm in ARMS}
    return [
        {"name": "autoclip p=10", **oracle_group(rows["p10"])},
        {"name": "autoclip p=100", **oracle_group(rows["p100"])},
        {"name": "autoclip p=10 - autoclip p=100", **oracle_difference(rows["p10"], rows["p100"])},
    ]


def test_groups_json(results, built):
    r = results["groups_json"]
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    expected = expected_groups(built)
    keys = ["name", "n_seeds", *(f"{c}_{s}" for c in MEASURES for s in ("mean", "ci_low", "ci_high"))]
    assert [list(d) for d in data] == [keys] * 3
    for got, exp in zip(data, expected):
        for k in keys:
            assert close(got[k], exp[k], tolerance(k)), (got["name"], k, got[k], exp[k])
    # the claims the data were built to make: r differs between the arms, with an interval that shows it
    diff = data[2]
    assert diff["r_value_ci_high"] < 0 < diff["final_si_sdri_ci_low"]
    assert "Student t" in r.stderr and "Welch" in r.stderr


def test_groups_csv(results, built):
    r = results["groups_csv"]
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    expected = expected_groups(built)
    assert [row["name"] for row in rows] == [e["name"] for e in expected]
    assert [row["n_seeds"] for row in rows] == ["3", "3", ""]
    for row, exp in zip(rows, expected):
        for k, v in exp.items():
            if k not in ("name", "n_seeds"):
                assert close(float(row[k]), v, tolerance(k)), (row["name"], k)


def test_groups_table(results, built):
    r = results["groups_table"]
    assert r.returncode == 0, r.stderr
    head, *lines = r.stdout.splitlines()
    assert "autoclip p=10 (3 seeds)" in head and "autoclip p=10 - autoclip p=100" in head
    (r_line,) = [line for line in lines if line.startswith("r_value ")]
    diff = expected_groups(built)[2]
    assert f"[{diff['r_value_ci_low']:.4g}, {diff['r_value_ci_high']:.4g}]" in r_line


def test_one_group_and_three_groups(results, built):
    r = results["one_arm"]
    assert r.returncode == 0, r.stderr
    (only,) = json.loads(r.stdout)
    assert only["name"] == "autoclip p=10" and only["n_seeds"] == 3
    r = results["three_arms"]
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)  # no difference entry for three groups
    assert [d["n_seeds"] for d in data] == [3, 3, 1]
    assert len({d["name"] for d in data}) == 3
    acc = data[2]
    assert acc["final_accuracy_mean"] == 0.875 and acc["final_accuracy_ci_low"] is None  # one seed: no interval
    assert data[0]["final_accuracy_mean"] is None


# ----------------------------------------------------------------------------------------------
# bad input, info, speed


@pytest.mark.parametrize("key, message", [("both_formats", "--json and --csv"), ("same_seed_twice", "same seed 0")])
def test_bad_input_is_one_line(results, key, message):
    r = results[key]
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("dyn: error: ") and message in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_info_prints_eval_columns_by_name_and_a_generic_task(results, built):
    r = results["info"]
    assert r.returncode == 0 and r.stderr == "", r.stderr
    ev = built["p10-s1"][1]["eval"]
    assert f"final eval si_sdr {ev.si_sdr.iloc[-1]:.4g}, si_sdri {ev.si_sdri.iloc[-1]:.4g}" in r.stdout
    assert "hidden=64" in r.stdout and "loss=mi" in r.stdout
    r = results["info_acc"]
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "task       a classifier" in r.stdout and "final eval accuracy 0.875" in r.stdout
    assert "SI-SDR" not in r.stdout


def test_one_number_formatter():
    from dynamics.summary import format_interval, format_number

    assert [format_number(v) for v in (math.nan, None, math.inf, -math.inf, 0.000123456, 2990, "x")] == [
        "-",
        "-",
        "inf",
        "-inf",
        "0.0001235",
        "2990",
        "x",
    ]
    assert format_number(0.000123456, digits=3) == "0.000123"
    assert format_interval(1.23456, 1.0, 1.5) == "1.235 [1, 1.5]"
    assert format_interval(1.23456, math.nan, math.nan, digits=3) == format_interval(1.23456, None, None, 3) == "1.23"
