"""Seeds in Fig. 1 (bands, pooled hexbins), per-layer heatmaps, metrics columns, and safe figure files.

Runs are built from known frames with ``dynamics.save_run``; every number a figure shows is
checked on its matplotlib artists against an oracle computed here from those frames: the band
against a t-interval computed with numpy and scipy.stats.t, the pooled r against
scipy.stats.linregress, the heatmap against a numpy log10 of the table, the 2/lr line against
2/lr. Bad input ends in exit code 2, one line on stderr, and no file left behind.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from helpers import read_only_folder  # noqa: E402
from scipy import stats  # noqa: E402

from dynamics.run import Run, load_run, save_run  # noqa: E402
from figures.animation import MAX_FRAMES, check_animation  # noqa: E402
from figures.columns import columns_figure  # noqa: E402
from figures.compare import comparison_figure  # noqa: E402
from figures.fig1 import fig1  # noqa: E402
from figures.files import FigurePathError, check_writable, save_figure  # noqa: E402
from figures.groups import group_runs  # noqa: E402
from figures.layers import layers_figure  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
N = 120  # recorded rows per run
EVERY = 5
LR = 0.05
SEEDS = (0, 1, 2)
RHOS = {0: 0.2, 1: 0.5, 2: 0.8}  # seeds correlate differently: the pooled r is none of the single ones
# parameter tensors in model order; natural sorting ('blocks.2' before 'blocks.10') must recover it
LAYER_NAMES = [f"blocks.{i}.attention.output_projection.weight" for i in range(12)] + ["head.bias", "head.weight"]
LAYER_STEPS = 8


def dyn(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "cli", *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd
    )


def metrics_frame(seed: int, p: float | None, lr_column: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(100 + seed)
    rho = RHOS[seed]
    x = rng.normal(size=N)
    y = rho * x + math.sqrt(1 - rho**2) * rng.normal(size=N)
    g, s = np.exp(x), np.exp(y)
    s[7] = np.nan  # rows a hexbin must leave out
    g[11] = 0.0
    step = np.arange(1, N + 1, dtype=np.int64) * EVERY
    threshold = np.full(N, np.inf) if p is None else np.exp(-0.5 + 0.1 * seed + 0.002 * np.arange(N))
    frame = pd.DataFrame(
        {
            "step": step,
            "epoch": step // 100,
            "time_s": 0.01 * step.astype(float),
            "loss": np.exp(-step / (N * EVERY)) * (1 + 0.2 * rng.random(N)),
            "grad_norm": g,
            "threshold": threshold,
            "clip_coef": np.minimum(1.0, threshold / np.where(g > 0, g, 1.0)),
            "clipped": g > threshold,
            "step_size": 1e-2 * (1 + seed * 0.3 + 0.5 * rng.random(N)),
            "smoothness": s,
            "sharpness": 10.0 + 30.0 * (1 - np.exp(-step / 200)) + rng.normal(size=N),
        }
    )
    if lr_column:
        frame["lr"] = np.full(N, LR)
    return frame


def layers_frame(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(7 + seed)
    rows = []
    for step in np.arange(1, LAYER_STEPS + 1) * 10:
        for name in LAYER_NAMES:
            rows.append((step, name, *np.exp(rng.normal(size=4))))
    frame = pd.DataFrame(rows, columns=["step", "name", "grad_norm", "step_size", "param_norm", "update_ratio"])
    frame.loc[3, "grad_norm"] = 0.0  # not positive: a blank cell
    # steps out of order (their order must not matter); each step's rows in model order, as recorded
    steps = frame.step.unique()
    rank = dict(zip(steps, np.random.default_rng(seed).permutation(len(steps))))
    return frame.iloc[np.argsort(frame.step.map(rank).to_numpy(), kind="stable")].reset_index(drop=True)


def config(seed: int, clipper: dict, lr: float = LR) -> dict:
    # bookkeeping that differs between seeds and must not split an arm
    return {
        "clipper": clipper,
        "optimizer": {"kind": "SGD", "lr": lr},
        "task": {"seed": seed, "steps": N * EVERY, "hidden": 16},
        "name": f"run-{seed}-{clipper['kind']}",
        "command": ["dyn", "record", "--seed", str(seed)],
        "time_s": 10.0 + seed,
        "steps": N * EVERY - seed,
        "versions": {"dyn": "0.1.0", "torch": f"2.{seed}"},
    }


AUTO = {"kind": "AutoClip", "p": 10.0, "window": None}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{name: (run_dir, metrics frame)}: three AutoClip seeds, a NoClip run, a run with another lr and no lr column,
    a run with a layers table."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for s in SEEDS:
        m = metrics_frame(s, 10.0)
        out[f"auto{s}"] = (save_run(root / f"auto{s}", config(s, AUTO), metrics=m, layers=layers_frame(s)), m)
    m = metrics_frame(0, None)
    out["noclip"] = (save_run(root / "noclip", config(0, {"kind": "NoClip"}), metrics=m), m)
    m = metrics_frame(1, None, lr_column=False)
    out["lr"] = (save_run(root / "lr", config(1, {"kind": "NoClip"}, lr=0.4), metrics=m), m)
    return out


@pytest.fixture(scope="module")
def runs(built):
    return {name: load_run(d) for name, (d, _) in built.items()}


def seeds(runs):
    return [runs[f"auto{s}"] for s in SEEDS]


def oracle_pairs(frame):
    g, s = frame.grad_norm.to_numpy(float), frame.smoothness.to_numpy(float)
    keep = np.isfinite(g) & np.isfinite(s) & (g > 0) & (s > 0)
    return np.log(g[keep]), np.log(s[keep])


def oracle_band(frames, column, transform=lambda v: v):
    """Mean and 95% t-interval of the mean over seeds, step by step (numpy + scipy.stats.t)."""
    values = np.vstack([transform(f[column].to_numpy(float)) for f in frames])
    n = len(frames)
    mean = values.mean(axis=0)
    half = stats.t.ppf(0.975, n - 1) * values.std(axis=0, ddof=1) / math.sqrt(n)
    return frames[0].step.to_numpy(), mean, mean - half, mean + half


def band_of(ax):
    """(xs, lows, highs) of the one band in ax, read from its polygon's vertices."""
    (band,) = [c for c in ax.collections if c.get_gid() == "band"]
    vertices = np.vstack([p.vertices for p in band.get_paths()])
    frame = pd.DataFrame(vertices, columns=["x", "y"]).groupby("x").y.agg(["min", "max"])
    return frame.index.to_numpy(), frame["min"].to_numpy(), frame["max"].to_numpy()


