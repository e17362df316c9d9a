"""Per-layer heatmaps over training: one row per module (or parameter tensor), one column per recorded step.

At transformer scale a model has hundreds of parameter tensors; ``group_layers`` folds them into
modules by name prefix (``transformer.h.3.attn.c_attn.weight`` -> ``transformer.h.3`` at depth 3) so
that a heatmap keeps at most ``max_rows`` rows, and names each row without cutting the part that
tells it from the others (the prefix every row shares is dropped instead).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from dynamics.run import Run
from figures import style

MAX_ROWS = 40  # rows a heatmap shows by default
MAX_ROW_LABELS = 80  # up to this many rows every row is named; beyond, every k-th
RANGE = "–"  # between the first and last block of a range of numbered blocks: h.0–2
RATIO = "update_ratio"  # ||θt − θt−1|| / ||θt−1||: combined over a module as the ratio of the module's norms


def natural_key(name: str) -> list:
    """Sort key that puts 'layers.2' before 'layers.10' (model order for numbered modules)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def layer_columns(frame) -> list[str]:
    """The numeric columns of a layers table (a Run's ``layers``, or the run itself) that a heatmap can show."""
    import pandas as pd

    frame = frame.layers if isinstance(frame, Run) else frame
    if frame is None:
        return []
    return [c for c in frame.columns if c not in ("step", "name") and pd.api.types.is_numeric_dtype(frame[c].dtype)]


def default_column(runs: list[Run]) -> str:
    """update_ratio when every run recorded it, else grad_norm."""
    return RATIO if all(RATIO in r.layers.columns for r in runs) else "grad_norm"


def is_norm(column: str) -> bool:
    """Columns that are Euclidean norms of a tensor: a module's norm is the root-sum-square of its tensors'."""
    return column in ("grad_norm", "step_size", "param_norm") or column.endswith("_norm")


@dataclass
class LayerGroups:
    """Rows of a per-layer heatmap: ``values[i, j]`` is ``column`` of module ``keys[i]`` at ``steps[j]``.

    ``labels`` are the keys without the ``prefix`` every row shares; ``members`` the parameter tensors
    of each row; ``depth`` the number of name components kept (None: every tensor its own row);
    ``binned`` whether numbered blocks were joined into ranges (``h.0–2``) to stay within the rows asked.
    """

    column: str
    labels: list[str]
    keys: list[str]
    steps: np.ndarray
    values: np.ndarray
    members: list[list[str]]
    depth: int | None = None
    prefix: str = ""
    binned: bool = False
    tensors: int = field(default=0)

    @property
    def grouped(self) -> bool:
        """Whether some row holds more than one tensor."""
        return any(len(m) > 1 for m in self.members)


def _model_order(layers) -> list[str]:
    # the recorded order is the model's; a table already sorted by name has lost it, and natural
    # order ('layers.2' before 'layers.10') comes closest
    seen = list(dict.fromkeys(layers.name.astype(str)))
    return sorted(seen, key=natural_key) if seen == sorted(seen) else seen


def _keys_at(names: list[str], depth: int) -> list[str]:
    return [".".join(n.split(".")[:depth]) for n in names]


def _rows(keys: list[str]) -> dict[str, list[int]]:
    """Tensor indices per key, keys in order of first appearance (model order)."""
    rows: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        rows.setdefault(key, []).append(i)
    return rows


def _binned(names: list[str], depth: int, max_rows: int) -> dict[str, list[int]] | None:
    """Rows at ``depth`` with numbered siblings (``h.0``, ``h.1``, ...) joined into ranges of k consecutive
    blocks, k the smallest that keeps at most ``max_rows`` rows; None if no k does or nothing is numbered."""
    keys = _keys_at(names, depth)
    numbered: dict[str, list[str]] = {}  # parent -> its block numbers (as written: '01' stays '01')
    plain = set()  # the other rows
    for key in dict.fromkeys(keys):
        parts = key.split(".")
        if len(parts) == depth and parts[-1].isdigit():
            numbered.setdefault(".".join(parts[:-1]), []).append(parts[-1])
        else:
            plain.add(key)
    if not numbered:
        return None
    numbered = {p: sorted(ns, key=int) for p, ns in numbered.items()}
    plain = len(plain)
    blocks = max(len(ns) for ns in numbered.values())
    for k in range(2, blocks + 1):
        if plain + sum(math.ceil(len(ns) / k) for ns in numbered.values()) <= max_rows:
            break
    else:
        return None
    bin_of: dict[str, str] = {}
    for parent, ns in numbered.items():
        for start in range(0, len(ns), k):
            chunk = ns[start : start + k]
            label = f"{chunk[0]}" if len(chunk) == 1 else f"{chunk[0]}{RANGE}{chunk[-1]}"
            for n in chunk:
                bin_of[f"{parent}.{n}" if parent else f"{n}"] = f"{parent}.{label}" if parent else label
    return _rows([bin_of.get(k, k) for k in keys])


