"""``dyn``: record, plot and compare training dynamics. Only click is imported at start-up."""

from __future__ import annotations

import click

from cli.compare import compare, info
from cli.diagnose import diagnose
from cli.errors import run_group
from cli.export import export
from cli.plot import animate, plot
from cli.record import record
from cli.report import ls, report, serve
from cli.study import study
from cli.sweep import sweep


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dyn", prog_name="dyn")  # looked up only for --version
def dyn() -> None:
    """Study training dynamics with AutoClip: record runs, then plot and compare them."""


dyn.add_command(record)
dyn.add_command(compare)
dyn.add_command(info)
dyn.add_command(plot)
dyn.add_command(animate)
dyn.add_command(sweep)
dyn.add_command(study)
dyn.add_command(export)
dyn.add_command(report)
dyn.add_command(serve)
dyn.add_command(ls)
dyn.add_command(diagnose)


def main() -> None:
    run_group(dyn)


if __name__ == "__main__":
    main()
