"""Figures and the plotting/comparing commands, on runs built from known data (no training).

Every number a figure or a command shows is checked against an oracle computed here, from the
frames the runs were built from: Pearson r with scipy.stats.linregress, the threshold line at
log(threshold of the last recorded step), the animation's line at the threshold of its moment,
the GIF's frame count read back with imageio, the output format by its magic bytes, and the
``dyn compare`` rows against ``dynamics.summary.summarize``. Bad input must end in exit code 2,
one line on stderr, no traceback, and the run directories left as they were.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import imageio.v3 as iio  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from scipy.stats import linregress  # noqa: E402

from dynamics.run import load_run, save_run, write_json  # noqa: E402
from dynamics.summary import r_value, summarize  # noqa: E402
from figures.animation import threshold_animation  # noqa: E402
from figures.fig1 import fig1  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
COMPARE_COLUMNS = [
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
EVERY = 10  # one metrics row every EVERY steps


def dyn(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "cli", *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd
    )


def dyn_many(commands: dict, cwd=None) -> dict:
    """Run several ``dyn`` commands at once (they are independent): {key: args} -> {key: result}."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {key: pool.submit(dyn, *args, cwd=cwd) for key, args in commands.items()}
        return {key: f.result() for key, f in futures.items()}


def tree_hashes(root: Path) -> dict[str, str]:
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------------------------
# runs built from known data


