"""The study: the paper's four Fig. 1 claims, tested on runs of two arms over seeds.

Everything in the document is computed from the runs it is given, so it can be regenerated
and checked; nothing in it is typed by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from dynamics.run import Run
from dynamics.stats import difference_interval, group_runs, mean_interval, never_clips
from dynamics.summary import format_interval, format_number, r_block, summarize

README_BEGIN = "<!-- study:begin (written by dyn study; do not edit) -->"
README_END = "<!-- study:end -->"
DIGITS = 3  # significant digits of the numbers in the document


@dataclass(frozen=True)
class Claim:
    """One claim of the paper's Fig. 1: AutoClip's ``column`` is ``better`` ("lower" or "higher")."""

    text: str
    column: str
    better: str
    paper: str


CLAIMS = (
    Claim("AutoClip makes the step size steadier (coefficient of variation)", "step_size_cv", "lower", "visibly"),
    Claim("AutoClip reaches a lower training loss (last 5% of steps)", "final_loss", "lower", "visibly"),
    Claim(
        "log gradient norm and log smoothness correlate more strongly (Pearson r)", "r_value", "higher", "0.86 vs 0.62"
    ),
    Claim("AutoClip separates held-out mixtures better (SI-SDRi, dB)", "final_si_sdri", "higher", "9.2 vs 8.1"),
)


def verdict(low: float, high: float, better: str) -> str:
    """ "reproduced" when the 95% interval of AutoClip minus no clipping lies wholly on the paper's side,
    "contradicted" when wholly on the other, else "inconclusive"."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive"
    good, bad = (high < 0, low > 0) if better == "lower" else (low > 0, high < 0)
    return "reproduced" if good else "contradicted" if bad else "inconclusive"


def _arms(runs: list[Run]):
    """(clipped group, unclipped group): exactly two arms, one of which never clips."""
    groups = group_runs(runs)
    if len(groups) != 2:
        raise ValueError(f"the study compares two arms (runs differing only in seed), got {len(groups)}")
    plain = [g for g in groups if never_clips(g.config.get("clipper"))]
    if len(plain) != 1:
        raise ValueError("the study needs one arm that never clips (p=100 or no clipping) and one that clips")
    clipped = groups[0] if plain[0] is groups[1] else groups[1]
    return clipped, plain[0]


def regime(run: Run) -> dict[str, float | str]:
    """What the runs trained: network, steps, batch, segment length and hours of audio seen."""
    task = run.config.get("task", {})
    steps = int(run.steps.step.iloc[-1]) if len(run.steps) else 0
    batch, samples = task.get("batch_size", math.nan), task.get("n_samples", math.nan)
    hours = steps * batch * samples / 8000 / 3600
    paper_hours = 80_000 * 25 * 3.2 / 3600
    return {
        "network": f"BLSTM {task.get('layers', '?')}x{task.get('hidden', '?')}",
        "steps": steps,
        "batch": batch,
        "segment_s": samples / 8000,
        "hours": hours,
        "fraction_of_paper": hours / paper_hours,
        "data": task.get("data") or "synthetic",
    }


