"""An interactive report of runs in one self-contained HTML file (Plotly; plotly.js inline, no network).

Panels: the paper's Fig. 1 (step size and training loss over iterations; gradient norm against
smoothness per run, on log axes, with Pearson r of the logs and the final threshold), gradient norm
and threshold over every iteration with the clipped steps marked, the per-layer heatmap (tensors
grouped into modules when there are more than 40), every other metrics column, the evaluation
curves, the ``dyn compare`` table (with intervals over seeds when runs form arms) and the findings
of ``dyn diagnose``. Hovering shows the run, the step and the value; a
click on a legend entry hides or shows that run in every panel; drag to zoom, double-click to reset.

Long series are thinned for display only: each trace keeps the first and last point and the
minimum and maximum of every bucket of consecutive points (at most ``MAX_POINTS`` points), so
spikes stay visible and every point shown is a recorded row. Tables are never thinned.

The same page, given ``live``, polls a JSON endpoint of ``dyn serve`` and appends a running
run's new rows to its curves (``Plotly.extendTraces``), without reloading.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from dynamics.run import Run
from figures import groups as arms
from figures import style
from figures.files import atomic_file

MAX_POINTS = 2000  # points per line trace on screen
MAX_SCATTER = 10000  # points per gradient-norm-vs-smoothness panel on screen
MAX_MARKERS = 2000  # clipped-step markers per run on screen
MAX_HEATMAP_COLUMNS = 500  # recorded steps per per-layer heatmap on screen
HOVER_DIGITS = 8  # significant digits of a value in hover text
# Columns the Fig. 1 and gradient-norm panels show already; every other metrics column gets a panel.
SHOWN = ("step", "loss", "step_size", "grad_norm", "threshold", "clipped")


# -- thinning --------------------------------------------------------------------------------------


def thin_minmax(values: np.ndarray, max_points: int = MAX_POINTS) -> np.ndarray:
    """Indices of the points to draw: all of them when there are at most ``max_points``; else the
    first, the last, and the minimum and maximum of each of about max_points / 2 buckets of
    consecutive points (NaN ignored; a bucket of NaN keeps one NaN, so a gap stays a gap)."""
    n = len(values)
    if n <= max_points:
        return np.arange(n)
    size = math.ceil(n / max(1, (max_points - 2) // 2))
    buckets = math.ceil(n / size)
    padded = np.full(buckets * size, np.nan)
    padded[:n] = values
    rows = padded.reshape(buckets, size)
    finite = np.isfinite(rows)
    low = np.where(finite, rows, np.inf).argmin(axis=1)
    high = np.where(finite, rows, -np.inf).argmax(axis=1)
    base = np.arange(buckets) * size
    keep = np.concatenate([[0, n - 1], base + low, base + high])
    return np.unique(keep[keep < n])


def thin_stride(n: int, max_points: int) -> np.ndarray:
    """Indices of every k-th of n points (and the last), at most about ``max_points`` of them."""
    if n <= max_points:
        return np.arange(n)
    step = math.ceil(n / max_points)
    return np.unique(np.concatenate([np.arange(0, n, step), [n - 1]]))


# -- per-layer rows --------------------------------------------------------------------------------


def layer_rows(run: Run, column: str, max_columns: int = MAX_HEATMAP_COLUMNS):
    """(``figures.layers.LayerGroups`` of the steps shown, number of recorded steps): tensors grouped
    into at most 40 module rows as ``dyn plot --layers`` groups them; beyond ``max_columns`` recorded
    steps, steps sampled evenly (exact values at the steps shown)."""
    from figures.layers import group_layers

    layers = run.layers
    steps = np.unique(layers.step.to_numpy())
    shown = steps[thin_stride(len(steps), max_columns)]
    if len(shown) < len(steps):
        layers = layers[layers.step.isin(shown)]
    return group_layers(layers, column), len(steps)


# -- the report ------------------------------------------------------------------------------------


@dataclass
class Panel:
    """One plot: a div id, the section it belongs to and its Plotly figure."""

    id: str
    section: str
    figure: Any
    wide: bool = False


@dataclass
class Table:
    """One HTML table: a section, a caption, column names and rows of cells (already formatted)."""

    section: str
    caption: str
    columns: list[str]
    rows: list[list[tuple[str, str]]]  # (text, title) per cell
    note: str = ""
    id: str = ""


SECTIONS = (
    ("runs", "Runs"),
    ("fig1", "Fig. 1: step size, training loss, gradient norm against smoothness"),
    ("clipping", "Gradient norm and clipping threshold"),
    ("layers", "Per layer"),
    ("columns", "Other metrics columns"),
    ("eval", "Evaluation"),
    ("summary", "Summary (dyn compare)"),
    ("findings", "Findings (dyn diagnose)"),
)


def fmt(value: Any) -> str:
    """A number for a table cell, as dyn compare writes it (``dynamics.summary.format_number``)."""
    from dynamics.summary import format_number

    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, np.floating):
        value = float(value)
    return format_number(value)


def _cell(value: Any) -> tuple[str, str]:
    """(shown text, exact value for the cell's tooltip)."""
    exact = repr(float(value)) if isinstance(value, (float, np.floating)) else ""
    return fmt(value), exact


def _hover_text(text: str) -> str:
    """Plain text safe inside a Plotly hovertemplate (HTML-escaped, no %{...} placeholders)."""
    return html.escape(text).replace("%{", "% {")


def _array(values, dtype=float) -> np.ndarray:
    return np.asarray(values, dtype=dtype)


def _log_axis(values: np.ndarray, span: float = 100.0) -> bool:
    finite = values[np.isfinite(values)]
    return bool(len(finite)) and finite.min() > 0 and finite.max() > span * finite.min()


def _is_sparse(values: np.ndarray) -> bool:
    """Measured on at most half the rows (every N records, NaN between): drawn as its measured points,
    markers joined by lines; a line broken at every NaN would show nothing but isolated dots."""
    finite = np.isfinite(values)
    return bool(finite.any()) and 2 * int(finite.sum()) <= len(values)


def unique_names(runs: list[Run]) -> list[str]:
    """Run names, with the path for runs whose names collide."""
    names = [r.name for r in runs]
    return [str(r.path) if names.count(n) > 1 else n for r, n in zip(runs, names)]


def _status(run: Run) -> str:
    from dynamics.index import run_status
    from dynamics.run import RunError

    try:
        return run_status(run.path, run.config)
    except RunError:
        return str(run.status)


class ReportBuilder:
    """Builds the panels and tables of a report of ``runs`` (see the module)."""

    def __init__(self, runs: list[Run], layer_column: str | None = None):
        if not runs:
            raise ValueError("a report needs at least one run")
        self.runs = list(runs)
        self.names = unique_names(self.runs)
        self.colors = style.colors(self.runs)
        self.layer_column = layer_column
        self.panels: list[Panel] = []
        self.tables: list[Table] = []
        self.notes: dict[str, str] = {}
        self.summaries: dict[int, dict[str, Any]] = {}  # run index -> its dyn compare row

    # traces

    def _line(self, i: int, table: str, x: str, y: str, label: str, **kw) -> dict:
        frame = getattr(self.runs[i], table)
        xs = frame[x].to_numpy()
        ys = _array(frame[y].to_numpy(dtype=float, na_value=np.nan))
        sparse = _is_sparse(ys)
        if sparse:
            keep = np.isfinite(ys)
            xs, ys = xs[keep], ys[keep]
        shown = thin_minmax(ys)
        name = self.names[i]
        trace = dict(
            type="scatter",
            x=xs[shown],
            y=np.where(np.isinf(ys[shown]), np.nan, ys[shown]),
            mode="lines+markers" if sparse else "lines",
            name=name,
            legendgroup=name,
            line=dict(color=self.colors[i], width=1.2),
            marker=dict(size=5, color=self.colors[i]),
            hovertemplate=f"{_hover_text(name)}<br>step %{{x:d}}<br>{_hover_text(label)} "
            f"%{{y:.{HOVER_DIGITS}g}}<extra></extra>",
            meta=dict(run=name, table=table, x=x, y=y, finite=sparse),
        )
        trace.update(kw)
        return trace

    def _figure(self, traces: list[dict], title: str, ytitle: str, height: int = 320, **layout):
        import plotly.graph_objects as go

        base = dict(
            title=dict(text=title, font=dict(size=14)),
            height=height,
            margin=dict(l=60, r=20, t=48, b=44),
            xaxis=dict(title=dict(text="Iterations")),
            yaxis=dict(title=dict(text=ytitle)),
            legend=dict(orientation="h", y=-0.22, x=0),
            hovermode="closest",
            template=go.layout.Template(),
        )
        for key, value in layout.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        return go.Figure(data=traces, layout=base)

    def add(self, id: str, section: str, figure, wide: bool = False) -> None:
        self.panels.append(Panel(re.sub(r"[^A-Za-z0-9_-]", "_", id), section, figure, wide))

    # panels

    def _lines(self, table: str, column: str, label: str, **kw) -> list[dict]:
        """One trace per run whose ``table`` has ``column`` with a finite value."""
        return [
            self._line(i, table, "step", column, label, **kw)
            for i, run in enumerate(self.runs)
            if _has(getattr(run, table), column)
        ]

    def fig1(self) -> None:
        step = self._lines("metrics", "step_size", "step size")
        if step:
            self.add("fig1-step-size", "fig1", self._figure(step, "Step size", "Step size"))
        loss = self._lines("metrics", "loss", "loss")
        if loss:
            values = np.concatenate([_array(t["y"]) for t in loss])
            finite = values[np.isfinite(values)]
            log = bool(len(finite)) and finite.min() > 0
            self.add(
                "fig1-loss",
                "fig1",
                self._figure(
                    loss,
                    "Training loss" + (" (log axis)" if log else ""),
                    "training loss",
                    yaxis=dict(type="log" if log else "linear"),
                ),
            )
        for i, run in enumerate(self.runs):
            if _has(run.metrics, "grad_norm") and _has(run.metrics, "smoothness"):
                self.add(f"fig1-scatter-{i}", "fig1", self._scatter(i, run))

    def _scatter(self, i: int, run: Run):
        from dynamics.summary import r_value

        m = run.metrics
        g = m.grad_norm.to_numpy(dtype=float)
        s = m.smoothness.to_numpy(dtype=float) if "smoothness" in m.columns else np.full(len(m), np.nan)
        keep = np.flatnonzero(np.isfinite(g) & np.isfinite(s) & (g > 0) & (s > 0))
        shown = keep[thin_stride(len(keep), MAX_SCATTER)]
        name = self.names[i]
        traces = [
            dict(
                type="scatter",
                x=g[shown],
                y=s[shown],
                customdata=m.step.to_numpy()[shown],
                mode="markers",
                name=name,
                legendgroup=name,
                marker=dict(size=4, color=self.colors[i], opacity=0.45),
                hovertemplate=f"{_hover_text(name)}<br>step %{{customdata:d}}<br>gradient norm "
                f"%{{x:.{HOVER_DIGITS}g}}<br>smoothness %{{y:.{HOVER_DIGITS}g}}<extra></extra>",
                meta=dict(run=name, table="metrics", x="grad_norm", y="smoothness", custom="step", positive=True),
            )
        ]
        r = r_value(run) if "smoothness" in m.columns else math.nan
        title = f"{html.escape(name)}: r = {r:.3f}" if math.isfinite(r) else f"{html.escape(name)}: r = n/a"
        if len(shown) < len(keep):
            title += f" ({len(shown)} of {len(keep)} points shown; r from all)"
        if style.draws_threshold(run):
            t = arms.final_log_threshold(run)
            if math.isfinite(t):
                label = style.threshold_label(run).replace("log(", "", 1).rstrip(")")
                traces.append(
                    dict(
                        type="scatter",
                        x=[math.exp(t), math.exp(t)],
                        y=[s[keep].min(), s[keep].max()] if len(keep) else [1, 1],
                        mode="lines",
                        name=f"final {label}",
                        line=dict(color="black", dash="dash", width=1.5),
                        hovertemplate=f"final {html.escape(label)}: %{{x:.{HOVER_DIGITS}g}}<extra></extra>",
                        meta=dict(run=name, static=True),
                    )
                )
        row = self.summaries.get(i, {})
        l0, l1 = row.get("l0", math.nan), row.get("l1", math.nan)
        if len(keep) and math.isfinite(l0) and math.isfinite(l1):
            # log(L0 + L1 e^x) in Fig. 1's log-log axes: the line L0 + L1 g on log axes
            grid = np.geomspace(g[keep].min(), g[keep].max(), 200)
            traces.append(
                dict(
                    type="scatter",
                    x=grid,
                    y=l0 + l1 * grid,
                    mode="lines",
                    name=f"median fit L0 + L1·g: L0 = {l0:.3g}, L1 = {l1:.3g}",
                    line=dict(color="#555", width=1.5),
                    hovertemplate=f"L0 + L1·g = %{{y:.{HOVER_DIGITS}g}} at g = %{{x:.{HOVER_DIGITS}g}}<extra></extra>",
                    meta=dict(run=name, static=True),
                )
            )
            title += f"; L0 = {l0:.3g}, L1 = {l1:.3g}"
        return self._figure(
            traces,
            title,
            "smoothness (log axis)",
            height=360,
            xaxis=dict(type="log", title=dict(text="gradient norm (log axis)")),
            yaxis=dict(type="log"),
        )

    def clipping(self) -> None:
        traces = []
        for i, run in enumerate(self.runs):
            table = "steps" if _has(run.steps, "grad_norm") else "metrics"
            frame = getattr(run, table)
            if not _has(frame, "grad_norm"):
                continue
            name = self.names[i]
            traces.append(self._line(i, table, "step", "grad_norm", "gradient norm"))
            if "threshold" in frame.columns and np.isfinite(frame.threshold.to_numpy(dtype=float)).any():
                traces.append(
                    self._line(
                        i,
                        table,
                        "step",
                        "threshold",
                        "threshold",
                        line=dict(color=self.colors[i], width=1.2, dash="dash"),
                        name=f"{name}: threshold",
                        showlegend=False,
                    )
                )
            if "clipped" in frame.columns:
                clipped = np.flatnonzero(frame.clipped.to_numpy(dtype=bool, na_value=False))
                shown = clipped[thin_stride(len(clipped), MAX_MARKERS)]
                note = f" ({len(shown)} of {len(clipped)} shown)" if len(shown) < len(clipped) else ""
                traces.append(
                    dict(
                        type="scatter",
                        x=frame.step.to_numpy()[shown],
                        y=frame.grad_norm.to_numpy(dtype=float)[shown],
                        mode="markers",
                        name=f"{name}: clipped{note}",
                        legendgroup=name,
                        showlegend=False,
                        marker=dict(symbol="x-thin-open", size=6, color=self.colors[i]),
                        hovertemplate=f"{_hover_text(name)}<br>step %{{x:d}} clipped<br>gradient norm "
                        f"%{{y:.{HOVER_DIGITS}g}}<extra></extra>",
                        meta=dict(run=name, table=table, x="step", y="grad_norm", only="clipped"),
                    )
                )
        if not traces:
            return
        values = np.concatenate([_array(t["y"]) for t in traces])
        finite = values[np.isfinite(values)]
        log = bool(len(finite)) and finite.min() > 0
        self.add(
            "clipping",
            "clipping",
            self._figure(
                traces,
                "Gradient norm (solid), threshold (dashed), clipped steps (×)",
                "gradient norm" + (" (log axis)" if log else ""),
                height=380,
                yaxis=dict(type="log" if log else "linear"),
            ),
            wide=True,
        )

    def layers(self) -> None:
        """One heatmap per run of log10 of a layers column, all on one colour scale."""
        from figures.layers import default_column, layer_columns

        runs = [(i, r) for i, r in enumerate(self.runs) if not r.layers.empty]
        if not runs:
            return
        column = self.layer_column or default_column([r for _, r in runs])
        drawn = []
        notes = []
        for i, run in runs:
            if column not in layer_columns(run):
                notes.append(f"{self.names[i]}: no layers column {column}.")
                continue
            try:
                groups, n_steps = layer_rows(run, column)
            except ValueError as e:
                notes.append(f"{self.names[i]}: {e}.")
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                logs = np.where(np.isfinite(groups.values) & (groups.values > 0), np.log10(groups.values), np.nan)
            drawn.append((i, groups, n_steps, logs))
        if notes:
            self.notes["layers"] = " ".join(notes)
        finite = np.concatenate([logs[np.isfinite(logs)] for *_, logs in drawn]) if drawn else np.array([])
        scale = dict(zmin=float(finite.min()), zmax=float(finite.max())) if len(finite) else {}
        for i, groups, n_steps, logs in drawn:
            self.add(f"layers-{i}", "layers", self._heatmap(i, column, groups, n_steps, logs, scale), wide=True)

    def _heatmap(self, i: int, column: str, groups, n_steps: int, logs: np.ndarray, scale: dict):
        import plotly.graph_objects as go

        name = self.names[i]
        sizes = [len(m) for m in groups.members]
        ylabels = [f"{lab} ({n})" if n > 1 else lab for lab, n in zip(groups.labels, sizes)]
        title = f"{html.escape(name)}: log10({column}), {groups.tensors} tensors"
        if groups.grouped:
            how = "root-sum-square of norms" if column != "update_ratio" else "module update / module norm"
            title += f" in {len(groups.labels)} modules ({how})"
        if groups.prefix:
            title += f", under {html.escape(groups.prefix.rstrip('.'))}"
        if len(groups.steps) < n_steps:
            title += f"; {len(groups.steps)} of {n_steps} steps shown"
        trace = go.Heatmap(
            x=groups.steps,
            y=ylabels,
            z=logs.astype(np.float32),
            customdata=groups.values,
            colorscale="Viridis",
            colorbar=dict(title=dict(text=f"log10({column})"), thickness=12),
            hovertemplate=f"{_hover_text(name)}<br>%{{y}}<br>step %{{x:d}}<br>{column} "
            f"%{{customdata:.{HOVER_DIGITS}g}}<extra></extra>",
            meta=dict(run=name, static=True),
            name=name,
            **scale,
        )
        return self._figure(
            [trace],
            title,
            "",
            height=max(260, 120 + 16 * len(ylabels)),
            yaxis=dict(autorange="reversed", automargin=True, type="category"),
        )

    def columns(self) -> None:
        from figures.columns import metric_columns

        for column in metric_columns(self.runs):
            if column in SHOWN:
                continue
            traces = self._lines("metrics", column, column)
            if not traces:
                continue
            values = np.concatenate([_array(t["y"]) for t in traces])
            if column == "sharpness":
                traces += self._edges_of_stability()
            log = _log_axis(values)
            finite = values[np.isfinite(values)]
            constant = len(finite) and finite.min() == finite.max()
            yaxis = dict(type="log" if log else "linear")
            if constant and finite[0] != 0:  # a flat line in the middle, with its value on the axis
                v = float(finite[0])
                yaxis["range"] = sorted([v - abs(v), v + abs(v)])
            self.add(
                f"column-{column}",
                "columns",
                self._figure(
                    traces,
                    column
                    + (" (log axis)" if log else "")
                    + (f" (constant: {fmt(float(finite[0]))})" if constant else ""),
                    column,
                    height=280,
                    yaxis=yaxis,
                ),
            )

    def eval(self) -> None:
        import pandas as pd

        columns: list[str] = []
        for run in self.runs:
            for c in run.eval.columns:
                if c != "step" and c not in columns and pd.api.types.is_numeric_dtype(run.eval[c].dtype):
                    columns.append(c)
        for column in columns:
            traces = self._lines("eval", column, column, mode="lines+markers")
            if traces:
                self.add(f"eval-{column}", "eval", self._figure(traces, f"held-out {column}", column, height=280))

    def _edges_of_stability(self) -> list[dict]:
        """The edge of stability of each SGD run (none for adaptive optimizers): a line, or a curve
        where the learning rate changed."""
        from dynamics.analysis import edge_of_stability, learning_rate

        traces = []
        for i, run in enumerate(self.runs):
            edge = edge_of_stability(run.config.get("optimizer"), learning_rate(run))
            if edge is None or run.metrics.empty:
                continue
            steps = run.metrics.step.to_numpy()
            edge = np.broadcast_to(np.asarray(edge, dtype=float), steps.shape)
            if np.all(np.isnan(edge)):
                continue
            label = f"{self.names[i]}: edge of stability"
            traces.append(
                dict(
                    type="scatter",
                    x=steps,
                    y=np.array(edge),
                    mode="lines",
                    name=label,
                    legendgroup=self.names[i],
                    line=dict(color=self.colors[i], dash="dot", width=1.2),
                    hovertemplate=f"{_hover_text(label)}<br>step %{{x:d}}<br>%{{y:.{HOVER_DIGITS}g}}<extra></extra>",
                    meta=dict(run=self.names[i], static=True),
                )
            )
        return traces

    # tables

    def runs_table(self) -> None:
        rows = []
        for name, run in zip(self.names, self.runs):
            c = run.config
            optimizer = c.get("optimizer") if isinstance(c.get("optimizer"), dict) else {}
            last = (
                int(run.steps.step.iloc[-1])
                if len(run.steps)
                else (int(run.metrics.step.iloc[-1]) if len(run.metrics) else None)
            )
            status = _status(run)
            rows.append(
                [
                    (name, str(run.path)),
                    (status, ""),
                    (style.label(run), json.dumps(c.get("clipper"), default=str)),
                    (f"{optimizer.get('kind', '?')}, lr {fmt(optimizer.get('lr'))}", ""),
                    (fmt(c.get("every")), ""),
                    (fmt(last), ""),
                    (fmt(len(run.metrics)), ""),
                    (", ".join(str(q).removesuffix("()") for q in c.get("quantities") or []), ""),
                ]
            )
        self.tables.append(
            Table(
                "runs",
                "",
                ["run", "status", "clipper", "optimizer", "every", "last step", "records", "quantities"],
                rows,
                id="runs-table",
            )
        )

    def summary(self) -> None:
        from dynamics.summary import columns_of, fill_columns, format_interval, summarize, summarize_groups

        runs = [r for r in self.runs if not r.metrics.empty]
        if not runs:
            return
        try:
            rows = fill_columns([summarize(r) for r in runs])
        except (AttributeError, KeyError, ValueError, TypeError, ArithmeticError) as e:  # say, a foreign run
            self.notes["summary"] = f"No summary: dyn compare cannot summarize these runs ({type(e).__name__}: {e})"
            return
        for row, run in zip(rows, runs):
            index = next(i for i, r in enumerate(self.runs) if r is run)
            row["run"] = self.names[index]
            self.summaries[index] = row
        columns = [c for c in columns_of(rows) if not _task_column(c) or any(not _nan(r[c]) for r in rows)]
        self.tables.append(
            Table(
                "summary",
                "One row per run, as dyn compare prints it (r_ci: 95% moving-block bootstrap interval of r)",
                columns,
                [[_cell(r[c]) for c in columns] for r in rows],
            )
        )
        from dynamics.stats import group_runs

        try:
            groups = group_runs(runs)
        except ValueError as e:
            self.notes["summary"] = f"No intervals over seeds: {e}"
            return
        if len(groups) == len(runs):
            return
        grouped = summarize_groups(runs, rows)
        measures = [k[: -len("_mean")] for k in grouped[0] if k.endswith("_mean")]
        measures = [m for m in measures if not _task_column(m) or any(not _nan(g[f"{m}_mean"]) for g in grouped)]
        heads = [g["name"] if g["n_seeds"] is None else f"{g['name']} ({g['n_seeds']} seeds)" for g in grouped]
        table_rows = []
        for m in measures:
            row = [(m, "")]
            for g in grouped:
                mean, low, high = g[f"{m}_mean"], g[f"{m}_ci_low"], g[f"{m}_ci_high"]
                text = format_interval(*(float(v) if v is not None else math.nan for v in (mean, low, high)))
                row.append((text, f"mean {mean!r}, 95% interval [{low!r}, {high!r}]"))
            table_rows.append(row)
        self.tables.append(
            Table(
                "summary",
                "Arms (runs that differ only in seed): mean [95% Student t interval over seeds];"
                " the difference of two arms: Welch",
                ["", *heads],
                table_rows,
            )
        )

    def findings(self) -> None:
        from dynamics.diagnose import diagnose
        from dynamics.errors import DynamicsError

        rows, notes = [], []
        for name, run in zip(self.names, self.runs):
            try:
                found = diagnose(run)
            except DynamicsError as e:
                notes.append(f"{name}: not diagnosed ({e})")
                continue
            for f in found:
                rows.append(
                    [
                        (name, ""),
                        (f.kind, ""),
                        (fmt(f.first_step), ""),
                        (fmt(f.last_step), ""),
                        _cell(f.value),
                        (f.message, ""),
                    ]
                )
        if not rows:
            notes.insert(
                0,
                "No findings: no loss spike, gradient-norm explosion, non-finite step, clipping "
                "saturation, edge-of-stability crossing, dead parameter or step-size collapse.",
            )
        self.tables.append(
            Table(
                "findings",
                "",
                ["run", "kind", "first step", "last step", "value", "meaning"],
                rows,
                note=" ".join(notes),
            )
        )

    def build(self) -> ReportBuilder:
        """Every panel and table (the summary first: the scatter panels draw its L0, L1 fit)."""
        self.runs_table()
        self.summary()
        self.fig1()
        self.clipping()
        self.layers()
        self.columns()
        self.eval()
        self.findings()
        return self


def _nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _has(frame, column: str) -> bool:
    """Whether a table has ``column`` with at least one finite (or, for non-float columns, present) value."""
    if frame is None or column not in frame.columns or frame.empty:
        return False
    values = frame[column]
    try:
        return bool(np.isfinite(values.to_numpy(dtype=float, na_value=np.nan)).any())
    except (TypeError, ValueError):
        return bool(values.notna().any())


def _task_column(column: str) -> bool:
    """A column that comes from a task's evaluation (final_si_sdri, ...): shown only where a run has it."""
    return column.startswith("final_") and column not in ("final_loss", "final_threshold")


# -- the page --------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 0 16px 48px; color: #222; }
h1 { font-size: 1.35rem; margin: 18px 0 4px; } h2 { font-size: 1.1rem; margin: 28px 0 8px;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta { color: #666; font-size: 0.85rem; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 8px 16px; }
.panel { min-height: 200px; } .wide { grid-column: 1 / -1; }
table { border-collapse: collapse; font-size: 0.82rem; margin: 6px 0 14px; }
th, td { border-bottom: 1px solid #e4e4e4; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f6f6f6; position: sticky; top: 0; } td:first-child, th:first-child { text-align: left; }
caption { caption-side: top; text-align: left; color: #555; padding: 4px 0; font-size: 0.85rem; }
.scroll { overflow-x: auto; max-width: 100%; }
.status-running { color: #0a7d27; font-weight: 600; } .status-interrupted { color: #b36b00; font-weight: 600; }
.status-damaged { color: #c00; font-weight: 600; }
td.sentence { text-align: left; white-space: normal; min-width: 320px; }
#runs-body td:nth-child(2), #runs-body td:nth-child(7) { text-align: left; }
"""

# Draws every panel, keeps a run's traces shown or hidden together across panels, and (live)
# appends a running run's new rows.
SCRIPT = r"""
(function () {
  const spec = JSON.parse(document.getElementById("dyn-spec").textContent);
  const divs = [];
  const hidden = new Set();
  function toggle(ev) {
    const trace = ev.data[ev.curveNumber];
    const run = trace.meta && trace.meta.run;
    if (!run) return true;
    if (hidden.has(run)) hidden.delete(run); else hidden.add(run);
    const visible = hidden.has(run) ? "legendonly" : true;
    for (const div of divs) {
      const idx = [];
      div.data.forEach((t, i) => { if (t.meta && t.meta.run === run) idx.push(i); });
      if (idx.length) Plotly.restyle(div, {visible: visible}, idx);
    }
    return false;
  }
  // A live page appends to its curves: their arrays become Float64Arrays (plotly.py packs steps into
  // the smallest integer type, which a later step could overflow; extendTraces needs arrays).
  const TYPES = {f8: Float64Array, f4: Float32Array, i4: Int32Array, i2: Int16Array, i1: Int8Array,
                 u4: Uint32Array, u2: Uint16Array, u1: Uint8Array};
  function unpack(v) {
    if (!v || typeof v !== "object" || typeof v.bdata !== "string" || !TYPES[v.dtype] || v.shape) return v;
    const bytes = Uint8Array.from(atob(v.bdata), c => c.charCodeAt(0));
    return Float64Array.from(new TYPES[v.dtype](bytes.buffer));
  }
  for (const panel of spec.panels) {
    const div = document.getElementById(panel.id);
    const fig = panel.figure;
    fig.layout.template = spec.template;
    if (spec.live) {
      for (const t of fig.data) {
        if (t.meta && t.meta.table) for (const k of ["x", "y", "customdata"]) t[k] = unpack(t[k]);
      }
    }
    Plotly.newPlot(div, fig.data, fig.layout, spec.config);
    div.on("plotly_legendclick", toggle);
    divs.push(div);
  }
  document.body.dataset.rendered = "true";
  const live = spec.live;
  if (!live) return;
  const since = Object.assign({}, live.since);
  function extend(table, cols) {
    for (const div of divs) {
      div.data.forEach((t, i) => {
        const m = t.meta;
        if (!m || m.static || m.run !== live.run || m.table !== table) return;
        const X = cols[m.x], Y = cols[m.y], C = m.custom ? cols[m.custom] : null, only = m.only ? cols[m.only] : null;
        if (!X || !Y) return;
        const x = [], y = [], c = [];
        for (let k = 0; k < X.length; k++) {
          if (only && !only[k]) continue;
          if (m.finite && (X[k] === null || Y[k] === null)) continue;
          if (m.positive && !(X[k] > 0 && Y[k] > 0)) continue;
          x.push(X[k]); y.push(Y[k] === null ? NaN : Y[k]); if (C) c.push(C[k]);
        }
        if (!x.length) return;
        const like = (target, values) => ArrayBuffer.isView(target) ? new target.constructor(values) : values;
        const update = {x: [like(t.x, x)], y: [like(t.y, y)]};
        if (C) update.customdata = [like(t.customdata, c)];
        Plotly.extendTraces(div, update, [i]);
      });
    }
  }
  const statusCell = document.getElementById("live-status");
  const stepsCell = document.getElementById("live-steps");
  async function poll() {
    let again = true;
    try {
      const query = Object.entries(since).filter(([k, v]) => v !== null).map(([k, v]) => k + "=" + v).join("&");
      const response = await fetch(live.url + (query ? "?" + query : ""), {cache: "no-store"});
      if (response.ok) {
        const data = await response.json();
        if (data.rewound) { location.reload(); return; }
        for (const [table, cols] of Object.entries(data.tables)) {
          extend(table, cols);
          since[table] = Math.max(since[table] === null ? -Infinity : since[table], ...cols.step);
        }
        if (statusCell) { statusCell.textContent = data.status; statusCell.className = "status-" + data.status; }
        if (stepsCell && data.steps !== null) stepsCell.textContent = data.steps;
        document.body.dataset.updated = String(Date.now());
        again = data.status === "running";
      }
    } catch (e) { console.warn("dyn: live update failed, retrying", e); }
    if (again) setTimeout(poll, live.interval_ms);
  }
  setTimeout(poll, live.interval_ms);
})();
"""


def _json(obj: Any) -> str:
    """JSON that is safe inside a <script> element."""
    text = json.dumps(obj, allow_nan=False, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _table_html(table: Table, live_run: str | None = None) -> str:
    note = f'<p class="meta">{html.escape(table.note)}</p>' if table.note else ""
    if not table.rows and note:
        return note
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = []
    for row in table.rows:
        cells = []
        for j, (text, title) in enumerate(row):
            attrs = f' title="{html.escape(title)}"' if title else ""
            column = table.columns[j]
            if column == "status":
                attrs += f' class="status-{html.escape(text)}"'
                if live_run is not None and row[0][0] == live_run:
                    attrs += ' id="live-status"'
            elif column == "last step" and live_run is not None and row[0][0] == live_run:
                attrs += ' id="live-steps"'
            elif column == "meaning":
                attrs += ' class="sentence"'
            cells.append(f"<td{attrs}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    ident = f' id="{table.id}"' if table.id else ""
    rows = "".join(body)
    table_html = f"<table{ident}>{caption}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    return f'<div class="scroll">{table_html}</div>{note}'


def _plotly_script(plotlyjs: str) -> str:
    if plotlyjs == "inline":
        from plotly.offline import get_plotlyjs

        return f"<script>{get_plotlyjs()}</script>"
    return f'<script src="{html.escape(plotlyjs)}"></script>'


def _template() -> dict:
    import plotly.io as pio

    return pio.templates["plotly_white"].to_plotly_json()


def report_html(
    runs: list[Run],
    title: str | None = None,
    plotlyjs: str = "inline",
    live: dict[str, Any] | None = None,
    layer_column: str | None = None,
) -> str:
    """The report of ``runs`` as one HTML page (see the module).

    ``plotlyjs``: "inline" (the default: the page works from disk with no network) or the URL
    of plotly.min.js. ``live``: {"run": name, "url": endpoint, "since": {table: last step},
    "interval_ms": ms} to poll a running run's new rows (what ``dyn serve`` passes).
    ``layer_column``: the per-layer column (default: update_ratio if recorded, else grad_norm).
    """
    builder = ReportBuilder(runs, layer_column).build()
    names = ", ".join(builder.names)
    title = title or f"dyn report: {names}"
    figures = [f'{{"id":{json.dumps(p.id)},"figure":{p.figure.to_json()}}}' for p in builder.panels]
    spec = (
        f'{{"panels":[{",".join(figures)}],"template":{_json(_template())},'
        f'"config":{_json({"responsive": True, "displaylogo": False, "scrollZoom": False})},'
        f'"live":{_json(live)}}}'
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{CSS}</style>",
        _plotly_script(plotlyjs),
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">Built {datetime.now().isoformat(timespec="seconds")} by dyn. Hover for run, step and '
        "value; click a legend entry to hide or show a run everywhere; drag to zoom, double-click to reset. "
        f"Curves with more than {MAX_POINTS} points show each bucket's minimum and maximum; tables hold every "
        "number.</p>",
    ]
    live_run = live.get("run") if live else None
    for section, heading in SECTIONS:
        panels = [p for p in builder.panels if p.section == section]
        tables = [t for t in builder.tables if t.section == section]
        if not panels and not tables:
            continue
        parts.append(f'<section id="section-{section}"><h2>{html.escape(heading)}</h2>')
        for table in tables:
            parts.append(_table_html(table, live_run))
        if section in builder.notes:
            parts.append(f'<p class="meta">{html.escape(builder.notes[section])}</p>')
        if panels:
            parts.append('<div class="grid">')
            for p in panels:
                wide = " wide" if p.wide else ""
                parts.append(f'<div class="panel{wide}" id="{p.id}" data-section="{section}"></div>')
            parts.append("</div>")
        parts.append("</section>")
    parts.append(f'<script type="application/json" id="dyn-spec">{spec}</script>')
    parts.append(f"<script>{SCRIPT}</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(runs: list[Run], out: str | os.PathLike, **kw) -> Path:
    """Write ``report_html(runs, **kw)`` to ``out`` atomically (no partial file under that name)."""
    out = Path(out)
    text = report_html(runs, **kw)
    with atomic_file(out) as f:
        f.write(text.encode("utf-8"))
    return out


# -- the dashboard's index page --------------------------------------------------------------------

INDEX_SCRIPT = r"""
(function () {
  const body = document.getElementById("runs-body");
  const count = document.getElementById("runs-count");
  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "-";
    return typeof v === "number" ? Number(v.toPrecision(4)).toString() : String(v);
  }
  function render(runs) {
    body.replaceChildren();
    for (const r of runs) {
      const tr = document.createElement("tr");
      const pick = document.createElement("td");
      const box = document.createElement("input");
      box.type = "checkbox"; box.value = r.name; box.className = "pick";
      if (r.status === "damaged") box.disabled = true;
      pick.appendChild(box); tr.appendChild(pick);
      const name = document.createElement("td");
      if (r.status === "damaged") name.textContent = r.name;
      else {
        const a = document.createElement("a");
        a.href = "/run/" + r.name.split("/").map(encodeURIComponent).join("/");
        a.textContent = r.name;
        name.appendChild(a);
      }
      tr.appendChild(name);
      tr.appendChild(cell(r.status, "status-" + r.status));
      tr.appendChild(cell(fmt(r.steps)));
      tr.appendChild(cell(r.clipper === "AutoClip" ? "AutoClip p=" + fmt(r.p) : fmt(r.clipper)));
      tr.appendChild(cell(fmt(r.every)));
      tr.appendChild(cell(r.quantities.join(", ")));
      tr.appendChild(cell(fmt(r.last_loss)));
      tr.appendChild(cell(r.error || "", "sentence"));
      body.appendChild(tr);
    }
    count.textContent = runs.length + (runs.length === 1 ? " run" : " runs");
  }
  async function poll() {
    try {
      const response = await fetch("/api/runs", {cache: "no-store"});
      if (response.ok) { render(await response.json()); document.body.dataset.updated = String(Date.now()); }
    } catch (e) { console.warn("dyn: index update failed, retrying", e); }
    setTimeout(poll, INTERVAL);
  }
  document.getElementById("compare").addEventListener("click", () => {
    const boxes = document.querySelectorAll("input.pick:checked");
    const picked = Array.from(boxes).map(b => "run=" + encodeURIComponent(b.value));
    if (picked.length) location.href = "/compare?" + picked.join("&");
  });
  render(INITIAL);
  setTimeout(poll, INTERVAL);
})();
"""


def index_html(root: str, runs: list[dict[str, Any]], interval_ms: int = 3000) -> str:
    """The dashboard's index of the runs under ``root`` (rows as ``RunInfo.as_dict()``), refreshed
    from ``api/runs`` every ``interval_ms`` without reloading."""
    script = INDEX_SCRIPT.replace("INTERVAL", str(int(interval_ms))).replace("INITIAL", _json(runs))
    heads = ["", "run", "status", "steps", "clipper", "every", "quantities", "last loss", ""]
    head = "".join(f"<th>{h}</th>" for h in heads)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>dyn: {html.escape(root)}</title>",
            f"<style>{CSS}</style>",
            "</head><body>",
            f"<h1>Runs under {html.escape(root)}</h1>",
            '<p class="meta"><span id="runs-count"></span>; refreshed every few seconds. Open a run for its report,'
            ' or tick several and <button id="compare">compare</button>.</p>',
            f'<div class="scroll"><table id="runs-table"><thead><tr>{head}</tr></thead>'
            '<tbody id="runs-body"></tbody></table></div>',
            f"<script>{script}</script>",
            "</body></html>",
        ]
    )
