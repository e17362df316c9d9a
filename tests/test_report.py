"""`dyn report`: one self-contained interactive HTML file, checked in a real browser (Chromium) opened from
disk with every network request blocked: every panel drawn, hover values equal to the Parquet files'."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from scipy.stats import linregress

from autoclip import AutoClip
from dynamics import Recorder, load_run, save_run
from dynamics.diagnose import diagnose
from figures.report import MAX_POINTS, SHOWN, ReportBuilder, thin_minmax
from tests.browser import browser, open_page  # noqa: F401 - the fixture
from tests.helpers import batches, dyn, make_model

EVERY = 5
LONG = 2500  # steps of the synthetic run: more than MAX_POINTS, so its every-step curves are thinned
TENSORS = [f"encoder.blocks.{b}.{part}.{kind}" for b in range(12) for part in ("attn", "mlp") for kind in ("w", "b")]
SPIKE_STEP = 1500


def recorded_run(run_dir):
    """A small MLP under AutoClip p=10, recorded every 5 steps, with two evaluations."""
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    rec = Recorder(model, optimizer, run_dir, clipper=AutoClip(model.parameters(), p=10.0), every=5)
    for x, y in batches(120):
        rec.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))
        if rec.t % 60 == 0:
            rec.log_eval(si_sdri=rec.t / 10)
    rec.close()
    return run_dir


def synthetic_run(run_dir, seed=0, extra=None, steps=LONG):
    """A finished SGD run of ``steps`` steps recorded every 5: a sharpness column measured every third
    record (NaN between), 48 parameter tensors, and a loss spike at SPIKE_STEP in its every-step table."""
    rng = np.random.default_rng(seed)
    every_step = np.arange(1, steps + 1, dtype=np.int64)
    grad_all = np.exp(rng.normal(0, 0.5, steps))
    loss_all = np.exp(-every_step / steps + 0.05 * rng.standard_normal(steps))
    threshold_all = np.full(steps, 1.2)
    loss_all[every_step == SPIKE_STEP] *= 50
    steps_table = pd.DataFrame(
        {
            "step": every_step,
            "loss": loss_all,
            "grad_norm": grad_all,
            "threshold": threshold_all,
            "clipped": grad_all > threshold_all,
        }
    )
    rows = every_step % EVERY == 0
    n = int(rows.sum())
    step, grad, threshold = every_step[rows], grad_all[rows], threshold_all[rows]
    metrics = pd.DataFrame(
        {
            "step": step,
            "epoch": step // 1000,
            "time_s": 0.01 * step,
            "loss": np.exp(-step / steps + 0.05 * rng.standard_normal(n)),
            "grad_norm": grad,
            "threshold": threshold,
            "clip_coef": np.minimum(1, threshold / grad),
            "clipped": grad > threshold,
            "step_size": 0.1 * np.minimum(grad, threshold) * np.exp(0.3 * rng.standard_normal(n)),
            "smoothness": np.exp(0.8 * np.log(grad) + 0.3 * rng.standard_normal(n)),
            "sharpness": np.where(np.arange(n) % 3 == 0, 5 + rng.random(n), np.nan),
            "lr": np.full(n, 0.1),
        }
    )
    layers = pd.DataFrame(
        {
            "step": np.repeat(step, len(TENSORS)),
            "name": np.tile(TENSORS, n),
            "grad_norm": np.exp(rng.standard_normal(n * len(TENSORS))),
        }
    )
    config = {
        "clipper": {"kind": "ClipNorm", "max_norm": 1.2},
        "optimizer": {"kind": "SGD", "lr": 0.1, "momentum": 0.9},
        "every": EVERY,
        "seed": seed,
        **(extra or {}),
    }
    return save_run(run_dir, config, metrics=metrics, steps=steps_table, layers=layers)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Two runs and their report, written by `dyn report` with its default --out (report.html, here)."""
    tmp = tmp_path_factory.mktemp("report")
    runs = [recorded_run(tmp / "autoclip"), synthetic_run(tmp / "sgd")]
    result = dyn("report", *runs, cwd=tmp)
    assert result.returncode == 0, result.stderr
    assert (tmp / "report.html").exists() and "report: report.html" in result.stderr
    return tmp / "report.html", runs


