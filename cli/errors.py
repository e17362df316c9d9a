"""Bad input ends with one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import sys

import click

EXIT_BAD_INPUT = 2


class BadInput(click.ClickException):
    """An error in what the user asked for: printed as one line, exit code 2."""

    exit_code = EXIT_BAD_INPUT


def fail(message: str) -> None:
    raise BadInput(message)


def run_group(group: click.Group, prog_name: str = "dyn") -> None:
    """Run a click group with every usage error shortened to one line and exit code 2."""
    try:
        group.main(prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo(f"{prog_name}: interrupted (a recording resumes with: dyn record --resume RUN_DIR)", err=True)
        sys.exit(130)
    except click.ClickException as e:
        message = " ".join(e.format_message().split())
        click.echo(f"{prog_name}: error: {message}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