def _choose_rows(names: list[str], depth: int | None, max_rows: int) -> tuple[dict[str, list[int]], int | None, bool]:
    """(rows, depth used, binned): the deepest grouping with at most ``max_rows`` rows unless ``depth`` is given."""
    if depth is not None:
        return _rows(_keys_at(names, depth)), depth, False
    deepest = max(len(n.split(".")) for n in names)
    fitting = [d for d in range(1, deepest + 1) if len(_rows(_keys_at(names, d))) <= max_rows]
    best = fitting[-1] if fitting else None
    if best == deepest:
        return _rows(names), None, False  # every tensor fits: one row each
    finer = _binned(names, (best or 0) + 1, max_rows)
    if finer is not None and (best is None or len(finer) > len(_rows(_keys_at(names, best)))):
        return finer, (best or 0) + 1, True
    if best is None:  # not even the top-level modules fit: show them all
        return _rows(_keys_at(names, 1)), 1, False
    return _rows(_keys_at(names, best)), best, False


def _labels(keys: list[str]) -> tuple[list[str], str]:
    """(labels, prefix): the keys without the leading name components they all share; every label keeps
    at least one component, and a block number keeps the name before it ('h.10', never '10')."""
    if len(keys) <= 1:
        return list(keys), ""
    parts = [k.split(".") for k in keys]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    while common > 0 and any(p[common][:1].isdigit() for p in parts):
        common -= 1
    prefix = ".".join(parts[0][:common]) + "." if common else ""
    return [".".join(p[common:]) for p in parts], prefix


def _combine(column: str, table, step_size, param_norm, rows: list[list[int]]) -> np.ndarray:
    """One row of values per group: norms as root-sum-square, update_ratio as the ratio of the group's
    update norm to its norm before the update; a column of any other kind only for groups of one."""
    out = np.empty((len(rows), table.shape[1]))
    for i, idx in enumerate(rows):
        if len(idx) == 1:
            out[i] = table[idx[0]]
        elif is_norm(column):
            out[i] = np.sqrt(np.sum(table[idx] ** 2, axis=0))
        elif column == RATIO:
            if step_size is None:
                raise ValueError(
                    "update_ratio cannot be combined over a module without the layers column step_size; "
                    "choose a --depth that keeps single tensors, or another column"
                )
            s, r = step_size[idx], table[idx]
            p = param_norm[idx] if param_norm is not None else np.full_like(s, np.nan)
            with np.errstate(divide="ignore", invalid="ignore"):
                # ||θt−1|| of each tensor: ||Δθ|| / ratio; unchanged (ratio 0): ||θt||; NaN ratio (θt−1 = 0): 0
                before = np.where(
                    r > 0, s / r, np.where(r == 0, p, np.where(np.isnan(r) & np.isfinite(s), 0.0, np.nan))
                )
                num, den = np.sqrt(np.sum(s**2, axis=0)), np.sqrt(np.sum(before**2, axis=0))
                out[i] = np.where(den > 0, num / den, np.nan)
        else:
            raise ValueError(
                f"{column} is not a norm, so it cannot be combined over a module's tensors; "
                "choose a --depth that keeps single tensors, --match fewer tensors, or a norm column"
            )
    return out


def group_layers(layers, column: str, depth: int | None = None, match: str | None = None, max_rows: int = MAX_ROWS):
    """The rows of a per-layer heatmap of ``column`` as a ``LayerGroups``.

    ``layers``: a run's layers table (``load_run(d).layers``), one row per step and parameter tensor.
    ``match``: keep only tensors whose name contains a match of this regular expression (``re.search``),
    applied before grouping. ``depth``: group tensors by their first ``depth`` dot-separated name
    components; by default the deepest depth that gives at most ``max_rows`` rows (every tensor its own
    row when they all fit; numbered blocks joined into ranges, ``h.0–2``, when a depth has too many; more
    rows only when the top-level names alone are more).
    A group's value is the root-sum-square of its tensors' norms (the norm of the module's parameters
    as one vector); for ``update_ratio``, the module's update norm over its norm before the update.
    Rows are in model order. Raises ValueError on a missing column, a bad regex or no match.

    Example::

        g = group_layers(load_run("runs/gpt2").layers, "grad_norm")
        g.labels, g.steps, g.values  # rows, recorded steps, rows x steps
    """
    from dynamics import checks

    if layers is None or layers.empty:
        raise ValueError("the run recorded no per-layer rows (record with layers on)")
    if column not in layer_columns(layers):
        raise ValueError(f"no layers column {column!r}; the layers columns are: {', '.join(layer_columns(layers))}")
    if depth is not None:
        depth = checks.positive_int("depth", depth)
    max_rows = checks.positive_int("max_rows", max_rows)
    names = _model_order(layers)
    if match is not None:
        try:
            pattern = re.compile(match)
        except re.error as e:
            raise ValueError(f"--match {match!r} is not a valid regular expression ({e})") from None
        kept = [n for n in names if pattern.search(n)]
        if not kept:
            raise ValueError(f"--match {match!r} matches no parameter name; names look like: {', '.join(names[:3])}")
        names = kept
    frame = layers[layers.name.isin(names)]

    def pivot(col):
        if col not in frame.columns:
            return None
        return frame.pivot(index="name", columns="step", values=col).reindex(names).to_numpy(dtype=float)

    table = pivot(column)
    steps = np.sort(frame.step.unique())
    rows, used, binned = _choose_rows(names, depth, max_rows)
    keys = list(rows)
    values = _combine(
        column, table, pivot("step_size") if column == RATIO else None, pivot("param_norm"), list(rows.values())
    )
    labels, prefix = _labels(keys)
    return LayerGroups(
        column=column,
        labels=labels,
        keys=keys,
        steps=steps,
        values=values,
        members=[[names[i] for i in idx] for idx in rows.values()],
        depth=used,
        prefix=prefix,
        binned=binned,
        tensors=len(names),
    )


