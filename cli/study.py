"""``dyn study``: the paper's four Fig. 1 claims with intervals over seeds, written from runs."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import check_figure_path, plottable_runs
from cli.errors import fail


def expand(run_dirs) -> list[Path]:
    """Run directories; a sweep folder (with sweep.json) stands for every run inside it."""
    out = []
    for d in map(Path, run_dirs):
        if (d / "sweep.json").exists() and not (d / "config.json").exists():
            out += sorted(p for p in d.iterdir() if (p / "config.json").exists())
        else:
            out.append(d)
    return out


@click.command("study")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out", "-o", type=click.Path(path_type=Path), default=Path("docs/study.md"), show_default=True, help="Markdown."
)
@click.option(
    "--readme",
    type=click.Path(path_type=Path),
    default=None,
    help="Also rewrite the study block of this README (between its study markers).",
)
def study(run_dirs, out, readme):
    """Write the study: AutoClip vs no clipping over seeds, each claim with its interval and verdict.

    RUN_DIRS are the runs of two arms (or a `dyn sweep` folder holding them); the document
    and its figure (OUT with .png) are computed from them alone.
    """
    if out.suffix.lower() != ".md":
        fail(f"--out {out}: the study is a Markdown file (.md)")
    check_figure_path(out.with_suffix(".png"))
    if readme is not None and not readme.is_file():
        fail(f"--readme {readme}: no such file")
    runs = plottable_runs(expand(run_dirs))
    from figures.study import write_study

    try:
        write_study(runs, out, readme=readme)
    except ValueError as e:
        fail(str(e))
    click.echo(str(out))