@pytest.fixture(scope="module")
def page(browser, report):  # noqa: F811 - the fixture
    page, log = open_page(browser, report[0].as_uri())
    page.wait_for_selector("body[data-rendered=true]", timeout=30000)
    page.log = log
    return page


def hover(page, panel: str, curve: int, point: int) -> list[str]:
    """The lines of the hover label Plotly shows for one point."""
    return page.evaluate(
        """([panel, curve, point]) => {
            const div = document.getElementById(panel);
            Plotly.Fx.hover(div, [{curveNumber: curve, pointNumber: point}]);
            return Array.from(div.querySelectorAll(".hoverlayer .hovertext text tspan.line")).map(t => t.textContent);
        }""",
        [panel, curve, point],
    )


def hover_cell(page, panel: str, step: int, row: int) -> list[str]:
    """The hover label of a heatmap cell, pointed at with the mouse."""
    page.locator(f"#{panel}").scroll_into_view_if_needed()
    x, y = page.evaluate(
        """([panel, step, row]) => {
            const d = document.getElementById(panel), L = d._fullLayout, r = d.getBoundingClientRect();
            return [r.left + L.xaxis._offset + L.xaxis.l2p(step), r.top + L.yaxis._offset + L.yaxis.l2p(row)];
        }""",
        [panel, step, row],
    )
    page.mouse.move(x, y)
    page.wait_for_function(f"() => document.querySelector('#{panel} .hoverlayer .hovertext') !== null")
    return page.evaluate(
        f"() => Array.from(document.querySelectorAll('#{panel} .hoverlayer .hovertext text tspan.line'))"
        ".map(t => t.textContent)"
    )