def _log10(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(values) & (values > 0), np.log10(values), np.nan)


def layers_figure(
    runs: list[Run], column: str | None = None, depth: int | None = None, match: str | None = None, max_rows=MAX_ROWS
):
    """Heatmaps of log10(column) per module (rows) and recorded step (columns), one panel per run,
    sharing one colour scale and one colour bar; returns a matplotlib Figure.

    ``column``: a numeric column of the layers table; by default update_ratio where every run
    has it, else grad_norm. ``depth``, ``match``, ``max_rows``: how tensors become rows, as in
    ``group_layers`` (by default at most 40 rows). Cells that are missing, zero or negative are
    left blank (grey). ``fig.heatmap_axes`` lists the panels, ``fig.layer_groups`` their rows.

    Example::

        layers_figure([load_run("runs/gpt2")], "grad_norm", match=r"\\.attn\\.").savefig("layers.png")
    """
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    plt = style.pyplot()
    if not runs:
        raise ValueError("layers_figure needs at least one run")
    column = column or default_column(runs)
    data = []
    for run in runs:
        try:
            data.append(group_layers(run.layers, column, depth=depth, match=match, max_rows=max_rows))
        except ValueError as e:
            raise ValueError(f"{run.path}: {e}") from None
    finite = np.concatenate([_log10(g.values)[np.isfinite(_log10(g.values))] for g in data])
    vmin, vmax = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    heights = [
        max(1.6, 0.8 + (0.16 if len(g.labels) <= 40 else 0.12) * min(len(g.labels), MAX_ROW_LABELS)) for g in data
    ]
    longest = max(len(label) for g in data for label in g.labels)
    fig, axes = plt.subplots(
        len(runs),
        1,
        figsize=(4.5 + 0.065 * longest + 3.0, sum(heights) + 0.6 * len(runs)),
        height_ratios=heights,
        layout="constrained",
        squeeze=False,
    )
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    titles = style.unique_labels(runs)
    fig.heatmap_axes, fig.layer_groups = [], data
    image = None
    for ax, g, title in zip(axes[:, 0], data, titles):
        image = ax.imshow(_log10(g.values), aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax)
        every = max(1, math.ceil(len(g.labels) / MAX_ROW_LABELS))
        rows = np.arange(0, len(g.labels), every)
        ax.set_yticks(rows, [g.labels[i] for i in rows], fontsize=8 if len(rows) <= 40 else 6)
        if every > 1:
            ax.set_yticks(np.arange(len(g.labels)), minor=True)
        # columns are recorded steps, which need not be evenly spaced: tick by column, label by step
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
        ax.xaxis.set_major_formatter(
            FuncFormatter(lambda x, _, s=g.steps: f"{s[int(round(x))]:d}" if 0 <= round(x) < len(s) else "")
        )
        if g.grouped:
            title = f"{title}: {g.tensors} tensors in {len(g.labels)} modules"
        elif match is not None:
            title = f"{title}: {g.tensors} tensors"
        ax.set(xlabel="Iterations", ylabel=f"{g.prefix}…" if g.prefix else "", title=title)
        ax.tick_params(axis="both", length=2)
        fig.heatmap_axes.append(ax)
    how = ""
    if any(g.grouped for g in data):
        how = " (module: ||Δθ|| / ||θ||)" if column == RATIO else " (module: root-sum-square)"
    fig.colorbar(image, ax=axes[:, 0].tolist(), label=f"log10({column}){how}", shrink=0.9 if len(runs) > 1 else 1.0)
    return fig
