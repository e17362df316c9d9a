"""``dyn``: record, plot and compare training dynamics. Only click is imported at start-up."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import click


def _version() -> str:
    try:
        return version("dyn")
    except PackageNotFoundError:
        return "unknown"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), prog_name="dyn")
def main() -> None:
    """Study training dynamics with AutoClip: record runs, then plot and compare them."""