def only(items):
    (item,) = items
    return item


# ----------------------------------------------------------------------------------------------
# grouping


def test_group_runs_joins_seeds_and_keeps_arms_apart(runs):
    groups = group_runs([runs["auto0"], runs["noclip"], runs["auto1"], runs["lr"], runs["auto2"]])
    assert [[r.name for r in g] for g in groups] == [
        [runs["auto0"].name, runs["auto1"].name, runs["auto2"].name],
        [runs["noclip"].name],
        [runs["lr"].name],  # NoClip too, but another learning rate: another arm
    ]


# ----------------------------------------------------------------------------------------------
# Fig. 1 with seeds


@pytest.fixture(scope="module")
def seeded_fig(runs):
    fig = fig1([*seeds(runs), runs["noclip"]])
    yield fig
    plt.close(fig)


@pytest.mark.parametrize("panel, column, transform", [(0, "step_size", lambda v: v), (1, "loss", np.log)])
def test_seed_band_is_the_t_interval_of_the_mean(seeded_fig, built, panel, column, transform):
    frames = [built[f"auto{s}"][1] for s in SEEDS]
    steps, mean, low, high = oracle_band(frames, column, transform)
    ax = seeded_fig.axes[panel]
    xs, lows, highs = band_of(ax)
    assert np.array_equal(xs, steps)
    np.testing.assert_allclose(lows, low, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(highs, high, rtol=1e-10, atol=1e-12)
    assert np.all(highs - lows > 0)
    line = only([line for line in ax.lines if line.get_gid() == "mean"])
    np.testing.assert_allclose(line.get_ydata(), mean, rtol=1e-12)
    assert line.get_label() == "With AutoClip, p = 10 (3 seeds: mean, 95% CI)"
    # the single-seed arm is its raw curve, as Fig. 1 always drew it
    noclip = only([line for line in ax.lines if line.get_label() == "No clipping"])
    np.testing.assert_allclose(noclip.get_ydata(), transform(built["noclip"][1][column].to_numpy(float)))
    assert noclip.get_color() == "#00008b" and line.get_color() == "#e00000"


def test_pooled_hexbin_holds_every_seed_and_its_r(seeded_fig, built):
    assert len(seeded_fig.hexbin_axes) == 2  # one per arm, not one per run
    pairs = [oracle_pairs(built[f"auto{s}"][1]) for s in SEEDS]
    x, y = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    ax = seeded_fig.hexbin_axes[0]
    assert only(ax.collections).get_array().sum() == len(x) == 3 * (N - 2)
    r = stats.linregress(x, y).rvalue
    assert only([t.get_text() for t in ax.texts if t.get_gid() == "r_value"]) == f"r = {r:.2f}"
    assert all(f"{stats.linregress(*p).rvalue:.2f}" != f"{r:.2f}" for p in pairs)  # pooled, not one seed
    assert "3 seeds pooled" in ax.get_title()
    # threshold line: the mean over seeds of log(final threshold)
    finals = [math.log(built[f"auto{s}"][1].threshold.iloc[-1]) for s in SEEDS]
    line = only([line for line in ax.lines if line.get_gid() == "threshold"])
    assert line.get_xdata()[0] == pytest.approx(np.mean(finals), abs=1e-12)
    assert line.get_label() == "mean log(10th percentile of gradient norm)"
    other = seeded_fig.hexbin_axes[1]
    assert only(other.collections).get_array().sum() == len(oracle_pairs(built["noclip"][1])[0])
    assert other.get_title() == "No clipping"


def test_single_seed_arms_look_as_before(runs):
    fig = fig1([runs["noclip"], runs["auto0"]])
    try:
        ax = fig.axes[0]
        assert not [c for c in ax.collections if c.get_gid() == "band"]
        assert [line.get_label() for line in ax.lines] == ["No clipping", "With AutoClip, p = 10"]
        assert [a.get_title() for a in fig.hexbin_axes] == ["No clipping", "With AutoClip, p = 10"]
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------------------
# per-layer heatmaps


@pytest.mark.parametrize("column", [None, "grad_norm", "param_norm"])
def test_heatmap_is_log10_of_the_layers_table(runs, built, column):
    run = runs["auto0"]
    frame = layers_frame(0)
    shown = column or "update_ratio"  # the default when recorded
    expected = frame.pivot(index="name", columns="step", values=shown).loc[LAYER_NAMES].to_numpy(float)
    with np.errstate(divide="ignore"):
        expected = np.where(expected > 0, np.log10(expected), np.nan)
    fig = layers_figure([run], column)
    try:
        ax = only(fig.heatmap_axes)
        image = only(ax.images).get_array()
        np.testing.assert_allclose(np.ma.filled(image.astype(float), np.nan), expected, rtol=1e-12)
        if shown == "grad_norm":
            assert np.isnan(expected).sum() == 1 and np.ma.getmaskarray(image).sum() == 1  # the zero: blank
        assert fig.axes[-1].get_ylabel() == f"log10({shown})"  # the colour bar
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert labels == LAYER_NAMES  # 14 tensors fit: one row each, named in full (no common prefix to drop)
    finally:
        plt.close(fig)


def test_heatmap_ticks_stay_readable_for_many_layers_and_steps(tmp_path):
    names = [f"encoder.layer.{i}.weight" for i in range(100)]
    steps = np.arange(350) * 20
    frame = pd.DataFrame(
        {
            "step": np.repeat(steps, len(names)),
            "name": np.tile(names, len(steps)),
            "grad_norm": np.exp(np.random.default_rng(0).normal(size=len(steps) * len(names))),
        }
    )
    run = load_run(save_run(tmp_path / "big", {"clipper": {"kind": "NoClip"}}, layers=frame))
    default = layers_figure([run])  # at most 40 rows: the 100 numbered layers in ranges of 3
    try:
        ax = only(default.heatmap_axes)
        assert only(ax.images).get_array().shape == (34, 350)
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert labels == [f"layer.{i}–{min(i + 2, 99)}" if i < 99 else "layer.99" for i in range(0, 100, 3)]
        assert ax.get_ylabel() == "encoder.…"
    finally:
        plt.close(default)
    fig = layers_figure([run], depth=3)  # asked for every layer: 100 rows
    try:
        ax = only(fig.heatmap_axes)
        assert only(ax.images).get_array().shape == (100, 350)
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert labels == [n.removeprefix("encoder.").removesuffix(".weight") for n in names[::2]]  # every second row
        ticks = set(ax.get_yticks()) | set(ax.get_yticks(minor=True))  # a short tick on every row
        assert ticks == set(range(100))
        fig.canvas.draw()
        xlabels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert 3 <= len(xlabels) <= 10 and all(int(x) in set(steps) for x in xlabels)
    finally:
        plt.close(fig)


def test_heatmap_keeps_the_recorded_order_when_the_table_has_it(runs):
    # a table in recording order (not sorted by name) keeps the model's order of parameters
    order = ["conv.weight", "conv.bias", "bn.weight", "fc.weight"]
    frame = pd.DataFrame({"step": np.repeat([1, 2], 4), "name": order * 2, "grad_norm": np.arange(1.0, 9.0)})
    run = Run(Path("in-memory"), {}, metrics=None, steps=None, layers=frame, eval=None)
    fig = layers_figure([run])
    try:
        ax = only(fig.heatmap_axes)
        assert [t.get_text() for t in ax.get_yticklabels()] == order
        np.testing.assert_allclose(only(ax.images).get_array(), np.log10([[1, 5], [2, 6], [3, 7], [4, 8]]))
    finally:
        plt.close(fig)


def test_heatmap_unknown_column_lists_the_columns(runs):
    with pytest.raises(ValueError, match="no layers column 'nope'.*grad_norm, step_size, param_norm, update_ratio"):
        layers_figure([runs["auto0"]], "nope")
    with pytest.raises(ValueError, match="no per-layer rows"):
        layers_figure([runs["noclip"]])


# ----------------------------------------------------------------------------------------------
# metrics columns


def test_columns_sharpness_has_the_2_over_lr_line(runs, built):
    fig = columns_figure([runs["noclip"], runs["lr"]], ["sharpness", "step_size"])
    try:
        ax = fig.column_axes["sharpness"]
        lines = sorted((line.get_ydata()[0], line.get_label()) for line in ax.lines if line.get_gid() == "two_over_lr")
        # one from the metrics lr column, one from config["optimizer"]["lr"] (the run has no lr column)
        assert [y for y, _ in lines] == pytest.approx([2 / 0.4, 2 / LR], rel=1e-12)
        assert all(label.startswith("2/lr") for _, label in lines)
        assert not [line for line in fig.column_axes["step_size"].lines if line.get_gid() == "two_over_lr"]
        curve = only([line for line in ax.lines if line.get_label() == "No clipping (run-0-NoClip)"])
        np.testing.assert_allclose(curve.get_ydata(), built["noclip"][1].sharpness.to_numpy(float))
    finally:
        plt.close(fig)


def test_columns_bands_for_seeds(runs, built):
    fig = columns_figure(seeds(runs), ["sharpness"])
    try:
        ax = fig.column_axes["sharpness"]
        steps, _, low, high = oracle_band([built[f"auto{s}"][1] for s in SEEDS], "sharpness")
        xs, lows, highs = band_of(ax)
        assert np.array_equal(xs, steps)
        np.testing.assert_allclose(lows, low, rtol=1e-10)
        np.testing.assert_allclose(highs, high, rtol=1e-10)
        assert only([line.get_ydata()[0] for line in ax.lines if line.get_gid() == "two_over_lr"]) == 2 / LR
        assert only(ax.get_legend().get_texts()[-1:]).get_text() == "2/lr"
    finally:
        plt.close(fig)


def test_columns_unknown_is_an_error_listing_the_columns(runs):
    with pytest.raises(
        ValueError, match=r"no metrics column 'nope' in these runs; the columns are: epoch, time_s, loss"
    ):
        columns_figure([runs["noclip"]], ["loss", "nope"])


SPARSE = 6  # a quantity measured every 6th record step


def sparse_run(root, seed: int, optimizer: dict) -> tuple[Run, pd.DataFrame]:
    m = metrics_frame(seed, 10.0)
    m.loc[np.arange(N) % SPARSE != 2, "sharpness"] = np.nan  # measured on rows 2, 8, 14, ...: no two adjacent
    cfg = {**config(seed, AUTO), "optimizer": optimizer}
    return load_run(save_run(root / f"sparse{seed}-{optimizer['kind']}", cfg, metrics=m)), m


def test_sparse_columns_are_drawn_through_their_measured_points_with_markers(tmp_path):
    run, m = sparse_run(tmp_path, 0, {"kind": "Adam", "lr": 1e-3})
    fig = columns_figure([run], ["sharpness", "step_size"])
    try:
        curve = only([line for line in fig.column_axes["sharpness"].lines if line.get_gid() != "two_over_lr"])
        measured = m[m.sharpness.notna()]
        assert len(measured) == N // SPARSE and curve.get_marker() == "o"
        np.testing.assert_array_equal(curve.get_xdata(), measured.step.to_numpy())
        np.testing.assert_allclose(curve.get_ydata(), measured.sharpness.to_numpy(), rtol=1e-12)
        dense = only(fig.column_axes["step_size"].lines)  # measured every record: a plain line, as before
        assert dense.get_marker() == "None" and len(dense.get_xdata()) == N
    finally:
        plt.close(fig)
    # seeds: the band and mean over the measured steps, marked
    (tmp_path / "seeds").mkdir()
    pairs = [sparse_run(tmp_path / "seeds", s, {"kind": "Adam", "lr": 1e-3}) for s in SEEDS]
    fig = columns_figure([r for r, _ in pairs], ["sharpness"])
    try:
        ax = fig.column_axes["sharpness"]
        steps, mean, low, high = oracle_band([f[f.sharpness.notna()] for _, f in pairs], "sharpness")
        xs, lows, highs = band_of(ax)
        np.testing.assert_array_equal(xs, steps)
        np.testing.assert_allclose(lows, low, rtol=1e-10)
        np.testing.assert_allclose(highs, high, rtol=1e-10)
        line = only([line for line in ax.lines if line.get_gid() == "mean"])
        assert line.get_marker() == "o"
        np.testing.assert_allclose(line.get_ydata(), mean, rtol=1e-12)
    finally:
        plt.close(fig)


def edge_lines(run):
    fig = columns_figure([run], ["sharpness"])
    try:
        return [
            (line.get_ydata()[0], line.get_label())
            for line in fig.column_axes["sharpness"].lines
            if line.get_gid() == "two_over_lr"
        ]
    finally:
        plt.close(fig)


@pytest.mark.parametrize("kind", ["Adam", "AdamW", "RMSprop", "Adagrad"])
def test_no_edge_of_stability_line_for_adaptive_optimizers(tmp_path, kind):
    run, _ = sparse_run(tmp_path, 0, {"kind": kind, "lr": LR})
    assert edge_lines(run) == []


def diverges(curvature: float, lr: float, **settings) -> bool:
    """Whether torch.optim.SGD on ½·curvature·θ² blows up (the oracle for the edge of stability)."""
    import torch

    theta = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = torch.optim.SGD([theta], lr=lr, **settings)
    for _ in range(600):
        theta.grad = curvature * theta.detach()  # the gradient of ½·curvature·θ²
        opt.step()
    return bool(theta.abs().item() > 1.0)


@pytest.mark.parametrize(
    "settings, c, label",
    [
        ({}, 2.0, "2/lr"),
        ({"momentum": 0.9}, 3.8, "2(1+β)/lr, β = 0.9"),
        ({"momentum": 0.9, "dampening": 0.5}, 7.6, "2(1+β)/(lr(1−0.5)), β = 0.9"),
        ({"momentum": 0.9, "nesterov": True}, 3.8 / 2.8, "2(1+β)/(lr(1+2β)), β = 0.9, Nesterov"),
        ({"momentum": 0.5, "weight_decay": 0.4}, 3.0, "2(1+β)/lr − 0.4, β = 0.5"),
    ],
)
def test_edge_of_stability_of_sgd_is_where_sgd_diverges(tmp_path, settings, c, label):
    run, _ = sparse_run(tmp_path, 0, {"kind": "SGD", "lr": LR, "dampening": 0, "nesterov": False, **settings})
    ((y, shown),) = edge_lines(run)
    assert shown == label
    assert y == pytest.approx(c / LR - settings.get("weight_decay", 0.0), rel=1e-12)
    # torch's own SGD on a quadratic: stable just below the line, diverging just above it
    assert not diverges(0.98 * y, LR, **settings) and diverges(1.02 * y, LR, **settings)


def test_comparison_shows_only_what_the_runs_recorded(tmp_path, built):
    # a run of another task: loss and gradient norms, no step sizes, no held-out evaluation
    m = built["noclip"][1][["step", "loss", "grad_norm", "threshold"]]
    plain = load_run(save_run(tmp_path / "plain", {"clipper": {"kind": "NoClip"}}, metrics=m))
    fig = comparison_figure([plain])
    try:
        assert list(fig.panel_axes) == ["loss", "threshold"] and len(fig.axes) == 2
        assert all(ax.lines for ax in fig.axes)  # no empty panel
        assert not [ax for ax in fig.axes if "held-out" in ax.get_ylabel()]
    finally:
        plt.close(fig)
    fig = comparison_figure([plain, load_run(built["noclip"][0])])
    try:
        assert list(fig.panel_axes) == ["step_size", "loss", "threshold"]  # one run has step sizes: drawn for it
        assert [line.get_label() for line in fig.panel_axes["step_size"].lines] == ["No clipping (run-0-NoClip)"]
    finally:
        plt.close(fig)


def test_figures_draw_off_screen_unless_a_backend_was_chosen():
    code = (
        "import sys, matplotlib; from figures import style; plt = style.pyplot(); "
        "print(matplotlib.get_backend().lower())"
    )
    env = {k: v for k, v in ENV.items() if k != "MPLBACKEND"}
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = [
            pool.submit(subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True, env=e)
            for e in (env, {**env, "MPLBACKEND": "svg"})
        ]
        agg, chosen = (r.result() for r in runs)
    assert (agg.stdout.strip(), chosen.stdout.strip()) == ("agg", "svg"), (agg.stderr, chosen.stderr)


def test_comparison_figure_takes_any_eval_column(tmp_path, built):
    m = built["noclip"][1]
    ev = pd.DataFrame({"step": np.array([100, 300, 600], np.int64), "accuracy": [0.5, 0.7, 0.9]})
    run = load_run(save_run(tmp_path / "ev", {"clipper": {"kind": "NoClip"}}, metrics=m, eval=ev))
    fig = comparison_figure([run])
    try:
        ax = fig.panel_axes["eval"]
        assert list(fig.panel_axes) == ["step_size", "loss", "threshold", "eval"]
        assert ax.get_ylabel() == "held-out accuracy"
        np.testing.assert_allclose(only(ax.lines).get_ydata(), [0.5, 0.7, 0.9])
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match="no eval column 'si_sdri'.*accuracy"):
        comparison_figure([run], eval_column="si_sdri")