def study(runs: list[Run], figure: str | None = None) -> tuple[str, str]:
    """The study document (Markdown) and a short summary for the README, both from ``runs``."""
    clipped, plain = _arms(runs)
    rows = {id(r): summarize(r) for r in runs}
    a = {c.column: [rows[id(r)][c.column] for r in clipped.runs] for c in CLAIMS}
    b = {c.column: [rows[id(r)][c.column] for r in plain.runs] for c in CLAIMS}
    reg = regime(clipped.runs[0])
    lines = [
        "# The study: AutoClip against no clipping, over seeds",
        "",
        f"Arms: **{clipped.name}** ({clipped.n_seeds} seeds) and **{plain.name}** ({plain.n_seeds} seeds). "
        "Each number is the mean over seeds with its 95% Student t interval; each difference is "
        "AutoClip minus no clipping with Welch's 95% interval. A claim is *reproduced* when that interval "
        "lies wholly on the paper's side of zero, *contradicted* when wholly on the other side, and "
        "*inconclusive* otherwise.",
        "",
        f"Regime: {reg['network']}, {reg['steps']:,} steps of batch {reg['batch']} x {reg['segment_s']:g} s "
        f"({reg['data']} data), about {reg['hours']:.1f} hours of audio seen: {reg['fraction_of_paper']:.4f} of "
        "the paper's 2x300 BLSTM at ~80k steps of batch 25 x 3.2 s.",
        "",
        "| claim | paper | AutoClip | no clipping | difference | verdict |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = []
    for c in CLAIMS:
        ma, mb = mean_interval(a[c.column]), mean_interval(b[c.column])
        diff = difference_interval(a[c.column], b[c.column])
        v = verdict(diff[1], diff[2], c.better)
        verdicts.append((c, diff, v))
        lines.append(
            f"| {c.text} ({c.better} is the paper's side) | {c.paper} | {format_interval(*ma, DIGITS)} | "
            f"{format_interval(*mb, DIGITS)} | {format_interval(*diff, DIGITS)} | **{v}** |"
        )
    lines += ["", "Per run (r with its 95% studentized moving-block bootstrap interval over the record rows):", ""]
    lines += [
        "| run | arm | step size CV | final loss | r [95%] | block (rows) | final SI-SDRi |",
        "|---|---|---|---|---|---|---|",
    ]
    for group in (clipped, plain):
        for r in group.runs:
            s = rows[id(r)]
            r_cell = format_interval(s["r_value"], s["r_ci_low"], s["r_ci_high"], DIGITS)
            lines.append(
                f"| {r.name} | {group.name} | {format_number(s['step_size_cv'], DIGITS)} | "
                f"{format_number(s['final_loss'], DIGITS)} | {r_cell} | {r_block(r)} | "
                f"{format_number(s['final_si_sdri'], DIGITS)} |"
            )
    if figure:
        lines += ["", f"![Fig. 1 of the study: mean over seeds with bands, pooled hexbins]({figure})"]
    lines += [
        "",
        "Generated by `dyn study` from the runs listed above (`make study` records them and writes this file).",
        "",
    ]
    summary = [
        f"{reg['network']}, {reg['steps']:,} steps of batch {reg['batch']} x {reg['segment_s']:g} s of "
        f"{reg['data']} data ({reg['hours']:.1f} h of audio, {reg['fraction_of_paper']:.4f} of the paper's), "
        f"{clipped.n_seeds} + {plain.n_seeds} seeds; AutoClip minus no clipping, 95% interval:",
        "",
    ]
    summary += [f"- {c.text}: {format_interval(*diff, DIGITS)}: **{v}**" for c, diff, v in verdicts]
    return "\n".join(lines), "\n".join(summary)


def write_study(runs: list[Run], out: str | Path, readme: str | Path | None = None, figure: bool = True) -> Path:
    """Write the study document to ``out`` (and its Fig. 1 beside it); refresh the README's study block."""
    out = Path(out)
    figure_name = None
    if figure:
        from figures.fig1 import fig1
        from figures.files import save_figure

        figure_name = out.with_suffix(".png").name
        save_figure(fig1(runs), out.with_suffix(".png"))
    document, summary = study(runs, figure_name)
    out.write_text(document)
    if readme is not None:
        readme = Path(readme)
        text = readme.read_text()
        if README_BEGIN not in text or README_END not in text:
            raise ValueError(f"{readme} has no study block ({README_BEGIN} ... {README_END})")
        head, rest = text.split(README_BEGIN, 1)
        _, tail = rest.split(README_END, 1)
        readme.write_text(f"{head}{README_BEGIN}\n{summary}\n{README_END}{tail}")
    return out