def trace_xy(page, panel: str, curve: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = page.evaluate(
        "([p, c]) => { const t = document.getElementById(p)._fullData[c]; return [Array.from(t.x), Array.from(t.y)]; }",
        [panel, curve],
    )
    return np.array(x, dtype=float), np.array([math.nan if v is None else v for v in y], dtype=float)


def test_opens_from_disk_with_no_network_and_no_console_error(page):
    assert page.log.errors == [] and page.log.warnings == []
    assert page.log.blocked == []  # nothing even tried the network


def test_every_panel_renders(page, report):
    _, dirs = report
    schemas = [pq.read_schema(d / "metrics.parquet") for d in dirs]
    other = {c for s in schemas for c in s.names if c not in SHOWN}
    expected = {
        "fig1-step-size",
        "fig1-loss",
        "fig1-scatter-0",
        "fig1-scatter-1",
        "clipping",
        "layers-0",
        "layers-1",
        "eval-si_sdri",
        *(f"column-{c}" for c in other),
    }
    drawn = page.evaluate(
        """() => Object.fromEntries(Array.from(document.querySelectorAll(".panel")).map(d => [d.id, {
            svg: d.querySelectorAll("svg.main-svg").length,
            lines: Array.from(d.querySelectorAll(".scatterlayer path.js-line, .scatterlayer path.point"))
                .filter(p => (p.getAttribute("d") || "").length > 2).length,
            heatmap: d.querySelectorAll(".heatmaplayer image").length,
        }]))"""
    )
    assert set(drawn) == expected
    for panel, found in drawn.items():
        assert found["svg"] > 0 and (found["lines"] > 0 or found["heatmap"] > 0), (panel, found)
    # 48 tensors fold into at most 40 module rows, each label distinct
    rows = page.evaluate("() => document.getElementById('layers-1')._fullData[0].y")
    assert len(rows) <= 40 and len(set(rows)) == len(rows) and len(rows) > 1


def test_hover_shows_run_step_and_the_recorded_value(page, report):
    _, (autoclip, sgd) = report
    metrics = pq.read_table(autoclip / "metrics.parquet").to_pydict()
    k = 7
    lines = hover(page, "fig1-loss", 0, k)
    assert lines[0] == "autoclip" and lines[1] == f"step {metrics['step'][k]}"
    assert lines[2].startswith("loss ") and float(lines[2].split()[1]) == pytest.approx(metrics["loss"][k], rel=1e-7)
    lines = hover(page, "fig1-scatter-0", 0, 3)
    assert lines[1] == f"step {metrics['step'][3]}"
    assert float(lines[2].split()[-1]) == pytest.approx(metrics["grad_norm"][3], rel=1e-7)
    assert float(lines[3].split()[-1]) == pytest.approx(metrics["smoothness"][3], rel=1e-7)
    # a sparse column: its points are the measured rows only
    sharp = pq.read_table(sgd / "metrics.parquet").to_pandas().dropna(subset=["sharpness"]).reset_index()
    sgd_curve = page.evaluate(
        "() => document.getElementById('column-sharpness')._fullData.findIndex(t => t.name === 'sgd')"
    )
    lines = hover(page, "column-sharpness", sgd_curve, 2)
    assert lines[:2] == ["sgd", f"step {sharp.step[2]}"]
    assert float(lines[2].split()[-1]) == pytest.approx(sharp.sharpness[2], rel=1e-7)
    mode = page.evaluate(f"() => document.getElementById('column-sharpness')._fullData[{sgd_curve}].mode")
    assert "markers" in mode
    # a heatmap cell: one tensor's value, and a module's root-sum-square of its tensors' values
    layers = pq.read_table(autoclip / "layers.parquet").to_pandas()
    cell = layers[(layers.step == 20) & (layers.name == "2.weight")].grad_norm.item()
    lines = hover_cell(page, "layers-0", 20, 2)
    assert lines[:3] == ["autoclip", "2.weight", "step 20"]
    assert float(lines[3].split()[-1]) == pytest.approx(cell, rel=1e-7)
    layers = pq.read_table(sgd / "layers.parquet").to_pandas()
    module = layers[(layers.step == 500) & layers.name.str.startswith("encoder.blocks.0.attn.")].grad_norm
    lines = hover_cell(page, "layers-1", 500, 0)
    assert lines[1].endswith("blocks.0.attn (2)") and lines[2] == "step 500" and len(module) == 2
    assert float(lines[3].split()[-1]) == pytest.approx(np.sqrt(np.sum(module**2)), rel=1e-7)


def test_long_curves_are_thinned_keeping_extremes_and_recorded_points(page, report):
    _, (_, sgd) = report
    steps = pq.read_table(sgd / "steps.parquet").to_pandas()
    curve = page.evaluate("() => document.getElementById('clipping')._fullData.findIndex(t => t.name === 'sgd')")
    x, y = trace_xy(page, "clipping", curve)
    assert len(x) <= MAX_POINTS < len(steps)
    by_step = dict(zip(steps.step, steps.grad_norm))
    assert all(by_step[int(s)] == v for s, v in zip(x, y))  # every point shown is a recorded row, exactly
    assert steps.grad_norm.max() in y and steps.grad_norm.min() in y


def test_legend_click_toggles_a_run_in_every_panel(page):
    def visibility():
        return page.evaluate(
            """() => Array.from(document.querySelectorAll(".panel")).flatMap(d => d.data
                .filter(t => t.meta && t.meta.run === "autoclip")
                .map(t => t.visible === undefined ? true : t.visible))"""
        )

    assert set(visibility()) == {True}
    page.locator("#fig1-step-size .legend .traces").first.click()
    assert set(visibility()) == {"legendonly"}
    page.locator("#fig1-step-size .legend .traces").first.click()
    assert set(visibility()) == {True}


def test_drag_zooms(page):
    drag = page.locator("#clipping .nsewdrag").first
    drag.scroll_into_view_if_needed()
    box = drag.bounding_box()
    before = page.evaluate("() => document.getElementById('clipping')._fullLayout.xaxis.range.slice()")
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5, steps=5)
    page.mouse.up()
    after = page.evaluate("() => document.getElementById('clipping')._fullLayout.xaxis.range.slice()")
    assert before[0] < after[0] < after[1] < before[1]


