"""Errors end with one line on stderr and a meaningful exit code, never a traceback.

2: bad input (an option, a path, a run directory); 1: the machine failed us (disk full, no
permission); 130 and 143: interrupted by SIGINT or SIGTERM, with the hint to resume.
"""

from __future__ import annotations

import errno
import signal
import sys

import click

EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 1

# What to run after an interruption, per command (a recording resumes; a sweep reruns).
RESUME_HINTS = {
    "record": "a recording resumes with: dyn record --resume RUN_DIR",
    "sweep": "rerun the same dyn sweep: finished runs are kept, interrupted ones resume",
}


class BadInput(click.ClickException):
    """An error in what the user asked for: printed as one line, exit code 2."""

    exit_code = EXIT_BAD_INPUT


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C."""


def fail(message: str) -> None:
    raise BadInput(message)


def environment_failure(error: OSError, hint: str = "", path=None) -> None:
    """One line for a failure of the machine (disk full, permission, read-only file system), exit 1.

    ``path``: what could not be written (default: the error's file name); ``hint``: what to do next.
    """
    reason = error.strerror or str(error)
    plain = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded"}.get(error.errno)
    what = f"{plain} ({reason})" if plain else reason
    where = path if path is not None else error.filename
    place = f"could not write {where}: " if where else ""
    then = f"; {hint}" if hint else ""
    click.echo(f"dyn: error: {place}{what}{then}", err=True)
    sys.exit(EXIT_ENVIRONMENT)


def _terminate(signum, frame) -> None:
    raise Terminated()


def run_group(group: click.Group, prog_name: str = "dyn") -> None:
    """Run a click group with every user-caused error shortened to one line and a meaningful exit code."""
    signal.signal(signal.SIGTERM, _terminate)
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    hint = RESUME_HINTS.get(command)
    interrupted = f"{prog_name}: interrupted" + (f" ({hint})" if hint else "")
    try:
        # not group.main(): on Ctrl-C it prints an empty line first, and the interruption is one line
        with group.make_context(prog_name, sys.argv[1:]) as ctx:
            group.invoke(ctx)
    except click.exceptions.Abort as e:
        if isinstance(e.__context__, EOFError):  # click turns EOFError into Abort: a truncated file
            click.echo(f"{prog_name}: error: unexpected end of file ({e.__context__})", err=True)
            sys.exit(EXIT_ENVIRONMENT)
        click.echo(interrupted, err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo(interrupted, err=True)
        sys.exit(130)
    except Terminated:
        click.echo(f"{interrupted.replace('interrupted', 'terminated', 1)}", err=True)
        sys.exit(143)
    except click.ClickException as e:
        message = " ".join(e.format_message().split())
        click.echo(f"{prog_name}: error: {message}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
