"""``dyn``: record, plot and compare training dynamics. Only click is imported at start-up."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import click

from cli.compare import compare, info
from cli.errors import run_group
from cli.record import record


def _version() -> str:
    try:
        return version("dyn")
    except PackageNotFoundError:
        return "unknown"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), prog_name="dyn")
def dyn() -> None:
    """Study training dynamics with AutoClip: record runs, then plot and compare them."""


dyn.add_command(record)
dyn.add_command(compare)
dyn.add_command(info)


def main() -> None:
    run_group(dyn)


if __name__ == "__main__":
    main()