def test_summary_and_findings_hold_the_exact_numbers(page, report):
    _, dirs = report
    table = page.evaluate(
        """() => { const t = document.querySelector("#section-summary table");
            const heads = Array.from(t.querySelectorAll("thead th")).map(h => h.textContent);
            return Array.from(t.querySelectorAll("tbody tr")).map(r => Object.fromEntries(
                Array.from(r.children).map((c, i) => [heads[i], c.getAttribute("title") || c.textContent]))); }"""
    )
    assert [row["run"] for row in table] == ["autoclip", "sgd"]
    for row, d in zip(table, dirs):
        m = pq.read_table(d / "metrics.parquet").to_pandas()
        keep = (m.grad_norm > 0) & (m.smoothness > 0)
        r = linregress(np.log(m.grad_norm[keep]), np.log(m.smoothness[keep])).rvalue
        assert float(row["r_value"]) == pytest.approx(r, rel=1e-12)
        steps = pq.read_table(d / "steps.parquet").to_pandas()
        assert float(row["clipped_fraction"]) == pytest.approx(steps.clipped.mean(), rel=1e-12)
    assert float(table[0]["final_si_sdri"]) == 12.0  # the last evaluation: step 120
    findings = page.evaluate(
        """() => Array.from(document.querySelectorAll("#section-findings tbody tr")).map(r =>
            Array.from(r.children).map(c => c.textContent))"""
    )
    expected = [
        [n, f.kind, str(f.first_step)] for n, d in zip(("autoclip", "sgd"), dirs) for f in diagnose(load_run(d))
    ]
    assert [row[:3] for row in findings] == expected
    assert ["sgd", "loss_spike", str(SPIKE_STEP)] in expected


def test_task_columns_and_seed_intervals_only_where_they_apply(tmp_path):
    a = load_run(synthetic_run(tmp_path / "a", seed=1, steps=300))
    b = load_run(synthetic_run(tmp_path / "b", seed=2, steps=300))
    c = load_run(synthetic_run(tmp_path / "c", seed=3, steps=300, extra={"optimizer": {"kind": "SGD", "lr": 0.05}}))
    alone = ReportBuilder([a, c]).build()
    (summary,) = [t for t in alone.tables if t.section == "summary"]  # no arm has two seeds: no interval table
    assert "final_si_sdri" not in summary.columns and "r_value" in summary.columns
    arms = ReportBuilder([a, b, c]).build()
    tables = [t for t in arms.tables if t.section == "summary"]
    assert len(tables) == 2 and tables[1].caption.startswith("Arms")
    heads = tables[1].columns
    assert len(heads) == 4 and "(2 seeds)" in heads[1] and "(1 seeds)" in heads[2] and " - " in heads[3]
    # the edge of stability at the recorded lr 0.1: SGD with momentum 0.9, 2 (1 + 0.9) / 0.1; without, 2 / 0.1
    (panel,) = [p for p in arms.panels if p.id == "column-sharpness"]
    edges = {t.name: (min(t.y), max(t.y)) for t in panel.figure.data if "edge" in (t.name or "")}
    assert edges == {
        "a: edge of stability": pytest.approx((38.0, 38.0)),
        "b: edge of stability": pytest.approx((38.0, 38.0)),
        "c: edge of stability": pytest.approx((20.0, 20.0)),
    }


def test_thin_minmax_keeps_each_buckets_extremes():
    rng = np.random.default_rng(3)
    values = rng.standard_normal(100_003)
    values[5000:5400] = np.nan  # a gap stays a gap
    values[77_777] = 50.0
    kept = thin_minmax(values, 2000)
    assert len(kept) <= 2000 and kept[0] == 0 and kept[-1] == len(values) - 1 and np.all(np.diff(kept) > 0)
    size = math.ceil(len(values) / 999)
    for start in range(0, len(values), size):
        bucket = values[start : start + size]
        if np.isfinite(bucket).any():
            assert start + np.nanargmax(bucket) in kept and start + np.nanargmin(bucket) in kept
        else:
            assert any(start <= k < start + size for k in kept)
    assert np.array_equal(thin_minmax(values[:2000], 2000), np.arange(2000))


def test_bad_input_is_one_line_and_exit_2(tmp_path, report):
    _, (autoclip, _) = report
    existing = tmp_path / "keep.html"
    existing.write_text("mine")
    for args, message in [
        ((tmp_path / "missing",), "no such run directory"),
        ((autoclip, "--out", tmp_path / "report.png"), "use one of .html, .htm"),
        ((autoclip, "--out", tmp_path / "no" / "report.html"), "does not exist"),
        ((autoclip, "--layers", "nosuch", "--out", existing), "no such layers column"),
    ]:
        result = dyn("report", *args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert existing.read_text() == "mine"