def make_frames(n: int, rho: float, seed: int, p: float | None, bad_rows: bool = True, shuffle: bool = False):
    """Metrics with log(grad_norm) ~ N(0, 1) and log(smoothness) = rho x + noise (so r ~ rho).

    Thresholds: running p-th percentile of the gradient norms so far (inf when p is None: no
    clipping). Some rows have a smoothness of NaN, 0 or < 0, or a zero gradient norm: they
    must be left out of r and of the hexbins.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    y = rho * x + math.sqrt(1 - rho**2) * rng.normal(size=n)
    g, s = np.exp(x), np.exp(y)
    if bad_rows:
        s[[5, 50]] = np.nan
        s[[17, 60]] = 0.0
        s[31] = -1.0
        g[23] = 0.0
    if p is None:
        threshold = np.full(n, np.inf)
    else:
        threshold = np.array([np.percentile(g[: i + 1][g[: i + 1] > 0], p) for i in range(n)])
        threshold[-1] *= 1.37  # the last row's threshold differs from every other
    step = np.arange(n, dtype=np.int64) * EVERY
    metrics = pd.DataFrame(
        {
            "step": step,
            "epoch": step // 100,
            "time_s": 0.01 * step.astype(float),
            "loss": np.exp(-step / (n * EVERY)) + 0.05 * rng.random(n),
            "grad_norm": g,
            "threshold": threshold,
            "clip_coef": np.minimum(1.0, threshold / np.where(g > 0, g, 1.0)),
            "clipped": g > threshold,
            "step_size": 1e-3 * (1 + 0.3 * rng.random(n)),
            "smoothness": s,
            "lr": np.full(n, 1e-3),
        }
    )
    all_steps = np.arange(step[-1] + 1, dtype=np.int64)
    sg = np.exp(rng.normal(size=len(all_steps)))
    st = np.interp(all_steps, step, np.where(np.isfinite(threshold), threshold, 1e300))
    st = np.where(st >= 1e300, np.inf, st)
    steps = pd.DataFrame(
        {
            "step": all_steps,
            "loss": np.exp(-all_steps / (n * EVERY)) + 0.05 * rng.random(len(all_steps)),
            "grad_norm": sg,
            "threshold": st,
            "clipped": sg > st,
        }
    )
    if shuffle:
        metrics = metrics.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    return metrics, steps


def oracle_log_pairs(metrics: pd.DataFrame):
    g = metrics.grad_norm.to_numpy(float)
    s = metrics.smoothness.to_numpy(float)
    keep = np.isfinite(g) & np.isfinite(s) & (g > 0) & (s > 0)
    return np.log(g[keep]), np.log(s[keep])


SPECS = {
    # name: (clipper, rho, seed, percentile for the recorded threshold, with eval, shuffled rows)
    "auto10": ({"kind": "AutoClip", "p": 10.0, "window": None}, 0.3, 1, 10.0, True, True),
    "auto100": ({"kind": "AutoClip", "p": 100.0}, 0.9, 2, 100.0, False, False),
    "noclip": ({"kind": "NoClip"}, 0.6, 3, None, False, False),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{name: (run_dir, metrics frame as built)} for the three runs of SPECS, plus a short one."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, (clipper, rho, seed, p, with_eval, shuffle) in SPECS.items():
        metrics, steps = make_frames(400, rho, seed, p, shuffle=shuffle)
        tables = {"metrics": metrics, "steps": steps}
        if with_eval:
            tables["eval"] = pd.DataFrame({"step": np.array([1000, 2000, 3990], np.int64), "si_sdri": [2.5, 6.0, 8.25]})
        out[name] = (save_run(root / name, {"clipper": clipper, "name": name}, **tables), metrics)
    metrics, steps = make_frames(8, 0.5, 4, 10.0, bad_rows=False)
    out["short"] = (
        save_run(
            root / "short", {"clipper": {"kind": "AutoClip", "p": 10.0}, "name": "short"}, metrics=metrics, steps=steps
        ),
        metrics,
    )
    return out


@pytest.fixture(scope="module")
def runs(built):
    return {name: load_run(d) for name, (d, _) in built.items()}


@pytest.fixture(scope="module")
def figure(runs):
    fig = fig1([runs["auto10"], runs["auto100"], runs["noclip"]])
    yield fig
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# 1, 2: Fig. 1


def test_built_data_has_the_intended_correlations(built):
    # the data, not the code: r near 0.3 and 0.9 as designed, so the panels differ visibly
    for name, target in (("auto10", 0.3), ("auto100", 0.9)):
        r = linregress(*oracle_log_pairs(built[name][1])).rvalue
        assert abs(r - target) < 0.1, (name, r)


@pytest.mark.parametrize("i, name", [(0, "auto10"), (1, "auto100"), (2, "noclip")])
def test_fig1_r_value_text_matches_linregress(figure, runs, built, i, name):
    x, y = oracle_log_pairs(built[name][1])
    assert len(x) < len(built[name][1])  # bad rows were there to leave out
    expected = linregress(x, y).rvalue
    assert r_value(runs[name]) == pytest.approx(expected, abs=1e-12)
    ax = figure.hexbin_axes[i]
    texts = [t.get_text() for t in ax.texts if t.get_gid() == "r_value"]
    assert texts == [f"r = {expected:.2f}"]
    # every kept point, and only those, is in the hexbin counts
    (hexbin,) = ax.collections
    assert hexbin.get_array().sum() == len(x)


def test_fig1_panels_share_axes_that_hold_every_point(figure, built):
    assert len(figure.hexbin_axes) == 3
    limits = {(ax.get_xlim(), ax.get_ylim()) for ax in figure.hexbin_axes}
    assert len(limits) == 1
    (xlim, ylim) = limits.pop()
    for name in SPECS:
        x, y = oracle_log_pairs(built[name][1])
        assert xlim[0] < x.min() and x.max() < xlim[1]
        assert ylim[0] < y.min() and y.max() < ylim[1]


def test_fig1_threshold_line_only_for_the_clipped_run(figure, built):
    metrics = built["auto10"][1]
    last = float(metrics.loc[metrics.step.idxmax(), "threshold"])
    ax = figure.hexbin_axes[0]
    lines = [line for line in ax.lines if line.get_gid() == "threshold"]
    assert len(lines) == 1
    assert np.asarray(lines[0].get_xdata(), float) == pytest.approx([math.log(last)] * 2, abs=1e-12)
    xlim = ax.get_xlim()
    assert xlim[0] < math.log(last) < xlim[1]
    legend = ax.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == ["log(10th percentile of gradient norm)"]
    for ax in figure.hexbin_axes[1:]:  # p = 100 (finite thresholds recorded) and NoClip
        assert not [line for line in ax.lines if line.get_gid() == "threshold"]
        assert ax.get_legend() is None


def test_fig1_panel_count(runs):
    one = fig1([runs["auto10"]])
    three = fig1([runs["auto10"], runs["auto100"], runs["noclip"]])
    try:
        assert len(one.hexbin_axes) == 1 and len(one.axes) == 3
        assert len(three.hexbin_axes) == 3 and len(three.axes) == 5
    finally:
        plt.close(one)
        plt.close(three)


# ----------------------------------------------------------------------------------------------
# 3: the threshold animation


def animate_and_check(run, metrics, path, frames):
    """Run the animation, check every frame against the built metrics; return the callback records."""
    metrics = metrics.sort_values("step")
    x_all, y_all = oracle_log_pairs(metrics)
    log_thr = np.log(metrics.threshold.to_numpy(float))
    record = []

    def on_frame(index, step, ax, line):
        (points,) = ax.collections  # the scatter
        record.append(
            (index, step, ax, line, line.get_xdata()[0], ax.get_xlim(), ax.get_ylim(), len(points.get_offsets()))
        )

    returned = threshold_animation(run, path, frames=frames, on_frame=on_frame)
    assert returned == frames
    assert [r[0] for r in record] == list(range(frames))
    steps = [r[1] for r in record]
    assert steps == sorted(steps)
    if frames > 1:  # the frames span the whole run (a single frame: see the test below)
        assert steps[0] == metrics.step.iloc[0] and steps[-1] == metrics.step.iloc[-1]
    for _, step, ax, line, x, xlim, ylim, n_points in record:
        upto = metrics[metrics.step <= step]
        assert x == pytest.approx(math.log(upto.threshold.iloc[-1]), abs=1e-12)
        assert n_points == len(oracle_log_pairs(upto)[0])
        assert ax is record[0][2] and line is record[0][3]  # artists updated, not a figure per frame
        assert xlim == record[0][5] and ylim == record[0][6]
    xlim, ylim = record[0][5], record[0][6]
    assert xlim[0] <= min(x_all.min(), log_thr.min()) and max(x_all.max(), log_thr.max()) <= xlim[1]
    assert ylim[0] <= y_all.min() and y_all.max() <= ylim[1]
    return record


def gif_frames(path):
    assert Path(path).read_bytes()[:4] == b"GIF8"
    shapes = [frame.shape for frame in iio.imiter(path)]
    assert len(set(shapes)) == 1, shapes
    return iio.improps(path, index=None).shape[0], len(shapes)


@pytest.mark.parametrize(
    "name, frames",
    [
        ("auto10", 12),
        ("auto10", 1),
        ("short", 20),  # regression: Pillow merged identical frames when frames > rows
    ],
)
def test_threshold_animation(runs, built, tmp_path, name, frames):
    path = tmp_path / "threshold.gif"
    animate_and_check(runs[name], built[name][1], path, frames)
    assert gif_frames(path) == (frames, frames)


def test_a_single_frame_shows_the_end_of_training(runs, built, tmp_path):
    record = animate_and_check(runs["auto10"], built["auto10"][1], tmp_path / "one.gif", 1)
    metrics = built["auto10"][1]
    assert record[0][1] == metrics.step.max()
    assert record[0][7] == len(oracle_log_pairs(metrics)[0])  # every point shown


def test_threshold_animation_more_frames_than_rows_draws_every_frame(runs, built, tmp_path):
    # the artists part of the case above, which passes: 20 frames over 8 rows
    record = animate_and_check(runs["short"], built["short"][1], tmp_path / "t.gif", 20)
    assert len(record) == 20 > len(built["short"][1])


# ----------------------------------------------------------------------------------------------
# 4, 5: commands that succeed


@pytest.fixture(scope="module")
def cli_results(built, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    a, b, c = (built[n][0] for n in ("auto10", "auto100", "noclip"))
    results = dyn_many(
        {
            "png": ("plot", a, "--out", out / "one.png"),
            "pdf": ("plot", a, b, "--out", out / "two.pdf"),
            "svg": ("plot", a, b, c, "--out", out / "three.svg"),
            "jpg": ("plot", a, b, "--out", out / "x.jpg"),
            "gif": ("animate", a, "--out", out / "t.gif", "--frames", "5"),
            "csv": ("compare", a, b, c, "--csv"),
            "json": ("compare", a, b, c, "--json", "--out", out / "cmp.png"),
            "info": ("info", a),
        },
        cwd=out,
    )
    return out, results


@pytest.mark.parametrize(
    "key, file, magic",
    [
        ("png", "one.png", b"\x89PNG\r\n\x1a\n"),
        ("pdf", "two.pdf", b"%PDF"),
        ("gif", "t.gif", b"GIF8"),
        ("json", "cmp.png", b"\x89PNG\r\n\x1a\n"),
    ],
)
def test_output_format_follows_extension(cli_results, key, file, magic):
    out, results = cli_results
    assert results[key].returncode == 0, results[key].stderr
    assert "Traceback" not in results[key].stderr
    assert (out / file).read_bytes().startswith(magic)


def test_svg_output(cli_results):
    out, results = cli_results
    assert results["svg"].returncode == 0, results["svg"].stderr
    text = (out / "three.svg").read_text()
    assert "<svg" in text and not text.startswith("\x89PNG")


def test_unknown_extension_is_bad_input(cli_results):
    out, results = cli_results
    r = results["jpg"]
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (out / "x.jpg").exists()


def test_animate_writes_the_frames_asked(cli_results):
    out, _ = cli_results
    assert gif_frames(out / "t.gif") == (5, 5)


def expected_rows(built):
    return [summarize(load_run(built[n][0])) for n in ("auto10", "auto100", "noclip")]


def same(a, b):
    if isinstance(b, float) and math.isnan(b):
        return isinstance(a, float) and math.isnan(a)
    return a == b


def test_compare_csv(cli_results, built):
    r = cli_results[1]["csv"]
    assert r.returncode == 0, r.stderr
    reader = csv.DictReader(io.StringIO(r.stdout))
    assert reader.fieldnames == COMPARE_COLUMNS
    rows = list(reader)
    expected = expected_rows(built)
    assert len(rows) == len(expected) == 3
    # the cases that matter are there: a finite SI-SDRi, an infinite threshold, a run without evaluations
    # (no final_si_sdri of its own: the table shows it empty)
    assert math.isfinite(expected[0]["final_si_sdri"]) and math.isinf(expected[2]["final_threshold"])
    assert "final_si_sdri" not in expected[1]
    for row, exp in zip(rows, expected):
        assert row["run"] == exp["run"]
        assert int(row["steps"]) == exp["steps"] == 399 * EVERY
        for k in COMPARE_COLUMNS[2:]:
            assert same(float(row[k]), exp.get(k, math.nan)), (k, row[k], exp.get(k))
    # r_value is the one of Fig. 1
    for row, name in zip(rows, ("auto10", "auto100", "noclip")):
        assert float(row["r_value"]) == pytest.approx(linregress(*oracle_log_pairs(built[name][1])).rvalue, abs=1e-12)


def test_compare_json(cli_results, built):
    r = cli_results[1]["json"]
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)  # stdout is JSON only, nothing else (the figure is reported on stderr)
    assert isinstance(data, list) and len(data) == 3
    for obj, exp in zip(data, expected_rows(built)):
        assert isinstance(obj, dict) and list(obj) == COMPARE_COLUMNS
        for k in COMPARE_COLUMNS:
            v = exp.get(k, math.nan)
            assert obj[k] == (None if isinstance(v, float) and not math.isfinite(v) else v), k
    assert data[2]["final_threshold"] is None and data[1]["final_si_sdri"] is None


def test_info_of_a_saved_run_without_model_size(cli_results, built):
    r = cli_results[1]["info"]
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "400 metrics rows" in r.stdout and "finished" in r.stdout


# ----------------------------------------------------------------------------------------------
# 6: bad input


def make_bad(root: Path, case: str) -> Path:
    config = {"clipper": {"kind": "AutoClip", "p": 10.0}, "name": case}
    d = root / case
    if case == "missing":
        return d
    if case == "norun":
        d.mkdir()
        (d / "notes.txt").write_text("not a run\n")
    elif case == "empty_saved":
        save_run(d, config)
    elif case == "empty_running":
        (d / "journal").mkdir(parents=True)
        (d / "journal" / "metrics.00000.arrows").write_bytes(b"")  # a writer killed before the schema
        write_json(d / "config.json", {**config, "schema_version": 1, "status": "running"})
    elif case == "corrupt":
        metrics, steps = make_frames(80, 0.5, 5, 10.0)
        save_run(d, config, metrics=metrics, steps=steps)
        (d / "metrics.parquet").write_bytes(b"this is no parquet file\x00\x01" * 40)
    return d


BAD_CASES = ["missing", "norun", "empty_saved", "empty_running", "corrupt"]
COMMANDS = ["plot", "animate", "compare", "info"]


@pytest.fixture(scope="module")
def bad_results(built, tmp_path_factory):
    """Every (command, case) on its own copy of the directories, run at once; with hashes before/after."""
    base = tmp_path_factory.mktemp("bad")
    good_src = built["noclip"][0]
    jobs, before, dirs = {}, {}, {}
    for command in COMMANDS:
        for case in BAD_CASES:
            root = base / f"{command}-{case}"
            root.mkdir()
            bad = make_bad(root, case)
            good = root / "good"
            good.mkdir()
            for f in good_src.iterdir():
                (good / f.name).write_bytes(f.read_bytes())
            out = root / "out"
            out.mkdir()
            args = {
                "plot": ("plot", good, bad, "--out", out / "fig.png"),
                "animate": ("animate", bad, "--out", out / "t.gif", "--frames", "3"),
                "compare": ("compare", good, bad, "--out", out / "cmp.png"),
                "info": ("info", bad),
            }[command]
            jobs[command, case] = args
            before[command, case] = tree_hashes(root)
            dirs[command, case] = root
    results = dyn_many(jobs, cwd=base)
    after = {key: tree_hashes(root) for key, root in dirs.items()}
    return results, before, after, dirs


@pytest.mark.parametrize(
    "command, case",
    [(command, case) for command in COMMANDS for case in BAD_CASES],
)
def test_bad_input(bad_results, command, case):
    results, before, after, dirs = bad_results
    r = results[command, case]
    assert "Traceback" not in r.stderr, r.stderr
    assert after[command, case] == before[command, case]  # nothing written, nothing changed
    if case == "missing":
        assert not (dirs[command, case] / "missing").exists()
    if command == "info" and case.startswith("empty"):
        # a run with no rows yet is a run: info may describe it, or refuse it as plot does
        if r.returncode == 0:
            assert r.stderr == "" and "0 metrics rows" in r.stdout
            return
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith("dyn: error: ")