# ----------------------------------------------------------------------------------------------
# figure files and animation arguments


def test_a_failed_save_leaves_no_file_and_keeps_the_old_one(tmp_path):
    fig = plt.figure()
    out = tmp_path / "fig.png"
    out.write_bytes(b"the old figure")

    def broken(f, **kw):
        f.write(b"\x89PNG half a figure")
        raise OSError(28, "No space left on device")

    fig.savefig = broken
    with pytest.raises(OSError, match="No space left"):
        save_figure(fig, out)
    plt.close(fig)
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"] and out.read_bytes() == b"the old figure"
    fig = plt.figure()
    long = tmp_path / ("x" * 251 + ".png")  # 255 bytes: the longest name; a longer temporary name would fail
    save_figure(fig, long)
    plt.close(fig)
    assert long.read_bytes().startswith(b"\x89PNG") and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["fig.png", long.name]
    )


def test_check_writable(tmp_path):
    (tmp_path / "file").write_text("x")
    for bad, match in (
        (tmp_path / "file" / "fig.png", "is a file"),
        (tmp_path / ("y" * 300 + ".png"), "too long"),
        (tmp_path / "missing" / "fig.png", "does not exist"),
    ):
        with pytest.raises(FigurePathError, match=match):
            check_writable(bad)
    check_writable(tmp_path / "fig.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe is gone


@pytest.mark.parametrize(
    "frames, duration",
    [(0, 1.0), (MAX_FRAMES + 1, 1.0), (10**9, 1.0), (5, math.inf), (5, math.nan), (5, -1.0), (1, 1e6), (2.5, 1.0)],
)
def test_check_animation_refuses(frames, duration):
    with pytest.raises(ValueError):
        check_animation(frames, duration)


def test_check_animation_accepts_the_bounds():
    check_animation(1, 655.0)
    check_animation(MAX_FRAMES, 0.01)


# ----------------------------------------------------------------------------------------------
# the command line


def test_disk_full_while_saving_is_one_line_exit_1(built, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import figures.files
    from cli.plot import plot

    def full(fd):  # the disk fills up: the data written so far cannot be flushed
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(figures.files.os, "fsync", full)
    out = tmp_path / "fig.png"
    r = CliRunner().invoke(plot, [str(built["noclip"][0]), "--out", str(out)])
    assert r.exit_code == 1, (r.output, r.exception)
    assert r.stderr.count("\n") == 1 and "No space left on device" in r.stderr and "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def cli(built, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    (out / "afile").write_text("x")
    ro = read_only_folder(out)
    a = [built[f"auto{s}"][0] for s in SEEDS]
    noclip = built["noclip"][0]
    jobs = {
        "unknown": ("plot", noclip, "--columns", "sharpness,nope", "--out", out / "u.png"),
        "layers_unknown": ("plot", a[0], "--layers", "nope", "--out", out / "lu.png"),
        "frames": ("animate", noclip, "--frames", 10**9, "--out", out / "f.gif"),
        "inf": ("animate", noclip, "--duration", "inf", "--out", out / "i.gif"),
        "nan": ("animate", noclip, "--duration", "nan", "--out", out / "n.gif"),
        "under_file": ("plot", noclip, "--out", out / "afile" / "fig.png"),
        "too_long": ("plot", noclip, "--out", out / ("z" * 300 + ".png")),
    }
    if ro is not None:
        jobs["read_only"] = ("plot", noclip, "--out", ro / "fig.png")
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {key: pool.submit(dyn, *args, cwd=out) for key, args in jobs.items()}
        results = {key: f.result() for key, f in futures.items()}
    yield out, ro, results
    (out / "ro").chmod(0o755)


@pytest.mark.parametrize("view", ["fig1", "layers", "layers2", "columns"])
def test_plot_views_from_the_command_line(built, tmp_path, view):
    # in this process (click's runner): drawing is what is tested here, a fresh process costs seconds of imports
    from click.testing import CliRunner

    from cli.plot import plot

    a = [str(built[f"auto{s}"][0]) for s in SEEDS]
    noclip = str(built["noclip"][0])
    out = tmp_path / {"fig1": "seeds.png", "layers": "layers.png", "layers2": "l2.pdf", "columns": "columns.svg"}[view]
    args = {
        "fig1": [*a, noclip, "--out", out],
        "layers": ["--layers", a[0], "--out", out],  # --layers without a column, then the run
        "layers2": [a[0], a[1], "--layers", "grad_norm", "--out", out],
        "columns": [*a, noclip, "--columns", "sharpness,step_size", "--out", out],
    }[view]
    before = set(plt.get_fignums())
    r = CliRunner().invoke(plot, list(map(str, args)))
    assert r.exit_code == 0 and r.output.strip() == str(out), (r.output, r.exception)
    data = out.read_bytes()
    magic = {".png": b"\x89PNG", ".pdf": b"%PDF", ".svg": b"<?xml"}[out.suffix]
    assert data.startswith(magic)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left
    assert set(plt.get_fignums()) == before  # the command closed its figure


@pytest.mark.parametrize(
    "key, message",
    [
        ("unknown", "no metrics column 'nope'"),
        ("layers_unknown", "no layers column 'nope'"),
        ("frames", "--frames must be an integer from 1 to 1000"),
        ("inf", "--duration must be a finite number"),
        ("nan", "--duration must be a finite number"),
        ("under_file", "is a file"),
        ("too_long", "too long"),
        ("read_only", "cannot write"),
    ],
)
def test_plot_and_animate_bad_input_is_one_line(cli, key, message):
    out, ro, results = cli
    if key not in results:
        pytest.skip("no folder here refuses writes")
    r = results[key]
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("dyn: error: ") and message in r.stderr, r.stderr
    if key == "unknown":
        assert "the columns are: epoch, time_s, loss, grad_norm" in r.stderr and "sharpness" in r.stderr
    leftovers = {p.name for p in out.iterdir()} - {"afile", "ro"}
    assert not leftovers
    if ro is not None:
        assert not list(ro.glob("*fig*"))
